"""Reading data files: JSON lines or a JSON array, each row with the line it came from.

The one reader of data files in the project (training data, test files, predictions, seed questions):
a UTF-8 BOM, CRLF line ends and blank lines are fine; invalid UTF-8, broken JSON and an empty file are
errors that name the file and the line. So is JSON that Python's json module refuses for other reasons:
nesting deeper than the interpreter's recursion limit, and integers longer than `sys.get_int_max_str_digits()`.

A caller that reports every bad row of a file at once (`examples.read_valid_rows`) passes a `bad` list: rows
that are not valid JSON go there, with their line, and reading goes on (a JSON array stops at its first broken
row, where the next row cannot be found), so a file's broken JSON and its invalid rows are named in one run.

`iter_records` and `iter_csv` read lazily (line by line), and `open_table` Parquet and Arrow files batch by batch,
for data sources larger than memory (sources.py).
"""
from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import UserError

BATCH = 1024  # rows per Arrow batch read at a time


def read_records(path: str | Path, bad: list[tuple[int, str]] | None = None) -> list[tuple[int, Any]]:
    """(line number, parsed JSON value) for each row of a JSON-lines file or a JSON array file.

    Accepts a UTF-8 BOM, CRLF line ends and blank lines. Raises UserError naming the file and line
    for invalid UTF-8, broken JSON and an empty file. With `bad`, broken JSON is not raised but appended to it as
    (line, message), and the rows that could be read are returned (see the module docstring).

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
        line_no = raw[: bom + e.start].count(b"\n") + 1
        raise UserError(f"{p} line {line_no}: invalid UTF-8 (byte offset {bom + e.start}); "
                        "re-save the file as UTF-8") from None
    stripped = text.lstrip()
    if not stripped:
        raise UserError(f"{p}: the file is empty; it needs at least one row")
    if stripped.startswith("["):
        return _read_array(p, text, bad)
    rows: list[tuple[int, Any]] = []
    for n, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            _broken(bad, n, f"{p} line {n}: not valid JSON ({_problem(e)}); each line must hold one JSON object")
    return rows


def _broken(bad: list[tuple[int, str]] | None, line: int, message: str) -> None:
    """Raise `message`, or record it in `bad` for the caller to report with the file's other bad rows."""
    if bad is None:
        raise UserError(message)
    bad.append((line, message))


def _problem(e: ValueError | RecursionError) -> str:
    """What json.loads / raw_decode refused, in words (without the advice Python's messages give programmers)."""
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at column {e.colno}"
    if isinstance(e, RecursionError):
        return "JSON nested too deeply to read (Python's json module stops at about 1000 levels)"
    # ValueError from int(): "Exceeds the limit (4300 digits) for integer string conversion ..."
    return f"a number with more than {sys.get_int_max_str_digits()} digits; write it as a string"


def _read_array(p: Path, text: str, bad: list[tuple[int, str]] | None) -> list[tuple[int, Any]]:
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    rows: list[tuple[int, Any]] = []
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
        # After a broken row the next one cannot be found: the rows read so far are returned.
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            _broken(bad, e.lineno, f"{p} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})")
            return rows
        except (ValueError, RecursionError) as e:
            _broken(bad, line, f"{p} line {line}: not valid JSON ({_problem(e)})")
            return rows
        rows.append((line, obj))
        i = skip_ws(i)
        if i < n and text[i] == ",":
            i += 1
            continue
        if i < n and text[i] == "]":
            break
        at = text.count("\n", 0, i) + 1
        _broken(bad, at, f"{p} line {at}: expected ',' or ']' in the JSON array")
        return rows
    i = skip_ws(i + 1)
    if i < n:  # e.g. two arrays, or a JSON-lines file whose first row happens to be an array
        at = text.count("\n", 0, i) + 1
        _broken(bad, at, f"{p} line {at}: unexpected text after the closing ']' of the JSON array")
    return rows


