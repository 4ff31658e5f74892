"""data/sources.py: every file type, folders, globs, save_to_disk folders and hub ids give the exact rows with the
place a user can find them; column mapping, format checks, bad rows and broken files are errors naming the file,
the line or index and what to do; fingerprints follow the bytes.

Text fixtures live in fixtures/sources/; the Parquet and Arrow files are written here with pyarrow (from ROWS), so
no binary file is committed."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from domaintune.config.sources import SourceConfig
from domaintune.data import sources
from domaintune.data.examples import parse_example
from domaintune.data.reader import iter_records, read_records
from domaintune.data.sources import count_hint, fingerprint, iter_rows, source_files
from domaintune.errors import UserError

FIX = Path(__file__).parent / "fixtures" / "sources"
ROWS = [{"question": "What is 2+2?", "answer": "4"}, {"question": "Capital of Peru?", "answer": "Lima"},
        {"question": "Opposite of up?", "answer": "Down"}]
ALPACA = [{"instruction": r["question"], "output": r["answer"]} for r in ROWS]
MSG_ROW = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]


def rows(src: SourceConfig | str, **kw) -> list[tuple[str, object]]:
    return list(iter_rows(SourceConfig(path=src) if isinstance(src, str) else src, **kw))


def error(src: SourceConfig | str, **kw) -> str:
    with pytest.raises(UserError) as e:
        rows(src, **kw)
    return str(e.value)


def parses(got: list[tuple[str, object]]) -> None:
    for where, row in got:
        assert parse_example(row, where).where == where


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> Path:
    """rows.parquet (two row groups), rows.arrow (IPC file), stream.arrow (IPC stream), rows.feather."""
    d = tmp_path_factory.mktemp("tables")
    t = pa.Table.from_pylist(ROWS)
    pq.write_table(t, d / "rows.parquet", row_group_size=2)
    with pa.ipc.new_file(d / "rows.arrow", t.schema) as w:
        w.write_table(t, max_chunksize=2)
    with pa.ipc.new_stream(d / "stream.arrow", t.schema) as w:
        w.write_table(t, max_chunksize=2)
    feather.write_feather(t, d / "rows.feather")
    return d


def test_jsonl_alpaca_rows_and_lines():
    p = FIX / "alpaca.jsonl"
    got = rows(str(p))
    assert got == [(f"{p} line 1", {"instruction": "What is 2+2?", "input": "", "output": "4"}),
                   (f"{p} line 3", {"instruction": "Translate", "input": "bonjour", "output": "hello",
                                    "system": "Be brief."})]
    parses(got)


def test_json_array_of_messages():
    p = FIX / "messages.json"
    got = rows(str(p))
    assert [w for w, _ in got] == [f"{p} line 2", f"{p} line 3"]
    assert got[1][1]["messages"][2] == {"role": "assistant", "content": "Paris."}
    parses(got)


def test_sharegpt_and_openai_tools():
    p = FIX / "sharegpt.jsonl"
    got = rows(SourceConfig(path=str(p), format="sharegpt"))
    assert [w for w, _ in got] == [f"{p} line 1", f"{p} line 2"]
    assert got[1][1]["system"] == "Math tutor."
    parses(got)
    p = FIX / "openai_tools.jsonl"
    ((where, row),) = rows(SourceConfig(path=str(p), format="openai"))
    assert where == f"{p} line 1"
    assert row["tools"][0]["function"]["name"] == "get_weather"
    ex = parse_example(row, where)
    assert [m["role"] for m in ex.messages] == ["user", "assistant", "tool", "assistant"]
    assert ex.messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert ex.tools is not None


def test_csv_values_lines_and_quoted_newlines():
    p = FIX / "alpaca.csv"
    got = rows(str(p))
    assert got == [(f"{p} line 2", {"instruction": "What is 2+2?", "input": "", "output": "4"}),
                   (f"{p} line 3", {"instruction": 'Say "hi"', "input": "two\r\nlines", "output": "hi"})]
    parses(got)


def test_tsv_messages_cell_is_json():
    p = FIX / "messages.tsv"
    got = rows(str(p))
    assert got == [(f"{p} line 2", {"messages": MSG_ROW, "source": "chat"})]
    parses(got)


def test_csv_bom_blank_lines_and_line_numbers(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes(b"\xef\xbb\xbfinstruction,output\n\nq1,\"a\nb\"\nq2,a2\n")
    assert rows(str(p)) == [(f"{p} line 3", {"instruction": "q1", "output": "a\nb"}),
                            (f"{p} line 5", {"instruction": "q2", "output": "a2"})]


def test_ragged_csv_rows_name_their_line(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("instruction,output\nq1,a1\nq2,a2,extra\nq3\nq4,a4\n", encoding="utf-8")
    msg = (f"{p} line 3: 3 values, but the header has 2 columns; quote a value that holds the delimiter ',' or a "
           "line end")
    assert error(str(p)) == msg
    bad: list[tuple[str, str]] = []
    got = rows(str(p), bad=bad)
    assert [w for w, _ in got] == [f"{p} line 2", f"{p} line 5"]
    assert bad == [(f"{p} line 3", msg),
                   (f"{p} line 4", f"{p} line 4: 1 values, but the header has 2 columns; quote a value that holds "
                                   "the delimiter ',' or a line end")]


def test_csv_invalid_utf8_and_broken_json_cell(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes(b"instruction,output\nq,a\nq\xff,a\n")
    assert error(str(p)) == f"{p} line 3: invalid UTF-8 (byte 2 of the line); re-save the file as UTF-8"
    p.write_text('messages\n"[{""role"": ""user"""\n', encoding="utf-8")
    assert error(str(p)).startswith(f"{p} line 2: column 'messages' holds broken JSON (")


