"""Typed configuration: one YAML file with sections `model`, `lora`, `data`, `train`, `selfinstruct`.

- Unknown keys are errors that name the key and the closest valid one.
- Wrong types name the field and the expected type.
- Dotted overrides on the command line: `train.learning_rate=2e-4 lora.r=16` (values parsed as YAML).
- Relative paths in a config file are kept as written and read relative to the folder the command runs
  in (not the config file's folder), the way most CLIs treat paths. The shipped configs assume the
  project root.
- A number given to a text field (e.g. `model.revision=12345678`, a commit hash) is taken as text.
- The flat JSON layout of BLOOM LoRA projects (`model_name_or_path`, `data_path`, `batch_size`, ...)
  converts with `config_from_flat()`.

Every field has a one-line description: `domaintune config --explain` prints them.
"""
from __future__ import annotations

import difflib
import json
import math
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError
from .selfinstruct.config import SelfInstructConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), coerce_numbers_to_str=True)


class ModelConfig(_Section):
    name_or_path: str = Field(
        "runs/tiny-model",
        description="Base model: a local Hugging Face model directory or a hub id (e.g. bigscience/bloomz-560m).",
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Weight/compute dtype; auto = bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU."
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model (only for models you trust)."
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Load the base model quantized with bitsandbytes (QLoRA); needs a CUDA GPU."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base model.")
    attn_implementation: str | None = Field(
        None, description="Attention kernel passed to transformers (e.g. sdpa, eager, flash_attention_2); None = library default."
    )


class LoraConfig(_Section):
    enabled: bool = Field(True, description="Train a LoRA adapter (true) or fine-tune all weights (false).")
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: float = Field(16, gt=0, description="LoRA scaling alpha (effective scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: Union[list[str], Literal["all-linear"]] = Field(
        "all-linear",
        description="Module names to adapt (e.g. [query_key_value] for BLOOM, [q_proj, v_proj] for LLaMA/Qwen) or all-linear.",
    )


class DataConfig(_Section):
    path: str = Field("examples/data/train.jsonl", description="Training file: JSON lines or a JSON array (alpaca or messages format).")
    eval_path: str | None = Field(
        None, description="Validation file; when unset, val_size rows are split off the training file."
    )
    template: str = Field(
        "domain_zh",
        description="Prompt template: domain_zh, alpaca, chatml, tokenizer (the model's chat_template) or a path to a template JSON.",
    )
    system: str | None = Field(None, description="System prompt used for rows that do not carry their own; None = the template's default.")
    cutoff_len: int = Field(512, gt=0, description="Maximum tokens per training sample.")
    overlength: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="What to do with samples longer than cutoff_len (always counted and reported)."
    )
    train_on_inputs: bool = Field(False, description="Also compute the loss on prompts (default: responses only).")
    val_size: Union[int, float] = Field(
        0.1, ge=0, description="Validation split taken from the training file: a row count (int) or a fraction in (0, 1)."
    )
    val_max_rows: int | None = Field(None, ge=0, description="Upper bound on the validation split's row count.")

    @field_validator("val_size")
    @classmethod
    def _val_size(cls, v):
        if isinstance(v, float) and not v.is_integer() and not 0 < v < 1:
            raise ValueError("a fraction must lie in (0, 1); use an integer for a row count")
        return v


