"""Memory plan: the GPU memory one training process needs, computed (not measured) for real model shapes.

No GPU has been lent to this project, so these figures are arithmetic over the published model dimensions and
domaintune's own training path; nothing here was measured on a GPU. The model is built from its transformers
config class on the `meta` device (no weights, no download), so the parameter counts and the list of linear
layers are exact; the script checks each count against the count on the model's card.

What is added up, per method (bytes):

- full fine-tuning (`lora.enabled: false`): training/precision.py loads fp32 master weights and trains with bf16
  autocast, so 4 (weights) + 4 (gradients) + 8 (AdamW's two moments, adamw_torch) per parameter, plus the bf16
  copies autocast makes of every linear weight and keeps for the backward pass (2 per linear parameter).
- LoRA (the default: r 8, alpha 16, dropout 0.05, all-linear): the frozen base in bf16 (2 per parameter); PEFT
  keeps the adapter in fp32: 4 + 4 + 8 per adapter parameter.
- QLoRA (`model.quantization: 4bit`): bitsandbytes NF4 with double quantization (training/model.py) stores each
  decoder-layer linear weight in 0.5 byte plus an 8-bit absmax per 64 weights and an fp32 one per 256 blocks;
  the embeddings, LM head and norms stay unquantized and peft's prepare_model_for_kbit_training casts them to
  fp32 (4 per parameter); the adapter as for LoRA.
- activations, per token and decoder layer (LLaMA/Qwen-style layer with SDPA attention, which keeps no
  [tokens, tokens] matrix): `layer_activation_bytes`. With gradient checkpointing only each layer's input is
  kept, plus one layer's activations while it is recomputed.
- the loss: domaintune's chunked loss (training/loss.py) holds at most one chunk of logits (256 MiB of fp32,
  plus a bf16 copy and a bf16 gradient: 0.5 GiB) whatever the length, the answer positions' hidden states and
  their gradient, and for full fine-tuning an fp32 gradient of the LM head. `train.loss: model` would instead
  keep the [tokens, vocab] logits: bf16 logits, their fp32 copy and the fp32 log-softmax (10 bytes per token
  and vocabulary entry), printed as a separate column.
- 1 GiB for the CUDA context and the allocator's slack.

One row of `length` tokens per micro-batch (per_device_batch_size 1); activations grow linearly with
per-device batch x length. The sum is an upper-side estimate: the largest activations and the gradients are not
all alive at the same instant.

    python bench/memory_plan.py [--lengths 1024 4096] [--rank 8] [--dropout 0.05]

It prints markdown tables and writes nothing.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

GIB = 2**30
CUDA_OVERHEAD = 1 * GIB  # CUDA context (~0.5 GiB) and allocator slack: an assumption, not a measurement
LOSS_CHUNK = 512 * 2**20  # training/loss.py LOGITS_BUDGET (256 MiB fp32) + a bf16 copy + the bf16 gradient
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit weight, 8-bit absmax per 64-block, fp32 absmax per 256 blocks


@dataclass(frozen=True)
class Shape:
    """A published model: its hub id, transformers config class and dimensions (from the repository's
    config.json), and the parameter count its model card states (billions), which the built model must match."""

    hub_id: str
    size: str
    config: str
    dims: dict = field(default_factory=dict)
    card_params_b: float = 0.0


def _qwen2(hub_id: str, size: str, h: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tie: bool,
           card: float) -> Shape:
    return Shape(hub_id, size, "Qwen2Config", dict(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                                                   num_attention_heads=heads, num_key_value_heads=kv,
                                                   vocab_size=vocab, tie_word_embeddings=tie), card)


def _qwen3(hub_id: str, size: str, h: int, inter: int, layers: int, heads: int, kv: int, tie: bool,
           card: float) -> Shape:
    return Shape(hub_id, size, "Qwen3Config", dict(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                                                   num_attention_heads=heads, num_key_value_heads=kv, head_dim=128,
                                                   vocab_size=151936, tie_word_embeddings=tie), card)


def _llama(hub_id: str, size: str, config: str, h: int, inter: int, layers: int, heads: int, kv: int, vocab: int,
           tie: bool, card: float, head_dim: int = 128) -> Shape:
    return Shape(hub_id, size, config, dict(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                                            num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                                            vocab_size=vocab, tie_word_embeddings=tie), card)


# Dimensions: each repository's config.json on the Hugging Face Hub (https://huggingface.co/<hub_id>); the card
# figure is the "Number of Parameters" of the model card (Mistral: the Hub's safetensors parameter count).
SHAPES: tuple[Shape, ...] = (
    _qwen2("Qwen/Qwen2.5-0.5B-Instruct", "0.5B", 896, 4864, 24, 14, 2, 151936, True, 0.49),
    _qwen3("Qwen/Qwen3-0.6B", "0.5B", 1024, 3072, 28, 16, 8, True, 0.6),
    _llama("meta-llama/Llama-3.2-1B-Instruct", "1.5B", "LlamaConfig", 2048, 8192, 16, 32, 8, 128256, True, 1.23,
           head_dim=64),
    _qwen2("Qwen/Qwen2.5-1.5B-Instruct", "1.5B", 1536, 8960, 28, 12, 2, 151936, True, 1.54),
    _qwen3("Qwen/Qwen3-1.7B", "1.5B", 2048, 6144, 28, 16, 8, True, 1.7),
    _qwen2("Qwen/Qwen2.5-3B-Instruct", "3-4B", 2048, 11008, 36, 16, 2, 151936, True, 3.09),
    _llama("microsoft/Phi-3-mini-4k-instruct", "3-4B", "Phi3Config", 3072, 8192, 32, 32, 32, 32064, False, 3.82,
           head_dim=96),
    _qwen3("Qwen/Qwen3-4B", "3-4B", 2560, 9728, 36, 32, 8, True, 4.0),
    _llama("mistralai/Mistral-7B-Instruct-v0.3", "7-8B", "MistralConfig", 4096, 14336, 32, 32, 8, 32768, False, 7.25),
    _qwen2("Qwen/Qwen2.5-7B-Instruct", "7-8B", 3584, 18944, 28, 28, 4, 152064, False, 7.61),
    _llama("meta-llama/Llama-3.1-8B-Instruct", "7-8B", "LlamaConfig", 4096, 14336, 32, 32, 8, 128256, False, 8.03),
    _qwen3("Qwen/Qwen3-8B", "7-8B", 4096, 12288, 36, 32, 8, False, 8.2),
    _qwen2("Qwen/Qwen2.5-14B-Instruct", "14B", 5120, 13824, 48, 40, 8, 152064, False, 14.7),
    _qwen3("Qwen/Qwen3-14B", "14B", 5120, 17408, 40, 40, 8, False, 14.8),
)


@dataclass(frozen=True)
class Counts:
    """What the memory plan needs from a built model."""

    params: int  # all parameters (tied embeddings once)
    layer_linear: int  # parameters of the linear layers inside the decoder layers (what 4-bit quantizes)
    head_linear: int  # the LM head's weight (a linear layer outside the decoder layers)
    lora_params_per_rank: int  # sum of (in + out) over the decoder layers' linear layers: LoRA's A and B per rank
    layers: int
    hidden: int
    inter: int
    q_dim: int
    kv_dim: int
    vocab: int
    qk_norm: bool = False  # Qwen3: an RMSNorm on each head's queries and keys
    fused: bool = False  # Phi-3: q, k, v in one linear layer (qkv_proj), gate and up in another (gate_up_proj)


def build_config(shape: Shape):  # noqa: ANN201 (a transformers config)
    import transformers

    return getattr(transformers, shape.config)(**shape.dims)


def count(shape: Shape) -> Counts:
    """Parameter counts of the model built from `shape` on the meta device (no memory, no download)."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = build_config(shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    head = model.get_output_embeddings()
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"]
    d = shape.dims
    head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
    return Counts(params=sum(p.numel() for p in model.parameters()),
                  layer_linear=sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in linears),
                  head_linear=head.weight.numel(),
                  lora_params_per_rank=sum(m.in_features + m.out_features for m in linears),
                  layers=d["num_hidden_layers"], hidden=d["hidden_size"], inter=d["intermediate_size"],
                  q_dim=d["num_attention_heads"] * head_dim, kv_dim=d["num_key_value_heads"] * head_dim,
                  vocab=d["vocab_size"], qk_norm=shape.config == "Qwen3Config",
                  fused=shape.config == "Phi3Config")


