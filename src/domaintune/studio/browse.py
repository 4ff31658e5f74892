"""The predictions browser's data: one run's predictions, the base model's, the per-sample scores and the judge's
verdicts and reasons, joined by row id, searched and paged on the server (a test set may have thousands of rows).

Files (names from rundir.py): predictions.jsonl and predictions.base.jsonl (`predict`: id, input, target,
predict), metrics_per_sample.jsonl and base/metrics_per_sample.jsonl (`eval`: id and the scores), judge.json
(`judge`: per_row outcomes) and judge.jsonl (`judge`: one record per call, with the judge's reason). A file that
is missing gives empty fields; a torn last line (a verb still writing) is skipped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import rundir
from ..jsonl import read_jsonl

MAX_LIMIT = 200  # rows one page may ask for


def _by_id(path: Path) -> dict[Any, dict]:
    try:
        rows = read_jsonl(path)
    except Exception:  # noqa: BLE001 - a file another verb left broken shows as missing, not as a 500
        return {}
    return {r["id"]: r for r in rows if isinstance(r, dict) and "id" in r}


def _judge(run: rundir.RunDir) -> tuple[dict[Any, dict], dict[Any, list[dict]]]:
    """(row id -> judge.json's per-row outcome, row id -> that row's judge calls with their reasons)."""
    outcomes: dict[Any, dict] = {}
    try:
        summary = run.read_json(rundir.JUDGE_SUMMARY) if run.file(rundir.JUDGE_SUMMARY).is_file() else {}
        outcomes = {r["id"]: r for r in summary.get("per_row") or [] if isinstance(r, dict) and "id" in r}
    except (OSError, ValueError, AttributeError):
        pass
    calls: dict[Any, list[dict]] = {}
    try:
        records = read_jsonl(run.file(rundir.JUDGE_RECORDS))
    except Exception:  # noqa: BLE001
        records = []
    for r in records:
        if isinstance(r, dict) and r.get("kind") in ("pairwise", "grade") and "id" in r:
            keep = ("kind", "order", "verdict", "winner", "answer", "grade", "reason", "unparseable")
            calls.setdefault(r["id"], []).append({k: r.get(k) for k in keep if k in r})
    return outcomes, calls


def predictions_page(run_dir: str | Path, q: str = "", offset: int = 0, limit: int = 20) -> dict:
    """One page of the run's rows: `{"total", "matched", "offset", "limit", "has_base", "has_judge", "rows"}`,
    each row `{"id", "input", "reference", "tuned", "base", "scores", "base_scores", "judge": {"outcome", "why",
    "grade_a", "grade_b", "calls"}}`. `q` keeps the rows whose question, reference or either answer holds it
    (case-insensitive)."""
    run = rundir.RunDir(run_dir)
    tuned = _by_id(run.file(rundir.PREDICTIONS))
    base = _by_id(run.file(rundir.BASE_PREDICTIONS))
    scores = _by_id(run.file(rundir.METRICS_PER_SAMPLE))
    base_scores = _by_id(run.path / rundir.BASE_DIR / rundir.METRICS_PER_SAMPLE)
    outcomes, calls = _judge(run)
    ids = list(tuned) + [i for i in base if i not in tuned]
    if all(isinstance(i, int) for i in ids):  # test-file order (a running predict writes in its batching order)
        ids.sort()
    needle = q.strip().casefold()

    def text(i: Any) -> tuple[str, str, str, str]:
        t, b = tuned.get(i, {}), base.get(i, {})
        return (str(t.get("input", b.get("input", ""))), str(t.get("target", b.get("target", ""))),
                str(t.get("predict", "")) if t else "", str(b.get("predict", "")) if b else "")

    matched = [i for i in ids if not needle or any(needle in s.casefold() for s in text(i))]
    offset, limit = max(0, offset), min(max(1, limit), MAX_LIMIT)
    rows = []
    for i in matched[offset:offset + limit]:
        question, reference, answer, base_answer = text(i)
        outcome = outcomes.get(i, {})
        judged = bool(outcome) or i in calls
        rows.append({
            "id": i, "input": question, "reference": reference,
            "tuned": answer if i in tuned else None, "base": base_answer if i in base else None,
            "scores": {k: v for k, v in scores.get(i, {}).items() if k != "id"} or None,
            "base_scores": {k: v for k, v in base_scores.get(i, {}).items() if k != "id"} or None,
            "judge": {"outcome": outcome.get("pairwise"), "why": outcome.get("why"), "grade_a": outcome.get("grade_a"),
                      "grade_b": outcome.get("grade_b"), "calls": calls.get(i, [])} if judged else None,
        })
    return {"total": len(ids), "matched": len(matched), "offset": offset, "limit": limit, "has_base": bool(base),
            "has_judge": bool(outcomes or calls), "rows": rows}
