"""The JSON API that acts on runs: every action is a job running the CLI (`python -m domaintune VERB ...`,
studio/jobs.py), so the studio holds no second copy of any verb and a job outlives the page and the studio.

- POST /api/runs/{id}/stop: SIGINT to the run's training (as Ctrl-C: it saves a checkpoint and exits 130); the
  studio's train job when it has one, else the pid in status.json when it runs on this host (a CLI run). Once
  only: a second SIGINT stops training at once without its checkpoint, so a second stop is a 409 while the
  job runs (its record's stop_requested; the job shows "stopping": true), and for 60 s for a CLI run.
- POST /api/runs/{id}/resume: `train RUN/config.yaml train.output_dir=RUN --resume`: the run's own resolved
  config (training writes it when it starts; configs/NAME.yaml may since have been saved over, for another
  folder), with the folder pinned. 409 when the run is training or never started (no config.yaml).
- POST /api/runs/{id}/predict {"data": REL, "base": bool}: `predict RUN --data FILE [--base-only]`.
- POST /api/runs/{id}/judge {"config": REL}: `judge CONFIG --run RUN` (a YAML with a judge section).
- POST /api/runs/{id}/benchmark {"tasks": [...], "limit": N}: `eval --benchmark TASK... --run RUN`; a task name
  is letters, digits and `_.:/-`, never starting with '-' (it would be read as a flag).
- POST /api/runs/{id}/report: `report RUN`.
- POST /api/runs/{id}/export {"format": "gguf"|"safetensors", "quant": ...}: `export RUN --format F --out
  ROOT/exports/<run>/...`; the files are listed in GET /api/runs/{id} and downloaded with GET /api/download.
- POST /api/runs/{id}/chat/start: `serve RUN --port P` on a free local port with a generated key, given in
  $DOMAINTUNE_API_KEY (not --api-key: a command line is readable by every local user);
  GET /api/runs/{id}/chat: {"job", "state", "ready"}; POST /api/runs/{id}/chat/completions: the OpenAI chat
  request, proxied (streaming) to that server with its key, so the key never reaches the page.
- GET /api/jobs, GET /api/jobs/{id} (with the tail of its log), POST /api/jobs/{id}/stop.
Each POST answers {"job": record} (201). Every value a request gives that reaches a command line is a path
confined to ROOT (absolute once resolved), a fixed choice, a number, or a checked name: none can start with '-'.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import time
from pathlib import Path
from typing import AsyncIterator

import httpx
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from .. import rundir
from ..errors import UserError
from ..inference.serve import ENV_KEY
from . import runs
from .api_runs import export_dir
from .context import Studio, public_job, studio
from .jobs import AlreadyStopping

router = APIRouter()
LOG_TAIL_BYTES = 16 << 10
TASK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]*$")
PID_STOP_HOLD_S = 60.0  # how long a second stop of a CLI-started run is refused (no record says it is stopping)
STOPPING = "already stopping: the run is saving a checkpoint of its current step"


class PredictBody(BaseModel):
    data: str
    base: bool = False
    max_new_tokens: int | None = Field(None, ge=1)


class JudgeBody(BaseModel):
    config: str


class BenchmarkBody(BaseModel):
    tasks: list[str] = Field(min_length=1)
    limit: int | None = Field(None, ge=1)


class ExportBody(BaseModel):
    format: str = Field("gguf", pattern="^(gguf|safetensors)$")
    quant: str | None = Field(None, pattern="^(f32|f16|bf16|q8_0)$")


def _start(st: Studio, kind: str, argv: list[str], run: Path | None, extra: dict | None = None,
           env: dict[str, str] | None = None) -> JSONResponse:
    job = st.jobs.start(kind, argv, run=st.run_id(run) if run else None, extra=extra, env=env)
    return JSONResponse({"job": public_job(st, job)}, status_code=201)


def _running(st: Studio, run_id: str, kind: str) -> dict | None:
    """The newest running job of `kind` on this run (Jobs.list gives the newest first)."""
    return next((j for j in st.jobs.list() if j.get("run") == run_id and j.get("kind") == kind
                 and j.get("state") == "running"), None)


@router.post("/api/runs/{run_id:path}/stop")
def stop(run_id: str, request: Request) -> dict:
    st = studio(request)
    path = st.run_dir(run_id)
    rel = st.run_id(path)
    job = _running(st, rel, "train")
    if job is not None:
        try:
            st.jobs.stop(job["id"])
        except AlreadyStopping:
            raise HTTPException(409, f"{STOPPING} (stop asked at {job.get('stop_requested')})") from None
        return {"stopped": "job", "job": job["id"]}
    status = runs.run_status(path)
    pid = status.get("pid")
    if status.get("state") == "running" and isinstance(pid, int) and status.get("host") == socket.gethostname():
        with st.launch_lock:  # two stops at once send one SIGINT
            sent_pid, sent_at = st.pid_stops.get(rel, (None, 0.0))
            if sent_pid == pid and time.monotonic() - sent_at < PID_STOP_HOLD_S:
                raise HTTPException(409, STOPPING)
            os.kill(pid, signal.SIGINT)  # the training process itself (started by the CLI): it saves and exits
            st.pid_stops[rel] = (pid, time.monotonic())
        return {"stopped": "pid", "pid": pid}
    raise HTTPException(409, f"run {run_id} is not training (status: {status.get('state')})")


@router.post("/api/runs/{run_id:path}/resume")
def resume(run_id: str, request: Request) -> JSONResponse:
    st = studio(request)
    path = st.run_dir(run_id)
    rel = st.run_id(path)
    config = st.project.confine(f"{rel}/{rundir.CONFIG}")  # a config.yaml linking out of ROOT is refused (403)
    with st.launch_lock:
        busy = st.training(path)
        if busy:
            raise HTTPException(409, busy)
        if not config.is_file():
            raise HTTPException(409, f"run {rel} never started training (it has no {rundir.CONFIG}): nothing to "
                                     "resume; launch it from New run")
        argv = ["train", str(config), f"train.output_dir={path}", "--resume"]
        return _start(st, "train", argv, path, {"config": st.run_id(config)})


@router.post("/api/runs/{run_id:path}/predict")
def predict(run_id: str, body: PredictBody, request: Request) -> JSONResponse:
    st = studio(request)
    path = st.run_dir(run_id)
    data = st.project.confine(body.data)
    if not data.is_file():
        raise HTTPException(400, f"no test file '{body.data}' in the project folder")
    argv = ["predict", str(path), "--data", str(data)] + (["--base-only"] if body.base else [])
    argv += ["--max-new-tokens", str(body.max_new_tokens)] if body.max_new_tokens else []
    return _start(st, "predict", argv, path)


@router.post("/api/runs/{run_id:path}/judge")
def judge(run_id: str, body: JudgeBody, request: Request) -> JSONResponse:
    st = studio(request)
    path = st.run_dir(run_id)
    config = st.project.confine(body.config)
    if not config.is_file():
        raise HTTPException(400, f"no judge config '{body.config}' in the project folder")
    return _start(st, "judge", ["judge", str(config), "--run", str(path)], path)


@router.post("/api/runs/{run_id:path}/benchmark")
def benchmark(run_id: str, body: BenchmarkBody, request: Request) -> JSONResponse:
    st = studio(request)
    path = st.run_dir(run_id)
    bad = next((t for t in body.tasks if not TASK.match(t)), None)
    if bad is not None:
        raise HTTPException(400, f"benchmark task {bad!r}: a task name is letters, digits and '_.:/-', starting "
                                 "with a letter or digit (e.g. mmlu, cmmlu)")
    argv = ["eval", "--benchmark", *body.tasks, "--run", str(path)]
    argv += ["--limit", str(body.limit)] if body.limit else []
    return _start(st, "benchmark", argv, path)


@router.post("/api/runs/{run_id:path}/report")
def report(run_id: str, request: Request) -> JSONResponse:
    st = studio(request)
    path = st.run_dir(run_id)
    return _start(st, "report", ["report", str(path)], path)


@router.post("/api/runs/{run_id:path}/export")
def export(run_id: str, body: ExportBody, request: Request) -> JSONResponse:
    st = studio(request)
    path = st.run_dir(run_id)
    folder = export_dir(st, st.run_id(path))
    out = folder if body.format == "gguf" else folder / "safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    argv = ["export", str(path), "--format", body.format, "--out", str(out), "--overwrite"]
    argv += ["--quant", body.quant] if body.quant and body.format == "gguf" else []
    return _start(st, "export", argv, path, {"out": out.relative_to(st.root).as_posix()})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chat_job(st: Studio, run_id: str) -> dict | None:
    return _running(st, run_id, "serve")


@router.post("/api/runs/{run_id:path}/chat/start")
def chat_start(run_id: str, request: Request) -> JSONResponse:
    st = studio(request)
    path = st.run_dir(run_id)
    job = _chat_job(st, st.run_id(path))
    if job is not None:
        return JSONResponse({"job": public_job(st, job)}, status_code=200)
    port, key = _free_port(), secrets.token_urlsafe(24)
    # the key reaches the server in its environment (a command line is readable by every local user); the record
    # (in ROOT/.studio/jobs, private, never served: public_job drops it) keeps it for the proxy, also after the
    # studio restarts and finds the job again. The server binds 127.0.0.1.
    argv = ["serve", str(path), "--host", "127.0.0.1", "--port", str(port)]
    return _start(st, "serve", argv, path, {"port": port, "key": key}, env={ENV_KEY: key})


async def _health(port: int) -> dict | None:
    """The chat server's /health body once it answers 200 (the model loaded), else None."""
    try:
        async with httpx.AsyncClient(timeout=2.0) as client:
            r = await client.get(f"http://127.0.0.1:{port}/health")
            return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


