"""Helpers of the continuous batcher (batching.py): KV-cache rows of several requests in one transformers
`DynamicCache` (which models allow it, left padding to join caches of different lengths), and whether a
tokenizer's decoding can be done piece by piece."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def left_pad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """`t` with zeros added before its entries along `dim` up to `width`."""
    import torch

    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def join_rows(cache: Any, mask: torch.Tensor, new_cache: Any, new_mask: torch.Tensor) -> torch.Tensor:
    """Append `new_cache`'s rows to `cache` (in place), left-padding the shorter of the two along the sequence;
    the joined attention mask (rows, length: 1 = a real token, 0 = padding)."""
    import torch

    width = max(mask.shape[1], new_mask.shape[1])
    for mine, theirs in zip(cache.layers, new_cache.layers, strict=True):
        for name in ("keys", "values"):
            a, b = left_pad(getattr(mine, name), width), left_pad(getattr(theirs, name), width)
            setattr(mine, name, torch.cat([a, b], dim=0))
    return torch.cat([left_pad(mask, width, dim=1), left_pad(new_mask, width, dim=1)], dim=0)


def keep_rows(cache: Any, mask: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Keep only rows `keep` of `cache` (in place) and of `mask`, then trim the leading columns that are padding in
    every row kept; the new mask."""
    import torch

    idx = torch.tensor(keep, device=mask.device)
    mask = mask[idx]
    cut = int((mask.cumsum(-1) == 0).sum(-1).min())  # leading columns that are padding in every row
    for layer in cache.layers:
        layer.keys = layer.keys[idx, :, cut:]
        layer.values = layer.values[idx, :, cut:]
    return mask[:, cut:]


def joinable(model: Any) -> bool:
    """Whether the model's cache is made of plain full-attention layers, which can be padded and joined. Read from
    the cache the config makes (not the family's name): Mistral joins without a sliding window and not with one;
    a sliding-window layer keeps only the window (Gemma 3) and a linear-attention layer a recurrent state
    (Qwen3.5), neither of which lines up with a left-padded mask."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001 - a config the cache cannot read: decode one request at a time
        return False
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def concatenative_decoding(tokenizer: Any) -> bool:
    """Whether decode(a + b) == decode(a) + decode(b) whenever decode(a) ends on a whole character: a fast
    tokenizer with a byte-level decoder (GPT-2 style: Qwen, LLaMA-3, BLOOM) that does not clean up spaces
    around punctuation afterwards. SentencePiece decoders (which drop a leading space) and clean-up do not."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return type(decoder).__name__ == "ByteLevel" and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
