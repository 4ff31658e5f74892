"""`gen-data --preferences`: chosen/rejected pairs for a preference stage (train.stage dpo, orpo, kto or simpo).

Questions come from a file: by default the dataset gen-data made (`OUTPUT_DIR/train.jsonl`), or `--questions
FILE` with rows `{"instruction", "input"?, "output"?}` (gen-data's and SFT's format) or `{"question"}` (a
seeds file). Read like training data: file and line named for a bad row.

- chosen: the row's answer (the teacher's, or the document-grounded one); a row without one is answered by the
  teacher with the answer prompt, as gen-data answers (same persona, same answer checks).
- rejected: with `--run RUN`, that run's own greedy answer, through the Engine `predict` uses (the prompt the
  run was trained on, its data.system; `inference.predict.greedy_answerer`, passed in as `answerer` so this
  package stays free of model code): DPO then moves the SFT model from its own answers towards the
  teacher's. Without a run, the teacher answers with a deliberately weak prompt (prompts/weak_answer_*.txt,
  or `selfinstruct.weak_answer_template`).
- dropped, each with its reason (counted in manifest.json and kept in the records file): `near_identical`
  (the same text, or a ROUGE-L F1 of chosen and rejected reaching `selfinstruct.preference_max_similarity`),
  `rejected_empty`, `rejected_control_chars`,
  the answer checks for a teacher's chosen answer (`answer_truncated`, `answer_too_short`, `answer_blocklist`)
  and `answer_malformed` for replies that stay malformed after retries.

Files in `selfinstruct.output_dir`:

| file | kind | what |
|---|---|---|
| preference_records.jsonl | append-only | one record per question, kept or dropped: index, question, chosen, |
| | | rejected, rejected_by, similarity, kept, reason |
| preferences.jsonl | derived | the kept pairs in input order: {"instruction", "input", "chosen", "rejected"} |
| manifest.json | rewritten | its "preferences" section: source, counts per reason, status |

Resume: a question with a record is done. A killed run started again does the rest (a record is written
with fsync once both answers are in), so no pair is lost or made twice; a questions file that changed under
the records is refused. preferences.jsonl is removed when a run starts and written at the end. Ctrl-C leaves
the manifest's status "interrupted" (an unexpected error, "failed"), with how to continue.
"""
from __future__ import annotations

import json
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Protocol

from ..data.examples import read_valid_rows
from ..errors import UserError
from ..jsonl import JsonlAppender, repair_tail, write_jsonl_atomic
from . import filters as F
from .client import ChatClient, Completion, complete_with_retries
from .inputs import load_template, persona_values, render
from .manifest import now
from .progress import Progress
from .store import MANIFEST, TRAIN, OutputStore, read_working_file

if TYPE_CHECKING:
    from ..config.selfinstruct import SelfInstructConfig

class Answerer(Protocol):
    """Answers to single-turn (instruction, input) questions, in order; `name` identifies the answering model in
    the records (a resumed run must use the same)."""

    name: str

    def __call__(self, questions: list[tuple[str, str]]) -> list[str]: ...


RECORDS = "preference_records.jsonl"
PREFERENCES = "preferences.jsonl"
NEAR_IDENTICAL, REJECTED_EMPTY, REJECTED_CONTROL_CHARS = "near_identical", "rejected_empty", "rejected_control_chars"


class Question(NamedTuple):
    """One row of the questions file (named fields: an index mix-up once sent every question without an answer
    to no teacher at all)."""

    instruction: str
    input: str
    answer: str | None  # None: the teacher answers it (the chosen side)


def read_questions(path: Path) -> list[Question]:
    """One Question per row of `path`; one UserError naming every bad line (broken JSON included)."""
    if not path.is_file():
        raise UserError(f"--questions '{path}' not found: give a file of {{\"instruction\", \"output\"}} or "
                        "{\"question\"} rows, or run gen-data first (its train.jsonl is the default)")
    return read_valid_rows(path, _question, "question row(s)")


def _question(obj: Any, where: str) -> Question:
    q = obj.get("instruction", obj.get("question")) if isinstance(obj, dict) else None
    if not isinstance(q, str) or not q.strip():
        raise UserError(f"{where}: needs a non-empty \"instruction\" or \"question\" string")
    extra = obj.get("input") or ""
    if not isinstance(extra, str):
        raise UserError(f"{where}: \"input\" must be a string")
    answer = obj.get("output")
    if answer is not None and (not isinstance(answer, str) or not answer.strip()):
        raise UserError(f"{where}: \"output\" must be a non-empty string (or left out)")
    return Question(q, extra, answer)


