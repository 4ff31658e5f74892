"""A Markdown report of one run directory (`domaintune report`).

Collects what the other verbs left in the run directory: the configuration (config.yaml), data statistics
and training time (run_info.json), the loss curve (loss.png, drawn from log.jsonl when missing or stale),
the scores (metrics.json) and the best and worst examples (metrics_per_sample.jsonl joined with
predictions.jsonl by "id", ranked by rouge-l). Each section whose inputs are missing says which command
makes them, so the report can be written at any stage of a run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .. import console, rundir
from ..errors import UserError
from ..jsonl import read_jsonl, write_atomic
from .report_compare import compare_section

# Config values shown in the summary, as (label, candidate dotted keys in config.yaml, run_info.json key).
# Several candidates so the report reads configs whatever the exact field name of a section.
CONFIG_ROWS = (  # (label, config keys (domaintune's config.yaml), run_info.json fallback)
    ("base model", ("model.name_or_path",), "base_model"),
    ("method", (), None),
    ("LoRA r", ("lora.r",), None),
    ("LoRA alpha", ("lora.alpha",), None),
    ("LoRA dropout", ("lora.dropout",), None),
    ("LoRA target modules", ("lora.target_modules",), None),
    ("learning rate", ("train.learning_rate",), None),
    ("epochs", ("train.num_epochs",), None),
    ("max steps", ("train.max_steps",), None),
    ("global batch size", ("train.batch_size",), None),
    ("batch size per device", ("train.per_device_batch_size",), None),
    ("gradient accumulation", ("train.gradient_accumulation_steps",), None),
    ("cutoff_len", ("data.cutoff_len",), None),
    ("template", ("data.template",), "template"),
)
METRIC_ORDER = ("num_samples", "bleu-4", "corpus_bleu", "rouge-1", "rouge-2", "rouge-l", "exact_match",
                "avg_predict_len", "loss", "perplexity")


def _dotted(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.6g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s ({seconds:.1f} s)"


def _table(rows: list[tuple[str, Any]], head: tuple[str, str] = ("", "")) -> list[str]:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    return lines + [f"| {k} | {_fmt(v)} |" for k, v in rows]


def _config_section(run: rundir.RunDir, info: dict) -> list[str]:
    import yaml

    lines = ["## Configuration", ""]
    if not run.config_path.is_file():
        return lines + [f"no {rundir.CONFIG} in this directory: it is written by `domaintune train`."]
    text = run.config_path.read_text(encoding="utf-8")
    try:
        cfg = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        return lines + [f"{run.config_path} could not be read as YAML: {e}"]
    if isinstance(cfg, dict):  # runs of older versions kept sections of other verbs even at their defaults
        from ..config import Config
        from ..config.sections import OPTIONAL_SECTIONS

        defaults = Config().to_dict()
        shown = {k: v for k, v in cfg.items() if not (k in OPTIONAL_SECTIONS and v == defaults.get(k))}
        if shown != cfg:
            text = yaml.safe_dump(shown, sort_keys=False, allow_unicode=True)
    rows = []
    method = info.get("method") or ("full" if _dotted(cfg, "lora.enabled") is False else "lora")
    for label, keys, info_key in CONFIG_ROWS:
        if label.startswith("LoRA") and method == "full":
            continue
        value = (method if label == "method"
                 else next((v for v in (_dotted(cfg, k) for k in keys) if v is not None), None))
        if value is None and info_key:
            value = info.get(info_key)
        if value is not None:
            rows.append((label, value))
    lines += _table(rows, ("setting", "value"))
    return lines + ["", "<details><summary>full config.yaml</summary>", "", "```yaml", text.rstrip(), "```", "",
                    "</details>"]


def _data_section(info: dict) -> list[str]:
    lines = ["## Data", ""]
    data = info.get("data")
    if not isinstance(data, dict):
        return lines + [f"no data statistics: {rundir.RUN_INFO} is written by `domaintune train` when it finishes."]
    rows = [(k, data[k]) for k in ("path", "train_rows", "eval_rows") if k in data]
    over = data.get("overlength")
    if isinstance(over, dict):
        rows.append(("over cutoff_len", f"{over.get('count')} rows ({over.get('policy')})"))
    lengths = data.get("token_lengths")
    if isinstance(lengths, dict):
        rows.append(("tokens per row (min / mean / median / p95 / max)",
                     " / ".join(_fmt(lengths.get(k)) for k in ("min", "mean", "median", "p95", "max"))))
    if data.get("dropped_no_target"):
        rows.append(("dropped with nothing to train on", data["dropped_no_target"]))
    if data.get("prepared"):
        rows.append(("prepared", data["prepared"]))
    lines += _table(rows, ("item", "value"))
    srcs = data.get("sources")
    if isinstance(srcs, list) and srcs and all(isinstance(x, dict) for x in srcs):
        head = ("source", "amount", "read", "dropped", "sampled", "validation", "training samples", "tokens")
        lines += ["", "Sources:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for x in srcs:
            dropped = ", ".join(f"{v} {k}" for k, v in (x.get("dropped") or {}).items()) or "-"
            cells = (x.get("name"), x.get("amount"), x.get("read"), dropped, x.get("sampled"), x.get("validation"),
                     x.get("train_samples"), x.get("tokens"))
            lines.append("| " + " | ".join("-" if c is None else _fmt(c) for c in cells) + " |")
    for title, key in (("Rows over cutoff_len", "overlength_rows"),
                       ("Rows dropped with nothing to train on", "dropped_no_target_rows"), ("Notes", "notes")):
        items = data.get(key)
        if isinstance(items, list) and items:
            lines += ["", f"{title}:", ""] + [f"- {_fmt(x)}" for x in items]
    return lines


def _training_section(run: rundir.RunDir, info: dict, log: list[dict]) -> list[str]:
    lines = ["## Training", ""]
    train = info.get("train")
    if isinstance(train, dict):
        rows: list[tuple[str, Any] | None] = [("runtime", _duration(train["runtime_s"])) if "runtime_s" in train
                                               else None]
        rows += [(label, train[k]) for label, k in (("global steps", "global_steps"), ("tokens seen", "tokens"),
                                                    ("throughput (tokens/s)", "tokens_per_second"),
                                                    ("final train loss", "final_loss"),
                                                    ("best eval loss", "best_eval_loss")) if train.get(k) is not None]
        return lines + _table([r for r in rows + _preference_rows(train, log) if r], ("item", "value"))
    train_recs = [r for r in log if "loss" in r]
    if not train_recs:
        return lines + ["no training summary yet: `domaintune train` writes it to run_info.json when it finishes."]
    last = train_recs[-1]
    rows = [("runtime so far", _duration(last["time"])) if "time" in last else None,
            ("last logged step", last.get("step")), ("tokens seen", last.get("tokens")),
            ("last train loss", last.get("loss"))]
    if last.get("tokens") and last.get("time"):
        rows.append(("throughput (tokens/s)", last["tokens"] / last["time"]))
    evals = [r["eval_loss"] for r in log if isinstance(r.get("eval_loss"), (int, float))]
    if evals:
        rows.append(("best eval loss", min(evals)))
    lines += ["From log.jsonl (run_info.json has no training summary: the run may not have finished).", ""]
    return lines + _table([r for r in rows if r and r[1] is not None], ("item", "value"))


def _preference_rows(train: dict, log: list[dict]) -> list[tuple[str, Any]]:
    """A preference stage (train.stage dpo/orpo/kto/simpo): where it started, its reference model, and how the reward
    margin and the preference accuracy moved from the first to the last logged step."""
    path = train.get("path")
    if not isinstance(path, dict) or path.get("stage") in (None, "sft"):
        return []
    gamma = f", gamma {path['simpo_gamma']}" if "simpo_gamma" in path else ""  # simpo's target margin
    rows: list[tuple[str, Any]] = [("stage", f"{path['stage']} (beta {path.get('beta')}{gamma})"),
                                   ("started from", path.get("started_from")),
                                   ("reference model", path.get("reference"))]
    for label, key in (("reward margin", "rewards/margins"), ("preference accuracy", "rewards/accuracies")):
        vals = [r[key] for r in log if isinstance(r.get(key), (int, float))]
        if vals:
            rows.append((f"{label}, first -> last step", f"{_fmt(vals[0])} -> {_fmt(vals[-1])}"))
    return rows


def _plot_section(run: rundir.RunDir, out: Path) -> list[str]:
    from .plot import plot_run

    lines = ["## Loss curve", ""]
    png = run.file(rundir.LOSS_PNG)
    log = run.log_path
    stale = png.is_file() and log.is_file() and log.stat().st_mtime > png.stat().st_mtime
    if log.is_file() and (stale or not png.is_file()):
        try:
            plot_run(run.path)
        except UserError as e:
            if not png.is_file():
                return lines + [f"no plot: {e}"]
    if not png.is_file():
        return lines + [f"no {rundir.LOG} yet: nothing to plot (the curve appears once training has logged)."]
    rel = Path(os.path.relpath(png, out.parent)).as_posix()
    return lines + [f"![loss]({rel})"]


def _read_metrics(path: Path) -> tuple[dict | None, str | None]:
    """(metrics, None), (None, what is wrong with the file), or (None, None) when there is no file."""
    if not path.is_file():
        return None, None
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        return None, f"{path} line {e.lineno} is not valid JSON ({e.msg}): rerun `domaintune eval`."
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{path} could not be read ({e.__class__.__name__}): rerun `domaintune eval`."
    return (metrics, None) if isinstance(metrics, dict) else (None, f"{path} is not a JSON object: rerun "
                                                              "`domaintune eval`.")


def _metrics_section(run: rundir.RunDir) -> list[str]:
    lines = ["## Metrics", ""]
    path = run.file(rundir.METRICS)
    metrics, problem = _read_metrics(path)
    if problem:
        return lines + [problem]
    if metrics is None:
        if run.file(rundir.PREDICTIONS).is_file():
            return lines + [f"no metrics yet: run `domaintune eval {run.file(rundir.PREDICTIONS)}`"]
        return lines + [f"no predictions yet: run `domaintune predict {run.path} --data test.jsonl`"]
    base_path = run.path / rundir.BASE_DIR / rundir.METRICS
    base, base_problem = _read_metrics(base_path)
    # Nested results (judge, benchmark) have their own section below.
    keys = [k for k in METRIC_ORDER if k in metrics] + [k for k in metrics if k not in METRIC_ORDER
                                                        and not isinstance(metrics[k], dict)]
    if base is None:
        lines += _table([(k, metrics[k]) for k in keys], ("metric", "value"))
        lines += ["", base_problem or f"No base-model scores to compare with yet: `domaintune predict {run.path} "
                  f"--data TEST --base-only` (with the settings of {rundir.PREDICTIONS}) writes them."]
    else:
        lines += _side_by_side(keys, base, metrics)
    return lines + ["", "BLEU-4 is character-level and ROUGE is jieba-segmented for Chinese (as in LLaMA-Factory); "
                        "scores are x100."]


def _side_by_side(keys: list[str], base: dict, tuned: dict) -> list[str]:
    """The base model's scores (base/metrics.json, from `predict --base-only`) next to the fine-tuned model's."""
    lines = ["Base model (`predictions.base.jsonl`, scores in `base/metrics.json`) and fine-tuned model "
             "(`predictions.jsonl`) on the test file:", "", "| metric | base | fine-tuned | change |",
             "|---|---|---|---|"]
    for k in keys + [k for k in base if k not in keys and not isinstance(base[k], dict)]:
        b, t = base.get(k), tuned.get(k)
        bn, tn = (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None for v in (b, t))
        change = f"{round(tn - bn, 4):+,.6g}" if bn is not None and tn is not None and k != "num_samples" else ""
        lines.append(f"| {k} | {_fmt(b) if b is not None else '-'} | {_fmt(t) if t is not None else '-'} | "
                     f"{change} |")
    if base.get("num_samples") != tuned.get("num_samples"):
        lines += ["", f"Note: the two were scored on different numbers of rows ({base.get('num_samples')} vs "
                      f"{tuned.get('num_samples')}); predict both from the same test file for a fair comparison."]
    return lines


def _examples_section(run: rundir.RunDir, k: int = 3) -> list[str]:
    from .metrics import md_block, read_predictions

    lines = ["## Best and worst examples", ""]
    pred_path, per_path = run.file(rundir.PREDICTIONS), run.file(rundir.METRICS_PER_SAMPLE)
    if not pred_path.is_file():
        return lines + [f"no predictions yet: run `domaintune predict {run.path} --data test.jsonl`"]
    if not per_path.is_file():
        return lines + [f"no per-sample scores yet: run `domaintune eval {pred_path}`"]
    try:
        preds = {r["id"]: r for r in read_predictions(pred_path)}
        scores = read_jsonl(per_path)
    except UserError as e:
        return lines + [f"examples unavailable: {e}"]
    joined = [(s, preds[s["id"]]) for s in scores if s.get("id") in preds and "rouge-l" in s]
    if not joined:
        return lines + [f"no ids of {per_path.name} match {pred_path.name}: rerun `domaintune eval {pred_path}`"]
    joined.sort(key=lambda sp: (-sp[0]["rouge-l"], -sp[0].get("bleu-4", 0.0), str(sp[0]["id"])))
    best = joined[:k]
    worst = list(reversed(joined[k:]))[:k]  # never repeat a best example when there are few rows
    lines.append(f"Ranked by rouge-l over {len(joined)} scored rows.")
    for heading, group in (("Best", best), ("Worst", worst)):
        for rank, (s, p) in enumerate(group, start=1):
            lines += ["", f"### {heading} {rank}: id {s['id']} "
                          f"(rouge-l {s['rouge-l']:g}, bleu-4 {s.get('bleu-4', 0):g})",
                      "", "**Input**", "", md_block(str(p["input"]), 1500), "", "**Target**", "",
                      md_block(p["target"]), "", "**Prediction**", "", md_block(p["predict"])]
    return lines


def refresh_report(folder: str | os.PathLike) -> Path | None:
    """Rewrite RUN/report.md after a verb added results to RUN (predict, eval, judge, eval --benchmark), so the
    report never shows an older state. `folder` is where the results went: a run directory, or its base/
    folder. Only a finished run (run_info.json) or one that has a report already gets one; elsewhere (a model
    folder, a checkpoint, an arbitrary --out folder) nothing is written and None is returned. A problem
    writing the report is a warning on stderr: the results themselves are already written."""
    path = Path(folder)
    if path.name == rundir.BASE_DIR and not _is_run(path):
        path = path.parent
    if not _is_run(path):
        return None
    try:
        out = run_report(path)
    except Exception as e:  # noqa: BLE001 - the report is a view of results already safely written
        console.warn(f"could not update {path / rundir.REPORT} ({e}); run `domaintune report {path}`")
        return None
    console.note(f"updated {out}")
    return out


def _is_run(path: Path) -> bool:
    return (path / rundir.RUN_INFO).is_file() or (path / rundir.REPORT).is_file()


def run_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write report.md for a run directory (or to ``out``) and return its path."""
    run = rundir.RunDir(run_dir)
    if not run.path.is_dir():
        raise UserError(f"run directory '{run.path}' not found: give the output_dir of `domaintune train`")
    out = Path(out) if out is not None else run.file(rundir.REPORT)
    try:
        info = run.run_info()
    except json.JSONDecodeError as e:
        raise UserError(f"{run.run_info_path} line {e.lineno}: not valid JSON ({e.msg})") from None
    try:
        log = run.read_log()
    except UserError:
        log = []  # the plot section names the bad line
    lines = [f"# Run report: {run.path.resolve().name}", "", f"- directory: `{run.path}`"]
    if info.get("base_model"):
        lines.append(f"- base model: `{info['base_model']}`, "
                     f"license: {info.get('license') or 'unknown: check it before commercial use'}")
    if info.get("domaintune_version"):
        lines.append(f"- domaintune {info['domaintune_version']}")
    for section in (_config_section(run, info), _data_section(info), _training_section(run, info, log),
                    _plot_section(run, out), _metrics_section(run), compare_section(run), _examples_section(run)):
        lines += [""] + section
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, "\n".join(lines) + "\n")
    return out
