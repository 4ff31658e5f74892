"""Reading one data source (config/sources.py) row by row: local files of any supported type, folders, globs,
folders written by datasets' `save_to_disk`, and hub data sets.

- A path may be a file (`EXTENSIONS`), a folder (every data file inside, recursively, sorted by path; hidden
  files and folders skipped), a glob (`data/*.jsonl`, `data/**/*.parquet`), or a `save_to_disk` folder (it holds
  `state.json` or `dataset_dict.json`; a DatasetDict gives `src.split`). `~` is expanded; a relative path is
  relative to the current directory.
- Rows are read lazily, never all held at once: JSON lines line by line (a JSON array file whole), CSV/TSV
  record by record, Parquet / Arrow / datasets batch by batch. So a mix can stream data larger than memory.
- Each row comes with `where`, the place a user can find it: "FILE line N" for JSON, JSON lines and CSV/TSV (the
  line the record starts on; the header is line 1), "FILE index N" for Parquet and Arrow files and "LABEL index N"
  for `save_to_disk` folders and hub data sets (0-based, as pandas and datasets number rows).
- CSV/TSV values are strings, except that a cell of `JSON_COLUMNS` holding JSON is parsed, so a messages-format
  CSV works; the same holds for text cells of those columns in Parquet, Arrow and datasets (messages stored as
  JSON text). `src.columns` renames the source's columns to ours ({our_field: source_column}); a mapped column a
  tabular file lacks is an error checked once per file. With `src.format` named, each row must have its keys.
- Arrow has no "absent": a column or struct field that a row lacks reads as null (a messages column of mixed
  messages gives every message every key). Rows from Parquet, Arrow, save_to_disk and the hub therefore drop
  null-valued keys (at any depth), so a row reads as the JSON it was written from.
- Bad rows (broken JSON, a ragged CSV record, a row without the format's keys) raise UserError, or with a `bad`
  list go there as (where, message) and reading goes on, so a caller can report them all. A problem of a whole
  file (missing, unknown type, corrupt, a mapped column it lacks) always raises.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config.sources import SourceConfig
from ..errors import UserError
from .reader import BATCH, iter_csv, iter_records, no_nulls, open_table, table_rows

EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow", ".feather")
JSON_COLUMNS = ("messages", "conversations", "tools", "history")  # text cells of tables parsed as JSON
REQUIRED = {"alpaca": ("instruction", "output"), "messages": ("messages",), "openai": ("messages",),
            "sharegpt": ("conversations",)}
DISK_MARKERS = ("state.json", "dataset_dict.json")  # written by Dataset / DatasetDict.save_to_disk
SUPPORTED = ("data.path takes .jsonl, .json, .csv, .tsv, .parquet and .arrow/.feather files, a folder of them, a "
             "glob, a folder written by datasets' save_to_disk, or a hub id (hub: org/name)")
_hub_cache: dict[tuple[str, str | None, str, str | None], Any] = {}


def _expand(src: SourceConfig) -> str:
    assert src.path is not None
    return os.path.expanduser(src.path)


def _is_disk(p: Path) -> bool:
    return p.is_dir() and any((p / m).is_file() for m in DISK_MARKERS)


def source_files(src: SourceConfig) -> list[Path]:
    """The data files of a local source, sorted by path ([] for a hub source; a save_to_disk folder gives itself).

    Raises UserError for a missing path, an empty folder or glob, and a file of an unsupported type."""
    if src.hub is not None:
        return []
    raw = _expand(src)
    if glob.has_magic(raw) and not Path(raw).exists():  # a file named data[1].jsonl is that file
        files = sorted((Path(f) for f in glob.glob(raw, recursive=True) if Path(f).is_file()), key=_key)
        if not files:
            raise UserError(f"data.path '{src.path}': the glob matches no files; check the pattern and the current "
                            f"directory ({Path.cwd()})")
        for f in files:
            _check_ext(f, f" (matched by the glob '{src.path}'; narrow the glob, e.g. data/*.jsonl)")
        return files
    p = Path(raw)
    if _is_disk(p):
        return [p]
    if p.is_dir():
        files = []
        for f in sorted(p.rglob("*"), key=_key):
            rel = f.relative_to(p)
            if any(part.startswith(".") for part in rel.parts):
                continue
            if f.is_dir() and _is_disk(f):
                raise UserError(f"data.path '{src.path}': the folder {f} was written by datasets' save_to_disk; "
                                "give it as a source of its own, not inside a folder of data files")
            if f.is_file() and f.suffix.lower() in EXTENSIONS:
                files.append(f)
        if not files:
            raise UserError(f"data.path '{src.path}': the folder holds no data files; {SUPPORTED}")
        return files
    if not p.is_file():
        raise UserError(f"data file '{src.path}' not found (no such file or folder; looked in {p.absolute()})")
    _check_ext(p, "")
    return [p]


def _key(p: Path) -> str:
    return p.as_posix()


def _check_ext(f: Path, how: str) -> None:
    if f.suffix.lower() not in EXTENSIONS:
        raise UserError(f"{f}: unsupported data file type '{f.suffix or '(none)'}'{how}; {SUPPORTED}")


def iter_rows(src: SourceConfig, *, check_format: bool = True,
              bad: list[tuple[str, str]] | None = None) -> Iterator[tuple[str, Any]]:
    """(where, row) for every row of the source, lazily, in a fixed order (a folder's or glob's files sorted by path).

    Rows have `src.columns` applied; with `check_format` and a named `src.format`, a row without the format's keys
    is a bad row. Bad rows raise UserError, or with `bad` are appended as (where, message) and skipped. A source
    that yields no row at all (and had no bad rows) raises."""
    before = len(bad) if bad is not None else 0
    n = 0
    if src.hub is not None:
        ds = _hub_dataset(src)
        rows = _dataset_rows(ds, src.label, src, check_format, bad)
    else:
        rows = (r for f in source_files(src) for r in _file_rows(f, src, check_format, bad))
    for where, row in rows:
        if check_format and src.format != "auto" and (problem := _format_problem(row, src)):
            _bad(bad, where, f"{where}: {problem}")
            continue
        n += 1
        yield where, row
    if n == 0 and (bad is None or len(bad) == before):
        raise UserError(f"data.path '{src.label}': the source has no rows")


def _bad(bad: list[tuple[str, str]] | None, where: str, message: str) -> None:
    if bad is None:
        raise UserError(message)
    bad.append((where, message))


def _file_rows(f: Path, src: SourceConfig, check_format: bool,
               bad: list[tuple[str, str]] | None) -> Iterator[tuple[str, Any]]:
    if _is_disk(f):
        yield from _dataset_rows(_load_disk(f, src), _disk_label(f, src), src, check_format, bad)
        return
    ext = f.suffix.lower()
    if ext in (".json", ".jsonl"):
        lines: list[tuple[int, str]] | None = [] if bad is not None else None
        for line, obj in iter_records(f, lines):
            _move(lines, f, bad)
            where = f"{f} line {line}"
            if src.columns and isinstance(obj, dict):
                if missing := [f"{ours} to '{c}'" for ours, c in src.columns.items() if c not in obj]:
                    _bad(bad, where, f"{where}: data.path[].columns maps {', '.join(missing)}, but the row has no "
                                     f"such key; it has keys {_keys(obj)}")
                    continue
                obj = _rename(obj, src.columns)
            yield where, obj
        _move(lines, f, bad)
    elif ext in (".csv", ".tsv"):
        lines = [] if bad is not None else None
        checked = False
        for line, rec in iter_csv(f, "\t" if ext == ".tsv" else ",", lines):
            _move(lines, f, bad)
            if not checked:
                _check_columns(f, list(rec), src, check_format)
                checked = True
            where = f"{f} line {line}"
            row = _rename(rec, src.columns)
            problem = _json_cells(row)
            if problem:
                _bad(bad, where, f"{where}: {problem}")
                continue
            yield where, row
        _move(lines, f, bad)
    else:
        for i, row in enumerate(_arrow_rows(f, src, check_format)):
            where = f"{f} index {i}"
            if problem := _json_cells(row):
                _bad(bad, where, f"{where}: {problem}")
                continue
            yield where, row


def _move(lines: list[tuple[int, str]] | None, f: Path, bad: list[tuple[str, str]] | None) -> None:
    """Move the reader's bad lines (line, message) into `bad` as (where, message), keeping the file's order."""
    if lines and bad is not None:
        bad.extend((f"{f} line {n}", m) for n, m in lines)
        lines.clear()


def _keys(obj: Any) -> str:
    if not isinstance(obj, dict):
        return f"none (it is a {type(obj).__name__}, not an object)"
    return ", ".join(sorted(map(str, obj))) or "none"


def _rename(row: dict, columns: dict[str, str]) -> dict:
    """The row with each mapped source column under our field's name (a source column that already had one of our
    field names, and is not itself mapped, gives way to the mapped one)."""
    if not columns:
        return row
    ours = {col: field for field, col in columns.items()}
    out = {}
    for k, v in row.items():
        if k in ours:
            out[ours[k]] = v
        elif k not in columns:
            out[k] = v
    return out


def _json_cells(row: dict) -> str | None:
    for k in JSON_COLUMNS:
        v = row.get(k)
        if isinstance(v, str) and v.strip()[:1] in ("[", "{"):
            try:
                row[k] = json.loads(v)
            except (ValueError, RecursionError) as e:
                return f"column '{k}' holds broken JSON ({e}); write the whole value as JSON (in a CSV, quoted)"
        elif k == "history" and isinstance(v, str) and not v.strip():
            row[k] = None  # an empty cell is no history
    return None


def _check_columns(f: Path | str, names: list[str], src: SourceConfig, check_format: bool) -> None:
    """A tabular file's columns, checked once: every mapped column present, and (format named) the format's keys."""
    if missing := [f"{ours} to '{c}'" for ours, c in src.columns.items() if c not in names]:
        raise UserError(f"{f}: data.path '{src.label}' columns maps {', '.join(missing)}, but the source has no "
                        f"such column; its columns are {', '.join(names) or 'none'}. Fix data.path[].columns")
    if check_format and src.format != "auto":
        have = set(_rename(dict.fromkeys(names), src.columns))
        if lack := [k for k in REQUIRED[src.format] if k not in have]:
            raise UserError(f"{f}: format {src.format} needs {_quoted(lack)}; the source has columns "
                            f"{', '.join(names) or 'none'}. Set data.path[].columns to map its columns to them "
                            f"(e.g. columns: {{{lack[0]}: {names[0] if names else 'COLUMN'}}}), or format: auto")


def _quoted(keys: list[str] | tuple[str, ...]) -> str:
    return " and ".join(f"'{k}'" for k in keys)


def _format_problem(row: Any, src: SourceConfig) -> str | None:
    need = REQUIRED[src.format]
    if isinstance(row, dict) and all(k in row for k in need):
        return None
    return (f"format {src.format} needs {_quoted(need)}; the row has keys {_keys(row)}. Set data.path[].columns to "
            f"map the source's fields to them, or format: auto")


def _arrow_rows(f: Path, src: SourceConfig, check_format: bool) -> Iterator[dict]:
    names, batches = open_table(f)
    _check_columns(f, names, src, check_format)
    for batch in batches:
        for row in batch:
            yield _rename(row, src.columns)


def _disk_label(f: Path, src: SourceConfig) -> str:
    return f"{f} split {src.split}" if (f / "dataset_dict.json").is_file() else str(f)


def _load_disk(f: Path, src: SourceConfig) -> Any:
    import datasets

    try:
        ds = datasets.load_from_disk(str(f))
    except Exception as e:  # noqa: BLE001 - datasets raises many types for a damaged folder
        raise UserError(f"{f}: could not read this save_to_disk folder ({type(e).__name__}: {e}); write it again "
                        "with save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        if src.split not in ds:
            raise UserError(f"{f}: no split '{src.split}' in this save_to_disk folder; it has "
                            f"{', '.join(ds)}; set data.path[].split")
        ds = ds[src.split]
    return ds


def _hub_dataset(src: SourceConfig) -> Any:
    """The hub data set (cached per process, so fingerprint and iter_rows load it once)."""
    key = (str(src.hub), src.subset, src.split, src.revision)
    if key in _hub_cache:
        return _hub_cache[key]
    import datasets

    try:
        ds = datasets.load_dataset(src.hub, src.subset, split=src.split, revision=src.revision)
    except Exception as e:  # noqa: BLE001 - no network, unknown id, unknown subset/split: all told the same way
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        args = ", ".join(repr(a) for a in (src.hub, src.subset) if a is not None) + f", split={src.split!r}" \
            + (f", revision={src.revision!r}" if src.revision else "")
        raise UserError(
            f"data.path hub '{src.hub}'" + (f" subset '{src.subset}'" if src.subset else "")
            + f" split '{src.split}': could not load it ({type(e).__name__}: {detail}). Check the id, subset, split "
            "and revision; without network access here, on a machine with access run "
            f"datasets.load_dataset({args}).save_to_disk('FOLDER') (or .to_parquet('FILE.parquet')), copy it here "
            "and give that path instead") from None
    _hub_cache[key] = ds
    return ds


def _dataset_rows(ds: Any, label: str, src: SourceConfig, check_format: bool,
                  bad: list[tuple[str, str]] | None = None) -> Iterator[tuple[str, Any]]:
    _check_columns(label, list(ds.column_names), src, check_format)
    i = 0
    for batch in ds.with_format("arrow").iter(batch_size=BATCH):
        for row in batch.to_pylist():
            where, row = f"{label} index {i}", _rename(no_nulls(row), src.columns)
            i += 1
            if problem := _json_cells(row):
                _bad(bad, where, f"{where}: {problem}")
                continue
            yield where, row


def count_hint(src: SourceConfig) -> int | None:
    """The source's row count when known without reading the rows (Parquet metadata, Arrow IPC files,
    save_to_disk folders, a hub data set already loaded), else None (JSON, CSV, Arrow streams)."""
    if src.hub is not None:
        ds = _hub_cache.get((src.hub, src.subset, src.split, src.revision))
        return None if ds is None else len(ds)
    total = 0
    for f in source_files(src):
        n = _file_count(f, src)
        if n is None:
            return None
        total += n
    return total


def _file_count(f: Path, src: SourceConfig) -> int | None:
    if _is_disk(f):
        return len(_load_disk(f, src))
    return table_rows(f) if f.suffix.lower() in (".parquet", ".arrow", ".feather") else None


def fingerprint(src: SourceConfig) -> str:
    """A hex digest that changes when the source's content changes and is stable otherwise.

    Local: blake2b over each data file's name (relative to the source's folder) and bytes; a save_to_disk folder
    counts all its files, and the split. Hub: the loaded data set's own fingerprint with id, subset, split and
    revision. (The config's columns and format are not in it: they change the rows, not the source.)"""
    h = hashlib.blake2b(digest_size=16)

    def add(*parts: bytes) -> None:
        for part in parts:
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)

    if src.hub is not None:
        ds = _hub_dataset(src)
        add(b"hub", str(src.hub).encode(), str(src.subset).encode(), src.split.encode(), str(src.revision).encode(),
            str(getattr(ds, "_fingerprint", "")).encode())
        return h.hexdigest()
    files = source_files(src)
    top = Path(_expand(src))
    base = top if top.is_dir() else Path(os.path.commonpath([p.parent for p in files]))
    for f in files:
        if _is_disk(f):
            add(b"disk", src.split.encode())
            for m in sorted((m for m in f.rglob("*") if m.is_file()), key=_key):
                _add_file(h, add, m.relative_to(f).as_posix(), m)
        else:
            _add_file(h, add, f.relative_to(base).as_posix(), f)
    return h.hexdigest()


def _add_file(h: Any, add: Any, name: str, f: Path) -> None:
    add(b"file", name.encode(), f.stat().st_size.to_bytes(8, "little"))
    with f.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
