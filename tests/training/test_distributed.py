"""A real 2-process DDP run on CPU (torchrun, gloo): the global batch is kept, both ranks' data is trained and
counted, and only rank 0 writes logs and final artifacts."""
from __future__ import annotations

import json
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
    from domaintune.data.prepare import build_datasets
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
    assert r.stderr.count("model: ") == 1
    assert RunDir(out).has_adapter() and (out / "run_info.json").is_file()
    assert not list(out.glob("*.tmp"))
    # Each process saves its own random state, as safetensors, into the checkpoint (rank 1 may get there before
    # rank 0 has created the folder: regression, it failed now and then with "No such file or directory").
    ckpt = out / "checkpoint-3"
    assert {p.name for p in ckpt.glob("rng_state*")} == {"rng_state_0.safetensors", "rng_state_1.safetensors"}


def _torchrun_train(tmp_path, cfg, name: str, nproc: int) -> subprocess.CompletedProcess:
    """`domaintune train` on `cfg` (written to NAME.yaml) under `nproc` real torchrun processes (gloo); asserts
    it succeeded."""
    cfg_path = tmp_path / f"{name}.yaml"
    cfg_path.write_text(cfg.to_yaml(), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           env["MASTER_PORT"], "-m", "domaintune", "train", str(cfg_path)]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r


def _train_layout(tmp_path, model, data, name, nproc, per_device, gas, cutoff_len=64, records=False, **train):
    """log.jsonl losses of a run with `nproc` real torchrun processes (gloo), `per_device` rows x `gas`
    accumulation steps each: the global batch is per_device x nproc x gas. `records`: the whole training
    records instead of the losses."""
    out = tmp_path / name
    cfg = build_config({
        "model": {"name_or_path": str(model)},
        "lora": {"dropout": 0.0},
        "data": {"path": str(data), "cutoff_len": cutoff_len, "val_size": 0},
        "train": {"output_dir": str(out), "batch_size": per_device * nproc * gas, "per_device_batch_size": per_device,
                  "max_steps": 3, "logging_steps": 1, "save_steps": 1000, "learning_rate": 1e-2, "warmup_ratio": 0.0,
                  **train},
    }, "test")
    r = _torchrun_train(tmp_path, cfg, name, nproc)
    assert f"batch: {per_device * nproc * gas} rows per optimizer step = {per_device} per device x {nproc} " \
           f"process(es) x {gas} accumulation step(s)" in r.stderr
    info = RunDir(out).run_info()["train"]["path"]
    assert (info["global_batch"], info["gradient_accumulation_steps"]) == (per_device * nproc * gas, gas)
    if records:
        return info, [x for x in RunDir(out).read_log() if "loss" in x]
    return [x["loss"] for x in RunDir(out).read_log() if "loss" in x]


def test_the_same_global_batch_gives_the_same_losses_at_any_layout(tmp_path, tiny_model_dir):
    """2 processes x B against 1 process x 2B, and 2 processes with accumulation 2 against 1 process with
    accumulation 4: the same rows in every optimizer step, the same per-step losses (rtol 1e-4)."""
    model = tiny_model_dir("qwen2")
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(SAMPLE.read_text(encoding="utf-8").splitlines()[:24]) + "\n", encoding="utf-8")
    two = _train_layout(tmp_path, model, data, "two-by-4", 2, 4, 1)
    one = _train_layout(tmp_path, model, data, "one-by-8", 1, 8, 1)
    assert len(two) == len(one) == 3
    assert two == pytest.approx(one, rel=1e-4)
    two_acc = _train_layout(tmp_path, model, data, "two-by-2-acc-2", 2, 2, 2)
    one_acc = _train_layout(tmp_path, model, data, "one-by-2-acc-4", 1, 2, 4)
    assert two_acc == pytest.approx(one_acc, rel=1e-4)
    assert two_acc == pytest.approx(one, rel=1e-4)  # and accumulation itself changes nothing



def _token_steps(records):
    tokens = [x["tokens"] for x in records]
    return [b - a for a, b in zip([0, *tokens[:-1]], tokens, strict=True)]


