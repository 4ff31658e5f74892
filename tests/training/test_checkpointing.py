"""`train.gradient_checkpointing: true` recomputes activations in the backward pass instead of keeping them: the
same losses and the same adapter as without it (LoRA and full fine-tuning), through transformers 5's
activation_checkpointing_enable (no deprecation warning). Before issue 27 no test trained with it on."""
from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file

from domaintune.rundir import RunDir
from domaintune.training.trainer import run_train


def _steps(run) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in RunDir(run).read_log() if "loss" in r]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_checkpointing_trains_the_same_steps(tiny_train_config, tmp_path, lora):
    common = ("train.max_steps=2", "train.eval_steps=2", "train.save_steps=2", f"lora.enabled={str(lora).lower()}")
    plain = run_train(tiny_train_config(tmp_path / "plain", "qwen2", *common, "train.gradient_checkpointing=false"))
    with warnings.catch_warnings():
        # the deprecated gradient_checkpointing_enable is not called (peft itself still reads is_gradient_checkpointing)
        warnings.filterwarnings("error", message=".*gradient_checkpointing_enable.*", category=FutureWarning)
        ckpt = run_train(tiny_train_config(tmp_path / "ckpt", "qwen2", *common, "train.gradient_checkpointing=true"))
    assert RunDir(ckpt).run_info()["train"]["path"]["gradient_checkpointing"] is True
    assert RunDir(plain).run_info()["train"]["path"]["gradient_checkpointing"] is False
    a, b = _steps(plain), _steps(ckpt)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2]
    assert [x for _, x in b] == pytest.approx([x for _, x in a], rel=1e-5)
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    pa, pb = load_file(str(plain / weights)), load_file(str(ckpt / weights))
    assert pa.keys() == pb.keys()
    assert all(torch.allclose(pa[k], pb[k], atol=1e-5) for k in pa)
