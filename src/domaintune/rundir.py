"""The run directory: the contract between `train` and every later verb.

Every verb after `train` reads the run directory, never the training YAML again. File names live here
and nowhere else.

| file | written by | what |
|---|---|---|
| config.yaml | train | the resolved config, every default filled in |
| template.json | train | the prompt template used in training (see templates.py) |
| adapter_config.json, adapter_model.safetensors | train (LoRA) | final adapter |
| model.safetensors / model-*.safetensors, config.json | train (full) | final full model |
| tokenizer files, generation_config.json | train | with the right EOS/pad |
| checkpoint-*/ | train | resumable checkpoints; only complete ones count |
| log.jsonl | train | one JSON object per logged step |
| run_info.json | train | base model, license, data statistics, runtime, throughput |
| loss.png | plot / train | loss and learning-rate curves |
| predictions.jsonl, metrics.json, metrics_per_sample.jsonl, report.md | predict / eval / report | |
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .jsonl import read_jsonl, write_atomic

CONFIG = "config.yaml"
TEMPLATE = "template.json"
LOG = "log.jsonl"
RUN_INFO = "run_info.json"
LOSS_PNG = "loss.png"
PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
METRICS_PER_SAMPLE = "metrics_per_sample.jsonl"
REPORT = "report.md"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CHECKPOINT_PREFIX = "checkpoint-"


class RunDir:
    """Paths and (de)serialisation helpers for one run directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def template_path(self) -> Path:
        return self.path / TEMPLATE

    @property
    def log_path(self) -> Path:
        return self.path / LOG

    @property
    def run_info_path(self) -> Path:
        return self.path / RUN_INFO

    def has_adapter(self) -> bool:
        return (self.path / ADAPTER_CONFIG).is_file() and (self.path / ADAPTER_WEIGHTS).is_file()

    def has_full_model(self) -> bool:
        if not (self.path / "config.json").is_file():
            return False
        return any(self.path.glob("model*.safetensors"))

    def has_weights(self) -> bool:
        return self.has_adapter() or self.has_full_model()

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text(encoding="utf-8"))

    def write_json(self, name: str, obj: Any) -> Path:
        """Write atomically (temp file + rename) so a reader never sees half a file."""
        target = self.path / name
        write_atomic(target, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")
        return target

    def read_log(self) -> list[dict]:
        """All records of log.jsonl (a torn last line, from a kill mid-write, is ignored)."""
        return read_jsonl(self.log_path)

    def run_info(self) -> dict:
        return self.read_json(RUN_INFO) if self.run_info_path.is_file() else {}
