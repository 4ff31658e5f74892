"""The one loader: every `from_pretrained` of the project lives here (and in inference/export.py).

- Any AutoModelForCausalLM, from a local directory or a hub id.
- dtype `auto`: bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU.
- LoRA through peft (target modules from the config, or all-linear); full fine-tuning otherwise.
- QLoRA: 4-bit / 8-bit through bitsandbytes, CUDA only.
- A pad token is set when the tokenizer lacks one, without touching EOS.
- trust_remote_code stays off unless the config says so.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from ..rundir import MODEL_CARD, MODEL_CONFIG, PICKLE_SUFFIXES, TOKENIZER_FILES
from .precision import resolve_device, resolve_dtype

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

    from ..config import FreezeConfig, LoraConfig, ModelConfig


def _looks_local(name: str) -> bool:
    """A hub id is exactly `org/name`; anything else, or an `org/` that exists here as a folder, is a path."""
    return (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") != 1
            or Path(name).parent.is_dir())


def check_model_source(name: str, needs: tuple[str, ...] = (MODEL_CONFIG,)) -> str:
    """What to pass to from_pretrained: the absolute path of a local model directory, or the hub id.

    Fails fast (no network wait) when a local-looking model path does not exist. A local path comes back
    resolved, so what from_pretrained records (`name_or_path`, peft's `base_model_name_or_path` in
    adapter_config.json) still works from another working directory.
    """
    p = Path(name).expanduser()
    if p.exists():
        if not any((p / f).is_file() for f in needs):
            raise UserError(f"'{name}' is a directory without {' or '.join(needs)}: not a Hugging Face model directory")
        return str(p.resolve())
    if _looks_local(name):
        hint = (" Build the tiny offline model with `domaintune make-tiny-model runs/tiny-model`."
                if "tiny" in name else "")
        raise UserError(f"model.name_or_path '{name}' does not exist. Point it at a downloaded model directory "
                        f"or a hub id like bigscience/bloomz-560m.{hint}")
    _check_hub_reachable(name)
    return name


def _check_hub_reachable(repo_id: str) -> None:
    """A hub id that is neither cached nor reachable fails in seconds, not after the client's retries."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, MODEL_CONFIG), str):
        return
    # a name like models/my-model is a hub id or a folder: say that no such folder exists either
    folder = f"no folder '{repo_id}' exists under {Path.cwd()}, and "
    if constants.HF_HUB_OFFLINE:  # say so now, not after transformers has been imported only to fail
        raise UserError(f"could not load model '{repo_id}': {folder}as a hub id it is not in the Hugging Face cache "
                        f"and HF_HUB_OFFLINE is set. Download it where you have network access (hf download "
                        f"{repo_id} --local-dir DIR) and set model.name_or_path to DIR")
    import socket
    from urllib.parse import urlparse

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError as e:
        raise UserError(f"model.name_or_path '{repo_id}': {folder}as a hub id it is not in the Hugging Face cache and "
                        f"{url.hostname} cannot be reached ({e}). Download the model where you have network access "
                        "and set model.name_or_path to its directory.") from None


def _load_error(name: str, e: Exception) -> UserError:
    first = str(e).splitlines()[0] if str(e) else ""
    if "safetensors" in first and not Path(name).expanduser().is_dir():  # local pickle-only folders are named earlier
        hint = ("It may hold only pickle weights (.bin): convert them to safetensors, or pass --allow-pickle "
                "(model.allow_pickle: true) if you trust the file.")
    else:
        hint = ("If this is a hub id, download it first (hf download ID --local-dir DIR) and set "
                "model.name_or_path to DIR.")
    return UserError(f"could not load model '{name}': {e.__class__.__name__}: {first}\n{hint}")


def check_no_pickle_only(path: str | Path, allow_pickle: bool) -> None:
    """Refuse a local model folder whose weights exist only as pickles (which can run code when loaded),
    unless the user allows pickles for this model."""
    folder = Path(path).expanduser()
    if allow_pickle or not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(f"'{path}' holds its weights only as pickle files ({', '.join(pickles[:3])}), which can run "
                        "code when loaded. Convert them to safetensors (save_pretrained(..., safe_serialization=True) "
                        "where you trust them), or pass --allow-pickle (model.allow_pickle: true) if you trust them")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False,
                   revision: str | None = None) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    src = check_model_source(name_or_path, (*TOKENIZER_FILES, MODEL_CONFIG))
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, e) from None
    ensure_pad_token(tok)
    return tok


