"""The rows a judge compares: two predictions files (A, e.g. the base model; B, e.g. the fine-tuned one) matched
row by row, with the question each row asked.

Rows are matched by their "id" (the test-file row index that `predict` writes) and must hold the same test row
in both files: the same reference answer ("target") and the same question. A difference is an error naming
the first row that differs, because a comparison of answers to different questions means nothing.

The question shown to the judge is, in this order of preference:
1. the row of the test file given with `--data` (its instruction and input, or its last user turn);
2. the row of the test file that B's `.meta.json` sidecar (written by `predict`) names, when that file still
   exists with the same content;
3. the predictions' own "input", the prompt as the model saw it (with the template's markup, e.g.
   "用户:...\\n\\n助手:"); then the inputs of A and B must be equal too.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..rundir import PREDICTIONS_META_SUFFIX
from .metrics import file_sha256, read_predictions


@dataclass(frozen=True)
class Row:
    id: Any  # the predictions' "id" (an int for files written by `predict`)
    question: str
    reference: str
    a: str  # A's answer
    b: str  # B's answer


def questions_of_test_file(path: Path) -> dict[int, tuple[str, str]]:
    """Row index -> (question, reference answer) of a test file, as `predict` reads it (instruction and input
    joined by a newline; a conversation's earlier turns written out before its last user turn)."""
    from ..data.examples import load_examples
    from ..data.templates import Template

    path = Path(path)
    if not path.is_file():
        raise UserError(f"test file '{path}' not found: give the file the predictions were made from (--data)")
    out = {}
    for ex in load_examples(path, require_answer=False, template=Template(name="judge")):
        prompt, target = ex.prompt_and_target()
        turns = [m for m in prompt if m["role"] != "system"]
        question = turns[-1]["content"] if len(turns) == 1 else \
            "\n\n".join(f"{m['role']}: {m['content']}" for m in turns)
        out[ex.index] = (question, target)
    return out


def sidecar_test_file(predictions: Path) -> Path | None:
    """The test file named in `predictions`' .meta.json sidecar, when it still exists with the same content."""
    meta = predictions.with_name(predictions.name + PREDICTIONS_META_SUFFIX)
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))["data"]
        path = Path(data["path"])
        return path if path.is_file() and file_sha256(path) == data["sha256"] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _cut(text: Any, limit: int = 80) -> str:
    text = str(text)
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _unique_ids(path: Path, rows: list[dict]) -> None:
    seen = set()
    for r in rows:
        key = json.dumps(r["id"])
        if key in seen:
            raise UserError(f"{path}: row id {r['id']} occurs twice; give each row once (as `predict` writes them)")
        seen.add(key)


def match_rows(a: Path, b: Path, data: Path | None = None) -> tuple[list[Row], str]:
    """The matched rows in B's order and where their questions came from (the test file's path or
    "predictions input"). Raises UserError naming the first row that differs."""
    a, b = Path(a), Path(b)
    rows_a, rows_b = read_predictions(a), read_predictions(b)
    if not rows_b:
        raise UserError(f"{b} has no rows: nothing to judge")
    _unique_ids(a, rows_a)
    _unique_ids(b, rows_b)
    test = Path(data) if data is not None else sidecar_test_file(b)
    questions = questions_of_test_file(test) if test is not None else None
    source = str(test) if test is not None else "predictions input"

    def differ(row_id: Any, what: str) -> UserError:
        return UserError(f"{a} (A) and {b} (B) do not hold the same test rows: row id {row_id}: {what}. Judge two "
                         "predictions of the same test file, e.g. `domaintune predict RUN --data test.jsonl "
                         "--base-only` (A) and `domaintune predict RUN --data test.jsonl` (B)")

    by_a = {json.dumps(r["id"]): r for r in rows_a}
    out = []
    for rb in rows_b:
        ra = by_a.pop(json.dumps(rb["id"]), None)
        if ra is None:
            raise differ(rb["id"], "it is in B but not in A")
        if ra["target"] != rb["target"]:
            raise differ(rb["id"], f"the reference answers differ (A {_cut(ra['target'])}, B {_cut(rb['target'])})")
        if questions is None:
            if ra["input"] != rb["input"]:
                raise differ(rb["id"], f"the questions differ (A {_cut(ra['input'])}, B {_cut(rb['input'])}); if "
                             "only the prompt template differs, pass --data with the test file")
            question = str(rb["input"])
        else:
            found = questions.get(rb["id"]) if isinstance(rb["id"], int) else None
            if found is None:
                raise UserError(f"{b}: row id {rb['id']} is not a row of the test file {test}; is it the file the "
                                "predictions were made from?")
            if found[1] != rb["target"]:
                raise UserError(f"{b}: row id {rb['id']}: the reference answer differs from row {rb['id']} of the test "
                                f"file {test} ({_cut(rb['target'])} vs {_cut(found[1])}); is it the file the "
                                "predictions were made from?")
            question = found[0]
        out.append(Row(rb["id"], question, rb["target"], ra["predict"], rb["predict"]))
    if by_a:
        raise differ(next(iter(by_a.values()))["id"], "it is in A but not in B")
    return out, source
