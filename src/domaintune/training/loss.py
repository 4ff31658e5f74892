"""A memory-lean causal-LM loss: the LM head and cross-entropy only at positions that have a label, in chunks.

Why: the model's own loss builds the full `[tokens, vocab]` logits, upcasts them to fp32 and keeps a gradient
of the same size. With BLOOM's 250,880-token vocabulary that is most of the memory of a small model's training
step, and the prompt positions (masked, a quarter of the tokens or more) and padding need no logits at all.
liger-kernel fuses the same idea on CUDA but does not cover every architecture (not BLOOM), and not CPUs.

How (`linear_cross_entropy`): the hidden states of the labelled positions are gathered, then for each chunk of
`chunk_size(vocab)` positions (`LOGITS_BUDGET` bytes of fp32 logits) the logits are computed, turned into the
loss and, in the same pass, into the gradients of the hidden states (and of the head's weight and bias when they
are trained): `softmax - onehot` times the weight. The backward pass then only scales what the forward stored,
so no chunk's logits outlive its loop iteration and nothing is computed twice. A head that is not a plain
`nn.Linear` (e.g. one with a LoRA adapter) is chunked with activation checkpointing instead, recomputing each
chunk in the backward pass.

How it plugs into the Trainer (`LeanLoss`): a forward pre-hook on the model's output embedding takes the final
hidden states and hands the head an empty sequence (so the model computes no logits), and the Trainer's
`compute_loss_func` turns the captured states and the labels into the loss. The loss is the sum over target
tokens divided by `num_items_in_batch`, the Trainer's count of target tokens of the whole optimizer step (all
micro-batches and processes), so the step's loss is the mean over its target tokens however the rows are split.

Only for architectures whose logits are exactly `lm_head(hidden)` (`PLAIN_HEAD_MODELS`): models that scale or
soft-cap their logits would be trained on the wrong values, so they keep their own loss.

Mixture-of-experts models (Qwen3-MoE, Qwen2-MoE, Mixtral) whose config asks for the router's load-balancing loss
(`output_router_logits: true`) return it as `outputs.aux_loss`; their own loss is then the cross-entropy plus
`router_aux_loss_coef` times it, and `LeanLoss` adds the same term, so the Trainer optimises what the model's own
loss would be, in value and gradient (tests/training/test_family_facts.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..data.encode import IGNORE_INDEX
from ..families import model_types

if TYPE_CHECKING:
    import torch

LOGITS_BUDGET = 256 * 2**20  # bytes of fp32 logits held at once: 267 positions of BLOOM's 250,880-token vocabulary


def chunk_size(vocab: int) -> int:
    """Positions per chunk so that one chunk's fp32 logits stay within `LOGITS_BUDGET` (at least 16, so that a
    huge vocabulary still makes matrix products, not vector ones)."""
    return max(16, LOGITS_BUDGET // (4 * max(vocab, 1)))


# model_type values whose CausalLM forward computes logits = lm_head(final hidden states) and nothing else
# (families.py: `plain_head`).
PLAIN_HEAD_MODELS = model_types("plain_head")


def _autocast_on(device_type: str) -> bool:
    import torch

    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def _chunk_grads(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
                 need: tuple[bool, bool, bool], buf: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Loss sum of one chunk and, as asked by `need` (hidden, weight, bias), its gradients. `buf`, a float32
    [len(y), vocab] tensor, receives the logits when the weight is float32 and autocast is off (one buffer
    for every chunk: fresh multi-MB allocations cost page faults on every chunk, ~15% of the head on CPU)."""
    import torch

    if buf is not None and weight.dtype == torch.float32 and h.dtype == torch.float32 \
            and not _autocast_on(h.device.type):
        logits = torch.mm(h, weight.t(), out=buf)
        if bias is not None:
            logits.add_(bias)
    else:
        logits = torch.nn.functional.linear(h, weight, bias).float()
    target = logits.gather(1, y[:, None]).squeeze(1)
    top = logits.amax(dim=1)
    # softmax in the logits' own memory: no second [chunk, vocab] tensor (logsumexp would make one)
    probs = logits.sub_(top[:, None]).exp_()
    total = probs.sum(dim=1)
    loss = (total.log() + top - target).sum()  # log-sum-exp minus the target's logit
    if not any(need):
        return loss, None, None, None
    probs.div_(total[:, None])
    probs[torch.arange(len(y), device=y.device), y] -= 1.0  # d loss / d logits
    grad = probs.to(h.dtype)
    return (loss,
            grad @ weight if need[0] else None,
            grad.t() @ h if need[1] else None,
            grad.sum(0) if need[2] else None)


_FN: Any = None


