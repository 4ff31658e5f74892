"""JSON-lines files that survive a kill: the one place for torn-tail handling, fsynced appends and
atomic rewrites. Used by training logs, predictions and gen-data's working files.

A writer killed mid-record leaves a last line without its newline. Readers ignore such a tail
(`read_jsonl`), and a writer about to append first repairs it (`repair_tail`): a complete record that
only lacks its newline is kept, a torn one is cut off. Appends are flushed and fsynced per record
(`JsonlAppender`); whole-file rewrites go through a temp file and a rename (`write_atomic`), so a reader
never sees half a file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import UserError


def repair_tail(path: Path) -> bool:
    """Make `path` end with a complete line. Returns True when a torn last record was cut off."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return False
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return False
    cut = data.rfind(b"\n") + 1
    try:
        json.loads(data[cut:].decode("utf-8"))
        complete = True
    except (UnicodeDecodeError, json.JSONDecodeError):
        complete = False
    with open(path, "r+b") as f:
        if complete:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
        else:
            f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())
    return not complete


def read_jsonl(path: Path, fix_hint: str = "delete that line and run again") -> list[dict]:
    """Every JSON object of a file this project wrote, skipping blank lines and ignoring a torn last line
    (even one cut inside a multi-byte character). The file is not modified. A bad line elsewhere raises
    UserError naming the file and line, followed by `fix_hint`."""
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    torn = not raw.endswith(b"\n")
    lines = raw.split(b"\n")
    rows: list[dict] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if torn and lineno == len(lines):
                break
            msg = e.msg if isinstance(e, json.JSONDecodeError) else "invalid UTF-8"
            raise UserError(f"{path} line {lineno}: not valid JSON ({msg}); {fix_hint}") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path} line {lineno}: expected a JSON object; {fix_hint}")
        rows.append(obj)
    return rows


class JsonlAppender:
    """Append one JSON object per line; each record is flushed and fsynced before `write` returns."""

    def __init__(self, path: Path):
        self.path = Path(path)
        repair_tail(self.path)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, obj: dict) -> None:
        self.write_many([obj])

    def write_many(self, objs: list[dict]) -> None:
        self._f.writelines(json.dumps(o, ensure_ascii=False) + "\n" for o in objs)
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file and a rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
