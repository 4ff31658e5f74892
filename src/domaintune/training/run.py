"""One training run (`train.stage: sft`): config → data → model → transformers Trainer → run directory.

A run is one object set up in stages (`TrainingRun`), each short and readable on its own:

1. `setup_output`: check the output folder (fresh, `--resume` or `--overwrite`), the trackers and that the
   model exists, in about a second;
2. `setup_data`: tokenizer, template, read + validate + encode the data (bad data stops here, before the
   slow Trainer import and any model load);
3. `setup_model`: the one loader (LoRA / QLoRA / full) in the right precision;
4. `setup_trainer`: TrainingArguments (arguments.py), collator, callbacks (callbacks.py);
5. `train` then `save`: train with eval loss and checkpoints, then write the run directory (outputs.py,
   rundir.py).

Distributed: under `torchrun` or `accelerate launch` every process runs this same code; the Trainer
handles DDP (gloo on CPU, NCCL on GPUs). Only rank 0 writes logs and final artifacts. The global batch
(`train.batch_size`) is kept: gradient accumulation = batch_size / (per_device x processes).

Precision: LoRA keeps the frozen base in the configured dtype; full fine-tuning keeps fp32 master weights
(with bf16/fp16 autocast on GPUs), see `precision.training_precision`.

Checkpoints carry template.json and config.yaml too, so predict/chat/serve can use one directly.

Resume: `--resume` continues from the newest *complete* checkpoint (one whose trainer_state.json was
written, which the Trainer does last), restoring optimizer, scheduler, RNG and data position; log.jsonl
is cut back to that step so no step is logged twice. It says which checkpoint it starts from. A finished run
(final weights and run_info.json written) is already complete: said, and nothing is touched. A checkpoint of
the last step (a kill while the final files were written) trains nothing more and writes the final files.
Ctrl-C (one process) finishes the current step, saves a checkpoint of it and stops; a second Ctrl-C stops at
once. Either way the message names the checkpoint `--resume` continues from (the CLI adds the command).
status.json says whether the run is running, finished, stopped or failed (status.py).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .. import console
from ..errors import UserError
from ..rundir import (
    MODEL_CONFIG,
    TOKENIZER_FILES,
    RunDir,
    checkpoint_step,
    checkpoint_tokens,
)
from . import speed
from .arguments import (
    batch_line,
    check_lora_rank,
    check_trackers,
    engine_arguments,
    global_batch,
    training_arguments,
    world,
)
from .callbacks import NothingLeftToTrain, make_callbacks, refresh_plot
from .lora_methods import check_lora_choices, save_final_adapter, save_initial_adapter
from .outputs import (
    AlreadyComplete,
    check_resume_world,
    check_writable,
    interrupted_message,
    last_good,
    prepare_output_dir,
    saved_config,
    share_safetensors,
    write_error,
    write_run_files,
)
from .status import FAILED, FINISHED, STOPPED, RunStatus, StopRequest
from .trackers import tracker_callbacks

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

    from ..config import Config
    from ..data.encode import DataReport
    from ..data.templates import Template

T = TypeVar("T")


class RunData(Protocol):
    """A stage's encoded data as the run uses it: data/encode.py's Datasets (sft), data/preferences.py's
    PreferenceData (dpo, orpo, kto, simpo)."""

    train: Any  # a sequence of samples (arrow.Samples, or a list), or with data.streaming a stream
    eval: Any
    report: DataReport


def _set_by(stage: str, name: str, value: T | None) -> T:
    """`value`, which the stage `stage` sets: None means a caller skipped that stage (a bug, not a user mistake)."""
    if value is None:
        raise RuntimeError(f"TrainingRun.{name} is set by {stage}(), which has not run")
    return value


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: `message` names the step reached and the checkpoint `--resume` continues from (the
    CLI adds the command to run); `quiet` on the ranks other than 0, which say nothing."""

    def __init__(self, message: str, quiet: bool = False) -> None:
        super().__init__(message)
        self.message, self.quiet = message, quiet


