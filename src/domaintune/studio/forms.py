"""The studio's new-run form, built from the config schema and checked by the CLI's own functions.

- `form_fields()`: one entry per field of the sections model, lora, data, train (name, type, default, choices,
  help = the field's description as `domaintune config --explain` prints it, `basic`).
- `config_from_form(values, project)`: the form's text values -> the raw config dict, or the problems per field.
  Each value is read as `domaintune train CFG section.key=VALUE` reads it (`parse_override`), except plain text
  fields (kept as typed) and paths (relative to ROOT, confined to it, written absolute so the saved config runs
  from any folder). Validation is `check_config` (the problems `build_config` words), then the checks training
  runs before the model loads: the output folder, the trackers, the data files, the model folder, the LoRA rank
  against the model's hidden size, the trainer's settings. An error's text is the CLI's for the same value.
- `save_config(raw, project, name)`: ROOT/configs/NAME.yaml with the command that runs it.
- `model_choices(project)`: the families users pick (tiny offline model and a real hub id each) and the local
  model folders of the project.
"""
from __future__ import annotations

import re
import shlex
import typing
from pathlib import Path
from typing import Any, Callable, Protocol

from ..errors import UserError

SECTIONS = ("model", "lora", "data", "train")
# The fields shown before "advanced": what a first run sets.
BASIC = ("model.name_or_path", "model.quantization", "lora.enabled", "lora.r", "data.path", "data.template",
         "data.cutoff_len", "data.val_size", "train.num_epochs", "train.max_steps", "train.learning_rate",
         "train.batch_size")
# Paths the form takes relative to ROOT (one per line for the list fields) and saves absolute.
PATH_FIELDS = ("data.path", "data.eval_path", "data.exclude", "data.cache_dir", "train.output_dir",
               "train.distributed_config")
