"""Freeze tuning (`freeze.enabled`, with `lora.enabled: false`): full fine-tuning of the last
`freeze.last_layers` transformer layers and of the `freeze.modules` named modules; every other weight keeps
`requires_grad = False`, so the optimizer never sees it and it is saved byte for byte as loaded.

It is full fine-tuning of some weights, so it takes full fine-tuning's path everywhere else: fp32 master weights
(precision.training_precision, since lora.enabled is false), a full model in the run directory, and predict,
serve, export and GGUF as for a full run. Weights tied to a trained one (an LM head tied to the input
embeddings) are the same tensor, so they train with it.

The layers are the model's stack of transformer blocks: the `nn.ModuleList` holding `num_hidden_layers` (or
`n_layer`) blocks, found by length, so every family's naming (model.layers, transformer.h ...) works.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    import torch

    from ..config import FreezeConfig


def layer_stack(model: torch.nn.Module) -> tuple[str, int]:
    """(dotted name, length) of the model's transformer block list; a UserError when it cannot be found."""
    import torch

    conf = getattr(model, "config", None)
    text = conf.get_text_config() if conf is not None and hasattr(conf, "get_text_config") else conf
    n = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and n and len(module) == n:
            return name, n
    raise UserError("freeze: could not find this model's list of transformer layers (a ModuleList of "
                    f"num_hidden_layers={n} blocks); name the modules to train in freeze.modules and set "
                    "freeze.enabled: false, or use LoRA")


def trained_module_names(model: torch.nn.Module, cfg: FreezeConfig) -> list[str]:
    """The dotted names of the modules that freeze tuning trains: the last `cfg.last_layers` blocks, then each
    module whose name is one of `cfg.modules` or ends with `.NAME`."""
    stack, n = layer_stack(model)
    if cfg.last_layers > n:
        raise UserError(f"freeze.last_layers {cfg.last_layers} is more than the model's {n} layers: use at most {n} "
                        "(or lora.enabled: false with freeze.enabled: false to train every weight)")
    names = [f"{stack}.{i}" if stack else str(i) for i in range(n - cfg.last_layers, n)]
    all_names = [name for name, _ in model.named_modules() if name]
    for wanted in cfg.modules:
        found = [name for name in all_names if name == wanted or name.endswith("." + wanted)]
        if not found:
            top = sorted({name.split(".")[-1] for name in all_names if not name.split(".")[-1].isdigit()})
            raise UserError(f"freeze.modules: this model has no module named {wanted!r}. Module names: "
                            f"{', '.join(top)}")
        names += [name for name in found if name not in names]
    return names


def freeze_except(model: torch.nn.Module, cfg: FreezeConfig) -> list[str]:
    """Set requires_grad False on every parameter but those of `trained_module_names`; returns those names."""
    names = trained_module_names(model, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in names:
        for p in modules[name].parameters():
            p.requires_grad_(True)
    return names


def freeze_info(model: torch.nn.Module, cfg: FreezeConfig) -> dict:
    """What run_info.json records of a freeze-tuned run: the layer indices and the modules trained."""
    _, n = layer_stack(model)
    return {"layers": list(range(n - cfg.last_layers, n)), "modules": list(cfg.modules)}