def layer_activation_bytes(c: Counts, method: str, rank: int = 8, dropout: float = 0.05, mask_bytes: int = 1) -> int:
    """Bytes one decoder layer keeps per token for the backward pass (bf16 autocast, SDPA attention).

    Both methods keep: q, k, v and the attention output for SDPA (bf16: 4 q + 4 kv bytes) and the MLP's gate
    output, its SiLU and the up projection (bf16). Full fine-tuning: the two RMSNorms keep their fp32 input and
    normalised output (the norm weight trains: 16 h), autocast's bf16 copies of the normalised input for q, k, v,
    gate and up (10 h) and the down projection's input (2 I). LoRA / QLoRA: the frozen norms keep their fp32
    input (8 h); each adapted linear keeps the bf16 input of its lora_A (2 bytes) and, with dropout, the dropout
    mask (`mask_bytes`: a bool on CUDA; a CPU keeps it as fp32, 4): q, k, v, gate and up read h, o reads q_dim,
    down reads I; lora_A's outputs (r each) too. Qwen3's per-head query/key norms keep their fp32 input (and,
    when they train, a bf16 output): 4 (6) bytes per q_dim + kv_dim. Phi-3's fused layers read h twice, not five
    times: two autocast copies (4 h) instead of five, and two adapted inputs of width h instead of five.
    tests/test_memory_plan.py checks these counts against what autograd saves on a small model on CPU."""
    h, inter, q, kv = c.hidden, c.inter, c.q_dim, c.kv_dim
    shared = 4 * q + 4 * kv + 6 * inter
    reads_h = 2 if c.fused else 5  # linear layers that read the normalised hidden state
    if method == "full":
        # Phi-3's q, k, v are slices of one output, so o_proj keeps its own copy of the attention output
        return (shared + 16 * h + 2 * reads_h * h + 2 * inter + (6 * (q + kv) if c.qk_norm else 0)
                + (2 * q if c.fused else 0))
    per_input = 2 + (mask_bytes if dropout > 0 else 0)
    return (shared + 8 * h + per_input * (reads_h * h + q + inter) + 2 * (reads_h + 2) * rank
            + (4 * (q + kv) if c.qk_norm else 0))


