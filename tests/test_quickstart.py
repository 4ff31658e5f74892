"""`domaintune quickstart`: the whole loop (train, predict, score, plot, report) end to end, with the shipped
config and sample data in a fresh working directory, on a prebuilt micro model and one epoch."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from domaintune.quickstart import run_quickstart

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_fills_the_run_directory(tiny_model_dir, tmp_path, monkeypatch, capsys):
    shutil.copytree(REPO / "examples" / "data", tmp_path / "examples" / "data")
    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs" / "quickstart.yaml", tmp_path / "configs" / "quickstart.yaml")
    monkeypatch.chdir(tmp_path)  # the config's relative paths (data, output_dir) resolve here

    run = run_quickstart("configs/quickstart.yaml", [f"model.name_or_path={tiny_model_dir('qwen2')}",
                                                     "train.num_epochs=1", "lora.r=4"], max_new_tokens=4)

    assert Path(run).resolve() == (tmp_path / "runs" / "quickstart").resolve()
    names = {p.name for p in Path(run).iterdir()}
    assert names >= {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                     "template.json", "config.yaml", "run_info.json", "log.jsonl", "predictions.jsonl", "metrics.json",
                     "loss.png", "report.md"}
    test_rows = (tmp_path / "examples" / "data" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    preds = [json.loads(line) for line in (run / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [p["id"] for p in preds] == list(range(len(test_rows))) and all(p["num_tokens"] <= 4 for p in preds)
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["num_samples"] == len(test_rows) and metrics["loss"] > 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    info = json.loads((run / "run_info.json").read_text(encoding="utf-8"))
    assert info["train"]["global_steps"] == 7  # 56 training rows (64 - 8 validation), batch 8, one epoch
    assert (info["data"]["train_rows"], info["data"]["eval_rows"]) == (56, 8)
    # the quickstart trains on the fast path: the chunked loss and packed rows (a Qwen2-style model)
    assert info["train"]["path"] == {"loss": "chunked", "batching": "pack", "per_device_batch_size": 4,
                                     "gradient_accumulation_steps": 2, "gradient_checkpointing": False,
                                     "global_batch": 8}
    assert [r["step"] for r in log if "loss" in r][:2] == [1, 5]  # logging_steps 5 (and the first step)
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run / "template.json").read_text(encoding="utf-8"))["name"] == "domain_zh"
    assert json.loads((run / "adapter_config.json").read_text(encoding="utf-8"))["r"] == 4
    printed = capsys.readouterr()
    assert "[1/4] using the model in" in printed.err and f"Run directory: {run}" in printed.out
    assert printed.out.startswith(f"\ndone. Run directory: {run}\n")  # the steps' own results went to stderr


def test_quickstart_without_a_config_works_from_any_folder(tiny_model_dir, tmp_path, monkeypatch):
    """Regression (issue 9, defect 7): from any folder but the repository root it failed with
    "data file 'examples/data/train.jsonl' not found"."""
    from domaintune.cli import main

    monkeypatch.chdir(tmp_path)  # an empty folder: no examples/, no configs/
    assert main(["quickstart", f"model.name_or_path={tiny_model_dir('qwen2')}", "train.num_epochs=1", "lora.r=4",
                 "--max-new-tokens", "2"]) == 0
    run = tmp_path / "runs" / "quickstart"
    info = json.loads((run / "run_info.json").read_text(encoding="utf-8"))
    assert info["data"]["path"].endswith("train.jsonl") and (info["data"]["train_rows"], info["data"]["eval_rows"]) \
        == (56, 8)
    test_rows = (REPO / "examples" / "data" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    assert len((run / "predictions.jsonl").read_text(encoding="utf-8").splitlines()) == len(test_rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_a_built_wheel_carries_the_sample_data_and_configs_and_runs_the_quickstart(tiny_model_dir, tmp_path):
    """A plain `pip install` has no examples/ or configs/ folder: the wheel must carry them."""
    import os
    import subprocess
    import sys
    import zipfile

    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(wheels), str(REPO)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(wheels.glob("domaintune-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("train.jsonl", "test.jsonl", "chat.jsonl", "seeds.jsonl"):
        assert f"domaintune/sample_data/{f}" in names
        shipped = zipfile.ZipFile(wheel).read(f"domaintune/sample_data/{f}")
        assert shipped == (REPO / "examples" / "data" / f).read_bytes()
    assert "domaintune/configs/quickstart.yaml" in names and "domaintune/inference/serve/static/index.html" in names
    docs = {n.rsplit("/", 1)[1] for n in names if n.startswith("domaintune/sample_docs/")}
    assert docs == {p.name for p in (REPO / "examples" / "docs").iterdir()}  # what configs/documents.yaml reads
    assert "domaintune/sample_slurm/train.sbatch" in names
    studio = {n.rsplit("/", 1)[1] for n in names if n.startswith("domaintune/studio/static/")}
    assert studio == {p.name for p in (Path(__file__).parents[1] / "src/domaintune/studio/static").iterdir()}
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    code = "import domaintune, sys; print(domaintune.__file__)"
    where = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True)
    assert where.stdout.startswith(str(site))  # the installed copy, not the source tree
    argv = ["quickstart", f"model.name_or_path={tiny_model_dir('qwen2')}", "train.num_epochs=1", "lora.r=4",
            "--max-new-tokens", "2"]
    r = subprocess.run([sys.executable, "-m", "domaintune", *argv], cwd=work, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (work / "runs" / "quickstart" / "report.md").is_file()
    # Regression (issue 22, defect 26): the shipped configs were unreachable after `pip install`; `init` writes
    # them (and the sample data they name) where their commands expect them.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    r = subprocess.run([sys.executable, "-m", "domaintune", "init", "judge"], cwd=fresh, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines() == ["wrote: configs/judge.yaml", "wrote: examples/data/test.jsonl"]
    for rel in ("configs/judge.yaml", "examples/data/test.jsonl"):
        assert (fresh / rel).read_bytes() == (REPO / rel).read_bytes()
    # the documents config names a folder: init writes the sample documents in it (they were missing)
    r = subprocess.run([sys.executable, "-m", "domaintune", "init", "documents"], cwd=fresh, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    for doc in (REPO / "examples" / "docs").iterdir():
        assert (fresh / "examples" / "docs" / doc.name).read_bytes() == doc.read_bytes()
