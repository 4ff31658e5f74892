"""Row validation names every bad field of a row in one message (file, line, field), and rows that would only fail
later (a null instruction, text that is not valid Unicode) fail here, with the row named."""
from __future__ import annotations

import json

import pytest

from domaintune.data.examples import MAX_PROBLEMS_SHOWN, load_examples, parse_example
from domaintune.errors import UserError

GOOD = {"instruction": "q", "output": "a"}


def _errors(path, require_answer=True) -> list[str]:
    """The per-row lines of load_examples' error (after its "N invalid row(s)" header)."""
    with pytest.raises(UserError) as e:
        load_examples(path, require_answer=require_answer)
    head, *rows = str(e.value).split("\n  ")
    assert head.endswith("invalid row(s); fix them and run again:")
    return rows


def _jsonl(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                 encoding="utf-8")
    return p


def test_every_bad_field_of_a_row_is_named(tmp_path):
    """Regression: only the first bad field was reported, so fixing a row took one run per field."""
    p = _jsonl(tmp_path, [GOOD, {"instruction": 1, "input": [2], "output": 3, "system": False}])
    assert _errors(p) == [f'{p} line 2: "instruction" must be a string, got a number; '
                          '"input" must be a string, got a list; "output" must be a string, got a number; '
                          '"system" must be a string, got true/false']


def test_type_blank_and_history_problems_together(tmp_path):
    p = _jsonl(tmp_path, [{"instruction": " ", "output": "\n", "history": [["q1", "a1"], ["q2"], ["", "a3"]]}])
    assert _errors(p) == [f'{p} line 1: "instruction" is blank; "output" is blank; every training row needs an '
                          'answer; "history"[1] must be a [question, answer] pair of strings; '
                          '"history"[2] has a blank question or answer']


def test_problems_are_listed_field_by_field(tmp_path):
    p = _jsonl(tmp_path, [{"instruction": " ", "output": 5, "input": None, "system": 1}])
    assert _errors(p) == [f'{p} line 1: "instruction" is blank; "output" must be a string, got a number; '
                          '"system" must be a string, got a number']


def test_missing_instruction_and_a_bad_field(tmp_path):
    p = _jsonl(tmp_path, [{"input": "x", "output": 5}])
    assert _errors(p) == [f'{p} line 1: missing "instruction" (or "messages"); found fields [\'input\', \'output\']; '
                          '"output" must be a string, got a number']


def test_a_row_in_both_formats_is_refused(tmp_path):
    """Regression (issue 22, 19): "messages" won and the instruction/output of the same row were dropped silently."""
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    p = _jsonl(tmp_path, [GOOD, {"messages": msgs, "instruction": "other q", "output": "other a"}])
    assert _errors(p) == [f'{p} line 2: "messages" and "instruction" and "output" in one row: use one format per '
                          'row, "messages" or "instruction"/"input"/"output"']


def test_every_bad_message_is_named(tmp_path):
    row = {"messages": [{"role": "user", "content": 1}, {"role": "bot", "content": "a"},
                        {"role": "user", "content": " "}, "hi"]}
    p = _jsonl(tmp_path, [row])
    assert _errors(p) == [f"{p} line 1: messages[0].content must be a string, got a number; "
                          "messages[1].role 'bot' is not one of system/user/assistant/tool; "
                          "messages[2].content is blank; messages[3] must be an object, got a string"]


def test_many_problems_in_one_row_are_capped(tmp_path):
    row = {"messages": [{"role": "user", "content": k} for k in range(MAX_PROBLEMS_SHOWN + 3)]}
    p = _jsonl(tmp_path, [row])
    shown = "; ".join(f"messages[{k}].content must be a string, got a number" for k in range(MAX_PROBLEMS_SHOWN))
    assert _errors(p) == [f"{p} line 1: {shown}; and 3 more"]


def test_single_problem_message_is_unchanged(tmp_path):
    p = _jsonl(tmp_path, [GOOD, {"instruction": "q", "output": 5}])
    assert _errors(p) == [f'{p} line 2: "output" must be a string, got a number']


@pytest.mark.parametrize("require_answer", [True, False])
def test_null_instruction_is_a_row_error(tmp_path, require_answer):
    """Regression: `"instruction": null` passed the type check (null was allowed for every text field) and then
    crashed with AttributeError ('NoneType' object has no attribute 'strip'), a traceback with no row named."""
    p = _jsonl(tmp_path, [GOOD, {"instruction": None, "output": "a"}])
    assert _errors(p, require_answer) == [f'{p} line 2: "instruction" must be a string, got null']


@pytest.mark.parametrize("row, problem", [
    ('{"instruction": "q\\ud83d", "output": "a"}',
     '"instruction" holds \\ud83d, half of a UTF-16 surrogate pair (not valid Unicode) at character 1'),
    ('{"instruction": "q", "output": "\\udc00ok", "system": "s\\ud800"}',
     '"output" holds \\udc00, half of a UTF-16 surrogate pair (not valid Unicode) at character 0; '
     '"system" holds \\ud800, half of a UTF-16 surrogate pair (not valid Unicode) at character 1'),
    ('{"instruction": "q", "output": "a", "history": [["\\ud800", "a1"]]}',
     '"history"[0][0] holds \\ud800, half of a UTF-16 surrogate pair (not valid Unicode) at character 0'),
    ('{"messages": [{"role": "user", "content": "\\udfff"}, {"role": "assistant", "content": "a"}]}',
     "messages[0].content holds \\udfff, half of a UTF-16 surrogate pair (not valid Unicode) at character 0"),
])
def test_unpaired_surrogate_escapes_are_row_errors(tmp_path, row, problem):
    """Regression: a JSON escape such as "\\ud83d" without its second half (a cut emoji) was accepted, and the
    tokenizer then failed with a TypeError (and writing predictions with UnicodeEncodeError), no row named."""
    p = _jsonl(tmp_path, [GOOD, row])
    assert _errors(p) == [f"{p} line 2: {problem}; fix the \\u escape (write the whole character, or both halves)"]


def test_a_surrogate_pair_written_as_two_escapes_is_fine(tmp_path):
    p = _jsonl(tmp_path, ['{"instruction": "q \\ud83d\\ude00", "output": "a"}'])
    assert load_examples(p)[0].messages[0]["content"] == "q \U0001F600"


def test_huge_values_are_shortened_in_messages():
    """A field dump must not turn one bad row into a megabyte of error text."""
    with pytest.raises(UserError) as e:
        parse_example({"messages": [{"role": "x" * 10_000, "content": "a"}]}, "d line 1")
    assert len(str(e.value)) < 200 and "..." in str(e.value)
    with pytest.raises(UserError) as e:
        parse_example({f"k{k}": 1 for k in range(1000)}, "d line 1")
    assert len(str(e.value)) < 300 and "and 990 more" in str(e.value)
