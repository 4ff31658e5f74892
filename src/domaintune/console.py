"""Where domaintune's own terminal output goes: a verb's result on stdout, everything else on stderr.

A verb's result (the metrics table of `eval`, the YAML of `config`, `train`'s `run directory: PATH` ...) is
printed to stdout with plain ``print``, so that `domaintune eval p.jsonl | awk ...` reads data and nothing else.
Everything else goes through this module, on stderr:

- ``note(text)``: progress and notes; hidden by ``--quiet``.
- ``warn(text)``: ``warning: text``; shown even with ``--quiet``.
- ``error(text)``: ``error: text``; always shown.
- ``debug(text)``: shown only with ``-v``.
- ``progress_enabled()``: whether a progress bar may be drawn (not with ``--quiet``); ``stderr_is_terminal()``:
  whether a bar would redraw in place (in a log file, verbs print progress lines instead).

The CLI sets the level from ``-q`` / ``-v`` with ``set_verbosity``; library callers get ``NORMAL``. Python
``logging`` records of other libraries reach the same stream through ``LogHandler``, which the CLI installs.
Nothing happens at import: the level is read at each call, and the stream is ``sys.stderr`` as it is at that
moment (so pytest's capture and redirections see it).
"""
from __future__ import annotations

import contextlib
import io
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

QUIET, NORMAL, VERBOSE = 0, 1, 2
_level = NORMAL
# The stdout a result goes to while `stdout_to_stderr` has pointed sys.stdout elsewhere; None outside it.
_result_stream: TextIO | None = None


def set_verbosity(level: int) -> int:
    """QUIET, NORMAL or VERBOSE (a larger number counts as VERBOSE); returns the level it replaces."""
    global _level
    previous, _level = _level, max(QUIET, min(VERBOSE, int(level)))
    return previous


def verbosity() -> int:
    return _level


def _write(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def note(text: str) -> None:
    """Progress or a note for the person at the terminal (stderr); hidden by --quiet."""
    if _level >= NORMAL:
        _write(text)


def warn(text: str) -> None:
    """Something the user should know about the result (stderr, as `warning: text`); shown even with --quiet."""
    _write(f"warning: {text}")


def error(text: str) -> None:
    """Why the command failed (stderr, as `error: text`); always shown."""
    _write(f"error: {text}")


def debug(text: str) -> None:
    """Detail for a bug report (stderr); shown only with -v."""
    if _level >= VERBOSE:
        _write(text)


def progress_enabled() -> bool:
    """Whether a progress bar may be drawn (on stderr); --quiet turns them off."""
    return _level >= NORMAL


def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal, where a progress bar redraws itself; in a log file it would be one long line."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def result(text: str) -> None:
    """A result line printed where stdout would be without `stdout_to_stderr`: for a verb whose libraries print
    their progress on stdout (the Trainer's log lines), so the verb runs inside that context."""
    print(text, file=_result_stream or sys.stdout, flush=True)


@contextlib.contextmanager
def stdout_to_stderr(keep_results: bool = True) -> Iterator[None]:
    """Point sys.stdout at stderr (at nowhere with --quiet) for the duration, so what libraries print there
    (transformers' Trainer writes its log dicts to stdout) cannot mix with the result. `result()` still reaches
    the real stdout, unless `keep_results` is False: then the results of the steps inside are progress too (the
    quickstart's train and predict)."""
    global _result_stream
    saved = _result_stream
    _result_stream = (saved or sys.stdout) if keep_results else None
    target = sys.stderr if _level >= NORMAL else _Discard()
    try:
        with contextlib.redirect_stdout(target):
            yield
    finally:
        _result_stream = saved


class _Discard(io.TextIOBase):
    """A text stream that drops what it is given (stray library prints under --quiet)."""

    def write(self, text: str) -> int:
        return len(text)


class LogHandler(logging.Handler):
    """Python `logging` records (of other libraries: lm-eval, jieba, httpx ...) in this module's format:
    warnings as `warning: ...`, errors as `error: ...`, the rest as debug lines (shown with -v)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - a bad log call must not end the command
            self.handleError(record)
            return
        if record.levelno >= logging.ERROR:
            error(text)
        elif record.levelno >= logging.WARNING:
            warn(text)
        else:
            debug(f"{record.name}: {text}")


PROGRESS_INTERVAL_S = 30.0


class Progress:
    """Progress of long work on stderr: a tqdm bar on a terminal, plain lines everywhere else.

    A bar redraws itself with carriage returns, which a log file (nohup, CI, `| tee`) shows as one ever-growing
    line or not at all, so a long run there looked dead. Without a terminal, a line such as
    `gen-data answers: 12/50 (kept 12, dropped 3: judge_unclear 3) 45s` (`LABEL DESC: ...`) is written at the
    start, every `every` items (a twentieth of the total by default) or `interval` seconds, whichever comes first,
    and at the end. Nothing with --quiet."""

    def __init__(self, desc: str, total: int, initial: int = 0, unit: str = "it", stream: TextIO | None = None,
                 every: int | None = None, interval: float = PROGRESS_INTERVAL_S, label: str = "",
                 enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and progress_enabled()  # off: neither a bar nor lines (--quiet, other ranks)
        self.label = f"{label} " if label else ""
        self.desc, self.total, self.n = desc, total, min(initial, total)
        self.every = every or max(1, total // 20)
        self.interval = interval
        self.started = self.last_time = time.monotonic()
        self.last_n = self.n
        self.note = self.last_note = ""
        isatty = getattr(self.stream, "isatty", None)
        self.bar = None
        if self.enabled and isatty is not None and isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=self.n, desc=desc, unit=unit, file=self.stream)
        elif self.enabled:
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

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _line(self) -> None:
        self.last_n, self.last_note, self.last_time = self.n, self.note, time.monotonic()
        note = f" ({self.note})" if self.note else ""
        if self.enabled:
            print(f"{self.label}{self.desc}: {self.n}/{self.total}{note} {self.last_time - self.started:.0f}s",
                  file=self.stream, flush=True)
