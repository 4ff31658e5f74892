"""Runs as the studio lists them, from run directories built by hand in the shapes their writers produce."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from domaintune import rundir
from domaintune.studio.runs import DIED, LogTail, data_label, find_runs, read_status, run_status, summary

CONFIG = """\
model:
  name_or_path: Qwen/Qwen3-0.6B
  quantization: 4bit
lora:
  enabled: true
data:
  path:
    - data/a.jsonl
    - {hub: org/set, name: set}
train:
  stage: sft
  max_steps: 40
"""


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def iso(dt: datetime) -> str:
    return dt.isoformat(timespec="seconds")


def write_status(run, **fields):
    status = {"state": "running", "pid": os.getpid(), "host": socket.gethostname(),
              "started": "2026-12-07T04:00:00+00:00", "updated": iso(datetime.now(timezone.utc)), "step": 20,
              "max_steps": 40, "message": ""}
    status.update(fields)
    (run / "status.json").write_text(json.dumps(status))


def log_lines(run, records, torn=""):
    text = "".join(json.dumps(r) + "\n" for r in records) + torn
    (run / rundir.LOG).write_text(text)


@pytest.fixture
def run(tmp_path):
    """A running QLoRA run half-way: config.yaml, log.jsonl (as training/callbacks.py's JsonlLog writes it, with
    the memory_mib the lead adds), status.json, metrics.json, judge.json and benchmark.json."""
    path = tmp_path / "runs" / "qlora-1"
    path.mkdir(parents=True)
    (path / rundir.CONFIG).write_text(CONFIG)
    records = [{"step": s, "epoch": s / 40, "loss": 2.0 - s / 100, "learning_rate": 1e-4, "tokens": 1000 * s,
                "time": 2.0 * s, "memory_mib": 500 + s} for s in range(5, 25, 5)]
    records.insert(2, {"step": 10, "epoch": 0.25, "eval_loss": 1.9, "time": 21.0})
    log_lines(path, records, torn='{"step": 25, "lo')
    write_status(path)
    # evaluation/metrics.py run_eval: SUMMARY_KEYS; predict adds loss/perplexity; judge.py and benchmark.py merge
    # their blocks under "judge" / "benchmark".
    (path / rundir.METRICS).write_text(json.dumps({
        "num_samples": 8, "bleu-4": 12.5, "rouge-1": 30.1, "rouge-2": 10.2, "rouge-l": 25.0, "corpus_bleu": 11.0,
        "exact_match": 0.0, "avg_predict_len": 42.5, "loss": 1.5, "judge": {"model": "m"},
        "benchmark": {"tasks": {}}}))
    # evaluation/judge.py Judge.summarize + judge_stats.pairwise_stats (status complete)
    (path / rundir.JUDGE_SUMMARY).write_text(json.dumps({
        "status": "complete", "error": None, "mode": "pairwise", "rows": 8, "progress": {"done": 16, "total": 16},
        "pairwise": {"rows": 8, "usable_rows": 8, "wins": 5, "ties": 1, "losses": 2, "win_rate": 0.6875,
                     "win_rate_ci95": [0.375, 0.9375], "ties_by_cause": {}, "unparseable_rows": 0,
                     "first_position_rate": 0.5},
        "counts": {"calls": 16, "unparseable": 0}, "per_row": []}))
    # evaluation/benchmark.py save_results
    (path / rundir.BENCHMARK).write_text(json.dumps({
        "tasks": {"arc_easy": {"base": {"acc": 0.5, "acc_stderr": 0.1}, "tuned": {"acc": 0.55, "acc_stderr": 0.1},
                               "delta": {"acc": 0.05}, "n": 20}},
        "limit": 20, "n": {"arc_easy": 20}, "lm_eval_version": "0.4", "date": "2026-12-07T04:00:00+00:00",
        "run": str(path)}))
    return path


def test_summary_of_a_running_run(run, tmp_path):
    s = summary(run, tmp_path)
    assert s["id"] == "runs/qlora-1" and s["name"] == "qlora-1"
    assert (s["status"], s["message"]) == ("running", "")
    assert s["model"] == "Qwen/Qwen3-0.6B"
    assert s["data"] == "data/a.jsonl, set"
    assert (s["method"], s["stage"]) == ("qlora", "sft")
    assert (s["step"], s["max_steps"]) == (20, 40)  # from status.json
    assert s["loss"] == pytest.approx(1.8)  # the torn step 25 is not read
    assert s["eval_loss"] == 1.9
    assert s["tokens_per_s"] == 500.0  # 15000 tokens over 30 s between steps 5 and 20
    assert s["eta_s"] == pytest.approx(40.0)  # 20 steps left at 2 s each
    assert s["memory_mib"] == 520
    assert s["started"] == "2026-12-07T04:00:00+00:00"
    assert s["metrics"] == {"num_samples": 8, "bleu-4": 12.5, "rouge-1": 30.1, "rouge-2": 10.2, "rouge-l": 25.0,
                            "corpus_bleu": 11.0, "exact_match": 0.0, "avg_predict_len": 42.5, "loss": 1.5}
    assert s["judge"] == {"status": "complete", "mode": "pairwise", "win_rate": 0.6875, "low": 0.375,
                          "high": 0.9375, "n": 8, "usable": 8, "problem": None, "done": 16, "total": 16}
    assert s["benchmark"] == {"arc_easy": {"delta": {"acc": 0.05}, "n": 20}}


def test_a_running_status_whose_process_is_gone_is_failed(run):
    write_status(run, pid=dead_pid())
    st = run_status(run)
    assert (st["state"], st["message"]) == ("failed", DIED)
    assert summary(run)["eta_s"] is None and summary(run)["id"] == "qlora-1"
    write_status(run, pid=0)  # never signal a process group
    assert run_status(run)["state"] == "failed"


def test_a_pid_handed_to_another_process_is_not_the_run(run):
    """status.json's pid_start (written by training) tells the run's process from a later one given its pid."""
    from domaintune.processes import start_time

    mine = start_time(os.getpid())
    assert isinstance(mine, int)
    write_status(run, pid_start=mine)
    assert run_status(run)["state"] == "running"
    write_status(run, pid_start=mine - 1)  # the run's process started earlier: this pid is someone else's now
    assert (run_status(run)["state"], run_status(run)["message"]) == ("failed", DIED)


def test_another_hosts_status_is_trusted_until_it_is_stale(run):
    write_status(run, host="elsewhere", pid=1)
    assert run_status(run)["state"] == "running"
    write_status(run, host="elsewhere", updated=iso(datetime.now(timezone.utc) - timedelta(hours=1)))
    assert run_status(run)["state"] == "failed"


@pytest.mark.parametrize("state", ["finished", "stopped", "failed"])
def test_ended_states_are_reported_as_written(run, state):
    write_status(run, state=state, pid=dead_pid(), message="boom" if state == "failed" else "")
    st = run_status(run)
    assert st["state"] == state and st["message"] == ("boom" if state == "failed" else "")
    assert summary(run)["eta_s"] is None


def test_runs_without_status_json(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    (run / rundir.CONFIG).write_text("model: {name_or_path: m}\nlora: {enabled: false}\n")
    assert read_status(run) is None
    assert run_status(run)["state"] == "stopped"
    (run / rundir.MODEL_CONFIG).write_text("{}")
    (run / "model.safetensors").write_bytes(b"x")
    (run / rundir.RUN_INFO).write_text(json.dumps({"method": "full", "train": {"global_steps": 7}}))
    s = summary(run)
    assert s["status"] == "finished" and s["method"] == "full" and s["stage"] == "sft"
    (run / "status.json").write_text("{torn")  # unreadable: as if absent
    assert run_status(run)["state"] == "finished"


def test_an_empty_folder_gives_none_fields(tmp_path):
    s = summary(tmp_path)
    assert s["status"] == "stopped"
    for key in ("model", "data", "method", "stage", "step", "max_steps", "loss", "eval_loss", "tokens_per_s",
                "memory_mib", "eta_s", "started", "metrics", "judge", "benchmark"):
        assert s[key] is None, key


def test_odd_files_never_raise(run):
    (run / rundir.CONFIG).write_text("model: [unclosed\n")
    (run / rundir.JUDGE_SUMMARY).write_text(json.dumps({"status": "running", "mode": "pairwise"}))
    (run / rundir.BENCHMARK).write_text("[1, 2]")
    (run / rundir.METRICS).write_bytes(b"\xff\xfe")
    log_lines(run, [{"step": "x", "loss": "nan?"}, [1], {"step": 3, "loss": True}])
    s = summary(run)
    assert s["model"] is None and s["method"] is None and s["metrics"] is None and s["benchmark"] is None
    assert s["judge"]["status"] == "running" and s["judge"]["win_rate"] is None
    assert s["loss"] is None and s["step"] == 20  # from status.json


def test_checkpoint_max_steps_for_a_run_without_status(tmp_path):
    run = tmp_path / "r"
    (run / "checkpoint-10").mkdir(parents=True)
    (run / "checkpoint-10" / rundir.TRAINER_STATE).write_text(json.dumps({"global_step": 10, "max_steps": 30}))
    log_lines(run, [{"step": 10, "loss": 1.0, "time": 5.0}])
    s = summary(run)
    assert (s["step"], s["max_steps"], s["status"]) == (10, 30, "stopped")


def test_data_label():
    assert data_label("a.jsonl") == "a.jsonl"
    assert data_label({"path": "x.csv"}) == "x.csv"
    assert data_label([{"hub": "o/n"}, 3]) == "o/n"
    assert data_label(None) is None


def test_find_runs(tmp_path):
    for rel, marker in [("runs/a", rundir.CONFIG), ("runs/group/b", rundir.LOG), ("elsewhere/c", rundir.RUN_INFO),
                        ("runs/a/checkpoint-5", rundir.CONFIG), ("runs/a/nested", rundir.CONFIG),
                        ("1/2/3/4/deep", rundir.CONFIG), ("1/2/3/four", rundir.CONFIG), (".studio/x", rundir.CONFIG),
                        ("data/notarun", "x.jsonl")]:
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / marker).write_text("")
    (tmp_path / "runs" / "ckonly" / "checkpoint-3").mkdir(parents=True)
    os.symlink(tmp_path / "runs" / "a", tmp_path / "link")
    found = [p.relative_to(tmp_path).as_posix() for p in find_runs(tmp_path)]
    assert found == ["1/2/3/four", "elsewhere/c", "runs/a", "runs/ckonly", "runs/group/b"]


def test_log_tail_reads_only_complete_new_records(tmp_path):
    path = tmp_path / rundir.LOG
    tail = LogTail(path)
    assert tail.read_new() == []  # not there yet
    path.write_text('{"step": 1}\n{"step": 2')
    assert tail.read_new() == [{"step": 1}]
    assert tail.read_new() == []  # the torn line waits
    with open(path, "a") as f:
        f.write(', "loss": 1.5}\n\nnot json\n[3]\n{"step": 3}\n')
    assert tail.read_new() == [{"step": 2, "loss": 1.5}, {"step": 3}]
    assert not tail.restarted
    assert tail.read_new() == []


def test_log_tail_restarts_on_a_shrunk_or_replaced_file(tmp_path):
    path = tmp_path / rundir.LOG
    tail = LogTail(path)
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)))
    assert len(tail.read_new()) == 5
    with open(path, "w") as f:  # truncated in place: shorter than the offset
        f.write('{"step": 1}\n')
    assert tail.read_new() == [{"step": 1}] and tail.restarted
    assert tail.read_new() == [] and not tail.restarted
    # resumed training rewrites the log atomically (a new file), here longer than what was read
    tmp = tmp_path / "new"
    tmp.write_text("".join(json.dumps({"step": s, "resumed": True}) + "\n" for s in range(1, 4)))
    os.replace(tmp, path)
    assert [r["step"] for r in tail.read_new()] == [1, 2, 3] and tail.restarted


def test_summaries_of_a_growing_then_rewritten_log_equal_a_full_read(tmp_path):
    """The summary keeps a digest of each log and reads only new lines: after appends and after a rewrite (a
    resume) its figures equal those of the whole file read afresh."""
    from domaintune.studio import runs

    run = tmp_path / "growing"
    run.mkdir()
    (run / "config.yaml").write_text("model: {name_or_path: m}\ntrain: {max_steps: 500}\n")
    write_status(run, step=None, max_steps=None)

    def rec(s):
        out = {"step": s, "time": 1.5 * s + (s % 7) * 0.1, "tokens": 100 * s + s * s, "memory_mib": 300 + (s * 37) % 50}
        if s % 3:
            out["loss"] = 2.0 / s
        if s % 25 == 0:
            out["eval_loss"] = 1.0 / s
        return out

    def check(records):
        s = summary(run)
        per_step, tokens_per_s = runs._rates(records)
        assert (s["step"], s["loss"], s["eval_loss"]) == (records[-1]["step"], runs._last(records, "loss"),
                                                          runs._last(records, "eval_loss"))
        assert s["tokens_per_s"] == tokens_per_s and s["memory_mib"] == max(r["memory_mib"] for r in records)
        assert s["eta_s"] == round((500 - records[-1]["step"]) * per_step, 1)

    records = [rec(s) for s in range(1, 121)]
    log_lines(run, records)
    check(records)
    more = [rec(s) for s in range(121, 160)]
    with open(run / "log.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in more)
    check(records + more)
    log_lines(run, records[:40])  # rewritten shorter: resumed from step 40
    check(records[:40])


def test_the_method_is_named_as_run_info_names_it(tmp_path):
    run = tmp_path / "m"
    run.mkdir()
    for text, method in (("lora: {enabled: true}\n", "lora"),
                         ("lora: {enabled: true}\nmodel: {quantization: 4bit}\n", "qlora"),
                         ("lora: {enabled: false}\n", "full"),
                         ("lora: {enabled: false}\nfreeze: {enabled: true, last_layers: 2}\n", "freeze")):
        (run / "config.yaml").write_text(text)
        assert summary(run)["method"] == method, text
