"""The generation engine shared by predict, chat and serve.

`Engine.from_run(path)` loads a run directory (an adapter on its base model, or a full model), an
exported/merged model, or any local model directory through `load_run()` (loading.py). Prompts are built
with the run's template through `Template.encode`, the same function training used, so inference sees
the training prompt exactly.

Generation is batched with left padding; `generate_iter` sorts prompts by length (less padding) and
yields each batch's results as soon as it finishes. Decoding stops at EOS and at the template's `stop`
strings: single-token ones as token ids, the others (e.g. ChatML's `<|im_end|>` on a tokenizer without
the ChatML specials, which spells it in several tokens) by cutting the text before the first match
(stops.py, also used by the server for a request's `stop`). `stream` yields text deltas token by
token through the engine's continuous batcher (batching.py): concurrent streams (the server's requests)
are decoded together, each as it would be alone, and one ends at the next step when its `stop_event` is
set (a client that went away). The model is not thread-safe: whoever runs it holds `engine.lock`
(`generate`, scoring, and the batcher's worker while it has work).
"""
from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..data.encode import decode_text, with_system
from ..errors import UserError
from .batching import DEFAULT_MAX_BATCH_SIZE, Batcher
from .params import GenerationParams, penalty_processors
from .stops import find_stop, tokens_through_stop
from .streaming import Stream, StreamState

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..config import Config
    from ..data.examples import Example
    from ..data.templates import Template


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


class EngineBase(ABC):
    """What both engines share (`Engine` below; `VLLMEngine` in vllm_engine.py): prompts built with the run's
    template, decoding, the cut at stop tokens and strings, the context check and `generate` (one copy for both),
    and the interface that predict, chat and serve use. A subclass sets the attributes declared here."""

    takes_penalties = True  # applies RequestParams' presence/frequency penalties and logit_bias (params.py)
    tokenizer: PreTrainedTokenizerBase
    template: Template
    model_id: str
    run_config: Config | None  # the run's config.yaml, None for a plain model directory
    default_system: str | None  # the run's data.system: training added it to rows without one
    stop_ids: list[int]
    stop_strings: list[str]
    context_len: int
    vocab_size: int  # the width of the logits: a `logit_bias` token id must lie below it
    max_batch_size: int
    lock: threading.Lock  # held by whoever runs the model
    device: Any  # where prompts go: a torch.device ("cuda" for vLLM)

    @property
    def cutoff_len(self) -> int:
        """The longest sample training saw (the run's data.cutoff_len); the context length for a plain model."""
        return self.run_config.data.cutoff_len if self.run_config is not None else self.context_len

    # ------------------------------------------------------------ prompts
    def encode_messages(self, messages: list[dict], chat_template_kwargs: dict | None = None) -> list[int]:
        """Token ids of a conversation ending with a user turn, plus the assistant prefix. The run's
        `data.system` is added when the conversation has no system message, as training did. A
        conversation the model's chat_template refuses raises UserError (templates.py) with its message.
        `chat_template_kwargs` (checked by `template.check_kwargs`, e.g. a request's {"enable_thinking": false})
        override the run's own for this prompt."""
        ids, _ = self.template.encode(self.tokenizer, with_system(messages, self.default_system),
                                      add_generation_prompt=True, chat_template_kwargs=chat_template_kwargs)
        return ids

    def decode(self, ids: list[int]) -> str:
        return decode_text(self.tokenizer, ids, skip_special_tokens=True)

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
        return text[:cut], ids[:tokens_through_stop(ids, self.decode, self.stop_strings)], "stop"

    def _check_fits(self, prompt_len: int, max_new: int) -> None:
        if prompt_len + max_new > self.context_len:
            raise UserError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new}) exceeds the model's context "
                            f"of {self.context_len} tokens")

    # ------------------------------------------------------------ generation, streaming, scoring
    def generate(self, prompts: list[list[int]], params: GenerationParams, batch_size: int = 8) -> list[Generation]:
        """Results in the order of `prompts`."""
        out = dict(self.generate_iter(prompts, params, batch_size))
        return [out[i] for i in range(len(prompts))]

    @abstractmethod
    def generate_iter(self, prompts: list[list[int]], params: GenerationParams,
                      batch_size: int = 8) -> Iterator[tuple[int, Generation]]:
        """(index, Generation) for every prompt, in the order they finish."""

    @abstractmethod
    def stream(self, prompt: list[int], params: GenerationParams, stop_event: threading.Event | None = None,
               state: StreamState | None = None) -> Iterator[str]:
        """Text deltas as tokens arrive (`Engine.stream`'s contract)."""

    @abstractmethod
    def batch_status(self) -> dict:
        """The load and counts of the requests being decoded (`Batcher.status`'s keys)."""

    @abstractmethod
    def loss_on_targets(self, examples: list[Example], reduce: Any = None) -> dict:
        """Loss and perplexity of the model on the examples' targets (`Engine.loss_on_targets`)."""


