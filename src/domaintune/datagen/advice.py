"""Why gen-data gave up, in words: the drops of the stall that stopped it, the dominant reason with its count,
and the setting (or the model) to look at for that reason.

A run gives up after `max_stalled_calls` question calls in a row kept no question, or as many answers in a row
were dropped (pipeline.py). Advice that names the wrong setting costs a user a paid rerun, so the hint follows the
reason that dominated the stall: a judge that never gives a verdict is not fixed by raising max_tokens.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from . import filters as F

JUDGE_UNSUPPORTED = "unsupported"  # the judge's reasons (grounded.py)
JUDGE_UNCLEAR = "judge_unclear"

_TEACHER = "the teacher (selfinstruct.model={model!r} at {base_url})"
_ENDPOINT = "the endpoint's replies were not chat completions: check selfinstruct.base_url and selfinstruct.model"
_CONTROL = (_TEACHER + " writes control characters (e.g. \\u0006): check the model and its chat template on the "
            "server")
HINTS = {
    F.TOO_SHORT: "questions are shorter than selfinstruct.min_question_chars (now {min_question_chars}): lower it",
    F.TOO_LONG: "questions are longer than selfinstruct.max_question_chars (now {max_question_chars}): raise it",
    F.BLOCKLIST: "questions hit selfinstruct.blocklist: shorten the list",
    F.DUPLICATE: _TEACHER + " repeats questions already kept: add seed questions (or documents), or raise "
                 "selfinstruct.temperature (now {temperature})",
    F.NEAR_DUPLICATE: _TEACHER + " writes questions too close to those kept: add seed questions (or documents), "
                      "raise selfinstruct.temperature (now {temperature}) or selfinstruct.rouge_threshold (now "
                      "{rouge_threshold})",
    "contaminated": "the questions overlap the files of selfinstruct.exclude: add seed questions or documents on "
                    "other topics",
    F.CONTROL_CHARS: _CONTROL,
    F.UNPARSABLE_REPLY: _TEACHER + " replied without a numbered list of questions: use a model that follows the "
                        "question prompt, or adjust selfinstruct.question_template (doc_question_template with "
                        "documents)",
    F.MALFORMED_REPLY: _ENDPOINT,
    F.ANSWER_MALFORMED: _ENDPOINT,
    F.ANSWER_TRUNCATED: "answers were cut at selfinstruct.max_tokens (now {max_tokens}): raise it",
    F.ANSWER_TOO_SHORT: "answers are shorter than selfinstruct.min_answer_chars (now {min_answer_chars}): lower it, "
                        "or ask for fuller answers in the answer template",
    F.ANSWER_BLOCKLIST: "answers hit selfinstruct.answer_blocklist: shorten the list",
    F.ANSWER_CONTROL_CHARS: _CONTROL,
    JUDGE_UNSUPPORTED: "the judge (selfinstruct.judge, asked of " + _TEACHER + ") found the answers unsupported by "
                       "their passages: use a stronger teacher, or set selfinstruct.judge=false to keep them unjudged",
    JUDGE_UNCLEAR: "the judge's replies (selfinstruct.judge, asked of " + _TEACHER + ") said neither SUPPORTED nor "
                   "UNSUPPORTED: use a model that follows the judge prompt (selfinstruct.judge_template), or set "
                   "selfinstruct.judge=false",
}


def hint(reason: str, cfg: Any) -> str:
    """What to check for drops of `reason`, with `cfg`'s values filled in."""
    text = HINTS.get(reason)
    if text is None:
        return "see rejected.jsonl for what the drops have in common"
    return text.format(**{k: getattr(cfg, k, None) for k in (
        "model", "base_url", "min_question_chars", "max_question_chars", "temperature", "rouge_threshold",
        "max_tokens", "min_answer_chars")})


def give_up_message(stage: str, stalled: int, drops: Counter[str], cfg: Any) -> str:
    """The manifest's message when a run gives up: `stalled` question calls (`stage` "question") or answers
    ("answer") in a row kept nothing; `drops` counts the reasons of those calls' / answers' drops."""
    what = (f"the last {stalled} question calls kept no new question" if stage == "question"
            else f"the last {stalled} answers were all dropped")
    if not drops:
        return f"target not reached: {what}; see rejected.jsonl"
    (reason, n), = drops.most_common(1)
    counts = ", ".join(f"{k} {v}" for k, v in drops.most_common())
    return (f"target not reached: {what} ({counts}); most were dropped as {reason} ({n} of {sum(drops.values())}): "
            f"{hint(reason, cfg)}; see rejected.jsonl")
