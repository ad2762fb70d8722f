"""Source mutations for task synthesis: one small, realistic bug at a time.

Each mutation edits the source text at the exact location `ast` reports (the rest of the file stays
byte-for-byte the same, so the gold diff is a one- or few-line hunk). Kinds:

    binop       + <-> -, * -> +, // -> /, % -> //     augassign  += <-> -=, *= -> +=
    compare     < <-> <=, > <-> >=, == <-> !=, in <-> not in, is <-> is not
    boolop      and <-> or                         not        `not x` -> `x`
    off_by_one  integer constant n -> n + 1 and n -> n - 1 (ranges and slices included)
    constant    True <-> False, a string constant -> "" (or "" -> "x")
    drop_if     an `if` statement without `else` is removed
    drop_return a `return` inside a branch or loop is removed
"""

from __future__ import annotations

import ast
from dataclasses import dataclass


@dataclass(frozen=True)
class Mutation:
    path: str            # file, relative to the repository
    function: str        # qualified name of the enclosing function
    kind: str
    lineno: int
    description: str     # e.g. "`<` -> `<=`"
    source: str          # the whole mutated file

    @property
    def key(self) -> str:
        return f"{self.path}:{self.lineno}:{self.kind}:{self.description}"


_BINOP = {ast.Add: ("+", ["-"]), ast.Sub: ("-", ["+"]), ast.Mult: ("*", ["+"]),
          ast.FloorDiv: ("//", ["/"]), ast.Mod: ("%", ["//"])}
_CMP = {ast.Lt: ("<", ["<="]), ast.LtE: ("<=", ["<"]), ast.Gt: (">", [">="]), ast.GtE: (">=", [">"]),
        ast.Eq: ("==", ["!="]), ast.NotEq: ("!=", ["=="]), ast.In: ("in", ["not in"]),
        ast.NotIn: ("not in", ["in"]), ast.Is: ("is", ["is not"]), ast.IsNot: ("is not", ["is"])}
_BOOL = {ast.And: ("and", "or"), ast.Or: ("or", "and")}


class _Source:
    def __init__(self, text: str):
        self.text = text
        self.lines = text.splitlines(keepends=True)
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))

    def offset(self, lineno: int, col_bytes: int) -> int:
        """Character offset of (1-based line, UTF-8 byte column)."""
        line = self.lines[lineno - 1]
        return self.starts[lineno - 1] + len(line.encode("utf-8")[:col_bytes].decode("utf-8", "replace"))

    def start(self, node) -> int:
        return self.offset(node.lineno, node.col_offset)

    def end(self, node) -> int:
        return self.offset(node.end_lineno, node.end_col_offset)

    def replace(self, a: int, b: int, new: str) -> str:
        return self.text[:a] + new + self.text[b:]


def _find_op(text: str, a: int, b: int, op: str) -> int | None:
    """Offset of operator token `op` in text[a:b] (the gap between two operands), skipping
    parentheses and comments; None if absent or ambiguous."""
    gap = text[a:b]
    i = 0
    found = None
    while i < len(gap):
        ch = gap[i]
        if ch == "#":
            nl = gap.find("\n", i)
            i = len(gap) if nl < 0 else nl
            continue
        if gap.startswith(op, i):
            before = gap[i - 1] if i else " "
            after = gap[i + len(op)] if i + len(op) < len(gap) else " "
            word = op[0].isalpha()
            if not word or (not before.isalnum() and before != "_" and not after.isalnum() and after != "_"):
                if not word and (after in "=<>/*" or before in "=<>!/*"):   # part of a longer operator
                    i += 1
                    continue
                if found is not None:
                    return None
                found = a + i
                i += len(op)
                continue
        i += 1
    return found


def _is_docstring(node, parents) -> bool:
    parent = parents.get(node)
    if isinstance(parent, ast.Expr):
        grand = parents.get(parent)
        body = getattr(grand, "body", None)
        return bool(body) and body[0] is parent
    return False


