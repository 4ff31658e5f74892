"""gen-data: grow a domain Q&A dataset from seed questions with self-instruct (`run_gen_data`).

Rounds of two phases until train.jsonl can hold `num_questions` pairs:
1. questions: prompts with examples sampled from the seeds and the questions kept so far; replies are
   parsed as numbered lists and filtered (length, blocklist, exact and ROUGE-L near-duplicates);
2. answers: one request per kept question; cut (finish_reason length), short, blocked or malformed answers
   are dropped, which sends the next round back to phase 1 for replacements.

Concurrency: a thread pool of `max_concurrency` workers runs the blocking openai client; workers only
talk HTTP, the main thread alone filters and writes, so the files need no locks and record order is
the order results are taken. Every record is appended with fsync; state is rebuilt from the files, so
killing a run and starting it again resumes it (see store.py for the directory layout).

A run gives up, with train.jsonl short (or not written, when nothing was kept) and manifest.json saying
so (status "incomplete", target_reached false, message: the drop reason that stopped it and what to change,
see advice.py), after `max_stalled_calls` question calls in a row keep nothing or as many answers in a row
are dropped. Ctrl-C leaves status "interrupted" with how to continue; an unexpected error, "failed".
Progress goes to stderr (progress.py: a bar on a terminal, plain lines elsewhere).
"""
from __future__ import annotations

from pathlib import Path

from ..config.selfinstruct import SelfInstructConfig
from ..errors import UserError
from .client import ChatClient
from .inputs import load_seeds, load_template
from .pipeline import SelfInstructRun


def run_gen_data(cfg: SelfInstructConfig, client: ChatClient | None = None, preview: int | None = None) -> Path:
    """Generate (or resume) the dataset described by `cfg`; returns the output directory.

    With `preview` N, the run stops once N pairs are answered (they count towards the target later) and
    writes no train.jsonl: manifest.json says status "preview". With `cfg.documents` set, the questions and
    answers are grounded in the documents' passages (grounded.py).

    Raises UserError for config mistakes and for endpoint errors retrying cannot fix (the run can be
    resumed after fixing them). Not reaching the target is not an exception: manifest.json says
    `"target_reached": false` with the reason, and train.jsonl holds what was made (none when nothing was).
    """
    if not cfg.domain.strip():
        raise UserError("selfinstruct.domain is empty: set the domain name the prompts talk about (e.g. 家庭教育)")
    if cfg.min_question_chars > cfg.max_question_chars:
        raise UserError("selfinstruct.min_question_chars is larger than max_question_chars")
    if cfg.documents:
        from .grounded import GroundedRun

        return GroundedRun.start(cfg, client, preview)
    seeds = load_seeds(cfg.seeds_path)
    templates = load_template(cfg, "question"), load_template(cfg, "answer")
    return SelfInstructRun(cfg, seeds, templates, client, preview).execute()