def plan(c: Counts, method: str, tokens: int, checkpointing: bool, rank: int = 8,
         dropout: float = 0.05) -> dict[str, float]:
    """The parts of the memory plan, in bytes, and their `total`."""
    lora = method != "full"
    adapter = rank * c.lora_params_per_rank if lora else 0
    if method == "full":
        weights = 4 * c.params + 2 * (c.layer_linear + c.head_linear)  # fp32 + autocast's bf16 copies
        grads, optim = 4 * c.params, 8 * c.params
    else:
        if method == "qlora":
            weights = NF4_BYTES * c.layer_linear + 4 * (c.params - c.layer_linear)
        else:
            weights = 2 * c.params
        weights += 4 * adapter
        grads, optim = 4 * adapter, 8 * adapter
    layer = layer_activation_bytes(c, method, rank, dropout)
    stream = 2 if method == "lora" else 4  # the residual stream: bf16 for LoRA, fp32 for full and QLoRA
    if checkpointing:
        acts = tokens * (c.layers * stream * c.hidden + layer)
    else:
        acts = tokens * c.layers * layer
    acts += tokens * 8 * c.hidden * 2  # the final norm (fp32 input and output)
    loss = LOSS_CHUNK + tokens * c.hidden * 2 * stream  # one chunk + answer hidden states and their gradient
    if method == "full":
        loss += 4 * c.head_linear  # the chunked loss's fp32 gradient of the trained LM head
    parts = {"weights": weights, "gradients": grads, "optimizer": optim, "activations": acts, "loss": loss,
             "cuda": CUDA_OVERHEAD}
    parts["total"] = sum(parts.values())
    return parts


def full_logits_bytes(c: Counts, tokens: int) -> int:
    """What `train.loss: model` adds: bf16 logits, their fp32 copy and the fp32 log-softmax, [tokens, vocab]."""
    return 10 * tokens * c.vocab


METHODS = (("full", "full"), ("lora", "LoRA"), ("qlora", "QLoRA 4-bit"))


def tables(lengths: list[int], rank: int, dropout: float) -> str:
    counts = [(s, count(s)) for s in SHAPES]
    out = []
    for ckpt in (False, True):
        out.append(f"Gradient checkpointing {'on' if ckpt else 'off'} (GiB, one row of the given length per "
                   "micro-batch):\n")
        head = ["model", "params (B)"] + [f"{name} {n // 1024}k" for _, name in METHODS for n in lengths]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for s, c in counts:
            cells = [f"{plan(c, m, n, ckpt, rank, dropout)['total'] / GIB:.1f}" for m, _ in METHODS for n in lengths]
            out.append(f"| {s.hub_id} | {c.params / 1e9:.2f} | " + " | ".join(cells) + " |")
        out.append("")
    out.append("Logits that `train.loss: model` would add (GiB), which the chunked loss never holds:\n")
    out.append("| model | vocabulary | " + " | ".join(f"{n // 1024}k" for n in lengths) + " |")
    out.append("|---|---|" + "---|" * len(lengths))
    for s, c in counts:
        out.append(f"| {s.hub_id} | {c.vocab:,} | "
                   + " | ".join(f"{full_logits_bytes(c, n) / GIB:.1f}" for n in lengths) + " |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096], help="tokens per row (default 1024 4096)")
    ap.add_argument("--rank", type=int, default=8, help="lora.r (default 8)")
    ap.add_argument("--dropout", type=float, default=0.05, help="lora.dropout (default 0.05)")
    a = ap.parse_args()
    print(tables(a.lengths, a.rank, a.dropout), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
