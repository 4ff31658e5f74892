"""JSON-lines files that survive a kill: the one place for torn-tail handling, fsynced appends and
atomic rewrites. Used by training logs, predictions and gen-data's working files.

A writer killed mid-record leaves a last line without its newline. Readers ignore such a tail
(`read_jsonl`), and a writer about to append first repairs it (`repair_tail`): a complete record that
only lacks its newline is kept, a torn one is cut off. Appends are flushed and fsynced per record
(`JsonlAppender`); whole-file rewrites go through a temp file and a rename (`write_atomic`), so a reader
never sees half a file. A failed write names its file (`OSError.filename`), and `disk_error` turns a full disk,
a quota, a read-only or forbidden folder into the one-line UserError the verbs promise.
"""
from __future__ import annotations

import errno
import functools
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, TypeVar, cast

from .errors import UserError

F = TypeVar("F", bound=Callable[..., Any])
# Errors of a write that more space or a fixed folder cures: no space, over quota, read-only, no permission.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


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
        try:
            self._f.writelines(json.dumps(o, ensure_ascii=False) + "\n" for o in objs)
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:
            _name(e, self.path)
            raise

    def close(self) -> None:
        try:
            self._f.close()
        except OSError as e:  # the last flush: a full disk shows here too
            _name(e, self.path)
            raise

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file and a rename, so a reader never sees half a file: `path` holds its old content or
    the new one, never part of it. The temp file is fsynced before the rename (after a crash the new name
    never points at missing data) and removed when the write fails."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            _name(e, path, alias=tmp)
        raise


def fsync_path(path: Path) -> None:
    """Flush a file another library wrote (and closed) to the disk, before it is renamed into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _name(e: OSError, path: Path, alias: Path | None = None) -> None:
    """A failed write or flush reports no file name (ENOSPC on flush has none), or the temp file's (`alias`):
    give it the name of the file the user knows."""
    if e.filename is None or (alias is not None and e.filename == str(alias)):
        e.filename = str(path)


def write_failure(e: BaseException) -> str | None:
    """Why a write failed, when `e` is an error that more space or a fixed folder cures (DISK_ERRNOS), else
    None. Some writers lose the errno on the way: safetensors and tokenizers (Rust) raise "... (os error 28)",
    numpy's `tofile` (GGUFWriter) an OSError "N requested and M written" for a short write, and torch.save a
    RuntimeError from its zip writer (PytorchStreamWriter)."""
    text = str(e)
    if isinstance(e, OSError) and e.errno is not None:
        return (e.strerror or os.strerror(e.errno)) if e.errno in DISK_ERRNOS else None
    code = re.search(r"\(os error (\d+)\)", text)
    if code:
        return os.strerror(int(code.group(1))) if int(code.group(1)) in DISK_ERRNOS else None
    if isinstance(e, OSError) and re.fullmatch(r"\d+ requested and \d+ written", text):
        return "the disk is full (only part of the data could be written)"
    if isinstance(e, RuntimeError) and ("PytorchStreamWriter failed writing" in text or "unexpected pos" in text):
        return "the write failed, most likely on a full disk"
    return None


def disk_error(e: BaseException, path: str | Path | None, todo: str) -> UserError | None:
    """A one-line UserError for a write that more space or a fixed folder cures (`write_failure`), naming the
    file (the error's own, else `path`) and what to do; None for any other error, which the caller re-raises.
    The wording is neutral ("'FILE': Permission denied") because a forbidden file may also be one being read."""
    why = write_failure(e)
    if why is None:
        return None
    where = getattr(e, "filename", None) or path
    return UserError(f"'{where}': {why}. {todo}" if where else f"a write failed: {why}. {todo}")


def disk_errors_as_user_errors(todo: str) -> Callable[[F], F]:
    """Decorate a verb so that a full disk (or a read-only, forbidden folder) ends it with `disk_error`'s one
    line instead of a traceback; `todo` says what to do (free space, then rerun: the verb resumes)."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def verb(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                err = disk_error(e, None, todo)
                if err is None:
                    raise
                raise err from None
        return cast(F, verb)
    return wrap