class TrainConfig(_Section):
    output_dir: str = Field("runs/quickstart", description="Run directory: checkpoints, final weights, logs, reports.")
    batch_size: int = Field(8, gt=0, description="Global batch size = per_device_batch_size x gradient accumulation x processes.")
    per_device_batch_size: int = Field(2, gt=0, description="Batch size per device and step.")
    gradient_accumulation_steps: int | None = Field(
        None, gt=0, description="Explicit gradient accumulation; None = batch_size / (per_device_batch_size x processes)."
    )
    num_epochs: float = Field(3.0, gt=0, description="Training epochs (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps; -1 = use num_epochs.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: str = Field("cosine", description="Learning-rate schedule (transformers name: cosine, linear, constant, ...).")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps used for linear warm-up.")
    warmup_steps: int | None = Field(None, ge=0, description="Warm-up steps; overrides warmup_ratio when set.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 = off).")
    optim: str = Field("adamw_torch", description="Optimizer (transformers name, e.g. adamw_torch, paged_adamw_8bit for QLoRA).")
    logging_steps: int = Field(10, gt=0, description="Log loss and learning rate every N optimizer steps.")
    eval_steps: int = Field(50, gt=0, description="Compute the validation loss every N steps (and at the end).")
    save_steps: int = Field(50, gt=0, description="Save a resumable checkpoint every N steps.")
    save_total_limit: int | None = Field(3, gt=0, description="Keep at most this many checkpoints (None = all).")
    seed: int = Field(42, description="Random seed (model init of new weights, data order, validation split).")
    report_to: list[str] = Field(
        default_factory=lambda: ["none"], description="Trackers: none, tensorboard, wandb (needs the package installed)."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory by recomputing activations.")
    group_by_length: bool = Field(False, description="Batch samples of similar length together (less padding).")
    dataloader_num_workers: int = Field(0, ge=0, description="Data-loading worker processes.")

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, v):
        return [v] if isinstance(v, str) else v


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter settings.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training loop.")
    selfinstruct: SelfInstructConfig = Field(default_factory=SelfInstructConfig, description="Data generation (gen-data).")

    @model_validator(mode="after")
    def _check(self):
        if self.model.quantization != "none" and not self.lora.enabled:
            raise ValueError("model.quantization needs lora.enabled: true (QLoRA trains an adapter on a quantized base)")
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------- loading and errors

