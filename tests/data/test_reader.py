"""reader: JSON that Python's json module refuses with something other than JSONDecodeError (deep nesting, huge
integers) is a UserError naming file and line; large JSON arrays read in linear time; offsets count the BOM."""
from __future__ import annotations

import json
import sys
import time

import pytest

from domaintune.data.examples import load_examples
from domaintune.data.reader import read_records
from domaintune.errors import UserError

GOOD = json.dumps({"instruction": "q", "output": "a"})
DEEP = "[" * 100_000 + "]" * 100_000
LONG_INT = "1" * (sys.get_int_max_str_digits() + 1)


def _read_error(p) -> str:
    with pytest.raises(UserError) as e:
        read_records(p)
    return str(e.value)


@pytest.mark.parametrize("value, problem", [
    (DEEP, "JSON nested too deeply to read (Python's json module stops at about 1000 levels)"),
    ('{"instruction": "q", "output": "a", "x": ' + DEEP + "}",
     "JSON nested too deeply to read (Python's json module stops at about 1000 levels)"),
    ('{"instruction": "q", "output": "a", "n": ' + LONG_INT + "}",
     f"a number with more than {sys.get_int_max_str_digits()} digits; write it as a string"),
])
@pytest.mark.parametrize("layout", ["jsonl", "array"])
def test_json_the_parser_refuses_is_a_user_error(tmp_path, value, problem, layout):
    """Regression: deep nesting raised RecursionError and a >4300-digit integer raised ValueError (Python's
    int-string limit), both tracebacks instead of an error naming the file and the line."""
    if layout == "jsonl":
        p = tmp_path / "d.jsonl"
        p.write_text(GOOD + "\n\n" + value + "\n", encoding="utf-8")
        assert _read_error(p) == f"{p} line 3: not valid JSON ({problem}); each line must hold one JSON object"
    else:
        p = tmp_path / "d.json"
        p.write_text("[\n" + GOOD + ",\n\n" + value + "\n]", encoding="utf-8")
        assert _read_error(p) == f"{p} line 4: not valid JSON ({problem})"
    with pytest.raises(UserError):
        load_examples(p, require_answer=False)


def test_large_json_array_reads_in_linear_time(tmp_path):
    """Regression: every row of a JSON array recounted the newlines from the start of the file (quadratic): 50,000
    rows (2 MB) took 26 s to read, and a 200,000-row file minutes."""
    p = tmp_path / "d.json"
    rows = [{"instruction": f"q{k}", "output": "a"} for k in range(50_000)]
    p.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n", encoding="utf-8")
    start = time.perf_counter()
    got = read_records(p)
    assert time.perf_counter() - start < 5  # about 0.1 s now
    assert [n for n, _ in got[:3]] == [2, 3, 4] and got[-1] == (50_001, rows[-1])


def test_invalid_utf8_offset_counts_the_bom(tmp_path):
    """Regression: the byte offset was counted after the BOM, 3 bytes short of where the byte is in the file."""
    p = tmp_path / "d.jsonl"
    body = (GOOD + "\n").encode() + b'{"instruction": "\xff", "output": "a"}\n'
    p.write_bytes(b"\xef\xbb\xbf" + body)
    offset = 3 + body.index(b"\xff")
    assert _read_error(p) == f"{p} line 2: invalid UTF-8 (byte offset {offset}); re-save the file as UTF-8"
    p.write_bytes(body)
    assert _read_error(p) == f"{p} line 2: invalid UTF-8 (byte offset {offset - 3}); re-save the file as UTF-8"


def test_broken_json_and_bad_rows_are_reported_together(tmp_path):
    """Regression (issue 22, 31): the first broken JSON line stopped reading, so its invalid rows were named only
    on the next run, after the JSON was fixed. Now every problem of the file comes in one error, in line order."""
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join([GOOD, '{"instruction": "no answer"}', '{"instruction": "x", "output": ', GOOD,
                            '{"output": "no question"}', "not json"]) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_examples(p)
    assert str(e.value).split("\n  ") == [
        "4 invalid row(s); fix them and run again:",
        f'{p} line 2: missing "output"',
        f"{p} line 3: not valid JSON (Expecting value at column 32); each line must hold one JSON object",
        f"{p} line 5: missing \"instruction\" (or \"messages\"); found fields ['output']",
        f"{p} line 6: not valid JSON (Expecting value at column 1); each line must hold one JSON object"]
    # A broken JSON array: the rows before the break are checked too (the rows after it cannot be found).
    a = tmp_path / "d.json"
    a.write_text('[\n{"instruction": "no answer"},\n{"instruction": "x", "output": }\n]', encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_examples(a)
    assert str(e.value).split("\n  ") == ["2 invalid row(s); fix them and run again:", f'{a} line 2: missing "output"',
                                          f"{a} line 3: not valid JSON (Expecting value at column 32)"]
    # One broken line and nothing else keeps the reader's own one-line message.
    p.write_text(GOOD + "\nnot json\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_examples(p)
    assert str(e.value) == (f"{p} line 2: not valid JSON (Expecting value at column 1); "
                            "each line must hold one JSON object")
