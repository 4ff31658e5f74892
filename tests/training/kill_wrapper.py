"""`python kill_wrapper.py train CFG`: the domaintune CLI, with one Trainer callback added that SIGKILLs this
process at a chosen point, given as DOMAINTUNE_TEST_KILL_AT:

- `save:N`: right after checkpoint-N is complete (on_save of step N);
- `step:N`: at the end of optimizer step N (before any checkpoint of that step);
- `sigint:N`: not a kill but Ctrl-C: SIGINT to this process at the end of optimizer step N (the product's own
  handler then saves a checkpoint of step N and stops).

Under torchrun, `rank:R` may follow (`step:4,rank:0`): only that rank kills itself (torchrun then stops the
others, as after a real crash). A test-side wrapper, so the kill lands at a known step; the product has no
such hook."""
from __future__ import annotations

import os
import signal
import sys

from transformers import TrainerCallback

import domaintune.training.run as run
from domaintune.cli import main

spec = dict(part.split(":") for part in os.environ["DOMAINTUNE_TEST_KILL_AT"].split(","))
KIND, STEP = next((k, int(v)) for k, v in spec.items() if k in ("save", "step", "sigint"))
RANK = int(spec.get("rank", os.environ.get("RANK", "0")))


class KillAt(TrainerCallback):
    def _maybe(self, kind: str, step: int) -> None:
        if KIND == "sigint" and kind == "step" and step == STEP:
            os.kill(os.getpid(), signal.SIGINT)
            return
        if kind == KIND and step == STEP and int(os.environ.get("RANK", "0")) == RANK:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def on_save(self, args, state, control, **kwargs):
        self._maybe("save", state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self._maybe("step", state.global_step)


_make_callbacks = run.make_callbacks
run.make_callbacks = lambda *a, **kw: [*_make_callbacks(*a, **kw), KillAt()]

sys.exit(main(sys.argv[1:]))
