"""training/outputs.py and the disk: an unwritable or full output folder stops a run before any model loads, and a
disk that fills up during a checkpoint leaves the previous checkpoint intact and the run resumable."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from domaintune.config import build_config
from domaintune.errors import UserError
from domaintune.rundir import RunDir, latest_checkpoint
from domaintune.training import model as loader
from domaintune.training.trainer import run_train

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "data" / "train.jsonl"


def _cfg(model: Path, out: Path, **train) -> object:
    return build_config({
        "model": {"name_or_path": str(model)},
        "data": {"path": str(SAMPLE), "cutoff_len": 64, "val_size": 0},
        "train": {"output_dir": str(out), "batch_size": 4, "per_device_batch_size": 4, "max_steps": 3,
                  "logging_steps": 1, "save_steps": 1, **train},
    }, "test")


@pytest.fixture
def no_model_load(monkeypatch):
    monkeypatch.setattr(loader, "load_tokenizer", lambda *a, **k: pytest.fail("the tokenizer was loaded"))
    monkeypatch.setattr(loader, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))


def test_an_output_folder_that_cannot_be_created_stops_before_any_work(tiny_model_dir, tmp_path, no_model_load):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError) as e:
        run_train(_cfg(tiny_model_dir("qwen2"), blocker / "run"))
    assert str(e.value) == (f"train.output_dir '{blocker / 'run'}' cannot be created: '{blocker}' is a file. "
                            "Set train.output_dir to another folder")


def test_a_full_disk_stops_before_any_work_and_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch, no_model_load):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "runs" / "new"
    with pytest.raises(UserError) as e:
        run_train(_cfg(tiny_model_dir("qwen2"), out))
    assert str(e.value) == (f"train.output_dir '{out}' cannot be written (No space left on device): the disk is full: "
                            "free some space or set train.output_dir to another folder")
    assert list(tmp_path.iterdir()) == []  # the probe went through the nearest existing folder, and is gone


def test_a_disk_full_during_a_checkpoint_keeps_the_previous_one(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import torch

    real_save = torch.save

    def save(obj, f, *a, **k):
        if "checkpoint-2" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *a, **k)

    out = tmp_path / "run"
    cfg = _cfg(tiny_model_dir("qwen2"), out)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(UserError) as e:
        run_train(cfg)
    msg = str(e.value)
    assert msg.startswith(f"writing into '{out}' failed: No space left on device ({out / 'checkpoint-2'}{os.sep}")
    assert msg.endswith("). The last complete checkpoint, checkpoint-1, is intact. Free some space (or fix the "
                        "folder) and run the same command with --resume")
    assert latest_checkpoint(out).name == "checkpoint-1"
    assert (out / "checkpoint-2").is_dir()  # torn: weights written, no trainer_state.json
    monkeypatch.undo()
    capsys.readouterr()
    run_train(cfg, resume=True)
    assert "--resume: removed checkpoint-2, left half-written by the interruption" in capsys.readouterr().err
    assert [r["step"] for r in RunDir(out).read_log() if "loss" in r] == [1, 2, 3]
    assert RunDir(out).run_info()["train"]["global_steps"] == 3
