"""The generation engine shared by predict, chat and serve.

`Engine.from_run(path)` loads a run directory (an adapter on its base model, or a full model), an
exported/merged model, or any local model directory (then `template=` names the prompt template;
a model with a chat_template defaults to it). Prompts are built with the run's template through
`Template.encode`, the same function training used, so inference sees the training prompt exactly.

Generation is batched with left padding; `generate_iter` sorts prompts by length (less padding) and
yields each batch's results as soon as it finishes. Decoding stops at EOS (and at the template's stop
tokens). `stream` yields text deltas token by token and stops early when `stop_event` is set (a client
that went away). The model is not thread-safe here: callers that share an engine across threads hold
`engine.lock` (the server queues requests on it).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import UserError
from .rundir import RunDir


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

    def hf_kwargs(self) -> dict:
        kw = dict(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                  repetition_penalty=self.repetition_penalty, do_sample=self.do_sample)
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kw


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
                 default_system: str | None = None):
        self.model = model
        self.default_system = default_system  # the run's data.system: training added it to rows without one
        self.tokenizer = tokenizer
        self.template = template
        self.model_id = model_id
        self.device = next(model.parameters()).device
        self.stop_ids = template.stop_token_ids(tokenizer)
        self.context_len = context_len or _context_len(model, tokenizer)
        self.lock = threading.Lock()

    # ------------------------------------------------------------ loading
    @classmethod
    def from_run(cls, path: str | Path, base_only: bool = False, template: str | None = None,
                 device: str | None = None, dtype: str = "auto") -> "Engine":
        from . import model as loader
        from .templates import Template, get_template

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
        tok = loader.load_tokenizer(str(run.path), trust_remote_code=bool(cfg and cfg.model.trust_remote_code))
        if run.has_adapter():
            if cfg is None:
                import json

                base_name = json.loads((run.path / "adapter_config.json").read_text())["base_model_name_or_path"]
                from .config import ModelConfig

                model_cfg = ModelConfig(name_or_path=base_name)
            else:
                model_cfg = cfg.model
            model = loader.load_base_model(model_cfg, device=device, dtype=torch_dtype)
            if not base_only:
                model = loader.load_adapter(model, run.path)
        else:
            if base_only and cfg is not None:
                model = loader.load_base_model(cfg.model, device=device, dtype=torch_dtype)
            else:
                model = loader.load_plain_model(run.path, dtype=torch_dtype, device=device,
                                                trust_remote_code=bool(cfg and cfg.model.trust_remote_code))
        if template:
            tpl = get_template(template, tok)
        elif run.template_path.is_file():
            tpl = Template.load(run.template_path)
        elif tok.chat_template:
            tpl = get_template("tokenizer", tok)
        else:
            raise UserError(f"'{run.path}' has no template.json and its tokenizer no chat_template: pass --template "
                            "(domain_zh, alpaca, chatml or a template .json)")
        model.to(device)
        model.eval()
        name = run.path.resolve().name + ("-base" if base_only else "")
        return cls(model, tok, tpl, name, default_system=cfg.data.system if cfg is not None else None)

    # ------------------------------------------------------------ prompts
    def encode_messages(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation ending with a user turn, plus the assistant prefix. The run's
        `data.system` is added when the conversation has no system message, as training did."""
        if self.default_system and not (messages and messages[0]["role"] == "system"):
            messages = [{"role": "system", "content": self.default_system}] + list(messages)
        ids, _ = self.template.encode(self.tokenizer, messages, add_generation_prompt=True)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _cut(self, ids: list[int], max_new: int) -> tuple[list[int], str]:
        for k, t in enumerate(ids):
            if t in self.stop_ids:
                return ids[:k], "stop"
        return ids, "length" if len(ids) >= max_new else "stop"

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

        self._check_fits(max(len(p) for p in batch), params.max_new_tokens)
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=self.device)
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=self.device)
        with self.lock, torch.inference_mode():
            if params.seed is not None:  # inside the lock: no other request may draw from the RNG in between
                torch.manual_seed(params.seed)
            out = self.model.generate(input_ids=input_ids, attention_mask=attn, eos_token_id=self.stop_ids,
                                      pad_token_id=pad, **params.hf_kwargs())
        results = []
        for row, p in zip(out[:, width:].tolist(), batch):
            ids, reason = self._cut(row, params.max_new_tokens)
            results.append(Generation(self.decode(ids), ids, len(p), reason))
        return results

    def _check_fits(self, prompt_len: int, max_new: int) -> None:
        if prompt_len + max_new > self.context_len:
            raise UserError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new}) exceeds the model's context "
                            f"of {self.context_len} tokens")

    # ------------------------------------------------------------ streaming
    def stream(self, prompt: list[int], params: GenerationParams, stop_event: threading.Event | None = None,
               state: StreamState | None = None) -> Iterator[str]:
        """Yield text deltas as tokens arrive; their concatenation equals the non-streamed text.

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
        emitted = ""
        ids: list[int] = []
        try:
            while True:
                item = q.get()
                if item is None:
                    break
                for t in item:
                    if t in self.stop_ids:
                        stop_event.set()
                        break
                    ids.append(t)
                state.token_ids = list(ids)
                text = self.decode(ids)
                if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                    continue
                if len(text) > len(emitted) and text.startswith(emitted):
                    delta, emitted = text[len(emitted):], text
                    yield delta
        finally:
            stop_event.set()
            thread.join()
        if errors:
            raise errors[0]
        text = self.decode(ids)
        if len(text) > len(emitted) and text.startswith(emitted):
            yield text[len(emitted):]
        state.text = text
        state.token_ids = ids
        hit_stop = len(ids) < params.max_new_tokens
        state.finish_reason = "stop" if hit_stop else "length"

    # ------------------------------------------------------------ scoring
    def target_loss(self, samples: list[dict], batch_size: int = 8) -> dict:
        """Teacher-forced loss and perplexity over the trainable (target) tokens of encoded samples
        (dicts with input_ids and labels, as built by data.encode_example)."""
        import torch

        total, count = 0.0, 0
        with self.lock, torch.inference_mode():
            for s in range(0, len(samples), batch_size):
                batch = samples[s: s + batch_size]
                width = max(len(x["input_ids"]) for x in batch)
                pad = self.tokenizer.pad_token_id
                ids = torch.tensor([x["input_ids"] + [pad] * (width - len(x["input_ids"])) for x in batch], device=self.device)
                attn = torch.tensor([[1] * len(x["input_ids"]) + [0] * (width - len(x["input_ids"])) for x in batch], device=self.device)
                labels = torch.tensor([x["labels"] + [-100] * (width - len(x["labels"])) for x in batch], device=self.device)
                logits = self.model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
                tgt = labels[:, 1:]
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                         ignore_index=-100, reduction="sum")
                total += loss.item()
                count += int((tgt != -100).sum())
        mean = total / max(count, 1)
        return {"loss": round(mean, 6), "perplexity": round(math.exp(min(mean, 50)), 4), "target_tokens": count}


def _context_len(model, tokenizer) -> int:
    n = getattr(model.config, "max_position_embeddings", None)
    tm = getattr(tokenizer, "model_max_length", None)
    for v in (n, tm):
        if isinstance(v, int) and 0 < v < 10**6:
            return v
    return 2048
