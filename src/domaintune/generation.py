"""The generation engine shared by predict, chat and serve.

`Engine.from_run(path)` loads a run directory (an adapter on its base model, or a full model), an
exported/merged model, or any local model directory (then `template=` names the prompt template;
a model with a chat_template defaults to it). Prompts are built with the run's template through
`Template.encode`, the same function training used, so inference sees the training prompt exactly.

Generation is batched with left padding; `generate_iter` sorts prompts by length (less padding) and
yields each batch's results as soon as it finishes. Decoding stops at EOS and at the template's `stop`
strings: single-token ones as token ids, the others (e.g. ChatML's `<|im_end|>` on a tokenizer without
the ChatML specials, which spells it in several tokens) by cutting the text before the first match
(`StopScanner`, also used by the server for a request's `stop`). `stream` yields text deltas token by
token and stops early when `stop_event` is set (a client that went away). The model is not thread-safe
here: callers that share an engine across threads hold `engine.lock` (the server queues requests on it).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import UserError
from .rundir import RunDir, base_model_config, resolve_template


@dataclass
class GenerationParams:
    max_new_tokens: int = 256
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> "GenerationParams":
        """Raise UserError naming the first out-of-range setting (the CLI options carry the same names)."""
        checks = [(self.max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {self.max_new_tokens}"),
                  (self.num_beams >= 1, f"num_beams must be at least 1, got {self.num_beams}"),
                  (not self.do_sample or self.temperature > 0,
                   f"temperature must be > 0 when sampling (0 means greedy), got {self.temperature}"),
                  (0 < self.top_p <= 1, f"top_p must lie in (0, 1], got {self.top_p}"),
                  (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
                  (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)
        return self

    def hf_kwargs(self) -> dict:
        kw = dict(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                  repetition_penalty=self.repetition_penalty, do_sample=self.do_sample)
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kw


def find_stop(text: str, stops: list[str]) -> int:
    """Index of the earliest stop string in `text`, or -1."""
    return min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)


class StopScanner:
    """Cut streamed text before the first stop string, holding back a possible partial match.

    The concatenation of `feed` outputs plus `flush()` equals the whole text cut before its first stop
    string (`find_stop`), however the text was split into deltas."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""
        self.hit = False

    def feed(self, delta: str) -> str:
        if self.hit:
            return ""
        if not self.stops:
            return delta
        self.buf += delta
        cut = find_stop(self.buf, self.stops)
        if cut >= 0:
            self.hit = True
            out, self.buf = self.buf[:cut], ""
            return out
        keep = 0  # longest tail of buf that starts some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.hit else self.buf), ""
        return out


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" | "length"
    seconds: float = 0.0

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class StreamState:
    """Filled in while `Engine.stream` runs; complete once the iterator is exhausted."""

    prompt_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "stop"
    text: str = ""


