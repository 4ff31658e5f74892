"""A request's stream of text deltas: `StreamState` (what it produced) and `Stream` (`Engine.stream`'s iterator,
blocking or async), fed by the continuous batcher (batching.py)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import UserError

if TYPE_CHECKING:
    from .params import GenerationParams

END = object()  # the last item of a request's queue (after its final delta)


@dataclass
class StreamState:
    """Filled in while `Engine.stream` runs; complete once the iterator is exhausted."""

    prompt_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "stop"
    text: str = ""


def deliver(items: list[tuple[Any, Any]]) -> None:
    """(request, item) pairs into their asyncio queues (run on the consumers' event loop)."""
    for r, item in items:
        r.out.put_nowait(item)


class Stream:
    """The text deltas of one request (`Engine.stream`): an iterator (blocking) or an async iterator (for an
    asyncio server: no thread per request). The request is checked and queued on first use; `close()`, or
    dropping the stream, sets its stop event (it leaves the batch at the next step)."""

    def __init__(self, engine: Any, prompt: list[int], params: GenerationParams, stop_event: threading.Event,
                 state: StreamState) -> None:
        self.engine, self.prompt, self.params, self.stop_event, self.state = engine, prompt, params, stop_event, state
        self.out: Any = None
        self.done = False

    def _start(self, loop: Any) -> None:
        try:
            self.engine._check_fits(len(self.prompt), self.params.max_new_tokens)
            if self.params.num_beams > 1:
                raise UserError("streaming supports greedy or sampling decoding, not beam search (num_beams > 1)")
            self.out = self.engine.batcher.submit(self.prompt, self.params, self.stop_event, self.state, loop)
        except BaseException:
            self.close()
            raise

    def _take(self, item: Any) -> str | None:
        if item is END or isinstance(item, BaseException):
            self.close()
            if item is not END:
                raise item
            return None
        return item

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        if not self.done and self.out is None:
            self._start(None)
        item = None if self.done else self._take(self.out.get())
        if item is None:
            raise StopIteration
        return item

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> str:
        import asyncio

        if not self.done and self.out is None:
            self._start(asyncio.get_running_loop())
        item = None if self.done else self._take(await self.out.get())
        if item is None:
            raise StopAsyncIteration
        return item

    def close(self) -> None:
        self.done = True
        self.stop_event.set()  # a no-op after the end

    async def aclose(self) -> None:
        self.close()

    def __del__(self) -> None:
        self.stop_event.set()
