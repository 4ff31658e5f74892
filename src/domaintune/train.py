"""`domaintune train`: config → data → model → transformers Trainer → run directory.

The run is one readable sequence (`run_train`): check the output folder, load the tokenizer, build and
validate the data (bad data stops here, before any model is loaded), load the model (LoRA / QLoRA /
full), train with eval loss and checkpoints, then write the run directory (see rundir.py).

Distributed: under `torchrun` or `accelerate launch` every process runs this same function; the
Trainer handles DDP (gloo on CPU, NCCL on GPUs). Only rank 0 writes logs and final artifacts. The
global batch (`train.batch_size`) is kept: gradient accumulation = batch_size / (per_device x processes).

Precision: LoRA keeps the frozen base in the configured dtype; full fine-tuning keeps fp32 master weights
(with bf16/fp16 autocast on GPUs), see `training_precision`.

Checkpoints carry template.json and config.yaml too, so predict/chat/serve can use one directly.

Resume: `--resume` continues from the newest *complete* checkpoint (one whose trainer_state.json was
written, which the Trainer does last), restoring optimizer, scheduler, RNG and data position; log.jsonl
is cut back to that step so no step is logged twice.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from . import __version__
from .errors import UserError
from .jsonl import JsonlAppender, read_jsonl, write_atomic, write_jsonl_atomic
from .rundir import CHECKPOINT_PREFIX, RunDir, checkpoint_step, checkpoint_tokens, latest_checkpoint


def world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def grad_accumulation(tcfg, world_size: int, quiet: bool = False) -> int:
    """Accumulation steps that keep the global `train.batch_size` over `world_size` processes; an explicit
    `train.gradient_accumulation_steps` wins (with a one-line warning when it changes the global batch)."""
    if tcfg.gradient_accumulation_steps:
        gas = tcfg.gradient_accumulation_steps
        effective = tcfg.per_device_batch_size * world_size * gas
        if effective != tcfg.batch_size and not quiet:
            print(f"warning: train.gradient_accumulation_steps={gas} is set, so train.batch_size {tcfg.batch_size} "
                  f"is ignored: the global batch is {tcfg.per_device_batch_size} per device x {world_size} "
                  f"process(es) x {gas} = {effective}", flush=True)
        return gas
    per_step = tcfg.per_device_batch_size * world_size
    if tcfg.batch_size % per_step:
        raise UserError(f"train.batch_size {tcfg.batch_size} is not a multiple of per_device_batch_size "
                        f"{tcfg.per_device_batch_size} x {world_size} process(es); change one of them")
    return max(1, tcfg.batch_size // per_step)


def training_precision(lora_enabled: bool, quantization: str, dtype, device: str):
    """(dtype to load the weights in, bf16 autocast, fp16 autocast) for a run.

    `dtype` is the resolved model dtype (`model.resolve_dtype`). Full fine-tuning always loads fp32
    weights: AdamW updates of a pure bf16/fp16 model mostly round to zero (an update of lr 2e-5 is far
    below bf16's resolution near 1), so the master weights must be fp32; on CUDA, bf16/fp16 then runs as
    autocast. LoRA keeps the base in `dtype` (it is frozen; peft keeps the adapter in fp32), QLoRA uses
    `dtype` as its compute dtype.
    """
    import torch

    load_dtype = dtype if lora_enabled or quantization != "none" else torch.float32
    cuda = device == "cuda"
    return load_dtype, cuda and dtype == torch.bfloat16, cuda and dtype == torch.float16


def _looks_like_run(out: Path) -> bool:
    return any((out / f).exists() for f in ("config.yaml", "log.jsonl", "run_info.json")) or \
        any(out.glob(f"{CHECKPOINT_PREFIX}*"))


def _check_overwrite(out: Path, base_model: str, is_main: bool) -> None:
    """--overwrite deletes `out`: only when it is a run directory, and never a base model (or a folder holding it).
    The content check runs on rank 0 only: another rank could look while rank 0 is already deleting
    (torchrun then stops the other ranks when rank 0 fails)."""
    target = out.resolve()
    base = Path(base_model).expanduser()
    if base_model and base.is_dir():
        base = base.resolve()
        if base == target or target in base.parents:
            raise UserError(f"--overwrite: train.output_dir '{out}' is (or contains) the base model "
                            f"'{base_model}'; it will not be deleted. Pick another train.output_dir")
    if is_main and not _looks_like_run(out):
        raise UserError(f"--overwrite: '{out}' does not look like a domaintune run directory (no config.yaml, "
                        "log.jsonl, run_info.json or checkpoint-*), so it will not be deleted. Pick another "
                        "train.output_dir, or delete the folder by hand")


def _prepare_output_dir(out: Path, resume: bool, overwrite: bool, is_main: bool, base_model: str) -> Path | None:
    ckpt = latest_checkpoint(out) if resume else None
    if resume:
        if ckpt is None:
            raise UserError(f"--resume: '{out}' has no complete checkpoint to continue from; run without --resume")
        return ckpt
    busy = out.is_dir() and (any(out.glob(f"{CHECKPOINT_PREFIX}*")) or RunDir(out).has_weights())
    if busy and not overwrite:
        raise UserError(f"'{out}' already holds a run. Pass --resume to continue it, --overwrite to start afresh, "
                        "or set train.output_dir to a new folder")
    if busy:
        _check_overwrite(out, base_model, is_main)
    if busy and is_main:
        shutil.rmtree(out)
    return None


def _make_callbacks(run: RunDir, resume_step: int, template, config_yaml: str):
    """`template` and `config_yaml` (the saved config) go into every checkpoint, so a checkpoint is a run
    directory that predict/chat/serve can use with the prompt format it was trained on."""
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        """Writes log.jsonl live (rank 0), refreshes loss.png at every eval and save, and completes each
        checkpoint with template.json and config.yaml."""

        def __init__(self):
            self.t0 = time.time()
            self.offset = 0.0

        def on_train_begin(self, args, state, control, **kw):
            if not state.is_world_process_zero:
                return
            run.path.mkdir(parents=True, exist_ok=True)
            kept = [r for r in read_jsonl(run.log_path) if r.get("step", 0) <= resume_step] if resume_step else []
            self.offset = max((r.get("time", 0.0) for r in kept), default=0.0)
            write_jsonl_atomic(run.log_path, kept)
            self.t0 = time.time()

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs or "train_loss" in logs:  # the end-of-training summary
                return
            rec = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
            for k in ("loss", "eval_loss", "learning_rate", "grad_norm"):
                if k in logs:
                    rec[k] = logs[k]
            if "num_input_tokens_seen" in logs:
                rec["tokens"] = int(logs["num_input_tokens_seen"])
            rec["time"] = round(self.offset + time.time() - self.t0, 3)
            with JsonlAppender(run.log_path) as f:  # the project's one kill-safe JSONL writer
                f.write(rec)

        def _plot(self, state):
            if state.is_world_process_zero and run.log_path.is_file():
                refresh_plot(run)

        def on_evaluate(self, args, state, control, **kw):
            self._plot(state)

        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
                if ckpt.is_dir():
                    template.save(ckpt / "template.json")
                    write_atomic(ckpt / "config.yaml", config_yaml)
            self._plot(state)

    return [JsonlLog()]


def refresh_plot(run: RunDir) -> None:
    """Redraw loss.png; a plotting problem never stops training."""
    try:
        from .plot import plot_run

        plot_run(run.path)
    except Exception as e:  # noqa: BLE001 - the plot is a convenience, the run is what matters
        print(f"warning: could not draw {run.path / 'loss.png'}: {e}")


class _ListDataset:
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def run_train(cfg, resume: bool = False, overwrite: bool = False) -> Path:
    """Train as configured; returns the run directory."""
    from . import model as loader

    rank, world_size = world()
    is_main = rank == 0
    out = Path(cfg.train.output_dir)
    run = RunDir(out)
    _check_trackers(cfg.train.report_to)
    ckpt = _prepare_output_dir(out, resume, overwrite, is_main, cfg.model.name_or_path)
    # A missing model fails here, in about a second, not after the seconds torch + transformers take to import.
    loader.check_model_source(cfg.model.name_or_path, ("config.json", "tokenizer_config.json", "tokenizer.json"))

    from .data import build_datasets
    from .templates import get_template

    tok = loader.load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code, cfg.model.revision)
    template = get_template(cfg.data.template, tok)
    # Saved tokenizers (run dir, checkpoints) carry the training prompt as their chat_template, so plain
    # transformers' apply_chat_template renders what the model was trained on.
    tok.chat_template = template.chat_template_for(tok)
    data = build_datasets(cfg.data, tok, template, cfg.train.seed)
    if is_main:
        print("\n".join(data.report.summary_lines()), flush=True)

    # Imported only once the data is valid: bad data stops before the slow Trainer import and any model load.
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    device = loader.resolve_device()
    dtype = loader.resolve_dtype(cfg.model.dtype, device)
    load_dtype, bf16, fp16 = training_precision(cfg.lora.enabled, cfg.model.quantization, dtype, device)
    base = loader.load_base_model(cfg.model, device=device, dtype=load_dtype)
    # LoRA draws its new weights here, before the Trainer seeds anything: seed now, or two runs of one config differ.
    set_seed(cfg.train.seed)
    model = loader.prepare_for_training(base, cfg.lora, cfg.model.quantization, cfg.train.gradient_checkpointing)
    if is_main:
        trainable, total = loader.count_parameters(model)
        print(f"model: {cfg.model.name_or_path} ({'LoRA' if cfg.lora.enabled else 'full'}; "
              f"{trainable:,} trainable of {total:,} parameters; {str(load_dtype).replace('torch.', '')}"
              f"{' + bf16 autocast' if bf16 else ' + fp16 autocast' if fp16 else ''} on {device})", flush=True)

    t = cfg.train
    has_eval = bool(data.eval)
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=grad_accumulation(t, world_size, quiet=not is_main),
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps if t.warmup_steps is not None else t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        report_to=[] if t.report_to == ["none"] else t.report_to,
        bf16=bf16,
        fp16=fp16,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=t.dataloader_num_workers,
        dataloader_pin_memory=device == "cuda",
        # Without use_cpu, transformers (5.x) leaves a CPU torchrun in ParallelMode.NOT_PARALLEL: no DDP, no
        # gradient sync, per-process token counts.
        use_cpu=device == "cpu",
        ddp_backend=None if device == "cuda" else ("gloo" if world_size > 1 else None),
        ddp_find_unused_parameters=False if world_size > 1 else None,
        remove_unused_columns=False,
        label_names=["labels"],
        disable_tqdm=not is_main,
    )
    collator = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True,
                                      pad_to_multiple_of=8 if device == "cuda" else None)
    trainer = Trainer(model=model, args=args, data_collator=collator, train_dataset=_ListDataset(data.train),
                      eval_dataset=_ListDataset(data.eval) if has_eval else None, processing_class=tok,
                      callbacks=_make_callbacks(run, checkpoint_step(ckpt), template, saved_config(cfg).to_yaml()))
    tokens_at_start = checkpoint_tokens(ckpt)  # read now: checkpoint rotation may delete ckpt during training
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    logged_eval_at_end = any(r.get("step") == trainer.state.global_step and "eval_loss" in r
                             for r in trainer.state.log_history)  # same on every rank
    eval_metrics = trainer.evaluate() if has_eval and not logged_eval_at_end else {}
    runtime = time.time() - t0
    trainer.save_model(str(out))  # every rank calls it (needed for sharded setups); rank 0 writes

    if trainer.is_world_process_zero():
        # save_model also pickles TrainingArguments (training_args.bin); the run directory holds no pickles,
        # config.yaml is the resolved config. Checkpoints keep theirs (the Trainer's own format).
        (out / "training_args.bin").unlink(missing_ok=True)
        _write_run_files(cfg, run, tok, template, base, data.report, trainer, result, eval_metrics, runtime, world_size,
                         tokens_at_start)
        refresh_plot(run)
        print(f"run directory: {out}", flush=True)
    return out


TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
            "trackio": ("trackio",), "comet_ml": ("comet_ml",)}


def _check_trackers(report_to: list[str]) -> None:
    """A tracker named in train.report_to must be installed: say so before any work, not after loading."""
    import importlib.util

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


def saved_config(cfg):
    """The config as the run directory records it: a local base-model path becomes absolute, so later
    verbs (predict, chat, serve, export) find the base model from any working directory."""
    local = Path(cfg.model.name_or_path).expanduser()
    if not local.is_dir():
        return cfg
    model = cfg.model.model_copy(update={"name_or_path": str(local.resolve())})
    return cfg.model_copy(update={"model": model})


def tokens_per_second(tokens: int, tokens_at_start: int, runtime: float) -> float | None:
    """Throughput of this session: a resumed run counts only the tokens it trained on itself."""
    return round((tokens - tokens_at_start) / runtime, 1) if runtime > 0 else None


def _write_run_files(cfg, run, tok, template, base, report, trainer, result, eval_metrics, runtime, world_size,
                     tokens_at_start=0):
    from transformers import GenerationConfig

    from .model import model_license

    saved = saved_config(cfg)
    tok.save_pretrained(run.path)
    template.save(run.template_path)
    run.config_path.write_text(saved.to_yaml(), encoding="utf-8")
    gen = getattr(base, "generation_config", None) or GenerationConfig()
    gen = GenerationConfig(**{k: v for k, v in gen.to_dict().items() if not k.startswith("_") and k != "transformers_version"})
    stop = template.stop_token_ids(tok)
    gen.eos_token_id = stop[0] if len(stop) == 1 else stop
    gen.pad_token_id = tok.pad_token_id
    gen.save_pretrained(run.path)
    logs = run.read_log()
    train_losses = [r["loss"] for r in logs if "loss" in r]
    eval_losses = [r["eval_loss"] for r in logs if "eval_loss" in r]
    tokens = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
    run.write_json("run_info.json", {
        "base_model": saved.model.name_or_path,
        "license": model_license(saved.model.name_or_path, cfg.model.revision),
        "method": "full" if not cfg.lora.enabled else ("qlora" if cfg.model.quantization != "none" else "lora"),
        "template": template.name,
        "domaintune_version": __version__,
        "world_size": world_size,
        "data": report.to_dict(),
        "train": {
            "runtime_s": round(runtime, 2),
            "global_steps": trainer.state.global_step,
            "tokens": tokens,
            "tokens_per_second": tokens_per_second(tokens, tokens_at_start, runtime),
            "final_loss": train_losses[-1] if train_losses else None,
            "best_eval_loss": min(eval_losses) if eval_losses else None,
            "final_eval_loss": eval_metrics.get("eval_loss"),
        },
    })


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model (LoRA, QLoRA or full) as a config file says",
                       description="Train from a YAML config. Works under torchrun / accelerate launch too.")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.learning_rate=2e-4 lora.r=16 (default: none)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in train.output_dir (default: off)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an existing run in train.output_dir and start afresh; refused for a folder that is "
                        "not a run directory or that holds the base model (default: off)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(a) -> int:
    from .config import load_config

    run_train(load_config(a.config, a.overrides), resume=a.resume, overwrite=a.overwrite)
    return 0
