"""Prepared training data (data/prepare.py): several sources mixed by weight, row count or fraction with exact,
seeded counts; every file type through the same samples; the cache (a second run tokenises nothing; a change in
the data, the template or a setting prepares again); per-source counts; worker processes; and the samples equal
those of the in-memory reference encoder (encode.encode_examples) on the same rows."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from domaintune.config import build_config
from domaintune.config.sources import SourceConfig
from domaintune.data import tokenise
from domaintune.data.encode import DataReport, encode_examples, split_validation
from domaintune.data.examples import load_examples
from domaintune.data.mix import mix_counts, take
from domaintune.data.prepare import build_datasets
from domaintune.data.templates import get_template
from domaintune.errors import UserError

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "data" / "train.jsonl"


def data_cfg(path, cache_dir, **data):
    return build_config({"data": {"path": path, "cache_dir": str(cache_dir), "cutoff_len": 256, **data}}, "test").data


def rows_of(ds) -> list[tuple]:
    return [(tuple(s["input_ids"]), tuple(s["labels"])) for s in ds]


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """Three sources: 30 alpaca rows (JSONL), 20 as messages (Parquet), 14 as CSV: the 64 sample rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("three")
    rows = [json.loads(x) for x in SAMPLE.read_text(encoding="utf-8").splitlines() if x.strip()]
    (d / "a.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:30]), encoding="utf-8")
    msgs = [json.dumps([{"role": "user", "content": r["instruction"] + (("\n" + r["input"]) if r.get("input") else "")},
                        {"role": "assistant", "content": r["output"]}], ensure_ascii=False) for r in rows[30:50]]
    pq.write_table(pa.table({"dialog": msgs}), d / "b.parquet")
    import csv

    with open(d / "c.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["question", "context", "answer"])
        for r in rows[50:]:
            w.writerow([r["instruction"], r.get("input", ""), r["output"]])
    return d


def test_counts_follow_the_documented_rules():
    s = lambda **k: SourceConfig(path="x", **k)  # noqa: E731
    # weights share the total at which the first weighted source runs out: 30 / 3 -> 10 per unit of weight
    assert mix_counts([s(weight=3), s(weight=1), s(weight=2)], [30, 100, 100]) == [30, 10, 20]
    assert mix_counts([s(weight=1), s(weight=1)], [10, 7]) == [7, 7]
    assert mix_counts([s(rows=25), s(fraction=0.5), s(), s(fraction=2)], [10, 7, 5, 3]) == [25, 4, 5, 6]
    import random

    picked = take(10, 25, random.Random(0))
    assert len(picked) == 25 and picked == sorted(picked)
    assert all(picked.count(i) in (2, 3) for i in range(10)) and sum(picked.count(i) == 3 for i in range(10)) == 5
    with pytest.raises(UserError, match="no row left"):
        mix_counts([s(rows=3)], [0])


def test_three_sources_mix_with_exact_seeded_counts(three, qwen_tok, tmp_path):
    srcs = [{"path": str(three / "a.jsonl"), "weight": 1},
            {"path": str(three / "b.parquet"), "columns": {"messages": "dialog"}, "weight": 1, "format": "messages"},
            {"path": str(three / "c.csv"), "columns": {"instruction": "question", "input": "context",
                                                       "output": "answer"}, "rows": 20}]
    template = get_template("chatml", qwen_tok)
    cfg = data_cfg(srcs, tmp_path / "c1", val_size=0)
    ds = build_datasets(cfg, qwen_tok, template, seed=3)
    counts = [c.to_dict() for c in ds.report.sources]
    # weights 1:1 -> the Parquet source (20 rows) runs out first: 20 + 20; the CSV's 14 rows upsampled to 20
    assert [(c["read"], c["sampled"]) for c in counts] == [(30, 20), (20, 20), (14, 20)]
    assert len(ds.train) == 60 == sum(c["train_samples"] for c in counts)
    assert sum(c["tokens"] for c in counts) == sum(ds.train.lengths)
    where = [ds.train_examples[i].where for i in range(len(ds.train_examples))]
    assert sum(w.startswith(str(three / "c.csv")) for w in where) == 20
    assert len({w for w in where if w.startswith(str(three / "a.jsonl"))}) == 20  # a sample, no repeats
    # the same seed in a fresh cache gives the same rows; another seed other rows of the same counts
    again = build_datasets(data_cfg(srcs, tmp_path / "c2", val_size=0), qwen_tok, template, seed=3)
    assert rows_of(again.train) == rows_of(ds.train)
    other = build_datasets(data_cfg(srcs, tmp_path / "c3", val_size=0), qwen_tok, template, seed=4)
    assert [c.sampled for c in other.report.sources] == [20, 20, 20]
    assert sorted(rows_of(other.train)) != sorted(rows_of(ds.train))
    summary = "\n".join(ds.report.summary_lines())
    assert f"{three / 'c.csv'} (20 rows): read 14, sampled 20 (1.43x its 14 rows)" in summary
    assert ds.report.to_dict()["sources"][1]["name"] == str(three / "b.parquet")


@pytest.mark.parametrize("arch_template", [("qwen2", "chatml"), ("qwen3", "tokenizer")])
def test_samples_equal_the_in_memory_encoder(family_tok, tmp_path, arch_template):
    """One JSONL source with a validation split: the prepared samples are the reference encoder's, row for row (qwen3:
    rows expanded into one sample per assistant turn)."""
    arch, name = arch_template
    tok = family_tok(arch)
    template = get_template(name, tok)
    cfg = data_cfg(str(SAMPLE), tmp_path, val_size=6)
    ds = build_datasets(cfg, tok, template, seed=42)
    train_ex, eval_ex = split_validation(load_examples(SAMPLE, template=template), 6, None, 42)
    ref = encode_examples(train_ex, tok, template, cfg, DataReport())
    assert rows_of(ds.train) == rows_of(ref)
    assert rows_of(ds.eval) == rows_of(encode_examples(eval_ex, tok, template, cfg, DataReport()))
    assert ds.train.lengths == [len(r["input_ids"]) for r in ref]
    assert all(s["attention_mask"] == [1] * len(s["input_ids"]) for s in ds.train)


def test_second_run_reads_from_the_cache_and_changes_invalidate_it(qwen_tok, tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_bytes(SAMPLE.read_bytes())
    calls = []
    real = tokenise._encode_batch
    monkeypatch.setattr(tokenise, "_encode_batch", lambda batch, **kw: calls.append(1) or real(batch, **kw))
    template = get_template("chatml", qwen_tok)
    cfg = data_cfg(str(data), tmp_path / "cache")
    first = build_datasets(cfg, qwen_tok, template, seed=1)
    assert calls and first.report.prepared.startswith("read and tokenised, cached in ")
    calls.clear()
    second = build_datasets(cfg, qwen_tok, template, seed=1)
    assert calls == [] and second.report.prepared.startswith("from the cache, nothing read or tokenised")
    assert rows_of(second.train) == rows_of(first.train) and rows_of(second.eval) == rows_of(first.eval)
    assert second.report.to_dict() | {"prepared": ""} == first.report.to_dict() | {"prepared": ""}
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(entries) == 1 and all(".building-" not in e for e in entries)
    # each of these prepares again, into its own entry
    build_datasets(cfg, qwen_tok, get_template("alpaca", qwen_tok), seed=1)  # the template
    assert calls
    calls.clear()
    build_datasets(data_cfg(str(data), tmp_path / "cache", cutoff_len=100), qwen_tok, template, seed=1)  # a setting
    assert calls
    calls.clear()
    data.write_bytes(data.read_bytes().replace("孩子".encode(), "儿童".encode(), 1))  # one word of the data
    changed = build_datasets(cfg, qwen_tok, template, seed=1)
    assert calls and changed.report.prepared.startswith("read and tokenised")
    assert len(list((tmp_path / "cache").iterdir())) == 4


def test_worker_processes_give_the_same_samples(qwen_tok, tmp_path):
    template = get_template("chatml", qwen_tok)
    one = build_datasets(data_cfg(str(SAMPLE), tmp_path / "a", num_proc=1), qwen_tok, template, seed=5)
    two = build_datasets(data_cfg(str(SAMPLE), tmp_path / "b", num_proc=2), qwen_tok, template, seed=5)
    assert rows_of(one.train) == rows_of(two.train)
    assert one.report.to_dict() | {"prepared": ""} == two.report.to_dict() | {"prepared": ""}


def test_overlength_and_empty_samples_are_counted_per_source(qwen_tok, tmp_path):
    short = tmp_path / "short.jsonl"
    short.write_text(SAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    template = get_template("chatml", qwen_tok)
    ds = build_datasets(data_cfg(str(short), tmp_path / "c", cutoff_len=100, overlength="drop", val_size=0),
                        qwen_tok, template, seed=0)
    r = ds.report
    assert r.overlength == r.dropped_overlength > 0 and r.truncated == 0
    assert len(r.overlength_rows) == r.overlength and r.overlength_rows[0].startswith(f"{short} line ")
    assert len(ds.train) == 64 - r.overlength == r.sources[0].samples
    assert max(ds.train.lengths) <= 100


def test_bad_rows_in_any_source_are_named_together(tmp_path, qwen_tok):
    good = tmp_path / "good.jsonl"
    good.write_bytes(SAMPLE.read_bytes())
    bad = tmp_path / "bad.csv"
    bad.write_text("instruction,output\nq1,a1\n,a2\nq3,\n", encoding="utf-8")
    cfg = data_cfg([str(good), str(bad)], tmp_path / "c")
    with pytest.raises(UserError) as e:
        build_datasets(cfg, qwen_tok, get_template("chatml", qwen_tok), seed=0)
    msg = str(e.value)
    assert msg.startswith("2 invalid row(s)") and f"{bad} line 3" in msg and f"{bad} line 4" in msg
    assert not any(p.name.endswith(tuple("0123456789abcdef")) and ".building-" in p.name
                   for p in (tmp_path / "c").iterdir())  # nothing half-built left behind


def test_a_stream_gives_the_prepared_samples_and_refuses_what_it_cannot_do(qwen_tok, tmp_path):
    """One pass over a one-source stream holds exactly the prepared samples (in buffer-shuffled order), epoch
    after epoch (each reshuffled); the settings a stream cannot honour are refused with the reason."""
    from itertools import islice

    from domaintune.data.stream import check_streaming

    template = get_template("chatml", qwen_tok)
    prepared = build_datasets(data_cfg(str(SAMPLE), tmp_path, val_size=0), qwen_tok, template, seed=2)
    streamed = build_datasets(data_cfg(str(SAMPLE), tmp_path, val_size=0, streaming=True), qwen_tok, template, seed=2)
    assert streamed.report.streaming and "streamed" in streamed.report.summary_lines()[0]
    two = [(tuple(s["input_ids"]), tuple(s["labels"])) for s in islice(iter(streamed.train.ds), 128)]
    assert sorted(two[:64]) == sorted(rows_of(prepared.train)) == sorted(two[64:])
    assert two[:64] != two[64:]  # the second epoch is reshuffled
    again = build_datasets(data_cfg(str(SAMPLE), tmp_path, val_size=0, streaming=True), qwen_tok, template, seed=2)
    assert [tuple(s["input_ids"]) for s in islice(iter(again.train.ds), 128)] == [t[0] for t in two]
    with pytest.raises(UserError, match="needs train.max_steps"):
        check_streaming(data_cfg(str(SAMPLE), tmp_path, streaming=True), -1)
    with pytest.raises(UserError, match="give a weight"):
        check_streaming(data_cfg([{"path": str(SAMPLE), "rows": 10}], tmp_path, streaming=True), 5)
    with pytest.raises(UserError, match="set data.streaming: false"):
        check_streaming(data_cfg(str(SAMPLE), tmp_path, streaming=True, dedup="exact"), 5)


def test_save_to_disk_and_eval_sources_give_the_jsonl_samples(qwen_tok, tmp_path):
    """The sample rows as a save_to_disk folder (messages), with the validation set from a list of two eval
    sources (a Parquet file and a glob): the same samples as the JSON lines."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(x) for x in SAMPLE.read_text(encoding="utf-8").splitlines() if x.strip()]
    template = get_template("chatml", qwen_tok)
    msgs = [ex.messages for ex in load_examples(SAMPLE, template=template)]  # history rows too
    datasets.Dataset.from_dict({"messages": msgs[:40]}).save_to_disk(str(tmp_path / "saved"))
    pq.write_table(pa.table({"messages": msgs[40:50]}), tmp_path / "ev.parquet")
    (tmp_path / "ev").mkdir()
    for k, r in enumerate(rows[50:]):
        (tmp_path / "ev" / f"{k:02d}.jsonl").write_text(json.dumps(r, ensure_ascii=False) + "\n", encoding="utf-8")
    ds = build_datasets(data_cfg(str(tmp_path / "saved"), tmp_path / "c",
                                 eval_path=[str(tmp_path / "ev.parquet"), str(tmp_path / "ev" / "*.jsonl")]),
                        qwen_tok, template, seed=0)
    ref = encode_examples(load_examples(SAMPLE, template=template), qwen_tok, template, data_cfg(str(SAMPLE), tmp_path),
                          DataReport())
    assert rows_of(ds.train) == rows_of(ref[:40]) and rows_of(ds.eval) == rows_of(ref[40:])
    assert ds.train_examples[3].where == f"{tmp_path / 'saved'} index 3"


def test_dedup_and_exclude_drop_rows_counted_per_source(qwen_tok, tmp_path):
    rows = [json.loads(x) for x in SAMPLE.read_text(encoding="utf-8").splitlines() if x.strip()][:10]
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    b = tmp_path / "b.jsonl"  # rows 0-2 again, one with other case and punctuation; and a new row
    again = [dict(rows[0]), dict(rows[1]), {**rows[2], "output": rows[2]["output"].upper() + "!!"},
             {"instruction": "Is this new?", "output": "Yes."}]
    b.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in again), encoding="utf-8")
    test = tmp_path / "test.jsonl"  # rows 5 and 6's questions are in the test set
    test.write_text("".join(json.dumps({"instruction": rows[k]["instruction"], "output": "x"}, ensure_ascii=False)
                            + "\n" for k in (5, 6)), encoding="utf-8")
    template = get_template("chatml", qwen_tok)
    ds = build_datasets(data_cfg([str(a), str(b)], tmp_path / "c", dedup="exact", exclude=str(test), val_size=0),
                        qwen_tok, template, seed=0)
    counts = [c.to_dict() for c in ds.report.sources]
    assert counts[0]["dropped"] == {"duplicate": 0, "contaminated": 2} and counts[0]["kept"] == 8
    assert counts[1]["dropped"] == {"duplicate": 3, "contaminated": 0} and counts[1]["kept"] == 1
    assert len(ds.train) == 9
    kept = {ds.train_examples[i].where for i in range(9)}
    assert f"{b} line 4" in kept and f"{a} line 6" not in kept and f"{b} line 1" not in kept
    assert f"{a} (all rows): read 10, dropped 0 duplicate, 2 contaminated, sampled 8 ->" in "\n".join(
        ds.report.summary_lines())


def test_an_upsampled_row_never_trains_and_validates_both(qwen_tok, tmp_path):
    rows = SAMPLE.read_text(encoding="utf-8").splitlines()[:10]
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(rows) + "\n", encoding="utf-8")
    ds = build_datasets(data_cfg([{"path": str(small), "rows": 30}], tmp_path / "c", val_size=2), qwen_tok,
                        get_template("chatml", qwen_tok), seed=0)
    assert len(ds.eval) == 2 and len(ds.train) == 24  # 8 rows x 3 copies train, 2 distinct rows validate
    assert not set(rows_of(ds.eval)) & set(rows_of(ds.train))
    assert ds.report.sources[0].validation == 2 and ds.report.sources[0].sampled == 30


def test_a_stream_counts_what_it_drops(qwen_tok, tmp_path):
    """Over one pass, a stream counts the over-length samples it drops as the prepared data does, and names them."""
    from itertools import islice

    template = get_template("chatml", qwen_tok)
    cfg = data_cfg(str(SAMPLE), tmp_path, val_size=0, cutoff_len=100, overlength="drop")
    prepared = build_datasets(cfg, qwen_tok, template, seed=2).report
    streamed = build_datasets(cfg.model_copy(update={"streaming": True}), qwen_tok, template, seed=2)
    n = 64 - prepared.dropped_overlength
    it = iter(streamed.train.ds)
    kept = list(islice(it, n))  # every kept sample of the first pass
    r = streamed.report
    assert len(kept) == r.train_rows == n and r.samples == r.train_rows + r.dropped_overlength
    assert set(r.overlength_rows) <= set(prepared.overlength_rows)
    assert f"samples read: {n} trained, over cutoff_len {r.overlength}" in r.summary_lines()[0]
    next(it)  # into the second pass: the first is wholly counted
    assert r.samples > 64 and set(r.overlength_rows) == set(prepared.overlength_rows)
    assert r.dropped_overlength >= prepared.dropped_overlength > 0 and r.overlength == r.dropped_overlength


def test_data_check_refuses_what_streaming_train_refuses(tmp_path):
    """Regression (issue 27): data-check accepted a streamed source with `rows: 10` (and showed it at 17% of the
    mix), no train.max_steps, and dedup, all of which `train` refuses; it now refuses them with train's message,
    before anything loads."""
    from domaintune.config import build_config
    from domaintune.data.stream import check_streaming
    from domaintune.training.data_check import run_data_check

    for data, steps in (({"path": [{"path": str(SAMPLE), "rows": 10}]}, 5), ({"path": str(SAMPLE)}, -1),
                        ({"path": str(SAMPLE), "dedup": "exact"}, 5)):
        cfg = build_config({"model": {"name_or_path": str(tmp_path / "no-model")},
                            "data": {**data, "streaming": True}, "train": {"max_steps": steps}})
        with pytest.raises(UserError) as want:
            check_streaming(cfg.data, cfg.train.max_steps)
        with pytest.raises(UserError) as got:
            run_data_check(cfg)
        assert str(got.value) == str(want.value)
