"""The process that runs one studio job: `python -m domaintune.studio.job RECORD` (started by jobs.Jobs.start).

It runs `python -m domaintune *argv` (the record's argv; its "command" instead, in tests) as its child, waits for
it, and writes the child's exit code and end time into the record, atomically. Exit codes of a child killed by a
signal are written as the shell does: 128 + the signal number.

Signals: the studio stops a job with SIGINT to the job's process group. This process catches SIGINT with a
Python handler that does nothing (not SIG_IGN: an ignored signal would stay ignored in the child across exec, and
the child must get its KeyboardInterrupt to save a checkpoint and exit 130), so it lives on to record the code.
SIGTERM is forwarded to the child. The child inherits this process's environment, which is how the studio hands
a job a secret (the chat server's key) without putting it on a command line. Linux and macOS; the studio's
liveness checks are Linux only.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Iterator

from .. import console
from ..jsonl import write_atomic

PID_WAIT_S = 30.0  # how long to wait for the studio to record this process's pid (it does so right after spawning)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        console.error("usage: python -m domaintune.studio.job RECORD.json (the studio starts it, not a person)")
        return 2
    record_path = Path(argv[0])
    record = json.loads(record_path.read_text(encoding="utf-8"))
    command = record.get("command") or [sys.executable, "-m", "domaintune", *record["argv"]]
    child: subprocess.Popen | None = None

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        pass  # the child got it too (same process group); its exit code says how it went

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if child is not None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        code = child.wait()
    except OSError as e:
        console.error(f"studio job: cannot start {command[0]}: {e}")
        code = 127
    if code < 0:
        code = 128 - code
    finish(record_path, code)
    return code


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def locked(record_path: Path) -> Iterator[None]:
    """Hold the record's lock (an flock on RECORD.lock beside it) for a read-modify-write of the record: this
    process writing the exit code and the studio writing a later field (a stop request) never lose each other's
    fields. The lock is on a file of its own because every write replaces the record's file (a new inode)."""
    with open(record_path.with_suffix(".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def finish(record_path: Path, code: int) -> None:
    """Write exit_code and ended into the record, once the studio has written the pid there (its second write;
    later ones, such as a stop request, take the record's lock as this does), so no write loses another's fields."""
    deadline = time.monotonic() + PID_WAIT_S
    while True:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record.get("pid") is not None or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    with locked(record_path):
        record = json.loads(record_path.read_text(encoding="utf-8"))
        record.update(exit_code=code, ended=now_iso())
        write_atomic(record_path, json.dumps(record, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
