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

A run gives up, with train.jsonl short and manifest.json saying so (status "incomplete",
target_reached false, message), after `max_stalled_calls` question calls in a row keep nothing or as
many answers in a row are dropped.
"""
from __future__ import annotations

import logging
import math
import random
import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from ..config.selfinstruct import SelfInstructConfig
from ..errors import UserError
from . import filters as F
from .client import ChatClient, Completion, MalformedResponse
from .inputs import load_seeds, load_template, numbered, persona_values, render
from .store import OutputStore

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger(__name__)
# Counters that live only in memory during a run; manifest.json carries their totals across resumes.
_TRANSIENT = ("questions_surplus", "unparsable_replies", "answer_length_retries", "malformed_replies",
              "question_calls", "answer_calls")


def run_gen_data(cfg: SelfInstructConfig, client: ChatClient | None = None) -> Path:
    """Generate (or resume) the dataset described by `cfg`; returns the output directory.

    Raises UserError for config mistakes and for endpoint errors retrying cannot fix (the run can be
    resumed after fixing them). Not reaching the target is not an exception: manifest.json says
    `"target_reached": false` with the reason, and train.jsonl holds what was made.
    """
    if not cfg.domain.strip():
        raise UserError("selfinstruct.domain is empty: set the domain name the prompts talk about (e.g. 家庭教育)")
    if cfg.min_question_chars > cfg.max_question_chars:
        raise UserError("selfinstruct.min_question_chars is larger than max_question_chars")
    seeds = load_seeds(cfg.seeds_path)
    templates = load_template(cfg, "question"), load_template(cfg, "answer")
    return _Run(cfg, seeds, templates, client).execute()


@dataclass
class _AnswerResult:
    question: str
    completion: Completion | None  # None: every reply was malformed


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Run:
    def __init__(self, cfg: SelfInstructConfig, seeds: list[str], templates: tuple[str, str],
                 client: ChatClient | None):
        self.cfg, self.seeds = cfg, seeds
        self.q_template, self.a_template = templates
        self.store = OutputStore(cfg.output_dir)
        self.client = client
        self.rng = random.Random(cfg.seed)
        self.filter = F.QuestionFilter(min_chars=cfg.min_question_chars, max_chars=cfg.max_question_chars,
                                       blocklist=cfg.blocklist, threshold=cfg.rouge_threshold)
        self.kept: list[str] = []
        self.kept_keys: list[str] = []  # dedup_key of each kept question, same order
        self.n_active = 0  # kept questions whose answer was not dropped
        self.answers: dict[str, str] = {}  # dedup_key(question) -> answer
        self.dropped: set[str] = set()  # dedup keys of questions whose answer was dropped
        self.q_rejected: Counter[str] = Counter()
        self.a_rejected: Counter[str] = Counter()
        self.tally: Counter[str] = Counter()  # this run's transient counters (see _TRANSIENT)
        self._lock = threading.Lock()  # workers bump tally
        self.q_stalled = self.a_stalled = 0
        self.message: str | None = None
        self.prev = self.store.read_manifest()
        self.started = _now()

    # ------------------------------------------------------------------ state
    def _load(self) -> None:
        questions, answers, rejected = self.store.open()
        for s in self.seeds:
            self.filter.add(s)
        for r in questions:
            q = r.get("question")
            if isinstance(q, str) and q not in self.filter:
                self._keep(q)
        kept_keys = set(self.kept_keys)
        for r in rejected:
            reason = str(r.get("reason"))
            if r.get("stage") == "answer":
                self.a_rejected[reason] += 1
                self.dropped.add(F.dedup_key(str(r.get("question", ""))))
            else:
                self.q_rejected[reason] += 1
        self.n_active = sum(1 for k in self.kept_keys if k not in self.dropped)
        for r in answers:
            k = F.dedup_key(str(r.get("question", "")))
            if k in kept_keys and k not in self.answers and k not in self.dropped and isinstance(r.get("answer"), str):
                self.answers[k] = r["answer"]

    def _keep(self, q: str) -> None:
        self.kept.append(q)
        self.kept_keys.append(F.dedup_key(q))
        self.filter.add(q)
        self.n_active += 1

    def pending(self) -> list[str]:
        return [q for q, k in zip(self.kept, self.kept_keys, strict=True)
                if k not in self.answers and k not in self.dropped]

    def train_rows(self) -> list[dict]:
        rows = [{"instruction": q, "input": "", "output": self.answers[k]}
                for q, k in zip(self.kept, self.kept_keys, strict=True) if k in self.answers]
        return rows[: self.cfg.num_questions]

    def _bump(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.tally[key] += n

    # ------------------------------------------------------------------ run
    def execute(self) -> Path:
        cfg = self.cfg
        self._load()
        self.store.remove_derived()
        if self.client is None:
            self.client = ChatClient(cfg)
        self._write_manifest("running")
        pool = ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix="gen-data")
        try:
            while len(self.answers) < cfg.num_questions and self.message is None:
                self._question_phase(pool)
                self._answer_phase(pool)
        except UserError as e:
            self._write_manifest("failed", error=str(e))
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self.store.close()
            self.client.close()
        rows = self.train_rows()
        self.store.write_train(rows, cfg.write_messages)
        reached = len(rows) == cfg.num_questions
        self._write_manifest("complete" if reached else "incomplete")
        if not reached:
            log.warning("gen-data: %s", self.message)
        return self.store.dir

    def _progress(self, desc: str, initial: int) -> tqdm:
        from tqdm import tqdm

        # disable=None: a bar on a terminal, silence in logs and under pytest.
        return tqdm(total=self.cfg.num_questions, initial=min(initial, self.cfg.num_questions), desc=desc,
                    unit="q", disable=None, file=sys.stderr)

    # ------------------------------------------------------------------ phase 1: questions
    def _question_prompt(self) -> str:
        cfg = self.cfg
        n_gen = min(cfg.generated_examples_per_prompt, cfg.examples_per_prompt, len(self.kept))
        n_seed = min(cfg.examples_per_prompt - n_gen, len(self.seeds))
        n_gen = min(cfg.examples_per_prompt - n_seed, len(self.kept))  # fill up when seeds run short
        examples = self.rng.sample(self.seeds, n_seed) + self.rng.sample(self.kept, n_gen)
        self.rng.shuffle(examples)
        return render(self.q_template, examples=numbered(examples), num_examples=len(examples),
                      num_questions=cfg.questions_per_call, **persona_values(cfg))

    def _question_phase(self, pool: ThreadPoolExecutor) -> None:
        cfg = self.cfg
        bar = self._progress("questions", self.n_active)
        in_flight: set = set()
        try:
            while True:
                need = cfg.num_questions - self.n_active
                if need > 0 and self.q_stalled < cfg.max_stalled_calls:
                    # Only as many calls as the remaining need could fill: less waste near the end.
                    want = min(cfg.max_concurrency, math.ceil(need / cfg.questions_per_call))
                    while len(in_flight) < want:
                        in_flight.add(pool.submit(self._call, self._question_prompt(), "question_calls"))
                if not in_flight:
                    break
                done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                for fut in done:
                    self._take_questions(fut.result(), bar)
        finally:
            bar.close()
        if self.n_active < cfg.num_questions and self.q_stalled >= cfg.max_stalled_calls:
            self.message = (
                f"target not reached: the last {self.q_stalled} question calls kept no new question "
                f"({dict(self.q_rejected.most_common(3))} so far); add seed questions, raise "
                f"selfinstruct.rouge_threshold or check the endpoint's replies; see rejected.jsonl")

    def _take_questions(self, comp: Completion | None, bar: tqdm) -> None:
        kept = 0
        cands = [] if comp is None else F.parse_questions(comp.text, truncated=comp.finish_reason == "length")
        if comp is not None and not cands:
            self._bump("unparsable_replies")
        for i, q in enumerate(cands):
            if self.n_active >= self.cfg.num_questions:
                self._bump("questions_surplus", len(cands) - i)
                break
            rej = self.filter.check(q)
            if rej is not None:
                self.store.rejected.write({"stage": "question", "reason": rej.reason, "question": q, **rej.detail})
                self.q_rejected[rej.reason] += 1
                continue
            self.store.questions.write({"question": q})
            self._keep(q)
            kept += 1
        self.q_stalled = 0 if kept else self.q_stalled + 1
        bar.update(kept)
        bar.set_postfix(kept=len(self.kept), dropped=sum(self.q_rejected.values()), refresh=False)
        self._write_manifest("running")

    # ------------------------------------------------------------------ phase 2: answers
    def _answer_phase(self, pool: ThreadPoolExecutor) -> None:
        cfg = self.cfg
        todo = self.pending()[: max(0, cfg.num_questions - len(self.answers))]
        if not todo:
            return
        bar = self._progress("answers", len(self.answers))
        in_flight: set = set()
        try:
            while True:
                while todo and len(in_flight) < cfg.max_concurrency and self.a_stalled < cfg.max_stalled_calls:
                    in_flight.add(pool.submit(self._ask_answer, todo.pop(0)))
                if not in_flight:
                    break
                done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                for fut in done:
                    self._take_answer(fut.result(), bar)
        finally:
            bar.close()
        if self.a_stalled >= cfg.max_stalled_calls:
            self.message = (
                f"target not reached: the last {self.a_stalled} answers were all dropped "
                f"({dict(self.a_rejected.most_common(3))} so far); check selfinstruct.max_tokens, "
                f"min_answer_chars and answer_blocklist; see rejected.jsonl")

    def _ask_answer(self, question: str) -> _AnswerResult:
        """Worker: one question's answer, asking again when it is cut by max_tokens (on_length: retry)."""
        cfg = self.cfg
        prompt = render(self.a_template, question=question, **persona_values(cfg))
        tries = 1 + (cfg.length_retries if cfg.on_length == "retry" else 0)
        comp = None
        for attempt in range(tries):
            comp = self._call(prompt, "answer_calls")
            if comp is None or comp.finish_reason != "length" or attempt == tries - 1:
                break
            self._bump("answer_length_retries")
            time.sleep(cfg.retry_base_delay * 2 ** attempt)
        return _AnswerResult(question, comp)

    def _take_answer(self, res: _AnswerResult, bar: tqdm) -> None:
        cfg, comp = self.cfg, res.completion
        if comp is None:
            rej = F.Rejection(F.ANSWER_MALFORMED)
        else:
            rej = F.check_answer(comp.text, comp.finish_reason, min_chars=cfg.min_answer_chars,
                                 blocklist=cfg.answer_blocklist)
        key = F.dedup_key(res.question)
        if rej is not None:
            self.store.rejected.write({"stage": "answer", "reason": rej.reason, "question": res.question, **rej.detail})
            self.a_rejected[rej.reason] += 1
            self.dropped.add(key)
            self.n_active -= 1
            self.a_stalled += 1
        else:
            text = comp.text.strip()
            self.store.answers.write({"question": res.question, "answer": text,
                                      "finish_reason": comp.finish_reason, "model": cfg.model})
            self.answers[key] = text
            self.a_stalled = 0
            bar.update(1)
        bar.set_postfix(kept=len(self.answers), dropped=sum(self.a_rejected.values()), refresh=False)
        self._write_manifest("running")

    # ------------------------------------------------------------------ HTTP (worker threads)
    def _call(self, prompt: str, kind: str) -> Completion | None:
        """One completion; a malformed reply is counted and asked again up to malformed_retries times."""
        cfg = self.cfg
        for attempt in range(cfg.malformed_retries + 1):
            self._bump(kind)
            try:
                return self.client.complete(prompt)
            except MalformedResponse:
                self._bump("malformed_replies")
            if attempt < cfg.malformed_retries:
                time.sleep(cfg.retry_base_delay * 2 ** attempt)
        return None

    # ------------------------------------------------------------------ manifest
    def _write_manifest(self, status: str, error: str | None = None) -> None:
        cfg, prev = self.cfg, self.prev
        prev_counts = prev.get("counts", {}) if isinstance(prev.get("counts"), dict) else {}
        with self._lock:
            transient = {k: int(prev_counts.get(k, 0) or 0) + self.tally[k] for k in _TRANSIENT}
        http = self.client.http_counts() if self.client is not None else {"attempts": 0, "status": {}, "no_response": 0}
        prev_http = prev_counts.get("http") if isinstance(prev_counts.get("http"), dict) else {}
        status_counts = Counter({k: int(v) for k, v in (prev_http.get("status") or {}).items()})
        status_counts.update(http["status"])
        rows = min(len(self.answers), cfg.num_questions)
        finished = status in ("complete", "incomplete")
        runs = [r for r in prev.get("runs", []) if isinstance(r, dict)]
        runs.append({"started_at": self.started, "ended_at": _now(), "status": status, "model": cfg.model,
                     "base_url": cfg.base_url})
        self.store.write_manifest({
            "status": status,
            "target": cfg.num_questions,
            "target_reached": finished and rows == cfg.num_questions,
            "train_rows": rows if finished else None,
            "message": error or (self.message if finished and rows < cfg.num_questions else None),
            "model": cfg.model,
            "base_url": cfg.base_url,
            "counts": {
                "questions_kept": len(self.kept),
                "questions_rejected": dict(sorted(self.q_rejected.items())),
                "answers_kept": len(self.answers),
                "answers_rejected": dict(sorted(self.a_rejected.items())),
                **transient,
                "http": {"attempts": int(prev_http.get("attempts", 0) or 0) + http["attempts"],
                         "status": dict(sorted(status_counts.items())),
                         "no_response": int(prev_http.get("no_response", 0) or 0) + http["no_response"]},
            },
            "started_at": prev.get("started_at", self.started),
            "updated_at": _now(),
            "finished_at": _now() if finished else None,
            "runs": runs,
            "config": cfg.model_dump(mode="json"),
        })
