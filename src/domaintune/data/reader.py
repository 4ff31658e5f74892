"""Reading data files: JSON lines or a JSON array, each row with the line it came from.

The one reader of data files in the project (training data, test files, predictions, seed questions):
a UTF-8 BOM, CRLF line ends and blank lines are fine; invalid UTF-8, broken JSON and an empty file are
errors that name the file and the line. So is JSON that Python's json module refuses for other reasons:
nesting deeper than the interpreter's recursion limit, and integers longer than `sys.get_int_max_str_digits()`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..errors import UserError


def read_records(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, parsed JSON value) for each row of a JSON-lines file or a JSON array file.

    Accepts a UTF-8 BOM, CRLF line ends and blank lines. Raises UserError naming the file and line
    for invalid UTF-8, broken JSON and an empty file.

    JSON lines are split on "\n" only (a trailing "\r" is dropped): `json.dumps(..., ensure_ascii=False)`
    writes U+2028, U+2029 and U+0085 raw inside strings, and `str.splitlines()` would break rows there.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data file '{p}' not found")
    raw = p.read_bytes()
    bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    try:
        text = raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: bom + e.start].count(b"\n") + 1
        raise UserError(f"{p} line {line}: invalid UTF-8 (byte offset {bom + e.start}); "
                        "re-save the file as UTF-8") from None
    stripped = text.lstrip()
    if not stripped:
        raise UserError(f"{p}: the file is empty; it needs at least one row")
    if stripped.startswith("["):
        return _read_array(p, text)
    rows = []
    for n, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            raise UserError(f"{p} line {n}: not valid JSON ({_problem(e)}); "
                            "each line must hold one JSON object") from None
    return rows


def _problem(e: ValueError | RecursionError) -> str:
    """What json.loads / raw_decode refused, in words (without the advice Python's messages give programmers)."""
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at column {e.colno}"
    if isinstance(e, RecursionError):
        return "JSON nested too deeply to read (Python's json module stops at about 1000 levels)"
    # ValueError from int(): "Exceeds the limit (4300 digits) for integer string conversion ..."
    return f"a number with more than {sys.get_int_max_str_digits()} digits; write it as a string"


def _read_array(p: Path, text: str) -> list[tuple[int, Any]]:
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    rows = []
    n = len(text)

    def skip_ws(j: int) -> int:
        while j < n and text[j] in " \t\r\n":
            j += 1
        return j

    i = skip_ws(i)
    if i < n and text[i] == "]":
        raise UserError(f"{p}: the JSON array is empty; it needs at least one row")
    line, counted = 1, 0  # line number of text[counted]; counted on from row to row, so reading stays linear
    while True:
        i = skip_ws(i)
        line += text.count("\n", counted, i)
        counted = i
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise UserError(f"{p} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        except (ValueError, RecursionError) as e:
            raise UserError(f"{p} line {line}: not valid JSON ({_problem(e)})") from None
        rows.append((line, obj))
        i = skip_ws(i)
        if i < n and text[i] == ",":
            i += 1
            continue
        if i < n and text[i] == "]":
            break
        raise UserError(f"{p} line {text.count(chr(10), 0, i) + 1}: expected ',' or ']' in the JSON array")
    i = skip_ws(i + 1)
    if i < n:  # e.g. two arrays, or a JSON-lines file whose first row happens to be an array
        raise UserError(f"{p} line {text.count(chr(10), 0, i) + 1}: "
                        "unexpected text after the closing ']' of the JSON array")
    return rows
