"""Teacher-forced loss on target tokens, lean on memory (predict's loss/perplexity, `eval --run`).

Why not one batched forward: full-vocabulary logits for a batch are huge on large vocabularies (BLOOM's
250,880 tokens: 8 x 1024 positions are ~4 GB in bf16, plus ~8 GB for a float copy). So each sample is
scored alone, the model returns logits only from the position before the first target token
(`logits_to_keep`, accepted by transformers' causal LMs; full logits otherwise), and cross-entropy runs
on float chunks of `LOSS_CHUNK` positions.
"""
from __future__ import annotations

import inspect
import math

LOSS_CHUNK = 256


def target_loss(model, samples: list[dict]) -> dict:
    """Loss and perplexity over the trainable (target) tokens of encoded samples (dicts with input_ids and
    labels, as built by data.encode_example), averaged over target tokens."""
    import torch

    device = next(model.parameters()).device
    keep = _accepts_logits_to_keep(model)
    total, count = 0.0, 0
    with torch.inference_mode():
        for x in samples:
            ids, labels = x["input_ids"], x["labels"]
            first = next((t for t in range(1, len(ids)) if labels[t] != -100), None)
            if first is None:
                continue
            inp = torch.tensor([ids], device=device)
            kw = {"logits_to_keep": len(ids) - first + 1} if keep else {}  # positions first-1 .. end
            logits = model(input_ids=inp, attention_mask=torch.ones_like(inp), **kw).logits[0]
            logits = logits[-(len(ids) - first + 1): -1]  # position p predicts token p + 1
            tgt = torch.tensor(labels[first:], device=device)
            for c in range(0, len(tgt), LOSS_CHUNK):
                total += torch.nn.functional.cross_entropy(logits[c: c + LOSS_CHUNK].float(), tgt[c: c + LOSS_CHUNK],
                                                           ignore_index=-100, reduction="sum").item()
            count += int((tgt != -100).sum())
    mean = total / max(count, 1)
    return {"loss": round(mean, 6), "perplexity": round(math.exp(min(mean, 50)), 4), "target_tokens": count}


def _accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM's forward takes `logits_to_keep` (a PeftModel passes it through to its base)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False
