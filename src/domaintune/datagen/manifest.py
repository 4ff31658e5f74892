"""manifest.json of a gen-data run: what was asked for, what was made, what was dropped and why, what it cost.

Counts that live only in memory during a run (`TRANSIENT`: calls, retries, tokens) are added to the totals of
the previous manifest, so they cover every run of the output folder; the others are recounted from the
working files. "spent" sums the calls and tokens: the endpoint's reported usage where it gave one, else an
estimate from the text (chunking.approx_tokens), flagged as such.
"""
from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import HttpCounts

TRANSIENT = ("questions_surplus", "unparsable_replies", "answer_length_retries", "malformed_replies",
             "question_calls", "answer_calls", "judge_calls", "prompt_tokens", "completion_tokens")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def build_manifest(run: Any, tally: Counter, status: str, error: str | None = None) -> dict[str, Any]:
    """The manifest of `run` (a pipeline.SelfInstructRun; its counters in `tally`) with `status`: running,
    preview, complete, incomplete, failed (`error` says why) or interrupted (`error` says how to go on). "message"
    is that error, or why the run gave up (a preview too: a short preview must say why)."""
    cfg, prev = run.cfg, run.prev
    prev_counts = prev.get("counts", {}) if isinstance(prev.get("counts"), dict) else {}
    transient = {k: int(prev_counts.get(k, 0) or 0) + tally[k] for k in TRANSIENT}
    http: HttpCounts = (run.client.http_counts() if run.client is not None
                        else {"attempts": 0, "status": {}, "no_response": 0})
    prev_http = got if isinstance(got := prev_counts.get("http"), dict) else {}
    status_counts = Counter({k: int(v) for k, v in (prev_http.get("status") or {}).items()})
    status_counts.update(http["status"])
    rows = min(len(run.answers), cfg.num_questions)
    finished = status in ("complete", "incomplete")
    runs = [r for r in prev.get("runs", []) if isinstance(r, dict)]
    runs.append({"started_at": run.started, "ended_at": now(), "status": status, "model": cfg.model,
                 "base_url": cfg.base_url})
    calls = transient["question_calls"] + transient["answer_calls"] + transient["judge_calls"]
    return {
        "status": status,
        "target": cfg.num_questions,
        "target_reached": finished and rows == cfg.num_questions,
        "train_rows": rows if finished else None,
        "message": error or (run.message if status != "running" else None),
        "model": cfg.model,
        "base_url": cfg.base_url,
        "counts": {
            "questions_kept": len(run.kept),
            "questions_rejected": dict(sorted(run.q_rejected.items())),
            "answers_kept": len(run.answers),
            "answers_rejected": dict(sorted(run.a_rejected.items())),
            **transient,
            "http": {"attempts": int(prev_http.get("attempts", 0) or 0) + http["attempts"],
                     "status": dict(sorted(status_counts.items())),
                     "no_response": int(prev_http.get("no_response", 0) or 0) + http["no_response"]},
        },
        "spent": {"calls": calls, "prompt_tokens": transient["prompt_tokens"],
                  "completion_tokens": transient["completion_tokens"],
                  "note": "tokens as the endpoint reported them, estimated from the text where it did not"},
        **run._manifest_extra(),
        "started_at": prev.get("started_at", run.started),
        "updated_at": now(),
        "finished_at": now() if finished else None,
        "runs": runs,
        "config": cfg.model_dump(mode="json"),
    }
