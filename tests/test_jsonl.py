"""jsonl: kill-safe JSON-lines files (training logs, predictions, gen-data's working files)."""
from __future__ import annotations

import pytest

from domaintune.errors import UserError
from domaintune.jsonl import JsonlAppender, read_jsonl, repair_tail, write_jsonl_atomic


def test_torn_last_line_is_dropped_even_inside_a_multibyte_character(tmp_path):
    p = tmp_path / "log.jsonl"
    # a writer killed halfway through "字" (3 UTF-8 bytes): regression, this raised UnicodeDecodeError
    p.write_bytes(b'{"step": 1}\n{"step": 2, "note": "\xe5\xad')
    assert read_jsonl(p) == [{"step": 1}]


def test_torn_json_without_newline_is_dropped_and_complete_lines_kept(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo', encoding="utf-8")
    assert read_jsonl(p) == [{"step": 1}, {"step": 2}]
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_reading_never_modifies_the_file(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_bytes(b'{"step": 1}\n{"st')
    read_jsonl(p)
    assert p.read_bytes() == b'{"step": 1}\n{"st'  # a live writer may still be finishing that line


def test_a_bad_line_in_the_middle_names_file_line_and_fix(tmp_path):
    p = tmp_path / "answers.jsonl"
    p.write_text('{"a": 1}\nnot json\n{"a": 2}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"answers.jsonl line 2: not valid JSON .*; delete it"):
        read_jsonl(p, fix_hint="delete it")
    p.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"line 2: expected a JSON object"):
        read_jsonl(p)


def test_repair_tail_cuts_a_torn_record_and_keeps_a_whole_one(tmp_path):
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(b'{"q": "a"}\n{"q": "\xe5\xad')
    assert repair_tail(torn) is True
    assert torn.read_bytes() == b'{"q": "a"}\n'
    whole = tmp_path / "whole.jsonl"
    whole.write_bytes(b'{"q": "a"}\n{"q": "b"}')  # complete, only the newline was lost
    assert repair_tail(whole) is False
    assert whole.read_bytes() == b'{"q": "a"}\n{"q": "b"}\n'
    assert repair_tail(tmp_path / "missing.jsonl") is False


def test_appender_repairs_then_appends_complete_lines(tmp_path):
    p = tmp_path / "questions.jsonl"
    p.write_bytes(b'{"q": 1}\n{"q": 2')
    with JsonlAppender(p) as f:
        f.write({"q": "三"})
        f.write_many([{"q": 4}, {"q": 5}])
    assert read_jsonl(p) == [{"q": 1}, {"q": "三"}, {"q": 4}, {"q": 5}]
    assert p.read_text(encoding="utf-8").endswith("\n")


def test_write_jsonl_atomic_leaves_no_temp_file(tmp_path):
    p = tmp_path / "train.jsonl"
    write_jsonl_atomic(p, [{"instruction": "问", "output": "答"}])
    assert p.read_text(encoding="utf-8") == '{"instruction": "问", "output": "答"}\n'
    assert [x.name for x in tmp_path.iterdir()] == ["train.jsonl"]
