"""The LoRA variants of the `lora` section, over PEFT: DoRA (`use_dora`), rsLoRA (`use_rslora`), the adapter's
initialisation (`init`: default, gaussian, pissa, olora, loftq), `modules_to_save` and `layers`.

- `peft_config`: PEFT's LoraConfig for a model. `lora.layers` becomes `layers_to_transform`; PEFT refuses it beside
  `target_modules: all-linear` (a string), so all-linear is spelled out as the names of the linear modules inside
  the transformer layers (what PEFT's all-linear picks: never the output layer).
- `check_lora_choices`: the combinations refused before any model loads, each with the reason.
- PiSSA and OLoRA move the adapter's starting directions out of the base weights (W = W_res + B0 A0), so their
  adapter only fits the residual base. As PEFT documents, the initial adapter is saved before training
  (`save_initial_adapter`, into the run's `initial_adapter/`) and the final one is converted against it
  (`save_final_adapter`: save_pretrained(..., path_initial_model_for_weight_conversion=...)), which gives a plain
  LoRA adapter of twice the rank, B A - B0 A0, for the ORIGINAL base: predict, serve, export and vLLM load it as any
  other adapter.
- Resume and checkpoints: a run, fresh or resumed, loads the original base and builds the adapter again: the SVD
  (PiSSA) or QR (OLoRA) of the same weights gives the same residual base and the same B0 A0, and the Trainer then
  loads the checkpoint's A and B into it (the adapter exists already, so PEFT only copies the weights). A
  checkpoint's adapter_config.json keeps `init_lora_weights: pissa`, so loading a checkpoint on the original base
  (predict on `checkpoint-N/`) rebuilds the same residual before its weights are copied in.
- LoftQ initialises the adapter against a 4-bit quantization of the base: bitsandbytes on CUDA, with
  `model.quantization: 4bit` (PEFT's replace_lora_weights_loftq on the quantized model, which reads the original
  weights from the model's safetensors).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError

if TYPE_CHECKING:
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel
    from transformers import PreTrainedModel

    from ..config import Config, LoraConfig

INITIAL_ADAPTER = "initial_adapter"  # the run directory's PiSSA/OLoRA adapter before training (PEFT's "pissa_init")
RESIDUAL_INITS = ("pissa", "olora")  # the initialisations that change the base weights
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def check_lora_choices(cfg: Config) -> None:
    """UserError for a `lora` section that cannot run as asked, read from the config alone (before the model loads)."""
    lora = cfg.lora
    if not lora.enabled:
        return
    if lora.init == "loftq":
        _check_loftq(cfg.model.quantization)
    if lora.init in RESIDUAL_INITS:
        if lora.use_dora:
            raise UserError(f"lora.init {lora.init} with lora.use_dora: the {lora.init} adapter is converted after "
                            "training to apply to the original base, and PEFT's conversion has no place for DoRA's "
                            "magnitudes; set lora.use_dora: false or lora.init: default")
        if cfg.model.quantization != "none":
            raise UserError(f"lora.init {lora.init} with model.quantization {cfg.model.quantization}: the adapter "
                            "takes its directions out of the base weights, and a quantized residual no longer adds up "
                            "to the base (PEFT warns the converted adapter then misses); set model.quantization: none, "
                            "or use lora.init: loftq for a quantized base")
        if cfg.train.distributed != "ddp":
            raise UserError(f"lora.init {lora.init} with train.distributed {cfg.train.distributed}: the adapter is "
                            "converted for the original base at the end in one process, from the whole adapter, "
                            "which a sharded model does not hold; use train.distributed: ddp (or lora.init: default)")
        if cfg.train.stage != "sft":
            raise UserError(f"lora.init {lora.init} with train.stage {cfg.train.stage}: the preference stages take "
                            "the reference model as the model with its adapters off, which here is the residual base, "
                            "not the base; train the SFT run with lora.init pissa/olora, then continue it with "
                            "lora.init: default")


def _check_loftq(quantization: str) -> None:
    import importlib.util

    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("lora.init loftq initialises the adapter against a 4-bit (NF4) quantization of the base, "
                        "which PEFT computes with bitsandbytes on a CUDA GPU; this machine has "
                        f"{'no CUDA GPU' if not torch.cuda.is_available() else 'no bitsandbytes'}. On CPU use "
                        "lora.init: default (or pissa); on a GPU pip install 'domaintune[qlora]'")
    if quantization != "4bit":
        raise UserError(f"lora.init loftq fits the adapter to the 4-bit base it trains on: set model.quantization: "
                        f"4bit (it is {quantization})")


def linear_targets(model: PreTrainedModel, layers: list[int] | None = None) -> list[str]:
    """The names (last part) of the linear modules inside the model's numbered layers (in `layers` only, when
    given): all-linear spelled out, as PEFT's all-linear never includes the output layer."""
    import torch
    from transformers.pytorch_utils import Conv1D

    names = set()
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, Conv1D)):
            continue
        m = _LAYER_INDEX.search(name)
        if m and (layers is None or int(m.group(1)) in layers):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def _check_names(model: PreTrainedModel, lora: LoraConfig) -> None:
    """modules_to_save and layers name what the model has. A modules_to_save name matches as PEFT matches it, by
    the end of the module's dotted name (`norm` is also every `input_layernorm`; `model.norm` is the one)."""
    names = [n for n, _ in model.named_modules() if n]
    missing = [m for m in lora.modules_to_save or [] if not any(n == m or n.endswith(m) for n in names)]
    if missing:
        top = sorted({n for n, _ in model.named_children()} | {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                                             if n and not list(m.children())})
        raise UserError(f"lora.modules_to_save {missing}: no module of that name in this model; its modules "
                        f"include {top[:20]}")
    if lora.layers:
        n_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
        bad = [i for i in lora.layers if i < 0 or (isinstance(n_layers, int) and i >= n_layers)]
        if bad:
            raise UserError(f"lora.layers {bad}: this model has layers 0 to {n_layers - 1 if n_layers else '?'}")


