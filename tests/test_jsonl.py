"""jsonl: kill-safe JSON-lines files (training logs, predictions, gen-data's working files)."""
from __future__ import annotations

import errno
import os

import pytest

from domaintune.errors import UserError
from domaintune.jsonl import (
    JsonlAppender,
    disk_error,
    read_jsonl,
    repair_tail,
    write_atomic,
    write_failure,
    write_jsonl_atomic,
)


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


@pytest.fixture
def fsyncs(monkeypatch, tmp_path):
    """Every os.fsync call as (inode of the synced file, its bytes at that moment, read by name from tmp_path)."""
    calls: list[tuple[int, bytes]] = []
    real = os.fsync

    def spy(fd):
        real(fd)
        inode = os.fstat(fd).st_ino
        calls.append((inode, next(f.read_bytes() for f in tmp_path.iterdir() if f.stat().st_ino == inode)))

    monkeypatch.setattr(os, "fsync", spy)
    return calls


def test_each_append_is_flushed_and_fsynced_before_write_returns(tmp_path, fsyncs):
    p = tmp_path / "log.jsonl"
    with JsonlAppender(p) as f:
        inode = p.stat().st_ino
        f.write({"step": 1})
        # the record was on the file (flushed) when the file itself was fsynced, before write returned
        assert fsyncs == [(inode, b'{"step": 1}\n')]
        f.write_many([{"step": 2}, {"step": 3}])
        assert fsyncs[1:] == [(inode, b'{"step": 1}\n{"step": 2}\n{"step": 3}\n')]


def test_a_rewrite_goes_through_a_synced_temp_file_and_one_rename(tmp_path, fsyncs, monkeypatch):
    p = tmp_path / "train.jsonl"
    p.write_bytes(b'{"old": 1}\n')
    renames = []
    real_replace = os.replace

    def replace(src, dst):
        # at the rename the new text is complete and synced in the temp file, and `p` still holds the old one
        renames.append((os.path.basename(src), os.path.basename(dst), p.read_bytes()))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    write_jsonl_atomic(p, [{"new": 1}, {"new": 2}])
    assert renames == [("train.jsonl.tmp", "train.jsonl", b'{"old": 1}\n')]
    assert fsyncs == [(p.stat().st_ino, b'{"new": 1}\n{"new": 2}\n')]  # the renamed file, complete when synced
    assert p.read_bytes() == b'{"new": 1}\n{"new": 2}\n'
    assert [x.name for x in tmp_path.iterdir()] == ["train.jsonl"]


def test_a_rewrite_that_fails_midway_keeps_the_old_file_whole(tmp_path, monkeypatch):
    p = tmp_path / "metrics.json"
    p.write_text("old, complete\n", encoding="utf-8")
    with pytest.raises(UnicodeEncodeError):  # fails while writing: half of the new text is out
        write_atomic(p, "new " * 10_000 + "\ud800")
    assert p.read_text(encoding="utf-8") == "old, complete\n"

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)  # the disk fills up before the new text is safe
    with pytest.raises(OSError) as e:
        write_atomic(p, "new " * 10_000)
    assert e.value.filename == str(p)  # named: the error message can say which file
    assert p.read_text(encoding="utf-8") == "old, complete\n"
    assert [x.name for x in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left behind


def test_a_failed_append_names_its_file(tmp_path, monkeypatch):
    p = tmp_path / "predictions.jsonl"
    with JsonlAppender(p) as f:
        monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
        with pytest.raises(OSError) as e:
            f.write({"id": 1})
    assert e.value.filename == str(p)


@pytest.mark.parametrize("error, why", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "Disk quota exceeded"),
    (OSError(errno.EROFS, "Read-only file system"), "Read-only file system"),
    (PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
    # safetensors' SafetensorError and tokenizers' errors carry Rust's io::Error, errno in the text
    (Exception("Error while serializing: I/O error: No space left on device (os error 28)"),
     os.strerror(errno.ENOSPC)),
    (OSError("1000000 requested and 262144 written"), "the disk is full (only part of the data could be written)"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
     "the write failed, most likely on a full disk"),
    (RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0: "
                  "file write failed"), "the write failed, most likely on a full disk"),
    (OSError(errno.EIO, "Input/output error"), None),  # not cured by space or permissions: a traceback
    (Exception("I/O error: Input/output error (os error 5)"), None),
    (RuntimeError("CUDA out of memory"), None),
    (ValueError("bad value"), None),
])
def test_write_failure_recognises_a_full_or_forbidden_disk(error, why):
    assert write_failure(error) == why


def test_disk_error_is_one_line_naming_the_file_and_what_to_do(tmp_path):
    e = OSError(errno.ENOSPC, "No space left on device")
    e.filename = str(tmp_path / "predictions.jsonl")
    err = disk_error(e, None, "Free some space and run the same command again.")
    assert str(err) == f"'{tmp_path / 'predictions.jsonl'}': No space left on device. Free some space and run the " \
                       "same command again."
    err = disk_error(Exception("I/O error: No space left on device (os error 28)"), tmp_path / "out", "Rerun.")
    assert str(err) == f"'{tmp_path / 'out'}': No space left on device. Rerun."
    assert disk_error(ValueError("x"), tmp_path, "Rerun.") is None
