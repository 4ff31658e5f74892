"""RoPE in the GGUF export: the rope settings of a config, which of them llama.cpp can compute (`rope_problem`), and
the keys that carry a scaling (`add_scaling`: gguf's Keys.Rope.SCALING_TYPE, SCALING_FACTOR, SCALING_ORIG_CTX_LEN,
as llama.cpp's converter writes them in TextModel.set_gguf_parameters).

A run trained with `model.rope_scaling` (training/rope.py) is exported with the same scaling: linear and yarn have
llama.cpp equivalents; dynamic NTK has none and is refused with the reason.
"""
from __future__ import annotations

import math
from typing import Any

# A RoPE scaling llama.cpp has no equivalent of, and why (llama.cpp's LLAMA_ROPE_SCALING_TYPE_* and
# gguf.RopeScalingType: none, linear, yarn, longrope).
NO_GGUF_ROPE = {
    "dynamic": ("rope scaling 'dynamic' (dynamic NTK) has no llama.cpp equivalent: llama.cpp's rope scaling types "
                "are none, linear, yarn and longrope, and it keeps one frequency table where transformers recomputes "
                "the rope base from each sequence's length past the native one",
                "serve the run with `domaintune serve` (transformers), or train with model.rope_scaling rope_type "
                "linear or yarn, which export to GGUF"),
}
# yarn settings the converter writes no key for (it writes type, factor and the original length): llama.cpp computes
# yarn with these defaults (attention factor 0.1 ln(factor) + 1, a truncated correction range), so other values
# would compute other answers.
YARN_DEFAULTS = {"attention_factor": None, "beta_fast": 32, "beta_slow": 1, "mscale": None, "mscale_all_dim": None,
                 "truncate": True}


def rope(conf: dict) -> dict:
    """The rope settings of a config, transformers 5 (`rope_parameters`, per layer type for Gemma 3: the full
    attention layers' here) or 4 (`rope_theta`, `rope_scaling`)."""
    params = dict(conf.get("rope_parameters") or conf.get("rope_scaling") or {})
    params = dict(params.get("full_attention", params))
    params.setdefault("rope_theta", conf.get("rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type") or "default")
    params.setdefault("partial_rotary_factor", conf.get("partial_rotary_factor", 1.0))
    return params


def rope_problem(arch: str, conf: dict) -> tuple[str, str | None] | None:
    """(why llama.cpp's `arch` would compute this config's rope differently, the way out when it is not the usual
    one), or None."""
    r = rope(conf)
    kind = r["rope_type"] if arch != "bloom" else "default"
    # As the converter's TextModel.set_gguf_parameters: linear and yarn scaling have GGUF keys; llama3 (Llama 3.1+)
    # is llama's rope_freqs tensor (LlamaModel.generate_extra_tensors). Phi-3's longrope factors are not tested.
    ok: tuple[str, ...] = ("default", "linear", "yarn", "llama3") if arch == "llama" else ("default", "linear", "yarn")
    if arch in ("phi3", "qwen35"):
        ok = ("default",)
    if kind in NO_GGUF_ROPE:
        return NO_GGUF_ROPE[kind]
    if kind not in ok:
        return f"rope scaling {kind!r} is not supported for {arch} (supported: {', '.join(ok)})", None
    odd = {k: r[k] for k, v in YARN_DEFAULTS.items() if r.get(k) is not None and r[k] != v} if kind == "yarn" else {}
    if odd:
        return f"yarn scaling with {odd}: the GGUF has no key for these and llama.cpp uses {YARN_DEFAULTS}", None
    return None


def add_scaling(gguf: Any, w: Any, r: dict) -> None:
    """The scaling keys of the rope settings `r` (`rope`): type and factor; yarn's original context length too."""
    if r["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(r["factor"]))
    elif r["rope_type"] == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(r["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(r["original_max_position_embeddings"]))


def llama3_rope_factors(conf: dict) -> list[float]:
    """Llama 3.1+'s frequency-dependent rope scaling as llama.cpp's `rope_freqs` tensor (its converter's
    formula, from Meta's reference code)."""
    r = rope(conf)
    dim = conf.get("head_dim") or conf["hidden_size"] // conf["num_attention_heads"]
    base, factor = float(r["rope_theta"]), float(r.get("factor", 8.0))
    low, high = float(r.get("low_freq_factor", 1.0)), float(r.get("high_freq_factor", 4.0))
    old_ctx = float(r.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out
