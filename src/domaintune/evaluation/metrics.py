"""Score generated answers against references: BLEU and ROUGE that handle Chinese and English.

Which number is which, and why:

| key | what | how |
|---|---|---|
| ``bleu-4`` | mean sentence BLEU-4, x100 | nltk ``sentence_bleu`` on **characters** with smoothing ``method3`` |
| ``rouge-1/2/l`` | mean ROUGE F1, x100 | zh: jieba words + ``rouge_chinese``; en: ``rouge_score`` (no stemming) |
| ``corpus_bleu`` | corpus BLEU, x100 | sacrebleu, tokenizer ``zh`` if any target is Chinese, else ``13a`` |
| ``exact_match`` | % of answers equal to the target after stripping whitespace | |
| ``avg_predict_len`` | mean prediction length in characters | |

``bleu-4`` and the zh ``rouge-*`` are computed exactly as LLaMA-Factory's ``ComputeSimilarity`` does
(character-level BLEU with method3 smoothing; jieba-segmented ROUGE F1, rounded to 4 decimals per sample),
so numbers from the two tools can be put side by side. Character-level BLEU needs no tokenizer, which is
what makes it usable for Chinese; note that it rewards sharing characters, and that an answer shorter than
4 characters cannot reach 100 even when it is exact (that is what ``exact_match`` is for).
English ROUGE uses Google's ``rouge_score`` instead: jieba keeps case and punctuation as tokens, which
is not how English ROUGE is normally reported. The language is decided per sample from the target.
``corpus_bleu`` is the standard, comparable-across-papers number (sacrebleu signature rules).

Heavy libraries are imported inside the functions so the CLI's ``--help`` stays instant.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import console, rundir
from ..data.reader import read_records
from ..errors import UserError
from ..jsonl import write_atomic

SCORE_KEYS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "exact_match")
SUMMARY_KEYS = ("num_samples", "bleu-4", "corpus_bleu", "rouge-1", "rouge-2", "rouge-l", "exact_match",
                "avg_predict_len")

# Han ideographs (incl. extension A and compatibility), kana and Hangul: scripts written without spaces,
# which rouge_score's tokenizer (ASCII letters and digits only) would drop entirely.
_CJK_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")
_LATIN_WORD_RE = re.compile(r"[A-Za-z]+")


def detect_lang(text: str) -> str:
    """"zh" when CJK characters dominate ``text``, else "en".

    One CJK character is counted against one Latin word (a Chinese word is one or two characters, so
    this leans towards "zh" for mixed text such as "用 LoRA 微调"; jieba copes with embedded English,
    while the English scorer would throw the Chinese away).
    """
    cjk = len(_CJK_RE.findall(text))
    return "zh" if cjk and cjk >= len(_LATIN_WORD_RE.findall(text)) else "en"


@functools.lru_cache(maxsize=1)
def _en_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)


@functools.lru_cache(maxsize=1)
def _jieba():
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)  # otherwise it prints "Building prefix dict..." on every run
    return jieba


def _rouge_zh(predict: str, target: str) -> tuple[float, float, float]:
    from rouge_chinese import Rouge

    jieba = _jieba()
    hyp = " ".join(jieba.cut(predict)).split()
    ref = " ".join(jieba.cut(target)).split()
    if not hyp or not ref:  # rouge_chinese raises on empty input
        return 0.0, 0.0, 0.0
    s = Rouge().get_scores(" ".join(hyp), " ".join(ref))[0]
    return s["rouge-1"]["f"], s["rouge-2"]["f"], s["rouge-l"]["f"]


def _rouge_en(predict: str, target: str) -> tuple[float, float, float]:
    s = _en_scorer().score(target, predict)  # (target, prediction) order
    return s["rouge1"].fmeasure, s["rouge2"].fmeasure, s["rougeL"].fmeasure


def score_pair(predict: str, target: str) -> dict[str, float]:
    """Per-sample scores, all x100 and rounded to 4 decimals: bleu-4, rouge-1, rouge-2, rouge-l, exact_match.

    An empty prediction scores 0 (no exception); identical non-trivial strings score 100.
    """
    import warnings

    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns about zero n-gram overlaps; a 0 score says it already
        bleu = sentence_bleu([list(target)], list(predict), smoothing_function=SmoothingFunction().method3)
    r1, r2, rl = (_rouge_zh if detect_lang(target) == "zh" else _rouge_en)(predict, target)
    return {
        "bleu-4": round(float(bleu) * 100, 4),
        "rouge-1": round(r1 * 100, 4),
        "rouge-2": round(r2 * 100, 4),
        "rouge-l": round(rl * 100, 4),
        "exact_match": 100.0 if predict.strip() == target.strip() else 0.0,
    }


def compute_metrics(predicts: list[str], targets: list[str]) -> tuple[dict, list[dict]]:
    """(summary, per-sample scores) for parallel lists of predictions and references.

    summary has the keys of ``SUMMARY_KEYS``; per-sample entries are ``score_pair`` dicts in input order.
    """
    import sacrebleu

    if len(predicts) != len(targets):
        raise ValueError(f"{len(predicts)} predictions but {len(targets)} targets")
    if not predicts:
        raise UserError("nothing to score: there are no predictions")
    per_sample = [score_pair(p, t) for p, t in zip(predicts, targets, strict=True)]
    n = len(per_sample)
    tokenize = "zh" if any(detect_lang(t) == "zh" for t in targets) else "13a"
    summary: dict[str, Any] = {"num_samples": n}
    for key in ("bleu-4", "rouge-1", "rouge-2", "rouge-l"):
        summary[key] = round(sum(s[key] for s in per_sample) / n, 4)
    summary["corpus_bleu"] = round(sacrebleu.corpus_bleu(predicts, [targets], tokenize=tokenize).score, 4)
    summary["exact_match"] = round(sum(s["exact_match"] for s in per_sample) / n, 4)
    summary["avg_predict_len"] = round(sum(len(p) for p in predicts) / n, 4)
    return {k: summary[k] for k in SUMMARY_KEYS}, per_sample


def read_predictions(path: Path) -> list[dict]:
    """Rows of a predictions file as dicts with "id", "input", "target", "predict".

    Accepts our predictions.jsonl, a JSON array of objects, and LLaMA-Factory's generated_predictions.jsonl
    ("prompt"/"label" are read as "input"/"target"). A missing "id" becomes the row index.
    """
    path = Path(path)
    if not path.is_file():
        base = " --base-only" if path.name == rundir.BASE_PREDICTIONS else ""
        raise UserError(f"predictions file '{path}' not found: run `domaintune predict RUN --data test.jsonl{base}` "
                        "first")
    items = read_records(path)  # JSON lines or a JSON array; BOM, CRLF, bad UTF-8 and bad JSON named by line
    where = "line"
    rows = []
    for index, (pos, obj) in enumerate(items):
        if not isinstance(obj, dict):
            raise UserError(f"{path} {where} {pos}: expected a JSON object with \"predict\" and \"target\"")
        row = {"id": obj.get("id", index), "input": obj.get("input", obj.get("prompt", "")),
               "target": obj.get("target", obj.get("label")), "predict": obj.get("predict")}
        for field in ("predict", "target"):
            if not isinstance(row[field], str):
                got = "missing" if row[field] is None else f"a {type(row[field]).__name__}, not a string"
                raise UserError(f"{path} {where} {pos}: field \"{field}\" is {got}")
        rows.append(row)
    return rows


def run_eval(predictions: Path, out_dir: Path | None = None, extra: dict | None = None) -> dict:
    """Score a predictions file; write metrics.json and metrics_per_sample.jsonl; return the metrics.

    out_dir defaults to the predictions file's folder (the run directory; its base/ folder for
    predictions.base.jsonl, see eval_dir). ``extra`` (e.g. "loss" and
    "perplexity" computed by the caller from the model) is merged into metrics.json. metrics.json is
    shared with other verbs: keys this call does not compute (e.g. the loss and perplexity that `predict`
    wrote, when `eval` rescores the file) are kept, and the kept keys are named on the terminal.
    """
    predictions = Path(predictions)
    rows = read_predictions(predictions)
    if not rows:
        raise UserError(f"{predictions} has no rows: nothing to score")
    summary, per_sample = compute_metrics([r["predict"] for r in rows], [r["target"] for r in rows])
    out = Path(out_dir) if out_dir is not None else eval_dir(predictions)
    out.mkdir(parents=True, exist_ok=True)
    metrics, kept = merge_metrics(out / rundir.METRICS, {**summary, **(extra or {})})
    if kept:
        console.note(f"{out / rundir.METRICS}: kept {', '.join(kept)} written there earlier (by predict or eval --run)")
    metrics = _without_stale_judge(metrics, predictions, out / rundir.METRICS)
    if predictions.parent != out:  # base/ scores: the judge entry that read predictions.base.jsonl is the run's
        run_metrics, _ = merge_metrics(predictions.parent / rundir.METRICS, {})
        if (fresh := _without_stale_judge(run_metrics, predictions, predictions.parent / rundir.METRICS)) \
                is not run_metrics:
            rundir.RunDir(predictions.parent).write_json(rundir.METRICS, fresh)
    rundir.RunDir(out).write_json(rundir.METRICS, metrics)
    lines = [json.dumps({"id": r["id"], **s}, ensure_ascii=False) for r, s in zip(rows, per_sample, strict=True)]
    write_atomic(out / rundir.METRICS_PER_SAMPLE, "\n".join(lines) + "\n")
    return metrics


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (judge fingerprints its predictions files with it)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _without_stale_judge(metrics: dict, predictions: Path, where: Path) -> dict:
    """`metrics` without its "judge" entry when that entry judged an earlier version of `predictions` (its sha256
    differs): the scores of new predictions must not sit beside a verdict on old ones. Otherwise `metrics` itself."""
    entry = metrics.get("judge")
    if not isinstance(entry, dict):
        return metrics
    for side in ("a", "b"):
        path, sha = entry.get(side), entry.get(f"{side}_sha256")
        if isinstance(path, str) and isinstance(sha, str) and Path(path).resolve() == predictions.resolve() \
                and file_sha256(predictions) != sha:
            console.note(f"{where}: removed the judge results: they judged an earlier {predictions.name}; run "
                         "`domaintune judge` again for these predictions")
            return {k: v for k, v in metrics.items() if k != "judge"}
    return metrics


def eval_dir(predictions: Path) -> Path:
    """Where the scores of a predictions file go by default: its folder, but base/ beside a base model's
    predictions.base.jsonl, as `predict --base-only` does, so they never replace the fine-tuned model's."""
    predictions = Path(predictions)
    if predictions.name == rundir.BASE_PREDICTIONS:
        return predictions.parent / rundir.BASE_DIR
    return predictions.parent