class Engine(EngineBase):
    """A loaded model with its tokenizer and template: batched generation, streaming and scoring."""

    def __init__(self, model: Any, tokenizer: PreTrainedTokenizerBase, template: Template, model_id: str,
                 context_len: int | None = None, default_system: str | None = None,
                 run_config: Config | None = None) -> None:
        self.model = model
        self.run_config = run_config  # the run's config.yaml, None for a plain model directory
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
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.vocab_size = int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)  # logits
        self.lock = threading.Lock()  # held by whoever runs the model: generate, scoring, the batcher's worker
        self.max_batch_size = DEFAULT_MAX_BATCH_SIZE  # streams decoded together (batching.py); read at every step
        self._batcher: Batcher | None = None
        self._batcher_lock = threading.Lock()

    # ------------------------------------------------------------ loading
    @classmethod
    def from_run(cls, path: str | Path, base_only: bool = False, template: str | None = None,
                 device: str | None = None, dtype: str = "auto", allow_pickle: bool = False) -> Engine:
        """An engine on a run, checkpoint, exported model or local model directory (see loading.py). Its
        model id is the directory's name, with "-base" for `base_only`."""
        from .loading import load_run

        loaded = load_run(path, base_only=base_only, template=template, device=device, dtype=dtype,
                          allow_pickle=allow_pickle)
        name = loaded.source.path.resolve().name + ("-base" if base_only else "")
        return cls(loaded.model, loaded.tokenizer, loaded.template, name, run_config=loaded.source.config)

    # ------------------------------------------------------------ batched generation
    def generate_iter(self, prompts: list[list[int]], params: GenerationParams,
                      batch_size: int = 8) -> Iterator[tuple[int, Generation]]:
        """Yield (index, Generation) batch by batch, longest prompts first."""
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        for s in range(0, len(order), batch_size):
            idxs = order[s: s + batch_size]
            t0 = time.perf_counter()
            results = self._generate_batch([prompts[i] for i in idxs], params)
            dt = (time.perf_counter() - t0) / len(idxs)
            for i, g in zip(idxs, results, strict=True):
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
                def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> torch.Tensor:
                    rows = input_ids[:, width:].tolist()
                    return torch.tensor([find_stop(engine.decode(r[-window:]), engine.stop_strings) >= 0 for r in rows],
                                        dtype=torch.bool, device=input_ids.device)

            criteria.append(_StopStrings())
        with self.lock, torch.inference_mode():
            if params.seed is not None:  # inside the lock: no other request may draw from the RNG in between
                torch.manual_seed(params.seed)
            out = self.model.generate(input_ids=input_ids, attention_mask=attn, eos_token_id=self.stop_ids,
                                      pad_token_id=pad, stopping_criteria=criteria,
                                      logits_processor=penalty_processors(params, start=width), **params.hf_kwargs())
        results = []
        for row, p in zip(out[:, width:].tolist(), batch, strict=True):
            text, ids, reason = self._finish(row, params.max_new_tokens)
            results.append(Generation(text, ids, len(p), reason))
        return results

    # ------------------------------------------------------------ streaming
    @property
    def batcher(self) -> Batcher:
        """The continuous batcher every `stream` goes through (batching.py), made on first use."""
        with self._batcher_lock:
            if self._batcher is None:
                self._batcher = Batcher(self)
            return self._batcher

    def batch_status(self) -> dict:
        """The batcher's load and counts (`Batcher.status`)."""
        return self.batcher.status()

    def stream(self, prompt: list[int], params: GenerationParams, stop_event: threading.Event | None = None,
               state: StreamState | None = None) -> Iterator[str]:
        """Yield text deltas as tokens arrive; their concatenation equals the non-streamed text (cut at the
        template's stop strings too: a possible partial match is held back until it is decided).

        Thread-safe: concurrent streams are decoded together by the engine's continuous batcher (up to
        `max_batch_size` at a time; batching.py), each answer as it would be alone. `state` (optional)
        receives token counts and the finish reason; it is complete before the iterator ends. Setting
        `stop_event` (or closing the iterator) ends generation at the next step and frees the place. The
        returned `Stream` is also an async iterator: an asyncio server reads it without a thread per request.
        The request is checked (context length, beam search: UserError) and queued on first use.
        """
        return Stream(self, prompt, params, stop_event or threading.Event(),
                      state if state is not None else StreamState())

    # ------------------------------------------------------------ scoring
    def score_samples(self, samples: list[dict], reduce: Any = None) -> dict:
        """Teacher-forced loss and perplexity over the trainable tokens of encoded samples
        (evaluation/loss.py), under the engine's lock; `reduce` adds other processes' sums (sharded predict)."""
        from ..evaluation.loss import teacher_forced_loss

        with self.lock:
            return teacher_forced_loss(self.model, samples, reduce)

    def loss_on_targets(self, examples: list[Example], reduce: Any = None) -> dict:
        """Loss and perplexity of the model on the examples' targets (their last assistant turn, what
        predict generates), with samples built as training builds them; {} when no row has a target. With
        `reduce` (this process's share of the rows, sums added across processes) every process must call it."""
        from ..evaluation.loss import last_turn_samples

        samples = last_turn_samples(examples, self.tokenizer, self.template, self.cutoff_len, self.default_system)
        return self.score_samples(samples, reduce) if samples or reduce is not None else {}


def _context_len(model: Any, tokenizer: PreTrainedTokenizerBase) -> int:
    from ..training.rope import context_length

    n = context_length(model.config)  # with a RoPE scaling (model.rope_scaling): native length x its factor
    tm = getattr(tokenizer, "model_max_length", None)
    for v in (n, tm):
        if isinstance(v, int) and 0 < v < 10**6:
            return v
    return 2048
