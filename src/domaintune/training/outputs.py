"""The run directory a training run writes: its preparation (fresh, resumed or overwritten) and the files
written at the end (tokenizer, template, resolved config, generation config, run_info.json)."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__, console
from ..errors import UserError
from ..jsonl import write_atomic
from ..jsonl import write_failure as jsonl_write_failure
from ..rundir import (
    CHECKPOINT_PREFIX,
    CHECKPOINT_WORLD,
    MODEL_CARD,
    RUN_INFO,
    RunDir,
    checkpoint_progress,
    latest_checkpoint,
    list_checkpoints,
    new_file_mode,
)

PROBE_BYTES = 1 << 20  # written and removed before training: a full disk shows here

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

    from ..config import Config
    from ..data.encode import DataReport
    from ..data.templates import Template


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
    if is_main and not RunDir(out).looks_like_run():
        raise UserError(f"--overwrite: '{out}' does not look like a domaintune run directory (no config.yaml, "
                        "log.jsonl, run_info.json or checkpoint-*), so it will not be deleted. Pick another "
                        "train.output_dir, or delete the folder by hand")


def _entries(out: Path) -> list[Path]:
    """What a folder holds, hidden files (.DS_Store, .gitkeep, ...) aside."""
    return sorted(p for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []


def _remove_torn_checkpoints(out: Path) -> list[str]:
    """Delete checkpoint folders a kill left half-written (no trainer_state.json): a resumed run writes those
    steps again, and must not mix old files into them."""
    complete = set(list_checkpoints(out))
    torn = [d for d in out.glob(f"{CHECKPOINT_PREFIX}*") if d.is_dir() and d not in complete]
    for d in torn:
        shutil.rmtree(d)
    return sorted(d.name for d in torn)


def prepare_output_dir(out: Path, resume: bool, overwrite: bool, is_main: bool, base_model: str) -> Path | None:
    """Check (and with `overwrite`, empty) the run directory; returns the checkpoint to resume from, if any.

    - A new or empty folder (hidden files aside) is used as it is; `--resume` then says it starts afresh.
    - A folder that holds other things than a domaintune run is refused, with or without flags.
    - A run is continued with `resume` (from its newest complete checkpoint, or from the beginning when a
      kill came before the first checkpoint was complete; either is said on stderr) or replaced with `overwrite`.
    - `resume` of a finished run raises AlreadyComplete: nothing to do, and nothing is touched.
    Only rank 0 deletes anything."""
    if resume and overwrite:
        raise UserError("--resume continues the run in train.output_dir and --overwrite deletes it: pass one of them")
    if out.exists() and not out.is_dir():
        raise UserError(f"train.output_dir '{out}' is a file, not a folder: set train.output_dir to a new folder")
    entries = _entries(out)
    run = RunDir(out)
    if entries and overwrite:
        _check_overwrite(out, base_model, is_main)
        if is_main:
            shutil.rmtree(out)
        return None
    if entries and not run.looks_like_run():
        shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:5])
        more = f" and {len(entries) - 5} more" if len(entries) > 5 else ""
        raise UserError(f"train.output_dir '{out}' is not empty and holds no domaintune run ({shown}{more}): "
                        "training would write its files among them. Set train.output_dir to a new or empty "
                        f"folder, e.g. {out / 'my-run'}")
    if not resume:
        if entries:
            raise UserError(f"'{out}' already holds a run. Pass --resume to continue it, --overwrite to start "
                            "afresh, or set train.output_dir to a new folder")
        return None
    if run.is_finished():  # checked first: nothing of a finished run may change
        steps = run.run_info()["train"]["global_steps"]
        raise AlreadyComplete(f"--resume: '{out}' is already complete ({steps} steps trained; its final weights and "
                              f"{RUN_INFO} are written): nothing to train, nothing was changed. To train it again "
                              "from the start, pass --overwrite instead (or set train.output_dir to a new folder)")
    ckpt = latest_checkpoint(out)
    if ckpt is None and run.has_weights():
        raise UserError(f"--resume: '{out}' holds final weights but no {RUN_INFO} and no checkpoint to continue "
                        "from; pass --overwrite to train it again, or set train.output_dir to a new folder")
    torn = _remove_torn_checkpoints(out) if is_main and entries else []
    if is_main:
        if torn and ckpt is not None:
            console.note(f"--resume: removed {', '.join(torn)}, left half-written by the interruption")
        console.note(resume_line(out, ckpt, bool(entries), torn))
    return ckpt


class AlreadyComplete(Exception):
    """`--resume` of a run that finished: nothing to do (the message says so)."""


def resume_line(out: Path, ckpt: Path | None, had_entries: bool, torn: list[str]) -> str:
    """What `--resume` starts from: the checkpoint and its step, or the beginning and why (`torn`: the
    half-written checkpoints just removed)."""
    if ckpt is None:
        why = (f"the run was stopped before its first checkpoint was complete; removed {', '.join(torn)}" if torn else
               "the run was stopped before its first checkpoint" if had_entries else "the folder is new")
        return f"--resume: '{out}' has no complete checkpoint ({why}): starting from the beginning"
    step, total = checkpoint_progress(ckpt)
    if total and step >= total:
        return (f"--resume: continuing from {ckpt} (step {step} of {total}): training had reached its last step "
                "before the run's final files were written; writing them now")
    return f"--resume: continuing from {ckpt} (step {step}" + (f" of {total})" if total else ")")


def check_writable(out: Path) -> None:
    """Write (and fsync) a small file where the run will go, so an unwritable folder or a full disk stops the
    run before any model loads, with a message, not after the first training steps. Nothing is left behind:
    a folder that does not exist yet is probed through its nearest existing parent, and not created here."""
    where = out
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise UserError(f"train.output_dir '{out}' cannot be created: '{where}' is a file. Set train.output_dir "
                        "to another folder")
    probe = where / f".domaintune-write-test-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        hint = "the disk is full: free some space or" if full else "fix its permissions or"
        raise UserError(f"train.output_dir '{out}' cannot be written ({e.strerror}): {hint} set train.output_dir "
                        "to another folder") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass


def check_resume_world(ckpt: Path, world_size: int, distributed: str) -> None:
    """Resume only where the checkpoint can be read: the same `train.distributed` engine, and for fsdp and
    deepspeed (optimizer state sharded per process) the same number of processes. ddp resumes at any count: the
    global batch is kept (train.batch_size), and a process without its own saved random state says so."""
    path = ckpt / CHECKPOINT_WORLD
    if not path.is_file():
        return  # written before domaintune recorded it
    rec = json.loads(path.read_text(encoding="utf-8"))
    was, n = rec.get("distributed", "ddp"), rec.get("world_size", 1)
    if was != distributed:
        raise UserError(f"--resume: {ckpt.name} was written with train.distributed {was}, this run uses "
                        f"{distributed}; set it back to {was}, or start afresh with --overwrite")
    if n != world_size and distributed != "ddp":
        raise UserError(f"--resume: {ckpt.name} was written by {n} process(es) with {distributed}, whose optimizer "
                        f"state is split per process; this run has {world_size}. Resume with {n} process(es), or "
                        "start afresh with --overwrite")
    if n != world_size:
        console.note(f"note: resuming {ckpt.name} (written by {n} process(es)) with {world_size}: the global batch is "
                     "kept; the data order continues, but random states saved per process only match where ranks "
                     "exist in both")


def saved_config(cfg: Config) -> Config:
    """The config as the run directory records it: a local base-model path becomes absolute, so later
    verbs (predict, chat, serve, export) find the base model from any working directory."""
    local = Path(cfg.model.required_name()).expanduser()
    if not local.is_dir():
        return cfg
    model = cfg.model.model_copy(update={"name_or_path": str(local.resolve())})
    return cfg.model_copy(update={"model": model})


def tokens_per_second(tokens: int, tokens_at_start: int, runtime: float) -> float | None:
    """Throughput of this session: a resumed run counts only the tokens it trained on itself (None when it
    trained none: a resume that only wrote the final files)."""
    return round((tokens - tokens_at_start) / runtime, 1) if runtime > 0 and tokens > tokens_at_start else None


def run_method(cfg: Config) -> str:
    """lora, qlora, freeze or full: how the run trained (run_info.json's `method`)."""
    if cfg.lora.enabled:
        return "qlora" if cfg.model.quantization != "none" else "lora"
    return "freeze" if cfg.freeze.enabled else "full"


def run_model_card(run: RunDir, base_model: str, license_: str | None, method: str, template: str, steps: int,
                   eval_loss: float | None) -> str:
    """README.md of a run directory: front matter a model hub reads (base_model only when it is a hub id: never
    a path of this machine) and a few lines on what was trained from what."""
    import yaml

    from .model import describe_base_model

    hub_id, from_what = describe_base_model(base_model)
    meta: dict[str, Any] = {"base_model": hub_id} if hub_id else {}
    if license_:
        meta["license"] = license_
    meta.update({"library_name": "transformers" if method in ("full", "freeze") else "peft",
                 "pipeline_tag": "text-generation",
                 "tags": ["domaintune", method, template]})
    what = {"full": "A full fine-tune", "freeze": "A freeze-tuned model (its last layers trained, the rest frozen)",
            "qlora": "A QLoRA adapter"}.get(method, "A LoRA adapter")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip(), "---",
             f"# {run.path.resolve().name}", "",
             f"{what} of {from_what}, trained with domaintune for {steps} steps with the `{template}` prompt "
             "template (template.json; the tokenizer's chat_template renders the same prompt).", ""]
    if eval_loss is not None:
        lines += [f"Validation loss at the end: {eval_loss:.4f}.", ""]
    if not license_:
        lines += ["License: not stated by the base model's card; check it before using this model.", ""]
    lines += ["The run's figures are in run_info.json and log.jsonl; `domaintune report` writes report.md.", ""]
    return "\n".join(lines)


def share_safetensors(folder: Path) -> None:
    """Give the .safetensors files in `folder` the mode every other file of the run gets (0644 under umask 022):
    the safetensors library writes them with 0600, so another user (a server account, a teammate) could read
    the run's config and tokenizer but not its weights."""
    mode = new_file_mode()
    for f in folder.glob("*.safetensors"):
        if f.is_file() and f.stat().st_mode & 0o777 != mode:
            os.chmod(f, mode)


def write_failure(e: BaseException) -> str | None:
    """Why a checkpoint or final write failed, naming the file, when more space or a fixed folder cures it
    (`jsonl.write_failure`, which also knows torch.save's RuntimeError and safetensors' "(os error 28)"); else
    None: a bug to show as it is."""
    why = jsonl_write_failure(e)
    return None if why is None else f"{why} ({getattr(e, 'filename', None) or 'a checkpoint file'})"


def free_space(path: Path) -> str:
    """'N MiB free' on the disk holding `path` (or its nearest existing parent); '' when it cannot be told."""
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f"{shutil.disk_usage(path).free / 2**20:,.0f} MiB free"
    except OSError:
        return ""


def write_run_files(cfg: Config, run: RunDir, tok: PreTrainedTokenizerBase, template: Template,
                    base: PreTrainedModel, report: DataReport, trainer: Trainer, eval_metrics: dict[str, Any],
                    runtime: float, world_size: int, tokens_at_start: int = 0, path: dict | None = None) -> None:
    """Everything the later verbs read, besides the weights (which the Trainer saves). `path`: the training
    path's choices (loss, batching, per-device batch, gradient checkpointing), recorded in run_info.json."""
    from transformers import GenerationConfig

    from .freeze import freeze_info
    from .model import model_license

    saved = saved_config(cfg)
    tok.save_pretrained(run.path)
    template.save(run.template_path)
    run.config_path.write_text(saved.to_yaml(omit_default_sections=True), encoding="utf-8")
    gen = getattr(base, "generation_config", None) or GenerationConfig()
    gen = GenerationConfig(**{k: v for k, v in gen.to_dict().items()
                              if not k.startswith("_") and k != "transformers_version"})
    stop = template.stop_token_ids(tok)
    gen.eos_token_id = stop[0] if len(stop) == 1 else stop
    gen.pad_token_id = tok.pad_token_id
    gen.save_pretrained(run.path)
    logs = run.read_log()
    train_losses = [r["loss"] for r in logs if "loss" in r]
    eval_losses = [r["eval_loss"] for r in logs if "eval_loss" in r]
    # The Trainer evaluates at the last step on its own when eval_steps divides it; then the caller had nothing
    # left to evaluate and the loss is the one logged at that step.
    final_eval = eval_metrics.get("eval_loss", next((r["eval_loss"] for r in reversed(logs) if "eval_loss" in r
                                                      and r.get("step") == trainer.state.global_step), None))
    tokens = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
    license_ = model_license(saved.model.required_name(), cfg.model.revision)
    method = run_method(cfg)
    # PEFT's save_pretrained left its empty card ("[More Information Needed]", base_model: an absolute path of
    # this machine) here; the run's own card replaces it.
    write_atomic(run.file(MODEL_CARD), run_model_card(run, saved.model.required_name(), license_, method, template.name,
                                                      trainer.state.global_step, final_eval))
    run.write_json(RUN_INFO, {
        "base_model": saved.model.name_or_path,
        "license": license_,
        "method": method,
        **({"freeze": freeze_info(base, cfg.freeze)} if method == "freeze" else {}),
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
            "final_eval_loss": final_eval,
            **({"path": path} if path else {}),
        },
    })


def last_good(out: Path) -> str:
    """The sentence a stopped run's message gives about its newest complete checkpoint."""
    ckpt = latest_checkpoint(out)
    return f"The last complete checkpoint, {ckpt.name}, is intact." if ckpt else "No checkpoint was complete yet."


def write_error(out: Path, e: BaseException) -> UserError | None:
    """A full disk (or a read-only folder) while writing a checkpoint or the final files into the run `out`, as one
    clear message; None for anything else (shown as it is). torch.save reports a full disk as a RuntimeError."""
    why = write_failure(e)
    if why is None:
        return None
    free = free_space(out)
    return UserError(f"writing into '{out}' failed: {why}. {last_good(out)} Free some space"
                     f"{f' ({free} now)' if free else ''} or fix the folder, then run the same command with --resume")


def interrupted_message(out: Path, step: int, save_steps: int) -> str:
    """What Ctrl-C at optimizer step `step` says: the checkpoint `--resume` continues from (the CLI adds the
    command)."""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return (f"interrupted at step {step}, before the first checkpoint (train.save_steps {save_steps}): --resume "
                "starts from the beginning")
    return (f"interrupted at step {step}. The last complete checkpoint is {ckpt} (step "
            f"{checkpoint_progress(ckpt)[0]}); --resume continues from it")
