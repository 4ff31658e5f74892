"""A real 2-process DDP run on CPU (torchrun, gloo): the global batch is kept, both ranks' data is trained and
counted, and only rank 0 writes logs and final artifacts."""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from domaintune.config import build_config
from domaintune.rundir import RunDir
from domaintune.training.arguments import grad_accumulation, world

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "data" / "train.jsonl"

torch_distributed = pytest.importorskip("torch.distributed")
pytestmark = pytest.mark.skipif(not torch_distributed.is_available() or not torch_distributed.is_gloo_available(),
                                reason="torch without the gloo backend")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_world_reads_the_launcher_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert world() == (0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert world() == (1, 2)


def test_torchrun_two_processes_on_cpu(tmp_path, tiny_model_dir):
    from domaintune.data.encode import build_datasets
    from domaintune.data.templates import get_template
    from domaintune.training.model import load_tokenizer

    model = tiny_model_dir("llama")  # no pad token: the loader's pad is used
    rows = 24
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(SAMPLE.read_text(encoding="utf-8").splitlines()[:rows]) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    cfg = build_config({
        "model": {"name_or_path": str(model)},
        "data": {"path": str(data), "cutoff_len": 64, "val_size": 0},
        "train": {"output_dir": str(out), "batch_size": 8, "per_device_batch_size": 2, "num_epochs": 1,
                  "logging_steps": 1, "save_steps": 1000},
    }, "test")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(cfg.to_yaml(), encoding="utf-8")
    assert grad_accumulation(cfg.train, 2) == 2  # 8 = 2 per device x 2 processes x 2 accumulation steps

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", env["MASTER_PORT"],
           "-m", "domaintune", "train", str(cfg_path)]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]

    expected_steps = math.ceil(rows / cfg.train.batch_size)  # 3: each step sees 8 rows, 4 from each process
    info = RunDir(out).run_info()
    assert info["world_size"] == 2
    assert info["train"]["global_steps"] == expected_steps
    records = RunDir(out).read_log()
    assert [x["step"] for x in records] == [1, 2, 3]  # rank 0 alone writes log.jsonl: no step twice
    assert records[-1]["epoch"] == pytest.approx(1.0)
    # Both processes' tokens are counted: one epoch over all 24 samples (12 per process), none repeated.
    tok = load_tokenizer(str(model))
    samples = build_datasets(cfg.data, tok, get_template(cfg.data.template, tok), cfg.train.seed).train
    assert len(samples) == rows
    assert info["train"]["tokens"] == records[-1]["tokens"] == sum(len(s["input_ids"]) for s in samples)
    # Final artifacts written once, by rank 0.
    assert r.stdout.count("run directory:") == 1
    assert r.stdout.count("model: ") == 1
    assert RunDir(out).has_adapter() and (out / "run_info.json").is_file()
    assert not list(out.glob("*.tmp"))
    # Each process saves its own random state, as safetensors, into the checkpoint (rank 1 may get there before
    # rank 0 has created the folder: regression, it failed now and then with "No such file or directory").
    ckpt = out / "checkpoint-3"
    assert {p.name for p in ckpt.glob("rng_state*")} == {"rng_state_0.safetensors", "rng_state_1.safetensors"}
