"""rundir: the run-directory helpers every verb reads through."""
from __future__ import annotations

import json

from domaintune.rundir import RunDir, read_jsonl_tolerant


def test_torn_last_line_is_dropped_even_inside_a_multibyte_character(tmp_path):
    p = tmp_path / "log.jsonl"
    # a writer killed halfway through "字" (3 UTF-8 bytes): regression, this raised UnicodeDecodeError
    p.write_bytes(b'{"step": 1}\n{"step": 2, "note": "\xe5\xad')
    assert read_jsonl_tolerant(p) == [{"step": 1}]


def test_torn_json_without_newline_is_dropped_and_complete_lines_kept(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo', encoding="utf-8")
    assert read_jsonl_tolerant(p) == [{"step": 1}, {"step": 2}]
    assert read_jsonl_tolerant(tmp_path / "missing.jsonl") == []


def test_write_json_is_atomic_and_round_trips(tmp_path):
    run = RunDir(tmp_path)
    run.write_json("run_info.json", {"license": "apache-2.0", "名": 1})
    assert run.run_info() == {"license": "apache-2.0", "名": 1}
    assert not list(tmp_path.glob("*.tmp"))
    assert json.loads((tmp_path / "run_info.json").read_text(encoding="utf-8"))["名"] == 1


def test_weights_detection(tmp_path):
    run = RunDir(tmp_path)
    assert not run.has_weights()
    (tmp_path / "adapter_config.json").write_text("{}")
    assert not run.has_adapter()  # config alone is not an adapter
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x")
    assert run.has_adapter() and run.has_weights() and not run.has_full_model()
