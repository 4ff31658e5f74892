"""predict under torchrun (real processes, gloo on CPU): the rows split across processes give the predictions of
one process, in one predictions.jsonl; a kill and a rerun lose and duplicate nothing; the loss is the same."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from domaintune.inference.params import GenerationParams
from domaintune.inference.predict import run_predict

torch_distributed = pytest.importorskip("torch.distributed")
pytestmark = pytest.mark.skipif(not torch_distributed.is_available() or not torch_distributed.is_gloo_available(),
                                reason="torch without the gloo backend")
MAX_NEW = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, cwd: Path, wait: bool = True):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           env["MASTER_PORT"], "-m", "domaintune", "predict", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r


def rows_without_time(path: Path) -> list[dict]:
    """The rows, without the per-row generation seconds (which differ between any two runs)."""
    return [{k: v for k, v in json.loads(line).items() if k != "time"}
            for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def single(tiny_run, sample_data, tmp_path_factory):
    """The reference: one process, greedy, one row per batch (as each sharded process runs it)."""
    out = tmp_path_factory.mktemp("single") / "p.jsonl"
    run_predict(tiny_run, sample_data / "test.jsonl", out=out, params=GenerationParams(max_new_tokens=MAX_NEW),
                batch_size=1)
    return out


def test_two_processes_write_the_predictions_of_one(tiny_run, sample_data, single, tmp_path):
    out = tmp_path / "p.jsonl"
    r = torchrun(2, str(tiny_run), "--data", str(sample_data / "test.jsonl"), "--out", str(out), "--batch-size", "1",
                 "--max-new-tokens", str(MAX_NEW), cwd=tmp_path)
    assert rows_without_time(out) == rows_without_time(single)
    assert [p.name for p in tmp_path.iterdir() if ".part" in p.name] == []  # the shards are merged and removed
    assert r.stdout.count(f"wrote {out} (16 rows)") == 1  # rank 0 alone reports and scores
    ours = json.loads((tmp_path / "metrics.json").read_text())
    theirs = json.loads((single.parent / "metrics.json").read_text())
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-6)  # the sharded loss sums to the same mean
    assert {k: v for k, v in ours.items() if k not in ("loss", "perplexity")} == \
        {k: v for k, v in theirs.items() if k not in ("loss", "perplexity")}


def test_a_kill_and_a_rerun_with_two_processes_lose_and_repeat_nothing(tiny_run, sample_data, single, tmp_path):
    out = tmp_path / "p.jsonl"
    args = [str(tiny_run), "--data", str(sample_data / "test.jsonl"), "--out", str(out), "--batch-size", "1",
            "--max-new-tokens", str(MAX_NEW), "--no-eval"]
    proc = torchrun(2, *args, cwd=tmp_path, wait=False)
    try:
        deadline = time.time() + 240
        while sum(p.read_text().count("\n") for p in tmp_path.glob("p.jsonl.rank*.part")) < 4:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no shard rows within 240 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    parts = sorted(tmp_path.glob("p.jsonl.rank*.part"))
    assert parts and not (out.is_file() and out.read_text().count("\n") >= 16)
    before = {json.loads(line)["id"] for p in parts for line in p.read_text().splitlines() if line.endswith("}")}
    assert 4 <= len(before) < 16
    torchrun(2, *args, cwd=tmp_path)
    assert rows_without_time(out) == rows_without_time(single)  # every row once, in order, as one process makes it
    assert not list(tmp_path.glob("p.jsonl.rank*.part"))
