"""`data.streaming: true`: training samples streamed from the sources, for data larger than memory or disk.

Rows are read, validated, tokenised and masked as training takes them (a `datasets.IterableDataset`); nothing is
prepared or cached first. What differs from prepared data (prepare.py), and why:

- `train.max_steps` is required: the number of rows is not known in advance, so neither is an epoch;
- sources mix by interleaving, each source's `weight` its probability (a source without one counts 1), seeded
  by `train.seed`, until the first source runs out (then the next epoch starts, reshuffled). `rows` and
  `fraction` need a source's size and are refused;
- rows are shuffled in a buffer of `SHUFFLE_BUFFER` rows (seeded, reshuffled each epoch), not globally;
- an invalid row stops training when it is reached, naming its file and line (nothing is skipped silently);
  over-length and empty samples follow data.overlength as always and are counted as they are read (run_info.json
  and the report give the counts of every sample read, each pass over the stream counted again; the first
  ROWS_NAMED of them named);
- validation comes from data.eval_path only (prepared in memory); data.val_size is not split off a stream;
- data.dedup and data.exclude need every row first and are refused.

Exact resume holds: the stream is a function of the sources, the seed and the epoch, and `--resume` skips the
batches already trained (the Trainer does), so a resumed run sees the rows the uninterrupted run would have.
"""
from __future__ import annotations

import json
from itertools import islice
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .encode import DataReport, encode_samples
from .examples import Example, parse_example
from .tokenise import DROPPED, NO_TARGET, OK, TRUNCATED

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..config import DataConfig
    from .encode import Datasets
    from .templates import Template

SHUFFLE_BUFFER = 1000
PEEK = 64  # samples read ahead for the memory estimate and data-check


def check_streaming(cfg: DataConfig, max_steps: int) -> None:
    """The settings streaming cannot honour, refused before anything loads (module docstring)."""
    if max_steps <= 0:
        raise UserError("data.streaming: true needs train.max_steps (the number of rows in a stream is not known, "
                        "so neither is an epoch); set train.max_steps, or data.streaming: false")
    for s in cfg.sources:
        if s.rows is not None or s.fraction is not None:
            raise UserError(f"data source {s.label}: {s.amount} needs the source's size, which a stream does not "
                            "know; give a weight (its interleaving probability) or set data.streaming: false")
    if cfg.dedup != "off" or cfg.exclude:
        raise UserError("data.dedup and data.exclude compare every row with every other, which a stream cannot; "
                        "set data.streaming: false")


def _samples(src_json: str, tok: PreTrainedTokenizerBase, template: Template, cutoff_len: int,
             train_on_inputs: bool, system: str | None, policy: str) -> Any:
    from ..config.sources import SourceConfig
    from .sources import iter_rows

    src = SourceConfig.model_validate_json(src_json)
    for where, obj in iter_rows(src):
        ex: Example = parse_example(obj, where, True, template)
        try:
            samples = encode_samples(ex, tok, template, cutoff_len, train_on_inputs, system)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        for k, (sample, full) in enumerate(samples):
            if full > cutoff_len and policy == "error":
                raise UserError(f"{where}: {full} tokens exceed data.cutoff_len={cutoff_len} (data.overlength: "
                                "error); raise data.cutoff_len, or set data.overlength to truncate or drop")
            status = DROPPED if full > cutoff_len and policy == "drop" else NO_TARGET if sample is None else \
                TRUNCATED if full > cutoff_len else OK
            trains = sample is not None and status != DROPPED
            ids, labels = (sample["input_ids"], sample["labels"]) if sample is not None and trains else ([], [])
            kept = bool(ids)
            yield {"input_ids": ids, "labels": labels,
                   "status": status, "full": full, "over": full > cutoff_len,
                   "where": where if len(samples) == 1 else f"{where} sample {k + 1} of {len(samples)}",
                   "messages": json.dumps(ex.messages, ensure_ascii=False) if kept else ""}