class PreferenceRun:
    """One `gen-data --preferences` run (see the module docstring)."""

    def __init__(self, cfg: SelfInstructConfig, questions: str | Path | None = None,
                 answerer: Answerer | None = None, client: ChatClient | None = None, batch_size: int = 8,
                 make_answerer: Callable[[], Answerer] | None = None) -> None:
        self.cfg = cfg
        self.store = OutputStore(cfg.output_dir)
        self.source = Path(questions) if questions else self.store.dir / TRAIN
        self.items = read_questions(self.source)
        if make_answerer is not None:  # only now: a bad questions file is reported before a model loads
            answerer = make_answerer()
        self.answerer = answerer
        self.rejected_by = f"run:{answerer.name}" if answerer else "teacher:weak_answer"
        self.client, self.own_client = client, client is None
        self.batch_size = batch_size
        self.records_path = self.store.dir / RECORDS
        self.lock = threading.Lock()
        self.spent = Counter({"calls": 0, "prompt_tokens": 0, "completion_tokens": 0})  # this session, the teacher

    # ------------------------------------------------------------------ state
    def _load(self) -> dict[int, dict]:
        repair_tail(self.records_path)
        done = {}
        for r in read_working_file(self.records_path):
            i = r.get("index")
            if not isinstance(i, int) or i >= len(self.items) or (self.items[i].instruction, self.items[i].input) \
                    != (r.get("question"), r.get("input", "")):
                raise UserError(f"{self.records_path} does not match {self.source} (record {i}: "
                                f"{str(r.get('question'))[:40]!r}): the questions file changed. Delete the records "
                                "file to start over (or use another selfinstruct.output_dir)")
            if r.get("rejected_by") != self.rejected_by:
                raise UserError(f"{self.records_path} was made with rejected answers from {r.get('rejected_by')}, "
                                f"this run takes them from {self.rejected_by} (another model, or the run was "
                                "trained again): delete the records file to start over, or use the same model")
            done[i] = r
        return done

    # ------------------------------------------------------------------ the run
    def execute(self) -> Path:
        done: dict[int, dict] = {}
        try:
            return self._execute(done)
        except UserError as e:  # an endpoint that fails for good: say so in the manifest; a rerun resumes
            self._manifest(done, "failed", str(e))
            raise
        except KeyboardInterrupt:  # Ctrl-C: every record written is kept; say how to go on
            self._manifest(done, "interrupted", f"interrupted with {len(done)} of {len(self.items)} questions done "
                           f"(kept in {self.records_path}); run the same command again to continue")
            raise
        except Exception as e:  # a defect of ours: the manifest must not say "running" for ever
            self._manifest(done, "failed", f"{type(e).__name__}: {e}")
            raise
        finally:
            if self.own_client and self.client is not None:
                self.client.close()

    def _execute(self, done: dict[int, dict]) -> Path:
        done.update(self._load())
        (self.store.dir / PREFERENCES).unlink(missing_ok=True)
        todo = [i for i in range(len(self.items)) if i not in done]
        self._manifest(done, "running")
        if todo:
            self._open_endpoints(todo)
            bar = Progress("preference pairs", len(self.items), len(done), unit="pair")
            n_kept = sum(r["kept"] for r in done.values())
            with JsonlAppender(self.records_path) as out, ThreadPoolExecutor(self.cfg.max_concurrency) as pool:
                for k in range(0, len(todo), self.batch_size):
                    chunk = todo[k:k + self.batch_size]
                    chosen = list(pool.map(self._chosen, chunk))
                    rejected = self._rejected(chunk, pool)
                    for i, c, r in zip(chunk, chosen, rejected, strict=True):
                        rec = self._record(i, c, r)
                        out.write(rec)
                        done[i] = rec
                        n_kept += rec["kept"]
                        bar.update(1, {"kept": n_kept})
                    self._manifest(done, "running")
            bar.close()
        kept = [done[i] for i in sorted(done) if done[i]["kept"]]
        write_jsonl_atomic(self.store.dir / PREFERENCES,
                           [{"instruction": r["question"], "input": r.get("input", ""), "chosen": r["chosen"],
                             "rejected": r["rejected"]} for r in kept])
        self._manifest(done, "complete")
        return self.store.dir / PREFERENCES

    def _open_endpoints(self, todo: list[int]) -> None:
        needs_teacher = self.answerer is None or any(self.items[i].answer is None for i in todo)
        if needs_teacher and self.client is None:
            self.client = ChatClient(self.cfg)

    # ------------------------------------------------------------------ answers
    def _ask(self, prompt: str) -> Completion | None:
        if self.client is None:
            raise RuntimeError("_open_endpoints opens the teacher's client before a row needs it")
        return complete_with_retries(self.client, prompt, self.cfg.malformed_retries, self.cfg.retry_base_delay,
                                     self._count)

    def _count(self, key: str, n: int) -> None:
        with self.lock:
            self.spent[key] += n

    def _chosen(self, i: int) -> tuple[str | None, str | None]:
        """(answer, reason it is unusable or None): the row's answer, else the teacher's."""
        answer = self.items[i].answer
        if answer is not None:
            return answer.strip(), None
        comp = self._ask(render(self.answer_template, question=self._question(i), **persona_values(self.cfg)))
        rej = F.check_completion(comp, self.cfg)
        return (comp.text.strip() if comp is not None else None), rej.reason if rej else None

    @cached_property
    def answer_template(self) -> str:
        """The teacher's answer prompt, read once (only when a row has no answer of its own)."""
        return load_template(self.cfg, "answer")

    def _rejected(self, chunk: list[int], pool: ThreadPoolExecutor) -> list[tuple[str | None, str | None]]:
        if self.answerer is not None:
            return [(a.strip(), None) for a in self.answerer([(self.items[i].instruction, self.items[i].input)
                                                              for i in chunk])]
        template = load_template(self.cfg, "weak_answer")

        def weak(i: int) -> tuple[str | None, str | None]:
            comp = self._ask(render(template, question=self._question(i), **persona_values(self.cfg)))
            return (None, F.ANSWER_MALFORMED) if comp is None else (comp.text.strip(), None)

        return list(pool.map(weak, chunk))

    def _question(self, i: int) -> str:
        """The question as the teacher sees it: the instruction, and the input on the next line."""
        q = self.items[i]
        return q.instruction + (f"\n{q.input}" if q.input else "")

    def _record(self, i: int, chosen: tuple[str | None, str | None], rejected: tuple[str | None, str | None]) -> dict:
        rec: dict[str, Any] = {"index": i, "question": self.items[i].instruction, "input": self.items[i].input,
                               "chosen": chosen[0],
                               "rejected": rejected[0], "rejected_by": self.rejected_by}
        reason = chosen[1] or rejected[1]
        if reason is None and not rejected[0]:
            reason = REJECTED_EMPTY
        good, bad = chosen[0], rejected[0]
        if reason is None:  # then both answers are text: a missing one comes with the reason it is unusable
            assert good is not None and bad is not None, "an answer without text has a reason"
            if F.control_chars(bad):  # the pair would teach them; the chosen side is checked
                reason = REJECTED_CONTROL_CHARS
            else:
                same = good == bad  # ROUGE-L sees no tokens in text of only punctuation or symbols
                rec["similarity"] = 1.0 if same else round(F.rouge_l(good, bad), 4)
                if rec["similarity"] >= self.cfg.preference_max_similarity:
                    reason = NEAR_IDENTICAL
        rec["kept"] = reason is None
        if reason:
            rec["reason"] = reason
        return rec

    # ------------------------------------------------------------------ manifest
    def _manifest(self, done: dict[int, dict], status: str, error: str | None = None) -> None:
        dropped = Counter(r["reason"] for r in done.values() if not r["kept"])
        manifest = self.store.read_manifest()
        manifest["preferences"] = {
            "status": status, "updated": now(), "questions_file": str(self.source), "questions": len(self.items),
            "done": len(done), "kept": sum(r["kept"] for r in done.values()), "dropped": dict(dropped),
            "rejected_from": self.rejected_by, "max_similarity": self.cfg.preference_max_similarity,
            "output": str(self.store.dir / PREFERENCES) if status == "complete" else None,
            "spent": dict(self.spent), **({"error": error} if error else {})}
        self.store.write_manifest(manifest)


def run_preferences(cfg: SelfInstructConfig, questions: str | Path | None = None, answerer: Answerer | None = None,
                    client: ChatClient | None = None, batch_size: int = 8,
                    make_answerer: Callable[[], Answerer] | None = None) -> Path:
    """Make (or resume) preference pairs; returns the preferences.jsonl path (see the module docstring).
    `answerer`: the SFT run's own answers for the rejected side (`inference.predict.GreedyAnswerer`); None = the
    teacher's weak answers. `make_answerer` builds it once the questions file has been read (the CLI's --run:
    loading a model takes long, a bad questions file must be reported first)."""
    return PreferenceRun(cfg, questions, answerer, client, batch_size, make_answerer).execute()


def summary(path: Path) -> dict:
    """The manifest's preferences section next to `path`."""
    return json.loads((path.parent / MANIFEST).read_text(encoding="utf-8")).get("preferences", {})
