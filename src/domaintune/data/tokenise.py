"""Step 5 of prepare.py: tokenise and mask rows held in Arrow, in worker processes, and count what happened.

Each row gives one sample or several (encode.encode_samples); every sample is written with its status (kept,
truncated, dropped as over-length, dropped with nothing to train) and its untruncated length, so the counts
and the rows behind them (DataReport) come from the columns, whatever the number of workers. Only kept samples
are saved: input_ids, labels and length (attention masks are all ones and are made when a row is read).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..console import stderr_is_terminal
from ..errors import UserError
from .examples import Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..config import DataConfig
    from .encode import DataReport
    from .mix import SourceCount
    from .templates import Template

OK, TRUNCATED, DROPPED, NO_TARGET = 0, 1, 2, 3  # a sample's status


def _features() -> Any:
    from datasets import Features, Sequence, Value

    return Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                     "length": Value("int32"), "full": Value("int32"), "status": Value("int8"),
                     "where": Value("string"), "k": Value("int32"), "n": Value("int32"), "source": Value("int32")})


def _encode_batch(batch: dict[str, list], tok: PreTrainedTokenizerBase, template: Template, cutoff_len: int,
                  train_on_inputs: bool, system: str | None, policy: str) -> dict[str, list]:
    from .encode import encode_samples

    out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "length", "full", "status", "where", "k", "n",
                                            "source")}
    for messages, where, source in zip(batch["messages"], batch["where"], batch["source"], strict=True):
        ex = Example(where, json.loads(messages))
        try:
            samples = encode_samples(ex, tok, template, cutoff_len, train_on_inputs, system)
        except UserError as e:  # e.g. a chat_template that rejects this conversation: say which row
            raise UserError(f"{where}: {e}") from None
        for k, (sample, full) in enumerate(samples):
            if full > cutoff_len and policy == "drop":
                status = DROPPED
            elif sample is None:
                status = NO_TARGET
            else:
                status = TRUNCATED if full > cutoff_len and policy == "truncate" else OK
            ids = sample["input_ids"] if sample is not None and status != DROPPED else []
            out["input_ids"].append(ids)
            out["labels"].append(sample["labels"] if sample is not None and ids else [])
            out["length"].append(len(ids))
            out["full"].append(full)
            out["status"].append(status)
            out["where"].append(where)
            out["k"].append(k)
            out["n"].append(len(samples))
            out["source"].append(source)
    return out


def encode_rows(rows: Any, tok: PreTrainedTokenizerBase, template: Template, cfg: DataConfig, report: DataReport,
                too_long: list[str], num_proc: int, path: Path, counts: list[SourceCount] | None = None) -> Any:
    """The kept samples of `rows` (a data set of messages, where, source) as an Arrow data set; everything
    counted into `report` (and per source into `counts`), over-length samples named in `too_long`."""
    import datasets
    import numpy as np

    if not stderr_is_terminal():
        datasets.disable_progress_bars()
    enc = rows.map(_encode_batch, batched=True, batch_size=500, num_proc=num_proc if num_proc > 1 else None,
                   remove_columns=rows.column_names, features=_features(), cache_file_name=str(path) + ".arrow",
                   new_fingerprint=path.name + "-" + str(len(rows)),
                   fn_kwargs={"tok": tok, "template": template, "cutoff_len": cfg.cutoff_len,
                              "train_on_inputs": cfg.train_on_inputs, "system": cfg.system,
                              "policy": cfg.overlength},
                   desc="tokenising")
    col = enc.data.column
    status, full = col("status").to_numpy(), col("full").to_numpy()
    k, n = col("k").to_numpy(), col("n").to_numpy()
    report.samples += len(enc)
    report.lengths += full.tolist()
    over = full > cfg.cutoff_len
    report.overlength += int(over.sum())
    report.truncated += int((status == TRUNCATED).sum())
    report.dropped_overlength += int((status == DROPPED).sum())
    report.dropped_no_target += int((status == NO_TARGET).sum())
    flagged = np.nonzero(over | (status == NO_TARGET) | ((n > 1) & (k == 0)))[0]
    if len(flagged):
        where = col("where")
        for i in flagged.tolist():
            w = where[i].as_py()
            if n[i] > 1 and k[i] == 0:
                report.expanded_rows.append(f"{w}: {n[i]} samples")
            one = w if n[i] == 1 else f"{w} sample {k[i] + 1} of {n[i]}"
            if over[i]:
                too_long.append(f"{one}: {full[i]} tokens")
                report.overlength_rows.append(too_long[-1])
            if status[i] == NO_TARGET:
                report.no_target_rows.append(one)
    kept_idx = np.nonzero((status == OK) | (status == TRUNCATED))[0]
    if counts is not None:
        src, length = col("source").to_numpy()[kept_idx], col("length").to_numpy()[kept_idx]
        samples = np.bincount(src, minlength=len(counts))
        tokens = np.bincount(src, weights=length, minlength=len(counts))
        for i, c in enumerate(counts):
            c.samples, c.tokens = int(samples[i]), int(tokens[i])
    return enc.select(kept_idx).select_columns(["input_ids", "labels", "length"])


def empty_samples() -> Any:
    """A data set of no samples, with the columns of saved ones."""
    import datasets

    f = _features()
    return datasets.Dataset.from_dict({"input_ids": [], "labels": [], "length": []},
                                      features=datasets.Features({k: f[k] for k in ("input_ids", "labels", "length")}))


def save(out: Path, train: Any, ev: Any, train_rows: Any, report: DataReport) -> None:
    """The prepared data set (arrow.py's layout) into `out`."""
    train.save_to_disk(str(out / "train"))
    if ev is not None and len(ev):  # no eval/ folder: no validation (datasets cannot load a saved empty data set)
        ev.save_to_disk(str(out / "eval"))
    train_rows.select_columns(["messages", "where"]).save_to_disk(str(out / "train_rows"))
    d = asdict(report)
    d.pop("sources")
    d.pop("prepared")
    d.pop("streaming")
    d["source_counts"] = [c.to_dict() for c in report.sources]
    (out / "report.json").write_text(json.dumps(d, ensure_ascii=False), encoding="utf-8")
