"""Exact resume on every batching path: a run killed with SIGKILL at several points (right after a checkpoint,
between checkpoints, in the second epoch) and resumed with `--resume` logs the per-step losses, learning
rates and tokens of an uninterrupted run, and each step trains exactly the rows the data order gives it.

Paths: padded + length-grouped (BLOOM, which cannot pack; the default there) and packed (qwen2). The kill is
made from inside the run by a callback that a small wrapper adds (tests/training/kill_wrapper.py), so it
lands at a known step."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from domaintune.config import build_config
from domaintune.rundir import RunDir, latest_checkpoint
from domaintune.training.sampler import length_grouped_order
from domaintune.training.trainer import run_train

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "data" / "train.jsonl"
WRAPPER = Path(__file__).resolve().parent / "kill_wrapper.py"
ROWS, BATCH = 24, 4  # 6 optimizer steps per epoch, 2 epochs


def make_cfg(model, data, out, **train):
    return build_config({
        "model": {"name_or_path": str(model)},
        "data": {"path": str(data), "cutoff_len": 256, "val_size": 0},  # no row is cut: lengths differ
        "train": {"output_dir": str(out), "batch_size": BATCH, "per_device_batch_size": 2, "num_epochs": 2,
                  "learning_rate": 1e-2, "logging_steps": 1, "save_steps": 2, "seed": 7, **train},
    }, "test")


def step_records(run: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["learning_rate"], r["tokens"]) for r in RunDir(run).read_log() if "loss" in r]


def killed_then_resumed(tmp_path: Path, cfg, kill_at: str, returncode: int = -9,
                        on_stop=None) -> tuple[Path, Path | None]:
    cfg_path = tmp_path / f"{kill_at.replace(':', '-')}.yaml"
    cfg_path.write_text(cfg.to_yaml(), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DOMAINTUNE_TEST_KILL_AT": kill_at}
    r = subprocess.run([sys.executable, str(WRAPPER), "train", str(cfg_path)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == returncode, (r.returncode, r.stderr[-3000:])  # stopped where asked, not finished
    out = Path(cfg.train.output_dir)
    assert not (out / "run_info.json").exists()
    if on_stop is not None:
        on_stop(out, r.stderr)
    ckpt = latest_checkpoint(out)
    env.pop("DOMAINTUNE_TEST_KILL_AT")
    r = subprocess.run([sys.executable, "-m", "domaintune", "train", str(cfg_path), "--resume"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, ckpt


@pytest.fixture(scope="module")
def data24(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "rows24.jsonl"
    p.write_text("\n".join(SAMPLE.read_text(encoding="utf-8").splitlines()[:ROWS]) + "\n", encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def reference(tiny_model_dir, data24, tmp_path_factory):
    """Uninterrupted runs, one per arch, in this process (one thread, as the subprocesses)."""
    import torch

    torch.set_num_threads(1)
    cache = {}

    def get(arch):
        if arch not in cache:
            cfg = make_cfg(tiny_model_dir(arch), data24, tmp_path_factory.mktemp(f"ref-{arch}") / "run")
            cache[arch] = (cfg, run_train(cfg))
        return cache[arch]

    return get


def expected_tokens_per_step(cfg) -> list[int]:
    """Non-padding tokens of the rows each step must train, from the length-grouped order of each epoch."""
    from domaintune.data.prepare import build_datasets
    from domaintune.data.templates import get_template
    from domaintune.training.model import load_tokenizer

    tok = load_tokenizer(cfg.model.name_or_path)
    rows = build_datasets(cfg.data, tok, get_template(cfg.data.template, tok), cfg.train.seed).train
    assert len(rows) == ROWS
    lengths = [len(r["input_ids"]) for r in rows]
    steps = []
    for epoch in range(2):
        order = length_grouped_order(lengths, BATCH, cfg.train.seed + epoch)
        assert sorted(order) == list(range(ROWS))
        steps += [sum(lengths[i] for i in order[k:k + BATCH]) for k in range(0, ROWS, BATCH)]
    return steps


@pytest.mark.parametrize("kill_at", ["save:4", "step:7", "step:9"])
def test_padded_length_grouped_run_resumes_exactly(tmp_path, reference, kill_at):
    """BLOOM LoRA with default settings (padded, length-grouped): killed right after checkpoint-4, after step 7
    (checkpoint-6 ends epoch 1) and after step 9 (checkpoint-8, mid epoch 2), then resumed."""
    ref_cfg, ref = reference("bloom")
    path = RunDir(ref).run_info()["train"]["path"]
    assert path["batching"] == "pad"
    ref_steps = step_records(ref)
    assert [s[0] for s in ref_steps] == list(range(1, 13))

    cfg = ref_cfg.model_copy(update={"train": ref_cfg.train.model_copy(update={"output_dir": str(tmp_path / "run")})})
    out, ckpt = killed_then_resumed(tmp_path, cfg, kill_at)
    assert ckpt.name == {"save:4": "checkpoint-4", "step:7": "checkpoint-6", "step:9": "checkpoint-8"}[kill_at]
    assert step_records(out) == ref_steps  # bit for bit: losses, learning rates, tokens seen
    # Both train each row once per epoch, in the order's steps (counted by their tokens).
    tokens = [s[3] for s in ref_steps]
    assert [b - a for a, b in zip([0, *tokens[:-1]], tokens, strict=True)] == expected_tokens_per_step(ref_cfg)


def test_ctrl_c_saves_the_step_it_stopped_at_and_resume_continues_exactly(tmp_path, reference):
    """Ctrl-C (SIGINT) at step 5, between the checkpoints of train.save_steps 2: the run finishes step 5, saves
    checkpoint-5, says so, exits 130 and marks itself stopped in status.json; --resume continues from step 5 (no
    step lost or repeated) to the uninterrupted run's per-step records, bit for bit, and status.json "finished".
    The padded, length-grouped path (BLOOM); the stop is the Trainer's own save at a step's end, the same on the
    packed path, whose resume the test above covers."""
    ref_cfg, ref = reference("bloom")
    cfg = ref_cfg.model_copy(update={"train": ref_cfg.train.model_copy(update={"output_dir": str(tmp_path / "run")})})

    def stopped(out: Path, stderr: str) -> None:
        assert "stopping after this step, with a checkpoint" in stderr
        assert f"The last complete checkpoint is {out / 'checkpoint-5'} (step 5); --resume continues from it" in stderr
        status = RunDir(out).read_json("status.json")
        assert (status["state"], status["step"], status["max_steps"]) == ("stopped", 5, 12)
        assert isinstance(status["pid_start"], int) and status["host"]
        assert "checkpoint-5" in status["message"]
        assert [r["step"] for r in RunDir(out).read_log() if "loss" in r] == [1, 2, 3, 4, 5]

    out, ckpt = killed_then_resumed(tmp_path, cfg, "sigint:5", returncode=130, on_stop=stopped)
    assert ckpt.name == "checkpoint-5"
    assert step_records(out) == step_records(ref)
    status = RunDir(out).read_json("status.json")
    assert (status["state"], status["step"], status["message"]) == ("finished", 12, "")
    assert all(r["memory_mib"] > 0 for r in RunDir(out).read_log())


def test_packed_run_resumes_exactly_in_its_second_epoch(tmp_path, reference):
    ref_cfg, ref = reference("qwen2")
    assert RunDir(ref).run_info()["train"]["path"]["batching"] == "pack"
    cfg = ref_cfg.model_copy(update={"train": ref_cfg.train.model_copy(update={"output_dir": str(tmp_path / "run")})})
    out, ckpt = killed_then_resumed(tmp_path, cfg, "step:9")
    assert ckpt.name == "checkpoint-8"
    assert step_records(out) == step_records(ref)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory, data24) -> list[dict]:
    """The 24 rows as JSON lines (weight 2) and the next 16 as messages in Parquet (weight 1): a mix of 24 + 12."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(x) for x in SAMPLE.read_text(encoding="utf-8").splitlines()[ROWS:ROWS + 16]]
    msgs = [[{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
            for r in rows]
    p = tmp_path_factory.mktemp("mixed") / "more.parquet"
    pq.write_table(pa.table({"messages": msgs}), p)
    return [{"path": str(data24), "weight": 2}, {"path": str(p), "weight": 1}]


def mixed_cfg(model, sources, out, **data):
    cfg = make_cfg(model, "unused", out, num_epochs=1)
    return build_config({**cfg.model_dump(mode="json"),
                         "data": {**cfg.data.model_dump(mode="json"), "path": sources, **data}}, "test")


def test_mixed_cached_data_resumes_exactly(tmp_path, tiny_model_dir, two_sources):
    """Two sources mixed by weight, prepared once and cached: the killed run and its resume both read the cache,
    and the steps equal the uninterrupted run's."""
    ref = run_train(mixed_cfg(tiny_model_dir("qwen2"), two_sources, tmp_path / "ref"))
    info = RunDir(ref).run_info()["data"]
    assert [(s["read"], s["sampled"]) for s in info["sources"]] == [(24, 24), (16, 12)]
    ref_steps = step_records(ref)
    assert [s[0] for s in ref_steps] == list(range(1, 10))  # 36 rows, 4 per step
    cfg = mixed_cfg(tiny_model_dir("qwen2"), two_sources, tmp_path / "run")
    out, ckpt = killed_then_resumed(tmp_path, cfg, "step:7")
    assert ckpt.name == "checkpoint-6"
    assert RunDir(out).run_info()["data"]["prepared"].startswith("from the cache, nothing read or tokenised")
    assert step_records(out) == ref_steps


def test_streaming_run_resumes_exactly_across_its_epochs(tmp_path, tiny_model_dir, two_sources):
    """data.streaming with two sources interleaved by weight, 12 steps (more than one pass over the stream): killed
    after step 9 (checkpoint-8, in the stream's second pass), resumed, the same per-step losses and tokens."""
    cfg = mixed_cfg(tiny_model_dir("qwen2"), two_sources, tmp_path / "ref", streaming=True)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 12})})
    ref = run_train(cfg)
    ref_steps = step_records(ref)
    assert [s[0] for s in ref_steps] == list(range(1, 13))
    assert RunDir(ref).run_info()["data"]["streaming"] is True
    run_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"output_dir": str(tmp_path / "run")})})
    out, ckpt = killed_then_resumed(tmp_path, run_cfg, "step:9")
    assert ckpt.name == "checkpoint-8"
    assert step_records(out) == ref_steps
