"""Scaffolds: how a model's turn is read as a tool call, and how tools are described to it.

An environment names its tools (`Tool`: a name, its string arguments, a one-line description);
the final answer is always the `answer` action. Two tool-call formats, selectable per task, so the
same task trains under both:

- `xml`: `<bash>command</bash>` style tags, one per tool of one argument (the sandbox shell is
  `<bash>`), and `<answer>...</answer>`; tools of several arguments are JSON inside the tag,
  e.g. `<write>{"path": "a.py", "content": "..."}</write>`.
- `json`: one JSON object per turn, `{"tool": NAME, "args": {...}}`, optionally in a ```json
  fence; the answer is the `submit` tool.

Parsing never raises: output that is neither a tool call nor an answer is an `invalid` action
with the reason, which ends the episode with reward 0.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Tool:
    name: str
    args: tuple[str, ...]
    description: str


SHELL = Tool("shell", ("cmd",), "run a shell command in your sandbox and see its output")
WRITE = Tool("write", ("path", "content"), "write a whole file in your sandbox")
SANDBOX_TOOLS = (SHELL, WRITE)


@dataclass
class Action:
    kind: str                        # a tool name | "answer" | "invalid"
    args: dict = field(default_factory=dict)
    reason: str = ""                 # why an action is invalid


def _check_args(tool: Tool, args) -> Action:
    if not isinstance(args, dict) or any(not isinstance(args.get(k), str) for k in tool.args):
        return Action("invalid", reason=f"tool {tool.name} needs string args {', '.join(tool.args)}")
    return Action(tool.name, {k: args[k] for k in tool.args})


def parse_json(text: str):
    """(the parsed value, None) or (None, why it cannot be parsed). Besides malformed JSON, the
    parser raises RecursionError on deep nesting and ValueError on integers of thousands of digits."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as err:
        return None, f"{err.msg} at column {err.colno}"
    except RecursionError:
        return None, "nested too deeply"
    except ValueError as err:
        return None, str(err)


class Scaffold:
    name = ""

    def __init__(self, tools: tuple[Tool, ...] = SANDBOX_TOOLS):
        self.tools = {t.name: t for t in tools}

    def system_prompt(self) -> str:
        raise NotImplementedError

    def parse(self, text: str) -> Action:
        raise NotImplementedError

    def render(self, action: Action) -> str:
        """The model turn that expresses `action` (for oracle demonstrations and replay)."""
        raise NotImplementedError


class XMLScaffold(Scaffold):
    name = "xml"
    _ALIASES = {"shell": "bash"}      # the tag of a tool, where it differs from its name

    def _tag(self, tool: str) -> str:
        return self._ALIASES.get(tool, tool)

    def system_prompt(self) -> str:
        lines = [f"<{self._tag(t.name)}>{t.args[0] if len(t.args) == 1 else 'JSON with ' + ', '.join(t.args)}"
                 f"</{self._tag(t.name)}>: {t.description}" for t in self.tools.values()]
        return "Use one tool per turn:\n" + "\n".join(lines) + "\nGive the final answer with <answer>answer</answer>."

    def parse(self, text: str) -> Action:
        tags = {self._tag(n): n for n in self.tools} | {"answer": "answer"}
        match = re.search(r"<(" + "|".join(map(re.escape, tags)) + r")>(.*?)</\1>", text, re.S)
        if match is None:
            if not text.strip():
                return Action("invalid", reason="empty turn")
            return Action("invalid", reason="no tool or <answer> tag")
        name, body = tags[match.group(1)], match.group(2)
        if name == "answer":   # only blank lines are trimmed: code answers keep their indentation
            return Action("answer", {"answer": body.strip("\r\n")})
        tool = self.tools[name]
        if len(tool.args) == 1:
            return Action(name, {tool.args[0]: body.strip()}) if body.strip() else \
                Action("invalid", reason=f"empty <{match.group(1)}>")
        args, error = parse_json(body)
        if error:
            return Action("invalid", reason=f"unparsable <{match.group(1)}> arguments: {error}")
        return _check_args(tool, args)

    def render(self, action: Action) -> str:
        tag = self._tag(action.kind)
        if action.kind == "answer":
            body = action.args["answer"]
        elif len(self.tools[action.kind].args) == 1:
            body = next(iter(action.args.values()))
        else:
            body = json.dumps(action.args)
        return f"<{tag}>{body}</{tag}>"


class JSONScaffold(Scaffold):
    name = "json"
    _FENCE = re.compile(r"```(?:json)?\s*(\{.*?\})\s*```", re.S)

    def system_prompt(self) -> str:
        lines = [json.dumps({"tool": t.name, "args": {a: "..." for a in t.args}}) + f": {t.description}"
                 for t in self.tools.values()]
        return ("Call one tool per turn as JSON:\n" + "\n".join(lines) +
                '\nGive the final answer with {"tool": "submit", "args": {"answer": "..."}}.')

    def parse(self, text: str) -> Action:
        fenced = self._FENCE.search(text)
        raw = fenced.group(1) if fenced else text[text.find("{"):text.rfind("}") + 1]
        if not raw:
            return Action("invalid", reason="empty turn" if not text.strip() else "no JSON tool call")
        call, error = parse_json(raw)
        if error:
            return Action("invalid", reason=f"unparsable tool call: {error}")
        name = call.get("tool") if isinstance(call, dict) else None
        if name == "submit":
            action = _check_args(Tool("submit", ("answer",), ""), call.get("args"))
            return Action("answer", action.args) if action.kind != "invalid" else action
        if name not in self.tools:
            return Action("invalid", reason=f"unknown tool {name!r}")
        return _check_args(self.tools[name], call.get("args"))

    def render(self, action: Action) -> str:
        tool = "submit" if action.kind == "answer" else action.kind
        return json.dumps({"tool": tool, "args": action.args})


SCAFFOLDS = {"xml": XMLScaffold, "json": JSONScaffold}


def get_scaffold(name: str, tools: tuple[Tool, ...] = SANDBOX_TOOLS) -> Scaffold:
    if name not in SCAFFOLDS:
        raise ValueError(f"scaffold {name!r} is not one of {', '.join(SCAFFOLDS)}")
    return SCAFFOLDS[name](tools)