def _row_lengths(model, data, cutoff_len, seed):
    from domaintune.data.prepare import build_datasets
    from domaintune.data.templates import get_template
    from domaintune.training.model import load_tokenizer

    cfg = build_config({"model": {"name_or_path": str(model)},
                        "data": {"path": str(data), "cutoff_len": cutoff_len, "val_size": 0},
                        "train": {"output_dir": "unused", "seed": seed}}, "test")
    tok = load_tokenizer(str(model))
    rows = build_datasets(cfg.data, tok, get_template(cfg.data.template, tok), seed).train
    return [len(r["input_ids"]) for r in rows]


def test_padded_length_grouped_runs_give_the_same_losses_at_any_layout(tmp_path, tiny_model_dir):
    """BLOOM (padded, length-grouped by default): 1 process x 2 rows x 2 accumulation steps and 2 processes x 2
    rows see the same rows in each step (their tokens) and log the same losses (regression: transformers'
    sampler grouped per process, so the rows and losses parted from step 3 on)."""
    from domaintune.training.sampler import length_grouped_order

    model = tiny_model_dir("bloom")
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(SAMPLE.read_text(encoding="utf-8").splitlines()[:24]) + "\n", encoding="utf-8")
    info, one = _train_layout(tmp_path, model, data, "one-by-2-acc-2", 1, 2, 2, cutoff_len=256, records=True,
                              max_steps=6, seed=5)
    assert info["batching"] == "pad"
    _, two = _train_layout(tmp_path, model, data, "two-by-2", 2, 2, 1, cutoff_len=256, records=True,
                           max_steps=6, seed=5)
    assert [x["loss"] for x in two] == pytest.approx([x["loss"] for x in one], rel=1e-4)
    lengths = _row_lengths(model, data, 256, 5)
    order = length_grouped_order(lengths, 4, 5)
    expected = [sum(lengths[i] for i in order[k:k + 4]) for k in range(0, 24, 4)]
    assert _token_steps(one) == _token_steps(two) == expected  # each row once, in the order's steps


