"""What differs per architecture in the GGUF export (`gguf_export.py`): which transformers classes convert to
which llama.cpp architecture, the hyperparameter keys llama.cpp reads, and how each tensor is renamed, split,
stacked or reordered into llama.cpp's layout.

The family record (`families.Family.gguf`) names the llama.cpp architecture of a `config.model_type`; `RULES`,
keyed by that name, holds the rest. The rules are llama.cpp's converter's (convert_hf_to_gguf.py, split into
conversion/*.py upstream: qwen.py, gemma.py, phi.py, glm.py, llama.py, bloom.py) and its model loaders
(src/llama-model.cpp), re-written here with a comment naming where each comes from. Names are mapped with the
`gguf` package's own HF-to-GGUF table (`gguf.get_tensor_name_map`).

Anything llama.cpp would compute differently from transformers (a layer layout it cannot express, a rope
variant, a router setting) is refused here, from the config alone, before any weights load: `check`. RoPE (its
settings, scaling keys and refusals) is gguf_rope.py's.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..errors import UserError
from ..families import FAMILIES, family_of
from .gguf_rope import add_scaling, llama3_rope_factors, rope, rope_problem

if TYPE_CHECKING:
    import torch

WAY_OUT = ("export safetensors (--format safetensors) and convert that with llama.cpp's convert_hf_to_gguf.py, "
           "then check its answers against `domaintune predict`")


@dataclass(frozen=True)
class Rules:
    """One llama.cpp architecture: `classes`, the transformers classes written as it; `tensor_map`, the
    `gguf.MODEL_ARCH` member whose name table applies."""

    classes: tuple[str, ...]
    tensor_map: str


RULES = {
    # convert_hf_to_gguf.py LlamaModel registers LlamaForCausalLM and MistralForCausalLM as one architecture.
    "llama": Rules(("LlamaForCausalLM", "MistralForCausalLM"), "LLAMA"),
    "qwen2": Rules(("Qwen2ForCausalLM",), "QWEN2"),
    "bloom": Rules(("BloomForCausalLM",), "BLOOM"),
    "qwen3": Rules(("Qwen3ForCausalLM",), "QWEN3"),
    "qwen3moe": Rules(("Qwen3MoeForCausalLM",), "QWEN3MOE"),
    "qwen35": Rules(("Qwen3_5ForCausalLM",), "QWEN35"),
    "gemma3": Rules(("Gemma3ForCausalLM",), "GEMMA3"),
    "phi3": Rules(("Phi3ForCausalLM",), "PHI3"),
    "glm4": Rules(("Glm4ForCausalLM",), "GLM4"),
}


def supported() -> str:
    """The families this export writes, for the refusals' messages."""
    return ", ".join(f.name for f in FAMILIES if f.gguf in RULES)


def check(conf: dict) -> str:
    """The llama.cpp architecture of a model config (config.json as a dict), or UserError naming why it is
    refused and the way out. Reads the config only: called before the weights load."""
    arch_cls = (conf.get("architectures") or [""])[0]
    fam = family_of(conf.get("model_type"))
    arch = fam.gguf
    if arch is None or arch not in RULES:
        why = fam.gguf_refusal or (f"{arch_cls or 'this model'} (model type {conf.get('model_type')!r}) has no GGUF "
                                   "conversion here")
        raise UserError(f"--format gguf: {why} (domaintune writes GGUF for {supported()}); {WAY_OUT}")
    if arch_cls and arch_cls not in RULES[arch].classes:
        raise UserError(f"--format gguf: {arch_cls} is not converted (for the {fam.name} family domaintune writes "
                        f"{', '.join(RULES[arch].classes)}: text models only); {WAY_OUT}")
    if (problem := rope_problem(arch, conf)) is not None:
        raise _refuse(arch, *problem)
    {"gemma3": _check_gemma3, "qwen3moe": _check_qwen3moe, "qwen35": _check_qwen35}.get(arch, lambda c: None)(conf)
    return arch


