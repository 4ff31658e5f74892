"""The docs page runner itself (tests/docs_harness.py): it runs what is marked, in order, and fails where a page
is wrong: a command that fails, a printed line that is not printed, a file that is not made, an error example
that succeeds. A background process a page starts does not outlive the page."""
from __future__ import annotations

import os
import textwrap
import time

import pytest

from docs_harness import output_misses, page_env, parse, run_page, seed_hub_cache

PAGE = textwrap.dedent("""\
    # A page

    <!-- file: data/rows.txt -->
    ```text
    alpha
    beta
    ```

    Not run:

    ```bash
    exit 3
    ```

    <!-- run -->
    ```bash
    wc -l < data/rows.txt
    echo "rows:   $(cat data/rows.txt | tr '\\n' ' ')"
    touch made.txt && echo x > made.txt
    ```

    <!-- output -->
    ```text
    rows: alpha ... beta
    2
    ```

    <!-- check: made.txt data/rows.txt -->

    <!-- run: fails -->
    ```bash
    echo "error: no such thing" >&2; exit 2
    ```

    <!-- output -->
    ```text
    error: no such thing
    ```
    """)


def _env(tmp_path):
    return page_env(tmp_path / "cache", "http://127.0.0.1:9/v1")


def test_a_true_page_passes_and_its_steps_are_what_is_marked(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    result = run_page(page, tmp_path / "work", _env(tmp_path))
    assert [s.kind for s in result.steps] == ["file", "run", "output", "check", "run", "output"]
    assert result.outputs[0].splitlines()[0].strip() == "2"
    assert (tmp_path / "work" / "made.txt").read_text() == "x\n"


@pytest.mark.parametrize("wrong, said", [
    (("rows: alpha ... beta", "rows: beta ... alpha"), "not printed"),      # pieces out of order
    (("touch made.txt && echo x > made.txt", "touch other.txt"), "made.txt does not exist"),
    (("exit 2", "exit 0"), "should have failed"),
    (("wc -l < data/rows.txt", "false"), "exit 1"),
    (("<!-- file: data/rows.txt -->", "<!-- file: data/other.txt -->"), "exit 1"),  # cat of a missing file
])
def test_a_wrong_page_fails_at_its_line(tmp_path, wrong, said):
    page = tmp_path / "page.md"
    page.write_text(PAGE.replace(*wrong))
    with pytest.raises(AssertionError, match=said):
        run_page(page, tmp_path / "work", _env(tmp_path))


def test_markers_without_their_block_are_refused():
    with pytest.raises(ValueError, match="page:1: <!-- run --> must stand right before a fenced block"):
        parse("<!-- run -->\ntext\n")
    with pytest.raises(ValueError, match="needs a ```bash block"):
        parse("<!-- run -->\n```python\nprint(1)\n```\n")
    with pytest.raises(ValueError, match="relative path"):
        parse("<!-- file: ../x -->\n```text\nx\n```\n")
    with pytest.raises(ValueError, match="never closed"):
        parse("<!-- run -->\n```bash\necho\n")


def test_output_lines_match_with_spaces_normalised_and_elisions():
    printed = "loaded 3 rows\ntrain   64 | validation 8\n"
    assert output_misses("train 64 | validation 8\nloaded ... rows", printed) == []
    assert output_misses("train 65", printed) == ["train 65"]


def test_a_background_server_is_killed_when_the_page_ends(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- run -->\n```bash\nsleep 600 &\necho $! > pid\n```\n")
    run_page(page, tmp_path / "work", _env(tmp_path))
    pid = int((tmp_path / "work" / "pid").read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    pytest.fail("the background process outlived its page")


def test_the_hub_cache_resolves_a_hub_id_offline_to_the_stand_in(tmp_path, tiny_model_dir):
    from huggingface_hub import try_to_load_from_cache

    seed_hub_cache(tmp_path / "cache", {"Qwen/Qwen3-0.6B": tiny_model_dir("qwen3")})
    hit = try_to_load_from_cache("Qwen/Qwen3-0.6B", "config.json", cache_dir=tmp_path / "cache")
    assert isinstance(hit, str) and '"qwen3"' in open(hit, encoding="utf-8").read()
