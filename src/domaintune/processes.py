"""Which process is which: a pid alone is not an identity (the kernel hands freed pids out again), a pid with
its start time is. Linux (/proc); elsewhere the start time is unknown (None) and callers fall back to the pid."""
from __future__ import annotations

from pathlib import Path


def start_time(pid: int) -> int | None:
    """The start time (clock ticks since boot) of a live process, None when there is none with this pid, it has
    ended (a zombie not yet reaped counts as ended), or /proc is not there."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    # The command name (2nd field) is in parentheses and may hold spaces or ')': split after the last ')'.
    fields = stat[stat.rfind(")") + 2:].split()
    if not fields or fields[0] in ("Z", "X"):
        return None
    try:
        return int(fields[19])  # field 22 of the file; fields[0] is field 3 (the state)
    except (IndexError, ValueError):
        return None
