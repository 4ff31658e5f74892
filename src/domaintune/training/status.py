"""A run's state for whoever watches it (the studio, a script, a person with `cat`), and Ctrl-C that keeps the work.

**status.json** (rundir.STATUS), written atomically by the main process of `train`, whoever started it:

    {"state": "running" | "finished" | "stopped" | "failed", "pid": 1234, "pid_start": 98765, "host": "name",
     "started": "2026-12-07T04:30:00+00:00", "updated": "...", "step": 12, "max_steps": 40,
     "stage": "sft", "message": ""}

"running" is written when the Trainer starts and refreshed (step, updated) at each logged step; "finished" once
the final files are written; "stopped" after Ctrl-C (message: the checkpoint `--resume` continues from);
"failed" on an error (message: the error). A process killed outright (SIGKILL, out of memory, power) writes
nothing: a reader that finds "running" with no live `pid` on this `host`, or a `pid` whose process started at
another time than `pid_start` (the pid was handed to another process since; processes.py), knows it died
(studio/runs.py).

**Ctrl-C** (SIGINT) during training, in a single process: the first one lets the current optimizer step finish,
saves a checkpoint of that step and stops (exit code 130, "stopped"); `--resume` continues from exactly there,
so a stop costs no work. A second Ctrl-C stops at once, from the last checkpoint saved before. Under torchrun
or accelerate launch the launcher owns the signals (it stops every process): Ctrl-C stops at once there, and
`--resume` continues from the last `train.save_steps` checkpoint.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .. import console, processes
from ..rundir import STATUS, RunDir

if TYPE_CHECKING:
    from transformers import TrainerCallback

RUNNING, FINISHED, STOPPED, FAILED = "running", "finished", "stopped", "failed"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def peak_memory_mib() -> int:
    """The peak memory of this process so far, in MiB: CUDA's max allocated when training on a GPU, else the
    process's peak resident set (what the OS counts, which is what runs out on a laptop)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated() // 2**20)
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)  # KiB on Linux


class RunStatus:
    """Writes status.json for one run: only on the main process (`enabled`), and only once the Trainer has started
    (a run that fails in its set-up leaves its folder as it was, so the same command can be run again)."""

    def __init__(self, run: RunDir, stage: str, enabled: bool) -> None:
        self.run, self.enabled, self.started = run, enabled, False
        self.data: dict[str, Any] = {"state": RUNNING, "pid": os.getpid(), "host": socket.gethostname(),
                                     "started": _now(), "updated": _now(), "step": 0, "max_steps": 0,
                                     "stage": stage, "message": ""}

    def set(self, **fields: Any) -> None:
        if not (self.enabled and self.started):
            return
        self.data.update(fields, updated=_now())
        try:
            self.run.path.mkdir(parents=True, exist_ok=True)
            self.run.write_json(STATUS, self.data)
        except OSError as e:  # a full disk must not turn a finished run into a failed one: the log says so
            console.warn(f"could not write {self.run.file(STATUS)}: {e}")

    def callback(self) -> TrainerCallback:
        from transformers import TrainerCallback

        status = self

        class Status(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                status.started = True
                status.set(state=RUNNING, step=state.global_step, max_steps=state.max_steps, pid=os.getpid(),
                           pid_start=processes.start_time(os.getpid()))

            def on_log(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                status.set(step=state.global_step)

        return Status()


class StopRequest:
    """Ctrl-C as "stop after this step, with a checkpoint" (see the module docstring). `requested` is set by the
    first SIGINT; `callback()` turns it into the Trainer's save-and-stop at the end of the current step."""

    def __init__(self) -> None:
        self.requested = False
        self.at_step: int | None = None

    @contextlib.contextmanager
    def installed(self, active: bool) -> Iterator[None]:
        """The SIGINT handler, while the Trainer trains. Not installed when `active` is false (several processes)
        or off the main thread (Python delivers signals there only): Ctrl-C then stops at once, as before."""
        if not active or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def first(signum: int, frame: Any) -> None:
            self.requested = True
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the second Ctrl-C stops at once
            console.warn("stopping after this step, with a checkpoint (Ctrl-C again to stop at once)")

        signal.signal(signal.SIGINT, first)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def callback(self) -> TrainerCallback:
        from transformers import TrainerCallback

        request = self

        class SaveAndStop(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if request.requested and request.at_step is None:
                    request.at_step = state.global_step
                    control.should_save = True
                    control.should_training_stop = True

        return SaveAndStop()