def peft_config(model: PreTrainedModel, lora: LoraConfig) -> PeftLoraConfig:
    """PEFT's LoraConfig for `model` from the `lora` section (see the module docstring)."""
    from peft import LoraConfig as PeftLoraConfig

    _check_names(model, lora)
    targets: str | list[str] = lora.target_modules if lora.target_modules == "all-linear" else list(lora.target_modules)
    if lora.layers and targets == "all-linear":
        targets = linear_targets(model, lora.layers)
    init: bool | str = {"default": True, "loftq": True}.get(lora.init, lora.init)  # loftq: see apply_loftq
    # peft annotates lora_alpha as int, but only divides by it (alpha / r): a fractional alpha scales as meant.
    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,  # type: ignore[arg-type]
                          target_modules=targets, bias="none", task_type="CAUSAL_LM", use_dora=lora.use_dora,
                          use_rslora=lora.use_rslora, init_lora_weights=init,  # type: ignore[arg-type]
                          modules_to_save=list(lora.modules_to_save) if lora.modules_to_save else None,
                          layers_to_transform=list(lora.layers) if lora.layers else None,
                          # a trained copy of a tied lm_head / embed_tokens stays tied to the other, so the merged
                          # export (which ties them again on load) is the model that was trained
                          ensure_weight_tying=_saves_tied_embeddings(model, lora.modules_to_save or []))


def _saves_tied_embeddings(model: PreTrainedModel, modules_to_save: list[str]) -> bool:
    """Whether the model ties its input and output embeddings and `modules_to_save` names one of them."""
    conf = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not getattr(conf, "tie_word_embeddings", False):
        return False
    tied = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    return any(id(m) in tied for n, m in model.named_modules() for want in modules_to_save
               if n == want or n.endswith(want))


def build_peft_model(model: PreTrainedModel, lora: LoraConfig) -> PeftModel:
    """The base wrapped with a new adapter as `lora` asks; a target that matches nothing is a UserError naming the
    model's linear modules."""
    from peft import get_peft_model

    pcfg = peft_config(model, lora)
    try:
        peft_model = get_peft_model(model, pcfg)
    except ValueError as e:
        names = sorted({n.split(".")[-1] for n, m in model.named_modules() if m.__class__.__name__.endswith("Linear")})
        raise UserError(f"lora.target_modules {lora.target_modules}: {e}. Linear modules of this model: "
                        f"{names}") from None
    if lora.init == "loftq":
        apply_loftq(peft_model)
    return peft_model


def apply_loftq(peft_model: PeftModel) -> None:
    """LoftQ on a 4-bit base (check_lora_choices made sure of bitsandbytes, CUDA and 4bit): PEFT sets each adapter
    so that the quantized weight plus the adapter is closest to the original weight, read from the model's
    safetensors files."""
    from peft import replace_lora_weights_loftq

    replace_lora_weights_loftq(peft_model)


def save_initial_adapter(model: Any, out: Path, lora: LoraConfig, is_main: bool) -> None:
    """PiSSA/OLoRA: write the adapter as built, before training, into `out/initial_adapter` (each start writes the
    same one again: the same base gives the same decomposition). Nothing for the other initialisations."""
    if not lora.enabled or lora.init not in RESIDUAL_INITS or not is_main:
        return
    model.save_pretrained(str(out / INITIAL_ADAPTER))


def save_final_adapter(model: Any, out: Path, lora: LoraConfig) -> None:
    """PiSSA/OLoRA: save the trained adapter into `out` again, converted against `out/initial_adapter` so it applies
    to the original base (rank 2r; PEFT's documented conversion). Call on the main process after the Trainer saved
    the run's weights; nothing for the other initialisations."""
    if not lora.enabled or lora.init not in RESIDUAL_INITS:
        return
    initial = out / INITIAL_ADAPTER
    if not (initial / "adapter_model.safetensors").is_file():
        raise RuntimeError(f"{initial} is missing: save_initial_adapter writes it when the model is built")
    import warnings

    with warnings.catch_warnings():  # PEFT loads the initial adapter beside the trained one for the conversion and
        # warns that PiSSA/OLoRA "should not be used with other adapters": this conversion is what it recommends
        warnings.filterwarnings("ignore", message=r".* changes the base weights of the model")
        model.save_pretrained(str(out), path_initial_model_for_weight_conversion=str(initial))
