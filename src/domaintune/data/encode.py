"""Tokenising and masking: conversations -> input_ids, attention_mask, labels under the over-length policy.

Every assistant turn is trained; prompts are masked (label -100) unless `train_on_inputs`. EOS follows
each answer so the model learns to stop (the template's `encode`, templates.py). A row is one sample, except with
a chat_template that rewrites earlier turns (Qwen3, Qwen3.5, GLM-4; chat_template.py): such a row gives one
sample per assistant turn, each trained in the context inference sends. The report counts rows and samples and
names the rows that gave several.

Over-length samples (more than `cutoff_len` tokens) follow `overlength`: `truncate` keeps the first
`cutoff_len` tokens, `drop` skips the sample, `error` stops. A sample left with no trainable token is
never trained on: it is dropped and counted. All counts are reported (`DataReport`), and the rows behind them
are named (file and line; the first `MAX_ERRORS_SHOWN` of each kind, then "... and N more").

Validation split (`split_validation`, when there is no data.eval_path): an integer data.val_size takes that many
rows but at most `VAL_MAX_PERCENT` (20%) of the file, a fraction takes round(fraction x rows), data.val_max_rows
bounds both, and at least one row always stays for training. When the split differs from what was asked for,
or is empty although asked for, a note says so (printed with the summary and saved in run_info.json).
"""
from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .examples import MAX_ERRORS_SHOWN, Example
from .formats import with_system
from .mix import SourceCount

if TYPE_CHECKING:
    from collections.abc import Sequence

    from transformers import PreTrainedTokenizerBase

    from ..config import DataConfig
    from .arrow import Samples
    from .templates import Template

IGNORE_INDEX = -100


