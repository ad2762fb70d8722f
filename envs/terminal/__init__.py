"""Terminal: an instruction, initial files, and a checker script run in the sandbox afterwards.

Tasks are JSONL rows: `task_id`, `instruction`, `files` ({path: content}), `check` (a shell
script that exits 0 iff the task is solved, run in the episode's sandbox after the episode) and
`oracle` (shell commands that solve it, for demonstrations and replay tests). The seeded
generator makes such tasks from templates with random names and contents; difficulty chains
several steps into one task.

Tiny mode (`task.terminal_difficulty=0`), for the tiny char-level default model, which cannot
copy random strings (nor, measured, pick the right one of 6-8 file names in an unseen
combination): one step on a file whose name is one of `TINY_SOURCES` (3), written to the fixed
`out.txt`, of one of the ten `TINY_KINDS` (count, sort, reverse sort, upper case, first, last,
reverse order; sum, largest, smallest of numbers). The prompt also says what the file lists
(one of 8 `TINY_TOPICS`, a nuisance feature the command does not depend on), e.g. "data.txt
lists tags, one per line. Sort them into out.txt." -> `sort data.txt > out.txt`. So the command
is fixed by two discrete features of the prompt, from fixed strings; the contents stay random
(3-6 distinct lines), so the real checker in the sandbox decides, and the wrong transformation,
source or target scores 0. The oracle is that one command then `<answer>done</answer>`.
The split is by prompt, not by task id alone: a hash of the instruction holds out
`eval_fraction` of the 10*3*8 = 240 prompts (46 at 0.2), so no held-out prompt is ever trained
on and held-out task ids never occur in training. Every (kind, source) pair is seen in
training with other topics: the underlying commands repeat between training and held-out, the
prompts do not. Task ids include the contents, so a prompt recurs with different contents and
ids; `eval_tasks(n)` cycles the held-out prompts, with fresh contents, when n exceeds their
number. Measured: 200 SFT steps (batch 32) on 512 oracle
episodes give 0.6 held-out greedy (demonstrations ~400 tokens with the scaffold's system prompt).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shlex
from pathlib import Path

from envs.rows import TaskFormatError, check_fields, read_jsonl
from envs.base import GeneratedEnv, Task
from rayrl.rollout.scaffolds import SANDBOX_TOOLS, Action
from rayrl.sandbox.client import PoolClient

SAMPLES = Path(__file__).with_name("samples.jsonl")
_FIELDS = {"task_id": str, "instruction": str, "files": dict, "check": str, "oracle": list}


def parse_row(row, where: str) -> dict:
    check_fields(row, where, _FIELDS)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in row["files"].items()):
        raise TaskFormatError(f"{where}: field 'files' must map paths to text")
    if not all(isinstance(c, str) for c in row["oracle"]):
        raise TaskFormatError(f"{where}: field 'oracle' must be a list of shell commands")
    return {k: row[k] for k in _FIELDS}


def load_tasks(path: str | Path) -> list[dict]:
    return read_jsonl(path, parse_row)


def _word(rng: random.Random, n: int = 5) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))


def _step(rng: random.Random) -> dict:
    """One templated step: instruction, files, check and oracle, with random names and contents."""
    kind = rng.choice(["count", "sort", "upper", "first", "sum"])
    src, dst = f"{_word(rng)}.txt", f"{_word(rng)}.out"
    lines = [_word(rng, rng.randint(3, 7)) for _ in range(rng.randint(2, 6))]
    text = "".join(f"{x}\n" for x in lines)
    if kind == "sum":
        nums = [rng.randint(0, 99) for _ in range(rng.randint(2, 6))]
        text = "".join(f"{x}\n" for x in nums)
        expected = f"{sum(nums)}\n"
        instruction, oracle = f"{src} holds one integer per line; write their sum to {dst}.", \
            f"awk '{{s+=$1}} END {{print s}}' {src} > {dst}"
    elif kind == "count":
        expected, instruction = f"{len(lines)}\n", f"Write the number of lines in {src} to {dst}."
        oracle = f"wc -l < {src} > {dst}"
    elif kind == "sort":
        expected, instruction = "".join(f"{x}\n" for x in sorted(lines)), f"Sort the lines of {src} into {dst}."
        oracle = f"sort {src} > {dst}"
    elif kind == "upper":
        expected, instruction = text.upper(), f"Write {src} in upper case to {dst}."
        oracle = f"tr a-z A-Z < {src} > {dst}"
    else:
        expected, instruction = f"{lines[0]}\n", f"Write the first line of {src} to {dst}."
        oracle = f"head -n 1 {src} > {dst}"
    check = f"printf %s {shlex.quote(expected)} | cmp -s - {dst}"
    if kind in ("count", "sum"):   # numbers may come padded (wc) or without a newline
        check = f"test \"$(tr -d ' \\n' < {dst})\" = {expected.strip()}"
    return {"instruction": instruction, "files": {src: text}, "check": check, "oracle": [oracle]}


TINY_SOURCES = ("in.txt", "data.txt", "list.txt")
TINY_TOPICS = {   # what the file is said to list: a nuisance feature (the command does not depend on it)
    "words": ("names", "words", "tags", "codes", "keys", "labels", "items", "ids"),
    "numbers": ("scores", "prices", "ages", "sizes", "counts", "weights", "points", "totals"),
}
TINY_TARGET = "out.txt"
TINY_KINDS = {   # kind -> (contents, instruction, oracle command formatted with the source and target)
    "count": ("words", "Write how many there are to {dst}.", "wc -l < {src} > {dst}"),
    "sort": ("words", "Sort them into {dst}.", "sort {src} > {dst}"),
    "rsort": ("words", "Sort them in reverse into {dst}.", "sort -r {src} > {dst}"),
    "upper": ("words", "Write them in upper case to {dst}.", "tr a-z A-Z < {src} > {dst}"),
    "first": ("words", "Write the first one to {dst}.", "head -n 1 {src} > {dst}"),
    "last": ("words", "Write the last one to {dst}.", "tail -n 1 {src} > {dst}"),
    "tac": ("words", "Write them in reverse order to {dst}.", "tac {src} > {dst}"),
    "sum": ("numbers", "Write their sum to {dst}.", "awk '{{s+=$1}} END {{print s}}' {src} > {dst}"),
    "max": ("numbers", "Write the largest to {dst}.", "sort -n {src} | tail -n 1 > {dst}"),
    "min": ("numbers", "Write the smallest to {dst}.", "sort -n {src} | head -n 1 > {dst}"),
}


def tiny_prompts() -> list[tuple[str, str, int]]:
    """Every (kind, source, topic index) of tiny mode, in a fixed order."""
    return [(k, s, i) for k in TINY_KINDS for s in TINY_SOURCES for i in range(len(TINY_TOPICS["words"]))]


def tiny_instruction(kind: str, src: str, topic: int) -> str:
    contents, ask, _ = TINY_KINDS[kind]
    return f"{src} lists {TINY_TOPICS[contents][topic]}, one per line. " + ask.format(dst=TINY_TARGET)


def generate_tiny(rng: random.Random, kind: str | None = None, src: str | None = None,
                  topic: int | None = None) -> dict:
    """A tiny-mode task: fixed file names, random contents (3-6 distinct lines)."""
    kind = kind or rng.choice(list(TINY_KINDS))
    src = src or rng.choice(TINY_SOURCES)
    topic = rng.randrange(len(TINY_TOPICS["words"])) if topic is None else topic
    contents, _, oracle = TINY_KINDS[kind]
    n, values = rng.randint(3, 6), []
    while len(values) < n:   # distinct lines, so that sort, reverse, first/last and min/max differ
        v = str(rng.randint(1, 99)) if contents == "numbers" else _word(rng, rng.randint(3, 6))
        if v not in values:
            values.append(v)
    text = "".join(f"{x}\n" for x in values)
    nums = [int(x) for x in values] if contents == "numbers" else []
    lines = {"sort": sorted(values), "rsort": sorted(values, reverse=True), "first": values[:1],
             "last": values[-1:], "tac": values[::-1], "count": [n], "upper": [x.upper() for x in values],
             "sum": [sum(nums)], "max": nums and [max(nums)], "min": nums and [min(nums)]}[kind]
    expected, dst = "".join(f"{x}\n" for x in lines), TINY_TARGET
    check = f"printf %s {shlex.quote(expected)} | cmp -s - {dst}"
    if contents == "numbers" or kind == "count":   # numbers may come padded (wc) or without a newline
        check = f"test -f {dst} && test \"$(tr -d ' \\n' < {dst})\" = {expected.strip()}"
    task = {"instruction": tiny_instruction(kind, src, topic), "files": {src: text}, "check": check,
            "oracle": [oracle.format(src=src, dst=dst)]}
    task["task_id"] = "term0-" + hashlib.blake2b(json.dumps(task, sort_keys=True).encode(), digest_size=6).hexdigest()
    return task


def generate(rng: random.Random, difficulty: int = 1) -> dict:
    """A task of `difficulty` independent steps, all of which must be done (0: a tiny-mode task)."""
    if difficulty == 0:
        return generate_tiny(rng)
    steps = [_step(rng) for _ in range(max(1, difficulty))]
    task = {"instruction": " ".join(s["instruction"] for s in steps),
            "files": {k: v for s in steps for k, v in s["files"].items()},
            "check": " && ".join(f"({s['check']})" for s in steps),
            "oracle": [c for s in steps for c in s["oracle"]]}
    task["task_id"] = "term-" + hashlib.blake2b(json.dumps(task, sort_keys=True).encode(), digest_size=6).hexdigest()
    return task


class TerminalEnv(GeneratedEnv):
    """The episode runs in a leased sandbox (a rayrl.sandbox.client.Session): `prepare` writes
    the task's files before it, `check` runs the checker in the same sandbox after it."""

    domain = "terminal"
    tools = SANDBOX_TOOLS

    def __init__(self, cfg=None, seed: int = 0, pool=None):
        super().__init__(getattr(cfg, "tool_latency", "none"), seed)
        self.pool = pool
        self.difficulty = getattr(cfg, "terminal_difficulty", 1)
        self.eval_fraction = getattr(cfg, "eval_fraction", 0.2)

    def generate_row(self, rng: random.Random) -> dict:
        return generate(rng, self.difficulty)

    def _held_out_prompt(self, instruction: str) -> bool:
        from envs.rows import held_out
        return held_out("term0:" + instruction, self.eval_fraction)

    def sample(self, rng: random.Random) -> Task:
        if self.difficulty != 0:
            return super().sample(rng)
        while True:   # tiny mode splits by prompt (see the module docstring)
            row = generate_tiny(rng)
            if not self._held_out_prompt(row["instruction"]):
                return self.to_task(row)

    def eval_tasks(self, n: int) -> list[Task]:
        if self.difficulty != 0:
            return super().eval_tasks(n)
        held = [p for p in tiny_prompts() if self._held_out_prompt(tiny_instruction(*p))]
        rng = random.Random(self.eval_seed)
        rng.shuffle(held)
        return [self.to_task(generate_tiny(rng, *held[i % len(held)])) for i in range(n)]

    @staticmethod
    def to_task(row: dict) -> Task:
        return Task(id=row["task_id"], prompt=row["instruction"], answer="", domain="terminal", meta=row)

    def demonstration(self, task: Task) -> str:
        return "\n".join(task.meta["oracle"])

    def oracle_actions(self, task: Task) -> list[Action]:
        return [Action("shell", {"cmd": c}) for c in task.meta["oracle"]] + [Action("answer", {"answer": "done"})]

    @contextlib.asynccontextmanager
    async def episode(self, task: Task):
        from rayrl.rollout.agent import SandboxTools
        async with PoolClient(self._pool()).session("default") as session:
            await self.prepare(task, session)
            yield SandboxTools(session)

    async def score(self, task: Task, answer: str | None, tools) -> tuple[float, dict]:
        """The checker decides, whatever the model claimed in its answer."""
        return await self.check(task, tools.session)

    def _pool(self):
        if self.pool is None:
            raise ValueError("TerminalEnv needs a sandbox pool (TerminalEnv(cfg, seed, pool=...))")
        return self.pool

    async def prepare(self, task: Task, session) -> None:
        for path, content in task.meta["files"].items():
            await session.write_file(path, content.encode())

    async def check(self, task: Task, session) -> tuple[float, dict]:
        result = await session.exec(task.meta["check"], timeout=10.0)
        return float(result.ok), {"check_exit_code": result.exit_code, "check_outcome": result.outcome.value}

    async def verify(self, task: Task, response: str) -> tuple[float, dict]:
        """Single-turn form: `response` is a shell script, run in a fresh sandbox, then checked."""
        async with PoolClient(self._pool()).session("default") as session:
            await self.prepare(task, session)
            run = await session.exec(response, timeout=10.0)
            reward, info = await self.check(task, session)
            return reward, {**info, "script_exit_code": run.exit_code}