def _refuse(arch: str, what: str, way_out: str | None = None) -> UserError:
    return UserError(f"--format gguf: {what}, so llama.cpp's {arch} would compute other answers than this model; "
                     f"{way_out or WAY_OUT}")


def _check_gemma3(conf: dict) -> None:
    # llama.cpp's Gemma 3 loader (llama-model.cpp, LLM_ARCH_GEMMA3) fixes what the config states: every 6th layer
    # is full attention (set_swa_pattern(6)), the sliding layers' rope base is 10000, and queries are scaled by
    # head_dim^-0.5 (by (hidden/heads)^-0.5 for the 62-layer 27B).
    n, window = conf["num_hidden_layers"], conf.get("sliding_window") or 0
    types = conf.get("layer_types") or []
    want = ["sliding_attention" if i % 6 < 5 else "full_attention" for i in range(n)]
    if window and window < conf["max_position_embeddings"] and list(types) != want:
        full = [i for i, t in enumerate(types) if t == "full_attention"]
        raise _refuse("gemma3", f"its full-attention layers are {full}, where llama.cpp's Gemma 3 makes every 6th "
                                f"layer full attention ({[i for i, t in enumerate(want) if t == 'full_attention']})")
    local = (conf.get("rope_parameters") or {}).get("sliding_attention", {}).get("rope_theta", 10000.0)
    if float(local) != 10000.0:
        raise _refuse("gemma3", f"its sliding layers' rope_theta is {local}, where llama.cpp's Gemma 3 uses 10000")
    scale = conf["hidden_size"] // conf["num_attention_heads"] if n == 62 else conf["head_dim"]
    if conf.get("query_pre_attn_scalar", scale) != scale:
        raise _refuse("gemma3", f"query_pre_attn_scalar is {conf['query_pre_attn_scalar']}, where llama.cpp's "
                                f"Gemma 3 of {n} layers scales queries by {scale}^-0.5")
    if conf.get("attn_logit_softcapping"):
        raise _refuse("gemma3", "it soft-caps attention logits (llama.cpp's Gemma 3 does not)")


def _check_qwen3moe(conf: dict) -> None:
    # llama.cpp's qwen3moe graph routes every layer through the experts and renormalises the top-k weights.
    if conf.get("mlp_only_layers") or conf.get("decoder_sparse_step", 1) != 1:
        raise _refuse("qwen3moe", "some of its layers are dense (mlp_only_layers / decoder_sparse_step)")
    if not conf.get("norm_topk_prob", True):
        raise _refuse("qwen3moe", "norm_topk_prob is false (llama.cpp renormalises the chosen experts' weights)")


def _check_qwen35(conf: dict) -> None:
    # llama.cpp's qwen35 places full attention on every `full_attention_interval`-th layer (the converter writes
    # the interval, Qwen3NextModel.set_gguf_parameters); another layout cannot be written.
    types = conf.get("layer_types") or []
    if _interval(types) is None:
        raise _refuse("qwen35", f"its layer_types {types} are not linear attention with full attention on every "
                                "n-th layer")
    if _interval(types) == 1:  # llama.cpp's hybrid memory fails without a recurrent layer (GGML_ASSERT(buffer))
        raise _refuse("qwen35", "it has no linear-attention layer")


def _interval(types: list[str]) -> int | None:
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    if not full:
        return None
    k = full[0] + 1
    return k if types == ["full_attention" if (i + 1) % k == 0 else "linear_attention"
                          for i in range(len(types))] else None


