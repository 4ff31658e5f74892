"""Reading a config: YAML file -> dotted overrides -> validation, with errors that name the field.

- Unknown keys are errors that name the key and the closest valid one.
- Wrong types name the field and the expected type.
- Dotted overrides on the command line: `train.learning_rate=2e-4 lora.r=16` (values parsed as YAML).
- Relative paths in a config file are kept as written and read relative to the folder the command runs
  in (not the config file's folder), the way most CLIs treat paths. The shipped configs assume the
  project root.
- `explain()` lists every field with its default and description (`domaintune config --explain`).
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..bundled import config_not_found_hint
from ..errors import UserError
from .sections import Config
from .yamltext import MAX_DEPTH, YamlSyntaxError, load_yaml
from .yamltext import printable as _shown


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


# Names users bring from other tools (PEFT, TrainingArguments, LLaMA-Factory, axolotl, flat BLOOM-LoRA files) for
# our keys; one is suggested where it is a valid key at the place it was written (`lora.rank` -> `lora.r`), which
# spelling alone does not find.
ALIASES = {
    "rank": "r", "lora_r": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "lora_target": "target_modules", "lora_target_modules": "target_modules", "use_lora": "enabled",
    "epochs": "num_epochs", "num_train_epochs": "num_epochs", "epoch": "num_epochs",
    "lr": "learning_rate", "lr_scheduler_type": "lr_scheduler", "scheduler": "lr_scheduler",
    "optimizer": "optim", "warmup": "warmup_ratio", "steps": "max_steps",
    "per_device_train_batch_size": "per_device_batch_size", "micro_batch_size": "per_device_batch_size",
    "global_batch_size": "batch_size", "gradient_accumulation": "gradient_accumulation_steps",
    "grad_accum": "gradient_accumulation_steps", "gradient_clipping": "max_grad_norm", "clip_grad": "max_grad_norm",
    "random_seed": "seed", "output": "output_dir", "save_dir": "output_dir",
    "model_name_or_path": "name_or_path", "model_name": "name_or_path", "model_path": "name_or_path",
    "base_model": "name_or_path", "torch_dtype": "dtype", "precision": "dtype",
    "data_path": "path", "train_file": "path", "dataset": "path", "eval_file": "eval_path",
    "validation_file": "eval_path", "val_set_size": "val_size", "cutoff": "cutoff_len", "max_length": "cutoff_len",
    "max_seq_length": "cutoff_len", "max_seq_len": "cutoff_len", "system_prompt": "system",
    "prompt_template": "template",
}

_TYPE_WORDS = {
    "int_parsing": "an integer", "int_type": "an integer", "int_from_float": "an integer",
    "float_parsing": "a number", "float_type": "a number",
    "bool_parsing": "true or false", "bool_type": "true or false",
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


def _blame(dotted: str, overrides: dict[tuple[str, ...], str]) -> str | None:
    """The command-line override that set the field `dotted` (or a value above or below it), if any; the
    last one wins, as it does when overrides are applied."""
    key = tuple(dotted.split(".")) if dotted else ()
    hits = [item for k, item in overrides.items() if key and (k[: len(key)] == key or key[: len(k)] == k)]
    return hits[-1] if hits else None


def validation_problems(err: ValidationError) -> list[tuple[str, str]]:
    """(dotted field, text) per problem, worded as `format_validation_error` prints them (without the override
    that caused one): unknown keys with the closest valid key, wrong types with the expected type. A check across
    fields (a model validator) has the field "" and its message as the text."""
    problems: list[tuple[str, str]] = []  # (dotted field, text)
    expected: dict[str, tuple[Any, list[str]]] = {}  # field -> (input, what it must be); a union gives several
    for e in err.errors():
        if e["type"] == "extra_forbidden":
            loc = tuple(str(p) for p in e["loc"] if not isinstance(p, int))
            dotted = ".".join(loc)
            valid = _fields_of(Config, loc[:-1])
            alias = ALIASES.get(loc[-1].lower())
            close = [alias] if alias in valid else difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
            hint = f" Did you mean '{_shown('.'.join(loc[:-1] + (close[0],)))}'?" if close else ""
            problems.append((dotted, f"unknown key '{_shown(dotted)}'.{hint} Valid keys here: {', '.join(valid)}"))
            continue
        dotted = ".".join(_field_path(e["loc"]))
        if e["type"] in _TYPE_WORDS or e["type"] == "literal_error":
            word = _TYPE_WORDS.get(e["type"]) or e.get("ctx", {}).get("expected", e["msg"])
            expected.setdefault(dotted, (e.get("input"), []))[1].append(word)
        elif not dotted:  # a check across fields (model validator): its message says it all
            problems.append(("", _shown(e["msg"].removeprefix("Value error, "), 400)))
        else:
            problems.append((dotted, f"'{dotted}': {e['msg'].removeprefix('Value error, ')} "
                                     f"(got {_shown(repr(e.get('input')), 200)})"))
    for dotted, (value, words) in expected.items():
        problems.append((dotted, f"'{dotted}' must be {' or '.join(dict.fromkeys(words))}, "
                                 f"got {_shown(repr(value), 200)}"))
    return problems


def format_validation_error(err: ValidationError, source: str,
                            overrides: dict[tuple[str, ...], str] | None = None) -> str:
    """One line per problem (`validation_problems`). A problem that a command-line override caused names that
    override, not the file (`overrides`: the dotted key of each override -> the override as typed)."""
    overrides = overrides or {}
    lines, from_file = [], False
    for dotted, text in validation_problems(err):
        item = _blame(dotted, overrides)
        from_file = from_file or item is None
        lines.append(f"override '{_shown(item)}': {text}" if item else text)
    head = f"{source}: invalid config" if from_file or not overrides else "invalid command-line override"
    return head + ":\n  " + "\n  ".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"override '{_shown(item)}' must look like section.key=value, e.g. train.learning_rate=2e-4")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise UserError(f"override '{_shown(item)}': '{_shown(key, 60)}' is not a dotted key like train.learning_rate")
    parts = key.split(".")
    if len(parts) > MAX_DEPTH:
        raise UserError(f"override '{_shown(item)}': the key is {len(parts)} levels deep; a config is a few levels "
                        "of sections")
    try:
        value = load_yaml(raw, f"override '{_shown(item)}'") if raw.strip() else ""
    except YamlSyntaxError:
        value = raw  # not YAML: the text as typed (`data.system=a: b: c`)
    return parts, value


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    # A deep copy of plain data. Safe here: read_yaml and parse_override have bounded the size with every
    # alias expanded and refused dates, bytes and cycles, which this copy would trip over.
    out = json.loads(json.dumps(raw))
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise UserError(f"override '{_shown(item)}': '{_shown(p)}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    shown = str(p) if len(str(p)) <= 200 else str(p)[:200] + "..."
    try:
        if not p.is_file():
            raise UserError(f"config file '{shown}' not found{config_not_found_hint(p)}")
        data = p.read_bytes()
    except OSError as e:  # a name too long, no permission, an I/O error
        raise UserError(f"config file '{shown}' cannot be read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{p} line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as "
                        "UTF-8") from None
    raw = load_yaml(text, str(p)) or {}
    if not isinstance(raw, dict):
        raise UserError(f"{p}: the top level must be a mapping of sections (model, lora, data, train)")
    return raw


def build_config(raw: dict, source: str = "config", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Validate `raw` (already holding `overrides`, which are only named in error messages)."""
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        blamed = {tuple(parse_override(item)[0]): item for item in overrides}
        raise UserError(format_validation_error(e, source, blamed)) from None


def check_config(raw: dict) -> tuple[Config | None, list[tuple[str, str]]]:
    """`build_config` that reports instead of raising: (the Config, []) or (None, `validation_problems`), for a
    caller that shows each problem at its field (the studio's form)."""
    try:
        return Config.model_validate(raw), []
    except ValidationError as e:
        return None, validation_problems(e)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or none: all defaults), apply dotted overrides, validate."""
    raw = read_yaml(path) if path else {}
    return build_config(apply_overrides(raw, overrides), str(path or "config"), overrides)


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
        lines.append(f"{prefix}{name} = {json.dumps(default, ensure_ascii=False)}  # {f.description or ''}")
        if name == "path" and model_cls.__name__ == "DataConfig":  # the keys of a source mapping
            from .sources import SourceConfig
            lines.extend(explain(SourceConfig, prefix + "path[]."))
    return lines
