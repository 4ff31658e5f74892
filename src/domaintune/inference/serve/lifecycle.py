"""A request's life in the server, apart from its wire format: admission (at most `max_batch_size +
max_queue` admitted at once, else 429 with Retry-After), generation in a worker thread that reads the
engine's stream, the disconnect watcher, and the place given back however the response ends."""
from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

if TYPE_CHECKING:
    from ..engine import EngineBase, StreamState
    from ..params import GenerationParams


class APIError(Exception):
    """A request refused with an OpenAI error body (app.py's handler answers it)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


async def generate(engine: EngineBase, prompt: list[int], params: GenerationParams, stop_event: threading.Event,
                   state: StreamState) -> AsyncGenerator[str, None]:
    """Yield text deltas of `engine.stream` (the batcher decides when the request runs): read as an async
    iterator when the engine's stream is one (Engine: deltas handed to the event loop once per step), else by a
    worker thread (an engine with a blocking iterator)."""
    stream = engine.stream(prompt, params, stop_event=stop_event, state=state)
    if isinstance(stream, AsyncIterator):
        try:
            async for delta in stream:
                yield delta
        finally:
            stop_event.set()  # a no-op after a normal end; stops generation when the consumer went away
        return
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()

    def post(item: tuple[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the loop closed (server shutting down)
            stop_event.set()

    def work() -> None:
        try:
            for delta in stream:
                post(("delta", delta))
            post(("end", None))
        except BaseException as e:  # noqa: BLE001 - re-raised in the request's task
            post(("error", e))

    threading.Thread(target=work, daemon=True, name="domaintune-generate").start()
    try:
        while True:
            kind, value = await q.get()
            if kind == "delta":
                yield value
            elif kind == "end":
                return
            else:
                raise value
    finally:
        stop_event.set()  # a no-op after a normal end; stops generation when the consumer went away


async def watch_disconnect(request: Request, stop_event: threading.Event) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            stop_event.set()
            return


class Admission:
    """A request's place among the `max_batch_size + max_queue` admitted at once (event-loop thread only)."""

    def __init__(self, app: FastAPI, engine: EngineBase) -> None:
        status = engine.batch_status()
        capacity = status["max_batch_size"] + app.state.max_queue
        if app.state.admitted >= capacity:
            wait = status.get("mean_request_seconds") or 1.0
            retry = max(1, min(60, math.ceil(wait)))
            raise APIError(429, f"The server is busy: {app.state.admitted} requests are running or queued, its limit "
                                f"(--max-batch-size {status['max_batch_size']} + --max-queue {app.state.max_queue}). "
                                f"Retry after {retry} s.", code="server_busy", headers={"Retry-After": str(retry)})
        self.app, self.held = app, True
        app.state.admitted += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self.app.state.admitted -= 1


class AdmittedStream(StreamingResponse):
    """A streamed answer that gives its place back however the response ends (even one never started)."""

    def __init__(self, content: Any, admission: Admission, **kw: Any) -> None:
        super().__init__(content, **kw)
        self.admission = admission

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.admission.release()
