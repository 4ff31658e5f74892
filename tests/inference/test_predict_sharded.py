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
    assert r.stderr.count(f"wrote {out} (16 rows)") == 1  # rank 0 alone reports and scores
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


def test_shards_left_by_an_interrupted_run_are_resumed_checked_and_overwritten(tiny_run, sample_data, single,
                                                                              tmp_path):
    """Shards of a multi-process run killed before its merge: one process resumes from them (rows not made
    twice), other settings are refused as for predictions.jsonl, and --overwrite removes them."""
    from domaintune.errors import UserError

    out = tmp_path / "p.jsonl"
    params = GenerationParams(max_new_tokens=MAX_NEW)
    run_predict(tiny_run, sample_data / "test.jsonl", out=out, params=params, batch_size=1, limit=5, evaluate=False)
    out.rename(tmp_path / "p.jsonl.rank1.part")  # as a killed 2-process run leaves it (sidecar written by rank 0)
    with pytest.raises(UserError, match="different settings"):
        run_predict(tiny_run, sample_data / "test.jsonl", out=out, params=GenerationParams(max_new_tokens=3),
                    batch_size=1, evaluate=False)
    made = []
    import domaintune.inference.predict as predict

    real = predict._generate_into
    predict._generate_into = lambda engine, todo, *a, **kw: made.extend(ex.index for ex in todo) or \
        real(engine, todo, *a, **kw)
    try:
        run_predict(tiny_run, sample_data / "test.jsonl", out=out, params=params, batch_size=1, evaluate=False)
    finally:
        predict._generate_into = real
    assert made == list(range(5, 16))  # the shard's five rows were not made again
    assert rows_without_time(out) == rows_without_time(single) and not list(tmp_path.glob("*.part"))
    (tmp_path / "p.jsonl.rank3.part").write_text('{"id": 0, "predict": "stale"}\n')
    run_predict(tiny_run, sample_data / "test.jsonl", out=out, params=params, batch_size=1, evaluate=False,
                overwrite=True, limit=2)
    assert not list(tmp_path.glob("*.part")) and len(out.read_text().splitlines()) == 2


def test_no_target_token_means_no_loss(tiny_run):
    from domaintune.evaluation.loss import teacher_forced_loss
    from domaintune.inference.engine import Engine

    model = Engine.from_run(tiny_run, device="cpu").model
    samples = [{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}]
    assert teacher_forced_loss(model, samples) == {}
    assert teacher_forced_loss(model, samples, reduce=lambda v: v) == {}
