"""Preparing training data: read every source, validate, drop duplicates and test rows, mix, split, tokenise and
mask, into memory-mapped Arrow (arrow.py), cached by the inputs.

The steps, each at the scale of a million rows (rows stream through; only row counts and, with dedup, the texts
are held in memory):

1. read: each source's rows (sources.iter_rows) are validated (examples.parse_example) and written to an Arrow
   file as messages. Invalid rows stop the run, all named at once per source, as before: nothing is dropped
   silently;
2. drop: with data.dedup, duplicate rows (the first occurrence in source order stays); with data.exclude,
   rows whose prompt is (nearly) a prompt of the test files; counted per source and reason;
3. mix: how many rows each source gives (mix.py), seeded by train.seed;
4. split: data.eval_path's sources (read and mixed the same way), or a seeded data.val_size split of the mix;
5. tokenise and mask (encode.encode_samples) in `data.num_proc` worker processes; over-length and empty samples
   are counted (the DataReport) and dropped per data.overlength.

A second run with the same inputs loads the result of all five from the cache, says so, and tokenises nothing.
"""
from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .arrow import ArrowRows
from .encode import DataReport, check_overlength, validation_rows
from .examples import Example, bad_rows, parse_example
from .mix import SourceCount, mix

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..config import DataConfig
    from ..config.sources import SourceConfig
    from .encode import Datasets
    from .templates import Template

BATCH = 2000  # rows per Arrow record batch


def build_datasets(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, template: Template, seed: int) -> Datasets:
    """Read, validate, mix, split and encode the data of the `data` config section: prepared (Arrow, cached), or
    with data.streaming a stream (stream.py) and its validation set."""
    if not cfg.streaming:
        return prepare(cfg, tokenizer, template, seed)
    from .stream import stream_datasets

    out = stream_datasets(cfg, tokenizer, template, seed)
    if cfg.eval_sources:  # validation from data.eval_path, prepared (and cached) as usual
        ev_cfg = cfg.model_copy(update={"path": cfg.eval_path, "eval_path": None, "val_size": 0, "streaming": False})
        ev = prepare(ev_cfg, tokenizer, template, seed)
        out.eval = ev.train
        out.report.add(ev.report)
        out.report.eval_rows = len(ev.train)
    return out


