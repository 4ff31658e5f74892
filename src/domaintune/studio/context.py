"""What every studio route works on: the project folder and its jobs, held in `app.state.studio`, and the
lookups that turn a URL's run id or path into a confined path (404/403 as JSON, never a file outside ROOT)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request

from ..rundir import RunDir
from .jobs import Jobs
from .project import Project


@dataclass
class Studio:
    project: Project
    jobs: Jobs
    token: str | None = None
    upload_limit: int = 0
    chats: dict[str, Any] = field(default_factory=dict)  # run id -> the serve job that chat goes to

    @property
    def root(self) -> Path:
        return Path(self.project.root)

    def run_dir(self, run_id: str) -> Path:
        """The run directory a URL names (its path relative to ROOT); 403 for a path leaving ROOT (Forbidden,
        turned into 403 by the app), 404 for a folder that is not a run."""
        path = self.project.confine(run_id)
        if not path.is_dir() or not RunDir(path).looks_like_run():
            raise HTTPException(404, f"no run '{run_id}' under the project folder")
        return path

    def run_id(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.root.resolve()).as_posix()


def studio(request: Request) -> Studio:
    return request.app.state.studio


def public_job(st: Studio, job: dict) -> dict[str, Any]:
    """A job record as a page sees it: its state added, a chat server's key left out (of the record and argv)."""
    key = job.get("key")
    out = {k: v for k, v in job.items() if k != "key"} | {"state": st.jobs.state(job)}
    if key:
        out["argv"] = ["***" if a == key else a for a in job.get("argv", [])]
    return out
