"""vLLM as an optional inference engine (`--engine vllm`, CUDA only); the default engine is `Engine` (`--engine hf`).

`VLLMEngine` has `Engine`'s interface (`encode_messages`, `stream`, `generate_iter`, `generate`, `loss_on_targets`,
`batch_status`, and the attributes predict, chat and serve read). Only vLLM loads weights: domaintune inspects the
directory (`inspect_run`), loads the tokenizer and template as `load_run` does, and hands vLLM token ids
(`{"prompt_token_ids": ...}`), never text, so prompts are token-identical to training and vLLM's chat template never
applies. What vLLM loads (LoRA runs: base + adapter per request; QLoRA 4-bit: in-flight bitsandbytes base; 8-bit:
refused, serve an export) is decided in vllm_plan.py. trust_remote_code comes from the run's config only.

Requests run on vLLM's async engine (`vllm.engine.async_llm_engine.AsyncLLMEngine`: V1's `AsyncLLM` in current
vLLM) on one asyncio loop thread owned by the engine; `stream` is a synchronous generator for the server's
threads. Its text is cut at the template's stop tokens and strings as `Engine` cuts it (`_Cutter`, then
`Engine._finish`); `stop_event` (a client that left) cancels the request's task within 50 ms, and vLLM aborts a
cancelled `generate()`. The template's stop ids (EOS included) are the only stop tokens, as in `Engine`
(`ignore_eos` keeps vLLM from adding generation_config.json's other EOS ids); stop strings go to vLLM too.
`generate_iter` keeps at least max_num_seqs prompts with vLLM and yields each as it finishes.

`loss_on_targets` scores the samples the default engine scores (`last_turn_samples`) from vLLM's prompt logprobs
of the target tokens (such requests bypass vLLM's prefix cache), so `predict --engine vllm` reports loss and
perplexity; they agree with `--engine hf` up to rounding in the model's dtype (bench/vllm_check.py measures it).
Should vLLM refuse prompt logprobs, predict prints "loss not computed with --engine vllm" and scores the texts.
Nothing here imports vllm or touches CUDA until `require_vllm()` (called by `VLLMEngine.from_run`, `check_engine`).
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Generator, Iterator, Sequence

from .. import console
from ..errors import UserError
from .batching import DEFAULT_MAX_BATCH_SIZE, check_batch_limits
from .engine import Engine, EngineBase, Generation, StreamState
from .kvcache import concatenative_decoding
from .params import GenerationParams
from .streaming import TextDeltas
from .vllm_plan import engine_args, loss_summary, plan_load, sampling_kwargs, target_nll, vllm_dtype

if TYPE_CHECKING:
    from ..data.examples import Example

ENGINES = ("hf", "vllm")
_DONE = object()


def require_vllm() -> Any:
    """The `vllm` module; UserError saying what to do when it is missing or no CUDA GPU is visible."""
    try:
        import vllm
    except ImportError as e:
        raise UserError(f"`--engine vllm` needs vLLM: pip install 'domaintune[vllm]' (a CUDA GPU is required); "
                        f"the default engine is `--engine hf` (import vllm failed: {e})") from None
    import torch

    if not torch.cuda.is_available():
        raise UserError("vLLM needs a CUDA GPU; none is visible (torch.cuda.is_available() is False): "
                        "use the default engine `--engine hf`")
    return vllm


def check_engine(kind: str, path: str | Path | None = None, base_only: bool = False,
                 allow_pickle: bool = False) -> None:
    """UserError for an unknown engine, and for "vllm" where the run at `path` is one vLLM cannot serve (said first:
    no one should install vLLM to learn that) or vLLM or a CUDA GPU is missing; predict and serve call it first."""
    if kind not in ENGINES:
        raise UserError(f"--engine {kind!r}: choose {' or '.join(ENGINES)}")
    if kind == "vllm":
        if path is not None and Path(path).is_dir():
            from .loading import inspect_run
            plan_load(inspect_run(path, base_only, allow_pickle), base_only, allow_pickle)
        require_vllm()


# ---------------------------------------------------------------- threads <-> the asyncio loop

class LoopThread:
    """An asyncio event loop in a daemon thread; other threads run coroutines on it and read async iterators."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="domaintune-vllm-loop")
        self.thread.start()

    def iterate(self, make: Callable[[], AsyncIterator], stop_event: threading.Event | None = None,
                poll: float = 0.05) -> Generator[Any, None, None]:
        """The items of the async iterator `make()` (made and run on the loop), in this thread. Setting `stop_event`
        (looked at every `poll` seconds) or closing this iterator cancels it on the loop."""
        q: queue.Queue = queue.Queue()

        async def pump() -> None:
            try:
                async for item in make():
                    q.put((True, item))
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # noqa: BLE001 - raised again in the consumer's thread
                q.put((False, e))
            finally:
                q.put(_DONE)

        fut = asyncio.run_coroutine_threadsafe(pump(), self.loop)
        try:
            while stop_event is None or not stop_event.is_set():
                try:
                    item = q.get(timeout=poll)
                except queue.Empty:
                    continue
                if item is _DONE:
                    return
                if not item[0]:
                    raise item[1]
                yield item[1]
        finally:
            fut.cancel()  # a no-op once finished

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


