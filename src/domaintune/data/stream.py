"""`data.streaming: true`: training samples streamed from the sources, for data larger than memory or disk.

Rows are read, validated, tokenised and masked as training takes them (a `datasets.IterableDataset`); nothing is
prepared or cached first. What differs from prepared data (prepare.py), and why:

- `train.max_steps` is required: the number of rows is not known in advance, so neither is an epoch;
- sources mix by interleaving, each source's `weight` its probability (a source without one counts 1), seeded
  by `train.seed`, until the first source runs out (then the next epoch starts, reshuffled). `rows` and
  `fraction` need a source's size and are refused;
- rows are shuffled in a buffer of `SHUFFLE_BUFFER` rows (seeded, reshuffled each epoch), not globally;
- an invalid row stops training when it is reached, naming its file and line (nothing is skipped silently);
  over-length samples follow data.overlength as always, and the counts are logged when training ends;
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
        for sample, full in samples:
            if sample is None or (full > cutoff_len and policy == "drop"):
                continue
            if full > cutoff_len and policy == "error":
                raise UserError(f"{where}: {full} tokens exceed data.cutoff_len={cutoff_len} (data.overlength: "
                                "error); raise data.cutoff_len, or set data.overlength to truncate or drop")
            yield {"input_ids": sample["input_ids"], "attention_mask": sample["attention_mask"],
                   "labels": sample["labels"], "messages": json.dumps(ex.messages, ensure_ascii=False),
                   "where": where}


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
    peek = list(islice(stream, PEEK))
    if not peek:
        raise UserError(f"{cfg.path_label}: no trainable sample in the stream's first rows")
    train = _Stream(stream.select_columns(["input_ids", "attention_mask", "labels"]), peek)
    report = DataReport(path=cfg.path_label, overlength_policy=cfg.overlength, streaming=True)
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

    def __init__(self, ds: Any, peek: list[dict]) -> None:
        self.ds = _Epochs(ds)
        self.peek = [{k: p[k] for k in ("input_ids", "attention_mask", "labels")} for p in peek]

    def longest(self, n: int) -> list[dict]:
        return sorted(self.peek, key=lambda s: -len(s["input_ids"]))[:n]

    def __len__(self) -> int:  # unknown: truthiness only ("has training data")
        raise TypeError("a stream has no length")

    def __bool__(self) -> bool:
        return True


def _epochs_class() -> Any:
    import torch

    class Epochs(torch.utils.data.IterableDataset):
        """The stream's epochs one after the other, as one endless iterable (each epoch reshuffled: set_epoch).

        Why not hand the Trainer the IterableDataset itself: the Trainer, not knowing an epoch's length, resumes by
        skipping the steps already trained within its first epoch only, so a run killed after the stream's first
        epoch would have restarted that epoch. Over one endless iterable, skipping N batches is exact."""

        def __init__(self, ds: Any) -> None:
            self.ds = ds

        def __iter__(self) -> Any:
            epoch = 0
            while True:
                self.ds.set_epoch(epoch)
                n = 0
                for n, sample in enumerate(self.ds, start=1):  # noqa: B007 - n counts the epoch's samples
                    yield sample
                if n == 0:
                    raise UserError("data.streaming: the stream gave no trainable sample in a whole epoch")
                epoch += 1

    return Epochs


def _Epochs(ds: Any) -> Any:  # noqa: N802 - a class made on first use (torch imports late)
    return _epochs_class()(ds)
