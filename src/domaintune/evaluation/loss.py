"""Teacher-forced loss on target tokens, lean on memory (predict's loss/perplexity, `eval --run`).

`last_turn_samples` builds the samples a test file is scored on (its rows' last assistant turns, encoded
as training encodes them); `teacher_forced_loss` scores encoded samples with a model.

Why not one batched forward: full-vocabulary logits for a batch are huge on large vocabularies (BLOOM's
250,880 tokens: 8 x 1024 positions are ~4 GB in bf16, plus ~8 GB for a float copy). So each sample is
scored alone, the model returns logits only from the position before the first target token
(`logits_to_keep`, accepted by transformers' causal LMs; full logits otherwise), and cross-entropy runs
on float chunks of `LOSS_CHUNK` positions.
"""
from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING, Any

from ..data.encode import IGNORE_INDEX, encode_example, with_system

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..data.examples import Example
    from ..data.templates import Template

LOSS_CHUNK = 256


def last_turn_samples(examples: list[Example], tokenizer: PreTrainedTokenizerBase, template: Template,
                      cutoff_len: int, system: str | None = None) -> list[dict]:
    """Encoded samples whose only targets are each row's last assistant turn (what predict generates).

    Earlier assistant turns of a multi-turn row are context, not scored. Samples are built like training
    builds them (`data.encode.encode_example` with the run's data.system, prompt masked, cut at the run's
    data.cutoff_len). Rows without a target, or whose target lies wholly beyond the cutoff, are skipped.
    """
    samples = []
    for ex in examples:
        prompt, target = ex.prompt_and_target()
        if not target:
            continue
        sample, _ = encode_example(ex, tokenizer, template, cutoff_len, train_on_inputs=False, system=system)
        if sample is None:
            continue
        prompt_ids, _ = template.encode(tokenizer, with_system(prompt, system), add_generation_prompt=True)
        ids = sample["input_ids"]
        if ids[: len(prompt_ids)] == prompt_ids[: len(ids)]:  # mask earlier turns: score the last one only
            sample["labels"] = [IGNORE_INDEX] * min(len(prompt_ids), len(ids)) + sample["labels"][len(prompt_ids):]
        if all(x == IGNORE_INDEX for x in sample["labels"]):
            continue
        samples.append(sample)
    return samples


def teacher_forced_loss(model: Any, samples: list[dict], reduce: Any = None) -> dict:
    """Loss and perplexity over the trainable (target) tokens of encoded samples (dicts with input_ids and
    labels, as built by data.encode.encode_example), averaged over target tokens. `reduce([total, count])`, when
    given, adds the sums of other processes (sharded predict) before the mean is taken."""
    total, count = loss_sums(model, samples)
    if reduce is not None:
        total, n = reduce([total, float(count)])
        count = int(round(n))
    if count == 0:  # no target token within the cutoff anywhere: no loss to report
        return {}
    mean = total / count
    return {"loss": round(mean, 6), "perplexity": round(math.exp(min(mean, 50)), 4), "target_tokens": count}


def loss_sums(model: Any, samples: list[dict]) -> tuple[float, int]:
    """(summed cross-entropy, number of target tokens) of `samples` (see teacher_forced_loss)."""
    import torch

    device = next(model.parameters()).device
    keep = _accepts_logits_to_keep(model)
    total, count = 0.0, 0
    with torch.inference_mode():
        for x in samples:
            ids, labels = x["input_ids"], x["labels"]
            first = next((t for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX), None)
            if first is None:
                continue
            inp = torch.tensor([ids], device=device)
            kw = {"logits_to_keep": len(ids) - first + 1} if keep else {}  # positions first-1 .. end
            logits = model(input_ids=inp, attention_mask=torch.ones_like(inp), **kw).logits[0]
            logits = logits[-(len(ids) - first + 1): -1]  # position p predicts token p + 1
            tgt = torch.tensor(labels[first:], device=device)
            for c in range(0, len(tgt), LOSS_CHUNK):
                total += torch.nn.functional.cross_entropy(logits[c: c + LOSS_CHUNK].float(), tgt[c: c + LOSS_CHUNK],
                                                           ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((tgt != IGNORE_INDEX).sum())
    return total, count


def _accepts_logits_to_keep(model: Any) -> bool:
    """Whether the causal LM's forward takes `logits_to_keep` (a PeftModel passes it through to its base)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False
