"""The OpenAI-compatible app: `create_app(engine)` returns a FastAPI application.

Endpoints: `GET /health` (open; 503 until the engine is set, 200 after), `GET /v1/models`,
`POST /v1/chat/completions`, `POST /v1/completions` (streamed as server-sent events when `stream` is
true: `data: {json}\\n\\n` chunks, the first carrying the role, then `data: [DONE]`), and `GET /`, a
small web chat page (static/index.html, no build step; sent with a Content-Security-Policy that allows only
its own inline script and style, X-Frame-Options DENY and X-Content-Type-Options nosniff).

Batching: requests are decoded together by the engine's continuous batcher (inference/batching.py): a
request joins the running batch at the next step (up to `max_batch_size` at a time; later ones wait in a
first-come-first-served queue) and leaves it when it finishes, each answer as it would be alone. Each
request streams from a worker thread (`engine.stream`), so the event loop keeps answering health checks,
new requests and disconnects. A client that disconnects (mid-stream, or while waiting for a non-streamed
answer or in the queue) sets its request's stop event: it leaves the batch at the next step, and its
place goes to the next request. At most `max_batch_size + max_queue` requests are admitted at once;
past that a request is answered 429 at once, with a Retry-After header (the recent mean request time),
never left to wait without bound. `GET /status` (open, like /health) reports the requests running,
queued and admitted, the limits, and counts since the start.

Errors use the OpenAI body `{"error": {"message", "type", "param", "code"}}`: 400 invalid request
(including schema errors and unreadable bodies; the schema, protocol.py, refuses what the model cannot
take, so an accepted request generates), 401 missing/wrong API key (when one is set; `/health`, `/status` and `/`
stay open), 403 a Host not answered without a key, 404 unknown model, 413 body larger than
`max_body_bytes`, 408 a body that does not arrive within `body_timeout` (guard.py checks these, two
Authorization headers and a body that is not sent as JSON before parsing), 429 too many requests admitted
(see Batching), 503 still loading; an unexpected exception
(a bug) is a 500 with the same body.

Sampling: `temperature` 0 means greedy decoding; omitted parameters take the server's defaults
(the "serve" preset of inference/params.py, or what `create_app` is given). `max_tokens` (given or the
default) is capped by the context the prompt leaves: an answer cut there ends with finish_reason "length".
`stop` strings are honoured (the text is cut before the first match; finish_reason "stop");
`presence_penalty`, `frequency_penalty` and `logit_bias` too. What cannot be honoured (`n` > 1, logprobs,
tools, JSON response formats...) is a 400 naming the field, never ignored (checks.py).
Chat messages: an optional system message, then user/assistant alternating, ending with user; a
conversation the model's own chat template refuses (e.g. one that forbids a system role) is a 400 too.
A failure of the batcher's worker outside a decoding step (a bug) is a 500 `worker_failed` for the requests
it held (in-band when streaming); the worker goes on for the others.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import threading
import time
from contextlib import aclosing
from importlib import resources
from typing import Any, Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...errors import UserError
from ..batching import DEFAULT_MAX_QUEUE, WorkerCrash, check_batch_limits
from ..engine import EngineBase, StreamState
from ..params import PRESETS, GenerationParams
from ..stops import StopScanner, tokens_through_stop
from . import protocol as P
from .checks import (
    chat_messages,
    encode_chat,
    refuse_unsupported,
    unreadable_body,
    validation_message,
)
from .checks import request_params as _params  # (the name tests/cli/test_options.py reaches for)
from .guard import BODY_TIMEOUT_S, Guard, accepted_hosts, normalise_api_key
from .lifecycle import Admission, AdmittedStream, APIError, generate, watch_disconnect


def _error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                    headers: dict | None = None) -> JSONResponse:
    return JSONResponse(P.error_body(status, message, param, code), status_code=status, headers=headers)


# ---------------------------------------------------------------- request checks

def _engine(app: FastAPI) -> EngineBase:
    if app.state.engine is None:
        raise APIError(503, "The model is still loading; retry when GET /health returns 200.", code="model_loading")
    return app.state.engine


def _page() -> tuple[str, dict[str, str]]:
    """The web chat page and its security headers: no framing (clickjacking), no MIME sniffing, and a Content
    Security Policy that runs only the page's own inline script and style (by their SHA-256) and lets it talk
    only to this server; no other script, style, frame, form target or resource loads."""
    html = resources.files("domaintune.inference.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in bodies)

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
           "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, {"Content-Security-Policy": csp, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
                  "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------- the app

def create_app(engine: EngineBase | None = None, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               defaults: GenerationParams | None = None, allowed_hosts: Iterable[str] = (),
               max_batch_size: int | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
               body_timeout: float = BODY_TIMEOUT_S) -> FastAPI:
    """The FastAPI app serving `engine`. With `engine=None` the app answers 503 until `app.state.engine` is
    set (the CLI loads the model in the background after the server listens). `defaults` (in
    `app.state.defaults`) is the sampling of requests that leave a parameter out: the "serve" preset unless
    given. `max_batch_size`: requests decoded together (sets `engine.max_batch_size`; None keeps the engine's);
    `max_queue`: requests admitted beyond those, waiting for a place (more get 429).
    `api_key`: required on /v1/* when given (an empty or blank key is a UserError, not "no key").
    `allowed_hosts`: without a key, the Host names answered besides localhost, 127.0.0.1 and ::1 ("*": any);
    see guard.py. `body_timeout`: seconds a request body may take to arrive (then 408, guard.py)."""
    api_key = normalise_api_key(api_key, "api_key", "pass api_key=None")
    hosts = accepted_hosts(allowed_hosts)
    app = FastAPI(title="domaintune", docs_url=None, redoc_url=None, openapi_url=None)
    check_batch_limits(max_batch_size, max_queue)
    if engine is not None and max_batch_size is not None:
        engine.max_batch_size = max_batch_size
    app.state.engine = engine
    app.state.load_error = None
    app.state.max_queue, app.state.admitted = max_queue, 0
    app.state.created = int(time.time())
    defaults = app.state.defaults = defaults or PRESETS["serve"]

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        headers = e.headers or ({"Retry-After": "5"} if e.status == 503 else None)
        return _error_response(e.status, e.message, e.param, e.code, headers)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, e: UserError) -> JSONResponse:
        # a check deeper down refused the request: still the client's 400
        return _error_response(400, str(e))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error_response(400, *validation_message(list(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 400:  # FastAPI could not read the body (not UTF-8, nested too deep for the parser)
            return _error_response(400, unreadable_body(e.__cause__))
        return _error_response(e.status_code, str(e.detail))

    @app.exception_handler(WorkerCrash)
    async def _worker_crash(request: Request, e: WorkerCrash) -> JSONResponse:
        # the batcher's worker failed outside a step: this request was stopped, the worker goes on (batching.py)
        return _error_response(500, str(e), code="worker_failed")

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        # Client input is refused above with a 4xx; reaching this is a bug. The body keeps the OpenAI shape
        # (and uvicorn still logs the traceback).
        what = f"{e.__class__.__name__}: {e}".encode("utf-8", "replace").decode()
        return _error_response(500, f"The server failed on this request ({what}). This is a bug in domaintune: "
                                    "please report it with the request that caused it.")

    page, page_headers = _page()

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(page, headers=page_headers)

    @app.get("/health")
    async def health():
        """Liveness: 200 with the model id once it is loaded; 503 while loading or after a load error."""
        if app.state.load_error:
            return JSONResponse({"status": "error", "message": app.state.load_error}, status_code=503)
        if app.state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
        return {"status": "ok", "model": app.state.engine.model_id, "auth": bool(api_key)}

    @app.get("/status")
    async def status():
        """Load: the model id, the batcher's counts of requests decoding and waiting, those admitted, max_queue."""
        eng = _engine(app)
        return {"model": eng.model_id, **eng.batch_status(), "admitted": app.state.admitted,
                "max_queue": app.state.max_queue}

    @app.get("/v1/models")
    async def models():
        """The served model, in OpenAI's model-list shape."""
        return P.model_list(_engine(app).model_id, app.state.created)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: P.ChatCompletionRequest, request: Request):
        """Chat completion (OpenAI shape) with the run's chat template; `stream: true` for server-sent events."""
        eng = _engine(app)
        refuse_unsupported(req, eng)
        prompt = encode_chat(eng, chat_messages(req), req.chat_template_kwargs)
        params = _params(req, len(prompt), eng, defaults)
        return await _respond(request, req, prompt, params, chat=True)

    @app.post("/v1/completions")
    async def completions(req: P.CompletionRequest, request: Request):
        """Raw-text completion (OpenAI shape) of exactly one prompt; `stream: true` for server-sent events."""
        eng = _engine(app)
        refuse_unsupported(req, eng)
        if req.echo or req.suffix or (req.best_of or 1) > 1:
            raise APIError(400, "echo, suffix and best_of > 1 are not supported.")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise APIError(400, "Send exactly one prompt per request.", param="prompt")
        prompt = eng.tokenizer(prompts[0], add_special_tokens=True)["input_ids"]
        if not prompt:
            raise APIError(400, "The prompt is empty.", param="prompt")
        params = _params(req, len(prompt), eng, defaults)
        return await _respond(request, req, prompt, params, chat=False)

    async def _respond(request: Request, req: P.ChatCompletionRequest | P.CompletionRequest, prompt: list[int],
                       params: GenerationParams, chat: bool) -> dict | StreamingResponse:
        model = app.state.engine.model_id
        rid = P.new_id("chatcmpl" if chat else "cmpl")
        state, stop_event = StreamState(), threading.Event()
        scanner = StopScanner(req.stop_list())

        def finish() -> tuple[str, dict]:
            if not scanner.hit:
                return state.finish_reason, P.usage(len(prompt), len(state.token_ids))
            # cut at the request's stop string: the tokens through the one that completed it (generation may
            # have run a step further before it ended)
            used = tokens_through_stop(state.token_ids, app.state.engine.decode, scanner.stops)
            return "stop", P.usage(len(prompt), used)

        admission = Admission(app, app.state.engine)
        if not req.stream:
            watcher = asyncio.create_task(watch_disconnect(request, stop_event))
            parts = []
            try:
                async with aclosing(generate(app.state.engine, prompt, params, stop_event, state)) as gen:
                    async for delta in gen:
                        parts.append(scanner.feed(delta))
                        if scanner.hit:
                            stop_event.set()  # keep draining so the token counts are final
            finally:
                watcher.cancel()
                admission.release()
            parts.append(scanner.flush())
            reason, use = finish()
            make = P.chat_completion if chat else P.text_completion
            return make(rid, model, "".join(parts), reason, use)

        with_usage = bool(req.stream_options and req.stream_options.include_usage)
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, reason: str | None = None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                return _sse(P.chat_chunk(rid, model, delta, reason, with_usage))
            return _sse(P.text_chunk(rid, model, text or "", reason, with_usage))

        async def events():
            watcher = asyncio.create_task(watch_disconnect(request, stop_event))  # also while queued
            try:
                if chat:
                    yield chunk(None, role=True)
                async with aclosing(generate(app.state.engine, prompt, params, stop_event, state)) as gen:
                    async for delta in gen:
                        text = scanner.feed(delta)
                        if text:
                            yield chunk(text)
                        if scanner.hit:
                            stop_event.set()
                tail = scanner.flush()
                if tail:
                    yield chunk(tail)
                reason, use = finish()
                yield chunk(None, reason)
                if with_usage:
                    yield _sse(P.usage_chunk(rid, model, obj, use))
            except UserError as e:  # the status line is gone; report in-band, as OpenAI does
                yield _sse(P.error_body(400, str(e)))
            except WorkerCrash as e:
                yield _sse(P.error_body(500, str(e), code="worker_failed"))
            except Exception as e:  # noqa: BLE001
                yield _sse(P.error_body(500, f"generation failed: {e.__class__.__name__}: {e}"))
            finally:
                watcher.cancel()
                stop_event.set()
                admission.release()
            yield "data: [DONE]\n\n"

        return AdmittedStream(events(), admission, media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, hosts=hosts,  # before routing, parsing
                       body_timeout=body_timeout)
    return app