@router.get("/api/runs/{run_id:path}/chat")
async def chat_status(run_id: str, request: Request) -> dict:
    st = studio(request)
    path = st.run_dir(run_id)
    job = _chat_job(st, st.run_id(path))
    if job is None:
        return {"job": None, "state": None, "ready": False, "model": None}
    health = await _health(int(job["port"]))
    return {"job": public_job(st, job), "state": "running", "ready": health is not None,
            "model": health.get("model") if health else None}


@router.post("/api/runs/{run_id:path}/chat/completions")
async def chat(run_id: str, request: Request) -> StreamingResponse:
    """The page's chat request, sent on to the run's serve job with its key; the model field is set to the
    served model's id (the page need not know it)."""
    st = studio(request)
    path = st.run_dir(run_id)
    job = _chat_job(st, st.run_id(path))
    if job is None:
        raise HTTPException(409, "no chat server for this run: press Chat to start one")
    try:
        payload = json.loads(await request.body())
    except ValueError:
        raise HTTPException(400, "send the chat request as a JSON object") from None
    health = await _health(int(job["port"]))
    if not isinstance(payload, dict) or health is None:
        raise HTTPException(400 if health else 503, "send the chat request as a JSON object" if health else
                            "the chat server is still loading the model: try again in a few seconds")
    payload["model"] = health.get("model")
    client = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=5.0))
    upstream = client.build_request("POST", f"http://127.0.0.1:{job['port']}/v1/chat/completions", json=payload,
                                    headers={"Authorization": f"Bearer {job['key']}"})
    try:
        response = await client.send(upstream, stream=True)
    except httpx.HTTPError as e:
        await client.aclose()
        raise HTTPException(502, f"the chat server did not answer ({e.__class__.__name__}): is it still running?") \
            from None

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        finally:
            await response.aclose()
            await client.aclose()

    kind = response.headers.get("content-type", "application/json")
    return StreamingResponse(relay(), status_code=response.status_code, media_type=kind,
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _job(st: Studio, job_id: str) -> dict:
    try:
        return st.jobs.get(job_id)
    except UserError as e:
        raise HTTPException(404, str(e)) from None


@router.get("/api/jobs")
def jobs(request: Request) -> dict:
    st = studio(request)
    return {"jobs": [public_job(st, j) for j in st.jobs.list()]}


@router.get("/api/jobs/{job_id}")
def job(job_id: str, request: Request) -> dict:
    st = studio(request)
    record = _job(st, job_id)
    return {"job": public_job(st, record), "log": st.jobs.log_tail(job_id, LOG_TAIL_BYTES)}


@router.post("/api/jobs/{job_id}/stop")
def job_stop(job_id: str, request: Request) -> dict:
    st = studio(request)
    record = _job(st, job_id)
    try:
        st.jobs.stop(job_id)
    except AlreadyStopping as e:
        raise HTTPException(409, f"{STOPPING} (stop asked at {record.get('stop_requested')})"
                            if record.get("kind") == "train" else str(e)) from None
    return {"stopped": job_id}

