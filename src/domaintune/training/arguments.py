"""The `train` config section as transformers' `TrainingArguments`, plus the process world it runs in.

Most `train.*` fields map one to one (`DIRECT`); the rest of `TrainingArguments` is either derived from
the config (gradient accumulation from the global batch, warm-up, trackers, sampling) or set by
domaintune on purpose (output folder, logging of the first step, token counting, DDP backend on CPU).
"""
from __future__ import annotations

import difflib
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .. import console
from ..errors import UserError
from .optimizers import check_loraplus
from .trackers import hf_report_to

if TYPE_CHECKING:
    from transformers import TrainingArguments

    from ..config import LoraConfig, TrainConfig

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
            "trackio": ("trackio",), "comet_ml": ("comet_ml",), "swanlab": ("swanlab",)}
# The trackers with an extra of domaintune's own (pyproject.toml); the others install as their package.
TRACKER_EXTRAS = ("tensorboard", "swanlab")


def global_batch(args: TrainingArguments) -> int:
    """Rows per optimizer step as the Trainer will run it."""
    return args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps


def batch_line(args: TrainingArguments) -> str:
    """The resolved batch, printed at the start of a run (run_info.json keeps the numbers)."""
    return (f"batch: {global_batch(args)} rows per optimizer step = {args.per_device_train_batch_size} per device x "
            f"{args.world_size} process(es) x {args.gradient_accumulation_steps} accumulation step(s)")


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
        console.warn(f"train.gradient_accumulation_steps={gas} is set, so train.batch_size {tcfg.batch_size} "
                     f"is ignored: the global batch is {tcfg.per_device(per_device)} per device x {world_size} "
                     f"process(es) x {gas} = {effective}")
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
            extra = f"domaintune[{name}]" if name in TRACKER_EXTRAS else mods[0]
            raise UserError(f"train.report_to: {name} is not installed. Run `pip install '{extra}'`, "
                            "or set train.report_to: [none]")
        if name == "swanlab":
            from .trackers import check_swanlab_login

            check_swanlab_login()


# TrainingArguments fields domaintune sets itself, and where the user sets them instead (None: not settable,
# with the reason). train.trainer_args may not name them.
PROTECTED: dict[str, str] = {
    **{arg: f"train.{name}" for name, args in DIRECT.items() for arg in args},
    "output_dir": "train.output_dir", "per_device_train_batch_size": "train.per_device_batch_size",
    "per_device_eval_batch_size": "train.per_device_batch_size",
    "gradient_accumulation_steps": "train.batch_size (or train.gradient_accumulation_steps)",
    "warmup_steps": "train.warmup_steps or train.warmup_ratio", "warmup_ratio": "train.warmup_ratio",
    "report_to": "train.report_to", "train_sampling_strategy": "train.group_by_length",
    "use_liger_kernel": "train.loss", "gradient_checkpointing": "train.gradient_checkpointing",
    "eval_strategy": "train.eval_steps (evaluation runs when there is validation data)",
    "save_strategy": "train.save_steps", "bf16": "model.dtype", "fp16": "model.dtype",
    "logging_first_step": "nothing: log.jsonl needs the first step",
    "include_num_input_tokens_seen": "nothing: run_info.json's token counts need it",
    "remove_unused_columns": "nothing: the collators need every column",
    "label_names": "nothing: the training stage sets it",
    "prediction_loss_only": "nothing: the chunked loss returns no logits",
    "disable_tqdm": "nothing: only rank 0 shows progress bars, on a terminal",
    "use_cpu": "nothing: the device is detected (CUDA_VISIBLE_DEVICES= hides GPUs)",
    "ddp_backend": "nothing: gloo on CPU, NCCL on GPUs", "resume_from_checkpoint": "--resume",
    "fsdp": "train.distributed: fsdp", "fsdp_config": "train.distributed_config",
    "deepspeed": "train.distributed: deepspeed and train.distributed_config",
    "overwrite_output_dir": "--overwrite", "dataloader_pin_memory": "nothing: on for CUDA",
    "neftune_noise_alpha": "train.neftune_alpha",
    # the preference stages' own (TRL) fields that come from the config
    "beta": "train.beta", "max_length": "data.cutoff_len", "max_completion_length": "data.cutoff_len",
}


def check_trainer_args(extra: dict, args_class: type | None = None) -> None:
    """Each `train.trainer_args` key must be a field of TrainingArguments (or of `args_class`) that domaintune
    does not set itself, and its value of the field's type; one UserError naming every bad key, the closest
    field or the train.* key to use. (Values the optimizer or schedule refuses: check_train_settings.)"""
    import dataclasses
    import difflib

    from transformers import TrainingArguments

    cls = args_class or TrainingArguments
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    problems = []
    for key in extra:
        if key in PROTECTED:
            problems.append(f"{key!r} is set by domaintune; use {PROTECTED[key]}")
        elif key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1, cutoff=0.6)
            problems.append(f"{key!r} is not a TrainingArguments field" + (f"; did you mean {close[0]!r}?" if close
                                                                           else ""))
        else:
            problems.extend(_type_problems(cls, key, extra[key]))
    if problems:
        raise UserError("train.trainer_args: " + "; ".join(problems))


