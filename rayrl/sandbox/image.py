"""The project's base sandbox image, built locally (no image registry is reachable).

Recipe: `debootstrap --variant=minbase --include=python3 bookworm` from the Debian mirror this
machine's apt is configured with, strip apt lists, docs, man pages and locales, add an unprivileged
`sandbox` user (uid 1000, home /work) for the commands a sandbox runs, tar the root file system and
`docker import` it as `rayrl-sandbox:<tag>` through the engine's API.

Idempotent at two levels: an engine that already holds the image is left alone; the root file system
tarball is cached under ~/.cache/rayrl/images/, so an engine with a fresh data root re-imports it in
seconds instead of re-running debootstrap (~40-60 s). The tag is derived from the recipe, so a
changed recipe builds a new image instead of reusing a stale one.

    name = await ensure_image(docker)           # aiodocker.Docker connected to an engine
    name = ensure_image_sync("unix:///…/docker.sock")
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

REPO = "rayrl-sandbox"
SUITE = "bookworm"
INCLUDE: tuple[str, ...] = ("python3",)
SANDBOX_UID = 1000           # the unprivileged user sandbox commands run as
CACHE_DIR = Path.home() / ".cache" / "rayrl" / "images"
RECIPE_VERSION = 1           # bump when the steps below change in a way the tag must reflect

# What the stripped image does not need (measured: 296 MB -> ~154 MB with python3 and pip).
STRIP = ("var/lib/apt/lists/*", "var/cache/apt/*", "var/cache/debconf/*-old", "var/log/*",
         "usr/share/doc/*", "usr/share/man/*", "usr/share/info/*", "usr/share/lintian/*",
         "usr/share/locale/*", "usr/share/i18n/locales/*", "usr/lib/locale/*")

# `docker import --change` lines: the image's defaults.
CHANGES = ('ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin',
           'ENV LANG=C.UTF-8',
           'ENV PYTHONDONTWRITEBYTECODE=1',
           'WORKDIR /work',
           'CMD ["sleep", "infinity"]')

Progress = Callable[[str], None]


class ImageBuildError(RuntimeError):
    """The image could not be built or imported; the message says which step failed."""


def _progress(msg: str) -> None:
    print(f"[rayrl image] {msg}", file=sys.stderr, flush=True)


def apt_mirror(suite: str = SUITE, sources: Iterable[str] | None = None) -> str:
    """The Debian archive URI that apt on this machine uses for `suite` (deb822 `*.sources` files
    and one-line `sources.list` files are both read)."""
    if sources is None:
        sources = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list")),
                   *sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))]
    found: list[str] = []
    for path in sources:
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        if path.endswith(".sources"):
            for stanza in text.split("\n\n"):
                fields: dict[str, str] = {}
                key = None
                for line in stanza.splitlines():
                    if not line.strip() or line.lstrip().startswith("#"):
                        continue
                    if line[0].isspace() and key:
                        fields[key] += " " + line.strip()
                        continue
                    key, _, value = line.partition(":")
                    key = key.strip().lower()
                    fields[key] = value.strip()
                if (fields.get("enabled", "yes").lower() != "no"
                        and "deb" in fields.get("types", "").split()
                        and suite in fields.get("suites", "").split()):
                    found += fields.get("uris", "").split()
        else:
            for line in text.splitlines():
                parts = line.split("#", 1)[0].split()
                if len(parts) >= 3 and parts[0] == "deb":
                    rest = [p for p in parts[1:] if not p.startswith("[")]
                    # drop an options block like "[arch=amd64 signed-by=…]"
                    if parts[1].startswith("["):
                        i = next((k for k, p in enumerate(parts) if p.endswith("]")), 1)
                        rest = parts[i + 1:]
                    if len(rest) >= 2 and rest[1] == suite:
                        found.append(rest[0])
    found = [u for u in found if u.startswith(("http://", "https://", "file:/"))]
    if not found:
        raise ImageBuildError(f"no apt source for suite {suite!r} in /etc/apt (needed by debootstrap)")
    return found[0]


def recipe_tag(suite: str = SUITE, include: Iterable[str] = INCLUDE) -> str:
    recipe = json.dumps({"v": RECIPE_VERSION, "suite": suite, "include": sorted(include),
                         "strip": STRIP, "changes": CHANGES, "uid": SANDBOX_UID}, sort_keys=True)
    return f"{suite}-{hashlib.sha256(recipe.encode()).hexdigest()[:10]}"


def image_name(suite: str = SUITE, include: Iterable[str] = INCLUDE) -> str:
    return f"{REPO}:{recipe_tag(suite, include)}"


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd: list[str], progress: Progress, what: str) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-20:]
        if line.startswith(("I: Retrieving", "I: Validating", "I: Unpacking ", "I: Configuring ",
                            "I: Extracting ")):
            continue                      # hundreds of these; the others mark the stages
        progress(f"  {line}")
    if proc.wait() != 0:
        raise ImageBuildError(f"{what} failed (exit {proc.returncode}): " + " | ".join(tail[-8:]))


def build_rootfs_tarball(suite: str = SUITE, include: Iterable[str] = INCLUDE, *,
                         cache_dir: Path = CACHE_DIR, mirror: str | None = None,
                         progress: Progress = _progress) -> Path:
    """The cached root file system tarball for the recipe, building it first if absent."""
    include = tuple(include)
    tag = recipe_tag(suite, include)
    tarball = Path(cache_dir) / f"{REPO}-{tag}.tar"
    with _lock(Path(cache_dir) / f".{tag}.lock"):
        if tarball.exists():
            return tarball
        if os.geteuid() != 0:
            raise ImageBuildError(f"debootstrap needs root (uid {os.geteuid()}); "
                                  f"or place a prepared tarball at {tarball}")
        exe = shutil.which("debootstrap")
        if exe is None:
            raise ImageBuildError("debootstrap is not installed (apt-get install -y debootstrap)")
        mirror = mirror or apt_mirror(suite)
        work = Path(tempfile.mkdtemp(prefix=f"rayrl-rootfs-{tag}-", dir=cache_dir))
        rootfs = work / "rootfs"
        try:
            t0 = time.monotonic()
            progress(f"debootstrap --variant=minbase --include={','.join(include)} {suite} "
                     f"from {mirror} (once per machine, ~40-60 s)")
            _run([exe, "--variant=minbase", f"--include={','.join(include)}", suite, str(rootfs),
                  mirror], progress, "debootstrap")
            progress(f"debootstrap done in {time.monotonic() - t0:.0f} s; stripping")
            for pattern in STRIP:
                for p in glob.glob(str(rootfs / pattern)):
                    if os.path.isdir(p) and not os.path.islink(p):
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            os.unlink(p)
            # the unprivileged user sandbox commands run as; /work is its home
            with open(rootfs / "etc/passwd", "a") as f:
                f.write(f"sandbox:x:{SANDBOX_UID}:{SANDBOX_UID}:rayrl sandbox:/work:/bin/sh\n")
            with open(rootfs / "etc/group", "a") as f:
                f.write(f"sandbox:x:{SANDBOX_UID}:\n")
            (rootfs / "work").mkdir(mode=0o755, exist_ok=True)
            # no host mirror, resolver or hostname leaks into the image
            for rel in ("etc/apt/sources.list", "etc/resolv.conf", "etc/hostname"):
                with contextlib.suppress(OSError):
                    (rootfs / rel).write_text("")
            progress("writing the root file system tarball")
            tmp = tarball.with_suffix(".tar.partial")
            _run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(tmp), "."], progress, "tar")
            os.replace(tmp, tarball)
            progress(f"rootfs tarball {tarball} ({tarball.stat().st_size / 1e6:.0f} MB) "
                     f"in {time.monotonic() - t0:.0f} s")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return tarball


async def image_exists(docker, name: str) -> bool:
    from aiodocker.exceptions import DockerError
    try:
        await docker.images.inspect(name)
        return True
    except DockerError as e:
        if e.status == 404:
            return False
        raise


async def import_tarball(docker, tarball: Path, name: str, changes: Iterable[str] = CHANGES) -> None:
    """`docker import` through the API: POST /images/create?fromSrc=- with the tarball as body."""
    repo, _, tag = name.partition(":")

    async def body():
        with open(tarball, "rb") as f:
            while chunk := await asyncio.to_thread(f.read, 1 << 20):
                yield chunk

    # the engine wants one `changes=` key per line (aiodocker's params would not repeat keys)
    from yarl import URL
    query = [("fromSrc", "-"), ("repo", repo), ("tag", tag or "latest")]
    query += [("changes", c) for c in changes]
    url = URL("images/create").with_query(query)
    async with docker._query(url, "POST", data=body(), headers={"Content-Type": "application/x-tar"},
                             timeout=None) as resp:
        text = await resp.text()
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            msg = json.loads(line)
            if isinstance(msg, dict) and (msg.get("error") or msg.get("errorDetail")):
                raise ImageBuildError(f"docker import of {tarball} failed: {msg.get('error') or msg}")


async def ensure_image(docker, suite: str = SUITE, include: Iterable[str] = INCLUDE, *,
                       cache_dir: Path = CACHE_DIR, progress: Progress = _progress) -> str:
    """The image name, importing (and first building) it when the engine lacks it."""
    include = tuple(include)
    name = image_name(suite, include)
    if await image_exists(docker, name):
        return name
    t0 = time.monotonic()
    tarball = await asyncio.to_thread(build_rootfs_tarball, suite, include, cache_dir=cache_dir,
                                      progress=progress)
    progress(f"importing {tarball.name} as {name}")
    t1 = time.monotonic()
    await import_tarball(docker, tarball, name)
    if not await image_exists(docker, name):
        raise ImageBuildError(f"{name} is missing after the import of {tarball}")
    progress(f"{name} ready (import {time.monotonic() - t1:.1f} s, total {time.monotonic() - t0:.1f} s)")
    return name


def ensure_image_sync(url: str, suite: str = SUITE, include: Iterable[str] = INCLUDE, **kw) -> str:
    """`ensure_image` against the engine at `url` (e.g. unix:///…/docker.sock), from sync code."""
    import aiodocker

    async def main() -> str:
        docker = aiodocker.Docker(url=url)
        try:
            return await ensure_image(docker, suite, include, **kw)
        finally:
            await docker.close()

    return asyncio.run(main())


if __name__ == "__main__":   # python -m rayrl.sandbox.image [docker-url]
    target = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    print(ensure_image_sync(target))
