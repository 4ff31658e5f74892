"""The JSON API that reads runs: the runs table, one run's summary, config, data report, report.md, log, files,
predictions, downloads, and the live event stream.

- GET /api/runs: {"runs": [summary, ...]} (runs.summary of every run under ROOT, newest first).
- GET /api/runs/{id}: {"summary", "config" (config.yaml text), "data_report" (run_info.json "data"),
  "has_report", "exports" (files under ROOT/exports/<run>), "jobs" (the studio's jobs of this run)}.
- GET /api/runs/{id}/log: every log.jsonl record (compare draws overlaid curves from it).
- GET /api/runs/{id}/report: {"html": report.md rendered (markdown_html, all text escaped)}.
- GET /api/runs/{id}/predictions?q=&offset=&limit=: browse.predictions_page.
- GET /api/runs/{id}/file?path=REL: a text file of the run (JSON {"path", "text"}), confined to the run folder.
- GET /api/runs/{id}/download?path=REL and GET /api/download?path=REL: a file streamed as an attachment,
  confined to the run folder and to ROOT respectively (exports live in ROOT/exports/, outside the run, since
  export refuses an output inside its run).
- GET /api/runs/{id}/events: server-sent events. Every 0.5 s, `event: log` with the log.jsonl records appended
  since the last event (a JSON list; the first event carries the whole file), and `event: status` with the run's
  summary when it changed; a comment line every 15 s keeps proxies from closing it. It ends when the client
  disconnects.
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, StreamingResponse

from .. import rundir
from ..jsonl import read_jsonl
from . import runs
from .browse import predictions_page
from .context import Studio, public_job, studio
from .markdown_html import to_html

router = APIRouter()
# GET /api/runs/{id} matches every longer path too: app.py includes this router after all the others
detail_router = APIRouter()
EVENT_INTERVAL_S = 0.5
KEEPALIVE_S = 15.0
EXPORTS = "exports"
TEXT_VIEW_LIMIT = 2 << 20  # bytes of a file shown as text


def run_summary(st: Studio, path: Path) -> dict:
    return st.summary(path)


def export_dir(st: Studio, run_id: str) -> Path:
    """Where the studio's exports of a run go: ROOT/exports/<run id with '/' as '__'>."""
    return st.root / EXPORTS / run_id.replace("/", "__")


@router.get("/api/runs")
def list_runs(request: Request) -> dict:
    st = studio(request)
    paths = runs.find_runs(st.root)
    ids = {st.run_id(p) for p in paths}
    # a run the studio just launched has no folder until training writes it: listed from its job meanwhile
    starting = {j["run"] for j in st.jobs.list() if j.get("kind") == "train" and j.get("state") == "running"
                and isinstance(j.get("run"), str) and j["run"] not in ids}
    found = [run_summary(st, p) for p in paths] + [run_summary(st, st.project.confine(r)) for r in sorted(starting)]
    found.sort(key=lambda s: s.get("started") or "", reverse=True)
    return {"runs": found}


def _files(folder: Path, root: Path) -> list[dict]:
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink() and not p.name.endswith(".partial"):
            st = p.stat()
            out.append({"name": p.name, "path": p.relative_to(root).as_posix(), "size": st.st_size,
                        "mtime": st.st_mtime})
    return out


@router.get("/api/runs/{run_id:path}/log")
def run_log(run_id: str, request: Request) -> dict:
    path = studio(request).run_dir(run_id)
    return {"records": read_jsonl(path / rundir.LOG)}


@router.get("/api/runs/{run_id:path}/report")
def run_report(run_id: str, request: Request) -> dict:
    path = studio(request).run_dir(run_id) / rundir.REPORT
    if not path.is_file():
        raise HTTPException(404, "no report.md yet: run `domaintune report RUN` (the Report button)")
    return {"html": to_html(path.read_text(encoding="utf-8", errors="replace"))}


@router.get("/api/runs/{run_id:path}/predictions")
def run_predictions(run_id: str, request: Request, q: str = "", offset: int = 0, limit: int = 20) -> dict:
    return predictions_page(studio(request).run_dir(run_id), q, offset, limit)


