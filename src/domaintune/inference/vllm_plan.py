"""What vLLM loads for a run and how it is asked (pure: files and settings only; vllm_engine.py runs it).

- `plan_load`: the weights, tokenizer, LoRA adapter and quantization vLLM gets for a run or model directory:
  a LoRA run's base model with `enable_lora` and `max_lora_rank` (the adapter's rank rounded up to one vLLM
  accepts), the adapter going with every request; a full-model run, an exported (merged) model or a plain model
  directory: the directory itself. A QLoRA run with `model.quantization: 4bit` gets its base quantized to 4 bits
  in flight by vLLM (`quantization="bitsandbytes"`, LoRA on top: vLLM docs features/quantization/bnb.md and
  examples/offline_inference/lora_with_quantization_inference.py), so the adapter runs on a 4-bit base as in
  training and under `--engine hf`. `8bit` is refused (vLLM quantizes in flight to 4 bits only): `domaintune
  export` merges the adapter into the unquantized base, and the export is served as a plain model.
- The model's family (config.json's `model_type`, read without loading anything; families.py) decides before
  vLLM starts: a family whose record says vLLM does not serve it is refused with `--engine hf` as the way out,
  and a LoRA run on a family vLLM serves without LoRA support (the record's `vllm_lora`) is refused with the
  export as the way out. A model_type no family lists is left to vLLM (it serves many more architectures than
  domaintune lists).
- RoPE scaling (model.rope_scaling, training/rope.py): vLLM would load a LoRA run's base unscaled, so such a run is
  refused with the export (whose config.json carries the scaling, which vLLM reads) as the way out; a directory
  whose config.json asks for dynamic NTK is refused (vLLM fixes one frequency table where transformers recomputes
  it per sequence length).
- `engine_args`, `sampling_kwargs`: vLLM's `AsyncEngineArgs` and `SamplingParams` keyword arguments.
- `target_nll`, `loss_summary`: the teacher-forced loss from vLLM's prompt logprobs, reported as
  evaluation/loss.py reports it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import UserError
from ..families import UNKNOWN, family_of
from ..rundir import ADAPTER_CONFIG, MODEL_CONFIG
from ..training.rope import describe, scaling_of
from .params import GenerationParams, RequestParams

if TYPE_CHECKING:
    from .loading import RunSource

LORA_RANKS = (8, 16, 32, 64, 128, 256, 512)  # max_lora_rank values vLLM accepts (512 in recent versions only)
VLLM_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
@dataclass(frozen=True)
class VLLMPlan:
    """What vLLM loads: `model` (the adapter's base, or the directory), `tokenizer` (the run's), `lora_path` (the
    adapter passed with every request) and its `max_lora_rank`, `quantization` ("bitsandbytes": a QLoRA base)."""

    model: str
    tokenizer: str
    lora_path: str | None
    max_lora_rank: int | None
    quantization: str | None
    trust_remote_code: bool
    revision: str | None
    allow_pickle: bool


def max_lora_rank(run_dir: str | Path) -> int:
    """The smallest max_lora_rank vLLM accepts that holds the adapter's ranks (`r`, and any in `rank_pattern`)."""
    path = Path(run_dir) / ADAPTER_CONFIG
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        r = max([int(cfg["r"]), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: cannot read the adapter's rank r ({e}); is the run directory complete?") from None
    merge = f"merge it (`domaintune export {run_dir}`) and serve the exported folder, or use `--engine hf`"
    # vLLM's own check (vllm/lora/peft_helper.py, PEFTHelper._validate_features) refuses both, but only when the
    # first request arrives, after the engine has started: said here, before anything loads.
    if cfg.get("use_dora"):
        raise UserError(f"{path}: a DoRA adapter (lora.use_dora), which vLLM cannot apply (it serves plain LoRA "
                        f"only): {merge}")
    if str(cfg.get("init_lora_weights")).lower().startswith(("pissa", "olora")):  # training/lora_methods.py
        raise UserError(f"{path}: a checkpoint of a lora.init {cfg['init_lora_weights']} run, whose adapter applies "
                        "to the base with its principal directions taken out, which vLLM does not do: serve the "
                        f"finished run (its adapter is converted for the original base), or {merge}")
    if cfg.get("modules_to_save"):
        raise UserError(f"{path}: an adapter with fully trained modules (lora.modules_to_save "
                        f"{cfg['modules_to_save']}), which vLLM cannot apply: {merge}")
    if r > LORA_RANKS[-1]:
        raise UserError(f"{path}: LoRA rank {r} is above vLLM's largest max_lora_rank ({LORA_RANKS[-1]}): {merge}")
    return next(b for b in LORA_RANKS if r <= b)


def model_type_of(name: str, revision: str | None = None) -> str | None:
    """config.json's `model_type` of a local model directory or of a hub model in the local cache, read without
    loading anything; None when there is no such file here or it names none."""
    path = Path(name).expanduser() / MODEL_CONFIG
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(name, MODEL_CONFIG, revision=revision)
        except Exception:  # noqa: BLE001 - not a hub id, or no cache: nothing known here
            hit = None
        if not isinstance(hit, str):
            return None
        path = Path(hit)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kind = cfg.get("model_type") if isinstance(cfg, dict) else None
    return kind if isinstance(kind, str) else None


def check_family(model: str, where: str | Path, lora: bool, revision: str | None = None) -> None:
    """UserError, before anything loads, when vLLM does not serve the family of `model` (the directory or hub id vLLM
    would load for the run at `where`), or cannot apply a LoRA adapter to it (`lora`: the run's adapter goes with
    every request). A model_type no family lists passes: vLLM decides."""
    kind = model_type_of(model, revision)
    family = family_of(kind)
    if family is UNKNOWN:
        return
    if not family.vllm:
        raise UserError(f"'{where}' is a {family.name} model (model_type {kind}), which vLLM does not serve: use "
                        "`--engine hf` (the default engine)")
    if lora and not family.vllm_lora:
        raise UserError(f"'{where}' is a LoRA adapter on a {family.name} model, and vLLM has no LoRA support for "
                        f"{family.name} (its supported-models list): merge it "
                        f"(`domaintune export {where}`) and serve the exported folder with --engine vllm, or use "
                        "`--engine hf`")


def plan_load(src: RunSource, base_only: bool = False, allow_pickle: bool = False) -> VLLMPlan:
    """What vLLM loads for `src` (see the module docstring); UserError for what it cannot serve."""
    from ..training.model import check_model_source, check_no_pickle_only

    if not (src.adapter or base_only) or src.base is None:
        check_family(str(src.path), src.path, lora=False)
        check_rope(src.path)
        return VLLMPlan(str(src.path), str(src.path), None, None, None, src.trust_remote_code, None, allow_pickle)
    base, pickles = src.base, allow_pickle or src.base.allow_pickle
    if base.rope_scaling:
        kind = base.rope_scaling.get("rope_type", base.rope_scaling.get("type"))
        way_out = ("use `--engine hf` (vLLM computes dynamic NTK scaling differently from transformers, so an export "
                   "is refused too)" if kind == "dynamic" else
                   f"merge it (`domaintune export {src.path}`; the export's config.json carries the scaling, which "
                   "vLLM reads) and serve the exported folder with --engine vllm, or use `--engine hf`")
        raise UserError(f"'{src.path}' was trained with model.rope_scaling ({describe(base.rope_scaling)}), which vLLM "
                        f"would not apply to the base model it loads: {way_out}")
    if base.quantization == "8bit":
        raise UserError(f"'{src.path}' is a QLoRA run on an 8-bit base, which vLLM cannot load (it quantizes to 4 "
                        f"bits only): merge it (`domaintune export {src.path}`) and serve the exported folder with "
                        "--engine vllm, or use `--engine hf`")
    name = check_model_source(base.required_name())
    check_no_pickle_only(name, pickles)
    check_family(name, src.path, lora=not base_only, revision=base.revision)
    lora = None if base_only else str(src.path.resolve())
    return VLLMPlan(name, str(src.path), lora, None if base_only else max_lora_rank(src.path),
                    "bitsandbytes" if base.quantization == "4bit" else None, src.trust_remote_code, base.revision,
                    pickles)


def check_rope(path: Path) -> None:
    """UserError for a model directory whose config.json asks for dynamic NTK RoPE scaling: vLLM computes one
    frequency table for its longest context, transformers (`--engine hf`, predict) recomputes it per sequence
    length, so their answers differ. Linear and yarn compute the same in both and pass."""
    try:
        conf = json.loads((path / MODEL_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    scaling = scaling_of(conf) if isinstance(conf, dict) else None
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "dynamic":
        raise UserError(f"'{path}' uses dynamic NTK RoPE scaling ({describe(scaling)}), which vLLM computes as one "
                        "frequency table for its longest context where transformers recomputes it for each sequence "
                        "length, so vLLM would answer differently from `domaintune predict`: use `--engine hf`")


def vllm_dtype(name: str) -> str:
    """vLLM's dtype for a domaintune dtype name. "auto" stays vLLM's own rule (the checkpoint's dtype; fp32 runs in
    bf16 where the GPU has it, else fp16), which is `resolve_dtype`'s except that fp16 checkpoints stay fp16; it
    needs no CUDA context in this process (vLLM's engine process may then fork)."""
    if name == "auto":
        return "auto"
    if name not in VLLM_DTYPES:
        raise UserError(f"--dtype {name!r}: choose auto, {', '.join(VLLM_DTYPES)}")
    return VLLM_DTYPES[name]


def engine_args(plan: VLLMPlan, max_num_seqs: int, dtype: str, extra: dict | None = None) -> dict:
    """Keyword arguments of vLLM's `AsyncEngineArgs`. `extra`: the caller's vLLM options (gpu_memory_utilization,
    max_model_len, enforce_eager, ...), which may not override what the run and domaintune's flags decide."""
    kw: dict[str, Any] = dict(model=plan.model, tokenizer=plan.tokenizer, trust_remote_code=plan.trust_remote_code,
                              dtype=dtype, max_num_seqs=max_num_seqs, revision=plan.revision)
    if plan.lora_path:
        kw.update(enable_lora=True, max_lora_rank=plan.max_lora_rank, max_loras=1)
    if plan.quantization:
        kw["quantization"] = plan.quantization
    elif not plan.allow_pickle:
        kw["load_format"] = "safetensors"
    extra = dict(extra or {})
    clash = sorted((set(extra) & set(kw)) | ({"trust_remote_code", "enable_lora", "quantization"} & set(extra)))
    if clash:
        raise UserError(f"vLLM option(s) {', '.join(clash)}: decided by the run directory and domaintune's flags "
                        "(--dtype, --max-batch-size), not settable as vLLM options")
    return {"disable_log_stats": True, **kw, **extra}


def sampling_kwargs(params: GenerationParams, stop_ids: Sequence[int], stop_strings: Sequence[str]) -> dict:
    """Keyword arguments of vLLM's `SamplingParams` (greedy: temperature 0; top_k 0 = off: -1, as vLLM reads it).
    A server request's OpenAI penalties and logit_bias (RequestParams) go to vLLM's fields of the same names, which
    count generated tokens only, as `params.OpenAIPenalties` does for `--engine hf`."""
    if params.num_beams > 1:
        raise UserError("--engine vllm decodes greedily or by sampling, not by beam search (num_beams > 1): "
                        "use --engine hf for beam search")
    kw: dict[str, Any] = dict(max_tokens=params.max_new_tokens, repetition_penalty=params.repetition_penalty,
                              stop_token_ids=list(stop_ids), ignore_eos=True, stop=list(stop_strings) or None,
                              seed=params.seed, skip_special_tokens=True, temperature=0.0)
    if params.do_sample:
        kw.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or -1)
    if isinstance(params, RequestParams) and params.penalised:
        kw.update(presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                  logit_bias=dict(params.logit_bias) or None)
    return kw


def target_nll(labels: Sequence[int], prompt_logprobs: Sequence[Any], ignore: int = -100) -> tuple[float, int]:
    """(summed negative log-likelihood, count) of one sample's labelled tokens from vLLM's prompt logprobs (entry p:
    {token id: Logprob or float} of the token at position p given those before it)."""
    total, count = 0.0, 0
    for p in range(1, len(labels)):
        if labels[p] != ignore:
            lp = prompt_logprobs[p][labels[p]]
            total, count = total - float(getattr(lp, "logprob", lp)), count + 1
    return total, count


def loss_summary(total: float, count: int, reduce: Any = None) -> dict:
    """{"loss", "perplexity", "target_tokens"} as evaluation/loss.py reports them; {} without target tokens."""
    if reduce is not None:
        total, n = reduce([total, float(count)])
        count = int(round(n))
    if count == 0:
        return {}
    mean = total / count
    return {"loss": round(mean, 6), "perplexity": round(math.exp(min(mean, 50)), 4), "target_tokens": count}


