"""A request's stream of text deltas: `StreamState` (what it produced), `TextDeltas` (ids as they arrive -> text
deltas, shared by the batcher and the vLLM engine) and `Stream` (`Engine.stream`'s iterator, blocking or async),
fed by the continuous batcher (batching.py)."""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .stops import StopScanner

if TYPE_CHECKING:
    from .params import GenerationParams

END = object()  # the last item of a request's queue (after its final delta)
STABLE_EVERY = 16  # tokens decoded again at most (twice this) per step, with a concatenating decoder


@dataclass
class StreamState:
    """Filled in while `Engine.stream` runs; complete once the iterator is exhausted."""

    prompt_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "stop"
    text: str = ""


_BYTE_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def byte_token_ids(tokenizer: Any) -> frozenset[int]:
    """The ids of a SentencePiece-style tokenizer's byte-fallback tokens <0x00>..<0xFF> (none for byte-level BPE),
    looked up once per tokenizer."""
    if tokenizer not in _BYTE_IDS:
        vocab = tokenizer.get_vocab()
        _BYTE_IDS[tokenizer] = frozenset(i for b in range(256) if (i := vocab.get(f"<0x{b:02X}>")) is not None)
    return _BYTE_IDS[tokenizer]


class TextDeltas:
    """One answer's text as its tokens arrive: deltas whose concatenation, with `finish`'s tail, is the final
    text (`engine._finish`: cut at the template's stop tokens and strings; a possible partial match of a stop
    string is held back until it is decided, an incomplete character until it is whole).

    `concatenative` (kvcache.concatenative_decoding): decoding concatenates wherever the text so far does not end
    in an incomplete character (U+FFFD), so only the ids after the last such point are decoded again and a step
    costs the same at the 2000th token as at the 20th; otherwise every step decodes the whole answer.

    Byte-fallback tokens (<0xNN>, SentencePiece-style tokenizers) decode as a run: one invalid byte turns the whole
    run, the valid bytes before it included, into U+FFFD. So a trailing run of byte tokens is held back until a
    token that is not a byte ends it (or the answer ends): what is sent is never changed by a later token."""

    def __init__(self, engine: Any, concatenative: bool) -> None:
        self.engine, self.concatenative = engine, concatenative
        self.scanner = StopScanner(engine.stop_strings)
        self.decoded = self.sent = ""  # text decoded so far / text sent so far
        self.stable, self.stable_text = 0, ""  # ids whose text is `stable_text`, ending on a whole character
        self.byte_ids = byte_token_ids(engine.tokenizer)

    @property
    def hit(self) -> bool:
        """A template stop string was reached."""
        return self.scanner.hit

    def feed(self, ids: list[int]) -> str:
        """The new text of the answer's ids so far (without a stop token); "" while nothing new is decided."""
        end = len(ids)
        while end and ids[end - 1] in self.byte_ids:  # an open run of byte tokens: its text is not decided yet
            end -= 1
        text = self._text(ids[:end])
        if text.endswith("\ufffd") or len(text) <= len(self.decoded) or not text.startswith(self.decoded):
            return ""
        delta = self.scanner.feed(text[len(self.decoded):])
        self.decoded, self.sent = text, self.sent + delta
        return delta

    def finish(self, raw: list[int], max_new: int, state: StreamState) -> str:
        """The final text of `raw` (generated ids, a stop token included) into `state`; the tail not sent yet."""
        text, ids, reason = self.engine._finish(raw, max_new)
        state.text, state.token_ids, state.finish_reason = text, ids, reason
        return text[len(self.sent):] if len(text) > len(self.sent) and text.startswith(self.sent) else ""

    def _text(self, ids: list[int]) -> str:
        """decode(ids), exactly."""
        if not self.concatenative:
            return self.engine.decode(ids)
        text = self.stable_text + self.engine.decode(ids[self.stable:])
        if len(ids) - self.stable >= STABLE_EVERY and not text.endswith("\ufffd"):
            self.stable, self.stable_text = len(ids), text
        return text


def deliver(items: list[tuple[Any, Any]]) -> None:
    """(request, item) pairs into their asyncio queues (run on the consumers' event loop)."""
    for r, item in items:
        r.out.put_nowait(item)


def send_now(r: Any, item: Any) -> None:
    """Give `item` to a request's consumer at once (its queue.Queue, or its asyncio queue through its loop), not
    through the batcher's outbox: how a failed worker still reaches every request it held."""
    try:
        if r.loop is None:
            r.out.put(item)
        else:
            r.loop.call_soon_threadsafe(deliver, [(r, item)])
    except RuntimeError:  # its event loop closed: nobody reads it any more
        r.stop_event.set()


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
        if item is END:
            self.close()
            return None
        if isinstance(item, BaseException):
            self.close()
            raise item
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