class Engine:
    def __init__(self, model, tokenizer, template, model_id: str, context_len: int | None = None,
                 default_system: str | None = None, run_config=None):
        self.model = model
        self.run_config = run_config  # the run's config.yaml (a config.Config), None for a plain model directory
        if default_system is None and run_config is not None:
            default_system = run_config.data.system
        self.default_system = default_system  # the run's data.system: training added it to rows without one
        self.tokenizer = tokenizer
        self.template = template
        self.model_id = model_id
        self.device = next(model.parameters()).device
        self.stop_ids = template.stop_token_ids(tokenizer)
        self.stop_strings = [s for s in template.stop if s]
        self.context_len = context_len or _context_len(model, tokenizer)
        self.lock = threading.Lock()

    @property
    def cutoff_len(self) -> int:
        """The longest sample training saw (the run's data.cutoff_len); the context length for a plain model."""
        return self.run_config.data.cutoff_len if self.run_config is not None else self.context_len

    # ------------------------------------------------------------ loading
    @classmethod
    def from_run(cls, path: str | Path, base_only: bool = False, template: str | None = None,
                 device: str | None = None, dtype: str = "auto") -> "Engine":
        from . import model as loader

        run = RunDir(path)
        if not run.path.is_dir():
            raise UserError(f"'{run.path}' is not a directory: give a run directory or a model directory")
        device = device or loader.resolve_device()
        torch_dtype = loader.resolve_dtype(dtype, device)
        cfg = None
        if run.config_path.is_file():
            from .config import load_config

            cfg = load_config(run.config_path)
        if base_only and cfg is None:
            raise UserError(f"--base-only needs a training run directory (with config.yaml naming the base model); "
                            f"'{run.path}' is a plain model directory")
        if not run.has_weights():
            raise UserError(f"'{run.path}' has no weights (adapter_model.safetensors + adapter_config.json, or "
                            "config.json + model*.safetensors). Did training finish? Checkpoints live in checkpoint-*/.")
        trust = bool(cfg and cfg.model.trust_remote_code)
        tok = loader.load_tokenizer(str(run.path), trust_remote_code=trust)
        if run.has_adapter():
            model = loader.load_base_model(base_model_config(run.path, cfg), device=device, dtype=torch_dtype)
            if not base_only:
                model = loader.load_adapter(model, run.path)
        elif base_only:
            model = loader.load_base_model(cfg.model, device=device, dtype=torch_dtype)
        else:
            model = loader.load_plain_model(run.path, dtype=torch_dtype, device=device, trust_remote_code=trust)
        tpl = resolve_template(run.path, tok, template)
        model.to(device)
        model.eval()
        name = run.path.resolve().name + ("-base" if base_only else "")
        return cls(model, tok, tpl, name, run_config=cfg)

    # ------------------------------------------------------------ prompts
    def encode_messages(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation ending with a user turn, plus the assistant prefix. The run's
        `data.system` is added when the conversation has no system message, as training did. A
        conversation the model's chat_template refuses raises UserError (templates.py) with its message."""
        if self.default_system and not (messages and messages[0]["role"] == "system"):
            messages = [{"role": "system", "content": self.default_system}] + list(messages)
        ids, _ = self.template.encode(self.tokenizer, messages, add_generation_prompt=True)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _finish(self, ids: list[int], max_new: int) -> tuple[str, list[int], str]:
        """(text, token ids, finish reason) of generated ids: cut at the first stop token, then before the
        first stop string. After a stop string the ids run up to the token that completed it."""
        hit = False
        for k, t in enumerate(ids):
            if t in self.stop_ids:
                ids, hit = ids[:k], True
                break
        text = self.decode(ids)
        cut = find_stop(text, self.stop_strings)
        if cut < 0:
            return text, ids, "stop" if hit or len(ids) < max_new else "length"
        lo, hi = 1, len(ids)  # the shortest prefix whose text holds a stop string
        while lo < hi:
            mid = (lo + hi) // 2
            if find_stop(self.decode(ids[:mid]), self.stop_strings) >= 0:
                hi = mid
            else:
                lo = mid + 1
        return text[:cut], ids[:lo], "stop"

    # ------------------------------------------------------------ batched generation
    def generate(self, prompts: list[list[int]], params: GenerationParams, batch_size: int = 8) -> list[Generation]:
        """Results in the order of `prompts`."""
        out: list[Generation | None] = [None] * len(prompts)
        for idx, gen in self.generate_iter(prompts, params, batch_size):
            out[idx] = gen
        return out  # type: ignore[return-value]

    def generate_iter(self, prompts: list[list[int]], params: GenerationParams,
                      batch_size: int = 8) -> Iterator[tuple[int, Generation]]:
        """Yield (index, Generation) batch by batch, longest prompts first."""
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        for s in range(0, len(order), batch_size):
            idxs = order[s: s + batch_size]
            t0 = time.perf_counter()
            results = self._generate_batch([prompts[i] for i in idxs], params)
            dt = (time.perf_counter() - t0) / len(idxs)
            for i, g in zip(idxs, results):
                g.seconds = dt
                yield i, g

    def _generate_batch(self, batch: list[list[int]], params: GenerationParams) -> list[Generation]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        self._check_fits(max(len(p) for p in batch), params.max_new_tokens)
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=self.device)
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=self.device)
        criteria = StoppingCriteriaList()
        if self.stop_strings:
            # A row ends once its text holds a stop string. Only the last tokens are decoded: a string of n
            # characters spans at most 4n byte-level tokens, and it is checked at every step.
            window, engine = 4 * max(map(len, self.stop_strings)) + 4, self

            class _StopStrings(StoppingCriteria):
                def __call__(self, input_ids, scores, **kw):
                    rows = input_ids[:, width:].tolist()
                    return torch.tensor([find_stop(engine.decode(r[-window:]), engine.stop_strings) >= 0 for r in rows],
                                        dtype=torch.bool, device=input_ids.device)

            criteria.append(_StopStrings())
        with self.lock, torch.inference_mode():
            if params.seed is not None:  # inside the lock: no other request may draw from the RNG in between
                torch.manual_seed(params.seed)
            out = self.model.generate(input_ids=input_ids, attention_mask=attn, eos_token_id=self.stop_ids,
                                      pad_token_id=pad, stopping_criteria=criteria, **params.hf_kwargs())
        results = []
        for row, p in zip(out[:, width:].tolist(), batch):
            text, ids, reason = self._finish(row, params.max_new_tokens)
            results.append(Generation(text, ids, len(p), reason))
        return results

    def _check_fits(self, prompt_len: int, max_new: int) -> None:
        if prompt_len + max_new > self.context_len:
            raise UserError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new}) exceeds the model's context "
                            f"of {self.context_len} tokens")

    # ------------------------------------------------------------ streaming
    def stream(self, prompt: list[int], params: GenerationParams, stop_event: threading.Event | None = None,
               state: StreamState | None = None) -> Iterator[str]:
        """Yield text deltas as tokens arrive; their concatenation equals the non-streamed text (cut at the
        template's stop strings too: a possible partial match is held back until it is decided).

        `state` (optional) receives token counts and the finish reason. Setting `stop_event` ends
        generation at the next token.
        """
        import queue

        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        self._check_fits(len(prompt), params.max_new_tokens)
        state = state if state is not None else StreamState()
        state.prompt_tokens = len(prompt)
        q: queue.Queue = queue.Queue()
        stop_event = stop_event or threading.Event()

        class _Streamer(BaseStreamer):
            def __init__(self):
                self.first = True

            def put(self, value):
                if self.first:  # the prompt
                    self.first = False
                    return
                q.put(value.reshape(-1).tolist())

            def end(self):
                q.put(None)

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                return torch.full((input_ids.shape[0],), stop_event.is_set(), dtype=torch.bool, device=input_ids.device)

        errors: list[BaseException] = []

        def work():
            try:
                with self.lock, torch.inference_mode():
                    if params.seed is not None:  # inside the lock, as in _generate_batch
                        torch.manual_seed(params.seed)
                    ids = torch.tensor([prompt], device=self.device)
                    self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=_Streamer(),
                                        eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id,
                                        stopping_criteria=StoppingCriteriaList([_Stop()]), **params.hf_kwargs())
            except BaseException as e:  # surfaced in the consumer thread
                errors.append(e)
                q.put(None)

        if params.num_beams > 1:
            raise UserError("streaming supports greedy or sampling decoding, not beam search (num_beams > 1)")
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        scanner = StopScanner(self.stop_strings)
        raw: list[int] = []  # generated ids, a stop token included
        decoded = sent = ""  # text decoded so far / text yielded so far
        done = False
        try:
            while True:
                item = q.get()
                if item is None:
                    break
                if done:  # a stop was seen: drain until the worker ends
                    continue
                for t in item:
                    raw.append(t)
                    if t in self.stop_ids:
                        done = True
                        break
                ids = raw[:-1] if done else raw
                state.token_ids = list(ids)
                text = self.decode(ids)
                if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                    continue
                if len(text) > len(decoded) and text.startswith(decoded):
                    delta = scanner.feed(text[len(decoded):])
                    decoded = text
                    if delta:
                        sent += delta
                        yield delta
                    done = done or scanner.hit
                if done:
                    stop_event.set()
        finally:
            stop_event.set()
            thread.join()
        if errors:
            raise errors[0]
        text, ids, reason = self._finish(raw, params.max_new_tokens)
        if len(text) > len(sent) and text.startswith(sent):
            yield text[len(sent):]
        state.text, state.token_ids, state.finish_reason = text, ids, reason

    # ------------------------------------------------------------ scoring
    def target_loss(self, samples: list[dict]) -> dict:
        """Teacher-forced loss and perplexity over the target tokens of encoded samples (see scoring.py)."""
        from .scoring import target_loss

        with self.lock:
            return target_loss(self.model, samples)


def _context_len(model, tokenizer) -> int:
    n = getattr(model.config, "max_position_embeddings", None)
    tm = getattr(tokenizer, "model_max_length", None)
    for v in (n, tm):
        if isinstance(v, int) and 0 < v < 10**6:
            return v
    return 2048
