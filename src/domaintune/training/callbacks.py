"""Trainer callbacks: the live log (log.jsonl), the loss plot, and checkpoints that are run directories.

`make_callbacks` builds them inside a function so transformers is imported only when training starts.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import console
from ..jsonl import JsonlAppender, read_jsonl, write_atomic, write_jsonl_atomic
from ..rundir import CHECKPOINT_PREFIX, CHECKPOINT_WORLD, CONFIG, LOSS_PNG, MODEL_CARD, TEMPLATE, RunDir
from .outputs import share_safetensors
from .status import peak_memory_mib

if TYPE_CHECKING:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

    from ..data.templates import Template


# What the preference stages (TRL) log besides the loss, with and without the eval_ prefix: reward margins and
# accuracy, the policy's log-probs of chosen and rejected completions, KTO's KL estimate, ORPO's two terms.
PREFERENCE_METRICS = tuple(p + m for p in ("", "eval_") for m in ("rewards/", "logps/", "kl", "nll_loss",
                                                                   "log_odds_"))


def make_callbacks(run: RunDir, resume_step: int, template: Template, config_yaml: str,
                   distributed: str = "ddp") -> list[TrainerCallback]:
    """`template` and `config_yaml` (the saved config) go into every checkpoint, so a checkpoint is a run
    directory that predict/chat/serve can use with the prompt format it was trained on; so does world.json (the
    process count and `distributed` engine, which resume checks). `resume_step` is the step training resumes
    from (0 for a fresh run): log.jsonl is cut back to it."""
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        """Writes log.jsonl live (rank 0), refreshes loss.png at every eval and save, and completes each
        checkpoint with template.json and config.yaml."""

        def __init__(self) -> None:
            self.t0 = time.time()
            self.offset = 0.0

        def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                           **kw: Any) -> None:
            if not state.is_world_process_zero:
                return
            run.path.mkdir(parents=True, exist_ok=True)
            kept = [r for r in read_jsonl(run.log_path) if r.get("step", 0) <= resume_step] if resume_step else []
            self.offset = max((r.get("time", 0.0) for r in kept), default=0.0)
            write_jsonl_atomic(run.log_path, kept)
            self.t0 = time.time()

        def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                   logs: dict | None = None, **kw: Any) -> None:
            if not state.is_world_process_zero or not logs or "train_loss" in logs:  # the end-of-training summary
                return
            rec = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
            for k in ("loss", "eval_loss", "learning_rate", "grad_norm"):
                if k in logs:
                    rec[k] = logs[k]
            rec.update({k: v for k, v in logs.items() if k.startswith(PREFERENCE_METRICS)})
            if "num_input_tokens_seen" in logs:
                rec["tokens"] = int(logs["num_input_tokens_seen"])
            rec["time"] = round(self.offset + time.time() - self.t0, 3)
            rec["memory_mib"] = peak_memory_mib()
            with JsonlAppender(run.log_path) as f:  # the project's one kill-safe JSONL writer
                f.write(rec)

        def _plot(self, state: TrainerState) -> None:
            if state.is_world_process_zero and run.log_path.is_file():
                refresh_plot(run)

        def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                        **kw: Any) -> None:
            self._plot(state)

        def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          **kw: Any) -> None:
            # Resumed from the checkpoint of the last step (a kill while the final files were written), the Trainer
            # would train one step past max_steps before it looks at the step count (transformers 5.x).
            if state.max_steps and state.global_step >= state.max_steps:
                raise NothingLeftToTrain(state.global_step)

        def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
            if state.is_world_process_zero:
                assert args.output_dir is not None, "TrainingArguments sets output_dir (trainer_output by default)"
                ckpt = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
                if ckpt.is_dir():
                    _drop_peft_card(ckpt)
                    share_safetensors(ckpt)
                    template.save(ckpt / TEMPLATE)
                    write_atomic(ckpt / CONFIG, config_yaml)
                    write_atomic(ckpt / CHECKPOINT_WORLD, json.dumps({"world_size": args.world_size,
                                                                      "distributed": distributed}) + "\n")
            self._plot(state)

    return [JsonlLog()]


class NothingLeftToTrain(Exception):
    """Raised before a step past max_steps: the run resumed at its last step, with nothing left to train."""

    def __init__(self, step: int) -> None:
        super().__init__(f"step {step} is the last step")
        self.step = step


def _drop_peft_card(folder: Path) -> None:
    """PEFT's save_pretrained writes its empty model card template ("[More Information Needed]", base_model: a path
    of this machine) beside the adapter; a checkpoint has no card of its own, so it goes."""
    card = folder / MODEL_CARD
    try:
        if card.is_file() and "[More Information Needed]" in card.read_text(encoding="utf-8", errors="replace"):
            card.unlink()
    except OSError:
        pass


def refresh_plot(run: RunDir) -> None:
    """Redraw loss.png; a plotting problem never stops training."""
    try:
        from ..evaluation.plot import plot_run

        plot_run(run.path)
    except Exception as e:  # noqa: BLE001 - the plot is a convenience, the run is what matters
        console.warn(f"could not draw {run.path / LOSS_PNG}: {e}")
