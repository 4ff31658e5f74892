"""`train --resume` at the edges (issue 22, defect 22): a finished run is already complete and nothing of it changes,
whether it ran by max_steps or by epochs; a run killed while its final files were written trains no step past
its last and writes them; every resume names its checkpoint; Ctrl-C names the checkpoint and the command to run."""
from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

import pytest

from domaintune.cli import main
from domaintune.config import build_config
from domaintune.rundir import RunDir, list_checkpoints

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "data" / "train.jsonl"


@pytest.fixture(scope="module")
def qwen(tiny_model_dir) -> Path:
    return tiny_model_dir("qwen2")


def write_cfg(tmp_path: Path, model: Path, out: Path, rows: int = 10, **train) -> Path:
    """A config file on the first `rows` sample rows (batch 4, so 3 steps an epoch for 10 rows)."""
    data = tmp_path / f"rows{rows}.jsonl"
    data.write_text("\n".join(SAMPLE.read_text(encoding="utf-8").splitlines()[:rows]) + "\n", encoding="utf-8")
    cfg = build_config({
        "model": {"name_or_path": str(model)},
        "data": {"path": str(data), "cutoff_len": 48, "val_size": 0},
        "train": {"output_dir": str(out), "batch_size": 4, "per_device_batch_size": 4, "logging_steps": 1,
                  "save_steps": 1000, "learning_rate": 1e-2, "warmup_ratio": 0.0, **train},
    }, "test")
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg.to_yaml(), encoding="utf-8")
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the hash of its bytes (and every folder, as '/')."""
    return {str(p.relative_to(folder)): "/" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("stop", ["train.max_steps=2", "train.num_epochs=1"])
def test_resume_of_a_finished_run_is_already_complete_and_changes_nothing(qwen, tmp_path, capsys, stop):
    """Regression: by max_steps (2 of an epoch's 3 steps) --resume trained a third step (log.jsonl gained step 3,
    checkpoint-3 appeared, run_info.json said 3 steps); by epochs it was a silent no-op printing train_loss 0."""
    out = tmp_path / "run"
    cfg = write_cfg(tmp_path, qwen, out)
    assert main(["train", str(cfg), stop]) == 0
    steps = 2 if "max_steps" in stop else 3
    assert [c.name for c in list_checkpoints(out)] == [f"checkpoint-{steps}"]
    before = snapshot(out)
    capsys.readouterr()
    assert main(["train", str(cfg), stop, "--resume"]) == 0
    said = capsys.readouterr()
    assert said.err == (f"--resume: '{out}' is already complete ({steps} steps trained; its final weights and "
                        "run_info.json are written): nothing to train, nothing was changed. To train it again from "
                        "the start, pass --overwrite instead (or set train.output_dir to a new folder)\n")
    assert "train_loss" not in said.out + said.err
    assert snapshot(out) == before  # log.jsonl, run_info.json, weights: the same bytes; no new checkpoint
    assert [r["step"] for r in RunDir(out).read_log() if "loss" in r] == list(range(1, steps + 1))


def test_a_run_killed_while_writing_its_final_files_resumes_without_a_step_more(qwen, tmp_path, capsys):
    """The checkpoint of the last step exists, the final files do not (a kill during the final save): --resume
    trains nothing (regression: one step past max_steps) and writes them from that checkpoint."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    cfg = write_cfg(tmp_path, qwen, out, max_steps=2)
    assert main(["train", str(cfg)]) == 0
    log_before = (out / "log.jsonl").read_bytes()
    info_before = RunDir(out).run_info()
    for name in ("run_info.json", "adapter_model.safetensors", "README.md"):
        (out / name).unlink()
    capsys.readouterr()
    assert main(["train", str(cfg), "--resume"]) == 0
    err = capsys.readouterr().err
    assert (f"--resume: continuing from {out / 'checkpoint-2'} (step 2 of 2): training had reached its last step "
            "before the run's final files were written; writing them now\n") in err
    assert [c.name for c in list_checkpoints(out)] == ["checkpoint-2"]
    assert (out / "log.jsonl").read_bytes() == log_before
    info = RunDir(out).run_info()
    assert info["train"]["global_steps"] == 2 and info["train"]["tokens"] == info_before["train"]["tokens"]
    assert info["train"]["final_loss"] == info_before["train"]["final_loss"]
    assert info["train"]["tokens_per_second"] is None  # nothing was trained in this session
    final, ckpt = load_file(out / "adapter_model.safetensors"), load_file(out / "checkpoint-2" /
                                                                          "adapter_model.safetensors")
    assert final.keys() == ckpt.keys() and all(bool((final[k] == ckpt[k]).all()) for k in final)


