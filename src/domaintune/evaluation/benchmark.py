"""Multiple-choice benchmarks scored by lm-eval (lm-evaluation-harness): the lm-eval side of the forgetting check
(`eval --benchmark`). `inference/benchmark.py: run_benchmark` loads the run and calls, in this order:
`check_settings` -> `plan_tasks` (tasks resolved before a model is loaded) -> `score_model` for the base model
and for the tuned one, inside `lm_eval_session` -> `save_results` (RUN/benchmark.json, a summary in
RUN/metrics.json).

lm-eval gets a loaded model object (`HFLM(pretrained=model)`), never a path, so it loads nothing itself.

Tasks are named three ways:
- a task shipped with domaintune (`shipped_tasks()`: zh_general_mc, en_general_mc; the package's
  `benchmarks/` folder, examples/benchmarks in the source tree);
- a path to a task YAML, or to a folder of them (every task in it);
- any task of lm-eval's own registry (ceval-valid_*, cmmlu_*, ...): these download their data from the
  Hugging Face hub, so they need network access or a warm datasets cache.

Local tasks (shipped or paths) run offline (HF_HUB_OFFLINE and HF_DATASETS_OFFLINE are set for the call), and
their `dataset_kwargs.data_files` / `data_dir` are read relative to the task YAML (lm-eval itself reads them
relative to the current folder), so a task folder works from anywhere.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from numbers import Real
from pathlib import Path
from typing import Any

from .. import rundir
from ..errors import UserError

BENCH_EXTRA = "pip install 'domaintune[bench]'"
SHIPPED = "benchmarks"  # package folder with the shipped task folders (a link to examples/benchmarks)
_OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
_TABLE_METRICS = ("acc", "acc_norm")


def shipped_dir() -> Path:
    """The folder of the task folders shipped with domaintune."""
    from importlib import resources

    path = Path(str(resources.files("domaintune").joinpath(SHIPPED)))
    if not path.is_dir():
        raise UserError(f"this domaintune installation lacks its bundled {SHIPPED}/ ({path}); reinstall domaintune")
    return path


def shipped_tasks() -> dict[str, Path]:
    """Task name -> YAML file of each task shipped with domaintune (read without lm-eval)."""
    import yaml

    found = {}
    for path in sorted(shipped_dir().glob("*/*.yaml")):
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(cfg, dict) and isinstance(cfg.get("task"), str):
            found[cfg["task"]] = path
    return found


def _import_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise UserError(f"--benchmark needs lm-eval (lm-evaluation-harness): {BENCH_EXTRA}") from None
    return lm_eval


@contextlib.contextmanager
def lm_eval_session(offline: bool) -> Iterator[None]:
    """For the lm-eval calls: the hub switched off (local tasks only), and lm-eval's info/warning logging (e.g.
    that a model object makes its loading options moot) kept off the terminal. Restored afterwards."""
    saved = {k: os.environ.get(k) for k in _OFFLINE}
    logger = logging.getLogger("lm_eval")
    level = logger.level
    if offline:
        os.environ.update(_OFFLINE)
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---------------------------------------------------------------- tasks

def _next_to_yaml(value: Any, folder: Path) -> Any:
    """A data_files value (a string, a list, or a dict of split -> either) with every relative path that exists
    beside the YAML made absolute; anything else (URLs, hub paths, absolute paths) is left alone."""
    if isinstance(value, dict):
        return {k: _next_to_yaml(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [_next_to_yaml(v, folder) for v in value]
    if isinstance(value, str) and value and "://" not in value and not Path(value).is_absolute():
        beside = folder / value
        if beside.exists() or any(folder.glob(value)):
            return str(beside.resolve())
    return value


def _local_task_config(yaml_path: Path) -> dict:
    """The full config of a local task YAML (includes merged, `!function`s imported) with its data files read
    relative to the YAML.

    Workaround (lm-eval 0.4.13): lm-eval hands `dataset_kwargs` to `datasets.load_dataset` as written, which
    reads relative data files from the current folder; there is no YAML-relative form. The private
    `load_yaml` is the loader lm-eval itself uses for task YAMLs; the config goes back to lm-eval as an
    inline task (TaskManager.load accepts a dict)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        cfg = load_yaml(yaml_path, resolve_func=True)
    except Exception as e:  # a user's file: YAML syntax, a missing include, a `!function` that does not import
        raise UserError(f"task YAML {yaml_path}: {e.__class__.__name__}: {e}") from None
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    for key in ("data_files", "data_dir"):
        if key in kwargs:
            kwargs[key] = _next_to_yaml(kwargs[key], yaml_path.parent)
    if kwargs:
        cfg["dataset_kwargs"] = kwargs
    return cfg