def test_a_ddp_run_resumed_at_another_process_count_sees_each_row_once(tmp_path, tiny_model_dir):
    """2 processes x 2 rows, killed (rank 0, SIGKILL) after step 4 with checkpoint-3 complete, resumed by one
    process x 2 rows x 2 accumulation steps (the same config: the global batch is kept): every step trains the
    rows of the uninterrupted run's step, so each of the epoch's 24 rows is trained exactly once."""
    from domaintune.training.sampler import length_grouped_order

    model = tiny_model_dir("bloom")
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(SAMPLE.read_text(encoding="utf-8").splitlines()[:24]) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    cfg = build_config({
        "model": {"name_or_path": str(model)}, "lora": {"dropout": 0.0},
        "data": {"path": str(data), "cutoff_len": 256, "val_size": 0},
        "train": {"output_dir": str(out), "batch_size": 4, "per_device_batch_size": 2, "num_epochs": 1,
                  "logging_steps": 1, "save_steps": 3, "learning_rate": 1e-2, "warmup_ratio": 0.0, "seed": 5},
    }, "test")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(cfg.to_yaml(), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               DOMAINTUNE_TEST_KILL_AT="step:4,rank:0")
    wrapper = Path(__file__).resolve().parent / "kill_wrapper.py"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        env["MASTER_PORT"], str(wrapper), "train", str(cfg_path)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode != 0 and not (out / "run_info.json").exists(), (r.stdout + r.stderr)[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    env.pop("DOMAINTUNE_TEST_KILL_AT")
    r = subprocess.run([sys.executable, "-m", "domaintune", "train", str(cfg_path), "--resume"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "written by 2 process(es)) with 1" in r.stdout + r.stderr
    resumed = [x for x in RunDir(out).read_log() if "loss" in x]
    assert [x["step"] for x in resumed] == [1, 2, 3, 4, 5, 6]
    assert RunDir(out).run_info()["train"]["path"]["gradient_accumulation_steps"] == 2

    lengths = _row_lengths(model, data, 256, 5)
    order = length_grouped_order(lengths, 4, 5)
    assert sorted(order) == list(range(24))
    expected = [sum(lengths[i] for i in order[k:k + 4]) for k in range(0, 24, 4)]
    assert _token_steps(resumed) == expected  # steps 4-6 (one process) continue the rows of steps 1-3 (two)
    _, ref = _train_layout(tmp_path, model, data, "ref-two-by-2", 2, 2, 1, cutoff_len=256, records=True,
                           max_steps=6, seed=5)
    assert [x["loss"] for x in resumed] == pytest.approx([x["loss"] for x in ref], rel=1e-4)

AUDIT = '''
import atexit, os, sys
written = set()
def hook(event, args):
    if event == "open" and args[0] is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or \\
                (mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
            written.add(os.path.abspath(os.fsdecode(args[0])))
    elif event in ("os.rename", "os.replace"):
        written.add(os.path.abspath(os.fsdecode(args[1])))
sys.addaudithook(hook)
import safetensors.torch as st  # written by Rust, unseen by the hook: wrapped before anything imports it
_save_file = st.save_file
def save_file(tensors, filename, *a, **kw):
    written.add(os.path.abspath(os.fsdecode(filename)))
    return _save_file(tensors, filename, *a, **kw)
st.save_file = save_file
def dump():
    with open(os.environ["AUDIT_DIR"] + f"/rank{os.environ.get('RANK', '0')}.txt", "w") as f:
        f.write("\\n".join(sorted(written)))
atexit.register(dump)
from domaintune.cli import main
sys.exit(main(sys.argv[1:]))
'''


def test_only_rank_0_writes_into_the_run_directory(tmp_path, tiny_model_dir):
    """Every file each process opens for writing, renames into place or saves as safetensors is recorded (an
    audit hook, and a wrapper around safetensors' writer): rank 1 writes nothing into the run directory but its
    own random state in each checkpoint, which resume needs."""
    model = tiny_model_dir("qwen2")
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(SAMPLE.read_text(encoding="utf-8").splitlines()[:16]) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    cfg = build_config({"model": {"name_or_path": str(model)},
                        "data": {"path": str(data), "cutoff_len": 64, "val_size": 4},
                        "train": {"output_dir": str(out), "batch_size": 4, "per_device_batch_size": 2, "max_steps": 2,
                                  "logging_steps": 1, "save_steps": 1, "eval_steps": 1}}, "test")
    (tmp_path / "cfg.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    (tmp_path / "audit.py").write_text(AUDIT, encoding="utf-8")
    audit = tmp_path / "audit"
    audit.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), CUDA_VISIBLE_DEVICES="", AUDIT_DIR=str(audit))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", env["MASTER_PORT"],
           str(tmp_path / "audit.py"), "train", str(tmp_path / "cfg.yaml")]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    in_run = {rank: sorted(Path(p).relative_to(out).as_posix() for p in
                           (audit / f"rank{rank}.txt").read_text(encoding="utf-8").splitlines()
                           if Path(p).is_relative_to(out))
              for rank in (0, 1)}
    assert {"log.jsonl", "run_info.json", "template.json", "loss.png", "adapter_model.safetensors",
            "checkpoint-2/rng_state_0.safetensors"} <= set(in_run[0]), in_run[0]
    assert in_run[1] == ["checkpoint-1/rng_state_1.safetensors", "checkpoint-2/rng_state_1.safetensors"]


def test_fsdp_on_cpu_trains_like_ddp_and_its_run_directory_predicts(tmp_path, tiny_model_dir, sample_data):
    """train.distributed: fsdp (FSDP2, full shard) with 2 processes on CPU (gloo) gives DDP's per-step losses;
    the run directory it saves (rank 0 gathers the full state) is an ordinary adapter run that predict reads."""
    from domaintune.inference.params import GenerationParams
    from domaintune.inference.predict import run_predict

    model = tiny_model_dir("qwen2")
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(SAMPLE.read_text(encoding="utf-8").splitlines()[:24]) + "\n", encoding="utf-8")
    fsdp = _train_layout(tmp_path, model, data, "fsdp", 2, 4, 1, distributed="fsdp", save_steps=3)
    ddp = _train_layout(tmp_path, model, data, "ddp", 2, 4, 1)
    assert fsdp == pytest.approx(ddp, rel=1e-4)
    run = tmp_path / "fsdp"
    assert RunDir(run).has_adapter() and not list(run.glob("pytorch_model_fsdp*"))
    ckpt = run / "checkpoint-3"  # a checkpoint is consolidated too: an adapter predict could read
    assert RunDir(ckpt).has_adapter()
    assert json.loads((ckpt / "world.json").read_text()) == {"world_size": 2, "distributed": "fsdp"}
    preds = run_predict(run, sample_data / "test.jsonl", out=tmp_path / "p.jsonl", limit=2, evaluate=False,
                        params=GenerationParams(max_new_tokens=4))
    assert len(preds.read_text(encoding="utf-8").splitlines()) == 2


