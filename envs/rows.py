"""Task files and splits shared by the domains: JSONL rows checked field by field, and a stable
hash split between training and held-out tasks."""

from __future__ import annotations

import hashlib
from pathlib import Path

from rayrl.rollout.scaffolds import parse_json


class TaskFormatError(ValueError):
    """A malformed task row; the message names the file, line and field."""


def check_fields(row, where: str, required: dict[str, type], optional: dict[str, type] | None = None) -> None:
    if not isinstance(row, dict):
        raise TaskFormatError(f"{where}: a task row must be a JSON object")
    for field, kind in required.items():
        if field not in row:
            raise TaskFormatError(f"{where}: field {field!r} is missing")
    for field, kind in {**required, **(optional or {})}.items():
        if field in row and not isinstance(row[field], kind):
            raise TaskFormatError(f"{where}: field {field!r} must be {kind.__name__}")


def jsonl_rows(path: str | Path):
    """(line number, parsed value) per non-blank line; an unreadable file, or a line that is not
    UTF-8 or not JSON, is a TaskFormatError naming the file and line."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise TaskFormatError(f"{path}: cannot read: {err.strerror or err}") from None
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise TaskFormatError(f"{path}:{n}: not UTF-8 (byte {err.start}: {raw[err.start:err.end]!r})") from None
        if not line.strip():
            continue
        row, error = parse_json(line)
        if error:
            raise TaskFormatError(f"{path}:{n}: not JSON ({error})")
        yield n, row


def unique_ids(parse_row, field: str, id_of):
    """`parse_row` for `read_jsonl` that refuses a row whose id (`id_of` its parsed value) an
    earlier line had, naming both lines."""
    seen: dict[str, str] = {}

    def checked(row, where: str):
        item = parse_row(row, where)
        key = id_of(item)
        if key in seen:
            raise TaskFormatError(f"{where}: field {field!r} {key!r} repeats {seen[key]}")
        seen[key] = where
        return item

    return checked


def read_jsonl(path: str | Path, parse_row) -> list:
    """`parse_row(row, where)` applied to every non-blank line; `where` is `path:line`."""
    return [parse_row(row, f"{path}:{n}") for n, row in jsonl_rows(path)]


def held_out(task_id: str, fraction: float) -> bool:
    """Whether a task belongs to the held-out share: a stable hash of its id, whatever its seed."""
    digest = hashlib.blake2b(task_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction
