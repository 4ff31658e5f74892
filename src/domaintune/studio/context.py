"""What every studio route works on: the project folder and its jobs, held in `app.state.studio`, and the
lookups that turn a URL's run id or path into a confined path (404/403 as JSON, never a file outside ROOT)."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request

from ..rundir import RunDir
from . import runs
from .jobs import Jobs
from .project import Project


@dataclass
class Studio:
    project: Project
    jobs: Jobs
    token: str | None = None
    upload_limit: int = 0
    chats: dict[str, Any] = field(default_factory=dict)  # run id -> the serve job that chat goes to
    # held around "is this run training? no: start its training" (launch, resume): two requests at once can
    # never start two trainers writing one run folder
    launch_lock: threading.Lock = field(default_factory=threading.Lock)
    # run id -> (pid, time.monotonic()) of the SIGINT sent to a CLI-started training (no job record to mark)
    pid_stops: dict[str, tuple[int, float]] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return Path(self.project.root)

    def run_dir(self, run_id: str) -> Path:
        """The run directory a URL names (its path relative to ROOT); 403 for a path leaving ROOT (Forbidden,
        turned into 403 by the app), 404 for a folder that is not a run. A run a studio job trains counts before
        its folder exists (training writes it after loading the model), so its page can open at once."""
        path = self.project.confine(run_id)
        if path.is_dir() and RunDir(path).looks_like_run():
            return path
        if path != self.root.resolve() and self.train_job(self.run_id(path)) is not None:
            return path
        raise HTTPException(404, f"no run '{run_id}' under the project folder")

    def train_job(self, run_id: str) -> dict | None:
        """The newest train job of a run (Jobs.list gives the newest first), None when the studio started none."""
        return next((j for j in self.jobs.list() if j.get("run") == run_id and j.get("kind") == "train"), None)

    def running_train_job(self, run_id: str) -> dict | None:
        """The newest train job of a run that is still running, None when none is."""
        return next((j for j in self.jobs.list() if j.get("run") == run_id and j.get("kind") == "train"
                     and j.get("state") == "running"), None)

    def training(self, path: Path) -> str | None:
        """Why the run at `path` cannot be launched or resumed now (a message for a 409), None when nothing trains
        it: a studio train job of it is running, or its status.json says a process (the CLI's) trains it. Call it
        holding launch_lock, and start the training before releasing it."""
        path = Path(path).resolve()
        rel = self.run_id(path) if path.is_relative_to(self.root.resolve()) else str(path)
        job = self.running_train_job(rel)
        if job is not None:
            return (f"run {rel} is already training (job {job['id']}): stop it first (Stop on its page) and wait "
                    "for it to end")
        status = runs.run_status(path) if path.is_dir() else {}
        if status.get("state") == "running":
            return (f"run {rel} is already training (process {status.get('pid')} on {status.get('host')}): stop "
                    "it first and wait for it to end")
        return None

    def run_id(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.root.resolve()).as_posix()

    def summary(self, path: Path) -> dict:
        """runs.summary, with what only the studio's jobs know. While the run's newest train job is alive the run
        is running, whatever status.json says: before training rewrites it ("starting", e.g. a resume of a
        stopped run) and after training wrote its last state but is still exiting ("ending"), so Resume is offered
        only once the process is gone. A train job that ended before training wrote any status is failed, with
        the last line of its log."""
        s = dict(runs.summary(path, self.root))
        s.setdefault("id", self.run_id(path))
        root = f"{self.root.resolve()}{os.sep}"
        for key in ("model", "data"):  # paths the form saved absolute: shown from ROOT
            if isinstance(s.get(key), str) and s[key].startswith(root):
                s[key] = s[key][len(root):]
        job = self.train_job(s["id"])
        if job is None or s["status"] == "running":
            return s
        status = runs.read_status(path)
        if job.get("state") == "running":
            fresh = status is None or _time(status.get("started")) < _time(job.get("started"))
            s.update(status="running", message="starting: loading the model and the data" if fresh else
                     f"ending ({s['status']}): the training process is saving and exiting")
        elif status is None and job.get("state") == "failed" and not RunDir(path).is_finished():
            lines = [line for line in self.jobs.log_tail(job["id"], 4096).splitlines() if line.strip()]
            s.update(status="failed", message=lines[-1] if lines else f"job {job['id']} failed")
        return s


def _time(text: Any) -> datetime:
    """An ISO-8601 time (naive ones taken as UTC); the earliest time when unreadable."""
    try:
        t = datetime.fromisoformat(str(text))
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def studio(request: Request) -> Studio:
    return request.app.state.studio


def public_job(st: Studio, job: dict) -> dict[str, Any]:
    """A job record as a page sees it: its state added, "stopping" (it was sent SIGINT and is still saving and
    exiting), a chat server's key left out (of the record and argv)."""
    key = job.get("key")
    state = st.jobs.state(job)
    stopping = state == "running" and bool(job.get("stop_requested"))
    out = {k: v for k, v in job.items() if k != "key"} | {"state": state, "stopping": stopping}
    if key:
        out["argv"] = ["***" if a == key else a for a in job.get("argv", [])]
    return out
