"""gen-data's progress without a terminal (nohup, CI, `| tee`): plain lines on stderr, not a silent bar."""
from __future__ import annotations

import io
import re

from domaintune.datagen.progress import Progress


def lines(stream: io.StringIO) -> list[str]:
    return [re.sub(r" \d+s$", " Ns", line) for line in stream.getvalue().splitlines()]


def test_lines_at_the_start_every_n_items_and_at_the_end():
    """Regression (issue 22, 29): without a terminal gen-data printed nothing for 21 minutes (tqdm's bar turns
    itself off there)."""
    s = io.StringIO()
    bar = Progress("answers", total=10, initial=1, stream=s, every=3, interval=3600)
    for _ in range(4):
        bar.update(1, {"kept": bar.n + 1, "dropped": 0})
    bar.update(0, {"kept": 5, "dropped": "1: judge_unclear 1"})  # a drop: shown at the next line
    bar.close()
    assert lines(s) == ["gen-data answers: 1/10 Ns",
                        "gen-data answers: 4/10 (kept 4, dropped 0) Ns",
                        "gen-data answers: 5/10 (kept 5, dropped 1: judge_unclear 1) Ns"]


def test_a_line_every_interval_when_items_come_slowly():
    s = io.StringIO()
    bar = Progress("questions", total=1000, stream=s, interval=0)  # every update is past the interval
    bar.update(0, {"kept": 0, "dropped": 1})
    bar.update(1, {"kept": 1, "dropped": 1})
    bar.close()  # nothing new since the last line: no repeat
    assert lines(s) == ["gen-data questions: 0/1000 Ns", "gen-data questions: 0/1000 (kept 0, dropped 1) Ns",
                        "gen-data questions: 1/1000 (kept 1, dropped 1) Ns"]
