"""training/outputs.py and the disk: an unwritable or full output folder stops a run before any model loads, and a
disk that fills up during a checkpoint leaves the previous checkpoint intact and the run resumable."""
from __future__ import annotations

import errno
import os
import re
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
    assert re.search(r"\)\. The last complete checkpoint, checkpoint-1, is intact\. Free some space \([\d,]+ MiB "
                     r"free now\) or fix the folder, then run the same command with --resume$", msg), msg
    assert latest_checkpoint(out).name == "checkpoint-1"
    assert (out / "checkpoint-2").is_dir()  # torn: weights written, no trainer_state.json
    monkeypatch.undo()
    capsys.readouterr()
    run_train(cfg, resume=True)
    err = capsys.readouterr().err
    assert "--resume: removed checkpoint-2, left half-written by the interruption\n" in err
    assert f"--resume: continuing from {out / 'checkpoint-1'} (step 1 of 3)\n" in err  # every resume names it
    assert [r["step"] for r in RunDir(out).read_log() if "loss" in r] == [1, 2, 3]
    assert RunDir(out).run_info()["train"]["global_steps"] == 3


def test_a_disk_full_in_torch_save_is_the_same_clear_message_not_a_traceback(tiny_model_dir, tmp_path, monkeypatch,
                                                                             capsys):
    """Regression (issue 22, defect 13): on a full disk torch.save raises RuntimeError from its zip writer, not
    OSError, and it escaped as a traceback. Injected here as torch raises it (writing optimizer.pt of checkpoint-2)."""
    import torch

    from domaintune.cli import main

    real_save = torch.save

    def save(obj, f, *a, **k):
        if "checkpoint-2" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")
        return real_save(obj, f, *a, **k)

    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(_cfg(tiny_model_dir("qwen2"), out).to_yaml(), encoding="utf-8")
    monkeypatch.setattr(torch, "save", save)
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1
    line = err.splitlines()[-1]  # after the progress bar, on its line
    assert re.search(
        rf"error: writing into '{re.escape(str(out))}' failed: the write failed, most likely on a full disk "
        r"\(a checkpoint file\)\. The last complete checkpoint, "
        r"checkpoint-1, is intact\. Free some space \([\d,]+ MiB free now\) or fix the folder, then run the same "
        r"command with --resume$", line), line
    assert latest_checkpoint(out).name == "checkpoint-1"
    monkeypatch.undo()
    assert main(["train", str(cfg), "--resume"]) == 0
    assert [r["step"] for r in RunDir(out).read_log() if "loss" in r] == [1, 2, 3]


def test_other_runtime_errors_are_not_taken_for_a_full_disk():
    from domaintune.training.outputs import write_failure

    assert write_failure(RuntimeError("CUDA error: device-side assert triggered")) is None
    assert write_failure(OSError(errno.EINVAL, "Invalid argument")) is None
    assert write_failure(OSError(errno.ENOSPC, "No space left on device", "x")) == "No space left on device (x)"

    class SafetensorError(Exception):  # safetensors' own exception type, by name
        pass

    assert write_failure(SafetensorError("Error while serializing: I/O error: No space left on device (os error "
                                         "28)")) == "No space left on device (a checkpoint file)"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_the_run_folder_has_its_own_card_readable_weights_and_the_final_eval_loss(tiny_run):
    """Regressions (issue 22, defect 31): run_info.json said final_eval_loss null though the last step's eval was
    in log.jsonl; PEFT's empty card ("[More Information Needed]", base_model: an absolute path of this machine) was
    left in the run folder and each checkpoint; the safetensors files had mode 0600 where every other file follows
    the umask."""
    info = RunDir(tiny_run).run_info()
    last_eval = [r for r in RunDir(tiny_run).read_log() if "eval_loss" in r][-1]
    assert last_eval["step"] == info["train"]["global_steps"] == 4
    assert info["train"]["final_eval_loss"] == last_eval["eval_loss"] is not None

    card = (tiny_run / "README.md").read_text(encoding="utf-8")
    base = str(info["base_model"])
    assert Path(base).is_absolute() and base not in card and str(Path(base).parent) not in card
    assert "[More Information Needed]" not in card
    front = card.split("---\n")[1]
    assert "base_model" not in front  # a local folder is no hub id
    assert front.startswith("license: apache-2.0\nlibrary_name: peft\npipeline_tag: text-generation\n")
    assert f"A LoRA adapter of a local qwen2 model (folder `{Path(base).name}`, not a Hugging Face Hub id)" in card
    assert not list(tiny_run.glob("checkpoint-*/README.md"))

    mode = 0o666 & ~_umask()
    weights = sorted(tiny_run.rglob("*.safetensors"))
    assert {p.name for p in weights} == {"adapter_model.safetensors", "rng_state.safetensors"}
    assert {p.relative_to(tiny_run).as_posix(): oct(p.stat().st_mode & 0o777) for p in weights} == \
        {p.relative_to(tiny_run).as_posix(): oct(mode) for p in weights}
    assert (tiny_run / "config.yaml").stat().st_mode & 0o777 == mode  # as every other file


def test_safetensors_files_follow_the_umask(tmp_path):
    import torch
    from safetensors.torch import save_file

    from domaintune.training.outputs import share_safetensors

    old = os.umask(0o022)
    try:
        save_file({"a": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
        assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o600  # what the library does
        share_safetensors(tmp_path)
        assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        share_safetensors(tmp_path)
        assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o600  # a private umask is kept
    finally:
        os.umask(old)


def test_the_card_names_a_hub_base_model_and_never_a_local_path(tmp_path):
    from domaintune.training.model import describe_base_model, hub_model_id

    assert describe_base_model("Qwen/Qwen2.5-0.5B") == ("Qwen/Qwen2.5-0.5B",
                                                        "[Qwen/Qwen2.5-0.5B](https://huggingface.co/Qwen/Qwen2.5-0.5B)")
    snap = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    assert hub_model_id(str(snap)) == "Qwen/Qwen2.5-0.5B"  # a model in the Hugging Face cache keeps its id
    local = tmp_path / "models" / "my-base"
    local.mkdir(parents=True)
    (local / "config.json").write_text('{"model_type": "llama"}')
    assert describe_base_model(str(local)) == (None, "a local llama model (folder `my-base`, not a Hugging Face "
                                                     "Hub id)")
    assert hub_model_id("./models/my-base") is None and hub_model_id(str(tmp_path / "gone")) is None