@dataclass
class DataReport:
    """Counts and length statistics, the rows behind the counts, and notes; printed by data-check and training,
    saved in run_info.json."""

    path: str = ""
    rows: int = 0
    train_rows: int = 0  # samples kept for training (one per row, except rows expanded into several)
    eval_rows: int = 0
    samples: int = 0  # samples encoded (kept or not), train and validation: `rows` unless rows were expanded
    expanded_rows: list[str] = field(default_factory=list)  # "file line N: K samples", one per expanded row
    overlength_policy: str = "truncate"
    overlength: int = 0  # samples longer than cutoff_len (truncated, dropped or rejected per policy)
    truncated: int = 0
    dropped_overlength: int = 0
    dropped_no_target: int = 0  # nothing trainable left after truncation
    lengths: list[int] = field(default_factory=list)  # token lengths before truncation
    overlength_rows: list[str] = field(default_factory=list)  # "file line N: T tokens", one per over-length sample
    no_target_rows: list[str] = field(default_factory=list)  # "file line N", one per sample dropped with no target
    notes: list[str] = field(default_factory=list)  # one line each, e.g. how the validation split was capped
    sources: list[SourceCount] = field(default_factory=list)  # what each source of data.path gave (mix.py)
    streaming: bool = False  # data.streaming: the training rows are not counted in advance
    prepared: str = ""  # where the prepared data came from: "read and tokenised, cached in DIR" or "from the cache"

    def token_lengths(self) -> dict:
        if not self.lengths:
            return {}
        s = sorted(self.lengths)
        return {"min": s[0], "mean": round(statistics.fmean(s), 1), "median": statistics.median(s),
                "p95": s[min(len(s) - 1, int(0.95 * len(s)))], "max": s[-1]}

    def to_dict(self) -> dict:
        """The report for run_info.json. Row lists hold the first MAX_ERRORS_SHOWN rows, then "... and N more"."""
        return {"path": self.path, "rows": self.rows, "train_rows": self.train_rows, "eval_rows": self.eval_rows,
                "overlength": {"policy": self.overlength_policy, "count": self.overlength, "truncated": self.truncated,
                               "dropped": self.dropped_overlength},
                "dropped_no_target": self.dropped_no_target, "token_lengths": self.token_lengths(),
                "overlength_rows": _capped(self.overlength_rows),
                "dropped_no_target_rows": _capped(self.no_target_rows), "samples": self.samples,
                "expanded_rows": _capped(self.expanded_rows), "notes": list(self.notes),
                "sources": [c.to_dict() for c in self.sources], "prepared": self.prepared,
                "streaming": self.streaming}

    def summary_lines(self) -> list[str]:
        tl = self.token_lengths()
        if self.streaming:  # no counts in advance (stream.py): those of the samples read so far, when any
            read = (f"; {self.samples} samples read: {self.train_rows} trained, over cutoff_len {self.overlength} "
                    f"(truncated {self.truncated}, dropped {self.dropped_overlength}), dropped with nothing to train "
                    f"on {self.dropped_no_target}") if self.samples else ""
            return [f"data: {self.path}: streamed" + read + (f"; validation {self.eval_rows} samples" if self.eval_rows
                                                             else "; no validation (set data.eval_path)"), *self.notes]
        lines = [
            f"data: {self.path}: {self.rows} rows -> train {self.train_rows}, validation {self.eval_rows}"
            if not self.expanded_rows else
            f"data: {self.path}: {self.rows} rows, {self.samples} samples ({len(self.expanded_rows)} row(s) give one "
            "sample per assistant turn: the chat_template rewrites earlier turns) -> train "
            f"{self.train_rows}, validation {self.eval_rows} samples",
            "tokens per sample: " + ", ".join(f"{k} {v}" for k, v in tl.items()),
            f"over cutoff_len: {self.overlength} (policy {self.overlength_policy}: truncated {self.truncated}, "
            f"dropped {self.dropped_overlength}); dropped with nothing to train on: {self.dropped_no_target}",
        ] + ([f"prepared data: {self.prepared}"] if self.prepared else [])
        if len(self.sources) > 1 or any(c.dropped or c.sampled != c.read for c in self.sources):
            lines.append("sources:")
            lines += [c.line() for c in self.sources]
        if self.overlength_rows:
            lines.append(f"rows over cutoff_len (policy {self.overlength_policy}):")
            lines += [f"  {r}" for r in _capped(self.overlength_rows)]
        if self.expanded_rows:
            lines.append("rows expanded into one sample per assistant turn:")
            lines += [f"  {r}" for r in _capped(self.expanded_rows)]
        if self.no_target_rows:
            lines.append("rows dropped with nothing to train on (no answer token within cutoff_len; "
                         "raise data.cutoff_len or shorten them):")
            lines += [f"  {r}" for r in _capped(self.no_target_rows)]
        return lines + self.notes

    def count_length(self, where: str, n: int, cfg: DataConfig, too_long: list[str]) -> bool:
        """Record a sample of `n` tokens from `where`; an over-length one is counted and named (and added to
        `too_long` for `check_overlength`). True when data.overlength drops it."""
        self.lengths.append(n)
        if n <= cfg.cutoff_len:
            return False
        self.overlength += 1
        too_long.append(f"{where}: {n} tokens")
        self.overlength_rows.append(too_long[-1])
        if cfg.overlength == "drop":
            self.dropped_overlength += 1
            return True
        return False

    def drop_no_target(self, where: str) -> None:
        """A sample left with nothing to train on after truncation: counted and named."""
        self.dropped_no_target += 1
        self.no_target_rows.append(where)

    def add(self, other: DataReport) -> None:
        """Add the counts, lengths and rows of `other` (e.g. the validation file's) to this report."""
        for k in ("overlength", "truncated", "dropped_overlength", "dropped_no_target", "samples"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.expanded_rows += other.expanded_rows
        self.lengths += other.lengths
        self.overlength_rows += other.overlength_rows
        self.no_target_rows += other.no_target_rows
        self.notes += other.notes


def _capped(rows: list[str]) -> list[str]:
    more = len(rows) - MAX_ERRORS_SHOWN
    return rows[:MAX_ERRORS_SHOWN] + ([f"... and {more} more"] if more > 0 else [])


def encode_samples(ex: Example, tokenizer: PreTrainedTokenizerBase, template: Template, cutoff_len: int,
                   train_on_inputs: bool = False, system: str | None = None) -> list[tuple[dict | None, int]]:
    """(sample or None, untruncated length) for every sample of a row (`Template.encode_samples`: one, or one per
    assistant turn). A sample holds input_ids, attention_mask and labels; None when nothing trainable is left
    within `cutoff_len`."""
    out: list[tuple[dict | None, int]] = []
    for ids, trainable in template.encode_samples(tokenizer, with_system(ex.messages, system)):
        full_len = len(ids)
        ids, trainable = ids[:cutoff_len], trainable[:cutoff_len]
        if not any(trainable):
            out.append((None, full_len))
            continue
        labels = list(ids) if train_on_inputs else [t if m else IGNORE_INDEX
                                                    for t, m in zip(ids, trainable, strict=True)]
        out.append(({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, full_len))
    return out


def encode_example(ex: Example, tokenizer: PreTrainedTokenizerBase, template: Template, cutoff_len: int,
                   train_on_inputs: bool = False, system: str | None = None) -> tuple[dict | None, int]:
    """(sample or None, untruncated length) of the row's last sample: the one that trains its last assistant turn
    (the only one, unless the chat_template rewrites earlier turns)."""
    return encode_samples(ex, tokenizer, template, cutoff_len, train_on_inputs, system)[-1]


def encode_examples(examples: list[Example], tokenizer: PreTrainedTokenizerBase, template: Template, cfg: DataConfig,
                    report: DataReport) -> list[dict]:
    """Tokenize and mask under the over-length policy, counting everything into `report`. A row that gives several
    samples is named once in `report.expanded_rows`; its samples are counted (and named, "file line N sample K")
    one by one."""
    out: list[dict] = []
    too_long: list[str] = []
    for ex in examples:
        try:
            samples = encode_samples(ex, tokenizer, template, cfg.cutoff_len, cfg.train_on_inputs, cfg.system)
        except UserError as e:  # e.g. a chat_template that rejects this conversation: say which row
            raise UserError(f"{ex.where}: {e}") from None
        report.samples += len(samples)
        if len(samples) > 1:
            report.expanded_rows.append(f"{ex.where}: {len(samples)} samples")
        for k, (sample, n) in enumerate(samples):
            where = ex.where if len(samples) == 1 else f"{ex.where} sample {k + 1} of {len(samples)}"
            if report.count_length(where, n, cfg, too_long):
                continue
            if n > cfg.cutoff_len and cfg.overlength == "truncate" and sample is not None:
                report.truncated += 1
            if sample is None:
                report.drop_no_target(where)
                continue
            out.append(sample)
    check_overlength(too_long, cfg, "sample(s)")
    return out


def check_overlength(too_long: list[str], cfg: DataConfig, what: str) -> None:
    """With data.overlength: error, one UserError naming the over-length rows `count_length` collected."""
    if too_long and cfg.overlength == "error":
        raise UserError(f"{len(too_long)} {what} exceed data.cutoff_len={cfg.cutoff_len} "
                        "(data.overlength: error):\n  "
                        + "\n  ".join(too_long[:MAX_ERRORS_SHOWN])
                        + "\nRaise data.cutoff_len, or set data.overlength to truncate or drop.")


VAL_MAX_PERCENT = 20  # an integer data.val_size takes at most this share of the rows


def validation_rows(n: int, val_size: int | float, val_max_rows: int | None) -> tuple[int, str]:
    """(validation rows out of `n`, a note or "") for data.val_size (a row count, or a fraction in (0, 1)) and
    data.val_max_rows.

    Asked for: the count, or round(fraction x n); at most val_max_rows. Taken: an integer count is capped at
    VAL_MAX_PERCENT of the rows (rounded down), a fraction at n - 1, so at least one row stays for training. The
    note (one line) says when fewer rows were taken than asked for, or none although validation was asked for.
    """
    is_count = isinstance(val_size, int) or float(val_size).is_integer() and val_size >= 1
    asked = int(val_size) if is_count else int(round(n * val_size))
    by = f"data.val_size={val_size}"
    if val_max_rows is not None and val_max_rows < asked:
        asked = val_max_rows
        by += f" and data.val_max_rows={val_max_rows}"
    if is_count:
        limit, why = n * VAL_MAX_PERCENT // 100, f"at most {VAL_MAX_PERCENT}% of {_rows(n)} go to validation"
    else:
        limit, why = max(n - 1, 0), "at least one row must stay for training"
    k = min(asked, limit)
    without = "training runs without validation (no eval loss)"
    if asked == 0 and val_size > 0 and not is_count and val_max_rows != 0:
        return 0, (f"validation split: none ({by} of {_rows(n)} rounds to 0 rows); {without}; "
                   "raise data.val_size, add rows or set data.eval_path")
    if k == asked:
        return k, ""
    if k == 0:
        return 0, (f"validation split: none, not the {asked} asked for by {by} ({why}); {without}; "
                   "add rows or set data.eval_path")
    return k, f"validation split: {_rows(k)}, not the {asked} asked for by {by} ({why})"


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def split_validation(examples: list, val_size: int | float, val_max_rows: int | None, seed: int,
                     report: DataReport | None = None) -> tuple[list, list]:
    """Seeded split into (train, validation), each in file order; sizes per `validation_rows`, whose note (if
    any) goes to `report.notes`. The validation rows are the first k of a seeded shuffle, so a capped split
    takes the same rows as asking for k."""
    n = len(examples)
    k, note = validation_rows(n, val_size, val_max_rows)
    if note and report is not None:
        report.notes.append(note)
    if k <= 0:
        return list(examples), []
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:k])
    return [e for i, e in enumerate(examples) if i not in val_idx], [e for i, e in enumerate(examples) if i in val_idx]


