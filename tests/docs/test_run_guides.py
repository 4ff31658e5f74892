"""The how-to, concept and getting-started pages run as written (every docs page outside docs/tutorials/ with
markers): commands marked `<!-- run -->` in order from an empty folder, the errors marked `<!-- run: fails -->`
fail with the messages the pages quote (tests/docs_harness.py says how)."""
from __future__ import annotations

from pathlib import Path

import pytest

from docs_harness import marked_pages

DOCS = Path(__file__).resolve().parents[2] / "docs"
PAGES = [p for p in marked_pages(DOCS) if "tutorials" not in p.relative_to(DOCS).parts]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS).with_suffix("")) for p in PAGES])
def test_the_page_runs_as_written(page, run_docs_page):
    result = run_docs_page(page)
    assert any(s.kind == "run" for s in result.steps)