def ensure_pad_token(tok: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token without changing EOS. Labels are built explicitly (padding is -100),
    so padding with EOS does not stop the model from learning EOS."""
    if tok.pad_token_id is not None:
        return
    if tok.unk_token_id is not None and tok.unk_token_id != tok.eos_token_id:
        tok.pad_token = tok.unk_token
    elif tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    else:
        raise UserError("the tokenizer has neither pad, unk nor eos token; add one to the tokenizer files")


def _quant_config(quantization: str, dtype: torch.dtype, sharded: bool = False) -> BitsAndBytesConfig:
    """`sharded` (train.distributed fsdp): the 4-bit weights are stored in `dtype` containers, as FSDP needs to
    shard them with the other parameters (bitsandbytes' quant_storage)."""
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"model.quantization: {quantization} (QLoRA) needs a CUDA GPU with bitsandbytes; "
                        "on CPU set model.quantization: none")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("model.quantization needs bitsandbytes: pip install 'domaintune[qlora]'") from None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        storage = {"bnb_4bit_quant_storage": dtype} if sharded else {}
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype, **storage)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_base_model(model_cfg: ModelConfig, device: str | None = None,
                    dtype: torch.dtype | None = None, sharded: bool = False) -> PreTrainedModel:
    """The base causal LM described by a `model` config section; `sharded`: for FSDP (QLoRA's storage dtype)."""
    from transformers import AutoModelForCausalLM

    src = check_model_source(model_cfg.required_name())
    check_no_pickle_only(src, model_cfg.allow_pickle)
    device = device or resolve_device()
    dtype = dtype or resolve_dtype(model_cfg.dtype, device)
    kwargs = dict(dtype=dtype, trust_remote_code=model_cfg.trust_remote_code, revision=model_cfg.revision,
                  use_safetensors=None if model_cfg.allow_pickle else True)
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    if model_cfg.rope_scaling:  # long context: the run's RoPE scaling over the base's (rope.py)
        from .rope import scaled_config

        kwargs["config"] = scaled_config(src, model_cfg.rope_scaling, model_cfg.trust_remote_code, model_cfg.revision)
    if model_cfg.quantization != "none":
        kwargs["quantization_config"] = _quant_config(model_cfg.quantization, dtype, sharded)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    try:
        model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(model_cfg.required_name(), e) from None
    return model


def prepare_for_training(model: PreTrainedModel, lora_cfg: LoraConfig, quantization: str = "none",
                         gradient_checkpointing: bool = False,
                         freeze: FreezeConfig | None = None) -> PreTrainedModel | PeftModel:
    """Wrap with LoRA, or leave all weights trainable for full fine-tuning, or only some (`freeze`: freeze.py)."""
    if quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        enable_checkpointing(model)
        if lora_cfg.enabled:
            model.enable_input_require_grads()
    if gradient_checkpointing:
        model.config.use_cache = False
    if not lora_cfg.enabled:
        if freeze is not None and freeze.enabled:
            from .freeze import freeze_except

            freeze_except(model, freeze)
        return model
    from .lora_methods import build_peft_model  # DoRA, rsLoRA, the initialisations, modules_to_save, layers

    return build_peft_model(model, lora_cfg)


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Activation (gradient) checkpointing, non-reentrant. transformers 5 renamed gradient_checkpointing_enable to
    activation_checkpointing_enable and warns on the old name; older releases have only the old one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_adapter(base: PreTrainedModel, adapter_dir: str | Path, trainable: bool = False) -> PeftModel:
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)


def load_plain_model(path: str | Path, dtype: torch.dtype | None = None, device: str | None = None,
                     trust_remote_code: bool = False, allow_pickle: bool = False) -> PreTrainedModel:
    """A full (or merged/exported) model directory."""
    from transformers import AutoModelForCausalLM

    check_no_pickle_only(path, allow_pickle)
    device = device or resolve_device()
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or resolve_dtype("auto", device),
                                                    trust_remote_code=trust_remote_code,
                                                    use_safetensors=None if allow_pickle else True)
    except (OSError, ValueError) as e:
        raise _load_error(str(path), e) from None


def _model_file(name_or_path: str, filename: str, revision: str | None = None) -> Path | None:
    """`filename` of a local model directory, or of a hub model already in the Hugging Face cache.
    Never downloads: a hub model that is not cached gives None."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        f = local / filename
        return f if f.is_file() else None
    if _looks_local(name_or_path):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name_or_path, filename, revision=revision)
    except ValueError:  # not a valid repo id after all
        return None
    return Path(cached) if isinstance(cached, str) else None


def model_license(name_or_path: str, revision: str | None = None) -> str | None:
    """The license in the model card's YAML front matter (README.md), if it states one. The card comes
    from a local model directory or, for a hub id, from the Hugging Face cache (never downloaded)."""
    card = _model_file(name_or_path, MODEL_CARD, revision)
    if card is None:
        return None
    text = card.read_text(encoding="utf-8", errors="replace")
    m = re.match(r"^---\s*\n(.*?)\n---", text, re.S)
    if not m:
        return None
    import yaml

    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError:
        return None
    lic = meta.get("license") if isinstance(meta, dict) else None
    return str(lic) if lic else None


def hub_model_id(name_or_path: str) -> str | None:
    """The Hugging Face Hub id of a base model: the name itself when it is one, the id of a local folder that is a
    snapshot in the Hugging Face cache (.../models--ORG--NAME/snapshots/REV), else None (any other local folder)."""
    local = Path(name_or_path).expanduser()
    if not local.exists():
        return None if _looks_local(name_or_path) else name_or_path
    parts = local.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--"):].replace("--", "/")  # the cache's folder name for ORG/NAME
    return None


def describe_base_model(name_or_path: str) -> tuple[str | None, str]:
    """(its hub id or None, a phrase naming it) for a model card: never a path of this machine, which means
    nothing to a reader and tells them how its owner's disk is laid out."""
    hub_id = hub_model_id(name_or_path)
    if hub_id:
        return hub_id, f"[{hub_id}](https://huggingface.co/{hub_id})"
    kind = (base_config_dict(name_or_path) or {}).get("model_type")
    return None, (f"a local {kind + ' ' if isinstance(kind, str) else ''}model (folder "
                  f"`{Path(name_or_path).expanduser().resolve().name}`, not a Hugging Face Hub id)")


def base_config_dict(name_or_path: str, revision: str | None = None) -> dict | None:
    """The model's config.json as a dict, from a local model directory or (hub id) the Hugging Face cache;
    None when it is not available locally or is not a JSON object. Never downloads."""
    import json

    f = _model_file(name_or_path, MODEL_CONFIG, revision)
    if f is None:
        return None
    try:
        obj = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
