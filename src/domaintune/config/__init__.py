"""Typed configuration: one YAML file with sections `model`, `lora`, `data`, `train`, `selfinstruct`, `judge`.

| module | what |
|---|---|
| `sections.py` | the `model`, `lora`, `data`, `train` sections and `Config`; derived values as methods |
| `selfinstruct.py` | the `selfinstruct` section read by `gen-data` |
| `judge.py` | the `judge` section read by `judge` |
| `loading.py` | YAML + dotted overrides -> validated `Config`, error messages, `explain()` |
| `flat.py` | conversion of flat BLOOM-LoRA JSON configs |

Every field has a one-line description: `domaintune config --explain` prints them. Sections are
read-only after validation; a verb is handed the section it needs (`cfg.data`, `cfg.train`).
"""
from __future__ import annotations

from .flat import config_from_flat, read_json_file
from .judge import JudgeConfig
from .loading import (
    apply_overrides,
    build_config,
    check_config,
    explain,
    format_validation_error,
    load_config,
    parse_override,
    read_yaml,
    validation_problems,
)
from .methods import FreezeConfig
from .sections import Config, DataConfig, LoraConfig, ModelConfig, TrainConfig
from .selfinstruct import Persona, SelfInstructConfig

__all__ = [
    "Config", "DataConfig", "FreezeConfig", "JudgeConfig", "LoraConfig", "ModelConfig", "Persona",
    "SelfInstructConfig", "TrainConfig",
    "apply_overrides", "build_config", "check_config", "config_from_flat", "explain", "format_validation_error",
    "load_config", "parse_override", "read_json_file", "read_yaml", "validation_problems",
]