LIST_PATH_FIELDS = ("data.path", "data.eval_path", "data.exclude")
# A real checkpoint per tiny arch, for the model picker (families.py holds no hub ids).
REAL_MODELS = {
    "qwen2": "Qwen/Qwen2.5-0.5B-Instruct", "llama": "meta-llama/Llama-2-7b-chat-hf", "bloom": "bigscience/bloomz-560m",
    "qwen3": "Qwen/Qwen3-0.6B", "qwen3_moe": "Qwen/Qwen3-30B-A3B", "llama3": "meta-llama/Llama-3.2-1B-Instruct",
    "gemma3": "google/gemma-3-1b-it", "mistral": "mistralai/Mistral-7B-Instruct-v0.3",
    "phi3": "microsoft/Phi-3-mini-4k-instruct", "glm4": "THUDM/GLM-4-9B-0414",
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class ProjectLike(Protocol):
    """What the form needs of studio.project.Project."""

    root: Path

    def confine(self, rel: str) -> Path: ...

    def local_models(self) -> list[str]: ...


# ------------------------------------------------------------------ the fields
def _kind(ann: Any) -> tuple[str, list]:
    """(form type, choices) of a field annotation. A union of a kind and words (`int | "auto"`) is that kind with
    the words as choices, which the page offers besides a typed value."""
    if ann is bool:
        return "bool", []
    if ann is int:
        return "int", []
    if ann is float:
        return "float", []
    if ann is str:
        return "str", []
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Literal:
        return "choice", list(args)
    if origin is list:
        return "list", []
    if origin is dict:
        return "mapping", []
    if args:  # a union: its parts without None
        kinds = [_kind(a) for a in args if a is not type(None)]
        names = {k for k, _ in kinds}
        words = [c for k, cs in kinds if k == "choice" for c in cs]
        if names == {"choice"}:
            return "choice", words
        if names <= {"bool", "choice"}:
            return "choice", [*words, True, False]
        rest = [k for k in ("list", "float", "int", "str") if k in names]
        if "int" in names and "float" in names:
            rest = ["float"]
        return (rest[0] if rest else "str"), words
    return "str", []


def form_fields() -> list[dict]:
    """One dict per field of the sections model, lora, data, train, in the schema's order: {"name":
    "section.field", "type": "int"|"float"|"bool"|"str"|"choice"|"list"|"mapping", "default": the default (JSON
    data), "choices": the allowed values of a choice, or the words a number/list field also takes (e.g. "auto"),
    "help": the description `domaintune config --explain` prints, "basic": shown before "advanced", "path":
    typed relative to ROOT}. A list is typed one item per line (or as YAML, `[a, b]`); a mapping as YAML."""
    from ..config import Config

    out = []
    for section in SECTIONS:
        model = Config.model_fields[section].annotation
        assert isinstance(model, type)
        for name, f in model.model_fields.items():
            dotted = f"{section}.{name}"
            kind, choices = _kind(f.annotation)
            if dotted in LIST_PATH_FIELDS:
                kind, choices = "list", []
            out.append({"name": dotted, "type": kind, "default": f.get_default(call_default_factory=True),
                        "choices": choices, "help": f.description or "", "basic": dotted in BASIC,
                        "path": dotted in PATH_FIELDS})
    return out


# ------------------------------------------------------------------ values -> raw config
def _under_root(project: ProjectLike, text: str) -> str:
    """A path typed in the form, as an absolute path inside ROOT (`project.confine` refuses the rest)."""
    p = Path(text)
    if p.is_absolute():  # a path the studio wrote (a saved config opened again): inside ROOT, or refused
        try:
            text = p.relative_to(project.root.resolve()).as_posix()
        except ValueError:
            pass
    return str(project.confine(text))


def _items(text: str) -> list[str]:
    """A list typed one item per line (commas also separate), or as a YAML list."""
    from ..config import parse_override

    if text.lstrip().startswith("["):
        value = parse_override(f"x={text}")[1]
        if isinstance(value, list):
            return [str(v) for v in value]
    return [s.strip() for line in text.splitlines() for s in line.split(",") if s.strip()]


def _hub_id(project: ProjectLike, name: str) -> bool:
    """`name` reads as a hub id (org/name) rather than a path: training/model.py's rule, with ROOT as the folder
    that relative paths start from."""
    return not (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") != 1
                or (project.root / name).parent.is_dir() or (project.root / name).exists())


def _value(field: dict | None, dotted: str, text: str, project: ProjectLike) -> Any:
    from ..config import parse_override

    kind, choices = (field["type"], field["choices"]) if field else ("yaml", [])
    if dotted == "model.name_or_path":
        return text if _hub_id(project, text) else _under_root(project, text)
    if dotted == "data.template" and (text.endswith(".json") or "/" in text or "\\" in text):
        return _under_root(project, text)  # a template file (the built-in names are plain words)
    if dotted in LIST_PATH_FIELDS:
        paths = [_under_root(project, t) for t in _items(text)]
        return paths[0] if len(paths) == 1 else paths
    if field and field["path"]:
        return _under_root(project, text)
    if kind == "str" or (kind == "choice" and text in choices):
        return text  # text as typed: `yes` or `null` in a text field is that text
    if kind == "list" and text not in choices:
        return _items(text)
    return parse_override(f"{dotted}={text}")[1]  # a number, true/false, YAML: as the command line reads it


def _named_field(message: str, default: str, names: list[str]) -> str:
    """The form field a message is about: the first field name it mentions, else `default`."""
    hits = [(message.find(n), -len(n), n) for n in names if re.search(rf"(?<![\w.]){re.escape(n)}(?![\w])", message)]
    return min(hits)[2] if hits else default


def config_from_form(values: dict[str, str], project: ProjectLike) -> tuple[dict | None, dict[str, str]]:
    """The raw config of the form's `values` ("section.field" -> text; an empty text means the default; "name":
    the run's name, giving train.output_dir ROOT/runs/NAME when that is empty): `(raw, {})` when it would train,
    else `(None, {"section.field": message})` with the CLI's message for each problem ("" for one about the whole
    config). A key outside the form's fields goes to the config as typed, so it is refused with the CLI's
    "unknown key ... Did you mean" message."""
    from ..config import check_config

    fields = {f["name"]: f for f in form_fields()}
    raw: dict[str, dict] = {}
    errors: dict[str, str] = {}
    for dotted, text in values.items():
        if dotted == "name" or text is None or not str(text).strip():
            continue
        text = str(text).strip()
        *sections, key = dotted.split(".")
        node = raw
        try:
            for part in sections:  # nested like a dotted override (`train.trainer_args.adam_beta2`)
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise UserError(f"'{part}' is not a section")
            node[key] = _value(fields.get(dotted), dotted, text, project)
        except UserError as e:
            errors[dotted] = str(e)
    if "output_dir" not in raw.get("train", {}) and "train.output_dir" not in errors:
        run = values.get("name") or "run"
        try:
            raw.setdefault("train", {})["output_dir"] = _under_root(project, f"runs/{run}")
        except UserError as e:
            errors["train.output_dir"] = str(e)
    if errors:
        return None, errors
    cfg, problems = check_config(raw)
    if cfg is None:
        for dotted, text in problems:
            errors.setdefault(dotted or _named_field(text, "", list(fields)), text)
        return None, errors
    _preflight(cfg, errors, list(fields))
    if errors:
        return None, errors
    # The values as validated (`1e-4`, which YAML reads as text, is saved as the number 0.0001).
    dumped = cfg.model_dump(mode="json")
    return {s: {k: dumped[s][k] for k in keys} for s, keys in raw.items()}, {}


def _preflight(cfg: Any, errors: dict[str, str], names: list[str]) -> None:
    """Each check `domaintune train` runs before the model loads (TrainingRun.setup_output), in its order, with its
    UserError put in `errors` at the field it names (else the field checked); none writes anything. A hub id is
    not looked up (that needs the network): training checks it."""
    from ..rundir import MODEL_CONFIG, TOKENIZER_FILES
    from ..training.arguments import check_lora_rank, check_trackers, engine_arguments
    from ..training.model import check_model_source
    from ..training.outputs import prepare_output_dir
    from ..training.trainer import TrainingRun

    def check(dotted: str, fn: Callable[[], object]) -> bool:
        try:
            fn()
        except UserError as e:
            errors.setdefault(_named_field(str(e), dotted, names), str(e))
            return False
        return True

    runs: list[TrainingRun] = []
    if cfg.train.stage != "sft":  # the preference run resolves its start (an SFT run) when made
        from ..training.preference import PreferenceRun

        check("model.name_or_path", lambda: runs.append(PreferenceRun(cfg)))
    else:
        runs.append(TrainingRun(cfg))
    name = cfg.model.name_or_path
    check("model.name_or_path", cfg.model.required_name)
    check("train.report_to", lambda: check_trackers(cfg.train.report_to))
    check("train.output_dir", lambda: prepare_output_dir(Path(cfg.train.output_dir), False, False, True, name or ""))
    if runs:
        check("data.path", runs[0].check_data)
    if name is not None and Path(name).is_absolute():  # a local folder (hub ids stay as typed)
        if check("model.name_or_path", lambda: check_model_source(name, (MODEL_CONFIG, *TOKENIZER_FILES))) \
                and cfg.lora.enabled:
            check("lora.r", lambda: check_lora_rank(cfg.lora, name, cfg.model.revision))
    if cfg.train.trainer_args and runs:
        check("train.trainer_args", runs[0].check_trainer_args)
    check("train.optim", lambda: engine_arguments(cfg.train))


# ------------------------------------------------------------------ saving, models
def save_config(raw: dict, project: ProjectLike, name: str) -> Path:
    """Write `raw` (from `config_from_form`) to ROOT/configs/NAME.yaml, after a first line giving the command that
    runs it; returns the path. NAME: letters, digits, ".", "_", "-"."""
    import yaml

    from ..config import build_config
    from ..jsonl import write_atomic

    if not _NAME.fullmatch(name or "") or name.endswith(".yaml"):
        raise UserError(f"config name '{name}': use letters, digits, '.', '_' and '-' (no folder, no .yaml), "
                        "e.g. my-first-run")
    build_config(raw, f"config {name}")  # never a file the CLI would refuse
    folder = project.root / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    text = (f"# domaintune train {shlex.quote(str(path))}\n"
            + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    write_atomic(path, text)
    return path


def model_choices(project: ProjectLike) -> list[dict]:
    """The model picker: first each family of `domaintune models` ({"kind": "family", "arch", "family", "title",
    "real": a hub id or None, "tiny": the relpath its tiny offline model gets, "tiny_exists": bool, "tiny_argv": the
    `domaintune` arguments that build it}), then the project's model folders ({"kind": "local", "path": relpath,
    "title": relpath, "model_type": from its config.json or None})."""
    import json

    from ..families import TINY

    out: list[dict] = []
    for arch, r in TINY.items():
        rel = f"models/tiny-{arch}"
        out.append({"kind": "family", "arch": arch, "family": r.family, "title": r.title,
                    "real": REAL_MODELS.get(arch), "tiny": rel,
                    "tiny_exists": (project.root / rel / "config.json").is_file(),
                    "tiny_argv": ["make-tiny-model", str(project.root / rel), "--arch", arch]})
    for rel in project.local_models():
        try:
            conf = json.loads((project.root / rel / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            conf = None
        kind = conf.get("model_type") if isinstance(conf, dict) else None
        out.append({"kind": "local", "path": rel, "title": rel, "model_type": kind if isinstance(kind, str) else None})
    return out