class TrainingRun:
    """One training run, from the config to a finished run directory (see the module docstring)."""

    def __init__(self, cfg: Config, resume: bool = False, overwrite: bool = False) -> None:
        self.cfg, self.resume, self.overwrite = cfg, resume, overwrite
        self.rank, self.world_size = world()
        self.is_main = self.rank == 0
        self.out = Path(cfg.train.output_dir)
        self.run = RunDir(self.out)
        self.ckpt: Path | None = None
        # Set by the stages, read through the properties below (a RuntimeError names a stage that was skipped).
        self._tok: PreTrainedTokenizerBase | None = None
        self._template: Template | None = None
        self._data: RunData | None = None
        self.device = "cpu"
        self._precision: tuple[torch.dtype, bool, bool] | None = None  # load dtype, bf16 autocast, fp16 autocast
        self._base: PreTrainedModel | None = None
        self.model: Any = None  # the base, or a PeftModel around it
        self._trainer: Trainer | None = None
        self.lean: Any = None  # loss.LeanLoss when the chunked loss is used
        self.loss_kind = self.batching = ""
        self.per_device = 0
        self.checkpointing = False
        self.use_cache: bool | None = None
        self.status = RunStatus(self.run, cfg.train.stage, self.is_main)
        self.stop = StopRequest()

    @property
    def tok(self) -> PreTrainedTokenizerBase:
        return _set_by("setup_data", "tok", self._tok)

    @property
    def template(self) -> Template:
        return _set_by("setup_data", "template", self._template)

    @property
    def data(self) -> RunData:
        return _set_by("setup_data", "data", self._data)

    @property
    def precision(self) -> tuple[torch.dtype, bool, bool]:
        return _set_by("setup_model", "precision", self._precision)

    @property
    def base(self) -> PreTrainedModel:
        return _set_by("setup_model", "base", self._base)

    @property
    def trainer(self) -> Trainer:
        return _set_by("setup_trainer", "trainer", self._trainer)

    def _say(self, text: str) -> None:
        if self.is_main:
            console.note(text)

    # ------------------------------------------------------------ stages
    def check_data(self) -> None:
        """Validate the data files without a tokenizer (stages with other rows override it)."""
        from ..data.load import check_data_files

        if self.cfg.data.streaming:
            from ..data.stream import check_streaming

            check_streaming(self.cfg.data, self.cfg.train.max_steps)
        check_data_files(self.cfg.data, self.cfg.train.seed)

    def setup_output(self) -> None:
        from .model import check_model_source

        cfg = self.cfg
        name = cfg.model.required_name()
        check_trackers(cfg.train.report_to)
        self.ckpt = prepare_output_dir(self.out, self.resume, self.overwrite, self.is_main, name)
        if self.ckpt is not None:
            check_resume_world(self.ckpt, self.world_size, cfg.train.distributed)
        # Bad data and a missing model fail here, in about a second, not after the seconds torch + transformers
        # take to import: the data files are read and validated without a tokenizer.
        self.check_data()
        check_model_source(name, (MODEL_CONFIG, *TOKENIZER_FILES))
        if cfg.lora.enabled:  # a rank above the model's hidden size fails here, not in the allocation
            check_lora_rank(cfg.lora, name, cfg.model.revision)
            check_lora_choices(cfg)
        if cfg.train.trainer_args:  # a wrong key fails here, not after the model has loaded
            self.check_trainer_args()
        engine_arguments(cfg.train)  # so does a missing deepspeed or a bad train.distributed_config
        if self.is_main:
            check_writable(self.out)

    def setup_data(self) -> None:
        from ..data.prepare import build_datasets
        from ..data.templates import get_template
        from .model import load_tokenizer

        m = self.cfg.model
        self._tok = load_tokenizer(m.required_name(), m.trust_remote_code, m.revision)
        self._template = get_template(self.cfg.data.template, self.tok, self.cfg.data.thinking,
                                      self.cfg.data.train_on_turns)
        # Saved tokenizers (run dir, checkpoints) carry the training prompt as their chat_template, so plain
        # transformers' apply_chat_template renders what the model was trained on.
        self.tok.chat_template = self.template.chat_template_for(self.tok)
        self._data = build_datasets(self.cfg.data, self.tok, self.template, self.cfg.train.seed)
        self._say("\n".join(self.data.report.summary_lines()))

    def setup_model(self) -> None:
        from transformers import set_seed

        from . import model as loader
        from .precision import resolve_device, resolve_dtype, training_precision

        cfg = self.cfg
        self.device = resolve_device()
        dtype = resolve_dtype(cfg.model.dtype, self.device)
        self._precision = training_precision(cfg.lora.enabled, cfg.model.quantization, dtype, self.device)
        load_dtype, bf16, fp16 = self._precision
        self._base = loader.load_base_model(cfg.model, device=self.device, dtype=load_dtype,
                                            sharded=cfg.train.distributed == "fsdp")
        # No KV cache in training: it is useless there, and with a cache transformers does not detect packed rows
        # (masking_utils looks for them only without one). Restored before saving (save()).
        self.use_cache = getattr(self.base.config, "use_cache", None)
        self.base.config.use_cache = False
        t = cfg.train
        per_device = t.per_device_batch_size
        guess = max(1, t.batch_size // self.world_size) if per_device == "auto" else per_device
        checkpointing, why = speed.wants_checkpointing(t.gradient_checkpointing, self.base, self.sized_rows(), guess,
                                                       self.device)
        if why:
            self._say(why)
        # LoRA draws its new weights here, before the Trainer seeds anything:
        # seed now, or two runs of one config differ.
        set_seed(cfg.train.seed)
        self.checkpointing = checkpointing
        self.model = self.wrap_model(checkpointing)
        save_initial_adapter(self.model, self.out, cfg.lora, self.is_main)  # PiSSA/OLoRA: converted against it
        trainable, total = loader.count_parameters(self.model)
        autocast = " + bf16 autocast" if bf16 else " + fp16 autocast" if fp16 else ""
        method = "LoRA" if cfg.lora.enabled else "freeze" if cfg.freeze.enabled else "full"
        self._say(f"model: {cfg.model.name_or_path} ({method}; "
                  f"{trainable:,} trainable of {total:,} parameters; {str(load_dtype).replace('torch.', '')}"
                  f"{autocast} on {self.device})")

    def check_trainer_args(self) -> None:
        from .arguments import check_trainer_args

        check_trainer_args(self.cfg.train.trainer_args)

    def sized_rows(self) -> Sequence[dict]:
        """Training rows with their full `input_ids` (what the gradient-checkpointing estimate measures)."""
        return self.data.train

    def wrap_model(self, checkpointing: bool) -> Any:
        """The model to train: the base with new LoRA weights, or the base itself for full fine-tuning."""
        from .model import prepare_for_training

        return prepare_for_training(self.base, self.cfg.lora, self.cfg.model.quantization, checkpointing,
                                    freeze=self.cfg.freeze)

    def setup_trainer(self) -> None:
        from .hf_trainer import trainer_class
        from .loss import LeanLoss

        t = self.cfg.train
        _, bf16, fp16 = self.precision
        has_eval = bool(self.data.eval)
        self.loss_kind, why_loss = speed.choose_loss(t.loss, self.model, self.device)
        self.batching, why_batching = speed.choose_batching(t.batching, self.model)
        collator = speed.make_collator(self.batching, self.tok, self.device)
        self.lean = LeanLoss(self.model) if self.loss_kind == "chunked" else None
        # Tokens trained on: every token of the rows, EOS included. A packed batch has no padding, so each of its
        # tokens counts; counting "not the pad id" there (the Trainer's non_padding without an attention mask)
        # dropped every EOS where the tokenizer pads with EOS. Padded batches are counted by their attention mask.
        count = {"include_num_input_tokens_seen": "all"} if self.batching == "pack" else None
        if t.per_device_batch_size == "auto":
            probe = speed.oom_probe(self.model, collator, self.data.train, self.lean, self.device)
            self.per_device, why_batch = speed.auto_per_device(t, self.world_size, self.device, probe)
            self._say(why_batch)
        else:
            self.per_device = t.per_device_batch_size
        self._say(f"{why_loss}; {why_batching}")
        streaming = self.cfg.data.streaming  # a stream is read in order: no length grouping (stream.py)
        group = not streaming and (t.group_by_length if t.group_by_length is not None else self.batching == "pad")
        args, callbacks = self.arguments_and_callbacks(group_by_length=group, liger=self.loss_kind == "liger",
                                                       extra=count)
        # LoRA+: hf_trainer.create_optimizer; the validation loss over all target tokens: evaluation.py
        cls = trainer_class(loraplus_lr_ratio=t.loraplus_lr_ratio, token_mean_eval=True)
        self._trainer = cls(model=self.model, args=args, data_collator=collator,
                            train_dataset=self.data.train.ds if streaming else self.data.train,
                            eval_dataset=self.data.eval if has_eval else None,
                            processing_class=self.tok, callbacks=callbacks, compute_loss_func=self.lean)

    def arguments_and_callbacks(self, **stage: Any) -> tuple[Any, list]:
        """The run's TrainingArguments (its resolved batch printed) and callbacks; `stage`: the stage's own
        keywords of `training_arguments` (length grouping, liger, a TRL config class and its fields)."""
        t = self.cfg.train
        _, bf16, fp16 = self.precision
        args = training_arguments(t, self.out, world_size=self.world_size, device=self.device, bf16=bf16, fp16=fp16,
                                  has_eval=bool(self.data.eval), is_main=self.is_main, per_device=self.per_device,
                                  **stage)
        self._say(batch_line(args))
        callbacks = make_callbacks(self.run, checkpoint_step(self.ckpt), self.template,
                                   saved_config(self.cfg).to_yaml(omit_default_sections=True), t.distributed)
        trackers = tracker_callbacks(t.report_to, self.out, saved_config(self.cfg).model_dump(mode="json"))
        return args, [*callbacks, *trackers, self.status.callback(), self.stop.callback()]

    def train(self) -> tuple[dict, float, int]:
        """Train (resuming when asked); returns (final eval metrics, seconds, tokens already seen at the start)."""
        from .hf_trainer import NonFiniteTraining

        trainer = self.trainer
        tokens_at_start = checkpoint_tokens(self.ckpt)  # read now: checkpoint rotation may delete it during training
        t0 = time.time()
        try:
            with self.stop.installed(self.world_size == 1):
                trainer.train(resume_from_checkpoint=str(self.ckpt) if self.ckpt else None)
        except NothingLeftToTrain:
            pass  # resumed at the last step: the checkpoint's weights are loaded, the final files come next
        except NonFiniteTraining as e:
            raise UserError(f"training diverged: {e} (learning rate {self.cfg.train.learning_rate:g}); stopped "
                            f"before that step was applied. {last_good(self.out)} Lower train.learning_rate (or "
                            "keep train.max_grad_norm > 0) and train again") from None
        except (OSError, RuntimeError) as e:
            if (err := write_error(self.out, e)) is None:
                raise
            raise err from None
        if self.stop.requested:  # Ctrl-C: the checkpoint of this step is saved; no final eval, no final files
            raise KeyboardInterrupt
        logged_eval_at_end = any(r.get("step") == trainer.state.global_step and "eval_loss" in r
                                 for r in trainer.state.log_history)  # same on every rank
        eval_metrics = trainer.evaluate() if self.data.eval and not logged_eval_at_end else {}
        return eval_metrics, time.time() - t0, tokens_at_start

    def save(self, eval_metrics: dict, runtime: float, tokens_at_start: int) -> None:
        try:
            self._save(eval_metrics, runtime, tokens_at_start)
        except (OSError, RuntimeError) as e:  # a full disk here: the last checkpoint holds the trained weights
            if (err := write_error(self.out, e)) is None:
                raise
            raise err from None

    def _save(self, eval_metrics: dict, runtime: float, tokens_at_start: int) -> None:
        if self.use_cache is not None:
            self.base.config.use_cache = self.use_cache  # a saved full model generates with its cache again
        self.trainer.save_model(str(self.out))  # every rank calls it (needed for sharded setups); rank 0 writes
        if not self.trainer.is_world_process_zero():
            return
        save_final_adapter(self.model, self.out, self.cfg.lora)  # PiSSA/OLoRA: for the original base
        share_safetensors(self.out)
        path = {"loss": self.loss_kind, "batching": self.batching, "per_device_batch_size": self.per_device,
                "gradient_accumulation_steps": self.trainer.args.gradient_accumulation_steps,
                "global_batch": global_batch(self.trainer.args),
                "gradient_checkpointing": self.checkpointing, **self.run_path_info()}
        write_run_files(self.cfg, self.run, self.tok, self.template, self.base, self.data.report, self.trainer,
                        eval_metrics, runtime, self.world_size, tokens_at_start, path)
        refresh_plot(self.run)
        console.result(f"run directory: {self.out}")

    def run_path_info(self) -> dict:
        """What the stage adds to run_info.json's train.path."""
        return {}

    def execute(self) -> Path:
        try:
            self.setup_output()
        except AlreadyComplete as e:  # --resume of a finished run: said, and nothing touched
            if self.is_main:
                console.note(str(e))
            return self.out
        self.setup_data()
        self.setup_model()
        self.setup_trainer()
        step = 0
        try:
            try:
                result = self.train()
            finally:
                if self.lean is not None:
                    self.lean.close()  # the model computes its logits again
                step = self.trainer.state.global_step
            self.save(*result)
        except KeyboardInterrupt:  # Ctrl-C in training, the last eval or the final save
            said = interrupted_message(self.out, step, self.cfg.train.save_steps)
            self.status.set(state=STOPPED, step=step, message=said)
            raise TrainingInterrupted(said, quiet=not self.is_main) from None
        except Exception as e:
            self.status.set(state=FAILED, step=step, message=str(e) or type(e).__name__)
            raise
        self.status.set(state=FINISHED, step=step, message="")
        return self.out
