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
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .errors import UserError
from .rundir import METRICS, RunDir

DTYPES = ("auto", "bf16", "fp16", "fp32")


def run_export(run: str | Path, out: str | Path, dtype: str = "auto", max_shard_size: str = "2GB",
               overwrite: bool = False, template: str | None = None) -> Path:
    """Merge/copy the run's weights into `out` with tokenizer, chat template, generation config and card."""
    from transformers import GenerationConfig

    from . import model as loader
    from .config import load_config
    from .rundir import base_model_config, resolve_template

    rd, out = RunDir(run), Path(out)
    if not rd.path.is_dir():
        raise UserError(f"'{rd.path}' is not a directory: give a run directory")
    if not rd.has_weights():
        raise UserError(f"'{rd.path}' has no final weights (adapter_model.safetensors + adapter_config.json, or "
                        "config.json + model*.safetensors). Did training finish?")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    _check_out(rd.path, out, overwrite)

    cfg = load_config(rd.config_path) if rd.config_path.is_file() else None
    trust = bool(cfg and cfg.model.trust_remote_code)
    tok = loader.load_tokenizer(str(rd.path), trust_remote_code=trust)
    tpl = resolve_template(rd.path, tok, template)

    if rd.has_adapter():
        model_cfg = base_model_config(rd.path, cfg)
        model_cfg = model_cfg.model_copy(update={"quantization": "none"})  # merge into unquantized weights
        torch_dtype = _torch_dtype(dtype, model_cfg.name_or_path, model_cfg.revision)
        base = loader.load_base_model(model_cfg, device="cpu", dtype=torch_dtype)
        model = loader.load_adapter(base, rd.path).merge_and_unload()
        how = "LoRA adapter merged into the base weights"
    else:
        torch_dtype = _torch_dtype(dtype, str(rd.path))
        model = loader.load_plain_model(rd.path, dtype=torch_dtype, device="cpu", trust_remote_code=trust)
        how = "full fine-tuning"
    model = model.to(torch_dtype)

    if out.exists() and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    if not any(out.glob("model*.safetensors")):
        raise UserError(f"transformers wrote no safetensors weights into '{out}'; upgrade transformers")
    if (rd.path / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(rd.path).save_pretrained(out)
    tok.chat_template = tpl.chat_template_for(tok)
    tok.save_pretrained(out)
    tpl.save(out / "template.json")
    (out / "README.md").write_text(model_card(rd, out, tpl.name, how, str(torch_dtype).replace("torch.", "")),
                                   encoding="utf-8")
    print(f"exported {rd.path} -> {out} ({how}; {str(torch_dtype).replace('torch.', '')})")
    return out


def _check_out(run: Path, out: Path, overwrite: bool) -> None:
    r, o = run.resolve(), out.resolve()
    if o == r or r.is_relative_to(o) or o.is_relative_to(r):
        raise UserError(f"--out '{out}' must be outside the run directory '{run}' (and must not contain it)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out '{out}' is not empty: choose a new folder or pass --overwrite to replace its contents")
        if not ((out / "config.json").is_file() or (out / "template.json").is_file()):  # guard against rm -rf of a wrong path
            raise UserError(f"--out '{out}' is not empty and does not look like a model export (no config.json): "
                            "refusing to delete it even with --overwrite; choose a new folder")


def _torch_dtype(name: str, name_or_path: str, revision: str | None = None):
    """The export dtype; auto = the dtype the base checkpoint was saved in (its config.json, from a local
    directory or, for a hub id, the Hugging Face cache), fp32 when it says none or is not available."""
    from . import model as loader

    if name != "auto":
        return loader.resolve_dtype(name, "cpu")
    conf = loader.base_config_dict(name_or_path, revision) or {}
    saved = conf.get("dtype") or conf.get("torch_dtype")
    return loader.resolve_dtype({"bfloat16": "bf16", "float16": "fp16"}.get(saved, "fp32"), "cpu")


def model_card(rd: RunDir, out: Path, template: str, how: str, dtype: str) -> str:
    """README.md with YAML front matter (base_model, license, tags) and a short body."""
    import yaml

    info = rd.run_info()
    base = info.get("base_model") or "unknown"
    meta = {"base_model": base}
    if info.get("license"):
        meta["license"] = info["license"]
    meta.update({"library_name": "transformers", "pipeline_tag": "text-generation",
                 "tags": ["domaintune", info.get("method") or "fine-tuned", template]})
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip(), "---",
             f"# {out.resolve().name}", "",
             f"Fine-tuned from `{base}` with domaintune ({how}), saved as safetensors in {dtype}.", ""]
    if not info.get("license"):
        lines += ["License: not stated by the base model's card; check the base model's license before using this model.", ""]
    data, train = info.get("data") or {}, info.get("train") or {}
    lines += ["## Training data", ""]
    if data:
        lines.append(f"- file: `{data.get('path')}`; rows: {data.get('train_rows')} train, {data.get('eval_rows')} validation")
        tl = data.get("token_lengths") or {}
        if tl:
            lines.append(f"- tokens per sample: min {tl.get('min')}, median {tl.get('median')}, p95 {tl.get('p95')}, max {tl.get('max')}")
    else:
        lines.append("- not recorded (no run_info.json)")
    lines.append(f"- prompt template: `{template}` (template.json; the tokenizer's chat_template renders the same prompt)")
    if train:
        lines += ["", "## Training", "",
                  f"- method: {info.get('method')}; steps: {train.get('global_steps')}; tokens: {train.get('tokens')}; "
                  f"runtime: {train.get('runtime_s')} s",
                  f"- final training loss: {train.get('final_loss')}; best validation loss: {train.get('best_eval_loss')}"]
    if (rd.path / METRICS).is_file():
        metrics = rd.read_json(METRICS)
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in metrics.items()]
    lines += ["", "## How to use", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'tok = AutoTokenizer.from_pretrained("{out.resolve().name}")',
              f'model = AutoModelForCausalLM.from_pretrained("{out.resolve().name}")',
              'messages = [{"role": "user", "content": "..."}]',
              "ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)",
              "out = model.generate(**ids, max_new_tokens=256)",
              "print(tok.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True))", "```", "",
              f"Or with domaintune: `domaintune chat {out}` / `domaintune serve {out}`.", ""]
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="merge LoRA into the base model and save a standalone model directory",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory (LoRA, QLoRA or full fine-tuning)")
    p.add_argument("--out", required=True, help="output directory, new or empty (required)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weight dtype of the export; auto = the base checkpoint's dtype, fp32 if unstated (default: %(default)s)")
    p.add_argument("--max-shard-size", default="2GB", help="split weights into safetensors shards of at most this size (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous export in --out (a folder with config.json or template.json) (default: off)")
    p.add_argument("--template", default=None,
                   help="template for a run without template.json (default: the run's template.json)")
    p.set_defaults(func=lambda a: (run_export(a.run, a.out, a.dtype, a.max_shard_size, a.overwrite, a.template), 0)[1])
