"""gen-data from the user's own documents: every question is asked about one passage and answered from it.

The pipeline is self-instruct's (selfinstruct.py: filters, resumable working files, concurrency, manifest) with
four differences, made through its hooks:

1. Documents (`selfinstruct.documents`: files, folders, globs of PDF, DOCX, Markdown, HTML, text) are extracted
   (documents.py) and split by structure into passages of `passage_tokens` with `passage_overlap` (chunking.py).
   A file that yields no text (a scanned PDF, say) is reported in the manifest and on stderr, never skipped
   silently.
2. Question prompts show one passage (the least-asked one first, so every passage gets questions before any
   gets more) and, when `seeds_path` is set, a few seed questions as examples of style. Each kept question
   carries its source: {"file", "page", "heading", "passage"}.
   Passages that gave no question (replies without a question list, every question rejected, not asked yet) are
   counted per file in the manifest with the reason (`passages_without_questions_why`), and named on stderr.
3. Answer prompts show the question's passage. With `judge` on, a second call asks whether the answer is
   supported by the passage; "UNSUPPORTED" answers (and verdicts that say neither) are dropped with the
   judge's reason in rejected.jsonl.
4. train.jsonl rows carry the source as a "source" object (which `data-check` and `train` ignore), and with
   `citations: inline` the answer ends with a line naming it.

Passages are recomputed from the documents on every run; records name their passage by id and keep their
file, page and heading, so a resumed run continues where the last one stopped. Records of a seed-only run in
the same output folder are not mixed in (`_owns`).
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import console
from ..errors import UserError
from . import filters as F
from .advice import JUDGE_UNCLEAR, JUDGE_UNSUPPORTED
from .client import ChatClient, Completion
from .inputs import load_seeds, load_template, numbered, persona_values, render
from .pipeline import AnswerResult, SelfInstructRun

if TYPE_CHECKING:
    from ..config.selfinstruct import SelfInstructConfig
    from .chunking import Passage
    from .documents import Problem

_VERDICT = re.compile(r"\b(UNSUPPORTED|SUPPORTED)\b", re.IGNORECASE)
NOT_ASKED = "not_asked"  # a passage without questions that was not asked yet (the target was met first)
CITE = {"zh": "来源：{where}", "en": "Source: {where}"}
PAGE = {"zh": "第{page}页", "en": "page {page}"}


def source_of(p: Passage) -> dict:
    return {"file": p.source, "page": p.page, "heading": p.heading, "passage": p.id}


def describe(source: dict, language: str) -> str:
    """"manual.pdf, page 3, 第二章" for prompts and inline citations."""
    parts = [Path(str(source.get("file", ""))).name]
    if source.get("page"):
        parts.append(PAGE[language].format(page=source["page"]))
    if source.get("heading"):
        parts.append(str(source["heading"]))
    return ("，" if language == "zh" else ", ").join(parts)


def parse_verdict(text: str) -> tuple[bool | None, str]:
    """(supported?, reason) from a judge reply whose first verdict word is SUPPORTED or UNSUPPORTED; None when
    it has neither."""
    m = _VERDICT.search(text)
    if m is None:
        return None, text.strip()[:300]
    reason = text[m.end():].strip().lstrip(":：-— ").strip()
    return m.group(1).upper() == "SUPPORTED", reason[:300]


class GroundedRun(SelfInstructRun):
    @classmethod
    def start(cls, cfg: SelfInstructConfig, client: ChatClient | None, preview: int | None) -> Path:
        from .chunking import chunk_documents
        from .collect import load_documents

        docs, problems = load_documents(cfg.documents)
        for p in problems:
            console.warn(f"gen-data: {p.source}: {p.detail}")
        passages = chunk_documents(docs, budget=cfg.passage_tokens, overlap=cfg.passage_overlap)
        if not passages:
            raise UserError(f"selfinstruct.documents: no text found in {len(docs) + len(problems)} file(s)"
                            + (f" ({'; '.join(f'{p.source}: {p.reason}' for p in problems[:5])})" if problems else "")
                            + "; scanned PDFs need OCR first (e.g. ocrmypdf)")
        seeds = load_seeds(cfg.seeds_path) if cfg.seeds_path else []
        templates = (load_template(cfg, "doc_question"), load_template(cfg, "doc_answer"))
        run = cls(cfg, seeds, templates, client, preview)
        run.setup(passages, problems, [str(d.path) for d in docs], load_template(cfg, "judge"))
        out = run.execute()
        run.report_silent_passages()
        return out

    def report_silent_passages(self) -> None:
        """A note on stderr per file whose passages were asked and gave no question (the manifest has the counts)."""
        for f, c in self._manifest_extra()["documents"]["files"].items():
            why = {k: v for k, v in c.get("passages_without_questions_why", {}).items() if k != NOT_ASKED}
            if why:
                console.warn(f"gen-data: {f}: {sum(why.values())} of {c.get('passages', 0)} passages gave no question ("
                             + ", ".join(f"{k} {v}" for k, v in why.items()) + "); see rejected.jsonl")

    def setup(self, passages: list[Passage], problems: list[Problem], files: list[str], judge: str) -> None:
        self.passages = {p.id: p for p in passages}
        order = list(self.passages)
        self.rng.shuffle(order)
        self.order = order
        self.asked: Counter[str] = Counter()
        self.problems, self.files, self.j_template = problems, files, judge

    def _owns(self, record: dict) -> bool:
        return isinstance(record.get("source"), dict)

    def _load(self) -> None:
        super()._load()
        for src in self.meta.values():  # passages that already gave questions are asked again last
            self.asked[str(src.get("passage"))] += 1

    # ------------------------------------------------------------------ questions
    def _questions_per_call(self) -> int:
        return self.cfg.questions_per_passage

    def _question_job(self) -> tuple[str, dict | None]:
        cfg = self.cfg
        pid = min(self.order, key=lambda i: self.asked[i])  # min() keeps the first: shuffled order breaks ties
        self.asked[pid] += 1
        p = self.passages[pid]
        examples = self.rng.sample(self.seeds, min(cfg.examples_per_prompt, len(self.seeds)))
        prompt = render(self.q_template, passage=p.text, source=describe(source_of(p), cfg.language),
                        examples=numbered(examples) if examples else "-", num_examples=len(examples),
                        num_questions=cfg.questions_per_passage, **persona_values(cfg))
        return prompt, source_of(p)

    # ------------------------------------------------------------------ answers
    def _passage_text(self, question: str) -> str:
        src = self.meta.get(F.dedup_key(question), {})
        p = self.passages.get(str(src.get("passage")))
        if p is None:  # the documents changed since the question was asked: answer from nothing is no answer
            raise KeyError(src.get("passage"))
        return p.text

    def _answer_prompt(self, question: str) -> str:
        src = self.meta[F.dedup_key(question)]
        return render(self.a_template, question=question, passage=self._passage_text(question),
                      source=describe(src, self.cfg.language), **persona_values(self.cfg))

    def pending(self) -> list[str]:
        todo = []
        for q in super().pending():
            try:
                self._passage_text(q)
            except KeyError:
                continue  # its passage is gone (documents edited): counted in the manifest, not asked
            todo.append(q)
        return todo

    def _ask_answer(self, question: str) -> AnswerResult:
        res = super()._ask_answer(question)
        comp = res.completion
        if not self.cfg.judge or comp is None or self._check_answer(comp) is not None:  # None: already refused
            return res
        prompt = render(self.j_template, question=question, answer=comp.text.strip(),
                        passage=self._passage_text(question))
        verdict = self._call(prompt, "judge_calls")
        res.rejection = self._judge_rejection(verdict)
        return res

    @staticmethod
    def _judge_rejection(verdict: Completion | None) -> F.Rejection | None:
        if verdict is None:
            return F.Rejection(JUDGE_UNCLEAR, {"judge": "no usable reply"})
        supported, reason = parse_verdict(verdict.text)
        if supported is None:
            return F.Rejection(JUDGE_UNCLEAR, {"judge": reason})
        return None if supported else F.Rejection(JUDGE_UNSUPPORTED, {"judge": reason})

    def _row(self, question: str, answer: str, source: dict | None) -> dict:
        row: dict[str, Any] = {"instruction": question, "input": "", "output": answer}
        if source is not None:
            if self.cfg.citations == "inline":
                lang = self.cfg.language
                row["output"] = f"{answer}\n\n{CITE[lang].format(where=describe(source, lang))}"
            row["source"] = source
        return row

    # ------------------------------------------------------------------ manifest
    def _manifest_extra(self) -> dict:
        per_file: dict[str, Counter] = {f: Counter() for f in self.files}
        asked = Counter(str(src.get("passage")) for src in self.meta.values())
        silent: dict[str, Counter] = {}  # file -> why its passages gave no question (the dominant drop, per passage)
        for p in self.passages.values():
            per_file.setdefault(p.source, Counter())["passages"] += 1
            if not asked[p.id]:
                per_file[p.source]["passages_without_questions"] += 1
                drops = self.passage_drops.get(p.id)
                silent.setdefault(p.source, Counter())[drops.most_common(1)[0][0] if drops else NOT_ASKED] += 1
        for key, src in self.meta.items():
            c = per_file.setdefault(str(src.get("file")), Counter())
            c["questions_kept"] += 1
            c["answers_kept" if key in self.answers else "answers_dropped" if key in self.dropped else "pending"] += 1
        stale = sum(1 for q in super().pending() if str(self.meta.get(F.dedup_key(q), {}).get("passage"))
                    not in self.passages)
        files = {f: {**dict(sorted(c.items())), "passages_without_questions": c["passages_without_questions"],
                     **({"passages_without_questions_why": dict(silent[f].most_common())} if f in silent else {})}
                 for f, c in sorted(per_file.items())}
        return {"documents": {
            "files": files,
            "problems": [{"file": p.source, "reason": p.reason, "detail": p.detail} for p in self.problems],
            "passages": len(self.passages),
            "questions_of_removed_passages": stale,
        }}
