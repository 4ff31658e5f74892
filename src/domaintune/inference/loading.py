"""`load_run()`: the one way a run (or a model directory) is loaded for use, by the Engine and by export.

A directory can be:
- a training run: config.yaml + template.json + an adapter (LoRA / QLoRA) or a full model;
- a `checkpoint-N/` folder of a run (it carries the run's template and config);
- an exported model, or any local Hugging Face model directory (then `template=` names the prompt
  format, or the tokenizer's chat_template is used).

The steps, always in this order: look at the directory without loading anything (`inspect_run`: is it
one, does it hold weights, its config.yaml, whether it asks for trust_remote_code, the base model of an
adapter) → tokenizer → template → base model → adapter (attached, or merged for export).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..rundir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODEL_CONFIG, MODEL_WEIGHTS_GLOB, RunDir, base_model_config

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from ..config import Config, ModelConfig
    from ..data.templates import Template


@dataclass(frozen=True)
class RunSource:
    """What a directory holds, read without loading any weights."""

    path: Path
    config: Config | None  # the run's config.yaml; None for a plain model directory
    adapter: bool  # LoRA weights on a base model (else a full model)
    base: ModelConfig | None  # the base model's config section: an adapter's base, or the run's model

    @property
    def trust_remote_code(self) -> bool:
        return bool(self.config and self.config.model.trust_remote_code)

    @property
    def weights_source(self) -> str:
        """Where the (base) weights come from: the adapter's base model, else this directory."""
        return self.base.required_name() if self.adapter and self.base else str(self.path)


def inspect_run(path: str | Path, base_only: bool = False, allow_pickle: bool = False) -> RunSource:
    """Check a run or model directory and read its config; raises UserError saying what is missing. A model
    folder with pickle weights only is refused here unless `allow_pickle`."""
    from ..config import load_config
    from ..training.model import check_no_pickle_only

    run = RunDir(path)
    if not run.path.is_dir():
        raise UserError(f"'{run.path}' is not a directory: give a run directory or a model directory")
    cfg = load_config(run.config_path) if run.config_path.is_file() else None
    if base_only and cfg is None:
        raise UserError(f"--base-only needs a training run directory (with config.yaml naming the base model); "
                        f"'{run.path}' is a plain model directory")
    if run.has_pickle_model():
        check_no_pickle_only(run.path, allow_pickle or bool(cfg and cfg.model.allow_pickle))
    elif not run.has_weights():
        raise UserError(f"'{run.path}' has no final weights ({ADAPTER_WEIGHTS} + {ADAPTER_CONFIG}, or "
                        f"{MODEL_CONFIG} + {MODEL_WEIGHTS_GLOB}). Did training finish? Checkpoints live in "
                        "checkpoint-*/.")
    adapter = run.has_adapter()
    base = base_model_config(run.path, cfg) if adapter else (cfg.model if cfg is not None else None)
    return RunSource(run.path, cfg, adapter, base)


@dataclass
class LoadedRun:
    """A run loaded for inference or export."""

    source: RunSource
    model: Any  # a PreTrainedModel, or a PeftModel around one
    tokenizer: PreTrainedTokenizerBase
    template: Template
    base_only: bool
    merged: bool  # the adapter was merged into the base weights


def load_run(path: str | Path | RunSource, *, base_only: bool = False, template: str | None = None,
             device: str | None = None, dtype: str | torch.dtype = "auto", merge: bool = False,
             unquantized: bool = False, allow_pickle: bool = False) -> LoadedRun:
    """Load a run or model directory (see the module docstring) in `dtype` (a config name such as "auto",
    or a torch dtype) on `device` (default: the best available), in eval mode.

    `base_only`: the base model without the run's adapter (a before/after comparison). `merge`: fold the
    adapter into the base weights (export). `unquantized`: ignore the run's model.quantization (merging
    needs real weights). `template` overrides the directory's template.json. Pickle weights (.bin) load only
    with `allow_pickle` or when the run's config allowed them for its base model (model.allow_pickle)."""
    from ..rundir import resolve_template
    from ..training import model as loader
    from ..training.precision import resolve_device, resolve_dtype

    src = path if isinstance(path, RunSource) else inspect_run(path, base_only, allow_pickle)
    device = device or resolve_device()
    torch_dtype = resolve_dtype(dtype, device) if isinstance(dtype, str) else dtype
    tok = loader.load_tokenizer(str(src.path), trust_remote_code=src.trust_remote_code)
    tpl = resolve_template(src.path, tok, template)
    allow_pickle = allow_pickle or bool(src.config and src.config.model.allow_pickle)
    base_cfg = src.base
    if base_cfg is not None:
        update = {"allow_pickle": allow_pickle} | ({"quantization": "none"} if unquantized else {})
        base_cfg = base_cfg.model_copy(update=update)
    merged = False
    model: Any  # a PreTrainedModel, or a PeftModel around one
    if src.adapter:
        assert base_cfg is not None, "inspect_run gives an adapter the config of its base"
        model = loader.load_base_model(base_cfg, device=device, dtype=torch_dtype)
        if not base_only:
            model = loader.load_adapter(model, src.path)
            if merge:
                model, merged = model.merge_and_unload(), True
    elif base_only:
        assert base_cfg is not None, "inspect_run refuses base_only without config.yaml (its model section)"
        model = loader.load_base_model(base_cfg, device=device, dtype=torch_dtype)
    else:
        model = loader.load_plain_model(src.path, dtype=torch_dtype, device=device,
                                        trust_remote_code=src.trust_remote_code, allow_pickle=allow_pickle)
    model.to(device)
    model.eval()
    return LoadedRun(src, model, tok, tpl, base_only, merged)
