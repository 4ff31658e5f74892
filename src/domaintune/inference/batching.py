"""Continuous batching: every streamed generation of an Engine (the server's requests, chat) runs here.

One worker thread owns the model while there is work (it holds `engine.lock`, so predict's batched
`generate` and scoring never run at the same time). At every step it

1. admits waiting requests, up to `engine.max_batch_size` in the batch: their prompts are prefilled
   together (left-padded) into a KV cache of their own (transformers' `DynamicCache`), which is then
   joined to the running batch's cache (left-padded to the longer one, along the batch dimension);
2. decodes one token for every request in the batch, each with its own sampling: repetition penalty,
   temperature, top-k and top-p through transformers' own logits processors in the order `generate`
   applies them (and OpenAI's presence/frequency penalties and logit_bias: params.OpenAIPenalties), and a
   `torch.Generator` per request (seeded with the request's `seed`, so a seeded request samples what it would
   alone: the same draws `generate` makes after `torch.manual_seed(seed)`);
3. sends each request its text delta and removes the requests that finished (a stop token, a stop
   string, `max_new_tokens`) or whose client left (its `stop_event`): their cache rows are dropped at
   once, and columns that only held padding are trimmed.

A request's answer does not depend on the others in its batch: positions come from each row's own
tokens (`position_ids` from the attention mask, as `generate` computes them for left padding; BLOOM's
ALiBi reads the mask itself), and padding is masked out. Greedy answers are the ones the request gets
alone, up to floating-point rounding of batched matrix products (the tests check fp32 equality).

A failure inside a step (e.g. out of memory) fails the requests of that step; a failure anywhere else in the
worker's loop (a bug) fails the requests the worker held with `WorkerCrash`, and the loop starts over for the
queue: no request is ever left waiting on a worker that died.

Models whose cache is not made of plain full-attention layers (Gemma 3's sliding window, Qwen3.5's linear
attention, Mistral v0.1's window) cannot be padded and joined this way: they are decoded one request at a time
(`Batcher.joinable` False; the server says so). tests/inference/test_batching_families.py checks every family.
"""
from __future__ import annotations

import queue
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .kvcache import concatenative_decoding, join_rows, joinable, keep_rows
from .params import logits_processors
from .streaming import END, StreamState, TextDeltas, deliver, send_now

if TYPE_CHECKING:
    import torch

    from .params import GenerationParams

DEFAULT_MAX_BATCH_SIZE = 16  # concurrent streams decoded together (serve --max-batch-size; Engine.max_batch_size)
DEFAULT_MAX_QUEUE = 64  # requests a server admits beyond its batch, waiting for a place (serve --max-queue)
PREFILL_TOKENS = 8192  # padded prompt tokens prefilled in one step (more joiners wait a step; one always goes)
IDLE_EXIT_SECONDS = 10.0  # the worker ends after this long without work (and starts again on the next request)
MAX_CRASHES = 3  # worker-loop failures in a row (no step completed between them) before the queue fails too


class WorkerCrash(RuntimeError):
    """The batcher's worker loop failed outside a decoding step (a bug): the requests it held get this error."""


def check_batch_limits(max_batch_size: int | None, max_queue: int) -> None:
    """UserError naming the flag when a limit is out of range."""
    if max_batch_size is not None and max_batch_size < 1:
        raise UserError(f"--max-batch-size must be at least 1, got {max_batch_size}")
    if max_queue < 0:
        raise UserError(f"--max-queue must be at least 0 (0: no waiting, a request beyond the batch gets 429), "
                        f"got {max_queue}")


