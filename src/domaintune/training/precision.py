"""Device and precision: where a model runs and in which dtype it is loaded and trained.

- `resolve_device`: cuda, then mps, then cpu.
- `resolve_dtype`: `auto` = bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU.
- `training_precision`: what full fine-tuning, LoRA and QLoRA load and autocast in.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPES = ("auto", "bf16", "fp16", "fp32")  # the names model.dtype and every --dtype flag take


def resolve_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(name: str, device: str | None = None) -> torch.dtype:
    import torch

    device = device or resolve_device()
    if name == "auto":
        if device.split(":")[0] == "cuda":  # "cuda" or one GPU of several, "cuda:3"
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def training_precision(lora_enabled: bool, quantization: str, dtype: torch.dtype,
                       device: str) -> tuple[torch.dtype, bool, bool]:
    """(dtype to load the weights in, bf16 autocast, fp16 autocast) for a run.

    `dtype` is the resolved model dtype (`resolve_dtype`). Full fine-tuning always loads fp32
    weights: AdamW updates of a pure bf16/fp16 model mostly round to zero (an update of lr 2e-5 is far
    below bf16's resolution near 1), so the master weights must be fp32; on CUDA, bf16/fp16 then runs as
    autocast. LoRA keeps the base in `dtype` (it is frozen; peft keeps the adapter in fp32), QLoRA uses
    `dtype` as its compute dtype.
    """
    import torch

    load_dtype = dtype if lora_enabled or quantization != "none" else torch.float32
    cuda = device == "cuda"
    return load_dtype, cuda and dtype == torch.bfloat16, cuda and dtype == torch.float16