class _Cutter:
    """vLLM's cumulative generated ids -> text deltas cut at the template's stop tokens and strings as the default
    engine streams them (the same `TextDeltas`); the deltas and `finish()` concatenate to `Engine._finish`'s
    text, which `state` receives."""

    def __init__(self, engine: Any, state: StreamState) -> None:
        self.engine, self.state = engine, state
        self.text = TextDeltas(engine, concatenative_decoding(engine.tokenizer))
        self.raw: list[int] = []  # generated ids, a stop token included
        self.done = False

    def feed(self, ids: Sequence[int]) -> str:
        stops = self.engine.stop_ids
        for t in ids[len(self.raw):]:
            if self.done:
                break
            self.raw.append(t)
            self.done = t in stops
        shown = self.raw[:-1] if self.raw and self.raw[-1] in stops else self.raw
        self.state.token_ids = list(shown)
        delta = self.text.feed(shown)
        self.done = self.done or self.text.hit
        return delta

    def finish(self, max_new: int) -> str:
        return self.text.finish(self.raw, max_new, self.state)


# ---------------------------------------------------------------- the engine

class VLLMEngine(EngineBase):
    """A run served by vLLM, with `Engine`'s interface (see the module docstring). Prompt building, decoding, the cut
    at stops, the context check and `generate` are EngineBase's, the same functions as `Engine`'s."""

    def __init__(self, llm: Any, loop: LoopThread, tokenizer: Any, template: Any, model_id: str, context_len: int,
                 max_num_seqs: int, sampling_params_cls: Any, lora_request: Any = None, run_config: Any = None,
                 vocab_size: int | None = None) -> None:
        self.llm, self.loop, self.lora_request, self.SamplingParams = llm, loop, lora_request, sampling_params_cls
        self.run_config = run_config  # the run's config.yaml, None for a plain model directory
        self.default_system = run_config.data.system if run_config is not None else None
        self.tokenizer, self.template, self.model_id = tokenizer, template, model_id
        self.stop_ids = template.stop_token_ids(tokenizer)
        self.stop_strings = [s for s in template.stop if s]
        self.context_len = context_len  # vLLM's max_model_len (the run's cutoff does not limit generation)
        self.vocab_size = vocab_size or len(tokenizer)  # vLLM's logits width (it checks logit_bias ids against it)
        self.max_num_seqs = self.max_batch_size = max_num_seqs  # the first is fixed once vLLM runs
        self.device, self.lock = "cuda", threading.Lock()  # Engine's attributes; vLLM schedules requests itself
        self.inflight = 0  # requests with vLLM and not finished (changed on the loop thread only)
        # the default engine's names (batching.py): "stopped" = ended early by the caller (a client that left)
        self.counts = {"completed": 0, "stopped": 0, "failed": 0, "generated_tokens": 0}
        self.recent: deque[float] = deque(maxlen=64)

    @classmethod
    def from_run(cls, path: str | Path, base_only: bool = False, template: str | None = None,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, dtype: str = "auto", allow_pickle: bool = False,
                 **vllm_kwargs: Any) -> VLLMEngine:
        """vLLM on a run, checkpoint, exported model or model directory. `max_batch_size`: vLLM's max_num_seqs;
        `vllm_kwargs`: other AsyncEngineArgs fields. The model id is the directory's name ("-base" with base_only)."""
        import dataclasses

        from .loading import inspect_run

        check_batch_limits(max_batch_size, 0)
        src = inspect_run(path, base_only, allow_pickle)
        plan = plan_load(src, base_only, allow_pickle)  # before vLLM is imported: as check_engine, refusals first
        vllm = require_vllm()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.lora.request import LoRARequest

        from ..rundir import resolve_template
        from ..training.model import load_tokenizer
        if plan.quantization:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise UserError("this QLoRA run's 4-bit base needs bitsandbytes under vLLM too: pip install "
                                "'domaintune[qlora]', or serve an export (`domaintune export RUN`)") from None
        tok = load_tokenizer(str(src.path), trust_remote_code=src.trust_remote_code)
        tpl = resolve_template(src.path, tok, template)
        kw = engine_args(plan, max_batch_size, vllm_dtype(dtype), vllm_kwargs)
        fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        if "disable_log_requests" in fields:  # before vLLM 0.10 every request was logged unless told not to
            kw.setdefault("disable_log_requests", True)
        if set(kw) - fields:
            raise UserError(f"vLLM {vllm.__version__} has no engine option(s) {', '.join(sorted(set(kw) - fields))}")
        name = src.path.resolve().name + ("-base" if base_only else "")
        lora = LoRARequest(lora_name=name, lora_int_id=1, lora_path=plan.lora_path) if plan.lora_path else None
        loop = LoopThread()
        try:
            llm = asyncio.run_coroutine_threadsafe(_start(AsyncEngineArgs(**kw), lora), loop.loop).result()
        except Exception as e:
            loop.close()
            # vLLM V1 loads the model in its engine process: the parent often sees only "Engine core
            # initialization failed", so the way out is given for every adapter run that fails to start
            # (families vLLM serves without LoRA are refused before this, in vllm_plan.check_family)
            hint = (" If vLLM cannot apply this adapter (its target modules have no LoRA support in vLLM), merge "
                    "it (`domaintune export RUN`) and serve the exported folder, or use `--engine hf`."
                    if plan.lora_path else "")
            raise UserError(f"vLLM could not start on '{src.path}': {type(e).__name__}: {e}.{hint}") from e
        return cls(llm, loop, tok, tpl, name, _max_model_len(llm, kw), max_batch_size, vllm.SamplingParams, lora,
                   run_config=src.config, vocab_size=_vocab_size(llm))

    def close(self) -> None:
        """Shut vLLM down (its engine process) and stop the loop thread."""
        getattr(self.llm, "shutdown", lambda: None)()
        self.loop.close()

    # ------------------------------------------------------------ requests
    async def _generate(self, prompt: list[int], sp: Any) -> AsyncIterator[Any]:
        """vLLM's (cumulative) outputs for one request, counted for `batch_status`."""
        self.inflight += 1
        t0, outcome, n = time.perf_counter(), "failed", 0
        try:
            async for out in self.llm.generate({"prompt_token_ids": list(prompt)}, sp, f"dt-{uuid.uuid4().hex}",
                                               lora_request=self.lora_request):
                n = len(out.outputs[0].token_ids)
                yield out
            outcome = "completed"
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "stopped"
            raise
        finally:
            self.inflight -= 1
            self.counts[outcome] += 1
            self.counts["generated_tokens"] += n
            self.recent.append(time.perf_counter() - t0)

    def _run_all(self, prompts: list[list[int]], sp: Any, window: int) -> Iterator[tuple[int, Any]]:
        """(index, final RequestOutput) as requests finish, at most `window` of them with vLLM at a time."""
        done: queue.Queue = queue.Queue()
        futures: dict[int, Any] = {}
        todo = iter(range(len(prompts)))

        async def final(i: int) -> Any:
            last = None
            async for out in self._generate(prompts[i], sp):
                last = out
            return last

        def submit() -> None:
            i = next(todo, None)
            if i is not None:
                futures[i] = asyncio.run_coroutine_threadsafe(final(i), self.loop.loop)
                futures[i].add_done_callback(lambda f, i=i: done.put((i, f)))

        try:
            for _ in range(min(window, len(prompts))):
                submit()
            for _ in range(len(prompts)):
                i, fut = done.get()
                del futures[i]
                submit()
                yield i, fut.result()
        finally:
            for fut in futures.values():
                fut.cancel()

    def stream(self, prompt: list[int], params: GenerationParams, stop_event: threading.Event | None = None,
               state: StreamState | None = None) -> Iterator[str]:
        """`Engine.stream`'s contract: text deltas that concatenate to the final text (cut at the template's stop
        strings), `state` complete before the end; `stop_event`, or closing the iterator, aborts the request."""
        sp = self.SamplingParams(**sampling_kwargs(params, self.stop_ids, self.stop_strings))
        self._check_fits(len(prompt), params.max_new_tokens)
        state = state if state is not None else StreamState()
        state.prompt_tokens = len(prompt)
        cut = _Cutter(self, state)
        outputs = self.loop.iterate(lambda: self._generate(prompt, sp), stop_event)
        try:
            for out in outputs:
                delta = cut.feed(out.outputs[0].token_ids)
                if delta:
                    yield delta
                if cut.done:
                    break
        finally:
            outputs.close()  # cancels the request when vLLM still runs it
        rest = cut.finish(params.max_new_tokens)
        if rest:
            yield rest

    def generate_iter(self, prompts: list[list[int]], params: GenerationParams,
                      batch_size: int = 8) -> Iterator[tuple[int, Generation]]:
        """(index, Generation) as requests finish. At least `batch_size` prompts are with vLLM at a time (its
        max_num_seqs when larger, to keep its batch full); `seconds` is the time since the previous result."""
        sp = self.SamplingParams(**sampling_kwargs(params, self.stop_ids, self.stop_strings))
        for p in prompts:
            self._check_fits(len(p), params.max_new_tokens)
        last = time.perf_counter()
        for i, out in self._run_all(prompts, sp, max(batch_size, self.max_num_seqs)):
            text, ids, reason = self._finish(list(out.outputs[0].token_ids), params.max_new_tokens)
            now = time.perf_counter()
            yield i, Generation(text, ids, len(prompts[i]), reason, seconds=now - last)
            last = now

    def batch_status(self) -> dict:
        """Best effort, counted on this side: `running` = requests with vLLM up to its max_num_seqs, `queued` = the
        rest (in vLLM's waiting queue), the mean seconds of the last 64 requests, and counts since the start."""
        n, mean = self.inflight, (sum(self.recent) / len(self.recent) if self.recent else None)
        return {"running": min(n, self.max_num_seqs), "queued": max(0, n - self.max_num_seqs),
                "max_batch_size": self.max_batch_size,
                "mean_request_seconds": None if mean is None else round(mean, 3), **self.counts}

    def loss_on_targets(self, examples: list[Example], reduce: Any = None) -> dict:
        """`Engine.loss_on_targets` from vLLM's prompt logprobs (see the module docstring)."""
        from ..evaluation.loss import last_turn_samples

        samples = last_turn_samples(examples, self.tokenizer, self.template, self.cutoff_len, self.default_system)
        if not samples and reduce is None:
            return {}
        sp = self.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        total, count = 0.0, 0
        try:
            for i, out in self._run_all([s["input_ids"] for s in samples], sp, max(64, self.max_num_seqs)):
                t, c = target_nll(samples[i]["labels"], out.prompt_logprobs)
                total, count = total + t, count + c
        except Exception as e:
            if reduce is not None:  # every process must reach the reduction: fail instead
                raise
            console.warn(f"loss not computed with --engine vllm: {type(e).__name__}: {e}")
            return {}
        return loss_summary(total, count, reduce)


