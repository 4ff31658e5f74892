"""training/hf_trainer.py: checkpoints without pickles domaintune relies on, RNG state as safetensors, and a run
that diverges stops at the step, keeping the last good checkpoint."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from domaintune.config import build_config
from domaintune.errors import UserError
from domaintune.rundir import RunDir, latest_checkpoint, list_checkpoints
from domaintune.training.hf_trainer import load_rng_state, save_rng_state
from domaintune.training.trainer import run_train

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "data" / "train.jsonl"
PICKLES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def _cfg(model: Path, out: Path, **train) -> object:
    return build_config({
        "model": {"name_or_path": str(model)},
        "lora": {"enabled": False},
        "data": {"path": str(SAMPLE), "cutoff_len": 64, "val_size": 0},
        "train": {"output_dir": str(out), "batch_size": 4, "per_device_batch_size": 4, "max_steps": 3,
                  "logging_steps": 1, "save_steps": 1, "warmup_ratio": 0.0, "learning_rate": 1e-3, **train},
    }, "test")


def _draws() -> tuple:
    import numpy as np
    import torch

    return random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.randn()), \
        torch.rand(3).tolist()


def test_rng_state_round_trips_through_safetensors(tmp_path):
    import numpy as np
    import torch

    random.seed(1)
    random.gauss(0, 1)  # leaves a cached gaussian in the Python generator's state
    np.random.seed(2)
    np.random.randn()  # and one in numpy's
    torch.manual_seed(3)
    path = tmp_path / "rng_state.safetensors"
    save_rng_state(path)
    want = _draws()
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    load_rng_state(path)
    assert _draws() == want
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle


def test_checkpoints_hold_no_pickle_that_resume_needs(tiny_model_dir, tmp_path):
    run = run_train(_cfg(tiny_model_dir("qwen2"), tmp_path / "run", max_steps=2))
    ckpts = list_checkpoints(run)
    assert [c.name for c in ckpts] == ["checkpoint-1", "checkpoint-2"]
    for ckpt in ckpts:
        names = {p.name for p in ckpt.iterdir()}
        assert "rng_state.safetensors" in names and "rng_state.pth" not in names and "training_args.bin" not in names
        # what remains of the Trainer's own format: tensor state dicts it loads with weights_only=True
        assert {p.name for p in ckpt.iterdir() if p.suffix in PICKLES} == {"optimizer.pt", "scheduler.pt"}
    assert not [p.name for p in run.iterdir() if p.suffix in PICKLES]


def test_a_diverging_run_stops_at_the_step_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path):
    """A learning rate of 1e8 with no gradient clipping blows the weights up after the first step."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    with pytest.raises(UserError) as e:
        run_train(_cfg(tiny_model_dir("qwen2"), out, learning_rate=1e8, max_grad_norm=0.0, max_steps=20))
    msg = str(e.value)
    assert msg.startswith("training diverged: the ") and " at step 2 (learning rate 1e+08); stopped before that " \
                                                          "step was applied." in msg
    assert "is nan" in msg or "is inf" in msg
    assert "The last complete checkpoint, checkpoint-1, is intact. Lower train.learning_rate" in msg
    assert latest_checkpoint(out).name == "checkpoint-1" and not (out / "checkpoint-2").exists()
    weights = load_file(str(out / "checkpoint-1" / "model.safetensors"))
    assert all(bool(t.isfinite().all()) for t in weights.values())
    log = RunDir(out).read_log()
    assert [r["step"] for r in log if "loss" in r] == [1] and json.dumps(log).count("NaN") == 0
