"""Hand-built studio run directories and a studio served in a thread, for the studio's API tests (the files as
train, predict, eval, judge and report write them; no model is loaded)."""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path

from domaintune import rundir
from domaintune.studio.app import studio_server

CONFIG = """model:
  name_or_path: /models/tiny-qwen2
lora:
  enabled: true
data:
  path: /data/train.jsonl
train:
  output_dir: {out}
  max_steps: 10
"""


@contextlib.contextmanager
def serving(root: Path, **kwargs):
    """The studio over `root` on a free port of 127.0.0.1, in a thread: yields (base URL, the app's Studio)."""
    with serving_printed(root, **kwargs) as (url, _, studio):
        yield url, studio


@contextlib.contextmanager
def serving_printed(root: Path, host: str = "127.0.0.1", **kwargs):
    """`serving` bound to `host`: yields (http://127.0.0.1:PORT, the URL the studio would print, the app's Studio)."""
    server, printed = studio_server(root, host, 0, **kwargs)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the studio did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}", printed, server.config.app.state.studio
    finally:
        server.should_exit = True
        thread.join(10)


def jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def make_run(root: Path, name: str = "alpha", state: str = "finished") -> Path:
    run = root / "runs" / name
    run.mkdir(parents=True)
    (run / rundir.CONFIG).write_text(CONFIG.format(out=run))
    jsonl(run / rundir.LOG, [{"step": s, "loss": 2.0 - s / 10, "learning_rate": 1e-4 * (1 - s / 10), "tokens": 100 * s,
                              "time": float(s)} for s in (1, 2)] + [{"step": 2, "eval_loss": 1.95, "time": 2.5}])
    (run / "status.json").write_text(json.dumps({
        "state": state, "pid": os.getpid(), "host": os.uname().nodename, "started": "2026-12-07T04:00:00+00:00",
        "updated": "2026-12-07T04:01:00+00:00", "step": 2, "max_steps": 10, "message": ""}))
    (run / rundir.RUN_INFO).write_text(json.dumps({"data": {"rows": 40, "overlength": {"count": 3, "dropped": 1}}}))
    questions = ["What is a fever?", "How long does a cold last?", "When should a child see a doctor?",
                 "Is a rash contagious?", "What helps a cough?"]
    jsonl(run / rundir.PREDICTIONS, [{"id": i, "input": f"用户:{q}\n\n助手:", "target": f"ref {i}",  # as written
                                      "predict": f"tuned answer {i}"} for i, q in reversed(list(enumerate(questions)))])
    jsonl(run / rundir.BASE_PREDICTIONS, [{"id": i, "input": f"用户:{q}\n\n助手:", "target": f"ref {i}",
                                           "predict": f"base answer {i}"} for i, q in enumerate(questions)])
    jsonl(run / rundir.METRICS_PER_SAMPLE, [{"id": i, "bleu-4": 10.0 + i, "rouge-l": 20.0 + i} for i in range(5)])
    (run / rundir.JUDGE_SUMMARY).write_text(json.dumps({
        "status": "complete", "mode": "pairwise", "pairwise": {"rows": 5, "win_rate": 0.7, "win_rate_ci95": [0.4, 0.9]},
        "per_row": [{"id": i, "pairwise": "win" if i % 2 == 0 else "tie", "why": "both orders"} for i in range(5)]}))
    jsonl(run / rundir.JUDGE_RECORDS, [{"header": True}] + [
        {"kind": "pairwise", "key": f"{i}/pairwise/{o}", "id": i, "order": o, "verdict": "B", "winner": "b",
         "reason": f"answer {i} in order {o} is more precise"} for i in range(5) for o in ("AB", "BA")])
    (run / rundir.REPORT).write_text("# Report <script>alert(1)</script>\n\n| metric | value |\n|---|---|\n"
                                     "| bleu-4 | **12.5** |\n\nSee `predictions.jsonl`.\n")
    return run


def read_events(lines, until, timeout: float = 20.0) -> list[tuple[str, object]]:
    """(event, data) pairs from an SSE line iterator until `until(events)` holds."""
    events: list[tuple[str, object]] = []
    name, deadline = None, time.time() + timeout
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
            if until(events):
                return events
        assert time.time() < deadline, f"timed out; events so far: {events}"
    raise AssertionError(f"the stream ended; events: {events}")
