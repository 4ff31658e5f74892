"""`domaintune train`: `run_train` runs the configured stage, `train.stage` sft (run.py's `TrainingRun`) or
dpo / orpo / kto / simpo (preference.py's `PreferenceRun`, a `TrainingRun` with preference rows and TRL's trainers).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .run import TrainingRun

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["TrainingRun", "run_train"]


def run_train(cfg: Config, resume: bool = False, overwrite: bool = False) -> Path:
    """Train as configured; returns the run directory."""
    if cfg.train.stage != "sft":
        from .preference import PreferenceRun

        return PreferenceRun(cfg, resume=resume, overwrite=overwrite).execute()
    return TrainingRun(cfg, resume=resume, overwrite=overwrite).execute()