def _function() -> Any:
    """The autograd Function, built on first use (torch is imported only when training starts)."""
    global _FN
    if _FN is None:
        import torch

        class LinearCrossEntropy(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        targets: torch.Tensor, chunk: int, need: tuple[bool, bool, bool]) -> torch.Tensor:
                total = hidden.new_zeros((), dtype=torch.float32)
                g_h = torch.empty_like(hidden) if need[0] else None
                g_w = torch.zeros_like(weight, dtype=torch.float32) if need[1] else None
                g_b = torch.zeros_like(bias, dtype=torch.float32) if need[2] and bias is not None else None
                n = hidden.shape[0]
                buf = hidden.new_empty((min(chunk, n), weight.shape[0]), dtype=torch.float32) if n > chunk else None
                for s in range(0, n, chunk):
                    rows = min(chunk, n - s)
                    loss, d_h, d_w, d_b = _chunk_grads(hidden[s:s + chunk], weight, bias, targets[s:s + chunk], need,
                                                       buf[:rows] if buf is not None else None)
                    total += loss
                    # a gradient is asked for (need) exactly when its accumulator exists
                    if g_h is not None and d_h is not None:
                        g_h[s:s + chunk] = d_h
                    if g_w is not None and d_w is not None:
                        g_w += d_w.float()
                    if g_b is not None and d_b is not None:
                        g_b += d_b.float()
                ctx.save_for_backward(*(t for t in (g_h, g_w, g_b) if t is not None))
                ctx.need, ctx.weight_dtype = need, weight.dtype
                return total

            @staticmethod
            def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
                saved = iter(ctx.saved_tensors)
                g_h, g_w, g_b = (next(saved) if n else None for n in ctx.need)
                scale = grad_out.to(torch.float32)
                return (g_h * scale.to(g_h.dtype) if g_h is not None else None,
                        (g_w * scale).to(ctx.weight_dtype) if g_w is not None else None,
                        (g_b * scale).to(ctx.weight_dtype) if g_b is not None else None, None, None, None)

        _FN = LinearCrossEntropy
    return _FN


def linear_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """Sum over positions of cross_entropy(head(hidden), targets), for `hidden` [N, H] and `targets` [N] with no
    ignored entries, without ever holding more than `chunk` positions' logits (default: `chunk_size`)."""
    import torch

    if chunk is None:
        weight = getattr(head, "weight", None)
        chunk = chunk_size(weight.shape[0] if isinstance(weight, torch.Tensor) else head(hidden[:1]).shape[-1])

    if type(head) is torch.nn.Linear:
        grad = torch.is_grad_enabled()
        need = (grad and hidden.requires_grad, grad and head.weight.requires_grad,
                grad and head.bias is not None and head.bias.requires_grad)
        return _function().apply(hidden, head.weight, head.bias, targets, chunk, need)
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(head(h).float(), y, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(chunk_loss, hidden[s:s + chunk], targets[s:s + chunk], use_reentrant=False)
    return total


def causal_lm_loss_sum(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                       chunk: int | None = None) -> tuple[torch.Tensor, int]:
    """(sum of the next-token losses over every labelled position, number of such positions) for hidden states
    [B, T, H] and labels [B, T] (IGNORE_INDEX where there is nothing to learn). Position t predicts label t + 1."""
    shifted = labels[:, 1:]
    keep = shifted != IGNORE_INDEX
    n = int(keep.sum())
    if n == 0:
        return hidden.sum() * 0.0, 0  # keeps the graph (and DDP) whole on a batch without targets
    h = hidden[:, :-1][keep]
    return linear_cross_entropy(h, head, shifted[keep], chunk), n


def supports_lean_loss(model: Any) -> bool:
    """Whether `model` (a CausalLM, or a PeftModel around one) computes its logits as `lm_head(hidden)` only: its
    family says so and its config does not soft-cap the logits (Gemma's `final_logit_softcapping`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    return (getattr(config, "model_type", None) in PLAIN_HEAD_MODELS
            and getattr(config, "final_logit_softcapping", None) is None and base.get_output_embeddings() is not None)


class LeanLoss:
    """The Trainer's `compute_loss_func` together with the hook that hands it the final hidden states.

    Install with `LeanLoss(model)` before training and `close()` after it: while installed, the model's output
    embedding computes no logits (it returns an empty sequence), so use the model for nothing else meanwhile."""

    def __init__(self, model: Any) -> None:
        self.head = model.get_output_embeddings()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # the weight of the router's auxiliary loss, as the model's own forward adds it (0: no such loss)
        self.aux_coef = float(getattr(getattr(base, "config", None), "router_aux_loss_coef", 0.0) or 0.0)
        self.hidden: torch.Tensor | None = None
        self._handle = self.head.register_forward_pre_hook(self._grab)

    def _grab(self, module: Any, args: tuple) -> tuple | None:
        if args[0].dim() == 2:  # the loss's own call with gathered positions [N, H] (a head that is not a plain
            return None  # nn.Linear: LoRA on lm_head, lora.modules_to_save), also when checkpointing recomputes it
        self.hidden = args[0]
        return (args[0][..., :0, :], *args[1:])

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        hidden, self.hidden = self.hidden, None
        if hidden is None:
            raise RuntimeError("the lean loss saw no hidden states: the model did not call its output embedding")
        total, n = causal_lm_loss_sum(hidden, self.head, labels.to(hidden.device))
        count = num_items_in_batch if num_items_in_batch is not None else max(n, 1)
        loss = total / count
        aux = getattr(outputs, "aux_loss", None)  # set only when the config asks for it (output_router_logits)
        if aux is not None and self.aux_coef:
            loss = loss + self.aux_coef * (aux.to(loss.device) if hasattr(aux, "to") else aux)
        return loss

    def close(self) -> None:
        self._handle.remove()
