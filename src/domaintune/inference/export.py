"""`domaintune export RUN --out DIR`: a standalone model directory any transformers user can load.

- LoRA / QLoRA runs: the adapter is merged into the base weights (peft `merge_and_unload`); the base is
  loaded unquantized on the CPU in the export dtype for that. Full fine-tuned runs are re-saved.
- Weights as safetensors, sharded above `max_shard_size` (default 2GB).
- The tokenizer, with `chat_template` set to the run's template (`Template.to_jinja()`), so plain
  `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` produces the training prompt.
  Boundary notes: the template's user turn already ends with the assistant prefix, so the Jinja
  template renders the same with or without `add_generation_prompt`; for tokenizers that add BOS by
  themselves (LLaMA) the exported template starts with `{{ bos_token }}`, because
  `apply_chat_template` does not add special tokens.
- `generation_config.json` from the run (EOS = the template's stop tokens, the pad token).
- `template.json`, so `domaintune chat/serve/predict` reuse the template as is.
- `README.md`, a model card: base model, license, data, training figures, metrics, how to load.
- Written into `OUT.partial` beside `OUT` and swapped in when complete: a previous export (--overwrite) stays
  whole until the new one is, and a failed or killed export leaves nothing at `OUT` that blocks a rerun (the
  rerun removes the unfinished folder). Files get the umask's mode, 0644 typically (safetensors makes 0600).
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .. import console
from ..errors import UserError
from ..jsonl import disk_error, fsync_path
from ..rundir import (
    GENERATION_CONFIG,
    METRICS,
    MODEL_CARD,
    MODEL_CONFIG,
    MODEL_WEIGHTS_GLOB,
    TEMPLATE,
    RunDir,
    new_file_mode,
    paths_overlap,
)
from ..training.precision import DTYPES

if TYPE_CHECKING:
    import torch

    from .loading import RunSource

PARTIAL = ".partial"  # OUT.partial: the export being written
REPLACED = ".replaced"  # OUT.replaced: the previous export, during the swap


@dataclass
class Merged:
    """A run loaded for export: one standalone model (adapter merged) on the CPU."""

    run: RunDir
    model: Any  # a PreTrainedModel, no adapter
    tokenizer: Any
    template: Any  # data.templates.Template
    dtype: torch.dtype
    how: str  # "LoRA adapter merged into the base weights" or "full fine-tuning"


def load_merged(run: str | Path, dtype: str, template: str | None, allow_pickle: bool,
                check_out: Callable[[Path], None],
                precheck: Callable[[RunSource, Any], None] | None = None) -> Merged:
    """Check the run and, with `check_out(run path)`, the output, and with `precheck(run source, tokenizer)`
    what a format needs of the model (all before any weights load), then load the run on the CPU in `dtype`
    with its adapter merged. Shared by the safetensors and the GGUF export."""
    from .loading import inspect_run, load_run

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    src = inspect_run(run, allow_pickle=allow_pickle)  # a missing directory or weights stop here, before any load
    rd = RunDir(src.path)
    check_out(rd.path)
    if precheck is not None:
        from ..training.model import load_tokenizer

        precheck(src, load_tokenizer(str(rd.path), trust_remote_code=src.trust_remote_code))
    revision = src.base.revision if src.adapter and src.base else None
    torch_dtype = _torch_dtype(dtype, src.weights_source, revision)
    # The base is loaded unquantized on the CPU, so a QLoRA adapter merges into real weights.
    loaded = load_run(src, template=template, device="cpu", dtype=torch_dtype, merge=True, unquantized=True,
                      allow_pickle=allow_pickle)
    how = "LoRA adapter merged into the base weights" if loaded.merged else "full fine-tuning"
    tpl = loaded.template
    if src.config is not None and src.config.data.system:
        # Training put data.system into every row without a system message: the export's default system
        # prompt is that one, not the template's (for a tokenizer template, chat_template_for writes it into the
        # exported chat_template).
        tpl = replace(tpl, default_system=src.config.data.system)
    return Merged(rd, loaded.model.to(torch_dtype), loaded.tokenizer, tpl, torch_dtype, how)


def run_export(run: str | Path, out: str | Path, dtype: str = "auto", max_shard_size: str = "2GB",
               overwrite: bool = False, template: str | None = None, allow_pickle: bool = False) -> Path:
    """Merge/copy the run's weights into `out` with tokenizer, chat template, generation config and card.

    The export is written into the sibling folder `OUT.partial` and swapped in when complete, so a previous
    export (`overwrite`) stays whole until then, and a failed or killed export never leaves a folder at `out`.
    A full disk (or a read-only, forbidden folder) ends with one line naming the file, the old export intact."""
    out = Path(out)
    m = load_merged(run, dtype, template, allow_pickle, lambda run_path: check_out(run_path, out, overwrite))
    torch_dtype = str(m.dtype).replace("torch.", "")
    partial = out.with_name(out.name + PARTIAL)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial.mkdir()
        _write_export(m, partial, out, max_shard_size)
        _swap_in(partial, out)
    except BaseException as e:
        shutil.rmtree(partial, ignore_errors=True)
        kept = f"'{out}' is unchanged" if out.exists() else "nothing was written"
        err = disk_error(e, partial, f"The export needs about {_weights_mb(m.model)} MB for its weights; {kept}. "
                                     "Free some space (or choose another --out) and run the same command again")
        if err is None:
            raise
        raise err from None
    print(f"exported {m.run.path} -> {out} ({m.how}; {torch_dtype})")
    return out


def _write_export(m: Merged, folder: Path, out: Path, max_shard_size: str) -> None:
    """Every file of the export into `folder`; the model card names `out`. template.json comes first, so a
    folder an export left when killed is recognisably one (`_is_export`). Every file is fsynced, so the swap
    never installs a folder whose data is still only in memory, and has the mode the umask gives new files
    (safetensors writes its files 0600)."""
    from transformers import GenerationConfig

    m.template.save(folder / TEMPLATE)
    m.model.save_pretrained(folder, max_shard_size=max_shard_size)
    if not any(folder.glob(MODEL_WEIGHTS_GLOB)):
        raise UserError(f"transformers wrote no safetensors weights into '{folder}'; upgrade transformers")
    if (m.run.path / GENERATION_CONFIG).is_file():
        GenerationConfig.from_pretrained(m.run.path).save_pretrained(folder)
    m.tokenizer.chat_template = m.template.chat_template_for(m.tokenizer)
    m.tokenizer.save_pretrained(folder)
    (folder / MODEL_CARD).write_text(model_card(m.run, out, m.template.name, m.how,
                                                str(m.dtype).replace("torch.", "")), encoding="utf-8")
    mode = new_file_mode()
    for f in folder.iterdir():
        f.chmod(mode)
        fsync_path(f)


def _swap_in(partial: Path, out: Path) -> None:
    """Replace `out` (a previous export, an empty folder, or nothing) by the complete `partial`. A kill between
    the two renames leaves OUT.replaced and no OUT: the next export puts it back first (`_finish_swap`)."""
    if not out.exists():
        os.replace(partial, out)
        return
    old = out.with_name(out.name + REPLACED)
    os.replace(out, old)
    try:
        os.replace(partial, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _is_export(folder: Path) -> bool:
    """An empty folder, or one holding config.json or template.json: what an export writes first."""
    return folder.is_dir() and (not any(folder.iterdir()) or (folder / MODEL_CONFIG).is_file()
                                or (folder / TEMPLATE).is_file())


def _finish_swap(out: Path) -> None:
    """Undo what a killed export left beside `out`: its unfinished OUT.partial is removed, and a previous
    export it had moved aside (OUT.replaced) is put back, or removed when the new one was already in place.
    A folder of those names that is not an export is refused, never deleted."""
    for leftover in (out.with_name(out.name + PARTIAL), out.with_name(out.name + REPLACED)):
        if not leftover.exists():
            continue
        if not _is_export(leftover):
            raise UserError(f"'{leftover}' is in the way of the export to '{out}' and is not one an interrupted "
                            "export left: move it away, or choose another --out")
        if leftover.name.endswith(REPLACED) and not out.exists():
            os.replace(leftover, out)
            console.note(f"'{out}': put back the previous export, which an interrupted export had moved to "
                         f"'{leftover}'")
        else:
            shutil.rmtree(leftover)
            console.note(f"removed '{leftover}', left by an interrupted export")


def _weights_mb(model: Any) -> int:
    return math.ceil(sum(p.numel() * p.element_size() for p in model.state_dict().values()) / 2**20)


def check_outside(run: Path, out: Path) -> None:
    if paths_overlap(run, out):
        raise UserError(f"--out '{out}' must be outside the run directory '{run}' (and must not contain it)")


def check_out(run: Path, out: Path, overwrite: bool) -> None:
    """Refuse an `out` inside the run (or holding it), a file, or a non-empty folder; with `overwrite`, a
    non-empty folder only when it holds a previous export (config.json or template.json), so a mistyped path
    is never emptied. What a killed export left beside `out` is cleaned up first (`_finish_swap`)."""
    check_outside(run, out)
    _finish_swap(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out '{out}' is not empty: choose a new folder "
                            "or pass --overwrite to replace its contents")
        if not _is_export(out):  # guard against rm -rf of a wrong path
            raise UserError(f"--out '{out}' is not empty and does not look like a model export (no config.json): "
                            "refusing to delete it even with --overwrite; choose a new folder")


def _torch_dtype(name: str, name_or_path: str, revision: str | None = None) -> torch.dtype:
    """The export dtype; auto = the dtype the base checkpoint was saved in (its config.json, from a local
    directory or, for a hub id, the Hugging Face cache), fp32 when it says none or is not available."""
    from ..training.model import base_config_dict
    from ..training.precision import resolve_dtype

    if name != "auto":
        return resolve_dtype(name, "cpu")
    conf = base_config_dict(name_or_path, revision) or {}
    saved = conf.get("dtype") or conf.get("torch_dtype")
    return resolve_dtype({"bfloat16": "bf16", "float16": "fp16"}.get(str(saved), "fp32"), "cpu")


def model_card(rd: RunDir, out: Path, template: str, how: str, dtype: str) -> str:
    """README.md with YAML front matter (base_model when it is a hub id, license, tags) and a short body; a
    local base model is named by its folder and kind, never by a path of this machine."""
    import yaml

    from ..training.model import describe_base_model

    info = rd.run_info()
    hub_id, base = describe_base_model(info["base_model"]) if info.get("base_model") else (None, "an unrecorded model")
    meta: dict = {"base_model": hub_id} if hub_id else {}
    if info.get("license"):
        meta["license"] = info["license"]
    meta.update({"library_name": "transformers", "pipeline_tag": "text-generation",
                 "tags": ["domaintune", info.get("method") or "fine-tuned", template]})
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip(), "---",
             f"# {out.resolve().name}", "",
             f"Fine-tuned from {base} with domaintune ({how}), saved as safetensors in {dtype}.", ""]
    if not info.get("license"):
        lines += ["License: not stated by the base model's card; "
                  "check the base model's license before using this model.", ""]
    data, train = info.get("data") or {}, info.get("train") or {}
    lines += ["## Training data", ""]
    if data:
        lines.append(f"- file: `{data.get('path')}`; rows: {data.get('train_rows')} train, "
                     f"{data.get('eval_rows')} validation")
        tl = data.get("token_lengths") or {}
        if tl:
            lines.append(f"- tokens per sample: min {tl.get('min')}, median {tl.get('median')}, "
                         f"p95 {tl.get('p95')}, max {tl.get('max')}")
    else:
        lines.append("- not recorded (no run_info.json)")
    lines.append(f"- prompt template: `{template}` "
                 "(template.json; the tokenizer's chat_template renders the same prompt)")
    if train:
        lines += ["", "## Training", "",
                  f"- method: {info.get('method')}; steps: {train.get('global_steps')}; tokens: {train.get('tokens')}; "
                  f"runtime: {train.get('runtime_s')} s",
                  f"- final training loss: {train.get('final_loss')}; "
                  f"best validation loss: {train.get('best_eval_loss')}"]
    if (rd.path / METRICS).is_file():
        metrics = rd.read_json(METRICS)
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in metrics.items() if not isinstance(v, dict)]
        judged = metrics.get("judge", {}).get("pairwise") if isinstance(metrics.get("judge"), dict) else None
        if isinstance(judged, dict):
            lo, hi = (judged.get("win_rate_ci95") or [None, None])[:2]
            lines.append(f"| judged win-rate vs the base model | {judged.get('win_rate')} (95% interval {lo} to "
                         f"{hi}; {judged.get('wins')} wins, {judged.get('ties')} ties, "
                         f"{judged.get('losses')} losses) |")
        bench = metrics.get("benchmark", {}).get("tasks") if isinstance(metrics.get("benchmark"), dict) else None
        for task, t in (bench or {}).items():
            if isinstance(t, dict) and isinstance(t.get("tuned"), dict):
                lines.append(f"| {task} accuracy (base -> tuned) | {t.get('base', {}).get('acc')} -> "
                             f"{t['tuned'].get('acc')} |")
    lines += ["", "## How to use", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'tok = AutoTokenizer.from_pretrained("{out.resolve().name}")',
              f'model = AutoModelForCausalLM.from_pretrained("{out.resolve().name}")',
              'messages = [{"role": "user", "content": "..."}]',
              "ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
              "return_dict=True)",
              "out = model.generate(**ids, max_new_tokens=256)",
              "print(tok.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True))", "```", "",
              f"Or with domaintune: `domaintune chat {out}` / `domaintune serve {out}`.", ""]
    return "\n".join(lines)