def _inside(st: Studio, base: Path, rel: str) -> Path:
    """`rel` under `base` (itself under ROOT), through project.confine: 403 for `..`, absolute paths and symlinks
    leaving ROOT, for hidden names, and for a path that stays in ROOT but leaves `base`."""
    base_rel = st.run_id(base) if base.resolve() != st.root.resolve() else ""
    if any(part.startswith(".") and part not in (".", "..") for part in rel.replace("\\", "/").split("/")):
        # hidden files stay private: .studio/ holds the job records, a chat server's key among them
        raise HTTPException(403, f"'{rel}': hidden files and folders are not served")
    path = st.project.confine(f"{base_rel}/{rel}" if base_rel else rel)
    if rel.startswith(("/", "\\")) or not path.resolve().is_relative_to(base.resolve()):
        raise HTTPException(403, f"'{rel}' is outside {base_rel or 'the project folder'}")
    if hidden(path.resolve().relative_to(st.root.resolve())):  # a symlink in a visible folder to a hidden one
        raise HTTPException(403, f"'{rel}': hidden files and folders are not served")
    return path


def hidden(rel: Path) -> bool:
    """Whether a path relative to ROOT lies in (or is) a hidden file or folder."""
    return any(part.startswith(".") for part in rel.parts)


@router.get("/api/runs/{run_id:path}/file")
def run_file(run_id: str, path: str, request: Request) -> dict:
    st = studio(request)
    target = _inside(st, st.run_dir(run_id), path)
    if not target.is_file():
        raise HTTPException(404, f"no file '{path}' in run {run_id}")
    if target.stat().st_size > TEXT_VIEW_LIMIT:
        raise HTTPException(413, f"'{path}' is over {TEXT_VIEW_LIMIT} bytes: download it instead")
    return {"path": path, "text": target.read_text(encoding="utf-8", errors="replace")}


def _download(target: Path, shown: str) -> FileResponse:
    if not target.is_file():
        raise HTTPException(404, f"no file '{shown}'")
    return FileResponse(target, filename=target.name, media_type="application/octet-stream",
                        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})


@router.get("/api/runs/{run_id:path}/download")
def run_download(run_id: str, path: str, request: Request) -> FileResponse:
    st = studio(request)
    return _download(_inside(st, st.run_dir(run_id), path), path)


@router.get("/api/download")
def download(path: str, request: Request) -> FileResponse:
    st = studio(request)
    return _download(_inside(st, st.root, path), path)


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


@router.get("/api/runs/{run_id:path}/events")
async def run_events(run_id: str, request: Request) -> StreamingResponse:
    st = studio(request)
    path = await asyncio.to_thread(st.run_dir, run_id)  # reads job records and /proc: off the event loop
    tail = runs.LogTail(path / rundir.LOG)

    async def events() -> AsyncIterator[str]:
        last: dict | None = None
        quiet_since = time.monotonic()
        while not await request.is_disconnected():
            records = await asyncio.to_thread(tail.read_new)
            if tail.restarted:  # log.jsonl was rewritten (a resume cuts it back): the page starts its curves afresh
                yield _sse("reset", {})
            if records:
                yield _sse("log", records)
                quiet_since = time.monotonic()
            now = await asyncio.to_thread(run_summary, st, path)
            if now != last:
                yield _sse("status", now)
                last, quiet_since = now, time.monotonic()
            if time.monotonic() - quiet_since > KEEPALIVE_S:
                yield ": keep-alive\n\n"
                quiet_since = time.monotonic()
            await asyncio.sleep(EVENT_INTERVAL_S)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@detail_router.get("/api/runs/{run_id:path}")
def run_detail(run_id: str, request: Request) -> dict:
    st = studio(request)
    path = st.run_dir(run_id)
    run = rundir.RunDir(path)
    config = run.config_path.read_text(encoding="utf-8", errors="replace") if run.config_path.is_file() else None
    try:
        data_report = run.run_info().get("data")
    except (OSError, ValueError, AttributeError):
        data_report = None
    jobs = [public_job(st, j) for j in st.jobs.list() if j.get("run") == st.run_id(path)]
    return {"summary": run_summary(st, path), "config": config, "data_report": data_report,
            "has_report": run.file(rundir.REPORT).is_file(),
            "has_predictions": run.file(rundir.PREDICTIONS).is_file() or run.file(rundir.BASE_PREDICTIONS).is_file(),
            "exports": _files(export_dir(st, st.run_id(path)), st.root), "jobs": jobs}
