"""Long context: `model.rope_scaling` laid over the base model's RoPE when it loads.

transformers 5 keeps every rope setting in `config.rope_parameters` ({rope_type, rope_theta, factor, ...}; the
`rope_scaling` and top-level `rope_theta` of transformers 4 are read into it); `modeling_rope_utils` computes the
frequencies from it. The override keeps what is the base's own (rope_theta, partial_rotary_factor, M-RoPE
sections) and replaces its scaling (rope_type and the keys of a scaling type) by the run's.

The native length is the base's `max_position_embeddings`. The scaled config states the length it holds, as the
Hub's scaled models do (Gemma 3's linear, DeepSeek's yarn): linear and yarn set `max_position_embeddings` to
native x factor (yarn's `original_max_position_embeddings` is the native length unless given); dynamic NTK keeps it
native, because transformers stretches the base only past that length. `context_length` reads either back (dynamic:
x factor); the Engine (predict, chat, serve) bounds prompts by it, and the GGUF states it.

The run records the scaling in its config.yaml (model.rope_scaling), so a LoRA run's base is loaded scaled by every
verb (inference/loading.py calls `load_base_model` with the run's model section); a full run's and a merged
export's config.json carry the scaled config themselves (save_pretrained writes the loaded config).
"""
from __future__ import annotations

from typing import Any

from ..errors import UserError

SCALED = ("linear", "dynamic", "yarn")  # the types whose factor multiplies the native length
# The keys that belong to a scaling type (modeling_rope_utils.RopeParameters): replaced, never mixed with the run's.
SCALING_KEYS = ("type", "rope_type", "factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
                "beta_slow", "short_factor", "long_factor", "low_freq_factor", "high_freq_factor", "mscale",
                "mscale_all_dim", "truncate")


def scaled_parameters(current: dict | None, scaling: dict, native: int) -> dict:
    """The rope parameters of one attention kind under `scaling` (a checked model.rope_scaling): the base's own keys
    (`current`, its rope_theta above all) kept, its scaling replaced; yarn's original length defaults to `native`."""
    params = {k: v for k, v in (current or {}).items() if k not in SCALING_KEYS}
    params.update(scaling)
    if params["rope_type"] == "yarn":
        params.setdefault("original_max_position_embeddings", native)
    return params


def scaled_length(native: int, params: dict) -> int:
    """`max_position_embeddings` under the scaled rope `params`: native x factor (yarn: its original length x
    factor); dynamic NTK keeps the native length, past which transformers stretches the base."""
    if params["rope_type"] == "dynamic":
        return native
    return int((params.get("original_max_position_embeddings") or native) * float(params["factor"]))


def _replace(rope: dict, scaling: dict, native: int, where: str) -> tuple[dict, int]:
    """(`rope`, a config's rope_parameters, with `scaling`; the scaled max_position_embeddings). Per layer type
    (Gemma 3: full and sliding attention), the full-attention layers take it, as Gemma 3's own long-context configs
    scale only those."""
    if rope and all(isinstance(v, dict) for v in rope.values()):
        if "full_attention" not in rope:
            raise UserError(f"model.rope_scaling: {where} has rope parameters per layer type ({', '.join(rope)}) and "
                            "none for full attention, so which layers to scale is not known; remove model.rope_scaling")
        full = scaled_parameters(rope["full_attention"], scaling, native)
        return {**rope, "full_attention": full}, scaled_length(native, full)
    params = scaled_parameters(rope, scaling, native)
    return params, scaled_length(native, params)


def _no_rope(where: str, model_type: Any) -> UserError:
    return UserError(f"model.rope_scaling: {where} (model_type {model_type!r}) has no rotary position embedding to "
                     "scale (BLOOM uses ALiBi, which has no trained maximum); remove model.rope_scaling")


def with_scaling(conf: dict, scaling: dict | None, where: str = "the model") -> dict:
    """A config.json dict as the model loads with `scaling` (model.rope_scaling; None: `conf` as it is). Read before
    any weights load, by the checks of the exports."""
    if not scaling:
        return conf
    rope = dict(conf.get("rope_parameters") or conf.get("rope_scaling") or {})
    for key in ("rope_theta", "partial_rotary_factor"):  # transformers 4 configs keep these at the top level
        if key in conf and not any(isinstance(v, dict) for v in rope.values()):
            rope.setdefault(key, conf[key])
    out = {k: v for k, v in conf.items() if k != "rope_scaling"}
    out["rope_parameters"], out["max_position_embeddings"] = _replace(
        rope, scaling, int(conf.get("max_position_embeddings") or 0), where)
    return out


def apply(config: Any, scaling: dict, where: str) -> None:
    """Set `scaling` (model.rope_scaling) on a transformers config before the model is built from it; UserError for
    a model without RoPE, or parameters transformers refuses."""
    rope = getattr(config, "rope_parameters", None)
    if rope is None:
        raise _no_rope(where, getattr(config, "model_type", None))
    native = int(getattr(config, "max_position_embeddings", 0) or 0)
    config.rope_parameters, config.max_position_embeddings = _replace(dict(rope), scaling, native, where)
    try:
        config.standardize_rope_params()
        config.validate_rope()
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"model.rope_scaling {scaling}: transformers refuses it for {where}: {e}") from None


def scaled_config(src: str, scaling: dict, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """The config of the model at `src` (a resolved local path or hub id) with `scaling` applied: what
    `load_base_model` passes to from_pretrained."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code, revision=revision)
    apply(config, scaling, f"'{src}'")
    return config


def _get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def scaling_of(config: Any) -> dict | None:
    """The linear/dynamic/yarn scaling of a config (a dict or a transformers config; per layer type: the full
    attention layers'), or None."""
    rope = _get(config, "rope_parameters") or _get(config, "rope_scaling")
    if not isinstance(rope, dict):
        return None
    if isinstance(rope.get("full_attention"), dict):
        rope = rope["full_attention"]
    kind = rope.get("rope_type", rope.get("type"))
    return rope if kind in SCALED and isinstance(rope.get("factor"), (int, float)) else None


def context_length(config: Any) -> int | None:
    """The tokens a model holds: `max_position_embeddings`, times the factor of a dynamic NTK scaling (which states
    the native length); for yarn at least original_max_position_embeddings x factor (Qwen's yarn configs keep the
    native length). None when the config states no length."""
    stated = _get(config, "max_position_embeddings")
    if not isinstance(stated, int) or isinstance(stated, bool) or stated <= 0:
        return None
    s = scaling_of(config)
    if s is None:
        return stated
    kind, factor = s.get("rope_type", s.get("type")), float(s["factor"])
    if kind == "dynamic":
        return int(stated * factor)
    orig = s.get("original_max_position_embeddings") if kind == "yarn" else None
    return max(stated, int(orig * factor)) if isinstance(orig, int) else stated


def describe(scaling: dict | None) -> str:
    """`linear x2` for messages; "" without scaling."""
    if not scaling:
        return ""
    return f"{scaling.get('rope_type', scaling.get('type'))} x{float(scaling['factor']):g}"
