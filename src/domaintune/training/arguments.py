"""The `train` config section as transformers' `TrainingArguments`, plus the process world it runs in.

Most `train.*` fields map one to one (`DIRECT`); the rest of `TrainingArguments` is either derived from
the config (gradient accumulation from the global batch, warm-up, trackers, sampling) or set by
domaintune on purpose (output folder, logging of the first step, token counting, DDP backend on CPU).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from transformers import TrainingArguments

    from ..config import TrainConfig

# train.<field> -> the TrainingArguments fields that take its value as it is.
DIRECT: dict[str, tuple[str, ...]] = {
    "num_epochs": ("num_train_epochs",),
    "max_steps": ("max_steps",),
    "learning_rate": ("learning_rate",),
    "lr_scheduler": ("lr_scheduler_type",),
    "weight_decay": ("weight_decay",),
    "max_grad_norm": ("max_grad_norm",),
    "optim": ("optim",),
    "logging_steps": ("logging_steps",),
    "eval_steps": ("eval_steps",),
    "save_steps": ("save_steps",),
    "save_total_limit": ("save_total_limit",),
    "seed": ("seed", "data_seed"),
    "dataloader_num_workers": ("dataloader_num_workers",),
    "torch_compile": ("torch_compile",),
}

TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
            "trackio": ("trackio",), "comet_ml": ("comet_ml",)}


def world() -> tuple[int, int]:
    """(rank, world size) of this process, as torchrun and accelerate launch set them."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def grad_accumulation(tcfg: TrainConfig, world_size: int, quiet: bool = False, per_device: int | None = None) -> int:
    """`tcfg.gradient_accumulation(world_size)`, with a one-line warning (unless `quiet`) when an explicit
    `train.gradient_accumulation_steps` makes the global batch differ from `train.batch_size`. `per_device`: the
    resolved per-device batch when it is auto."""
    gas = tcfg.gradient_accumulation(world_size, per_device)
    effective = tcfg.global_batch(world_size, per_device)
    if tcfg.gradient_accumulation_steps and effective != tcfg.batch_size and not quiet:
        print(f"warning: train.gradient_accumulation_steps={gas} is set, so train.batch_size {tcfg.batch_size} "
              f"is ignored: the global batch is {tcfg.per_device(per_device)} per device x {world_size} "
              f"process(es) x {gas} = {effective}", flush=True)
    return gas


def check_trackers(report_to: list[str]) -> None:
    """A tracker named in train.report_to must be installed: say so before any work, not after loading."""
    for name in report_to:
        if name in ("none", "all"):
            continue
        mods = TRACKERS.get(name)
        if mods is None:
            raise UserError(f"train.report_to: unknown tracker '{name}'; use none, {', '.join(TRACKERS)}")
        if not any(importlib.util.find_spec(m) for m in mods):
            extra = "domaintune[tensorboard]" if name == "tensorboard" else mods[0]
            raise UserError(f"train.report_to: {name} is not installed. Run `pip install '{extra}'`, "
                            "or set train.report_to: [none]")


def training_arguments(t: TrainConfig, out: Path, *, world_size: int, device: str, bf16: bool, fp16: bool,
                       has_eval: bool, is_main: bool, per_device: int, group_by_length: bool,
                       liger: bool = False, args_class: type | None = None,
                       extra: dict | None = None) -> TrainingArguments:
    """The TrainingArguments of a run writing into `out` on `device` with `world_size` processes, with the
    per-device batch and the length grouping resolved (speed.py). `args_class`: a TrainingArguments subclass
    (TRL's DPOConfig ...) and `extra` its own fields or domaintune's choices that differ for it."""
    from transformers import TrainingArguments

    kwargs = {arg: getattr(t, name) for name, args in DIRECT.items() for arg in args}
    return (args_class or TrainingArguments)(**(_common_arguments(
        out, kwargs, t, world_size, device, bf16, fp16, has_eval, is_main, per_device, group_by_length, liger)
        | (extra or {})))


def _common_arguments(out: Path, kwargs: dict, t: TrainConfig, world_size: int, device: str, bf16: bool, fp16: bool,
                      has_eval: bool, is_main: bool, per_device: int, group_by_length: bool, liger: bool) -> dict:
    return dict(
        output_dir=str(out),
        **kwargs,
        # derived from the config
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        gradient_accumulation_steps=grad_accumulation(t, world_size, quiet=not is_main, per_device=per_device),
        warmup_steps=t.warmup_steps if t.warmup_steps is not None else t.warmup_ratio,  # a float < 1 is a ratio
        report_to=[] if t.report_to == ["none"] else t.report_to,
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        use_liger_kernel=liger,
        eval_strategy="steps" if has_eval else "no",
        # domaintune's choices: the first step logged, checkpoints by steps, token counts, explicit labels
        logging_first_step=True,
        save_strategy="steps",
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        label_names=["labels"],
        prediction_loss_only=True,  # evaluation needs the loss only (the chunked loss returns no logits)
        disable_tqdm=not is_main,
        # the machine
        bf16=bf16,
        fp16=fp16,
        dataloader_pin_memory=device == "cuda",
        # Without use_cpu, transformers (5.x) leaves a CPU torchrun in ParallelMode.NOT_PARALLEL: no DDP, no
        # gradient sync, per-process token counts.
        use_cpu=device == "cpu",
        ddp_backend=None if device == "cuda" else ("gloo" if world_size > 1 else None),
        ddp_find_unused_parameters=False if world_size > 1 else None,
    )
