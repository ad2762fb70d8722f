"""What the benchmarks' command lines share: `key=value` arguments checked before any work starts,
and a scratch directory for their runs."""

import contextlib
import difflib
import os
import shutil
import sys
import tempfile
from typing import NoReturn

HELP = ("-h", "--help")


def fail(message: str, word: str = "", known=()) -> NoReturn:
    """One line on stderr, with a guess at what was meant when `word` is close to one of `known`,
    and exit status 2 (as argparse and the recipes' config errors)."""
    close = difflib.get_close_matches(word, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    print(f"{os.path.basename(sys.argv[0])}: {message}{hint}; see --help", file=sys.stderr)
    raise SystemExit(2)


def shown(key: str, default) -> str:
    return f"{key}={','.join(default) if isinstance(default, tuple) else default}"


def usage(doc: str, defaults: dict, choices: dict, flags: dict, config: str) -> str:
    rows = [(shown(k, v), f"choices: {', '.join(choices[k])}" if k in choices else "") for k, v in defaults.items()]
    rows += list(flags.items()) + ([("KEY.SUB=VALUE", config)] if config else [])
    width = max(len(name) for name, _ in rows)
    synopsis = [os.path.basename(sys.argv[0]), *(f"[{f}]" for f in flags),
                *(["[key=value ...]"] if defaults or config else [])]
    return "\n".join([f"usage: {' '.join(synopsis)}", doc.strip().splitlines()[0], "",
                      *(f"  {name:<{width}}  {what}".rstrip() for name, what in rows)])


def convert(key: str, value: str, default, allowed):
    """value as its default's type (a tuple default: comma-separated strings), within `allowed`."""
    try:
        out = tuple(value.split(",")) if isinstance(default, tuple) else type(default)(value)
    except ValueError:
        fail(f"{key}={value!r}: not {'an' if isinstance(default, int) else 'a'} {type(default).__name__}")
    for item in out if isinstance(out, tuple) else (out,):
        if allowed and item not in allowed:
            fail(f"{key}={value}: {item!r} is not one of {', '.join(allowed)}", item, allowed)
    return out


def parse(argv: list[str], doc: str, defaults: dict, choices: dict | None = None, flags: dict | None = None,
          config: str = "") -> dict:
    """{key: value} for every key of `defaults`, from argv's `key=value` arguments, each converted to
    its default's type and, for a key of `choices`, checked against that list. `flags` ({"--quick":
    what it does}) are bare switches: {"quick": given}. With `config` (what such keys set, for
    --help) an argument whose key has a "." is passed on unchecked in {"config": [...]}, in order, for
    the config loader to check. `-h`/`--help` prints the usage and exits 0; an unknown key or a
    malformed argument prints one line naming it and exits 2."""
    choices, flags = choices or {}, flags or {}
    if any(a in HELP for a in argv):
        print(usage(doc, defaults, choices, flags, config))
        raise SystemExit(0)
    args = {**defaults, **{flag.lstrip("-"): False for flag in flags}, **({"config": []} if config else {})}
    for arg in argv:
        key, eq, value = arg.partition("=")
        if arg in flags:
            args[arg.lstrip("-")] = True
        elif not eq:
            expected = ": expected key=value" if defaults or config else ""
            fail(f"unknown argument {arg!r}{expected}", key, [*(shown(k, v) for k, v in defaults.items()), *flags])
        elif config and "." in key:
            args["config"].append(arg)
        elif key not in defaults:
            fail(f"unknown key {key!r}", key, [*defaults, *flags])
        else:
            args[key] = convert(key, value, defaults[key], choices.get(key))
    return args


@contextlib.contextmanager
def scratch_dir(name: str):
    """A temporary directory for a benchmark's runs, removed when the benchmark is done. A run
    stopped part way (Ctrl-C or a failure) has printed `run.resume=<its directory>` (rayrl.pipeline's
    save_on_failure), so then the directory stays, and a line says where."""
    path = tempfile.mkdtemp(prefix=f"rayrl-{name}-")
    try:
        yield path
    except BaseException:
        print(f"the runs so far stay in {path}; remove it when done", file=sys.stderr, flush=True)
        raise
    shutil.rmtree(path)