@pytest.mark.parametrize("name", ["rows.parquet", "rows.arrow", "stream.arrow", "rows.feather"])
def test_parquet_and_arrow_rows_by_index(tables, name):
    p = tables / name
    src = SourceConfig(path=str(p), columns={"instruction": "question", "output": "answer"}, format="alpaca")
    got = rows(src)
    assert got == [(f"{p} index {i}", r) for i, r in enumerate(ALPACA)]
    parses(got)
    assert rows(str(p)) == [(f"{p} index {i}", r) for i, r in enumerate(ROWS)]
    assert count_hint(SourceConfig(path=str(p))) == (None if name == "stream.arrow" else 3)


def test_arrow_nulls_of_absent_keys_are_dropped(tmp_path):
    """Regression: Arrow gives every message of a messages column every key, as null where a message lacked it
    ("weight": null on a user message), and parse_example refused every OpenAI-format Parquet or hub row."""
    import datasets

    jsonl = [json.loads(line) for line in (FIX / "openai_tools.jsonl").read_text(encoding="utf-8").splitlines()]
    jsonl.append({"messages": MSG_ROW})
    p = tmp_path / "tools.parquet"
    pq.write_table(pa.Table.from_pylist(jsonl), p)
    assert pq.read_table(p).to_pylist()[1]["messages"][0]["weight"] is None  # what Arrow hands back
    got = rows(str(p))
    assert got == [(f"{p} index 0", jsonl[0]), (f"{p} index 1", jsonl[1])]
    parses(got)
    d = tmp_path / "ds"
    datasets.Dataset.from_list(jsonl).save_to_disk(str(d))
    assert rows(str(d)) == [(f"{d} index 0", jsonl[0]), (f"{d} index 1", jsonl[1])]


def test_columns_mapping_json_and_missing_column(tables, tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]) + '{"question": "q"}\n', encoding="utf-8")
    src = SourceConfig(path=str(p), columns={"instruction": "question", "output": "answer"})
    bad: list[tuple[str, str]] = []
    assert rows(src, bad=bad) == [(f"{p} line {i + 1}", r) for i, r in enumerate(ALPACA[:2])]
    assert bad == [(f"{p} line 3", f"{p} line 3: data.path[].columns maps output to 'answer', but the row has no "
                                   "such key; it has keys question")]
    t = tables / "rows.parquet"
    src = SourceConfig(path=str(t), columns={"output": "reply"})
    assert error(src) == (f"{t}: data.path '{t}' columns maps output to 'reply', but the source has no such "
                          "column; its columns are question, answer. Fix data.path[].columns")