def _type_problems(cls: type, key: str, value: object) -> list[str]:
    """The value of field `key` of `cls` checked against the field's annotation (strictly: YAML gives real
    numbers, booleans and lists, so "0.95" for a float is a mistake)."""
    import typing

    from pydantic import TypeAdapter, ValidationError

    try:
        hint = typing.get_type_hints(cls)[key]
        adapter: TypeAdapter = TypeAdapter(hint)
    except Exception:  # an annotation pydantic cannot read (a library's own type): nothing to check against
        return []
    try:
        adapter.validate_python(value, strict=True)
    except ValidationError:
        shown = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
        return [f"{key!r} must be {shown}, got {value!r}"]
    return []


def _closest(value: str, valid: list[str]) -> str | None:
    """The valid name a typo most likely meant: one that starts with it (`adamw` -> `adamw_torch`, the first
    such in the library's order), else the closest by spelling."""
    low = value.strip().lower()
    starts = [v for v in valid if v.startswith(low)] if low else []
    if starts:
        return starts[0]
    close = difflib.get_close_matches(low, valid, n=1, cutoff=0.6)
    return close[0] if close else None


def _check_name(field: str, value: str, valid: list[str], what: str) -> None:
    if value in valid:
        return
    close = _closest(value, valid)
    hint = f" Did you mean {close!r}?" if close else ""
    listed = f" Valid: {', '.join(valid)}" if not close or len(valid) <= 15 else ""
    raise UserError(f"{field} {value!r} is not {what}.{hint}{listed}")


# Optimizers that need the model itself to be built (they pick target modules from it): not probed before load.
_NEEDS_MODEL = ("galore", "apollo", "lomo")


