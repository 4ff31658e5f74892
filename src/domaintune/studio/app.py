"""The studio's FastAPI app: `create_app(project, token, host, port)` and `serve_studio(root, host, port, token)`.

Pages (static HTML from package data; their scripts fetch the JSON API): `/` runs table and compare, `/run/{id}`
one run (live curves, predictions browser, actions, chat), `/new` the new-run form, `/documents` data from
documents. Static files under `/static/`. The JSON API lives in api_runs.py (reading runs), api_actions.py
(jobs: stop, resume, predict, judge, benchmark, export, chat) and api_new.py (form, files, uploads,
documents). security.StudioGuard wraps everything: token, Host, Origin and body size.

Errors are JSON `{"error": {"message", "code"}}`: a UserError is 400 with its message, project.Forbidden
(a path leaving ROOT) 403, project.TooLarge 413. Run ids are paths relative to ROOT with "/" separators.
"""
from __future__ import annotations

import socket
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from . import api_actions, api_new, api_runs
from .context import Studio
from .jobs import Jobs
from .project import Forbidden, Project, TooLarge
from .security import DEFAULT_UPLOAD_LIMIT, StudioGuard, is_loopback, studio_hosts, studio_token

PAGES = {"/": "index.html", "/new": "new.html", "/documents": "documents.html"}
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                ".html": "text/html; charset=utf-8", ".svg": "image/svg+xml"}
# The pages load only this server's own scripts and styles; no inline script, no frame, no foreign request.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def _static(name: str) -> bytes | None:
    """A file of studio/static by its plain name (no folders: a name with a slash or dots-only is not one)."""
    folder = resources.files("domaintune.studio").joinpath("static")
    if "/" in name or "\\" in name or name.startswith("."):
        return None
    item = folder.joinpath(name)
    return item.read_bytes() if item.is_file() else None


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": code}}, status_code=status,
                        headers={"Cache-Control": "no-store"})


def create_app(project: Project | str | Path, token: str | None = None, host: str = "127.0.0.1", port: int = 7860,
               upload_limit: int = DEFAULT_UPLOAD_LIMIT) -> FastAPI:
    """The studio over `project` (a Project or its root folder). `token`: required on every request when given;
    when None and `host` is not a loopback address one is generated (read it from `app.state.studio.token`:
    the caller prints it). `host`/`port`: where it will listen (the bound address is answered without a token
    besides the loopback names). `upload_limit`: bytes of one uploaded file."""
    project = project if isinstance(project, Project) else Project(project)
    token = studio_token(host, token)
    app = FastAPI(title="domaintune studio", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.studio = Studio(project=project, jobs=Jobs(project), token=token, upload_limit=upload_limit)
    app.state.port = port

    @app.exception_handler(UserError)
    async def _user_error(request: Request, e: UserError) -> JSONResponse:
        if isinstance(e, Forbidden):
            return _error(403, str(e), "forbidden")
        if isinstance(e, TooLarge):
            return _error(413, str(e), "too_large")
        return _error(400, str(e), "bad_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail), "http_error")

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}", "invalid_request")

    def page(name: str) -> HTMLResponse:
        body = _static(name)
        if body is None:
            raise HTTPException(404, f"page {name} is missing from the package")
        return HTMLResponse(body.decode("utf-8"), headers=PAGE_HEADERS)

    for path, name in PAGES.items():
        app.add_api_route(path, (lambda n: lambda: page(n))(name), methods=["GET"], include_in_schema=False)

    @app.get("/run/{run_id:path}", include_in_schema=False)
    async def run_page(run_id: str) -> HTMLResponse:
        return page("run.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        body = _static(name)
        kind = STATIC_TYPES.get(Path(name).suffix)
        if body is None or kind is None:
            raise HTTPException(404, f"no static file '{name}'")
        return Response(body, media_type=kind, headers={"X-Content-Type-Options": "nosniff",
                                                        "Cache-Control": "no-cache"})

    app.include_router(api_runs.router)
    app.include_router(api_actions.router)
    app.include_router(api_new.router)
    app.include_router(api_runs.detail_router)  # last: its path matches the longer run paths above
    app.add_middleware(StudioGuard, token=token, hosts=studio_hosts(host), upload_limit=upload_limit)
    return app


def studio_url(host: str, port: int, token: str | None) -> str:
    """The address to open: the bound host (127.0.0.1 for a wildcard bind), with ?token= when there is one."""
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else ("[::1]" if host == "::" else
                                                          (f"[{host}]" if ":" in host else host))
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def studio_server(root: str | Path, host: str = "127.0.0.1", port: int = 7860, token: str | None = None,
                  upload_limit: int = DEFAULT_UPLOAD_LIMIT, log_level: str = "warning"):  # noqa: ANN201
    """(uvicorn.Server, the URL to open) for the studio over `root`, not yet running: `server.run()` serves
    (blocking; a test runs it in a thread and sets `server.should_exit`). Port 0 picks a free port."""
    import uvicorn

    if port == 0:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    app = create_app(Project(root), token=token, host=host, port=port, upload_limit=upload_limit)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off"))
    return server, studio_url(host, port, app.state.studio.token)


def _check_port(host: str, port: int) -> None:
    """A port another program (another studio) holds is said before anything starts, with what to do; uvicorn
    would log a bare errno and exit."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closed port in TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}): another program (another studio?) "
                            "holds it; give another --port") from None


def serve_studio(root: str | Path, host: str = "127.0.0.1", port: int = 7860, token: str | None = None,
                 upload_limit: int = DEFAULT_UPLOAD_LIMIT) -> None:
    """Serve the studio until Ctrl-C, printing the URL to open (with the token, generated when the host is not a
    loopback address and none was given). Jobs it started go on after it exits."""
    _check_port(host, port)
    server, url = studio_server(root, host, port, token, upload_limit)
    note = "" if is_loopback(host) else " (the token is required: share this URL only with whom may use the studio)"
    print(f"domaintune studio over {Path(root).resolve()}: open {url}{note}", flush=True)
    server.run()