def iter_records(path: str | Path, bad: list[tuple[int, str]] | None = None) -> Iterator[tuple[int, Any]]:
    """`read_records`, lazily: (line number, parsed JSON value) for each row, reading a JSON-lines file line by line
    (a file larger than memory is fine). A JSON array file is read whole by `read_records`. Same rules and errors:
    BOM, CRLF and blank lines accepted; invalid UTF-8 and an empty file raise; broken JSON raises or goes to `bad`."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data file '{p}' not found")
    with p.open("rb") as f:
        first = True
        rows = 0
        for n, raw in enumerate(f, start=1):
            if first:
                raw, first = raw.removeprefix(b"\xef\xbb\xbf"), False
            line = _decode(p, raw, n).removesuffix("\n").removesuffix("\r")
            if not line.strip():
                continue
            if rows == 0 and line.lstrip().startswith("["):
                yield from read_records(p, bad)
                return
            rows += 1
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as e:
                _broken(bad, n, f"{p} line {n}: not valid JSON ({_problem(e)}); each line must hold one JSON object")
                continue
            yield n, obj
    if rows == 0:
        raise UserError(f"{p}: the file is empty; it needs at least one row")


def _decode(p: Path, raw: bytes, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{p} line {line}: invalid UTF-8 (byte {e.start + 1} of the line); "
                        "re-save the file as UTF-8") from None


def iter_csv(path: str | Path, delimiter: str = ",",
             bad: list[tuple[int, str]] | None = None) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, {column: value}) for each record of a CSV (or, with delimiter "\\t", TSV) file, lazily.

    The first record is the header (line 1); every value is a string. The line number is the physical line where
    a record starts (a quoted value may span lines). A UTF-8 BOM and CRLF are fine; blank lines are skipped.
    Invalid UTF-8, a missing or duplicated header raise UserError; a ragged record (more or fewer values than the
    header) raises, or with `bad` goes there as (line, message) and reading goes on."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data file '{p}' not found")
    with p.open("rb") as f:
        def lines() -> Iterator[str]:
            for n, raw in enumerate(f, start=1):
                yield _decode(p, raw.removeprefix(b"\xef\xbb\xbf") if n == 1 else raw, n)

        reader = csv.reader(lines(), delimiter=delimiter)
        header: list[str] | None = None
        while True:
            start = reader.line_num + 1
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise UserError(f"{p} line {start}: not valid CSV ({e}); check the quotes") from None
            if not record or record == [""]:
                continue
            if header is None:
                header = record
                if dup := sorted({c for c in header if header.count(c) > 1}):
                    raise UserError(f"{p} line 1: the header names {', '.join(map(repr, dup))} more than once; "
                                    "give each column its own name")
                continue
            if len(record) != len(header):
                _broken(bad, start, f"{p} line {start}: {len(record)} values, but the header has {len(header)} "
                                    f"columns; quote a value that holds the delimiter {delimiter!r} or a line end")
                continue
            yield start, dict(zip(header, record, strict=True))
    if header is None:
        raise UserError(f"{p}: the file is empty; a CSV/TSV file needs a header row and at least one row")


def open_table(path: str | Path) -> tuple[list[str], Iterator[list[dict]]]:
    """The column names of a Parquet or Arrow IPC file (file or stream format: .arrow, .feather v2) and its rows,
    batch by batch, with nulls dropped (`no_nulls`). A file pyarrow cannot read raises UserError naming it."""
    import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]  # pyarrow ships no py.typed

    p = Path(path)
    try:
        if p.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq  # type: ignore[import-untyped, unused-ignore]

            pf = pq.ParquetFile(p)
            names, batches = pf.schema_arrow.names, pf.iter_batches(batch_size=BATCH)
        else:
            reader = _open_ipc(p)
            names = reader.schema.names
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) \
                if isinstance(reader, pa.ipc.RecordBatchFileReader) else iter(reader)
    except (pa.ArrowException, OSError) as e:
        raise _unreadable(p, e) from None

    def rows() -> Iterator[list[dict]]:
        try:
            for batch in batches:
                yield [no_nulls(row) for row in batch.to_pylist()]
        except (pa.ArrowException, OSError) as e:
            raise _unreadable(p, e) from None

    return list(names), rows()


def table_rows(path: str | Path) -> int | None:
    """The row count of a Parquet file (its metadata) or an Arrow IPC file-format file (its batches' lengths);
    None for an Arrow stream (only reading it counts it) and for a file pyarrow cannot read."""
    import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]

    p = Path(path)
    try:
        if p.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq  # type: ignore[import-untyped, unused-ignore]

            return int(pq.ParquetFile(p).metadata.num_rows)
        r = _open_ipc(p)
        if isinstance(r, pa.ipc.RecordBatchFileReader):
            return sum(r.get_batch(i).num_rows for i in range(r.num_record_batches))
    except (pa.ArrowException, OSError):
        pass  # reading the rows reports the damaged file
    return None


def no_nulls(v: Any) -> Any:
    """`v` without null-valued keys in its objects, at any depth (list items stay). Arrow has no "absent": a field
    that a row's JSON lacked reads back as null (every message of a messages column gets every message's keys)."""
    if isinstance(v, dict):
        return {k: no_nulls(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [no_nulls(x) for x in v]
    return v


def _open_ipc(p: Path) -> Any:
    """An Arrow IPC reader: the file format (.arrow, Feather v2) or the stream format (datasets' own .arrow)."""
    import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]

    try:
        return pa.ipc.open_file(pa.memory_map(str(p)))
    except pa.ArrowInvalid:
        return pa.ipc.open_stream(pa.memory_map(str(p)))


def _unreadable(p: Path, e: Exception) -> UserError:
    kind = "Parquet" if p.suffix.lower() == ".parquet" else "Arrow IPC (file or stream)"
    return UserError(f"{p}: not a readable {kind} file ({e}); re-export it (e.g. pandas' to_parquet / to_feather, "
                     "or datasets' to_parquet)")
