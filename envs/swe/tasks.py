"""SWE tasks: the SWE-bench instance format as JSONL, plus how to build the repository state.

A row has SWE-bench's fields

    instance_id, problem_statement, patch (gold, unified diff), test_patch (may be ""),
    FAIL_TO_PASS, PASS_TO_PASS (lists of pytest node ids, or JSON strings of lists as SWE-bench
    ships them)

and, for locally synthesized tasks, the repository state:

    repo        a directory: absolute, or relative to the project root (where envs/ lives)
    base_commit "sha256:<hex>" content hash of `repo`'s files when the task was made; building the
                state refuses a repository that has changed since (the task would be stale)
    base_files  {relative path: file contents} overriding (or adding) files of `repo`; a value of
                null deletes the file. For a synthesized task: the mutated source file.

The state a model patch is applied to = the files of `repo` (without .git, caches, bytecode)
overlaid with `base_files`.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from envs.rows import TaskFormatError, read_jsonl, unique_ids

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_REPO = Path(__file__).resolve().parent / "sample_repo"

_SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".hypothesis", ".mypy_cache", ".tox", ".venv",
              "venv", "node_modules", "build", "dist"}
_SKIP_SUFFIXES = (".pyc", ".pyo", ".so", ".egg-info")
MAX_REPO_BYTES = 32 << 20


@dataclass
class SWETask:
    instance_id: str
    problem_statement: str
    patch: str
    test_patch: str
    FAIL_TO_PASS: list[str]
    PASS_TO_PASS: list[str]
    repo: str
    base_commit: str = ""
    base_files: dict[str, str | None] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)   # anything else (mutation kind, source location, ...)

    def to_row(self) -> dict:
        row = {k: getattr(self, k) for k in ("instance_id", "problem_statement", "patch", "test_patch",
                                             "FAIL_TO_PASS", "PASS_TO_PASS", "repo", "base_commit",
                                             "base_files")}
        if self.meta:
            row["meta"] = self.meta
        return row

    @property
    def test_nodes(self) -> list[str]:
        return list(dict.fromkeys(self.FAIL_TO_PASS + self.PASS_TO_PASS))


# -- loading --------------------------------------------------------------------------------------
_REQUIRED = {"instance_id": str, "problem_statement": str, "patch": str, "FAIL_TO_PASS": list,
             "PASS_TO_PASS": list, "repo": str}


def task_from_row(row, where: str = "<row>") -> SWETask:
    """Validate one row (a dict); errors name `where` (file:line) and the field."""
    if not isinstance(row, dict):
        raise TaskFormatError(f"{where}: a task must be a JSON object, got {type(row).__name__}")
    row = dict(row)
    for key in ("FAIL_TO_PASS", "PASS_TO_PASS"):   # SWE-bench ships these as JSON strings
        if isinstance(row.get(key), str):
            try:
                row[key] = json.loads(row[key])
            except json.JSONDecodeError:
                raise TaskFormatError(f"{where}: field {key!r} is a string that is not a JSON list") from None
    for key, typ in _REQUIRED.items():
        if key not in row:
            raise TaskFormatError(f"{where}: missing field {key!r}")
        if not isinstance(row[key], typ):
            raise TaskFormatError(f"{where}: field {key!r} must be a {typ.__name__}, "
                                  f"got {type(row[key]).__name__}")
    if not row["instance_id"].strip():
        raise TaskFormatError(f"{where}: field 'instance_id' is empty")
    if not row["repo"].strip():
        raise TaskFormatError(f"{where}: field 'repo' is empty")
    for key in ("FAIL_TO_PASS", "PASS_TO_PASS"):
        bad = [t for t in row[key] if not isinstance(t, str) or not t.strip()]
        if bad:
            raise TaskFormatError(f"{where}: field {key!r} must hold pytest node ids (strings), got {bad[0]!r}")
    if not row["FAIL_TO_PASS"]:
        raise TaskFormatError(f"{where}: field 'FAIL_TO_PASS' is empty (nothing would show a fix)")
    test_patch = row.get("test_patch", "")
    if test_patch is None:
        test_patch = ""
    if not isinstance(test_patch, str):
        raise TaskFormatError(f"{where}: field 'test_patch' must be a str, got {type(test_patch).__name__}")
    base_files = row.get("base_files") or {}
    if not isinstance(base_files, dict) or not all(
            isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in base_files.items()):
        raise TaskFormatError(f"{where}: field 'base_files' must map relative paths to file contents (or null)")
    for path in base_files:
        if path.startswith("/") or ".." in Path(path).parts:
            raise TaskFormatError(f"{where}: field 'base_files' has a path outside the repository: {path!r}")
    base_commit = row.get("base_commit") or ""
    if not isinstance(base_commit, str):
        raise TaskFormatError(f"{where}: field 'base_commit' must be a str")
    meta = row.get("meta") or {}
    if not isinstance(meta, dict):
        raise TaskFormatError(f"{where}: field 'meta' must be an object")
    return SWETask(instance_id=row["instance_id"], problem_statement=row["problem_statement"],
                   patch=row["patch"], test_patch=test_patch, FAIL_TO_PASS=list(row["FAIL_TO_PASS"]),
                   PASS_TO_PASS=list(row["PASS_TO_PASS"]), repo=row["repo"], base_commit=base_commit,
                   base_files=dict(base_files), meta=meta)


def load_tasks(path: str | os.PathLike) -> list[SWETask]:
    """Read and validate a tasks JSONL file (blank lines are skipped; ids must be unique, repos must exist)."""
    def parse(row, where: str) -> SWETask:
        task = task_from_row(row, where)
        repo = resolve_repo(task.repo)
        if not repo.is_dir():
            raise TaskFormatError(f"{where}: field 'repo': {str(repo)!r} is not a directory")
        return task

    return read_jsonl(path, unique_ids(parse, "instance_id", lambda task: task.instance_id))


def write_tasks(path: str | os.PathLike, tasks: list[SWETask]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for t in tasks:
            f.write(json.dumps(t.to_row()) + "\n")


def _prediction(row, where: str) -> tuple[str, str]:
    if not isinstance(row, dict):
        raise TaskFormatError(f"{where}: a prediction must be a JSON object")
    if not isinstance(row.get("instance_id"), str):
        raise TaskFormatError(f"{where}: missing field 'instance_id' (a str)")
    if "model_patch" not in row:
        raise TaskFormatError(f"{where}: missing field 'model_patch'")
    patch = row["model_patch"]
    if patch is not None and not isinstance(patch, str):
        raise TaskFormatError(f"{where}: field 'model_patch' must be a str or null")
    return row["instance_id"], patch or ""


def load_predictions(path: str | os.PathLike) -> dict[str, str]:
    """Predictions JSONL: rows with `instance_id` and `model_patch` (null counts as empty); ids must be unique."""
    return dict(read_jsonl(path, unique_ids(_prediction, "instance_id", lambda pred: pred[0])))


# -- repository state ----------------------------------------------------------------------------
def resolve_repo(repo: str) -> Path:
    p = Path(repo)
    if not p.is_absolute():
        p = PROJECT_ROOT / p
    return p


def repo_ref(path: str | os.PathLike) -> str:
    """How a task names `path`: relative to the project root when inside it, else absolute."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(PROJECT_ROOT))
    except ValueError:
        return str(p)