def test_mapped_column_wins_over_a_same_named_one(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("instruction,q,output\nold,new,a\n", encoding="utf-8")
    assert rows(SourceConfig(path=str(p), columns={"instruction": "q"})) == [
        (f"{p} line 2", {"instruction": "new", "output": "a"})]


def test_format_mismatch_is_a_bad_row(tmp_path, tables):
    p = FIX / "alpaca.jsonl"
    src = SourceConfig(path=str(p), format="sharegpt")
    msg = (f"{p} line 1: format sharegpt needs 'conversations'; the row has keys input, instruction, output. Set "
           "data.path[].columns to map the source's fields to them, or format: auto")
    assert error(src) == msg
    bad: list[tuple[str, str]] = []
    assert rows(src, bad=bad) == [] and [w for w, _ in bad] == [f"{p} line 1", f"{p} line 3"]
    assert bad[0][1] == msg
    assert len(rows(src, check_format=False)) == 2
    t = tables / "rows.parquet"
    assert error(SourceConfig(path=str(t), format="messages")) == (
        f"{t}: format messages needs 'messages'; the source has columns question, answer. Set data.path[].columns "
        "to map its columns to them (e.g. columns: {messages: question}), or format: auto")


def test_folder_and_glob_read_files_sorted(tmp_path, tables):
    d = tmp_path / "data"
    (d / "b").mkdir(parents=True)
    (d / ".hidden").mkdir()
    shutil.copy(FIX / "alpaca.csv", d / "b" / "z.csv")
    shutil.copy(FIX / "alpaca.jsonl", d / "a.jsonl")
    shutil.copy(tables / "rows.parquet", d / "b" / "m.parquet")
    (d / "notes.txt").write_text("not data")
    (d / ".hidden" / "x.jsonl").write_text("broken")
    files = [d / "a.jsonl", d / "b" / "m.parquet", d / "b" / "z.csv"]
    assert source_files(SourceConfig(path=str(d))) == files
    got = rows(str(d))
    assert [w for w, _ in got] == [f"{d}/a.jsonl line 1", f"{d}/a.jsonl line 3", f"{d}/b/m.parquet index 0",
                                   f"{d}/b/m.parquet index 1", f"{d}/b/m.parquet index 2", f"{d}/b/z.csv line 2",
                                   f"{d}/b/z.csv line 3"]
    assert source_files(SourceConfig(path=f"{d}/**/*.csv")) == [d / "b" / "z.csv"]
    assert source_files(SourceConfig(path=f"{d}/*.jsonl")) == [d / "a.jsonl"]
    assert error(f"{d}/*") == (f"{d}/notes.txt: unsupported data file type '.txt' (matched by the glob '{d}/*'; "
                               f"narrow the glob, e.g. data/*.jsonl); {sources.SUPPORTED}")
    assert error(f"{d}/*.parquetx") == (f"data.path '{d}/*.parquetx': the glob matches no files; check the pattern "
                                        f"and the current directory ({Path.cwd()})")
    (tmp_path / "empty").mkdir()
    assert error(str(tmp_path / "empty")) == (f"data.path '{tmp_path / 'empty'}': the folder holds no data files; "
                                              f"{sources.SUPPORTED}")


def test_tilde_and_relative_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(FIX / "sharegpt.jsonl", tmp_path / "s.jsonl")
    assert source_files(SourceConfig(path="~/s.jsonl")) == [tmp_path / "s.jsonl"]
    monkeypatch.chdir(tmp_path)
    assert [w for w, _ in rows("s.jsonl")] == ["s.jsonl line 1", "s.jsonl line 2"]
    shutil.copy(FIX / "sharegpt.jsonl", tmp_path / "s[1].jsonl")  # glob characters in a real name
    assert source_files(SourceConfig(path="s[1].jsonl")) == [Path("s[1].jsonl")]


def test_broken_files_are_named(tmp_path):
    p = tmp_path / "bad.parquet"
    p.write_bytes(b"PAR1 this is not parquet")
    msg = error(str(p))
    assert msg.startswith(f"{p}: not a readable Parquet file (") and msg.endswith(
        "); re-export it (e.g. pandas' to_parquet / to_feather, or datasets' to_parquet)")
    a = tmp_path / "bad.arrow"
    a.write_bytes(b"garbage")
    assert error(str(a)).startswith(f"{a}: not a readable Arrow IPC (file or stream) file (")
    t = tmp_path / "d.txt"
    t.write_text("x")
    assert error(str(t)) == f"{t}: unsupported data file type '.txt'; {sources.SUPPORTED}"
    assert error(str(tmp_path / "nope.jsonl")) == (f"data file '{tmp_path / 'nope.jsonl'}' not found (no such file "
                                                   f"or folder; looked in {tmp_path / 'nope.jsonl'})")
    j = tmp_path / "d.jsonl"
    j.write_text('{"instruction": "q", "output": "a"}\n{"instruction": \n', encoding="utf-8")
    bad: list[tuple[str, str]] = []
    assert len(rows(str(j), bad=bad)) == 1
    assert bad == [(f"{j} line 2", f"{j} line 2: not valid JSON (Expecting value at column 17); each line must "
                                   "hold one JSON object")]
    e = tmp_path / "e.csv"
    e.write_text("instruction,output\n", encoding="utf-8")
    assert error(str(e)) == f"data.path '{e}': the source has no rows"


def test_save_to_disk_folders(tmp_path):
    import datasets

    one = tmp_path / "one"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(one))
    src = SourceConfig(path=str(one), columns={"instruction": "question", "output": "answer"})
    assert source_files(src) == [one]
    got = rows(src)
    assert got == [(f"{one} index {i}", r) for i, r in enumerate(ALPACA)]
    parses(got)
    assert count_hint(src) == 3
    both = tmp_path / "both"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]),
                          "test": datasets.Dataset.from_list(ROWS[2:])}).save_to_disk(str(both))
    assert rows(SourceConfig(path=str(both), split="test")) == [(f"{both} split test index 0", ROWS[2])]
    assert error(SourceConfig(path=str(both), split="dev")) == (
        f"{both}: no split 'dev' in this save_to_disk folder; it has train, test; set data.path[].split")
    f1 = fingerprint(SourceConfig(path=str(both)))
    assert f1 == fingerprint(SourceConfig(path=str(both))) != fingerprint(SourceConfig(path=str(both), split="test"))
    outer = tmp_path / "outer"
    outer.mkdir()
    shutil.copytree(one, outer / "ds")
    assert error(str(outer)) == (f"data.path '{outer}': the folder {outer / 'ds'} was written by datasets' "
                                 "save_to_disk; give it as a source of its own, not inside a folder of data files")