@dataclass
class Datasets:
    """The prepared data: samples (arrow.Samples: a sequence of dicts of input_ids, attention_mask, labels, with
    their `lengths`), the report, and the training rows as Examples (read on demand)."""

    train: Samples | Any  # arrow.Samples; with data.streaming a stream (stream.py)
    eval: Samples
    report: DataReport
    train_examples: Sequence[Example]


def masked_segments(tokenizer: PreTrainedTokenizerBase, sample: dict) -> list[tuple[bool, str]]:
    """A sample's text as (trained, text) runs: consecutive tokens with the same mask decoded together."""
    out: list[tuple[bool, str]] = []
    cur: list[int] = []
    cur_train = False
    for tid, lab in zip(sample["input_ids"], sample["labels"], strict=True):
        train = lab != IGNORE_INDEX
        if cur and train != cur_train:
            out.append((cur_train, decode_text(tokenizer, cur)))
            cur = []
        cur.append(tid)
        cur_train = train
    if cur:
        out.append((cur_train, decode_text(tokenizer, cur)))
    return out


def render_masked(tokenizer: PreTrainedTokenizerBase, sample: dict, color: bool = False) -> str:
    """Decode a sample, marking the trained spans: «...» (or green when `color`)."""
    open_, close = ("\x1b[32m", "\x1b[0m") if color else ("«", "»")
    return "".join(f"{open_}{t}{close}" if train else t for train, t in masked_segments(tokenizer, sample))


def decode_text(tokenizer: PreTrainedTokenizerBase, ids: list[int], skip_special_tokens: bool = False) -> str:
    """`tokenizer.decode` of one sequence, typed as the str it is (transformers types the result `str | list[str]`
    for batches too)."""
    text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert isinstance(text, str), "one sequence of ids decodes to one string"
    return text
