"""Which files `selfinstruct.documents` names, and loading them: files, folders and globs -> Documents + Problems.

A folder is searched recursively (hidden files and folders skipped). Files of a type domaintune cannot read that
sit in a searched folder or match a glob are not an error (a folder of documents often holds a spreadsheet or
an image too), but they are reported, as Problems of reason "unsupported_type", never skipped silently. A file
named explicitly with such a type, and a pattern that matches nothing readable, are errors.
"""
from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from ..errors import UserError
from .documents import SUPPORTED, Document, Problem, extract


def _walk(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in sorted(files) if f[0] != "."]
    return found


def find_documents(patterns: list[str], base: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(readable files, files of other types found in folders or globs) named by `patterns`: files, folders or
    globs (`**` allowed), relative to `base` (default: the current directory). Sorted, without duplicates; a
    pattern that matches no readable file is a UserError naming it."""
    root = Path(base) if base is not None else Path(".")
    kinds = ", ".join(sorted(SUPPORTED))
    found: dict[Path, Path] = {}
    other: dict[Path, Path] = {}
    for pattern in patterns:
        path = root / pattern if base is not None else Path(pattern)
        if re.search(r"[*?[]", pattern):
            matches = [root / m if base is not None else Path(m)
                       for m in sorted(glob.glob(pattern, root_dir=root, recursive=True))]
            files = [f for m in matches for f in (_walk(m) if m.is_dir() else [m])]
        elif path.is_dir():
            files = _walk(path)
        elif path.is_file():
            if path.suffix.lower() not in SUPPORTED:
                raise UserError(f"document '{pattern}': unsupported file type '{path.suffix}'; supported: {kinds} "
                                "(convert it, e.g. save a .doc as .docx)")
            files = [path]
        else:
            raise UserError(f"document pattern '{pattern}' matches no file or folder (relative to {root.resolve()})")
        hits = [f for f in files if f.suffix.lower() in SUPPORTED]
        if not hits:
            raise UserError(f"document pattern '{pattern}' matches no supported file ({kinds}); check the pattern")
        for f in files:
            (found if f in hits else other).setdefault(f.resolve(), f)
    by_name = lambda paths: sorted(paths, key=lambda p: p.as_posix())  # noqa: E731
    return by_name(found.values()), by_name(p for k, p in other.items() if k not in found)


def expand_documents(patterns: list[str], base: Path | None = None) -> list[Path]:
    """The readable files named by `patterns` (see `find_documents`)."""
    return find_documents(patterns, base)[0]


def load_documents(patterns: list[str], base: Path | None = None) -> tuple[list[Document], list[Problem]]:
    """Expand `patterns` and extract every file: the usable Documents and all Problems (files of other types
    first, then in file order)."""
    files, others = find_documents(patterns, base)
    kinds = ", ".join(sorted(SUPPORTED))
    problems = [Problem(str(p), "unsupported_type", f"not read: '{p.suffix or p.name}' files are not supported "
                        f"({kinds}); convert it (e.g. .doc to .docx) if it matters") for p in others]
    documents = []
    for path in files:
        document, found = extract(path)
        problems += found
        documents += [document] if document is not None else []
    return documents, problems
