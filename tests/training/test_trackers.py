"""train.report_to: swanlab, offline (swanlab's local mode): the run's loss values reach swanlab's run file, and a
missing swanlab is reported with the extra to install."""
from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import pytest

from domaintune.errors import UserError
from domaintune.rundir import RunDir


def _swanlab_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """{key: {step: value}} of the one local run under `log_dir`, read with swanlab's own reader of its run file
    (its format is internal to swanlab 0.10: pyproject's test extra bounds the version)."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    files = sorted(log_dir.glob("run-*/run-*.swanlab"))
    assert len(files) == 1, files
    reader = DataStoreReader()
    reader.open(files[0])
    scalars: dict[str, dict[int, float]] = {}
    for raw in reader:
        record = Record()
        record.ParseFromString(raw)
        if record.HasField("scalar"):
            scalars.setdefault(record.scalar.key, {})[record.scalar.step] = record.scalar.value.number
    return scalars


def test_swanlab_local_run_logs_the_loss(tiny_train_config, tmp_path, monkeypatch):
    pytest.importorskip("swanlab")
    from domaintune.training.trainer import run_train

    # local mode: files only, never the network; the run file lands in the run directory's swanlog/ by default
    monkeypatch.setenv("SWANLAB_MODE", "local")
    monkeypatch.delenv("SWANLAB_LOG_DIR", raising=False)
    monkeypatch.delenv("SWANLAB_API_KEY", raising=False)
    real_connect = socket.socket.connect

    def offline(sock: socket.socket, address: object) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network connection to {address} in swanlab's local mode")
        real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", offline)
    out = tmp_path / "run"
    run_train(tiny_train_config(out, "qwen2", "train.report_to=[swanlab]", "train.max_steps=3",
                                "train.eval_steps=3", "train.save_steps=3"))

    rows = RunDir(out).read_log()
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert sorted(losses) == [1, 2, 3] and sorted(evals) == [3]
    scalars = _swanlab_scalars(out / "swanlog")
    assert scalars["train/loss"] == pytest.approx(losses, rel=1e-6)
    assert scalars["eval/loss"] == pytest.approx(evals, rel=1e-6)


def test_swanlab_is_not_handed_to_transformers():
    from domaintune.training.trackers import hf_report_to

    assert hf_report_to(["swanlab", "tensorboard"]) == ["tensorboard"]
    assert hf_report_to(["none"]) == []
    assert "swanlab" not in hf_report_to(["all"])


def test_missing_swanlab_names_the_extra(monkeypatch):
    from domaintune.training.arguments import check_trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "swanlab" else real(name, *a))
    with pytest.raises(UserError, match=r"swanlab is not installed. Run `pip install 'domaintune\[swanlab\]'`"):
        check_trackers(["swanlab"])


def test_swanlab_without_a_login_is_refused_before_the_model_loads(tiny_train_config, tmp_path, monkeypatch):
    """Regression (issue 27): with swanlab installed, not logged in and SWANLAB_MODE unset (cloud mode, swanlab's
    default), training loaded the model, then stopped in swanlab.init's own RuntimeError, and left a run folder the
    next `train` refused. Now the config check says what to do, and nothing is written. A key or local mode pass."""
    pytest.importorskip("swanlab")
    from domaintune.training.arguments import check_trackers
    from domaintune.training.trainer import run_train

    for var in ("SWANLAB_MODE", "SWANLAB_API_KEY", "SWANLAB_SAVE_DIR", "SWANLAB_CONFIG_DIR", "SWANLAB_ROOT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no ~/.swanlab
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"swanlab is in cloud mode without an API key: run `swanlab login`"):
        check_trackers(["swanlab"])
    out = tmp_path / "run"
    with pytest.raises(UserError, match="SWANLAB_MODE=local"):
        run_train(tiny_train_config(out, "qwen2", "train.report_to=[swanlab]"))
    assert not out.exists()
    monkeypatch.setenv("SWANLAB_MODE", "local")
    check_trackers(["swanlab"])
    monkeypatch.delenv("SWANLAB_MODE")
    monkeypatch.setenv("SWANLAB_API_KEY", "a-key-swanlab-will-check-itself")
    check_trackers(["swanlab"])
