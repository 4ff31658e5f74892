"""The run directory: the contract between `train` and every later verb, and how to read one back
(its template, the base model of an adapter).

Every verb after `train` reads the run directory, never the training YAML again. File names live here
and nowhere else.

| file | written by | what |
|---|---|---|
| config.yaml | train | the resolved config, every default filled in |
| template.json | train | the prompt template used in training (see data/templates.py) |
| adapter_config.json, adapter_model.safetensors | train (LoRA) | final adapter |
| model.safetensors / model-*.safetensors, config.json | train (full) | final full model |
| tokenizer files, generation_config.json | train | with the right EOS/pad |
| checkpoint-*/ | train | resumable checkpoints; only complete ones count |
| log.jsonl | train | one JSON object per logged step |
| status.json | train | running / finished / stopped / failed, the process, the step (training/status.py) |
| run_info.json | train | base model, license, data statistics, runtime, throughput |
| README.md | train | the model card: base model (a hub id, never a path of this machine), license, method |
| loss.png | plot / train | loss and learning-rate curves |
| predictions.jsonl (+ .meta.json), metrics.json, metrics_per_sample.jsonl | predict / eval | |
| predictions.base.jsonl, base/ | predict --base-only | the base model's predictions and scores |
| compare.md | eval --compare | two predictions files side by side |
| judge.jsonl, judge.json | judge | every judge call as it finished (resumable), and the summary: win-rate, grades |
| benchmark.json | eval --benchmark | multiple-choice accuracy (lm-eval) of the base model and the run, and the delta |
| report.md | report | |

An exported model directory (`export`) holds config.json, model*.safetensors, the tokenizer,
generation_config.json, template.json and README.md (the model card).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .jsonl import read_jsonl, write_atomic

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .config import Config, ModelConfig
    from .data.templates import Template

CONFIG = "config.yaml"
TEMPLATE = "template.json"
LOG = "log.jsonl"
STATUS = "status.json"  # training/status.py: the run's state, for the studio and scripts
RUN_INFO = "run_info.json"
LOSS_PNG = "loss.png"
PREDICTIONS = "predictions.jsonl"
BASE_PREDICTIONS = "predictions.base.jsonl"
PREDICTIONS_META_SUFFIX = ".meta.json"  # predictions.jsonl.meta.json: test file hash and generation settings
BASE_DIR = "base"  # metrics of --base-only predictions, so they never replace the run's own
METRICS = "metrics.json"
METRICS_PER_SAMPLE = "metrics_per_sample.jsonl"
COMPARE = "compare.md"
JUDGE_RECORDS = "judge.jsonl"  # judge: one record per judged call, appended as it finishes
JUDGE_SUMMARY = "judge.json"  # judge: the summary; a short form goes into metrics.json["judge"]
BENCHMARK = "benchmark.json"  # eval --benchmark: lm-eval scores of base and tuned; a summary goes into metrics.json
REPORT = "report.md"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CONFIG = "config.json"  # a Hugging Face model directory's config
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
MODEL_WEIGHTS_GLOB = "model*.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # weights that need unpickling: refused by default
GENERATION_CONFIG = "generation_config.json"
MODEL_CARD = "README.md"
CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"  # written by the Trainer, last, into each checkpoint
CHECKPOINT_WORLD = "world.json"  # in each checkpoint: the processes and engine that wrote it
TRAINING_ARGS = "training_args.bin"  # the Trainer's pickle of TrainingArguments; never kept in the run directory


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
        if not (self.path / MODEL_CONFIG).is_file():
            return False
        return any(self.path.glob(MODEL_WEIGHTS_GLOB))

    def has_weights(self) -> bool:
        return self.has_adapter() or self.has_full_model()

    def weight_files(self) -> list[Path]:
        """The final weights: the adapter's file, else the full model's safetensors files."""
        if self.has_adapter():
            return [self.path / ADAPTER_WEIGHTS]
        return sorted(self.path.glob(MODEL_WEIGHTS_GLOB))

    def has_pickle_model(self) -> bool:
        """A model folder whose weights are pickles only (pytorch_model.bin and the like): loadable only when
        the user allows pickles."""
        return (self.path / MODEL_CONFIG).is_file() and not self.has_full_model() and \
            any(p.suffix in PICKLE_SUFFIXES for p in self.path.iterdir() if p.is_file())

    def looks_like_run(self) -> bool:
        """Whether this folder holds a domaintune run (started or finished): its config, log, run_info.json
        or a checkpoint folder."""
        return any((self.path / f).exists() for f in (CONFIG, LOG, RUN_INFO)) or \
            any(self.path.glob(f"{CHECKPOINT_PREFIX}*"))

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

    def is_finished(self) -> bool:
        """Whether training completed here: the final weights are saved and run_info.json, which `train` writes
        last, names the steps trained (a kill during the final save leaves it missing)."""
        if not (self.has_weights() and self.run_info_path.is_file()):
            return False
        try:
            info = self.run_info()
        except (OSError, ValueError):
            return False
        return isinstance(info, dict) and isinstance(info.get("train"), dict) and \
            "global_steps" in info["train"]


def paths_overlap(a: str | Path, b: str | Path) -> bool:
    """Whether two paths are the same folder or one lies inside the other (resolved): an output that would
    overwrite, or be overwritten with, a run directory."""
    a, b = Path(a).expanduser().resolve(), Path(b).expanduser().resolve()
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def adapter_base_name(run_dir: str | Path) -> str:
    """The base model an adapter directory was trained on (`base_model_name_or_path` of adapter_config.json)."""
    path = Path(run_dir) / ADAPTER_CONFIG
    try:
        name = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read it ({e}); is the run directory complete?") from None
    if not name:
        raise UserError(f"{path}: no base_model_name_or_path: cannot tell which base model the adapter belongs to")
    return name


def resolve_template(run_dir: str | Path, tokenizer: PreTrainedTokenizerBase | None = None,
                     name: str | None = None) -> Template:
    """The prompt template of a run or model directory: `name` (a built-in, `tokenizer` or a .json path) when
    given, else the directory's template.json (for a `checkpoint-N` folder without one, e.g. killed just
    after the Trainer saved it, the run's template.json beside it), else the tokenizer's chat_template.

    With `tokenizer=None` (a look before any weights are loaded, e.g. to validate a data file) the last
    fallback is not checked: a `tokenizer` template without its Jinja text is returned (its
    instruction/input joining is all such callers use)."""
    from .data.templates import Template, get_template

    run = RunDir(run_dir)
    if name:
        return get_template(name, tokenizer)
    if run.template_path.is_file():
        return Template.load(run.template_path)
    parent = RunDir(run.path.parent)
    if run.path.name.startswith(CHECKPOINT_PREFIX) and parent.template_path.is_file():
        return Template.load(parent.template_path)
    if tokenizer is None:
        return get_template("tokenizer")
    if getattr(tokenizer, "chat_template", None):
        return get_template("tokenizer", tokenizer)
    raise UserError(f"'{run.path}' has no template.json and its tokenizer no chat_template: pass --template "
                    "(domain_zh, alpaca, chatml, tokenizer or a template .json)")


def base_model_config(run_dir: str | Path, cfg: Config | None = None) -> ModelConfig:
    """The `model` config section of an adapter run's base: the run's config.yaml (`cfg`) when there is one,
    else a default section naming adapter_config.json's base model."""
    if cfg is not None:
        return cfg.model
    from .config import ModelConfig

    return ModelConfig(name_or_path=adapter_base_name(run_dir))


