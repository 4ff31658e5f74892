"""The self-instruct pipeline shared by gen-data's two modes (`SelfInstructRun`); see selfinstruct.py for
the flow and grounded.py for the document mode, which subclasses it through the methods marked "hook"."""
from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from ..config.selfinstruct import SelfInstructConfig
from ..errors import UserError
from . import filters as F
from .advice import give_up_message
from .client import ChatClient, Completion, complete_with_retries
from .inputs import numbered, persona_values, render
from .manifest import build_manifest, now
from .progress import Progress
from .store import OutputStore


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
        self.q_streak: Counter[str] = Counter()  # drop reasons since a question call last kept a question
        self.a_streak: Counter[str] = Counter()  # drop reasons since an answer was last kept
        self.passage_drops: dict[str, Counter[str]] = {}  # passage id -> drops of its questions and replies
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
                continue
            if r.get("stage") != "reply":  # a reply without questions is no rejected question
                self.q_rejected[reason] += 1
            self._note_drop(r.get("source"), reason)
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

    def _note_drop(self, source: dict | None, reason: str) -> None:
        """Count a question-side drop against its passage (grounded runs: the manifest's per-file counts)."""
        if isinstance(source, dict):
            self.passage_drops.setdefault(str(source.get("passage")), Counter())[reason] += 1

    def _bump(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.tally[key] += n

    # ------------------------------------------------------------------ run
    def execute(self) -> Path:
        cfg = self.cfg
        self._load()
        if self.preview and len(self.answers) >= self.target and self.store.has_train():
            # A preview after a finished run has nothing to make: it shows pairs already made, and the finished
            # run's train.jsonl and manifest stay as they are (removing them lost the dataset until a rerun).
            return self.store.dir
        self.store.remove_derived()
        if self.client is None:
            self.client = ChatClient(cfg)
        self._write_manifest("running")
        pool = ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix="gen-data")
        interrupted = False
        try:
            while len(self.answers) < self.target and self.message is None:
                self._question_phase(pool)
                self._answer_phase(pool)
        except UserError as e:
            self._write_manifest("failed", error=str(e))
            raise
        except KeyboardInterrupt:  # Ctrl-C: the files hold every pair made; say so, and how to go on
            interrupted = True
            self._write_manifest("interrupted", error=self.interrupted_message())
            raise
        except Exception as e:  # a defect of ours: the manifest must not say "running" for ever
            self._write_manifest("failed", error=f"{type(e).__name__}: {e}")
            raise
        finally:
            # After Ctrl-C, do not wait for the calls in flight (each may take request_timeout x retries).
            pool.shutdown(wait=not interrupted, cancel_futures=True)
            self.store.close()
            self.client.close()
        if self.preview:  # no train.jsonl: a preview must not look like a finished dataset
            self._write_manifest("preview")
            return self.store.dir
        rows = self.train_rows()
        if rows:  # an empty train.jsonl would look like a dataset; the manifest says why there is none
            self.store.write_train(rows, cfg.write_messages)
        self._write_manifest("complete" if len(rows) == cfg.num_questions else "incomplete")
        return self.store.dir

    def interrupted_message(self) -> str:
        return (f"interrupted with {min(len(self.answers), self.target)} of {self.target} pairs made (kept in "
                f"{self.store.dir}); run the same command again to continue")

    def _progress(self, desc: str, initial: int) -> Progress:
        return Progress(desc, self.target, initial, unit="q")

    def _progress_note(self, dropped: Counter[str]) -> dict:
        top = ", ".join(f"{k} {v}" for k, v in dropped.most_common(2))
        return {"kept": len(self.answers), "dropped": f"{sum(dropped.values())}" + (f": {top}" if top else "")}

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
        in_flight: set[Future[tuple[Completion | None, dict | None]]] = set()
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
            self.message = give_up_message("question", self.q_stalled, self.q_streak, cfg)

    def _questions_per_call(self) -> int:  # hook
        return self.cfg.questions_per_call

    def _ask_questions(self, prompt: str, source: dict | None) -> tuple[Completion | None, dict | None]:
        return self._call(prompt, "question_calls"), source

    def _take_questions(self, comp: Completion | None, source: dict | None, bar: Progress) -> None:
        kept = 0
        cands = [] if comp is None else F.parse_questions(comp.text, truncated=comp.finish_reason == "length")
        where = {"source": source} if source is not None else {}
        if not cands:  # recorded, so a passage that never gave a question says why (grounded manifest)
            reason = F.MALFORMED_REPLY if comp is None else F.UNPARSABLE_REPLY
            if comp is not None:
                self._bump("unparsable_replies")
            self.store.rejected.write({"stage": "reply", "reason": reason,
                                       **({"reply": comp.text[:300]} if comp is not None else {}), **where})
            self.q_streak[reason] += 1
            self._note_drop(source, reason)
        for i, q in enumerate(cands):
            if self.n_active >= self.target:
                self._bump("questions_surplus", len(cands) - i)
                break
            rej = self.filter.check(q) or (self.decontam.check(q) if self.decontam is not None else None)
            if rej is not None:
                self.store.rejected.write({"stage": "question", "reason": rej.reason, "question": q, **rej.detail,
                                           **where})
                self.q_rejected[rej.reason] += 1
                self.q_streak[rej.reason] += 1
                self._note_drop(source, rej.reason)
                continue
            self.store.questions.write({"question": q, **where})
            self._keep(q, source)
            kept += 1
        self.q_stalled = 0 if kept else self.q_stalled + 1
        if kept:
            self.q_streak.clear()
        bar.update(kept, {"kept": len(self.kept), "dropped": sum(self.q_rejected.values())})
        self._write_manifest("running")

    # ------------------------------------------------------------------ phase 2: answers
    def _answer_phase(self, pool: ThreadPoolExecutor) -> None:
        cfg = self.cfg
        todo = self.pending()[: max(0, self.target - len(self.answers))]
        if not todo:
            return
        bar = self._progress("answers", len(self.answers))
        in_flight: set[Future[AnswerResult]] = set()
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
            self.message = give_up_message("answer", self.a_stalled, self.a_streak, cfg)

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

    def _take_answer(self, res: AnswerResult, bar: Progress) -> None:
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
            self.a_streak[rej.reason] += 1
        else:
            assert comp is not None, "a missing answer is refused (answer_malformed) by _check_answer"
            text = comp.text.strip()
            self.store.answers.write({"question": res.question, "answer": text,
                                      "finish_reason": comp.finish_reason, "model": cfg.model, **where})
            self.answers[key] = text
            self.a_stalled = 0
            self.a_streak.clear()
        bar.update(0 if rej is not None else 1, self._progress_note(self.a_rejected))
        self._write_manifest("running")

    # ------------------------------------------------------------------ HTTP (worker threads)
    def _call(self, prompt: str, kind: str) -> Completion | None:
        """One completion; a malformed reply is counted and asked again up to malformed_retries times."""
        if self.client is None:
            raise RuntimeError("execute() opens the teacher's client before any call")
        return complete_with_retries(self.client, prompt, self.cfg.malformed_retries, self.cfg.retry_base_delay,
                                     self._bump, calls=kind)

    # ------------------------------------------------------------------ manifest
    def _write_manifest(self, status: str, error: str | None = None) -> None:
        with self._lock:
            tally = Counter(self.tally)
        self.store.write_manifest(build_manifest(self, tally, status, error))

    def _manifest_extra(self) -> dict:  # hook
        return {}