def read_repo(path: str | os.PathLike) -> dict[str, bytes]:
    """The repository's files (relative path -> bytes), without VCS dirs, caches and bytecode."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"repository {str(path)!r} is not a directory")
    files: dict[str, bytes] = {}
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(filenames):
            if name.endswith(_SKIP_SUFFIXES):
                continue
            full = Path(dirpath) / name
            if full.is_symlink() or not full.is_file():
                continue
            data = full.read_bytes()
            total += len(data)
            if total > MAX_REPO_BYTES:
                raise ValueError(f"repository {str(path)!r} is larger than {MAX_REPO_BYTES >> 20} MiB")
            files[full.relative_to(root).as_posix()] = data
    return files


def is_test_file(path: str) -> bool:
    """Test code, by its name or directory: synthesis does not mutate it, grading restores it."""
    parts = PurePosixPath(path).parts
    name = parts[-1]
    return (name.startswith("test_") or name.endswith("_test.py") or name == "conftest.py"
            or "tests" in parts[:-1] or "test" in parts[:-1])


def content_hash(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
    return "sha256:" + h.hexdigest()


def task_files(task: SWETask) -> dict[str, bytes]:
    """The repository state of `task` (before any patch)."""
    root = resolve_repo(task.repo)
    files = read_repo(root)
    if task.base_commit and content_hash(files) != task.base_commit:
        raise ValueError(f"task {task.instance_id}: repository {str(root)!r} has changed since the task was "
                         f"made (base_commit {task.base_commit[:19]}... differs); synthesize the tasks again")
    for path, content in task.base_files.items():
        if content is None:
            files.pop(path, None)
        else:
            files[path] = content.encode("utf-8")
    return files


def tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(files):
            info = tarfile.TarInfo(path)
            info.size = len(files[path])
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(files[path]))
    return buf.getvalue()


def unified_diff(path: str, old: str, new: str) -> str:
    """A git-style unified diff of one file (`git apply` and `patch -p1` both take it)."""
    def lines(text):
        out = text.splitlines(keepends=True)
        if out and not out[-1].endswith("\n"):
            out[-1] += "\n\\ No newline at end of file\n"
        return out
    body = "".join(difflib.unified_diff(lines(old), lines(new), f"a/{path}", f"b/{path}", n=3))
    if not body:
        return ""
    return f"diff --git a/{path} b/{path}\n" + body
