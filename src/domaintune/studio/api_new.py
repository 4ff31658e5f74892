"""The JSON API of the new-run form, the project's files and uploads, and data from documents.

- GET /api/form: {"fields": forms.form_fields(), "models": forms.model_choices(project)}.
- POST /api/config/check {"values": {"section.field": "text", "name": run name}}: {"ok", "errors": {field:
  message}} from forms.config_from_form, the CLI's own validation (the messages are the CLI's).
- POST /api/config/preview {"values", "example"}: preview.trained_spans of one example (the data-check), or the
  field errors (400).
- POST /api/config/save {"values", "name", "launch"}: forms.save_config writes ROOT/configs/NAME.yaml; with
  launch, a job runs `train ROOT/configs/NAME.yaml`. train.output_dir defaults to ROOT/runs/NAME (forms).
  {"config": REL, "run": REL, "job": record or None}; 400 {"errors"} when a field is refused; with launch, 409
  (and nothing written) while that run is training: one run folder never gets two trainers.
- POST /api/models/tiny {"arch"}: a job building that family's tiny offline model (forms.model_choices' argv).
- GET /api/files?folder=data|documents|configs: project.list_files.
- POST /api/upload/{data|documents}?filename=NAME: the raw body (the file's bytes, any type) streamed to
  project.save_upload, which refuses names that leave the folder and stops at the upload limit (413, nothing
  left behind).
- POST /api/documents/preview {"config": REL, "n": N}: a `gen-data CONFIG --preview N` job; POST
  /api/documents/generate {"config": REL}: a `gen-data CONFIG` job; both answer {"job", "out": the config's
  output folder relative to ROOT}. GET /api/documents/pairs?path=OUT&n=: preview.preview_pairs (question, answer,
  source); GET /api/documents/rejected?path=OUT: preview.rejected (what was dropped and why).
"""
from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Iterator

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from . import forms, preview
from .context import Studio, public_job, studio

router = APIRouter()
FOLDERS = ("data", "documents", "configs")
UPLOAD_FOLDERS = ("data", "documents")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class FormBody(BaseModel):
    values: dict[str, str] = Field(default_factory=dict)
    example: int = Field(0, ge=0)


class SaveBody(BaseModel):
    values: dict[str, str] = Field(default_factory=dict)
    name: str
    launch: bool = True


class TinyBody(BaseModel):
    arch: str


class GenBody(BaseModel):
    config: str
    n: int = Field(3, ge=1, le=50)


@router.get("/api/form")
def form(request: Request) -> dict:
    return {"fields": forms.form_fields(), "models": forms.model_choices(studio(request).project)}


@router.post("/api/config/check")
def check(body: FormBody, request: Request) -> dict:
    st = studio(request)
    raw, errors = forms.config_from_form(body.values, st.project)
    return {"ok": raw is not None, "errors": errors}


@router.post("/api/config/preview")
def data_preview(body: FormBody, request: Request) -> JSONResponse:
    st = studio(request)
    raw, errors = forms.config_from_form(body.values, st.project)
    if raw is None:
        return JSONResponse({"errors": errors}, status_code=400)
    return JSONResponse(preview.trained_spans(raw, body.example))


@router.post("/api/config/save")
def save(body: SaveBody, request: Request) -> JSONResponse:
    st = studio(request)
    if not NAME.match(body.name):
        return JSONResponse({"errors": {"name": "use letters, digits, '.', '_' or '-' (up to 64), starting with a "
                                                "letter or digit"}}, status_code=400)
    raw, errors = forms.config_from_form({**body.values, "name": body.name}, st.project)
    if raw is None:
        return JSONResponse({"errors": errors}, status_code=400)
    out = Path(raw["train"]["output_dir"])
    run = st.run_id(out) if out.resolve().is_relative_to(st.root.resolve()) else None
    if not body.launch:
        config = Path(forms.save_config(raw, st.project, body.name))
        return JSONResponse({"config": st.run_id(config), "run": run, "job": None}, status_code=201)
    with st.launch_lock:  # the check and the start at once: two launches never both pass the check
        busy = st.training(out)
        if busy:
            raise HTTPException(409, busy)
        config = Path(forms.save_config(raw, st.project, body.name))
        job = public_job(st, st.jobs.start("train", ["train", str(config)], run=run,
                                           extra={"config": st.run_id(config)}))
    return JSONResponse({"config": st.run_id(config), "run": run, "job": job}, status_code=201)


@router.post("/api/models/tiny")
def make_tiny(body: TinyBody, request: Request) -> JSONResponse:
    """Build a family's tiny offline model into ROOT/models/tiny-ARCH: the model picker's `tiny_argv`."""
    st = studio(request)
    families = [m for m in forms.model_choices(st.project) if m.get("kind") == "family"]
    choice = next((m for m in families if m.get("arch") == body.arch), None)
    if choice is None:
        raise HTTPException(400, f"no model family with the tiny arch '{body.arch}'")
    job = st.jobs.start("make_tiny_model", list(choice["tiny_argv"]), extra={"model": choice["tiny"]})
    return JSONResponse({"job": public_job(st, job)}, status_code=201)


@router.get("/api/files")
def files(folder: str, request: Request) -> dict:
    if folder not in FOLDERS:
        raise HTTPException(400, f"folder must be one of {', '.join(FOLDERS)}")
    return {"folder": folder, "files": studio(request).project.list_files(folder)}


@router.post("/api/upload/{folder}")
async def upload(folder: str, filename: str, request: Request) -> JSONResponse:
    st = studio(request)
    if folder not in UPLOAD_FOLDERS:
        raise HTTPException(400, f"uploads go to {' or '.join(UPLOAD_FOLDERS)}")
    # save_upload takes a plain iterable and runs in a worker thread; it pulls the request's body from the event
    # loop piece by piece, so a large file never sits in memory and the loop stays free meanwhile
    loop, stream = asyncio.get_running_loop(), request.stream()

    async def next_piece() -> bytes:
        return await stream.__anext__()

    def pieces() -> Iterator[bytes]:
        while True:
            try:
                chunk = asyncio.run_coroutine_threadsafe(next_piece(), loop).result()
            except StopAsyncIteration:
                return
            if chunk:
                yield chunk

    path = await asyncio.to_thread(st.project.save_upload, folder, filename, pieces(), st.upload_limit)
    stat = Path(path).stat()
    return JSONResponse({"name": Path(path).name, "path": st.run_id(Path(path)), "size": stat.st_size},
                        status_code=201)


def _config(st: Studio, rel: str) -> Path:
    path = st.project.confine(rel)
    if not path.is_file():
        raise HTTPException(400, f"no config '{rel}' in the project folder")
    return path


def _gen_output(st: Studio, config: Path) -> str | None:
    """The config's selfinstruct.output_dir relative to ROOT (a job runs in ROOT), None when it is not inside."""
    import yaml

    try:
        raw = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        out = (raw.get("selfinstruct") or {}).get("output_dir")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None
    if not isinstance(out, str) or not out:
        return None
    path = (st.root / out).resolve()
    return path.relative_to(st.root.resolve()).as_posix() if path.is_relative_to(st.root.resolve()) else None


@router.post("/api/documents/preview")
def documents_preview(body: GenBody, request: Request) -> JSONResponse:
    st = studio(request)
    config = _config(st, body.config)
    job = st.jobs.start("gen_data_preview", ["gen-data", str(config), "--preview", str(body.n)])
    return JSONResponse({"job": public_job(st, job), "out": _gen_output(st, config)}, status_code=201)


@router.post("/api/documents/generate")
def documents_generate(body: GenBody, request: Request) -> JSONResponse:
    st = studio(request)
    config = _config(st, body.config)
    job = st.jobs.start("gen_data", ["gen-data", str(config)])
    return JSONResponse({"job": public_job(st, job), "out": _gen_output(st, config)}, status_code=201)


def _gen_folder(st: Studio, path: str) -> Path:
    folder = st.project.confine(path)
    if not folder.is_dir():
        raise HTTPException(404, f"no folder '{path}' in the project folder (gen-data writes it when it starts)")
    return folder


@router.get("/api/documents/pairs")
def documents_pairs(path: str, request: Request, n: int | None = None) -> dict:
    return preview.preview_pairs(_gen_folder(studio(request), path), n)


@router.get("/api/documents/rejected")
def documents_rejected(path: str, request: Request) -> dict:
    return preview.rejected(_gen_folder(studio(request), path))