def mutations(path: str, text: str) -> list[Mutation]:
    """Every mutation of the functions in one source file, in source order."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    src = _Source(text)
    parents: dict = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    out: list[Mutation] = []
    seen: set[str] = set()

    def add(fn: str, kind: str, node, desc: str, new_text: str) -> None:
        if new_text == text or new_text in seen:
            return
        try:
            compile(new_text, path, "exec")
        except SyntaxError:
            return
        seen.add(new_text)
        out.append(Mutation(path, fn, kind, node.lineno, desc, new_text))

    def visit_function(fn_node, qual: str) -> None:
        for node in ast.walk(fn_node):
            if node is not fn_node and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue   # nested functions are walked too (part of ast.walk); fine
            if isinstance(node, ast.BinOp) and type(node.op) in _BINOP:
                sym, alts = _BINOP[type(node.op)]
                pos = _find_op(text, src.end(node.left), src.start(node.right), sym)
                if pos is not None:
                    for alt in alts:
                        add(qual, "binop", node, f"`{sym}` -> `{alt}`", src.replace(pos, pos + len(sym), alt))
            elif isinstance(node, ast.AugAssign) and type(node.op) in (ast.Add, ast.Sub, ast.Mult):
                sym = {ast.Add: "+=", ast.Sub: "-=", ast.Mult: "*="}[type(node.op)]
                alt = {"+=": "-=", "-=": "+=", "*=": "+="}[sym]
                pos = _find_op(text, src.end(node.target), src.start(node.value), sym)
                if pos is not None:
                    add(qual, "augassign", node, f"`{sym}` -> `{alt}`", src.replace(pos, pos + len(sym), alt))
            elif isinstance(node, ast.Compare):
                left = node.left
                for op, right in zip(node.ops, node.comparators):
                    sym, alts = _CMP[type(op)]
                    pos = _find_op(text, src.end(left), src.start(right), sym.split()[0])
                    if pos is not None:
                        # the whole (possibly two-word) operator spans to the start of `right`'s gap
                        span_end = pos + len(sym) if text.startswith(sym, pos) else None
                        if sym == "not in" or sym == "is not":
                            tail = text[pos:src.start(right)]
                            span_end = pos + len(tail.rstrip()) if " ".join(tail.split()) == sym else None
                        if span_end is not None:
                            for alt in alts:
                                add(qual, "compare", node, f"`{sym}` -> `{alt}`", src.replace(pos, span_end, alt))
                    left = right
            elif isinstance(node, ast.BoolOp):
                sym, alt = _BOOL[type(node.op)]
                pos = _find_op(text, src.end(node.values[0]), src.start(node.values[1]), sym)
                if pos is not None:
                    add(qual, "boolop", node, f"`{sym}` -> `{alt}`", src.replace(pos, pos + len(sym), alt))
            elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
                a, b = src.start(node), src.start(node.operand)
                if text[a:b].strip() == "not":
                    add(qual, "not", node, "dropped `not`", src.replace(a, b, ""))
            elif isinstance(node, ast.Constant):
                if _is_docstring(node, parents):
                    continue
                a, b = src.start(node), src.end(node)
                if isinstance(node.value, bool):
                    add(qual, "constant", node, f"`{node.value}` -> `{not node.value}`",
                        src.replace(a, b, str(not node.value)))
                elif isinstance(node.value, int) and text[a:b].isdigit():
                    for delta in (1, -1):
                        v = node.value + delta
                        if v >= 0:
                            add(qual, "off_by_one", node, f"`{node.value}` -> `{v}`", src.replace(a, b, str(v)))
                elif isinstance(node.value, str) and "\n" not in text[a:b] and not isinstance(
                        parents.get(node), ast.JoinedStr):
                    new = '""' if node.value else '"x"'
                    add(qual, "constant", node, f"`{text[a:b]}` -> `{new}`", src.replace(a, b, new))
            elif isinstance(node, ast.If) and not node.orelse:
                parent = parents.get(node)
                body = _owning_body(parent, node)
                if body is None:
                    continue
                add(qual, "drop_if", node, f"dropped `if` at line {node.lineno}", _drop_stmt(src, node, body))
            elif isinstance(node, ast.Return) and not isinstance(parents.get(node), (ast.FunctionDef,
                                                                                    ast.AsyncFunctionDef)):
                parent = parents.get(node)
                body = _owning_body(parent, node)
                if body is None:
                    continue
                add(qual, "drop_return", node, f"dropped `return` at line {node.lineno}", _drop_stmt(src, node, body))

    def walk(body, prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit_function(node, prefix + node.name)
            elif isinstance(node, ast.ClassDef):
                walk(node.body, prefix + node.name + ".")

    walk(tree.body, "")
    out.sort(key=lambda m: m.lineno)
    return out


def _owning_body(parent, node):
    for field in ("body", "orelse", "finalbody"):
        body = getattr(parent, field, None)
        if isinstance(body, list) and node in body:
            return body
    return None


def _drop_stmt(src: _Source, node, body) -> str:
    """Remove the statement's whole lines; a body left empty gets `pass`."""
    first, last = node.lineno, node.end_lineno
    a, b = src.starts[first - 1], src.starts[last]
    if len(body) == 1:
        indent = src.lines[first - 1][: len(src.lines[first - 1]) - len(src.lines[first - 1].lstrip())]
        return src.replace(a, b, indent + "pass\n")
    if src.lines[first - 1][: node.col_offset].strip():   # shares its line with another statement
        return src.text
    return src.replace(a, b, "")
