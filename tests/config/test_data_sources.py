"""`data.path` / `data.eval_path` as one source or a list: the forms a user writes, and the errors that name the
source and key at fault."""
from __future__ import annotations

import pytest

from domaintune.config import build_config, explain
from domaintune.errors import UserError


def data(**d):
    return build_config({"data": d}, "cfg.yaml").data


def test_a_path_a_mapping_or_a_list():
    assert [(s.path, s.amount) for s in data(path="a.jsonl").sources] == [("a.jsonl", "all rows")]
    one = data(path={"hub": "org/set", "subset": "zh", "split": "test", "revision": "v1", "rows": 5}).sources
    assert [(s.hub, s.subset, s.split, s.revision, s.label, s.amount) for s in one] == [
        ("org/set", "zh", "test", "v1", "hub:org/set", "5 rows")]
    cfg = data(path=["a.jsonl", {"path": "b.csv", "weight": 2, "columns": {"output": "answer"}, "name": "curated"}],
               eval_path=["t.parquet"])
    assert [(s.label, s.amount, s.columns) for s in cfg.sources] == [("a.jsonl", "all rows", {}),
                                                                     ("curated", "weight 2", {"output": "answer"})]
    assert cfg.path_label == "a.jsonl + curated" and [s.path for s in cfg.eval_sources] == ["t.parquet"]
    assert data(path="a.jsonl").eval_sources == []


@pytest.mark.parametrize(("path", "message"), [
    ([{"path": "a", "weight": 1, "rows": 2}, {"path": "b", "wieght": 2}],
     "source 1 of the list: give at most one of weight, rows and fraction (got weight and rows) | source 2 of the "
     "list: unknown key 'wieght' (a source takes path, hub, subset, split, revision, format, columns, weight, rows, "
     "fraction, name)"),
    ({"path": "a", "hub": "x/y"}, "give exactly one of path (a local file, folder or glob) and hub"),
    ([{"path": "a", "fraction": 0}], "source 1 of the list: fraction: Input should be greater than 0"),
    ([{"path": "a", "format": "csv"}], "source 1 of the list: format: Input should be 'auto', 'alpaca'"),
    ([], "an empty list names no data; give at least one source"),
    ([3], "source 1 of the list: expected a path (text) or a mapping with path or hub, got int"),
])
def test_a_bad_source_is_named_by_its_place(path, message):
    with pytest.raises(UserError) as e:
        data(path=path)
    assert "'data.path'" in str(e.value) and message in str(e.value)


def test_explain_lists_the_keys_of_a_source():
    lines = explain()
    for key in ("path", "hub", "subset", "split", "revision", "format", "columns", "weight", "rows", "fraction",
                "name"):
        assert any(x.startswith(f"data.path[].{key} = ") for x in lines), key
    for key in ("dedup", "exclude", "near_threshold", "streaming", "num_proc", "cache", "cache_dir"):
        assert any(x.startswith(f"data.{key} = ") for x in lines), key
