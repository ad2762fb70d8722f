"""Code task format and its loader.

Two kinds of task, one JSON object per line:

- **function** (the HumanEval/MBPP shape): `task_id`, `prompt` (a signature and docstring),
  `entry_point` (the function's name), `test` (Python source defining `check(candidate)`),
  optional `canonical_solution` (the oracle completion, appended to the prompt);
- **stdio**: `task_id`, `prompt` (a problem statement), `tests` (a list of
  `{"input": str, "output": str}`), optional `canonical_solution` (a whole program).

Both may carry `timeout_s` (per test run). A row is a function task when it has no `tests`.
`load_tasks` validates every row and raises `TaskFormatError` naming the file, the line and the
missing or ill-typed field.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from envs.rows import TaskFormatError, jsonl_rows

SAMPLES_PATH = Path(__file__).with_name("samples.jsonl")
MAX_TIMEOUT_S = 300.0   # per test run; more is a typo, and each run holds a sandbox that long


@dataclass
class CodeTask:
    task_id: str
    kind: str                                   # "function" | "stdio"
    prompt: str
    entry_point: str = ""                       # function tasks
    test: str = ""                              # function tasks: defines check(candidate)
    tests: list[dict] = field(default_factory=list)   # stdio tasks: [{"input", "output"}]
    canonical_solution: str | None = None
    timeout_s: float | None = None              # per test run; None = the verifier's default

    def to_row(self) -> dict:
        """The JSONL row (the `kind` is implied by the fields)."""
        row = {k: v for k, v in asdict(self).items() if v not in (None, "", [])}
        row.pop("kind", None)
        return row

    def to_meta(self) -> dict:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict) -> "CodeTask":
        return cls(**{k: meta[k] for k in cls.__dataclass_fields__ if k in meta})


def _need(row: dict, name: str, types, where: str, optional: bool = False):
    if name not in row or row[name] is None:
        if optional:
            return None
        raise TaskFormatError(f"{where}: field {name!r} is missing")
    value = row[name]
    if not isinstance(value, types) or isinstance(value, bool):
        want = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise TaskFormatError(f"{where}: field {name!r} must be {want}, got {type(value).__name__}")
    return value


def parse_task(row, where: str = "<row>") -> CodeTask:
    """Validate one row; `where` (e.g. "tasks.jsonl:3") prefixes every error."""
    if not isinstance(row, dict):
        raise TaskFormatError(f"{where}: a task must be a JSON object, got {type(row).__name__}")
    task_id = _need(row, "task_id", (str, int), where)
    task_id = str(task_id)
    if not task_id.strip():
        raise TaskFormatError(f"{where}: field 'task_id' is empty")
    where = f"{where} (task_id {task_id!r})"
    prompt = _need(row, "prompt", str, where)
    solution = _need(row, "canonical_solution", str, where, optional=True)
    timeout = _need(row, "timeout_s", (int, float), where, optional=True)
    if timeout is not None and not 0 < timeout <= MAX_TIMEOUT_S:   # NaN fails both comparisons
        raise TaskFormatError(f"{where}: field 'timeout_s' must be in (0, {MAX_TIMEOUT_S:g}] seconds, got {timeout}")
    if "tests" in row:
        tests = _need(row, "tests", list, where)
        if not tests:
            raise TaskFormatError(f"{where}: field 'tests' is empty")
        for i, case in enumerate(tests):
            if not isinstance(case, dict):
                raise TaskFormatError(f"{where}: field 'tests[{i}]' must be an object with 'input' and 'output'")
            for key in ("input", "output"):
                _need(case, key, str, f"{where}: tests[{i}]")
        return CodeTask(task_id, "stdio", prompt, tests=[{"input": c["input"], "output": c["output"]} for c in tests],
                        canonical_solution=solution, timeout_s=timeout)
    if "entry_point" not in row and "test" not in row:
        raise TaskFormatError(f"{where}: field 'entry_point' is missing (a function task needs 'entry_point' "
                              f"and 'test'; a stdin/stdout task needs 'tests')")
    entry = _need(row, "entry_point", str, where)
    if not entry.isidentifier():
        raise TaskFormatError(f"{where}: field 'entry_point' must be a Python identifier, got {entry!r}")
    test = _need(row, "test", str, where)
    if "def check" not in test:
        raise TaskFormatError(f"{where}: field 'test' must define check(candidate)")
    return CodeTask(task_id, "function", prompt, entry_point=entry, test=test,
                    canonical_solution=solution, timeout_s=timeout)


def load_tasks(path: str | Path) -> list[CodeTask]:
    """Every task of a JSONL file, validated; duplicate task ids are an error."""
    tasks: dict[str, CodeTask] = {}
    for lineno, row in jsonl_rows(path):
        task = parse_task(row, f"{path}:{lineno}")
        if task.task_id in tasks:
            raise TaskFormatError(f"{path}:{lineno}: duplicate task_id {task.task_id!r}")
        tasks[task.task_id] = task
    if not tasks:
        raise TaskFormatError(f"{path}: no tasks")
    return list(tasks.values())


def load_samples() -> list[CodeTask]:
    """The small task set shipped with the project (every task has an oracle)."""
    return load_tasks(SAMPLES_PATH)


def write_tasks(tasks, path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for t in tasks:
            f.write(json.dumps(t.to_row() if isinstance(t, CodeTask) else t) + "\n")