def stream_datasets(cfg: DataConfig, tok: PreTrainedTokenizerBase, template: Template, seed: int) -> Datasets:
    """The training stream (an IterableDataset), with no validation samples (prepare.build_datasets adds
    data.eval_path's)."""
    import datasets

    from .encode import Datasets

    kwargs = {"tok": tok, "template": template, "cutoff_len": cfg.cutoff_len,
              "train_on_inputs": cfg.train_on_inputs, "system": cfg.system, "policy": cfg.overlength}
    parts = [datasets.IterableDataset.from_generator(_samples, gen_kwargs={"src_json": s.model_dump_json(), **kwargs})
             for s in cfg.sources]
    weights = [s.weight if s.weight is not None else 1.0 for s in cfg.sources]
    stream = parts[0] if len(parts) == 1 else datasets.interleave_datasets(
        parts, probabilities=[w / sum(weights) for w in weights], seed=seed, stopping_strategy="first_exhausted")
    stream = stream.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
    peek = [p for p in islice(stream, PEEK) if p["status"] in (OK, TRUNCATED)]
    if not peek:
        raise UserError(f"{cfg.path_label}: no trainable sample in the stream's first {PEEK} samples (see "
                        "data.cutoff_len and data.overlength)")
    report = DataReport(path=cfg.path_label, overlength_policy=cfg.overlength, streaming=True)
    train = _Stream(stream.remove_columns(["messages"]), peek, report)
    mix = ", ".join(f"{s.label} {w / sum(weights):.0%}" for s, w in zip(cfg.sources, weights, strict=True))
    report.notes.append(f"data.streaming: rows are read, validated and tokenised as training takes them ({mix}; "
                        f"shuffled in a buffer of {SHUFFLE_BUFFER}); no counts in advance")
    from .arrow import Samples
    from .tokenise import empty_samples

    rows = [Example(p["where"], json.loads(p["messages"])) for p in peek]
    return Datasets(train, Samples(empty_samples()), report, rows)


class _Stream:
    """The training stream as the Trainer takes it (`ds`: an endless iterable, epoch after epoch), with the first
    samples kept for the memory estimate."""

    def __init__(self, ds: Any, peek: list[dict], report: DataReport) -> None:
        self.ds = _Epochs(ds, report)
        self.peek = [{"input_ids": p["input_ids"], "attention_mask": [1] * len(p["input_ids"]),
                      "labels": p["labels"]} for p in peek]

    def longest(self, n: int) -> list[dict]:
        return sorted(self.peek, key=lambda s: -len(s["input_ids"]))[:n]

    def __len__(self) -> int:  # unknown: truthiness only ("has training data")
        raise TypeError("a stream has no length")

    def __bool__(self) -> bool:
        return True


def _epochs_class() -> Any:
    import torch

    class Epochs(torch.utils.data.IterableDataset):
        """The stream's epochs one after the other, as one endless iterable (each epoch reshuffled: set_epoch); the
        samples it reads counted into `report` as they pass (over-length, truncated, dropped: what run_info.json and
        the report show for a stream), the kept ones given on.

        Why not hand the Trainer the IterableDataset itself: the Trainer, not knowing an epoch's length, resumes by
        skipping the steps already trained within its first epoch only, so a run killed after the stream's first
        epoch would have restarted that epoch. Over one endless iterable, skipping N batches is exact."""

        def __init__(self, ds: Any, report: DataReport) -> None:
            self.ds, self.report = ds, report

        def __iter__(self) -> Any:
            epoch = 0
            while True:
                self.ds.set_epoch(epoch)
                n = 0
                for sample in self.ds:
                    if _count(self.report, sample):
                        n += 1
                        yield {"input_ids": sample["input_ids"], "attention_mask": [1] * len(sample["input_ids"]),
                               "labels": sample["labels"]}
                if n == 0:
                    raise UserError("data.streaming: the stream gave no trainable sample in a whole epoch (see "
                                    "data.cutoff_len and data.overlength)")
                epoch += 1

    return Epochs


def _Epochs(ds: Any, report: DataReport) -> Any:  # noqa: N802 - a class made on first use (torch imports late)
    return _epochs_class()(ds, report)


ROWS_NAMED = 100  # a stream's report names at most this many over-length and empty samples (the counts go on)


def _count(report: DataReport, sample: dict) -> bool:
    """Count a streamed sample into `report`; True when it trains."""
    report.samples += 1
    status, full, where = sample["status"], sample["full"], sample["where"]
    if sample["over"]:
        report.overlength += 1
        if len(report.overlength_rows) < ROWS_NAMED:
            report.overlength_rows.append(f"{where}: {full} tokens")
    report.truncated += status == TRUNCATED
    report.dropped_overlength += status == DROPPED
    if status == NO_TARGET:
        report.dropped_no_target += 1
        if len(report.no_target_rows) < ROWS_NAMED:
            report.no_target_rows.append(where)
    report.train_rows += status in (OK, TRUNCATED)
    return status in (OK, TRUNCATED)
