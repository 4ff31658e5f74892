"""The fast training path's choices, each made once per run and said once (rank 0):

- **loss** (`train.loss`): liger-kernel's fused linear cross-entropy on CUDA when it is installed
  (`domaintune[fast]`) and supports the architecture; else domaintune's chunked loss (loss.py) where the
  architecture's logits are plain `lm_head(hidden)`; else the model's own loss.
- **batching** (`train.batching`): the rows of a micro-batch packed into one sequence, with position_ids that
  restart per row and no attention across rows, where the architecture builds its attention mask from
  position_ids (families.py `packable`: LLaMA, Mistral, Qwen2/3, Phi-3, GLM-4, and Gemma 3, whose sliding window
  transformers' masking utilities apply within each packed row); elsewhere (BLOOM's ALiBi, Qwen3.5's
  linear-attention recurrence, which would carry state across rows) padded, length-grouped micro-batches.
  Either way a micro-batch holds the same rows, so `train.batch_size` keeps its meaning (rows per optimizer step).
- **gradient checkpointing** (`auto`): only on a GPU, and only when the longest micro-batch's activations
  would not fit the free memory.
- **per-device batch** (`auto`): the largest divisor of batch_size / processes that fits: probed on a GPU with
  a forward and backward pass on the longest rows; on CPU up to 8.
GPU-only choices fall back to the CPU path where the library or the device is missing, and say so.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..families import model_types
from .loss import supports_lean_loss

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..config import TrainConfig

# model_type values whose decoder builds its attention mask from position_ids (packed sequences detected), and
# those liger-kernel patches (its fused linear cross-entropy among them): families.py holds both facts.
PACKABLE_MODELS = model_types("packable")
LIGER_MODELS = model_types("liger")
CPU_MAX_PER_DEVICE = 8


def model_type(model: Any) -> str | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(base, "config", None), "model_type", None)


def choose_loss(requested: str, model: Any, device: str) -> tuple[str, str]:
    """(loss implementation, a line saying why) for `train.loss`."""
    kind = model_type(model)
    lean = supports_lean_loss(model)
    if requested in ("auto", "liger"):
        has_liger = importlib.util.find_spec("liger_kernel") is not None
        if device == "cuda" and has_liger and kind in LIGER_MODELS:
            return "liger", "loss: liger-kernel fused linear cross-entropy"
        if requested == "liger":
            why = ("no CUDA device" if device != "cuda" else
                   "liger-kernel is not installed (pip install 'domaintune[fast]')" if not has_liger else
                   f"liger-kernel does not support {kind}")
            fallback = "chunked" if lean else "model"
            return fallback, f"loss: train.loss is liger but {why}; using the {fallback} loss instead"
    if requested in ("auto", "liger", "chunked") and lean:
        return "chunked", "loss: chunked (LM head and cross-entropy only at target positions)"
    if requested == "chunked":
        raise UserError(f"train.loss: chunked supports models whose logits are lm_head(hidden) only; {kind} is not one "
                        "of them. Set train.loss: auto or model")
    return "model", f"loss: the model's own ({kind} is not known to the chunked loss)"


def choose_batching(requested: str, model: Any) -> tuple[str, str]:
    """(pack or pad, a line saying why) for `train.batching`."""
    kind = model_type(model)
    if requested == "pad":
        return "pad", "batches: padded, length-grouped"
    if kind in PACKABLE_MODELS:
        return "pack", "batches: packed without padding (position_ids, no attention across rows)"
    if requested == "pack":
        raise UserError(f"train.batching: pack needs an architecture that masks attention by position_ids "
                        f"({', '.join(sorted(PACKABLE_MODELS))}); {kind} is not one of them. Set train.batching: auto")
    return "pad", f"batches: padded, length-grouped ({kind} cannot pack rows)"


def make_collator(batching: str, tok: PreTrainedTokenizerBase, device: str) -> Any:
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if batching == "pack":
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    return DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True,
                                  pad_to_multiple_of=8 if device == "cuda" else None)


def _longest(samples: Sequence[dict], n: int) -> list[dict]:
    if hasattr(samples, "longest"):  # arrow.Samples: by its lengths column, without decoding every row
        return samples.longest(n)
    return sorted(samples, key=lambda s: -len(s["input_ids"]))[:n]


def activation_bytes(model: Any, tokens: int) -> int:
    """The activations a forward pass over `tokens` tokens keeps for the backward pass, in bf16 autocast with SDPA
    (which keeps no attention scores). Per token and decoder layer, the larger term by term of full fine-tuning's
    count and LoRA's with dropout: q, k, v and the attention output (4 q + 4 kv bytes), the MLP's gate, SiLU, up and
    down inputs (8 I; 9 I with LoRA's dropout mask on down's input), the norms' fp32 inputs and outputs and
    autocast's bf16 copies of the hidden state (26 h), LoRA's kept input of o_proj (3 q), and per-head query and key
    norms where the model has them (6 (q + kv), Qwen3). So it errs towards
    turning checkpointing on. tests/test_memory_plan.py checks it against both counts, which equal what autograd
    saves (bench/memory_plan.py). The rule used before, 34 x hidden bytes (Korthikanti et al. 2022, for a GPT MLP
    of 4 x hidden), was 2.2x too low for Qwen2.5-0.5B's wider SwiGLU MLP."""
    cfg = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    cfg = getattr(cfg, "text_config", None) or cfg  # multimodal wrappers (Gemma 3) nest the decoder's config
    hidden: int = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embed", None) or 0
    layers: int = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None) or 0
    inter: int = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_hidden_size", None) or 4 * hidden
    heads: int = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 1
    head_dim: int = getattr(cfg, "head_dim", None) or hidden // heads
    kv_heads: int = getattr(cfg, "num_key_value_heads", None) or heads
    q, kv = heads * head_dim, kv_heads * head_dim
    per_layer = 7 * q + 4 * kv + 9 * inter + 26 * hidden
    if any(name.endswith(".q_norm") for name, _ in model.named_modules()):  # Qwen3: per-head query/key norms
        per_layer += 6 * (q + kv)
    return per_layer * layers * tokens


