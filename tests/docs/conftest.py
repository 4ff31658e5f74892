"""Fixtures of the docs' page runs (tests/docs_harness.py): a stand-in teacher, and a page runner whose Hugging
Face cache holds tiny stand-ins for the hub ids the page names."""
from __future__ import annotations

from pathlib import Path

import pytest

import docs_harness
from stand_in_teacher import StandInTeacher


@pytest.fixture(scope="module")
def run_docs_page(tiny_model_dir, tmp_path_factory):
    """`run_docs_page(page)` runs a page from an empty folder and returns the harness's PageRun."""
    cache = tmp_path_factory.mktemp("hub-cache")
    with StandInTeacher() as teacher:
        def run(page: Path, timeout: float = 300.0) -> docs_harness.PageRun:
            text = page.read_text(encoding="utf-8")
            docs_harness.seed_hub_cache(cache, {hub_id: tiny_model_dir(docs_harness.STAND_INS[hub_id])
                                                for hub_id in docs_harness.hub_ids(text)})
            scratch = tmp_path_factory.mktemp(page.stem)
            return docs_harness.run_page(page, scratch, docs_harness.page_env(cache, teacher.base_url), timeout)

        yield run