# ---------------------------------------------------------------- checkpoints

def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    cps = []
    for d in Path(out).glob(f"{CHECKPOINT_PREFIX}*"):
        tail = d.name[len(CHECKPOINT_PREFIX):]
        if d.is_dir() and tail.isdigit() and _state_written(d):
            cps.append((int(tail), d))
    return [d for _, d in sorted(cps)]


def _state_written(ckpt: Path) -> bool:
    """The Trainer writes trainer_state.json last, but not atomically: a kill mid-write leaves it empty or torn."""
    try:
        return "global_step" in json.loads((ckpt / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def latest_checkpoint(out: Path) -> Path | None:
    cps = list_checkpoints(out)
    return cps[-1] if cps else None


def checkpoint_step(ckpt: Path | None) -> int:
    return int(ckpt.name[len(CHECKPOINT_PREFIX):]) if ckpt else 0


def checkpoint_state(ckpt: Path | None) -> dict:
    """A checkpoint's trainer_state.json ({} for a fresh run, or when it cannot be read)."""
    if ckpt is None:
        return {}
    try:
        state = json.loads((ckpt / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def checkpoint_tokens(ckpt: Path | None) -> int:
    """Input tokens already seen at a checkpoint (0 for a fresh run)."""
    return int(checkpoint_state(ckpt).get("num_input_tokens_seen") or 0)


def checkpoint_progress(ckpt: Path) -> tuple[int, int]:
    """(the step a checkpoint was written at, the steps its run was to train: the Trainer's max_steps, 0 when
    not recorded)."""
    state = checkpoint_state(ckpt)
    return int(state.get("global_step") or checkpoint_step(ckpt)), int(state.get("max_steps") or 0)


def new_file_mode() -> int:
    """The mode this process's umask gives a new file (0644 under umask 022), for files a library writes with a
    mode of its own (safetensors: 0600). The umask is read where Linux tells it without changing it (os.umask can
    only read it by setting it, which other threads would see for a moment)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask
