"""The JSON API that acts on runs: every action is a job running the CLI (`python -m domaintune VERB ...`,
studio/jobs.py), so the studio holds no second copy of any verb and a job outlives the page and the studio.

- POST /api/runs/{id}/stop: SIGINT to the run's training (as Ctrl-C: it saves a checkpoint and exits 130); the
  studio's train job when it has one, else the pid in status.json when it runs on this host (a CLI run).
- POST /api/runs/{id}/resume: `train CONFIG --resume` (the config the run was started from, else RUN/config.yaml).
- POST /api/runs/{id}/predict {"data": REL, "base": bool}: `predict RUN --data FILE [--base-only]`.
- POST /api/runs/{id}/judge {"config": REL}: `judge CONFIG --run RUN` (a YAML with a judge section).
- POST /api/runs/{id}/benchmark {"tasks": [...], "limit": N}: `eval --benchmark TASK... --run RUN`.
- POST /api/runs/{id}/report: `report RUN`.
- POST /api/runs/{id}/export {"format": "gguf"|"safetensors", "quant": ...}: `export RUN --format F --out
  ROOT/exports/<run>/...`; the files are listed in GET /api/runs/{id} and downloaded with GET /api/download.
- POST /api/runs/{id}/chat/start: `serve RUN --port P --api-key K` on a free local port with a generated key;
  GET /api/runs/{id}/chat: {"job", "state", "ready"}; POST /api/runs/{id}/chat/completions: the OpenAI chat
  request, proxied (streaming) to that server with its key, so the key never reaches the page.
- GET /api/jobs, GET /api/jobs/{id} (with the tail of its log), POST /api/jobs/{id}/stop.
Each POST answers {"job": record} (201).
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
from pathlib import Path
from typing import AsyncIterator

import httpx
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from .. import rundir
from ..errors import UserError
from . import runs
from .api_runs import export_dir
from .context import Studio, public_job, studio

router = APIRouter()
LOG_TAIL_BYTES = 16 << 10


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


def _start(st: Studio, kind: str, argv: list[str], run: Path | None, extra: dict | None = None) -> JSONResponse:
    job = st.jobs.start(kind, argv, run=st.run_id(run) if run else None, extra=extra)
    return JSONResponse({"job": public_job(st, job)}, status_code=201)


def _running(st: Studio, run_id: str, kind: str) -> dict | None:
    """The newest running job of `kind` on this run (Jobs.list gives the newest first)."""
    return next((j for j in st.jobs.list() if j.get("run") == run_id and j.get("kind") == kind
                 and j.get("state") == "running"), None)


@router.post("/api/runs/{run_id:path}/stop")
def stop(run_id: str, request: Request) -> dict:
    st = studio(request)
    path = st.run_dir(run_id)
    job = _running(st, st.run_id(path), "train")
    if job is not None:
        st.jobs.stop(job["id"])
        return {"stopped": "job", "job": job["id"]}
    status = runs.run_status(path)
    pid = status.get("pid")
    if status.get("state") == "running" and isinstance(pid, int) and status.get("host") == socket.gethostname():
        os.kill(pid, signal.SIGINT)  # the training process itself (started by the CLI): it saves and exits
        return {"stopped": "pid", "pid": pid}
    raise HTTPException(409, f"run {run_id} is not training (status: {status.get('state')})")


@router.post("/api/runs/{run_id:path}/resume")
def resume(run_id: str, request: Request) -> JSONResponse:
    st = studio(request)
    path = st.run_dir(run_id)
    if _running(st, st.run_id(path), "train") or runs.run_status(path).get("state") == "running":
        raise HTTPException(409, f"run {run_id} is already training")
    started = [j for j in st.jobs.list() if j.get("run") == st.run_id(path) and j.get("kind") == "train"]
    config = next((j.get("config") for j in started if j.get("config")), None)
    config_path = st.project.confine(config) if config else path / rundir.CONFIG
    if not Path(config_path).is_file():
        raise HTTPException(409, f"run {run_id} has no config.yaml to resume from")
    return _start(st, "train", ["train", str(config_path), "--resume"], path,
                  {"config": st.run_id(Path(config_path))})


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
    # the key is the one argument the job's record keeps that the page never sees; the server binds 127.0.0.1
    argv = ["serve", str(path), "--host", "127.0.0.1", "--port", str(port), "--api-key", key]
    return _start(st, "serve", argv, path, {"port": port, "key": key})


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
    _job(st, job_id)
    st.jobs.stop(job_id)
    return {"stopped": job_id}

