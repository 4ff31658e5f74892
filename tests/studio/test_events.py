"""The run page's event stream when log.jsonl is rewritten (a resume cuts it back to its checkpoint): a `reset`
event first, so the page starts its curves afresh, then the records of the new file; no stale point stays."""
from __future__ import annotations

import httpx

from domaintune import rundir
from studio_runs import jsonl, make_run, read_events, serving


def test_a_rewritten_log_is_sent_after_a_reset(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    log = make_run(root) / rundir.LOG
    with serving(root) as (url, _), httpx.stream("GET", f"{url}/api/runs/runs/alpha/events", timeout=30) as r:
        lines = r.iter_lines()
        first = read_events(lines, lambda ev: any(e == "log" for e, _ in ev))
        assert [x["step"] for x in [d for e, d in first if e == "log"][0]] == [1, 2, 2]
        jsonl(log, [{"step": 1, "loss": 1.25}])  # a shorter file: resumed from checkpoint-1
        later = read_events(lines, lambda ev: any(e == "log" for e, _ in ev))
    names = [e for e, _ in later]
    assert "reset" in names and names.index("reset") < names.index("log")
    assert [d for e, d in later if e == "log"] == [[{"step": 1, "loss": 1.25}]]
