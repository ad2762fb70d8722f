"""What SWE test runs need inside a sandbox, and a thin client over a local or Ray sandbox pool.

The sandbox sees the host's /usr, so /usr/bin/python3 (Debian's 3.11, no pytest) and /usr/bin/git.
pytest comes from a read-only directory holding a copy of the pure-Python distributions pytest needs
(pytest, pluggy, iniconfig, packaging, pygments, taken from the running interpreter's environment)
plus a tiny runner with a reporting plugin; it is bound into every sandbox at the same path
(`BwrapBackend(extra_ro_binds=...)`) and put on PYTHONPATH by the SWE profile.

A pool that serves SWE tasks must therefore be made with `swe_profile()` and
`backend_options=swe_backend_options()` (see `make_pool`).
"""

from __future__ import annotations

import compileall
import hashlib
import importlib.metadata as md
import os
import shutil
import sys
import tempfile
from pathlib import Path

from rayrl.sandbox.base import Limits, Profile

PROFILE_NAME = "swe"
_DISTS = ("pytest", "pluggy", "iniconfig", "packaging", "pygments")

# Written into the runtime directory as rayrl_swe_report.py; `main()` runs pytest with a reporter.
# One signed JSON line per test phase, appended as the run goes (so a run killed at its timeout
# still leaves what it finished).
REPORT_PLUGIN = r'''
"""pytest with a reporter: per-node-id outcomes as JSON lines, appended to the file named on stdin.

stdin holds `<key> <report path>`. Each line is `<HMAC-SHA256 of the JSON under key> <JSON>`: the
code under test can write to the report, but not sign. The key is read here, before pytest loads
anything from the repository, and is kept off the command line, the environment and the disk."""
import hashlib
import hmac
import json
import os
import sys

import pytest


def sign(key, line):
    return hmac.new(key.encode(), line.encode(), hashlib.sha256).hexdigest()


def _message(report):
    try:
        crash = report.longrepr.reprcrash
        if crash is not None:
            return str(crash.message)[:500]
    except AttributeError:
        pass
    text = getattr(report, "longreprtext", "") or ""
    return text.strip().splitlines()[-1][:500] if text.strip() else ""


class Reporter:
    def __init__(self, key, path):
        self._key, self._path = key, path

    def _write(self, row):
        line = json.dumps(row)
        with open(self._path, "a", encoding="utf-8") as f:
            f.write(sign(self._key, line) + " " + line + "\n")

    def pytest_runtest_logreport(self, report):
        row = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome}
        if hasattr(report, "wasxfail"):
            row["xfail"] = True
        if report.outcome == "failed":
            row["message"] = _message(report)
        self._write(row)

    def pytest_collectreport(self, report):
        if report.outcome == "failed":
            self._write({"nodeid": report.nodeid, "when": "collect", "outcome": "failed",
                         "message": _message(report)})


def main():
    key, path = sys.stdin.readline().split()
    os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"   # no plugins from the repository's metadata
    sys.path.insert(0, os.getcwd())                       # the repository, as `python -m pytest` has it
    return pytest.main(sys.argv[1:], plugins=[Reporter(key, path)])
'''


def _cache_root() -> Path:
    env = os.environ.get("RAYRL_SWE_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:   # sandboxes run as other uids: /root is not reachable for them
        return Path("/var/cache/rayrl/swe")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "rayrl" / "swe"


def _dist_files(name: str) -> list[tuple[Path, str]]:
    dist = md.distribution(name)
    out = []
    for f in dist.files or ():
        rel = f.as_posix()
        if rel.startswith("..") or "__pycache__" in rel or rel.endswith((".pyc", "RECORD")):
            continue
        out.append((Path(dist.locate_file(f)), rel))
    return out


def pytest_runtime_dir() -> Path:
    """The read-only site directory with pytest for sandboxes (built once per pytest version)."""
    try:
        versions = [f"{d}={md.version(d)}" for d in _DISTS]
    except md.PackageNotFoundError as e:
        raise RuntimeError(f"the SWE grader needs {e.name} installed in this environment "
                           "(pip install pytest)") from None
    key = hashlib.sha256(("\n".join(versions) + sys.version + REPORT_PLUGIN).encode()).hexdigest()[:16]
    root = _cache_root()
    target = root / f"pytest-{key}"
    if (target / "rayrl_swe_report.py").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    for d in [root, *root.parents]:
        if os.geteuid() == 0 and not os.stat(d).st_mode & 0o001:
            raise RuntimeError(f"{d} is not world-searchable; set RAYRL_SWE_CACHE to a world-readable directory")
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        for dist in _DISTS:
            for src, rel in _dist_files(dist):
                if src.is_file():
                    dst = tmp / rel
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, dst)
        (tmp / "rayrl_swe_report.py").write_text(REPORT_PLUGIN)
        # bytecode, so that every run does not compile pytest again (the sandbox's python3 is a
        # CPython 3.x like this one; a different minor version simply ignores these files)
        compileall.compile_dir(str(tmp), quiet=1, workers=1)
        for dirpath, _, filenames in os.walk(tmp):
            os.chmod(dirpath, 0o755)
            for n in filenames:
                os.chmod(os.path.join(dirpath, n), 0o644)
        try:
            os.rename(tmp, target)
        except OSError:   # another process built it first
            if not (target / "rayrl_swe_report.py").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def swe_profile(name: str = PROFILE_NAME, limits: Limits | None = None) -> Profile:
    site = pytest_runtime_dir()
    return Profile(name=name, backend="bwrap",
                   limits=limits or Limits(cpu_seconds=120, memory_mb=1024, processes=64, work_mb=256),
                   env=(("PYTHONPATH", str(site)), ("PYTHONDONTWRITEBYTECODE", "1"),
                        ("PYTHONHASHSEED", "0"), ("HOME", "/tmp"), ("LC_ALL", "C.UTF-8"),
                        ("PATH", "/usr/local/bin:/usr/bin:/bin")))


def swe_backend_options() -> dict[str, dict]:
    return {"bwrap": {"extra_ro_binds": (str(pytest_runtime_dir()),)}}


def make_pool(max_total: int = 4, min_idle: int = 0, export_metrics: bool = False, **kwargs):
    """A local SandboxPool serving the SWE profile."""
    from rayrl.sandbox.pool import SandboxPool
    return SandboxPool([swe_profile()], min_idle=min_idle, max_total=max_total,
                       export_metrics=export_metrics, backend_options=swe_backend_options(), **kwargs)