def merge_metrics(path: Path, new: dict) -> tuple[dict, list[str]]:
    """`new` plus every key of the metrics file at `path` that `new` lacks; returns (merged, kept keys).
    A metrics file that is not a JSON object is replaced (and said so): it holds nothing to keep."""
    if not path.is_file():
        return dict(new), []
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        console.warn(f"{path} could not be read ({e.__class__.__name__}); it is replaced")
        return dict(new), []
    if not isinstance(old, dict):
        console.warn(f"{path} is not a JSON object; it is replaced")
        return dict(new), []
    kept = [k for k in old if k not in new]
    return {**new, **{k: old[k] for k in kept}}, kept


def md_block(text: str, limit: int | None = None) -> str:
    """``text`` as a Markdown code block that survives backticks inside it; cut after ``limit`` characters."""
    if limit is not None and len(text) > limit:
        text = text[:limit] + f"… ({len(text) - limit} more characters)"
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}text\n{text}\n{ticks}"


def run_compare(a: Path, b: Path, out: Path | None = None, examples: int = 3) -> Path:
    """Write a Markdown comparison of two predictions files (e.g. base model A vs fine-tuned B).

    The table shows each metric for A and B and the delta B - A. The examples are the rows (matched by
    "id") where the two disagree most in rouge-l, so the file shows what changed. Default out:
    compare.md next to b.
    """
    a, b = Path(a), Path(b)
    rows_a, rows_b = read_predictions(a), read_predictions(b)
    if not rows_a or not rows_b:
        raise UserError(f"{a if not rows_a else b} has no rows: nothing to compare")
    sum_a, per_a = compute_metrics([r["predict"] for r in rows_a], [r["target"] for r in rows_a])
    sum_b, per_b = compute_metrics([r["predict"] for r in rows_b], [r["target"] for r in rows_b])
    lines = ["# Predictions compared", "", f"- A: `{a}`", f"- B: `{b}`", "",
             "| metric | A | B | delta (B - A) |", "|---|---:|---:|---:|"]
    for key in SUMMARY_KEYS:
        va, vb = sum_a[key], sum_b[key]
        lines.append(f"| {key} | {va:g} | {vb:g} | {vb - va:+.4g} |")
    by_id_a = {r["id"]: (r, s) for r, s in zip(rows_a, per_a, strict=True)}
    common = [(r, s, *by_id_a[r["id"]]) for r, s in zip(rows_b, per_b, strict=True) if r["id"] in by_id_a]
    lines += ["", "## Examples", ""]
    if not common:
        lines.append("No row ids occur in both files, so there are no examples to show side by side.")
    else:
        common.sort(key=lambda c: -abs(c[1]["rouge-l"] - c[3]["rouge-l"]))
        lines.append(f"The {min(examples, len(common))} rows where A and B differ most in rouge-l.")
        for rb, sb, ra, sa in common[:examples]:
            lines += ["", f"### id {rb['id']} (rouge-l A {sa['rouge-l']:g}, B {sb['rouge-l']:g})", "",
                      "**Input**", "", md_block(str(rb["input"]), 1500), "", "**Target**", "", md_block(rb["target"]),
                      "", "**A**", "", md_block(ra["predict"]), "", "**B**", "", md_block(rb["predict"])]
    out = Path(out) if out is not None else b.parent / rundir.COMPARE
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, "\n".join(lines) + "\n")
    return out


def format_metrics(metrics: dict) -> str:
    """A small two-column text table for the terminal and for pipes: one `name value` line per metric, the name
    without spaces (nested keys, such as judge's or benchmark's summaries kept in metrics.json, dotted), the value
    the rest of the line (numbers as `%g`, anything else as compact JSON)."""
    flat = dict(_flat_items(metrics))
    width = max(len(k) for k in flat)
    return "\n".join(f"{k:<{width}}  {v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool)
                     else f"{k:<{width}}  {json.dumps(v, ensure_ascii=False)}" for k, v in flat.items())


def _flat_items(d: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        name = f"{prefix}{str(k).replace(' ', '_')}"
        if isinstance(v, dict) and v:
            yield from _flat_items(v, name + ".")
        else:
            yield name, v
