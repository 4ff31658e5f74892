"""The gen-data output directory: append-only working files, derived training files, manifest.

| file | kind | what |
|---|---|---|
| questions.jsonl | append-only | every question that passed the filters: {"question"} |
| answers.jsonl | append-only | one accepted answer per question: {"question", "answer", "finish_reason", "model"} |
| rejected.jsonl | append-only | everything dropped: {"stage": "question"/"answer", "reason", "question", ...}, |
| | | and question replies that gave no question: {"stage": "reply", "reason", "reply"?, "source"?} |
| train.jsonl | derived | training file: {"instruction", "input", "output"}, exactly the target count when complete; |
| | | not written when no pair was kept |
| train.messages.jsonl | derived | the same rows as {"messages": [user, assistant]} (with write_messages) |
| manifest.json | rewritten | config, model, counts per reason, timestamps, status, target reached or not |
| identity.jsonl | derived | written by `gen-data --identity` |

The run's state is rebuilt from the three append-only files alone, so a killed run resumes with nothing
lost and nothing twice. Each record is flushed and fsynced; a torn last line (killed mid-write) is cut
off before appending. The derived files are written at the end (temp file + rename) and removed when a
run starts, so a stale train.jsonl never sits next to a run in progress.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError
from ..jsonl import JsonlAppender, read_jsonl, repair_tail, write_atomic, write_jsonl_atomic

QUESTIONS = "questions.jsonl"
ANSWERS = "answers.jsonl"
REJECTED = "rejected.jsonl"
TRAIN = "train.jsonl"
TRAIN_MESSAGES = "train.messages.jsonl"
MANIFEST = "manifest.json"
IDENTITY = "identity.jsonl"
IDENTITY_MESSAGES = "identity.messages.jsonl"
OTHER_SECTIONS = ("preferences",)  # manifest.json sections written by other gen-data modes


def read_working_file(path: Path) -> list[dict]:
    """All records of a JSONL file written by this module (call repair_tail first)."""
    return read_jsonl(path, fix_hint="this file is written by gen-data: delete that line (or the output "
                                     "directory) and run again")


def to_messages(row: dict) -> dict:
    """An instruction/input/output row as an OpenAI messages row."""
    user = row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]}


def _opened(appender: JsonlAppender | None) -> JsonlAppender:
    if appender is None:
        raise RuntimeError("OutputStore.open() makes the appenders: call it before writing a working file")
    return appender


class OutputStore:
    """Paths of one output directory plus the appenders of its working files."""

    def __init__(self, out_dir: str | os.PathLike):
        self.dir = Path(out_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"selfinstruct.output_dir '{self.dir}': cannot create it ({e.strerror})") from None
        self.questions_path = self.dir / QUESTIONS
        self.answers_path = self.dir / ANSWERS
        self.rejected_path = self.dir / REJECTED
        self.manifest_path = self.dir / MANIFEST
        self.train_path = self.dir / TRAIN
        self.train_messages_path = self.dir / TRAIN_MESSAGES
        self._questions: JsonlAppender | None = None  # the appenders, made by open()
        self._answers: JsonlAppender | None = None
        self._rejected: JsonlAppender | None = None

    @property
    def questions(self) -> JsonlAppender:
        return _opened(self._questions)

    @property
    def answers(self) -> JsonlAppender:
        return _opened(self._answers)

    @property
    def rejected(self) -> JsonlAppender:
        return _opened(self._rejected)

    def open(self) -> tuple[list[dict], list[dict], list[dict]]:
        """Repair torn tails, read (questions, answers, rejected) records, open the files for appending."""
        for p in (self.questions_path, self.answers_path, self.rejected_path):
            repair_tail(p)
        state = (read_working_file(self.questions_path), read_working_file(self.answers_path),
                 read_working_file(self.rejected_path))
        self._questions = JsonlAppender(self.questions_path)
        self._answers = JsonlAppender(self.answers_path)
        self._rejected = JsonlAppender(self.rejected_path)
        return state

    def close(self) -> None:
        for f in (self._questions, self._answers, self._rejected):
            if f is not None:
                f.close()

    def has_train(self) -> bool:
        return self.train_path.is_file()

    def remove_derived(self) -> None:
        for p in (self.train_path, self.train_messages_path):
            p.unlink(missing_ok=True)

    def read_manifest(self) -> dict:
        try:
            obj = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}
        return obj if isinstance(obj, dict) else {}

    def write_manifest(self, manifest: dict) -> None:
        """Write manifest.json; a section another mode wrote (`gen-data --preferences`: "preferences") and
        `manifest` lacks is kept, so neither mode drops the other's record."""
        for key in OTHER_SECTIONS:
            if key not in manifest and key in (old := self.read_manifest()):
                manifest = {**manifest, key: old[key]}
        write_atomic(self.manifest_path, json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")

    def write_train(self, rows: list[dict], messages: bool) -> None:
        write_jsonl_atomic(self.train_path, rows)
        if messages:
            write_jsonl_atomic(self.train_messages_path, [to_messages(r) for r in rows])