def _eval_run(tmp_path, model, data, name, nproc, **train):
    """(config, eval_loss values of log.jsonl, run_info's "train") of a 1-step run with 5 validation rows and
    `nproc` torchrun processes; the global batch is 4 rows at any process count."""
    out = tmp_path / name
    cfg = build_config({
        "model": {"name_or_path": str(model)}, "lora": {"dropout": 0.0},
        "data": {"path": str(data), "cutoff_len": 64, "val_size": 5},
        "train": {"output_dir": str(out), "batch_size": 4, "per_device_batch_size": 2, "max_steps": 1,
                  "eval_steps": 1, "logging_steps": 1, "save_steps": 1000, "report_to": ["none"], **train},
    }, "test")
    _torchrun_train(tmp_path, cfg, name, nproc)
    info = RunDir(out).run_info()
    return cfg, [x["eval_loss"] for x in RunDir(out).read_log() if "eval_loss" in x], info["train"]


def _reference_eval_loss(cfg, model, run):
    """The token-weighted mean of transformers' own per-row losses (each row alone, no packing or padding) of the
    run's validation rows, with the adapter the run saved (the weights its step-1 evaluation saw)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from domaintune.data.prepare import build_datasets
    from domaintune.data.templates import get_template
    from domaintune.training.model import load_tokenizer

    tok = load_tokenizer(str(model))
    rows = build_datasets(cfg.data, tok, get_template(cfg.data.template, tok), cfg.train.seed).eval
    assert len(rows) == 5
    net = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model)), str(run)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            n = sum(label != -100 for label in row["labels"][1:])
            loss = net(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss
            total, count = total + float(loss) * n, count + n
    return total / count


@pytest.mark.parametrize("arch", ["qwen2", "bloom"])
def test_eval_loss_is_the_token_mean_at_any_process_count(tmp_path, tiny_model_dir, arch):
    """5 validation rows (odd: one process evaluates a row more), 2 rows per batch: with 2 processes the logged
    and final eval_loss equal 1 process's and the mean over all validation target tokens of transformers' own
    loss, on the packed (qwen2) and padded (bloom) paths (regression: 2 processes logged 7.916 for 7.642: the
    Trainer scaled each process's loss for the gradient all-reduce and counted rows accelerate repeats)."""
    model = tiny_model_dir(arch)
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(SAMPLE.read_text(encoding="utf-8").splitlines()[:25]) + "\n", encoding="utf-8")
    cfg, two, info_two = _eval_run(tmp_path, model, data, "two", 2)
    _, one, info_one = _eval_run(tmp_path, model, data, "one", 1)
    assert info_two["path"]["batching"] == info_one["path"]["batching"] == ("pack" if arch == "qwen2" else "pad")
    assert len(two) == len(one) == 1  # evaluated once, at step 1, logged once (rank 0)
    assert two[0] == pytest.approx(one[0], rel=1e-5)
    assert info_two["final_eval_loss"] == two[0] and info_one["final_eval_loss"] == one[0]
    assert two[0] == pytest.approx(_reference_eval_loss(cfg, model, tmp_path / "two"), rel=1e-4)