def _unknown(name: str, known: list[str]) -> UserError:
    shipped = ", ".join(shipped_tasks())
    close = difflib.get_close_matches(name, [*shipped_tasks(), *known], n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return UserError(f"unknown benchmark task '{name}'.{hint} Shipped with domaintune: {shipped}. lm-eval's own "
                     "tasks work by name (e.g. ceval-valid_high_school_physics, cmmlu_high_school_physics; "
                     "`lm_eval --tasks list` lists them). For a task of your own, give the path of its YAML or "
                     "of a folder of them (dataset_path: json, dataset_kwargs.data_files relative to the YAML; "
                     f"see {shipped_dir() / 'zh_general_mc' / 'zh_general_mc.yaml'}).")


def _registry_lacks(names: list[str]) -> tuple[str, list[str]] | None:
    """(a name no lm-eval task YAML mentions, names to suggest instead), or None when each name might exist.

    Indexing lm-eval's registry parses about 14,000 YAML files (about 15 s); a registered name always appears
    literally in one of them (as its task:, group: or tag:), so a plain text scan (about 1 s) turns a typo
    away fast. The suggestions are the task:/group: values of those files."""
    import re

    import lm_eval

    texts = [p.read_text(encoding="utf-8", errors="replace")
             for p in (Path(lm_eval.__file__).parent / "tasks").rglob("*.yaml")]
    for name in names:
        if not any(name in text for text in texts):
            declared = re.compile(r"^['\"]?(?:task|group)['\"]?:\s*['\"]?([\w.\-]+)", re.M)
            known = {m for text in texts for m in declared.findall(text)}
            return name, sorted(known)
    return None


def resolve_tasks(tasks: list[str], include_path: list[Path] | None = None) -> tuple[list, Any, bool]:
    """(task specs for lm-eval, the TaskManager that knows them, whether every task is local).

    Each of `tasks` is a shipped task, a task in one of the `include_path` folders, a path to a task YAML or a
    folder of them, or a task of lm-eval's registry. Local single tasks become inline configs (their data
    files relative to the YAML); groups and registry tasks stay names. Unknown names raise UserError here,
    before any model is loaded. lm-eval's registry (about 15 s to index) is read only when a task needs it."""
    from lm_eval.tasks import TaskManager

    folders = [shipped_dir(), *[Path(p) for p in include_path or []]]
    for p in include_path or []:
        if not Path(p).is_dir():
            raise UserError(f"benchmark include path '{p}' is not a folder of task YAMLs")
    for task in tasks:
        path = Path(task)
        if path.is_dir():
            folders.append(path)
        elif path.is_file():
            if path.suffix not in (".yaml", ".yml"):
                raise UserError(f"benchmark task '{task}' is a file but not a task YAML (.yaml)")
            folders.append(path.parent)
    local = TaskManager(include_path=[str(f) for f in folders], include_defaults=False).task_index

    specs: list = []
    registry: list[str] = []
    for task in tasks:
        path = Path(task)
        if path.is_dir():
            root = path.resolve()
            entries = [e for e in local.values() if e.yaml_path is not None and e.kind.name in ("TASK", "PY_TASK")
                       and Path(e.yaml_path).resolve().is_relative_to(root)]
            if not entries:
                raise UserError(f"benchmark folder '{task}' holds no task YAML (a file with a `task:` key)")
        elif path.is_file():
            entries = [e for e in local.values()
                       if e.yaml_path is not None and Path(e.yaml_path).resolve() == path.resolve()]
            if not entries:
                raise UserError(f"'{task}' is not a task YAML lm-eval can read (it needs a `task:` or `group:` key)")
        elif task in local:
            entries = [local[task]]
        else:
            registry.append(task)
            specs.append(task)
            continue
        for entry in entries:
            single = entry.yaml_path is not None and entry.kind.name in ("TASK", "PY_TASK")
            specs.append(_local_task_config(Path(entry.yaml_path)) if single else entry.name)
    missing = _registry_lacks(registry) if registry else None
    if missing:
        raise _unknown(*missing)
    tm = TaskManager(include_path=[str(f) for f in folders], include_defaults=bool(registry))
    for name in registry:
        if name not in tm.all_tasks:
            raise _unknown(name, tm.all_tasks)
    return specs, tm, not registry


# ---------------------------------------------------------------- scoring

def _scores(results: dict) -> dict[str, dict]:
    """lm-eval's results per task as {metric: value}: "acc,none" -> "acc", "acc_stderr,none" -> "acc_stderr"
    (another filter than "none" stays in the name: "acc(strict)")."""
    out: dict[str, dict] = {}
    for task, metrics in results["results"].items():
        scores = {}
        for key, value in metrics.items():
            metric, sep, filt = key.partition(",")
            if not sep:  # "alias", "name" and the like
                continue
            name = metric if filt == "none" else f"{metric}({filt})"
            scores[name] = float(value) if isinstance(value, Real) else value  # "N/A" stderr for one item
        out[task] = scores
    return out


def _counts(results: dict) -> dict[str, int]:
    """Items scored per task (after --limit); a group counts the items of its tasks."""
    n = {task: int(c["effective"]) for task, c in results.get("n-samples", {}).items()}
    groups = results.get("group_subtasks", {})

    def count(name: str) -> int:
        if name in n:
            return n[name]
        return sum(count(child) for child in groups.get(name, []))

    return {task: count(task) for task in results["results"]}


@dataclass(frozen=True)
class Plan:
    """The tasks of one benchmark call, resolved before any model is loaded."""

    specs: list  # for lm-eval: inline configs of local tasks, names of groups and registry tasks
    task_manager: Any  # lm_eval.tasks.TaskManager that knows every name in specs
    offline: bool  # every task is local: the hub is switched off for the call
    lm_eval_version: str


def check_settings(tasks: list[str], limit: int | None, batch_size: int) -> None:
    """Refuse bad options before anything is loaded."""
    if not tasks:
        raise UserError("--benchmark needs at least one task, e.g. --benchmark zh_general_mc")
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: give a positive number of items per task, or leave it out for all items")
    if batch_size < 1:
        raise UserError(f"--benchmark-batch-size {batch_size}: give a positive batch size")


def plan_tasks(tasks: list[str], include_path: list[Path] | None = None) -> Plan:
    """Import lm-eval (UserError naming the extra when it is missing) and resolve `tasks` (see resolve_tasks)."""
    lm_eval = _import_lm_eval()
    specs, tm, offline = resolve_tasks(list(tasks), include_path)
    with lm_eval_session(offline):
        try:  # build the tasks once (their data read) so a broken task fails before a model is loaded
            tm.load(specs)
        except Exception as e:
            where = "" if offline else (" lm-eval's own tasks download their data from the Hugging Face hub: run "
                                        "with network access, or with the datasets already in the cache.")
            raise UserError(f"benchmark tasks {', '.join(tasks)}: lm-eval could not load them "
                            f"({e.__class__.__name__}: {e}).{where}") from None
    return Plan(specs, tm, offline, lm_eval.__version__)


def score_model(model: Any, tokenizer: Any, plan: Plan, limit: int | None, batch_size: int) -> dict:
    """lm-eval's results for a loaded model object (a PreTrainedModel, or a PeftModel around one) on the planned
    tasks. Call it inside `lm_eval_session(plan.offline)`."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    return simple_evaluate(model=lm, tasks=plan.specs, task_manager=plan.task_manager, limit=limit, log_samples=False)


def _compare(base: dict, tuned: dict) -> dict:
    """benchmark.json's "tasks": base and tuned scores per task, the delta of each metric, the item count."""
    base_scores, tuned_scores, counts = _scores(base), _scores(tuned), _counts(tuned)
    tasks = {}
    for task, t in tuned_scores.items():
        b = base_scores.get(task, {})
        delta = {k: v - b[k] for k, v in t.items()
                 if "_stderr" not in k and isinstance(v, float) and isinstance(b.get(k), float)}
        tasks[task] = {"base": b, "tuned": t, "delta": delta, "n": counts.get(task, 0)}
    return tasks


def save_results(run_dir: Path, base: dict, tuned: dict, plan: Plan, limit: int | None) -> dict:
    """Write RUN/benchmark.json from lm-eval's results for the base and the tuned model, and merge a summary (no
    stderr) under "benchmark" into RUN/metrics.json, keeping every key other verbs wrote there; return
    benchmark.json's content."""
    from .metrics import merge_metrics

    scored = _compare(base, tuned)
    result = {"tasks": scored, "limit": limit, "n": {t: s["n"] for t, s in scored.items()},
              "lm_eval_version": plan.lm_eval_version,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run": str(run_dir)}
    run = rundir.RunDir(run_dir)
    run.write_json(rundir.BENCHMARK, result)
    headline = {t: {"base": _headline(s["base"]), "tuned": _headline(s["tuned"]), "delta": s["delta"], "n": s["n"]}
                for t, s in scored.items()}
    metrics, _ = merge_metrics(run.file(rundir.METRICS),
                               {"benchmark": {"tasks": headline, "limit": limit, "file": rundir.BENCHMARK}})
    run.write_json(rundir.METRICS, metrics)
    return result


def _headline(scores: dict) -> dict:
    return {k: v for k, v in scores.items() if "_stderr" not in k}


def format_benchmark(result: dict) -> str:
    """A small text table: task, items, metric, base, tuned, delta."""
    rows = [("task", "n", "metric", "base", "tuned", "delta")]
    for task, s in result["tasks"].items():
        for metric in [m for m in _TABLE_METRICS if m in s["delta"]] or list(s["delta"]):
            rows.append((task, str(s["n"]), metric, f"{s['base'][metric]:.4f}", f"{s['tuned'][metric]:.4f}",
                         f"{s['delta'][metric]:+.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    left = (0, 2)  # task and metric; the numbers are right-aligned
    return "\n".join("  ".join(c.ljust(w) if i in left else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip() for r in rows)
