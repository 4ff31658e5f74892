"""The run directory a training run writes: its preparation (fresh, resumed or overwritten) and the files
written at the end (tokenizer, template, resolved config, generation config, run_info.json)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import UserError
from ..rundir import CHECKPOINT_PREFIX, RUN_INFO, RunDir, latest_checkpoint

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


def prepare_output_dir(out: Path, resume: bool, overwrite: bool, is_main: bool, base_model: str) -> Path | None:
    """Check (and with `overwrite`, empty) the run directory; returns the checkpoint to resume from, if any."""
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


def saved_config(cfg: Config) -> Config:
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


def write_run_files(cfg: Config, run: RunDir, tok: PreTrainedTokenizerBase, template: Template,
                    base: PreTrainedModel, report: DataReport, trainer: Trainer, eval_metrics: dict[str, Any],
                    runtime: float, world_size: int, tokens_at_start: int = 0) -> None:
    """Everything the later verbs read, besides the weights (which the Trainer saves)."""
    from transformers import GenerationConfig

    from .model import model_license

    saved = saved_config(cfg)
    tok.save_pretrained(run.path)
    template.save(run.template_path)
    run.config_path.write_text(saved.to_yaml(), encoding="utf-8")
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
    tokens = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
    run.write_json(RUN_INFO, {
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