def prepare(cfg: DataConfig, tok: PreTrainedTokenizerBase, template: Template, seed: int) -> Datasets:
    """The training and validation samples of the `data` section, from the cache when it holds them."""
    from . import arrow, sources

    digests = [sources.fingerprint(s) for s in [*cfg.sources, *cfg.eval_sources]]
    digests += [sources.fingerprint(_as_source(p)) for p in _exclude_paths(cfg)]
    key = arrow.cache_key(cfg, digests, tok, template, seed)
    root = arrow.cache_root(cfg)
    final = root / key
    if cfg.cache and (final / "report.json").is_file():
        out = _load(final)
        out.report.prepared = f"from the cache, nothing read or tokenised: {final}"
        return out
    if cfg.cache:
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{key}.building-", dir=root))
    else:
        work = Path(tempfile.mkdtemp(prefix="domaintune-data-"))
        atexit.register(shutil.rmtree, work, True)
    try:
        _build(cfg, tok, template, seed, work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if not cfg.cache:
        return _load(work)
    out = _load(arrow.install(work, final))
    out.report.prepared = f"read and tokenised, cached in {final}"
    return out


def _as_source(path: str) -> SourceConfig:
    from ..config.sources import SourceConfig

    return SourceConfig(path=path)


def _exclude_paths(cfg: DataConfig) -> list[str]:
    return [] if cfg.exclude is None else [cfg.exclude] if isinstance(cfg.exclude, str) else list(cfg.exclude)


def _load(folder: Path) -> Datasets:
    import datasets

    from .arrow import Samples
    from .encode import Datasets
    from .tokenise import empty_samples

    d = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    counts = [SourceCount.from_dict(c) for c in d.pop("source_counts")]
    report = DataReport(**d)
    report.sources = counts
    train = Samples(datasets.load_from_disk(str(folder / "train")))
    ev = Samples(datasets.load_from_disk(str(folder / "eval")) if (folder / "eval").is_dir() else empty_samples())
    return Datasets(train, ev, report, _RowView(datasets.load_from_disk(str(folder / "train_rows"))))


class _RowView(ArrowRows[Example]):
    """The training rows as Examples, read from Arrow on demand (data-check shows one)."""

    def make(self, row: dict) -> Example:
        return Example(row["where"], json.loads(row["messages"]))


ROWS_PER_WORKER = 32  # a worker process costs about a second to start: never more workers than this many rows each


def _num_proc(cfg: DataConfig, rows: int) -> int:
    """Tokenising processes: data.num_proc (auto: 1 under 20,000 rows, else up to 8, the CPUs), and never more than
    one per ROWS_PER_WORKER rows (a stray num_proc: 64 on a small file would spend its time starting processes)."""
    asked = int(cfg.num_proc) if cfg.num_proc != "auto" else 1 if rows < 20_000 else min(8, os.cpu_count() or 1)
    return max(1, min(asked, rows // ROWS_PER_WORKER))


def read_rows(srcs: list[SourceConfig], template: Template, path: Path, counts: list[SourceCount],
              texts: list[str] | None = None, prompts: list[str] | None = None) -> tuple[Any, list[range]]:
    """Step 1 for `srcs`: every valid row into the Arrow file `path` (messages as JSON, where, source index); the
    data set and each source's range of row indices. `texts` / `prompts`, when given, get each row's full text
    and prompt text (for dedup / exclude). Invalid rows of a source are raised together, named."""
    import datasets
    import pyarrow as pa

    from .sources import iter_rows

    schema = pa.schema([("messages", pa.large_string()), ("where", pa.string()), ("source", pa.int32())])
    ranges: list[range] = []
    total = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for i, src in enumerate(srcs):
            start = total
            bad: list[tuple[str, str]] = []
            invalid = 0
            buf: dict[str, list] = {"messages": [], "where": [], "source": []}
            for where, obj in iter_rows(src, bad=bad):
                try:
                    ex = parse_example(obj, where, True, template)
                except UserError as e:
                    bad.append((where, str(e)))
                    invalid += 1
                    continue
                buf["messages"].append(json.dumps(ex.messages, ensure_ascii=False))
                buf["where"].append(where)
                buf["source"].append(i)
                if texts is not None:
                    texts.append("\n".join(str(m.get("content") or "") for m in ex.messages))
                if prompts is not None:
                    prompts.append("\n".join(str(m.get("content") or "") for m in ex.messages if m["role"] == "user"))
                if len(buf["where"]) >= BATCH:
                    total += _flush(writer, schema, buf)
            total += _flush(writer, schema, buf)
            if bad:
                raise bad_rows(bad, unreadable_alone=not invalid)
            if total == start:
                raise UserError(f"data source {src.label}: no rows; it needs at least one")
            counts[i].read = total - start
            ranges.append(range(start, total))
    return datasets.Dataset.from_file(str(path)), ranges


def _flush(writer: Any, schema: Any, buf: dict[str, list]) -> int:
    import pyarrow as pa

    n = len(buf["where"])
    if n:
        writer.write_batch(pa.record_batch([pa.array(buf[k], type=schema.field(k).type) for k in buf], schema=schema))
        for v in buf.values():
            v.clear()
    return n


def _drops(cfg: DataConfig, ranges: list[range], counts: list[SourceCount], texts: list[str] | None,
           prompts: list[str] | None, template: Template) -> list[list[int]]:
    """Step 2: the kept row indices of each source; the drops counted in `counts`."""
    dropped: dict[int, str] = {}
    if texts is not None and cfg.dedup != "off":
        from .dedup import duplicates

        for j, first in enumerate(duplicates(texts, cfg.dedup, cfg.near_threshold)):
            if first is not None:
                dropped[j] = "duplicate"
    if prompts is not None:
        from .dedup import contaminated
        from .load import load_sources

        parse = lambda obj, where: parse_example(obj, where, False, template)  # noqa: E731
        tests = load_sources([_as_source(p) for p in _exclude_paths(cfg)], parse, 0, "test row(s)")[0]
        test = [m["content"] for ex in tests for m in ex.messages if m["role"] == "user"]
        for j, hit in enumerate(contaminated(prompts, test, cfg.dedup == "near", cfg.near_threshold)):
            if hit is not None and j not in dropped:
                dropped[j] = "contaminated"
    kept = []
    for r, c in zip(ranges, counts, strict=True):
        for reason in ("duplicate", "contaminated"):
            n = sum(1 for j in r if dropped.get(j) == reason)
            if n or (reason == "duplicate" and cfg.dedup != "off") or (reason == "contaminated" and prompts):
                c.dropped[reason] = n
        kept.append([j for j in r if j not in dropped])
        c.kept = len(kept[-1])
    return kept


def _build(cfg: DataConfig, tok: PreTrainedTokenizerBase, template: Template, seed: int, out: Path) -> None:
    """Steps 1-5 into the folder `out` (train/, eval/, train_rows/, report.json)."""
    from .tokenise import encode_rows, save

    work = out / "work"
    work.mkdir()
    srcs = cfg.sources
    counts = [SourceCount(s.label, s.amount) for s in srcs]
    texts: list[str] | None = [] if cfg.dedup != "off" else None
    prompts: list[str] | None = [] if cfg.exclude else None
    rows, ranges = read_rows(srcs, template, work / "rows.arrow", counts, texts, prompts)
    kept = _drops(cfg, ranges, counts, texts, prompts, template)
    del texts, prompts
    taken = mix(srcs, kept, seed)
    for c, t in zip(counts, taken, strict=True):
        c.sampled = len(t)
    mixed = [j for t in taken for j in t]
    report = DataReport(path=cfg.path_label, rows=len(mixed), overlength_policy=cfg.overlength)
    report.sources = counts
    if cfg.eval_sources:
        ev_srcs = cfg.eval_sources
        ev_counts = [SourceCount(s.label, s.amount) for s in ev_srcs]
        ev_rows, ev_ranges = read_rows(ev_srcs, template, work / "eval_rows.arrow", ev_counts)
        ev_taken = mix(ev_srcs, [list(r) for r in ev_ranges], seed)
        train_rows, eval_rows = rows.select(mixed), ev_rows.select([j for t in ev_taken for j in t])
    else:
        # Split over the mix's distinct rows, so a row that upsampling repeats never trains and validates both.
        # Without repeats this is split_validation's split: the first k of a seeded shuffle of the rows.
        distinct = list(dict.fromkeys(mixed))
        k, note = validation_rows(len(distinct), cfg.val_size, cfg.val_max_rows)
        if note:
            report.notes.append(note)
        order = list(range(len(distinct)))
        random.Random(seed).shuffle(order)
        val = {distinct[i] for i in order[:k]}
        train_idx = [j for j in mixed if j not in val]
        eval_idx = [j for j in distinct if j in val]
        train_rows, eval_rows = rows.select(train_idx), rows.select(eval_idx)
        for s in rows_source(rows, eval_idx):
            counts[s].validation += 1
    nproc = _num_proc(cfg, len(train_rows) + len(eval_rows))
    too_long: list[str] = []
    train = encode_rows(train_rows, tok, template, cfg, report, too_long, nproc, work / "train", counts=counts)
    eval_report = DataReport(overlength_policy=cfg.overlength)
    ev = encode_rows(eval_rows, tok, template, cfg, eval_report, too_long, nproc, work / "eval",
                     ) if len(eval_rows) else None
    check_overlength(too_long, cfg, "sample(s)")
    report.add(eval_report)
    report.train_rows, report.eval_rows = len(train), len(ev) if ev is not None else 0
    if not len(train):
        raise UserError(f"{cfg.path_label}: no trainable sample left (see the counts above); raise data.cutoff_len")
    save(out, train, ev, train_rows, report)
    shutil.rmtree(work)


def rows_source(rows: Any, idx: list[int]) -> list[int]:
    """The source index of each of the rows `idx`."""
    col = rows.data.column("source").to_pylist()
    return [col[j] for j in idx]