def test_fingerprint_follows_bytes_and_names(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    shutil.copy(FIX / "alpaca.jsonl", d / "a.jsonl")
    shutil.copy(FIX / "alpaca.csv", d / "b.csv")
    src = SourceConfig(path=str(d))
    first = fingerprint(src)
    assert len(first) == 32 and int(first, 16) >= 0
    assert fingerprint(src) == first == fingerprint(SourceConfig(path=str(d), weight=2))
    moved = tmp_path / "moved"
    shutil.copytree(d, moved)
    assert fingerprint(SourceConfig(path=str(moved))) == first  # content, not the folder's place
    data = bytearray((d / "b.csv").read_bytes())
    data[-3] ^= 1
    (d / "b.csv").write_bytes(bytes(data))
    changed = fingerprint(src)
    assert changed != first
    (d / "b.csv").rename(d / "c.csv")
    assert fingerprint(src) not in (first, changed)
    assert fingerprint(SourceConfig(path=str(d / "a.jsonl"))) != fingerprint(SourceConfig(path=str(d / "c.csv")))


def test_hub_rows_and_fingerprint(monkeypatch):
    import datasets

    calls = []

    def fake(name, subset=None, *, split, revision):
        calls.append((name, subset, split, revision))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.setattr(sources, "_hub_cache", {})
    src = SourceConfig(hub="org/qa", subset="en", revision="v1",
                       columns={"instruction": "question", "output": "answer"}, format="alpaca")
    got = rows(src)
    assert got == [(f"hub:org/qa index {i}", r) for i, r in enumerate(ALPACA)]
    parses(got)
    assert calls == [("org/qa", "en", "train", "v1")]
    fp = fingerprint(src)
    assert fp == fingerprint(src) != fingerprint(SourceConfig(hub="org/qa", subset="en", revision="v2"))
    assert count_hint(src) == 3 and source_files(src) == []


def test_hub_without_network_is_a_clean_error(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(sources, "_hub_cache", {})
    msg = error(SourceConfig(hub="someorg/not-here", subset="en"))
    assert msg.startswith("data.path hub 'someorg/not-here' subset 'en' split 'train': could not load it (")
    assert msg.endswith("Check the id, subset, split and revision; without network access here, on a machine with "
                        "access run datasets.load_dataset('someorg/not-here', 'en', split='train')"
                        ".save_to_disk('FOLDER') (or .to_parquet('FILE.parquet')), copy it here and give that path "
                        "instead")
    with pytest.raises(UserError):
        fingerprint(SourceConfig(hub="someorg/not-here"))


@pytest.mark.parametrize("name", ["alpaca.jsonl", "messages.json", "sharegpt.jsonl"])
def test_iter_records_matches_read_records(name):
    assert list(iter_records(FIX / name)) == read_records(FIX / name)


def test_jsonl_invalid_utf8_names_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"instruction": "q", "output": "a"}\r\n{"instruction": "\xc3", "output": "a"}\n')
    assert error(str(p)) == f"{p} line 2: invalid UTF-8 (byte 18 of the line); re-save the file as UTF-8"


def test_rows_are_read_lazily(tmp_path):
    """A broken line late in a file is only met when reading gets there: the first rows come before it."""
    p = tmp_path / "big.jsonl"
    p.write_text(json.dumps(ALPACA[0]) + "\n" + "{broken\n", encoding="utf-8")
    it = iter_rows(SourceConfig(path=str(p)))
    assert next(it) == (f"{p} line 1", ALPACA[0])
    with pytest.raises(UserError, match="line 2: not valid JSON"):
        next(it)
