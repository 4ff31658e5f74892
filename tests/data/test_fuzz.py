"""Fuzzing the reader and the row validator (`read_records`, `load_examples` with and without `require_answer`).

Inputs: random bytes (BOM, CRLF, invalid UTF-8, NUL, U+2028 and JSON fragments mixed in), any JSON value as a
whole file, and JSON-lines files / JSON arrays built from random objects, many shaped like real rows with random
field types. Property: the result is a list of valid Examples (messages in the documented shape: an optional
system message first, then user/assistant turns alternating from user, non-blank, valid Unicode; ending with an
answer when one is required), or a UserError naming the file and, for row problems, a line that exists. Never
another exception, never slow (each example has a deadline).

Derandomized, so CI runs the same examples every time; about 10 s on a 2-core machine. Defects found here have
their own regression tests (test_reader.py, test_row_problems.py).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domaintune.data.examples import MAX_ERRORS_SHOWN, ROLES, load_examples
from domaintune.data.reader import read_records
from domaintune.errors import UserError

FUZZ = settings(max_examples=400, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SPECIAL = ["", " ", "\n", "\r\n", "\t", "\x00", "\u2028", "\u2029", "\x85", "\ufeff", "\ud83d", "\udc00", "😀",
           "孩子", "{input}", "{instruction}", "user", "assistant", "system"]
TEXT = st.one_of(st.sampled_from(SPECIAL), st.text(st.characters(exclude_categories=()), max_size=10))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), TEXT)
JSON = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(TEXT, kids, max_size=4),
                    max_leaves=10)
# Valid text: not blank, and no think tags (an answer starting with an unclosed <think> is an error by design).
GOOD_TEXT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12).filter(
    lambda t: t.strip() and "<think>" not in t and "</think>" not in t)
FIELD = st.one_of(st.none(), TEXT, GOOD_TEXT, JSON)

INSTRUCTION_ROW = st.fixed_dictionaries({}, optional={
    "instruction": FIELD, "input": FIELD, "output": FIELD, "system": FIELD,
    "history": st.one_of(JSON, st.lists(st.lists(FIELD, max_size=3), max_size=3)),
})
MESSAGE = st.one_of(JSON, st.fixed_dictionaries({}, optional={
    "role": st.one_of(st.sampled_from([*ROLES, *ROLES, "bot", "User"]), JSON), "content": FIELD}))
MESSAGES_ROW = st.fixed_dictionaries({"messages": st.one_of(JSON, st.lists(MESSAGE, max_size=5))})
VALID_ROW = st.one_of(
    st.fixed_dictionaries({"instruction": GOOD_TEXT, "output": GOOD_TEXT}, optional={
        "input": st.one_of(st.none(), st.sampled_from(["", " ", "\n", "\u2028"]), GOOD_TEXT),
        "system": st.one_of(st.none(), st.just(""), GOOD_TEXT),
        "history": st.lists(st.tuples(GOOD_TEXT, GOOD_TEXT).map(list), max_size=2)}),
    st.builds(lambda system, texts: {"messages": ([{"role": "system", "content": system}] if system else [])
                                     + [{"role": ROLES[1 + k % 2], "content": t} for k, t in enumerate(texts)]},
              st.one_of(st.none(), GOOD_TEXT),
              st.integers(1, 3).flatmap(lambda n: st.lists(GOOD_TEXT, min_size=2 * n, max_size=2 * n))),
)


@st.composite
def near_valid_rows(draw: st.DrawFn) -> dict:
    """A valid row with one or two of its fields (or one message's role or content) replaced or removed."""
    row = draw(VALID_ROW)
    if "messages" in row:
        m = draw(st.sampled_from(row["messages"]))
        key = draw(st.sampled_from(["role", "content"]))
    else:
        m, key = row, draw(st.sampled_from(["instruction", "input", "output", "system", "history"]))
    if draw(st.booleans()):
        m[key] = draw(FIELD)
    else:
        m.pop(key, None)
    return row


ROW = st.one_of(near_valid_rows(), near_valid_rows(), INSTRUCTION_ROW, MESSAGES_ROW, VALID_ROW, JSON)

PIECES = [b"\xef\xbb\xbf", b"\r\n", b"\n", b"\r", b"\xff", b"\xc3", b"\xed\xa0\xbd", b"\x00", "\u2028".encode(),
          "\u2029".encode(), b"\xc2\x85", b"[", b"]", b"{", b"}", b",", b":", b'"', b" ", b"\\", b"\\ud83d", b"null",
          b"1e999", b"-0", b'"instruction"', b'"output"', b'"messages"', b'"role"', b'"content"', b'"user"',
          b'"assistant"', "孩子".encode(), b'{"instruction": "q", "output": "a"}', b"[" * 1100, b"{\"a\":" * 1100,
          b"9" * 4400]
RAW = st.lists(st.one_of(st.sampled_from(PIECES), st.binary(max_size=6)), max_size=30).map(b"".join)


@st.composite
def row_files(draw: st.DrawFn, rows: st.SearchStrategy = ROW) -> bytes:
    """A JSON-lines file or a JSON array of `rows`: BOM, CRLF, blank lines and escaping drawn at random."""
    values = draw(st.lists(rows, max_size=6))
    ascii_ = draw(st.booleans())
    nl = draw(st.sampled_from(["\n", "\r\n"]))
    if draw(st.booleans()):
        body = json.dumps(values, ensure_ascii=ascii_, indent=draw(st.sampled_from([None, 0, 2]))).replace("\n", nl)
    else:
        lines = []
        for v in values:
            lines += [""] * draw(st.integers(0, 1)) + [json.dumps(v, ensure_ascii=ascii_)]
        body = nl.join(lines) + draw(st.sampled_from(["", nl]))
    bom = b"\xef\xbb\xbf" if draw(st.booleans()) else b""
    return bom + body.encode("utf-8", "surrogatepass")  # unpaired surrogates become invalid UTF-8 bytes


@pytest.fixture(scope="module")
def fuzz_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "d.jsonl"


def _check_error(msg: str, path: Path, n_lines: int) -> None:
    """A UserError from a file that exists: a file-level problem named with the file, or row problems each naming
    the file and a line that exists in it."""
    p = str(path)
    if msg in (f"{p}: the file is empty; it needs at least one row",
               f"{p}: the JSON array is empty; it needs at least one row"):
        return
    m = re.fullmatch(r"(\d+) invalid row\(s\); fix them and run again:\n(.*)", msg, re.S)
    if m:
        count, lines = int(m.group(1)), m.group(2).split("\n")
        more = count - MAX_ERRORS_SHOWN
        assert len(lines) == min(count, MAX_ERRORS_SHOWN) + (more > 0), msg
        if more > 0:
            assert lines.pop() == f"  ... and {more} more"
        lines = [line.removeprefix("  ") for line in lines]
    else:
        lines = [msg]
    for line in lines:
        found = re.match(re.escape(p) + r" line (\d+): \S", line)
        assert found, f"no file and line in: {line!r}"
        assert 1 <= int(found.group(1)) <= n_lines, line


def _check_messages(msgs: list, require_answer: bool) -> None:
    assert isinstance(msgs, list) and msgs
    for m in msgs:
        assert isinstance(m, dict) and set(m) == {"role", "content"} and m["role"] in ROLES
        assert isinstance(m["content"], str)
        m["content"].encode("utf-8")  # valid Unicode: the tokenizer and the jsonl writers accept it
    turns = msgs[1:] if msgs[0]["role"] == "system" else msgs
    assert turns and [m["role"] for m in turns] == [("user", "assistant")[k % 2] for k in range(len(turns))]
    assert all(m["content"].strip() for m in turns)
    if require_answer:
        assert turns[-1]["role"] == "assistant"


def check(path: Path, data: bytes) -> list[list]:
    """Write `data` to `path`, read it every way; return the examples' messages for (require_answer True, False)
    ([] where the file was refused)."""
    path.write_bytes(data)
    n_lines = data.count(b"\n") + 1
    try:
        records = read_records(path)
    except UserError as e:
        _check_error(str(e), path, n_lines)
        records = None
    out = []
    for require_answer in (True, False):
        try:
            examples = load_examples(path, require_answer=require_answer)
        except UserError as e:
            _check_error(str(e), path, n_lines)
            out.append([])
            continue
        assert records is not None
        assert [(ex.where, ex.index) for ex in examples] == [(f"{path} line {n}", k) for k, (n, _) in
                                                             enumerate(records)]
        for ex in examples:
            _check_messages(ex.messages, require_answer)
        out.append([ex.messages for ex in examples])
    if out[0]:
        assert out[1] == out[0]  # a file good for training reads the same for prediction
    return out


@FUZZ
@given(data=RAW)
def test_fuzz_random_bytes(fuzz_path, data):
    check(fuzz_path, data)


@FUZZ
@given(value=JSON, bom=st.booleans(), ascii_=st.booleans())
def test_fuzz_any_json_value_as_the_file(fuzz_path, value, bom, ascii_):
    text = json.dumps(value, ensure_ascii=ascii_)
    check(fuzz_path, (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(data=row_files())
def test_fuzz_files_of_row_like_objects(fuzz_path, data):
    check(fuzz_path, data)


@FUZZ
@given(data=row_files(VALID_ROW))
def test_fuzz_valid_rows_always_load(fuzz_path, data):
    """The positive half: rows valid by construction load, in every layout, one Example per row."""
    body = data.removeprefix(b"\xef\xbb\xbf").strip()
    if body in (b"", b"[]"):
        return
    rows = json.loads(body) if body.startswith(b"[") else [json.loads(line) for line in body.splitlines() if line]
    train, predict = check(fuzz_path, data)
    assert len(train) == len(predict) == len(rows)
