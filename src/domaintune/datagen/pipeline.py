"""The self-instruct pipeline shared by gen-data's two modes (`SelfInstructRun`); see selfinstruct.py for
the flow and grounded.py for the document mode, which subclasses it through the methods marked "hook"."""
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
from pathlib import Path
from typing import TYPE_CHECKING

from ..config.selfinstruct import SelfInstructConfig
from ..errors import UserError
from . import filters as F
from .client import ChatClient, Completion, complete_with_retries
from .inputs import numbered, persona_values, render
from .manifest import build_manifest, now
from .store import OutputStore

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger(__name__)


@dataclass
class AnswerResult:
    question: str
    completion: Completion | None  # None: every reply was malformed
    rejection: F.Rejection | None = None  # set by the worker when a later check (the judge) refused the answer


class SelfInstructRun:
    """One gen-data run. grounded.GroundedRun overrides the hooks marked "hook"."""

    def __init__(self, cfg: SelfInstructConfig, seeds: list[str], templates: tuple[str, str],
                 client: ChatClient | None, preview: int | None = None):
        self.cfg, self.seeds = cfg, seeds
        self.target = min(preview, cfg.num_questions) if preview else cfg.num_questions
        self.preview = bool(preview)
        self.q_template, self.a_template = templates
        self.store = OutputStore(cfg.output_dir)
        self.client = client
        self.rng = random.Random(cfg.seed)
        self.filter = F.QuestionFilter(min_chars=cfg.min_question_chars, max_chars=cfg.max_question_chars,
                                       blocklist=cfg.blocklist, threshold=cfg.rouge_threshold)
        self.kept: list[str] = []
        self.kept_keys: list[str] = []  # dedup_key of each kept question, same order
        self.meta: dict[str, dict] = {}  # dedup_key -> the "source" of a grounded question
        self.n_active = 0  # kept questions whose answer was not dropped
        self.answers: dict[str, str] = {}  # dedup_key(question) -> answer
        self.dropped: set[str] = set()  # dedup keys of questions whose answer was dropped
        self.q_rejected: Counter[str] = Counter()
        self.a_rejected: Counter[str] = Counter()
        self.tally: Counter[str] = Counter()  # this run's transient counters (see manifest.TRANSIENT)
        self._lock = threading.Lock()  # workers bump tally
        self.q_stalled = self.a_stalled = 0
        self.message: str | None = None
        self.prev = self.store.read_manifest()
        self.started = now()
        self.decontam = None
        if cfg.exclude:
            from .decontam import Decontaminator, load_excluded

            self.decontam = Decontaminator(load_excluded(cfg.exclude), ngram=cfg.exclude_ngram,
                                          rouge_threshold=cfg.rouge_threshold)

    # ------------------------------------------------------------------ state
    def _load(self) -> None:
        questions, answers, rejected = self.store.open()
        for s in self.seeds:
            self.filter.add(s)
        for r in questions:
            q = r.get("question")
            if isinstance(q, str) and q not in self.filter and self._owns(r):
                self._keep(q, r.get("source"))
        kept_keys = set(self.kept_keys)
        for r in rejected:
            if not self._owns(r):
                continue
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

    def _owns(self, record: dict) -> bool:
        """hook: whether a working-file record belongs to this kind of run (seed-only runs: no "source")."""
        return not isinstance(record.get("source"), dict)

    def _keep(self, q: str, source: dict | None = None) -> None:
        self.kept.append(q)
        self.kept_keys.append(F.dedup_key(q))
        if source is not None:
            self.meta[self.kept_keys[-1]] = source
        self.filter.add(q)
        self.n_active += 1

    def pending(self) -> list[str]:
        return [q for q, k in zip(self.kept, self.kept_keys, strict=True)
                if k not in self.answers and k not in self.dropped]

    def train_rows(self) -> list[dict]:
        rows = [self._row(q, self.answers[k], self.meta.get(k))
                for q, k in zip(self.kept, self.kept_keys, strict=True) if k in self.answers]
        return rows[: self.cfg.num_questions]

    def _row(self, question: str, answer: str, source: dict | None) -> dict:  # hook
        return {"instruction": question, "input": "", "output": answer}

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
            while len(self.answers) < self.target and self.message is None:
                self._question_phase(pool)
                self._answer_phase(pool)
        except UserError as e:
            self._write_manifest("failed", error=str(e))
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self.store.close()
            self.client.close()
        if self.preview:  # no train.jsonl: a preview must not look like a finished dataset
            self._write_manifest("preview")
            return self.store.dir
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
        return tqdm(total=self.target, initial=min(initial, self.target), desc=desc,
                    unit="q", disable=None, file=sys.stderr)

    # ------------------------------------------------------------------ phase 1: questions
    def _question_job(self) -> tuple[str, dict | None]:
        """hook: the next question prompt and the source its questions will carry (None: not grounded)."""
        return self._question_prompt(), None

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
                need = self.target - self.n_active
                if need > 0 and self.q_stalled < cfg.max_stalled_calls:
                    # Only as many calls as the remaining need could fill: less waste near the end.
                    want = min(cfg.max_concurrency, math.ceil(need / self._questions_per_call()))
                    while len(in_flight) < want:
                        prompt, source = self._question_job()
                        in_flight.add(pool.submit(self._ask_questions, prompt, source))
                if not in_flight:
                    break
                done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                for fut in done:
                    self._take_questions(*fut.result(), bar)
        finally:
            bar.close()
        if self.n_active < self.target and self.q_stalled >= cfg.max_stalled_calls:
            self.message = (
                f"target not reached: the last {self.q_stalled} question calls kept no new question "
                f"({dict(self.q_rejected.most_common(3))} so far); add seed questions, raise "
                f"selfinstruct.rouge_threshold or check the endpoint's replies; see rejected.jsonl")

    def _questions_per_call(self) -> int:  # hook
        return self.cfg.questions_per_call

    def _ask_questions(self, prompt: str, source: dict | None) -> tuple[Completion | None, dict | None]:
        return self._call(prompt, "question_calls"), source

    def _take_questions(self, comp: Completion | None, source: dict | None, bar: tqdm) -> None:
        kept = 0
        cands = [] if comp is None else F.parse_questions(comp.text, truncated=comp.finish_reason == "length")
        if comp is not None and not cands:
            self._bump("unparsable_replies")
        where = {"source": source} if source is not None else {}
        for i, q in enumerate(cands):
            if self.n_active >= self.target:
                self._bump("questions_surplus", len(cands) - i)
                break
            rej = self.filter.check(q) or (self.decontam.check(q) if self.decontam is not None else None)
            if rej is not None:
                self.store.rejected.write({"stage": "question", "reason": rej.reason, "question": q, **rej.detail,
                                           **where})
                self.q_rejected[rej.reason] += 1
                continue
            self.store.questions.write({"question": q, **where})
            self._keep(q, source)
            kept += 1
        self.q_stalled = 0 if kept else self.q_stalled + 1
        bar.update(kept)
        bar.set_postfix(kept=len(self.kept), dropped=sum(self.q_rejected.values()), refresh=False)
        self._write_manifest("running")

    # ------------------------------------------------------------------ phase 2: answers
    def _answer_phase(self, pool: ThreadPoolExecutor) -> None:
        cfg = self.cfg
        todo = self.pending()[: max(0, self.target - len(self.answers))]
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

    def _answer_prompt(self, question: str) -> str:  # hook
        return render(self.a_template, question=question, **persona_values(self.cfg))

    def _ask_answer(self, question: str) -> AnswerResult:
        """Worker: one question's answer, asking again when it is cut by max_tokens (on_length: retry)."""
        cfg = self.cfg
        prompt = self._answer_prompt(question)
        tries = 1 + (cfg.length_retries if cfg.on_length == "retry" else 0)
        comp = None
        for attempt in range(tries):
            comp = self._call(prompt, "answer_calls")
            if comp is None or comp.finish_reason != "length" or attempt == tries - 1:
                break
            self._bump("answer_length_retries")
            time.sleep(cfg.retry_base_delay * 2 ** attempt)
        return AnswerResult(question, comp)

    def _check_answer(self, comp: Completion | None) -> F.Rejection | None:
        return F.check_completion(comp, self.cfg)

    def _take_answer(self, res: AnswerResult, bar: tqdm) -> None:
        cfg, comp = self.cfg, res.completion
        rej = res.rejection or self._check_answer(comp)
        key = F.dedup_key(res.question)
        where = {"source": self.meta[key]} if key in self.meta else {}
        if rej is not None:
            self.store.rejected.write({"stage": "answer", "reason": rej.reason, "question": res.question, **rej.detail,
                                       **where})
            self.a_rejected[rej.reason] += 1
            self.dropped.add(key)
            self.n_active -= 1
            self.a_stalled += 1
        else:
            text = comp.text.strip()
            self.store.answers.write({"question": res.question, "answer": text,
                                      "finish_reason": comp.finish_reason, "model": cfg.model, **where})
            self.answers[key] = text
            self.a_stalled = 0
            bar.update(1)
        bar.set_postfix(kept=len(self.answers), dropped=sum(self.a_rejected.values()), refresh=False)
        self._write_manifest("running")

    # ------------------------------------------------------------------ HTTP (worker threads)
    def _call(self, prompt: str, kind: str) -> Completion | None:
        """One completion; a malformed reply is counted and asked again up to malformed_retries times."""
        return complete_with_retries(self.client, prompt, self.cfg.malformed_retries, self.cfg.retry_base_delay,
                                     self._bump, calls=kind)

    # ------------------------------------------------------------------ manifest
    def _write_manifest(self, status: str, error: str | None = None) -> None:
        with self._lock:
            tally = Counter(self.tally)
        self.store.write_manifest(build_manifest(self, tally, status, error))

    def _manifest_extra(self) -> dict:  # hook
        return {}