@dataclass(eq=False)  # requests are compared by identity
class _Request:
    prompt: list[int]
    params: GenerationParams
    stop_event: threading.Event
    state: StreamState
    out: Any  # queue.Queue, or an asyncio.Queue filled on `loop`
    text: TextDeltas
    loop: Any = None  # the asyncio loop of an async consumer (deltas are handed over once per step)
    raw: list[int] = field(default_factory=list)  # generated ids, a stop token included
    generator: Any = None
    processors: Any = None
    ended: bool = False  # END or an error was sent
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """The continuous-batching worker of one engine; `Engine.stream` submits to it (see the module docstring)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine  # the Engine (engine.py) whose model, tokenizer and stop rules it uses
        self.cond = threading.Condition()
        self.waiting: deque[_Request] = deque()
        self.rows: list[_Request] = []  # the running batch, in cache row order
        self.joining: list[_Request] = []  # taken from the queue, being prefilled
        self.outbox: list[tuple[_Request, Any]] = []  # items for async consumers, handed over after each step
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # (rows, cache length): 1 = a real token, 0 = padding
        self.pending: torch.Tensor | None = None  # (rows,): each row's last sampled token, not yet fed
        self.thread: threading.Thread | None = None
        self._progressed = False  # the worker completed a step since it last (re)started its loop
        self.counts = {"completed": 0, "stopped": 0, "failed": 0, "generated_tokens": 0, "steps": 0}
        self.recent: deque[float] = deque(maxlen=64)  # seconds from submission to the end, of recent requests
        self.joinable = joinable(engine.model)
        self.concatenative = concatenative_decoding(engine.tokenizer)
        import inspect

        forward = getattr(engine.model, "get_base_model", lambda: engine.model)().forward
        params = inspect.signature(forward).parameters
        self.takes_positions = "position_ids" in params
        self.takes_logits_to_keep = "logits_to_keep" in params

    # ------------------------------------------------------------ the callers' side
    def submit(self, prompt: list[int], params: GenerationParams, stop_event: threading.Event,
               state: StreamState, loop: Any = None) -> Any:
        """Queue a request; its queue receives text deltas (str), then an exception or END. With an asyncio
        `loop`, an asyncio.Queue (call from that loop), filled on it once per step; else a queue.Queue."""
        import asyncio

        import torch

        out: asyncio.Queue | queue.Queue = asyncio.Queue() if loop is not None else queue.Queue()
        req = _Request(prompt, params, stop_event, state, out, TextDeltas(self.engine, self.concatenative), loop=loop)
        state.prompt_tokens = len(prompt)
        if params.do_sample:
            req.generator = torch.Generator(device=self.engine.device)
            req.generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        req.processors = logits_processors(params, start=len(prompt))
        with self.cond:
            self.waiting.append(req)
            if self.thread is None or not self.thread.is_alive():  # none, or one that died however it did
                self.thread = threading.Thread(target=self._loop, daemon=True, name="domaintune-batcher")
                self.thread.start()
            self.cond.notify()
        return req.out

    def status(self) -> dict:
        """Requests running (in the batch) and queued (waiting for a place), the effective batch limit, the mean
        seconds from submission to the end of the last 64 requests, and counts since the start: requests
        "completed" (a stop token or string of the template, or max_new_tokens), "stopped" early by their caller
        (its stop event: a client that left, or the server's cut at a request's own `stop` string), "failed" (a
        step raised), tokens generated and decoding steps."""
        with self.cond:  # the worker changes these under the same lock: one consistent snapshot
            mean = sum(self.recent) / len(self.recent) if self.recent else None
            return {"running": len(self.rows), "queued": len(self.waiting), "max_batch_size": self.limit(),
                    "mean_request_seconds": None if mean is None else round(mean, 3), **self.counts}

    def limit(self) -> int:
        return max(1, int(self.engine.max_batch_size)) if self.joinable else 1

    # ------------------------------------------------------------ the worker
    def _loop(self) -> None:
        """The worker thread. `_work` runs until the batcher is idle; if anything in it raises outside the guarded
        step (a bug), `_fail_all` fails the requests the worker held with a `WorkerCrash` and the loop starts over
        for the queue, so no request waits forever. After MAX_CRASHES in a row without a completed step, the
        queued requests fail too and the worker ends (the next `submit` starts a new one)."""
        crashes = 0
        while True:
            try:
                self._work()
                return
            except BaseException as e:  # noqa: BLE001 - whatever it was, nobody may be left waiting
                crashes = 1 if self._progressed else crashes + 1
                if self._fail_all(e, crash=True, give_up=crashes >= MAX_CRASHES):
                    return

    def _work(self) -> None:
        lock = self.engine.lock
        while True:
            self._progressed = False
            with self.cond:
                while not self.waiting and not self.rows:
                    if not self.cond.wait(timeout=IDLE_EXIT_SECONDS) and not self.waiting:
                        self.thread = None  # idle: end, so a dropped engine (and its model) can be freed;
                        return  # submit() starts a new worker
            with lock:  # held while there is work; released when the batch and the queue are empty
                while True:
                    try:
                        self._step()
                    except BaseException as e:  # noqa: BLE001 - every request of the batch learns of it
                        self._fail_all(e)
                    self._flush()
                    self._progressed = True
                    with self.cond:
                        if not self.waiting and not self.rows:
                            break

    def _step(self) -> None:
        import torch

        with self.cond:
            gone = [r for r in self.waiting if r.stop_event.is_set()]  # left while queued: out of the queue at once
            for r in gone:
                self.waiting.remove(r)
            joiners: list[_Request] = []
            width = 0  # joiners are prefilled together, padded to the longest: at most PREFILL_TOKENS (or one)
            while self.waiting and len(self.rows) + len(joiners) < self.limit():
                width = max(width, len(self.waiting[0].prompt))
                if joiners and width * (len(joiners) + 1) > PREFILL_TOKENS:
                    break
                joiners.append(self.waiting.popleft())
            self.joining = joiners  # neither queued nor in the batch until they are joined
        for r in gone:
            self._end(r, cancelled=True)
        with torch.inference_mode():
            if joiners:
                self._prefill(joiners)
            elif self.rows:
                self._decode()
        # Only once the step succeeded: if it raised (e.g. out of memory while joining the caches), `_fail_all`
        # must still find the joiners here, or they would wait forever, neither queued nor in the batch.
        with self.cond:
            self.joining = []

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        """Logits of each row's last position, in fp32."""
        kw: dict[str, Any] = {"attention_mask": mask, "cache": cache, "use_cache": True}
        if self.takes_positions:
            kw["position_ids"] = positions
        if self.takes_logits_to_keep:
            kw["logits_to_keep"] = 1
        out = self.engine.model(input_ids=ids, **kw)
        return out.logits[:, -1, :].float()

    def _prefill(self, joiners: list[_Request]) -> None:
        import torch
        from transformers import DynamicCache

        dev, pad = self.engine.device, self.engine.tokenizer.pad_token_id or 0
        width = max(len(r.prompt) for r in joiners)
        ids = torch.tensor([[pad] * (width - len(r.prompt)) + r.prompt for r in joiners], device=dev)
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in joiners], device=dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() does for left padding
        cache = DynamicCache(config=self.engine.model.config)
        try:
            logits = self._forward(ids, mask, positions, cache)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: only the joiners fail, the batch goes on
            del cache
            _free_device_memory(e)
            for r in joiners:
                self._fail(r, e)
            return
        self._join(joiners, cache, mask)
        self._sample_and_emit(logits, first=len(self.rows) - len(joiners))

    def _decode(self) -> None:
        import torch

        assert self.mask is not None and self.pending is not None
        positions = self.mask.sum(-1, keepdim=True)  # each row's own count of real tokens so far
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        logits = self._forward(self.pending[:, None], self.mask, positions, self.cache)
        self._sample_and_emit(logits, first=0)

    def _join(self, joiners: list[_Request], cache: Any, mask: torch.Tensor) -> None:
        """Append the joiners' cache rows to the running batch's, left-padding the shorter of the two."""
        import torch

        if not self.rows:
            self.rows, self.cache, self.mask = list(joiners), cache, mask
            self.pending = mask.new_zeros(len(joiners))
            return
        assert self.mask is not None and self.pending is not None
        self.mask = join_rows(self.cache, self.mask, cache, mask)
        self.pending = torch.cat([self.pending, mask.new_zeros(len(joiners))])
        self.rows.extend(joiners)

    def _sample_and_emit(self, logits: torch.Tensor, first: int) -> None:
        """Pick the next token of rows first.. (logits row i is batch row first + i), send deltas, drop the
        rows that finished."""
        import torch

        rows = self.rows[first:]
        scores = logits
        for i, r in enumerate(rows):
            if r.processors:
                ids = torch.tensor([r.prompt + r.raw], device=logits.device)
                scores[i: i + 1] = r.processors(ids, scores[i: i + 1])
        tokens = scores.argmax(-1)
        for i, r in enumerate(rows):
            if r.generator is not None:
                probs = torch.softmax(scores[i: i + 1], dim=-1)
                tokens[i] = torch.multinomial(probs, 1, generator=r.generator)[0, 0]
        assert self.pending is not None
        self.pending[first:] = tokens
        with self.cond:
            self.counts["steps"] += 1
            self.counts["generated_tokens"] += len(rows)
        done = [i + first for i, (r, t) in enumerate(zip(rows, tokens.tolist(), strict=True)) if self._emit(r, t)]
        for i in range(first):  # rows that were not stepped can still have been cancelled
            if self.rows[i].stop_event.is_set():
                done.append(i)
        if done:
            for i in done:
                self._end(self.rows[i], cancelled=self.rows[i].stop_event.is_set() and not self._finished(self.rows[i]))
            self._drop(sorted(set(done)))

    def _emit(self, r: _Request, token: int) -> bool:
        """Record a row's new token and send its text delta; True when the row is finished."""
        engine = self.engine
        r.raw.append(token)
        stop = token in engine.stop_ids
        ids = r.raw[:-1] if stop else r.raw
        r.state.token_ids = r.raw  # so far (the final ids, without a stop token, come with the end)
        delta = r.text.feed(ids)
        if delta:
            self._put(r, delta)
        return stop or r.text.hit or len(r.raw) >= r.params.max_new_tokens or r.stop_event.is_set()

    def _finished(self, r: _Request) -> bool:
        return bool(r.raw) and (r.raw[-1] in self.engine.stop_ids or r.text.hit
                                or len(r.raw) >= r.params.max_new_tokens)

    def _end(self, r: _Request, cancelled: bool) -> None:
        """The final text (Engine._finish: cut at stop tokens and strings), the rest of the stream, END."""
        r.ended = True
        tail = r.text.finish(r.raw, r.params.max_new_tokens, r.state)
        if tail:
            self._put(r, tail)
        with self.cond:
            self.counts["stopped" if cancelled else "completed"] += 1
            self.recent.append(time.perf_counter() - r.enqueued)
        self._put(r, END)

    def _put(self, r: _Request, item: Any) -> None:
        if r.loop is None:
            r.out.put(item)
        else:
            self.outbox.append((r, item))

    def _flush(self) -> None:
        """Hand this step's items to the async consumers: one call per event loop, not one per delta. The
        outbox is emptied only once every item is handed over (if this raises, `_crashed` sees what was lost)."""
        by_loop: dict[Any, list] = {}
        for r, item in self.outbox:
            by_loop.setdefault(r.loop, []).append((r, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(deliver, items)
            except RuntimeError:  # the loop closed (a server shutting down): nobody reads these any more
                for r, _ in items:
                    r.stop_event.set()
        self.outbox = []

    def _drop(self, indices: list[int]) -> None:
        """Remove finished rows from the batch and its cache, then trim columns that are padding in every row."""
        import torch

        keep = [i for i in range(len(self.rows)) if i not in set(indices)]
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = self.mask = self.pending = None
            return
        assert self.mask is not None and self.pending is not None
        self.pending = self.pending[torch.tensor(keep, device=self.pending.device)]
        self.mask = keep_rows(self.cache, self.mask, keep)

    def _fail_all(self, e: BaseException, crash: bool = False, give_up: bool = False) -> bool:
        """Fail the requests the worker holds and drop the batch's cache. After a failed step (e.g. out of memory):
        the batch and the joiners get `e`; queued requests wait for their turn as before. After a `crash` of the
        loop outside a step (a bug): also the requests whose items were not handed over (even an END), at once,
        with a WorkerCrash naming `e`; with `give_up` the queue too, and the worker ends. True: `_loop` returns."""
        with self.cond:
            undelivered, self.outbox = (self.outbox, []) if crash else ([], self.outbox)
            held = self.joining + self.rows + [r for r, _ in undelivered] + (list(self.waiting) if give_up else [])
            if give_up:
                self.waiting.clear()
            self.rows, self.cache, self.mask, self.pending, self.joining = [], None, None, None, []
            if crash and not self.waiting:
                self.thread = None  # the next submit() starts a worker
        _free_device_memory(e)
        if crash:
            cause, e = e, WorkerCrash(f"the generation worker failed ({e.__class__.__name__}: {e}); this request "
                                      "was stopped and the worker restarted. This is a bug in domaintune: please "
                                      "report it.")
            e.__cause__ = cause
        lost = {id(r) for r, _ in undelivered}  # their items never reached them
        for r in dict.fromkeys(held):  # in order, once each
            if id(r) in lost:
                r.ended = False
            self._fail(r, e, now=crash)
        return crash and self.thread is None

    def _fail(self, r: _Request, e: BaseException, now: bool = False) -> None:
        if not r.ended:  # a request that already got its END keeps it
            r.ended = True
            with self.cond:
                self.counts["failed"] += 1
            if now:  # the worker failed: not through the outbox, which may be what failed
                send_now(r, e)
            else:
                self._put(r, e)


def _free_device_memory(e: BaseException) -> None:
    """After a CUDA out-of-memory error, give the cached blocks back so the next step can allocate."""
    import torch

    if isinstance(e, torch.OutOfMemoryError) and torch.cuda.is_available():
        torch.cuda.empty_cache()
