"""The tuning-method sections: `lora` (LoRA and its variants: DoRA, rsLoRA, PiSSA/OLoRA/LoftQ initialisation,
modules_to_save, layers), `freeze` (full fine-tuning of the last layers, the rest frozen), and the check of
`model.rope_scaling` (long context).

Where the work happens: training/model.py builds the adapter or freezes the layers; training/arguments.py turns
train.loraplus_lr_ratio and train.neftune_alpha into the optimizer and the Trainer's argument.
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import Field

from ..errors import UserError
from .base import Section

# A rank above the adapted matrices' smaller side adds nothing; the hidden size bounds it (checked against the
# model's config.json before it loads: LoraConfig.check_rank). This cap needs no model: it is the largest hidden
# size of released models, so a stray 10000000 is refused at once instead of allocating without bound.
MAX_LORA_RANK = 16384
ROPE_TYPES = ("linear", "dynamic", "yarn")


class LoraConfig(Section):
    enabled: bool = Field(True, description="Train a LoRA adapter (true) or fine-tune all weights (false).")
    r: int = Field(8, gt=0, le=MAX_LORA_RANK, description="LoRA rank (at most the model's hidden size).")
    alpha: float = Field(16, gt=0, description="LoRA scaling alpha (effective scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: Union[list[str], Literal["all-linear"]] = Field(
        "all-linear",
        description="Module names to adapt (e.g. [query_key_value] for BLOOM, [q_proj, v_proj] for LLaMA/Qwen) "
                    "or all-linear.",
    )
    use_dora: bool = Field(False, description="DoRA: weight-decomposed LoRA, a learned magnitude per output beside "
                                              "the low-rank direction (PEFT use_dora); slower steps, often better at "
                                              "low r.")
    use_rslora: bool = Field(False, description="rsLoRA: scale the adapter by alpha/sqrt(r) instead of alpha/r (PEFT "
                                                "use_rslora), so high ranks keep learning.")
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = Field(
        "default", description="Adapter initialisation (PEFT init_lora_weights): default (B = 0: starts as the base), "
                               "gaussian, pissa or olora (start from the weights' principal / QR directions and "
                               "subtract them from the base; the saved adapter is converted to apply to the original "
                               "base), loftq (QLoRA on a CUDA GPU, with model.quantization 4bit: the adapter is "
                               "fitted so that the 4-bit base plus the adapter is closest to the original weights).")
    modules_to_save: list[str] | None = Field(
        None, description="Modules trained fully and saved beside the adapter (PEFT modules_to_save), e.g. "
                          "[embed_tokens, lm_head] after adding special tokens; None = none.")
    layers: list[int] | None = Field(
        None, description="Adapt only these layer indices (PEFT layers_to_transform), e.g. [20, 21, 22, 23]; "
                          "None = every layer.")

    def check_rank(self, model_config: dict, source: str = "the model") -> None:
        """A UserError when `r` exceeds the hidden size in the model's config.json (`model_config`), read before
        the model loads. Multimodal configs keep it under text_config."""
        if not self.enabled:
            return
        text = model_config.get("text_config")
        for conf in (model_config, text if isinstance(text, dict) else {}):
            for key in ("hidden_size", "n_embd", "d_model"):
                hidden = conf.get(key)
                if isinstance(hidden, int) and not isinstance(hidden, bool) and hidden > 0:
                    if self.r > hidden:
                        raise UserError(f"lora.r {self.r} is larger than the hidden size of {source} ({hidden}): "
                                        f"a rank above it adds nothing; use at most {hidden} (8 to 64 is usual)")
                    return


class FreezeConfig(Section):
    enabled: bool = Field(False, description="Freeze tuning: train the last `last_layers` transformer layers (and "
                                             "`modules`) fully, every other weight frozen; needs lora.enabled: false.")
    last_layers: int = Field(2, gt=0, description="How many of the last transformer layers train.")
    modules: list[str] = Field(default_factory=list,
                               description="More modules trained fully, by name (e.g. [lm_head, norm]); "
                                           "default none.")


def check_rope_scaling(v: dict[str, Any] | None) -> dict[str, Any] | None:
    """model.rope_scaling: a rope_type (or type) of ROPE_TYPES and a factor above 1."""
    if v is None:
        return v
    kind = v.get("rope_type", v.get("type"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_type must be one of {', '.join(ROPE_TYPES)} (got {kind!r}), e.g. "
                         "{rope_type: linear, factor: 2.0}")
    factor = v.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 1:
        raise ValueError(f"factor must be a number above 1 (got {factor!r}): the context is factor x the model's "
                         "native length")
    return {**{k: val for k, val in v.items() if k != "type"}, "rope_type": kind, "factor": float(factor)}
