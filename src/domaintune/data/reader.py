"""Reading data files: JSON lines or a JSON array, each row with the line it came from.

The one reader of data files in the project (training data, test files, predictions, seed questions):
a UTF-8 BOM, CRLF line ends and blank lines are fine; invalid UTF-8, broken JSON and an empty file are
errors that name the file and the line.
"""
from __future__ import annotations

import json
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
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{p} line {line}: invalid UTF-8 (byte offset {e.start}); re-save the file as UTF-8") from None
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
        except json.JSONDecodeError as e:
            raise UserError(f"{p} line {n}: not valid JSON ({e.msg} at column {e.colno}); "
                            "each line must hold one JSON object") from None
    return rows


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
    while True:
        i = skip_ws(i)
        line = text.count("\n", 0, i) + 1
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise UserError(f"{p} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
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
