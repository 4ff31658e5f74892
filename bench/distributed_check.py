"""The distributed engines on a GPU: FSDP (LoRA and QLoRA) and DeepSpeed ZeRO-2/3 (with CPU offload) on a tiny
model.

For each engine, `domaintune train` runs under torchrun at world size 1 (one GPU is what a lent machine has)
for a few steps with a checkpoint, then `domaintune predict` reads the run directory. Recorded per engine in
bench/results/distributed-<device>.json: exit codes, seconds, whether the run directory and its checkpoint hold
ordinary adapter weights, the per-step losses, and predict's row count. Multi-GPU sharding itself is exercised
on CPU by tests/training/test_distributed.py (FSDP, 2 processes, gloo); DeepSpeed has no CPU path there.

    python bench/distributed_check.py --device cuda          # on the GPU machine (bench/gpu_check.sh step 5)
    python bench/distributed_check.py --device cpu --no-save  # FSDP only, to try the script on a CPU
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import load_average, provenance

ROOT = Path(__file__).resolve().parents[1]
PREDICT = ("fsdp", "zero3")  # FSDP's full state dict and ZeRO-3's gathered weights: predict reads each run
ENGINES = {"fsdp": ("fsdp", None), "fsdp_qlora": ("fsdp", None), "zero2": ("deepspeed", "zero2.json"),
           "zero3": ("deepspeed", "zero3.json"), "zero3_offload": ("deepspeed", "zero3_offload.json")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_engine(name: str, work: Path, model: Path, device: str) -> dict:
    import yaml

    distributed, conf = ENGINES[name]
    out = work / f"run-{name}"
    train = {"output_dir": str(out), "batch_size": 4, "per_device_batch_size": 2, "max_steps": 4, "logging_steps": 1,
             "save_steps": 2, "learning_rate": 1e-3, "distributed": distributed}
    if conf:
        train["distributed_config"] = str(ROOT / "configs" / "distributed" / conf)
    cfg = {"model": {"name_or_path": str(model), **({"quantization": "4bit"} if name == "fsdp_qlora" else {})},
           "data": {"path": str(ROOT / "examples" / "data" / "train.jsonl"), "cutoff_len": 128, "val_size": 4},
           "train": train}
    cfg_path = work / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
                        env["MASTER_PORT"], "-m", "domaintune", "train", str(cfg_path)],
                       env=env, capture_output=True, text=True, timeout=120)
    rec: dict = {"engine": name, "train_exit": r.returncode, "train_seconds": round(time.time() - t0, 1)}
    if r.returncode != 0:
        rec["error"] = (r.stdout + r.stderr)[-1500:]
        return rec
    log = [json.loads(line) for line in (out / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    rec["losses"] = [x["loss"] for x in log if "loss" in x]
    rec["adapter_saved"] = (out / "adapter_model.safetensors").is_file()
    rec["checkpoint_adapter_saved"] = (out / "checkpoint-4" / "adapter_model.safetensors").is_file()
    rec["ok"] = bool(rec["adapter_saved"] and rec["checkpoint_adapter_saved"])
    if name not in PREDICT:  # one predict per kind of consolidation is enough (and keeps the step short)
        return rec
    p = subprocess.run([sys.executable, "-m", "domaintune", "predict", str(out), "--data",
                        str(ROOT / "examples" / "data" / "test.jsonl"), "--limit", "2", "--max-new-tokens", "8",
                        "--out", str(work / f"pred-{name}.jsonl")], env=env, capture_output=True, text=True,
                       timeout=300)
    rec["predict_exit"] = p.returncode
    pred = work / f"pred-{name}.jsonl"
    rec["predict_rows"] = len(pred.read_text(encoding="utf-8").splitlines()) if pred.is_file() else 0
    rec["ok"] = rec["ok"] and rec["predict_rows"] == 2
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="(default: %(default)s)")
    ap.add_argument("--no-save", action="store_true", help="print only; write nothing under bench/results/")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from domaintune.training.tiny import make_tiny_model

    engines = list(ENGINES) if a.device == "cuda" else ["fsdp"]
    load_start = load_average()
    results: dict = {"device": a.device, "engines": {}}
    gpu = None
    if a.device == "cuda":
        import torch

        gpu = results["gpu"] = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        model = make_tiny_model(work / "tiny", "qwen2", "micro")
        for name in engines:
            missing = ("deepspeed" if ENGINES[name][0] == "deepspeed" else "bitsandbytes" if "qlora" in name else "")
            if missing and importlib.util.find_spec(missing) is None:
                results["engines"][name] = {"engine": name, "skipped": f"{missing} is not installed"}
                continue
            results["engines"][name] = run_engine(name, work, model, a.device)
            print(json.dumps(results["engines"][name])[:600], flush=True)
            if not a.no_save:  # after each engine: a step cut short by its time limit keeps what it measured
                out = ROOT / "bench" / "results" / f"distributed-{a.device}.json"
                record = {**provenance(load_start, gpu=gpu, extra_versions=("accelerate", "deepspeed")), **results}
                out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if not a.no_save:
        print(f"wrote {ROOT / 'bench' / 'results' / f'distributed-{a.device}.json'}")
    return 0 if all(r.get("ok") or r.get("skipped") for r in results["engines"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