async def _start(args: Any, lora: Any = None) -> Any:
    """vLLM's async engine, made on the loop it runs on (its output handler attaches to the running loop). The
    adapter is loaded now (vLLM would load it with the first request): an adapter vLLM cannot apply fails here,
    at start, not on the first users' requests."""
    from vllm.engine.async_llm_engine import AsyncLLMEngine

    llm = AsyncLLMEngine.from_engine_args(args)
    if lora is not None and hasattr(llm, "add_lora"):
        try:
            await llm.add_lora(lora)
        except BaseException:
            getattr(llm, "shutdown", lambda: None)()
            raise
    return llm


def _max_model_len(llm: Any, kw: dict) -> int:
    for holder in (llm, getattr(llm, "vllm_config", None), getattr(llm, "engine", None)):
        n = getattr(getattr(holder, "model_config", None), "max_model_len", None)
        if isinstance(n, int) and n > 0:
            return n
    return int(kw.get("max_model_len") or 2048)


def _vocab_size(llm: Any) -> int | None:
    """vLLM's vocabulary size (the logits' width, against which vLLM checks `logit_bias` token ids); None if unknown."""
    for holder in (llm, getattr(llm, "vllm_config", None), getattr(llm, "engine", None)):
        get = getattr(getattr(holder, "model_config", None), "get_vocab_size", None)
        n = get() if callable(get) else None
        if isinstance(n, int) and n > 0:
            return n
    return None


def load_engine(kind: str, path: str | Path, *, base_only: bool = False, template: str | None = None,
                device: str | None = None, dtype: str = "auto", allow_pickle: bool = False,
                max_batch_size: int | None = None, **vllm_kwargs: Any) -> Engine | VLLMEngine:
    """The engine `kind` on a run or model directory: "hf" (`Engine`, the default) or "vllm" (`VLLMEngine`, CUDA
    only). `device` applies to "hf" only, `vllm_kwargs` (AsyncEngineArgs fields) to "vllm" only."""
    check_engine(kind)
    if kind == "vllm":
        return VLLMEngine.from_run(path, base_only=base_only, template=template, dtype=dtype, allow_pickle=allow_pickle,
                                   max_batch_size=max_batch_size or DEFAULT_MAX_BATCH_SIZE, **vllm_kwargs)
    if vllm_kwargs:
        raise UserError(f"vLLM option(s) {', '.join(sorted(vllm_kwargs))} apply to --engine vllm only")
    engine = Engine.from_run(path, base_only=base_only, template=template, device=device, dtype=dtype,
                             allow_pickle=allow_pickle)
    if max_batch_size is not None:
        engine.max_batch_size = max_batch_size
    return engine
