"""Finding the files `selfinstruct.documents` names (collect.py): folders, globs, errors, other file types."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from domaintune.datagen.collect import expand_documents, find_documents, load_documents
from domaintune.datagen.documents import SUPPORTED
from domaintune.errors import UserError


@pytest.fixture
def tree(tmp_path):
    for rel in ["docs/b.md", "docs/a.txt", "docs/sub/c.pdf", "docs/sub/deep/d.HTML", "docs/.hidden/e.md",
                "docs/.f.md", "docs/g.xyz", "other/h.docx", "empty/readme.xyz"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x", encoding="utf-8")
    return tmp_path


def test_expand_folder_glob_sorted_deduplicated(tree, monkeypatch):
    rel = lambda paths: [p.relative_to(tree).as_posix() for p in paths]  # noqa: E731
    assert rel(expand_documents(["docs"], base=tree)) == ["docs/a.txt", "docs/b.md", "docs/sub/c.pdf",
                                                          "docs/sub/deep/d.HTML"]
    assert rel(expand_documents(["**/*.md"], base=tree)) == ["docs/b.md"]  # hidden files and folders skipped
    assert rel(expand_documents(["docs/**/*.pdf", "other/*"], base=tree)) == ["docs/sub/c.pdf", "other/h.docx"]
    assert rel(expand_documents(["other", "docs/b.md", "./docs/b.md", "docs/*.md", "docs"], base=tree)) == [
        "docs/a.txt", "docs/b.md", "docs/sub/c.pdf", "docs/sub/deep/d.HTML", "other/h.docx"]
    assert rel(expand_documents([str(tree / "docs" / "sub")])) == ["docs/sub/c.pdf", "docs/sub/deep/d.HTML"]
    monkeypatch.chdir(tree)  # without base: relative to the current directory, paths kept as written
    assert expand_documents(["other"]) == [Path("other/h.docx")]


def test_expand_errors_name_the_pattern(tree):
    for pattern in ["nothing/here", "docs/*.pptx", "empty"]:
        with pytest.raises(UserError, match=re.escape(f"'{pattern}'")):
            expand_documents([pattern], base=tree)
    with pytest.raises(UserError, match=r"'docs/g.xyz'.*\.docx.*\.pdf"):
        expand_documents(["docs/g.xyz"], base=tree)
    assert SUPPORTED == {".pdf", ".docx", ".md", ".markdown", ".html", ".htm", ".txt"}


def test_load_documents_reports_every_file(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.md").write_text("# T\n\n正文。", encoding="utf-8")
    (tmp_path / "in" / "b.txt").write_bytes(b"")
    (tmp_path / "in" / "d.pdf").write_bytes(b"%PDF-1.4 garbage")
    (tmp_path / "in" / "e.doc").write_bytes(b"\xd0\xcf\x11\xe0")  # a folder's file of another type: reported
    (tmp_path / "in" / ".hidden.doc").write_bytes(b"x")  # hidden: not a document
    docs, problems = load_documents(["in"], base=tmp_path)
    assert [(d.path.name, d.text) for d in docs] == [("a.md", "正文。")]
    assert [(Path(p.source).name, p.reason) for p in problems] == [("e.doc", "unsupported_type"), ("b.txt", "empty"),
                                                                   ("d.pdf", "unreadable")]
    assert "'.doc' files are not supported" in problems[0].detail and ".docx" in problems[0].detail


def test_other_types_are_listed_beside_the_documents(tree):
    files, others = find_documents(["docs", "other/*"], base=tree)
    assert [p.relative_to(tree).as_posix() for p in others] == ["docs/g.xyz"]  # hidden ones are not listed
    assert len(files) == 5


