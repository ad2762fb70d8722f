"""Terminal: an instruction, initial files, and a checker script run in the sandbox afterwards.

Tasks are JSONL rows: `task_id`, `instruction`, `files` ({path: content}), `check` (a shell
script that exits 0 iff the task is solved, run in the episode's sandbox after the episode) and
`oracle` (shell commands that solve it, for demonstrations and replay tests). The seeded
generator makes such tasks from templates with random names and contents; difficulty chains
several steps into one task.
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


def generate(rng: random.Random, difficulty: int = 1) -> dict:
    """A task of `difficulty` independent steps, all of which must be done."""
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
