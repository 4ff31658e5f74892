"""Progress of a gen-data run on stderr: a tqdm bar on a terminal, plain lines everywhere else.

A bar redraws itself with carriage returns, which a log file (nohup, CI, `| tee`) shows as one ever-growing
line or not at all (tqdm turns itself off without a terminal), so a long run there looked dead. Without a
terminal, a line such as `gen-data answers: 12/50 (kept 12, dropped 3: judge_unclear 3) 45s` is written at the
start, every `every` items (a twentieth of the total by default) or `interval` seconds, whichever comes first,
and at the end.
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from .. import console

INTERVAL_S = 30.0


class Progress:
    def __init__(self, desc: str, total: int, initial: int = 0, unit: str = "it", stream: TextIO | None = None,
                 every: int | None = None, interval: float = INTERVAL_S) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.desc, self.total, self.n = desc, total, min(initial, total)
        self.every = every or max(1, total // 20)
        self.interval = interval
        self.started = self.last_time = time.monotonic()
        self.last_n = self.n
        self.note = self.last_note = ""
        isatty = getattr(self.stream, "isatty", None)
        self.bar = None
        if isatty is not None and isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=self.n, desc=desc, unit=unit, file=self.stream,
                            disable=not console.progress_enabled())
        else:
            self._line()

    def update(self, n: int = 1, note: dict[str, Any] | None = None) -> None:
        """`n` more items done; `note` (e.g. {"kept": 3, "dropped": "judge_unclear 2"}) is shown with the count."""
        self.n += n
        if note is not None:
            self.note = ", ".join(f"{k} {v}" for k, v in note.items())
        if self.bar is not None:
            self.bar.update(n)
            if note is not None:
                self.bar.set_postfix(note, refresh=False)
            return
        now = time.monotonic()
        if self.n - self.last_n >= self.every or now - self.last_time >= self.interval:
            self._line()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif (self.n, self.note) != (self.last_n, self.last_note):  # the end, unless the last line said it all
            self._line()

    def _line(self) -> None:
        self.last_n, self.last_note, self.last_time = self.n, self.note, time.monotonic()
        note = f" ({self.note})" if self.note else ""
        if console.progress_enabled():  # --quiet: no progress lines
            print(f"gen-data {self.desc}: {self.n}/{self.total}{note} {self.last_time - self.started:.0f}s",
                  file=self.stream, flush=True)
