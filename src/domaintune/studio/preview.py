"""What the studio shows before and after spending time or money: the trained part of a training example, and
gen-data's question/answer pairs and drops.

- `trained_spans(config_raw, example)`: `domaintune data-check`'s example as data (training/data_check.py's
  pieces): the report and the row's decoded text in trained / untrained segments.
- `documents_preview(config_raw, n)`: `domaintune gen-data CFG --preview N` in this process (run_gen_data with
  `preview`), returning `preview_pairs`. The studio may rather run that command as a job and then call
  `preview_pairs` on the output folder: the same files are read either way.
- `preview_pairs(out_dir, n)`: the pairs gen-data answered (answers.jsonl), with their sources, and its manifest's
  counts.
- `rejected(out_dir)`: what gen-data dropped and why (rejected.jsonl), with the hint gen-data gives for the
  reason, and the files that gave no text (manifest.json).
Nothing here writes into a gen-data folder: the working files are read as they are (a torn last line, written
while a job runs, is left out).
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..errors import UserError


def trained_spans(config_raw: dict, example: int = 0) -> dict:
    """The data-check of training for the training row `example` (the last row when past the end): {"report":
    DataReport.to_dict() (counts, token lengths, over-length, sources, notes), "summary": the lines
    `domaintune data-check` prints for it, "segments": [{"text": str,
    "trained": bool}, ...] (the sample's decoded text; "trained" parts are in the loss), "tokens": n, "trained":
    n, "example": the row shown, "rows": training rows, "where": "file line N", "template": its name, "samples":
    how many samples the row gives (several where the chat_template rewrites earlier turns: the last one, which
    trains the row's last assistant turn, is shown), "note": why nothing is shown, or None}. Raises the UserError
    `domaintune data-check` would raise (bad config, data, tokenizer)."""
    from ..config import build_config
    from ..data.encode import masked_segments
    from ..training.data_check import example_samples, prepare_check, trained_count

    cfg = build_config(config_raw, "the form")
    if cfg.train.stage != "sft":
        raise UserError(f"the trained-part preview is for train.stage sft; for {cfg.train.stage}, run "
                        "`domaintune data-check CONFIG`")
    checked = prepare_check(cfg)
    out: dict[str, Any] = {"report": checked.ds.report.to_dict(), "summary": checked.ds.report.summary_lines(),
                           "segments": [], "tokens": 0, "trained": 0,
                           "example": None, "rows": len(checked.ds.train_examples), "where": None,
                           "template": checked.template.name, "samples": 0, "note": None}
    found = example_samples(cfg, checked, example)
    if found is None:
        out["note"] = "every row went to validation: no training row to show"
        return out
    row, samples = found
    out.update(example=min(example, out["rows"] - 1), where=row.where, samples=len(samples))
    kept = [s for s, _ in samples if s is not None]
    if not kept:
        out["note"] = f"nothing to train within data.cutoff_len ({cfg.data.cutoff_len} tokens)"
        return out
    sample = kept[-1]
    out.update(segments=[{"text": t, "trained": trained} for trained, t in masked_segments(checked.tok, sample)],
               tokens=len(sample["input_ids"]), trained=trained_count(sample))
    return out


def documents_preview(config_raw: dict, n: int = 5, client: Any = None) -> dict:
    """`gen-data --preview n` on the config's selfinstruct section (documents and endpoint): makes n pairs (kept:
    a later full run continues from them) and returns `preview_pairs(output_dir, n)`. `client`: a
    datagen.client.ChatClient (default: the one the config describes)."""
    from ..config import build_config
    from ..datagen.selfinstruct import run_gen_data

    if n < 1:
        raise UserError("a preview needs at least 1 pair")
    cfg = build_config(config_raw, "the form").selfinstruct
    return preview_pairs(run_gen_data(cfg, client=client, preview=n), n)


def _manifest(out: Path) -> dict:
    from ..datagen.store import MANIFEST

    try:
        obj = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def preview_pairs(out_dir: str | Path, n: int | None = None) -> dict:
    """The first n (default all) pairs gen-data answered in `out_dir`: {"pairs": [{"question", "answer", "source":
    {"file", "page", "heading", "passage"} or None, "where": "manual.pdf, page 3, heading" or ""}], "status",
    "message" (why a run stopped short, or None), "target", "spent": {"calls", "prompt_tokens",
    "completion_tokens"}, "dropped": {"questions": {reason: n}, "answers": {reason: n}}}."""
    from ..datagen.grounded import describe
    from ..datagen.store import ANSWERS, read_working_file

    out = Path(out_dir)
    manifest = _manifest(out)
    rows = read_working_file(out / ANSWERS)
    pairs = []
    for r in rows[:n] if n is not None else rows:
        src = r.get("source") if isinstance(r.get("source"), dict) else None
        pairs.append({"question": r.get("question"), "answer": r.get("answer"), "source": src,
                      "where": describe(src, "en") if src else ""})
    counts = manifest.get("counts") or {}
    spent = manifest.get("spent") or {}
    return {"pairs": pairs, "status": manifest.get("status"), "message": manifest.get("message"),
            "target": manifest.get("target"),
            "spent": {k: spent.get(k) for k in ("calls", "prompt_tokens", "completion_tokens")},
            "dropped": {"questions": counts.get("questions_rejected") or {},
                        "answers": counts.get("answers_rejected") or {}}}


def rejected(out_dir: str | Path, limit: int | None = None) -> dict:
    """What gen-data dropped in `out_dir`, newest last: {"rows": [{"stage": "question"|"answer"|"reply", "reason",
    "question" (or None), "hint": what to check for this reason (gen-data's advice), "detail": the record's other
    fields (judge's reason, the near-duplicate it matched, source, ...)}] (the last `limit` rows, default all),
    "total": rows in rejected.jsonl, "counts": {reason: n}, "problems": [{"file", "reason", "detail"}] (documents
    that gave no text), "message": why the run stopped short, or None}."""
    from collections import Counter

    from ..datagen.advice import hint
    from ..datagen.store import REJECTED, read_working_file

    out = Path(out_dir)
    if not out.is_dir():
        raise UserError(f"'{out}' is not a gen-data output folder (selfinstruct.output_dir)")
    manifest = _manifest(out)
    settings = SimpleNamespace(**(manifest.get("config") or {}))
    records = read_working_file(out / REJECTED)
    shown = records[-limit:] if limit else records
    rows = [{"stage": r.get("stage"), "reason": r.get("reason"), "question": r.get("question"),
             "hint": hint(str(r.get("reason")), settings),
             "detail": {k: v for k, v in r.items() if k not in ("stage", "reason", "question")}} for r in shown]
    docs = manifest.get("documents") or {}
    return {"rows": rows, "total": len(records), "counts": dict(Counter(str(r.get("reason")) for r in records)),
            "problems": docs.get("problems") or [], "message": manifest.get("message")}
