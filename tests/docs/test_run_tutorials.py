"""The tutorials run as written (docs/tutorials/*.md): every command marked `<!-- run -->`, in order, from an empty
folder, on tiny stand-ins of the models they name, with the outputs and files the pages promise
(tests/docs_harness.py says how)."""
from __future__ import annotations

from pathlib import Path

import pytest

from docs_harness import marked_pages

PAGES = marked_pages(Path(__file__).resolve().parents[2] / "docs" / "tutorials")


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_the_tutorial_runs_as_written(page, run_docs_page):
    result = run_docs_page(page)
    assert any(s.kind == "run" for s in result.steps)
