"""The jobs the studio starts: each a CLI process (`python -m domaintune VERB ...`) that outlives the studio.

A job is started as `python -m domaintune.studio.job RECORD` (see job.py) in a session of its own, with stdin
from /dev/null and stdout+stderr into ROOT/.studio/jobs/ID.log (files, never pipes: a pipe would break when
the studio ends, SIGKILL included). ROOT/.studio/jobs/ID.json is the job's record:

    {id, kind, argv, run (relpath or None), pid, start_time, started, log, exit_code, ended, **extra}
    (+ env: the names of the variables the job was given, never their values; + stop_requested: when the
    studio first sent it SIGINT)

`pid` is the job process (job.py, also its process group), `start_time` its start in clock ticks since boot
from /proc/PID/stat: a pid alone could be a later process that got the same number. The studio writes the
record at the start; job.py writes exit_code and ended when its child ends; later writes (stop_requested) take
the record's lock (job.locked) as job.py does. A studio started later over the same folder reads the records
back, so a running job is found again (reattached) by its pid and start time. ROOT/.studio/jobs is private to
its owner (0700): a record may hold a chat server's key.

Linux only: liveness and the start time come from /proc.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import processes
from ..errors import UserError
from ..jsonl import write_atomic
from .job import locked, now_iso
from .project import Project

_KIND = re.compile(r"[a-z][a-z0-9_]{0,31}")
_ID = re.compile(r"[a-z][a-z0-9_]{0,31}-\d{8}-\d{6}-[0-9a-f]{4}")
CORE_KEYS = ("id", "kind", "argv", "run", "pid", "start_time", "started", "log", "exit_code", "ended", "command",
             "env", "stop_requested")
STOPPED_CODE = 130  # the shell's code for Ctrl-C: what `train` exits with after saving a checkpoint on SIGINT


proc_start_time = processes.start_time  # the start time of a live process (None: none, or ended); processes.py


def job_state(job: dict) -> str:
    """running | finished | stopped | failed of a record: by the exit code job.py recorded once it has (0 finished,
    130 stopped, other failed), else running while its process lives (the pid exists with the recorded start
    time); ended without a recorded code (job.py itself killed): failed. The code comes first: job.py writes it
    and then exits, and in between its pid still lives (a page saw "ended" and "running" together)."""
    code = job.get("exit_code")
    pid, start = job.get("pid"), job.get("start_time")
    if code is None and isinstance(pid, int) and start is not None and proc_start_time(pid) == start:
        return "running"
    if code == 0:
        return "finished"
    if code == STOPPED_CODE:
        return "stopped"
    return "failed"


class Jobs:
    """The jobs of one project folder: start, list, stop, and read their logs."""

    def __init__(self, project: Project):
        self.project = project
        self._procs: dict[str, subprocess.Popen] = {}  # jobs this process started: polled so they are reaped

    def start(self, kind: str, argv: list[str], run: str | None = None, extra: dict | None = None,
              command: list[str] | None = None, env: dict[str, str] | None = None) -> dict:
        """Start `python -m domaintune *argv` as a job; return its record. `kind` (lowercase letters, digits,
        "_") names the verb in the id; `run` is the run directory's relpath the job works on; `extra` keys are
        added to the record. `env`: variables set for the job's processes (a secret such as the chat server's
        key goes here, not in argv, which any local user can read in /proc/PID/cmdline); the record keeps
        only their names. The job runs in ROOT (relative paths in argv are read from there). `command`
        replaces the whole child command line: for tests only."""
        if not isinstance(kind, str) or not _KIND.fullmatch(kind):
            raise UserError(f"job kind {kind!r}: use lowercase letters, digits and '_' (e.g. train, predict)")
        clash = sorted(set(extra or {}) & set(CORE_KEYS))
        if clash:
            raise ValueError(f"extra keys {clash} would replace the record's own fields")
        if env is not None and not all(isinstance(k, str) and k and isinstance(v, str) for k, v in env.items()):
            raise ValueError("env maps variable names to text values")
        jobs_dir = self.project.jobs_dir
        jobs_dir.chmod(0o700)  # records and logs are the owner's alone (a record may hold a chat server's key)
        job_id = f"{kind}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
        while (jobs_dir / f"{job_id}.json").exists():  # same kind, same second, same 4 hex digits
            job_id = f"{job_id[:-4]}{secrets.token_hex(2)}"
        record_path, log_path = jobs_dir / f"{job_id}.json", jobs_dir / f"{job_id}.log"
        record: dict[str, Any] = {
            "id": job_id, "kind": kind, "argv": [str(a) for a in argv], "run": run, "pid": None,
            "start_time": None, "started": now_iso(), "log": self.project.relpath(log_path), "exit_code": None,
            "ended": None, **(extra or {})}
        if command is not None:
            record["command"] = [str(a) for a in command]
        if env:
            record["env"] = sorted(env)
        _write(record_path, record)
        # job.py's child inherits this environment; PYTHONUNBUFFERED: the log shows progress as it happens
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "domaintune.studio.job", str(record_path)],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=self.project.root, env=child_env, start_new_session=True)
        # job.py waits for this write (the pid in the record) before it records the exit code, so the two never
        # overwrite each other.
        record.update(pid=proc.pid, start_time=proc_start_time(proc.pid))
        _write(record_path, record)
        self._procs[job_id] = proc
        return {**record, "state": self.state(record)}

    def list(self) -> list[dict]:
        """Every job's record with its "state", newest first."""
        jobs = []
        for path in self.project.jobs_dir.glob("*.json"):
            if _ID.fullmatch(path.stem) and (rec := _read(path)) is not None:
                jobs.append({**rec, "state": self.state(rec)})
        return sorted(jobs, key=lambda j: (str(j.get("started")), j["id"]), reverse=True)

    def get(self, job_id: str) -> dict:
        """One job's record with its "state"; UserError for an unknown id."""
        rec = _read(self._record_path(job_id))
        if rec is None:
            raise UserError(f"no job '{job_id}' in {self.project.jobs_dir}")
        return {**rec, "state": self.state(rec)}

    def state(self, job: dict) -> str:
        """running | finished | stopped | failed (see job_state)."""
        proc = self._procs.get(str(job.get("id")))
        if proc is not None and proc.poll() is not None:  # reap our own child, so it is not left a zombie
            del self._procs[str(job.get("id"))]
        return job_state(job)

    def stop(self, job_id: str) -> dict:
        """Send SIGINT to a running job's process group (what Ctrl-C does: training saves a checkpoint and exits
        130) and record the time in "stop_requested"; return the record. UserError when the job is not running;
        AlreadyStopping when it was sent SIGINT before: a second Ctrl-C makes training stop at once, without
        the checkpoint of its current step, so it is never sent twice."""
        record_path = self._record_path(job_id)
        self.get(job_id)  # an unknown id is refused before its lock file is made
        with locked(record_path):  # check and mark at once: two stops at the same moment send one SIGINT
            job = self.get(job_id)
            if job["state"] != "running":
                raise UserError(f"job '{job_id}' is {job['state']}, not running: nothing to stop")
            if job.get("stop_requested"):
                raise AlreadyStopping(f"job '{job_id}' is already stopping (asked at {job['stop_requested']}): "
                                      "wait for it to end")
            job["stop_requested"] = now_iso()
            _write(record_path, {k: v for k, v in job.items() if k != "state"})
        try:
            os.killpg(job["pid"], signal.SIGINT)  # job.py leads its own session: its group holds the whole job
        except ProcessLookupError:
            pass  # it ended in between
        return job

    def log_tail(self, job_id: str, n_bytes: int = 65536) -> str:
        """The last `n_bytes` of the job's output (from a line start when cut), "" before it wrote anything."""
        path = self._record_path(job_id).with_suffix(".log")
        try:
            with open(path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(size - max(n_bytes, 0), 0))
                data = f.read()
        except OSError:
            return ""
        if len(data) < size and b"\n" in data:
            data = data[data.index(b"\n") + 1:]
        return data.decode("utf-8", errors="replace")

    def _record_path(self, job_id: str) -> Path:
        if not isinstance(job_id, str) or not _ID.fullmatch(job_id):
            raise UserError(f"'{job_id}' is not a job id (KIND-YYYYMMDD-HHMMSS-XXXX)")
        return self.project.jobs_dir / f"{job_id}.json"


class AlreadyStopping(UserError):
    """A stop of a job that was already sent SIGINT and is still running (it is saving and exiting)."""


def _read(path: Path) -> dict | None:
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("id"), str) else None


def _write(path: Path, record: dict) -> None:
    write_atomic(path, json.dumps(record, ensure_ascii=False, indent=1) + "\n")
