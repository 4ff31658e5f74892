"""Studio jobs with real processes: exit codes, stop by SIGINT, a job outliving the studio, reattach, pid reuse."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from domaintune import __version__
from domaintune.errors import UserError
from domaintune.studio.jobs import Jobs, job_state, proc_start_time
from domaintune.studio.project import Project

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="studio jobs read /proc")

# Waits for Ctrl-C like `train` does: on KeyboardInterrupt it says so and exits 130.
SLEEPER = textwrap.dedent("""\
    import sys, time
    print("ready", flush=True)
    try:
        time.sleep(120)
    except KeyboardInterrupt:
        print("interrupted: checkpoint saved", flush=True)
        sys.exit(130)
""")
SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture
def project(tmp_path, monkeypatch):
    # the job processes import domaintune from this checkout, whatever is installed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")])))
    project = Project(tmp_path)
    yield project
    for job in Jobs(project).list():  # a failed test leaves no sleeper behind
        if job["state"] == "running":
            os.killpg(job["pid"], signal.SIGKILL)


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def ended(jobs, job_id):
    return wait_for(lambda: (j := jobs.get(job_id))["ended"] and j["state"] != "running" and j)


def test_a_finished_job_writes_its_exit_code_and_log(project):
    jobs = Jobs(project)
    job = jobs.start("version", ["--version"], run="runs/a", extra={"note": "n"})
    assert job["kind"] == "version" and job["argv"] == ["--version"] and job["run"] == "runs/a"
    assert job["note"] == "n" and job["log"] == f".studio/jobs/{job['id']}.log"
    assert job["pid"] > 0 and isinstance(job["start_time"], int) and job["exit_code"] is None
    record = json.loads((project.jobs_dir / f"{job['id']}.json").read_text())
    assert record["pid"] == job["pid"] and "state" not in record
    done = ended(jobs, job["id"])
    assert (done["state"], done["exit_code"]) == ("finished", 0)
    assert jobs.log_tail(job["id"], 1000) == f"domaintune {__version__}\n"
    assert [j["id"] for j in jobs.list()] == [job["id"]]


@pytest.mark.parametrize(("code", "state"), [(1, "failed"), (130, "stopped"), (3, "failed")])
def test_exit_codes_give_the_state(project, code, state):
    jobs = Jobs(project)
    job = jobs.start("t", [], command=[sys.executable, "-c", f"raise SystemExit({code})"])
    done = ended(jobs, job["id"])
    assert (done["exit_code"], done["state"]) == (code, state)


def test_stop_sends_sigint_and_the_child_exits_130(project):
    jobs = Jobs(project)
    job = jobs.start("train", ["train", "c.yaml"], command=[sys.executable, "-c", SLEEPER])
    wait_for(lambda: "ready" in jobs.log_tail(job["id"]))
    assert jobs.get(job["id"])["state"] == "running"
    jobs.stop(job["id"])
    done = ended(jobs, job["id"])
    assert (done["state"], done["exit_code"]) == ("stopped", 130)  # job.py itself lived on to record it
    assert jobs.log_tail(job["id"]).splitlines()[-1] == "interrupted: checkpoint saved"
    with pytest.raises(UserError, match="is stopped, not running"):
        jobs.stop(job["id"])


def test_sigterm_to_the_job_is_forwarded(project):
    jobs = Jobs(project)
    job = jobs.start("t", [], command=[sys.executable, "-c", SLEEPER])
    wait_for(lambda: "ready" in jobs.log_tail(job["id"]))
    os.kill(job["pid"], signal.SIGTERM)  # job.py only: it passes it on
    done = ended(jobs, job["id"])
    assert (done["state"], done["exit_code"]) == ("failed", 128 + signal.SIGTERM)


def test_a_job_outlives_a_killed_studio_and_is_found_again(project):
    studio = textwrap.dedent(f"""\
        import sys, time
        from domaintune.studio.jobs import Jobs
        from domaintune.studio.project import Project
        jobs = Jobs(Project({str(project.root)!r}))
        job = jobs.start("train", ["train"], command=[sys.executable, "-c", {SLEEPER!r}])
        print(job["id"], flush=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", studio], stdout=subprocess.PIPE, text=True)
    try:
        job_id = parent.stdout.readline().strip()
    finally:
        parent.kill()  # SIGKILL: no clean-up of any kind
        parent.wait()
    jobs = Jobs(project)  # a new studio over the same folder
    wait_for(lambda: "ready" in jobs.log_tail(job_id))
    job = jobs.get(job_id)
    assert job["state"] == "running" and [j["state"] for j in jobs.list()] == ["running"]
    jobs.stop(job_id)
    done = ended(jobs, job_id)
    assert (done["state"], done["exit_code"]) == ("stopped", 130)


def test_pid_reuse_guard(project):
    me = {"id": "t", "pid": os.getpid(), "start_time": proc_start_time(os.getpid()), "exit_code": None}
    assert job_state(me) == "running"
    assert job_state({**me, "start_time": me["start_time"] + 1}) == "failed"  # another process got the pid
    assert job_state({**me, "start_time": me["start_time"] + 1, "exit_code": 0}) == "finished"
    assert job_state({**me, "pid": None}) == "failed"
    assert job_state({**me, "pid": 0}) == "failed"
    # Regression (issue 27, CI): job.py records the exit code, then exits; until it has, its pid still lives, and a
    # page read "ended" with state "running" (and a stop still "stopping"). The recorded code wins.
    assert job_state({**me, "exit_code": 130}) == "stopped" and job_state({**me, "exit_code": 0}) == "finished"


def test_ids_and_kinds_are_checked(project):
    jobs = Jobs(project)
    for bad in ("../x", "Train", "a b", ""):
        with pytest.raises(UserError, match="job kind"):
            jobs.start(bad, [])
    with pytest.raises(ValueError, match="record's own fields"):
        jobs.start("t", [], extra={"pid": 1})
    for bad in ("../../etc/passwd", "t-20261207-000000-zzzz"):
        with pytest.raises(UserError, match="not a job id"):
            jobs.get(bad)
    with pytest.raises(UserError, match="no job"):
        jobs.get("t-20261207-000000-abcd")
    assert jobs.list() == [] and list(project.jobs_dir.iterdir()) == []


def test_log_tail_cuts_at_a_line_start(project):
    jobs = Jobs(project)
    (project.jobs_dir / "t-20261207-000000-abcd.log").write_text("first line\nsecond\nthird\n")
    assert jobs.log_tail("t-20261207-000000-abcd", 12) == "third\n"
    assert jobs.log_tail("t-20261207-000000-abcd", 1000) == "first line\nsecond\nthird\n"
    assert jobs.log_tail("t-20261207-000000-abce", 10) == ""