def test_ctrl_c_names_the_last_checkpoint_and_the_resume_command(qwen, tmp_path, capsys, monkeypatch):
    """Regression: Ctrl-C printed only `interrupted`. Now: the step, the last complete checkpoint and the exact
    command; that command (--overwrite dropped, overrides kept) continues the run to its end."""
    import domaintune.training.callbacks as callbacks

    out = tmp_path / "run"
    cfg = write_cfg(tmp_path, qwen, out, max_steps=5, save_steps=2)
    real = callbacks.JsonlAppender

    class CtrlCAtStep3(real):
        def write(self, rec: dict) -> None:
            super().write(rec)
            if rec.get("step") == 3:
                raise KeyboardInterrupt  # what SIGINT raises in the main thread

    monkeypatch.setattr(callbacks, "JsonlAppender", CtrlCAtStep3)
    (out / "checkpoint-1").mkdir(parents=True)  # an older run, replaced with --overwrite
    (out / "log.jsonl").write_text("")
    capsys.readouterr()
    assert main(["train", str(cfg), "train.learning_rate=0.02", "--overwrite"]) == 130
    err = capsys.readouterr().err
    command = f"domaintune train {cfg} train.learning_rate=0.02 --resume"
    assert (f"interrupted at step 3. The last complete checkpoint is {out / 'checkpoint-2'} (step 2); --resume "
            f"continues from it. To continue, run:\n  {command}\n") in err, err
    monkeypatch.undo()
    argv = shlex.split(command)
    assert argv[:2] == ["domaintune", "train"]
    assert main(argv[1:]) == 0
    assert f"--resume: continuing from {out / 'checkpoint-2'} (step 2 of 5)\n" in capsys.readouterr().err
    assert [r["step"] for r in RunDir(out).read_log() if "loss" in r] == [1, 2, 3, 4, 5]
    assert "learning_rate: 0.02" in (out / "config.yaml").read_text(encoding="utf-8")  # the override was kept
    assert json.loads((out / "run_info.json").read_text())["train"]["global_steps"] == 5


def test_ctrl_c_before_the_first_checkpoint_says_resume_starts_afresh(qwen, tmp_path, capsys, monkeypatch):
    import domaintune.training.callbacks as callbacks

    out = tmp_path / "run"
    cfg = write_cfg(tmp_path, qwen, out, max_steps=3, save_steps=2)

    class CtrlC(callbacks.JsonlAppender):
        def write(self, rec: dict) -> None:
            raise KeyboardInterrupt

    monkeypatch.setattr(callbacks, "JsonlAppender", CtrlC)
    assert main(["train", str(cfg)]) == 130
    assert ("interrupted at step 1, before the first checkpoint (train.save_steps 2): --resume starts from the "
            f"beginning. To continue, run:\n  domaintune train {cfg} --resume\n") in capsys.readouterr().err


def test_a_full_disk_while_the_final_files_are_written_is_a_message_and_resume_finishes(qwen, tmp_path, capsys,
                                                                                      monkeypatch):
    """The final save is guarded like a checkpoint: one line, exit 2; then --resume writes the final files from the
    checkpoint of the last step, without training a step more."""
    import errno
    import os

    import domaintune.training.outputs as outputs

    out = tmp_path / "run"
    cfg = write_cfg(tmp_path, qwen, out, max_steps=2)

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(outputs, "write_atomic", full)
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (f"error: writing into '{out}' failed: No space left on device ({out / 'README.md'}). The last complete "
            "checkpoint, checkpoint-2, is intact. Free some space (") in err
    assert not (out / "run_info.json").exists()
    monkeypatch.undo()
    assert main(["train", str(cfg), "--resume"]) == 0
    assert "(step 2 of 2): training had reached its last step" in capsys.readouterr().err
    assert [r["step"] for r in RunDir(out).read_log() if "loss" in r] == [1, 2]
    assert RunDir(out).is_finished() and RunDir(out).run_info()["train"]["global_steps"] == 2