def _fields_of(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    """Valid key names at `loc` inside the config tree."""
    cls = model_cls
    for part in loc:
        field = cls.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        cls = ann
    return list(cls.model_fields)


_TYPE_WORDS = {
    "int_parsing": "an integer", "int_type": "an integer", "int_from_float": "an integer",
    "float_parsing": "a number", "float_type": "a number", "bool_parsing": "true or false", "bool_type": "true or false",
    "string_type": "a string", "list_type": "a list", "model_type": "a mapping (section)", "dict_type": "a mapping",
}


def _field_path(loc: tuple) -> tuple[str, ...]:
    """The field names in a pydantic error location, without list indices and union-member tags
    (pydantic reports `data.val_size` as `data.val_size.int` / `data.val_size.float`)."""
    out: list[str] = []
    cls: Any = Config
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(cls, "model_fields", None)
        if not fields or part not in fields:
            break
        out.append(part)
        ann = fields[part].annotation
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return tuple(out)


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: unknown keys with the closest valid key, wrong types with the expected type."""
    lines: list[str] = []
    expected: dict[str, tuple[Any, list[str]]] = {}  # field -> (input, what it must be); a union gives several
    for e in err.errors():
        if e["type"] == "extra_forbidden":
            loc = tuple(str(p) for p in e["loc"] if not isinstance(p, int))
            dotted = ".".join(loc)
            valid = _fields_of(Config, loc[:-1])
            close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
            hint = f" Did you mean '{'.'.join(loc[:-1] + (close[0],))}'?" if close else ""
            lines.append(f"unknown key '{dotted}'.{hint} Valid keys here: {', '.join(valid)}")
            continue
        dotted = ".".join(_field_path(e["loc"]))
        if e["type"] in _TYPE_WORDS or e["type"] == "literal_error":
            word = _TYPE_WORDS.get(e["type"]) or e.get("ctx", {}).get("expected", e["msg"])
            expected.setdefault(dotted, (e.get("input"), []))[1].append(word)
        elif not dotted:  # a check across fields (model validator): its message says it all
            lines.append(e["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"'{dotted}': {e['msg'].removeprefix('Value error, ')} (got {e.get('input')!r})")
    for dotted, (value, words) in expected.items():
        lines.append(f"'{dotted}' must be {' or '.join(dict.fromkeys(words))}, got {value!r}")
    return f"{source}: invalid config:\n  " + "\n  ".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"override '{item}' must look like section.key=value, e.g. train.learning_rate=2e-4")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise UserError(f"override '{item}': '{key}' is not a dotted key like train.learning_rate")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    out = json.loads(json.dumps(raw))  # deep copy of plain data
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise UserError(f"override '{item}': '{p}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file '{p}' not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{p}: the top level must be a mapping of sections (model, lora, data, train)")
    return raw


def build_config(raw: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise UserError(format_validation_error(e, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or none: all defaults), apply dotted overrides, validate."""
    raw = read_yaml(path) if path else {}
    return build_config(apply_overrides(raw, overrides), str(path or "config"))


# ---------------------------------------------------------------- flat JSON (BLOOM LoRA projects)

FLAT_RUN_KEYS = {
    "model_name_or_path", "data_path", "output_dir", "batch_size", "per_device_train_batch_size", "num_epochs",
    "learning_rate", "cutoff_len", "val_set_size", "val_set_rate", "save_steps", "eval_steps", "warmup_steps",
    "warmup_rate", "logging_steps", "gradient_accumulation_steps",
}
FLAT_LORA_KEYS = {"lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"}


def config_from_flat(run: dict, lora: dict | None = None, source: str = "run.json") -> dict:
    """Convert the flat JSON layout (run config + LoRA file) into our nested YAML layout.

    Meanings kept: batch_size is the global batch (train.batch_size); gradient accumulation is left to be
    derived at train time (batch_size / (per_device x processes)), so the global batch stays batch_size under
    torchrun too, unless the file gives gradient_accumulation_steps; validation size = min(val_set_size, val_set_rate x rows) (-> data.val_size = rate, data.val_max_rows = size).
    """
    unknown = set(run) - FLAT_RUN_KEYS
    if unknown:
        raise UserError(f"{source}: unknown key(s) {sorted(unknown)}; known: {sorted(FLAT_RUN_KEYS)}")
    lora = lora or {}
    unknown = set(lora) - FLAT_LORA_KEYS
    if unknown:
        raise UserError(f"LoRA file: unknown key(s) {sorted(unknown)}; known: {sorted(FLAT_LORA_KEYS)}")
    out: dict[str, dict] = {"model": {}, "lora": {}, "data": {}, "train": {}}
    m, d, t, lo = out["model"], out["data"], out["train"], out["lora"]
    if "model_name_or_path" in run:
        m["name_or_path"] = run["model_name_or_path"]
    if "data_path" in run:
        d["path"] = run["data_path"]
    if "cutoff_len" in run:
        d["cutoff_len"] = run["cutoff_len"]
    rate, size = run.get("val_set_rate"), run.get("val_set_size")
    if rate is not None:
        d["val_size"] = float(rate)
        if size is not None:
            d["val_max_rows"] = int(size)
    elif size is not None:
        d["val_size"] = int(size)
    for src, dst in [("output_dir", "output_dir"), ("batch_size", "batch_size"),
                     ("per_device_train_batch_size", "per_device_batch_size"), ("num_epochs", "num_epochs"),
                     ("learning_rate", "learning_rate"), ("save_steps", "save_steps"), ("eval_steps", "eval_steps"),
                     ("logging_steps", "logging_steps"), ("gradient_accumulation_steps", "gradient_accumulation_steps"),
                     ("warmup_steps", "warmup_steps")]:
        if src in run:
            t[dst] = run[src]
    if "warmup_rate" in run:
        t["warmup_ratio"] = run["warmup_rate"]
    # Checked here so the error names the flat file; the accumulation itself is derived at train time.
    if "batch_size" in run and "per_device_train_batch_size" in run and "gradient_accumulation_steps" not in run:
        bs, per = int(run["batch_size"]), int(run["per_device_train_batch_size"])
        if bs % per:
            raise UserError(f"{source}: batch_size {bs} is not a multiple of per_device_train_batch_size {per}")
    for src, dst in [("lora_r", "r"), ("lora_alpha", "alpha"), ("lora_dropout", "dropout"),
                     ("lora_target_modules", "target_modules")]:
        if src in lora:
            lo[dst] = lora[src]
    lo["enabled"] = True
    return {k: v for k, v in out.items() if v}


def read_json_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"'{p}' not found")
    try:
        obj = json.loads(p.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise UserError(f"{p} line {e.lineno}: not valid JSON: {e.msg}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{p}: expected a JSON object at the top level")
    return obj


# ---------------------------------------------------------------- --explain

def explain(model_cls: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """One line per field: dotted name, default, description."""
    lines = []
    for name, f in model_cls.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.append(f"{prefix}{name}:  # {f.description or ''}")
            lines.extend(explain(ann, prefix + name + "."))
            continue
        default = f.get_default(call_default_factory=True)
        if isinstance(default, float) and math.isfinite(default) and default.is_integer():
            default = default
        lines.append(f"{prefix}{name} = {json.dumps(default, ensure_ascii=False)}  # {f.description or ''}")
    return lines
