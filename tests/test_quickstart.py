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
    assert [r["step"] for r in log if "loss" in r][:2] == [1, 5]  # logging_steps 5 (and the first step)
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run / "template.json").read_text(encoding="utf-8"))["name"] == "domain_zh"
    assert json.loads((run / "adapter_config.json").read_text(encoding="utf-8"))["r"] == 4
    out = capsys.readouterr().out
    assert "[1/4] using the model in" in out and f"Run directory: {run}" in out