def check_train_settings(t: TrainConfig) -> None:
    """The names and values transformers and torch would refuse only after the model has loaded, checked in
    milliseconds before it: `train.lr_scheduler` and `train.optim` against transformers' own names
    (SchedulerType, OptimizerNames) with the closest one, then the optimizer built on one dummy parameter from the
    settings the Trainer would give it (torch checks betas, eps, learning rate and weight decay), and the
    schedule on it with `lr_scheduler_kwargs`."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    _check_name("train.lr_scheduler", t.lr_scheduler, [s.value for s in SchedulerType],
                "a transformers learning-rate schedule")
    _check_name("train.optim", t.optim, [o.value for o in OptimizerNames], "a transformers optimizer name")
    optimizer = _probe_optimizer(t)
    _probe_schedule(t, optimizer)


def _probe_args(t: TrainConfig) -> object:
    """What get_optimizer_cls_and_kwargs reads of TrainingArguments: every field at its default, with this
    section's values and its trainer_args on top, without building TrainingArguments (whose __post_init__
    sets up devices and the distributed state, which must happen once, in the real arguments)."""
    import dataclasses
    import types

    from transformers import TrainingArguments
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    values = {}
    for f in dataclasses.fields(TrainingArguments):
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()
    values |= {arg: getattr(t, name) for name, args in DIRECT.items() for arg in args}
    values |= {k: v for k, v in t.trainer_args.items() if k in values}
    values["optim"], values["lr_scheduler_type"] = OptimizerNames(t.optim), SchedulerType(t.lr_scheduler)
    return types.SimpleNamespace(**values)


def _probe_optimizer(t: TrainConfig) -> object | None:
    """The optimizer the Trainer would build, on one parameter; a UserError with torch's reason when its
    settings are refused. None where it cannot be built without the model or a GPU (its library checks then)."""
    import torch
    from transformers import Trainer

    if any(word in t.optim for word in _NEEDS_MODEL):
        return None
    optim_args = t.trainer_args.get("optim_args")
    if isinstance(optim_args, str) and optim_args.strip() and any(
            item.count("=") != 1 for item in optim_args.replace(" ", "").split(",")):
        raise UserError(f"train.trainer_args.optim_args {optim_args!r} must look like key=value,key=value")
    try:
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(_probe_args(t))  # type: ignore[arg-type]
    except (ImportError, ValueError) as e:  # a missing package (bitsandbytes ...) or a bad optim_args
        raise UserError(f"train.optim {t.optim}: {e}") from None
    if not (isinstance(cls, type) and cls.__module__.startswith("torch.optim")):
        return None  # bitsandbytes, torchao ...: built for the device at train time
    kwargs = {k: v for k, v in kwargs.items() if k not in ("fused", "foreach")}  # kernels, not settings
    param = torch.nn.Parameter(torch.zeros(1))
    try:
        return cls([{"params": [param], "weight_decay": t.weight_decay}], **kwargs)
    except (ValueError, TypeError) as e:
        given = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        raise UserError(f"train.trainer_args: the optimizer {t.optim} refuses its settings: {e} (it was given "
                        f"{given}, from train.learning_rate and train.trainer_args)") from None


def _probe_schedule(t: TrainConfig, optimizer: object | None) -> None:
    import torch
    from transformers import get_scheduler

    if optimizer is None:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.learning_rate)
    kwargs = t.trainer_args.get("lr_scheduler_kwargs") or {}
    if not isinstance(kwargs, dict):
        return  # a JSON string: TrainingArguments parses it
    try:
        get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=1, num_training_steps=10,  # type: ignore[arg-type]
                      scheduler_specific_kwargs=kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"train.lr_scheduler {t.lr_scheduler}: {e} (train.trainer_args.lr_scheduler_kwargs: "
                        f"{kwargs})") from None


def check_lora_rank(lora: LoraConfig, name_or_path: str, revision: str | None = None) -> None:
    """`lora.r` against the hidden size in the base model's config.json, read (a local folder, or a hub id in the
    cache) before the model loads: a rank above it adds nothing and a huge one allocates without bound."""
    from .model import base_config_dict

    conf = base_config_dict(name_or_path, revision)
    if conf is not None:  # not downloaded yet, or unreadable: the loader reports it in its own words
        lora.check_rank(conf, f"model '{name_or_path}'")


# train.distributed: fsdp without a distributed_config: FSDP2, every parameter, gradient and optimizer state
# sharded, transformer blocks wrapped (the model's _no_split_modules), one full state dict saved by rank 0 (so a
# run directory and its checkpoints hold ordinary safetensors weights).
FSDP_DEFAULT = {"version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "state_dict_type": "FULL_STATE_DICT"}


def engine_arguments(t: TrainConfig) -> dict:
    """The TrainingArguments of `train.distributed`: none for ddp, fsdp + fsdp_config, or deepspeed.

    Also runs `check_train_settings` first: the run calls this before the model loads (TrainingRun.setup_output),
    so a misspelt schedule or optimizer, or a value torch would refuse, stops the run there."""
    check_train_settings(t)
    check_loraplus(t)
    if t.distributed == "ddp":
        if t.distributed_config:
            raise UserError("train.distributed_config is for train.distributed fsdp or deepspeed; ddp takes none")
        return {}
    from ..config.flat import read_json_file

    if t.distributed == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise UserError("train.distributed: deepspeed needs the deepspeed package: pip install 'domaintune[deepspeed]' "
                        "(on a CUDA machine), or use train.distributed: fsdp")
    conf: dict | None = None
    if t.distributed_config:
        try:
            conf = read_json_file(t.distributed_config)
        except UserError as e:
            raise UserError(f"train.distributed_config: {e}") from None
    if t.distributed == "fsdp":
        return {"fsdp": True, "fsdp_config": conf if conf is not None else dict(FSDP_DEFAULT)}
    if conf is None:
        raise UserError("train.distributed: deepspeed needs train.distributed_config, a DeepSpeed JSON config such "
                        "as configs/distributed/zero2.json")
    return {"deepspeed": conf}


def training_arguments(t: TrainConfig, out: Path, *, world_size: int, device: str, bf16: bool, fp16: bool,
                       has_eval: bool, is_main: bool, per_device: int, group_by_length: bool,
                       liger: bool = False, args_class: type | None = None,
                       extra: dict | None = None) -> TrainingArguments:
    """The TrainingArguments of a run writing into `out` on `device` with `world_size` processes, with the
    per-device batch and the length grouping resolved (speed.py). `args_class`: a TrainingArguments subclass
    (TRL's DPOConfig ...) and `extra` its own fields or domaintune's choices that differ for it."""
    from transformers import TrainingArguments

    kwargs = {arg: getattr(t, name) for name, args in DIRECT.items() for arg in args}
    check_trainer_args(t.trainer_args, args_class)
    return (args_class or TrainingArguments)(**(_common_arguments(
        out, kwargs, t, world_size, device, bf16, fp16, has_eval, is_main, per_device, group_by_length, liger)
        | engine_arguments(t) | (extra or {}) | t.trainer_args))


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
        # swanlab is logged by domaintune's own callback (trackers.py says why), never by transformers'
        report_to=hf_report_to(t.report_to),
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        use_liger_kernel=liger,
        # NEFTune: the Trainer hooks uniform noise onto the input embeddings' output in training mode only (never
        # in evaluation); its scale is alpha / sqrt(row length x hidden size), the row being a packed row when packed
        neftune_noise_alpha=t.neftune_alpha,
        eval_strategy="steps" if has_eval else "no",
        # domaintune's choices: the first step logged, checkpoints by steps, token counts, explicit labels
        logging_first_step=True,
        save_strategy="steps",
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        label_names=["labels"],
        prediction_loss_only=True,  # evaluation needs the loss only (the chunked loss returns no logits)
        # a bar only on a terminal: in a log file (nohup, CI) its carriage returns make one unreadable line, and the
        # Trainer's log lines (one per logging step) are the progress there
        disable_tqdm=not is_main or not console.progress_enabled() or not console.stderr_is_terminal(),
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