def wants_checkpointing(setting: bool | str, model: Any, samples: Sequence[dict], per_device: int,
                        device: str) -> tuple[bool, str | None]:
    """(gradient checkpointing on?, a line when auto decided) for `train.gradient_checkpointing`."""
    if setting != "auto":
        return bool(setting), None
    if device != "cuda":
        return False, None
    import torch

    tokens = sum(len(s["input_ids"]) for s in _longest(samples, per_device))
    need, free = activation_bytes(model, tokens), torch.cuda.mem_get_info()[0]
    on = need > 0.6 * free
    return on, (f"gradient checkpointing: {'on' if on else 'off'} (about {need / 2**30:.1f} GiB of activations for "
                f"the longest micro-batch, {free / 2**30:.1f} GiB free)")


def divisors_down(n: int, cap: int) -> list[int]:
    return [d for d in range(min(n, cap), 0, -1) if n % d == 0]


def auto_per_device(tcfg: TrainConfig, world_size: int, device: str, probe: Any) -> tuple[int, str]:
    """The per-device batch for `per_device_batch_size: auto` (see the module docstring). `probe(b)` runs a
    forward and backward pass on the b longest rows and returns False when it runs out of memory."""
    rows = tcfg.batch_size // world_size if tcfg.batch_size % world_size == 0 else 1
    if device != "cuda":
        b = divisors_down(rows, CPU_MAX_PER_DEVICE)[0]
        return b, f"per-device batch: {b} (auto; up to {CPU_MAX_PER_DEVICE} on CPU)"
    for b in divisors_down(rows, rows):
        if probe(b):
            return b, f"per-device batch: {b} (auto; the largest that fit a training pass on the longest rows)"
    raise UserError("per_device_batch_size auto: even one row of the longest length does not fit this GPU; lower "
                    "data.cutoff_len, use QLoRA (model.quantization: 4bit) or a smaller model")


def oom_probe(model: Any, collator: Any, samples: Sequence[dict], loss_fn: Any, device: str) -> Any:
    """A `probe(b)` for `auto_per_device`: one forward and backward pass on the b longest samples."""
    import torch

    def probe(b: int) -> bool:
        batch = {k: v.to(device) for k, v in collator(_longest(samples, b)).items()}
        labels = batch.pop("labels")
        try:
            if loss_fn is not None:
                loss = loss_fn(model(**batch), labels)
            else:
                loss = model(**batch, labels=labels).loss
            loss.backward()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    return probe