# ------------------------------------------------------------------ hyperparameters
def add_hparams(gguf: Any, w: Any, arch: str, conf: dict, tok: Any) -> None:
    if arch == "bloom":
        return _bloom_hparams(w, conf, tok)
    n_head = conf["num_attention_heads"]
    head_dim = conf.get("head_dim") or conf["hidden_size"] // n_head
    r = rope(conf)
    w.add_context_length(conf["max_position_embeddings"])
    w.add_embedding_length(conf["hidden_size"])
    w.add_feed_forward_length(conf["intermediate_size"])
    w.add_block_count(conf["num_hidden_layers"])
    w.add_head_count(n_head)
    w.add_head_count_kv(conf.get("num_key_value_heads") or n_head)
    w.add_layer_norm_rms_eps(conf["rms_norm_eps"])
    w.add_vocab_size(conf["vocab_size"])
    if head_dim != conf["hidden_size"] // n_head or arch == "gemma3":  # Gemma3Model.set_gguf_parameters: always
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "phi3":  # Phi3MiniModel.set_gguf_parameters: the rotary part of hidden/heads
        w.add_rope_dimension_count(int(r["partial_rotary_factor"] * conf["hidden_size"]) // n_head)
    else:  # Glm4Model / Qwen3NextModel: int(head_dim * partial_rotary_factor); others rotate the whole head
        w.add_rope_dimension_count(int(head_dim * r["partial_rotary_factor"]))
    w.add_rope_freq_base(float(r["rope_theta"]))
    add_scaling(gguf, w, r)
    {"qwen3moe": _moe_hparams, "qwen35": _qwen35_hparams, "gemma3": _gemma3_hparams,
     "phi3": _phi3_hparams}.get(arch, lambda w, c: None)(w, conf)


def _bloom_hparams(w: Any, conf: dict, tok: Any) -> None:
    n_embd, n_head = conf["hidden_size"], conf["n_head"]
    # BLOOM's config states no context length; ALiBi has no trained maximum, 2048 is what BLOOM trained on.
    max_len = getattr(tok, "model_max_length", 0)
    w.add_context_length(int(conf.get("seq_length") or (max_len if 0 < max_len < 1_000_000 else 2048)))
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(4 * n_embd)
    w.add_block_count(conf["n_layer"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_layer_norm_eps(conf["layer_norm_epsilon"])
    w.add_vocab_size(conf["vocab_size"])


def _moe_hparams(w: Any, conf: dict) -> None:
    # Qwen2MoeModel.set_gguf_parameters and TextModel's expert keys (transformers 5 says num_local_experts).
    w.add_expert_count(conf.get("num_local_experts") or conf["num_experts"])
    w.add_expert_used_count(conf["num_experts_per_tok"])
    w.add_expert_feed_forward_length(conf["moe_intermediate_size"])


def _qwen35_hparams(w: Any, conf: dict) -> None:
    # Qwen3NextModel.set_gguf_parameters: the Gated DeltaNet sizes as llama.cpp's ssm keys.
    w.add_ssm_conv_kernel(conf["linear_conv_kernel_dim"])
    w.add_ssm_state_size(conf["linear_key_head_dim"])
    w.add_ssm_group_count(conf["linear_num_key_heads"])
    w.add_ssm_time_step_rank(conf["linear_num_value_heads"])
    w.add_ssm_inner_size(conf["linear_value_head_dim"] * conf["linear_num_value_heads"])
    w.add_full_attention_interval(_interval(conf["layer_types"]))
    # _Qwen35MRopeMixin: llama.cpp's qwen35 loader requires the interleaved M-RoPE sections, [11, 11, 10] by
    # default. A text token has one position in the t, h and w sections, so any split of the rotated pairs among
    # them is plain rope, as long as every pair is in one: interleaved, pair i goes to section i % 3 (ggml's
    # imrope), so a head with p pairs needs [ceil(p/3), ceil((p-1)/3), p//3] (the default for 32 pairs).
    r = rope(conf)
    pairs = int(conf["head_dim"] * r["partial_rotary_factor"]) // 2
    sections = list(r.get("mrope_section") or [])
    if sum(sections) != pairs:
        sections = [-(-pairs // 3), -(-(pairs - 1) // 3), pairs // 3]
    w.add_rope_dimension_sections((sections + [0, 0, 0, 0])[:4])


def _gemma3_hparams(w: Any, conf: dict) -> None:
    # Gemma3Model.set_gguf_parameters: the window (checked against llama.cpp's fixed layout in _check_gemma3) and
    # the final soft-capping when the config has one.
    if conf.get("sliding_window"):
        w.add_sliding_window(conf["sliding_window"])
    if conf.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(conf["final_logit_softcapping"])


def _phi3_hparams(w: Any, conf: dict) -> None:
    # Phi3MiniModel.set_gguf_parameters: the original context length, and the window (0: none).
    orig = (conf.get("rope_parameters") or {}).get("original_max_position_embeddings")
    w.add_rope_scaling_orig_ctx_len(int(orig or conf.get("original_max_position_embeddings")
                                        or conf["max_position_embeddings"]))
    w.add_sliding_window(conf.get("sliding_window") or 0)


# ------------------------------------------------------------------ tensors
Layout = Callable[["torch.Tensor"], "torch.Tensor"]


def tensors(gguf: Any, model: Any, arch: str, conf: dict) -> Iterator[tuple[str, torch.Tensor, Layout | None]]:
    """(GGUF name, source tensor, the function giving llama.cpp's layout or None) for every tensor of the file,
    in the model's order. The functions are applied when the tensor is written (one in memory at a time) and
    work on meta tensors too, which is how the writer learns the shapes beforehand."""
    import torch

    n_blocks = conf["n_layer"] if arch == "bloom" else conf["num_hidden_layers"]
    tmap = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, RULES[arch].tensor_map), n_blocks)
    # Tied embeddings: llama.cpp uses token_embd for the output when the file has no output tensor.
    tied = arch in ("bloom", "gemma3") or conf.get("tie_word_embeddings", False)
    for hf_name, t in model.state_dict().items():
        if hf_name.endswith(".rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        for key, layout in _split(arch, conf, hf_name, t):
            name = tmap.get_name(key.removeprefix("transformer.") if arch == "bloom" else key,
                                 try_suffixes=(".weight", ".bias"))
            if name is None:
                raise UserError(f"--format gguf: no GGUF name for tensor {hf_name!r} of this {arch} model; "
                                "this model differs from the stock architecture")
            yield name, t, layout
    if arch == "llama" and rope(conf)["rope_type"] == "llama3":
        yield "rope_freqs.weight", torch.tensor(llama3_rope_factors(conf), dtype=torch.float32), None


def _split(arch: str, conf: dict, name: str, t: torch.Tensor) -> list[tuple[str, Layout | None]]:
    """The (HF-style name, layout) pieces one HF tensor becomes (usually one)."""
    n_head: int = conf.get("num_attention_heads") or conf.get("n_head") or 0
    n_kv = conf.get("num_key_value_heads") or n_head
    if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
        return [(name, functools.partial(_permute, n_head=n_head))]
    if arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
        return [(name, functools.partial(_permute, n_head=n_kv))]
    if arch == "bloom" and name.endswith(("query_key_value.weight", "query_key_value.bias")):
        return [(name, functools.partial(_bloom_qkv, n_head=n_head))]
    if arch == "qwen3moe" and name.endswith("mlp.experts.gate_up_proj"):
        # Qwen2MoeModel.modify_tensors: the stacked [experts, 2*ff, hidden] gate_up splits on dim -2 into the
        # gate (first half) and up (second half) experts; down_proj [experts, hidden, ff] is taken as it is.
        base, ff = name.removesuffix("gate_up_proj"), t.shape[-2] // 2
        return [(base + "gate_proj.weight", lambda x: x[..., :ff, :]),
                (base + "up_proj.weight", lambda x: x[..., ff:, :])]
    if arch == "qwen3moe" and name.endswith("mlp.experts.down_proj"):
        return [(name + ".weight", None)]
    if arch == "gemma3" and name.endswith("norm.weight"):
        # Gemma3Model.modify_tensors: Gemma3RMSNorm computes x * (1 + w); llama.cpp's norm computes x * w.
        return [(name, _plus_one)]
    if arch == "qwen35":
        return [_qwen35(conf, name)]
    return [(name, None)]


def _qwen35(conf: dict, name: str) -> tuple[str, Layout | None]:
    """Qwen3NextModel.modify_tensors and _LinearAttentionVReorderBase (conversion/qwen.py)."""
    nk, nv = conf["linear_num_key_heads"], conf["linear_num_value_heads"]
    dk, dv = conf["linear_key_head_dim"], conf["linear_value_head_dim"]
    steps: list[Layout] = []
    if nk != nv and ".linear_attn." in name:
        # The value heads are grouped by key head in HF ([k0: v0 v1, k1: v0 v1]); llama.cpp broadcasts the key
        # heads tiled ([k0 v0, k1 v0, k0 v1, k1 v1]), so every tensor indexed by value head is reordered.
        def heads(dim: int, size: int) -> Layout:
            return functools.partial(_tile_v_heads, dim=dim, nk=nk, per_k=nv // nk, size=size)

        if ".in_proj_qkv." in name:  # q and k rows first, then the value rows
            steps.append(functools.partial(_after_rows, rows=2 * nk * dk, f=heads(0, dv)))
        elif ".in_proj_z." in name:
            steps.append(heads(0, dv))
        elif ".in_proj_a." in name or ".in_proj_b." in name:
            steps.append(heads(0, 1))
        elif name.endswith((".A_log", ".dt_bias")):
            steps.append(heads(0, 1))
        elif ".conv1d." in name:  # channels: q, k, then v (the kernel's middle dimension of 1 is dropped below)
            steps.append(functools.partial(_after_rows, rows=2 * nk * dk, f=heads(0, dv)))
        elif ".out_proj." in name:
            steps.append(heads(1, dv))
    if name.endswith(".A_log"):  # llama.cpp stores A itself: -exp(A_log) (as blk.N.ssm_a, no .weight)
        steps.append(lambda x: -x.float().exp())
    elif name.endswith(".dt_bias"):  # the time-step bias is llama.cpp's ssm_dt.bias
        name = name.removesuffix(".dt_bias") + ".dt_proj.bias"
    elif ".conv1d." in name:
        steps.insert(0, lambda x: x.squeeze(1))  # [channels, 1, kernel] -> [channels, kernel]
    elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        steps.append(_plus_one)  # Qwen3_5RMSNorm computes x * (1 + w); the gated norm of linear attention does not
    if not steps:
        return name, None
    return name, functools.partial(_chain, steps=tuple(steps))


def _chain(x: torch.Tensor, steps: tuple[Layout, ...]) -> torch.Tensor:
    for f in steps:
        x = f(x)
    return x


def _plus_one(x: torch.Tensor) -> torch.Tensor:
    return x.float() + 1


def _tile_v_heads(x: torch.Tensor, dim: int, nk: int, per_k: int, size: int) -> torch.Tensor:
    shape = list(x.shape)
    x = x.reshape(*shape[:dim], nk, per_k, size, *shape[dim + 1:])
    return x.transpose(dim, dim + 1).reshape(shape)


def _after_rows(x: torch.Tensor, rows: int, f: Layout) -> torch.Tensor:
    import torch

    return torch.cat([x[:rows], f(x[rows:])], dim=0)


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF LLaMA checkpoints rotate halves (rotate_half); llama.cpp's llama rope rotates adjacent pairs. The
    rows of q and k are reordered per head so both compute the same thing (llama.cpp's converter, `permute`)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _bloom_qkv(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """BLOOM interleaves q, k and v per head in query_key_value; llama.cpp wants all q rows, then k, then v."""
    import torch

    rest = t.shape[1:]
    per_head = t.reshape(n_head, 3, t.shape[0] // n_head // 3, *rest)
    return torch.cat([per_head[:, i].reshape(-1, *rest) for i in range(3)], dim=0)
