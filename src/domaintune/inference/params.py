"""Generation settings: the one home of every sampling default.

`GenerationParams` holds the defaults and the rule "temperature 0 means greedy" (`with_temperature`).
`RequestParams` adds what only a server request sets: OpenAI's `presence_penalty`, `frequency_penalty` and
`logit_bias` (a subclass, so the settings predict records for its files stay GenerationParams' fields).
Verbs that should decode differently by default each have one named preset in `PRESETS`; the command-line
flags of predict, chat and serve, and the server's defaults for requests that leave a parameter out, are
built from these (cli/options.py), so `--help` shows the same numbers the code uses.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..errors import UserError


@dataclass(frozen=True)
class GenerationParams:
    """How to decode one or more answers. Field metadata "help" is what `--help` says of each flag."""

    max_new_tokens: int = field(default=256, metadata={"help": "most tokens generated per answer"})
    num_beams: int = field(default=1, metadata={"help": "beam search width; 1 = greedy or sampling"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling: keep the likeliest tokens up to this mass"})
    top_k: int = field(default=50, metadata={"help": "sample among the k likeliest tokens; 0 = off"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "penalty on repeated tokens; 1.0 = none"})
    seed: int | None = field(default=None, metadata={"help": "random seed for sampling"})

    def with_temperature(self, temperature: float) -> GenerationParams:
        """These settings at `temperature`, where 0 means greedy decoding (as in the OpenAI API) and any
        other value samples at that temperature. The one place this rule lives."""
        if temperature == 0:
            return replace(self, do_sample=False, temperature=1.0)
        return replace(self, do_sample=True, temperature=temperature)

    def validate(self) -> GenerationParams:
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
        """Keyword arguments of transformers' `generate`."""
        kw = dict(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                  repetition_penalty=self.repetition_penalty, do_sample=self.do_sample)
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kw


@dataclass(frozen=True)
class RequestParams(GenerationParams):
    """GenerationParams plus OpenAI's penalties, as the server takes them from a request (see OpenAIPenalties)."""

    presence_penalty: float = field(default=0.0, metadata={"help": "subtracted once from the logit of every token "
                                                                    "already generated; -2 to 2"})
    frequency_penalty: float = field(default=0.0, metadata={"help": "subtracted from a token's logit once per time "
                                                                     "it was generated; -2 to 2"})
    logit_bias: tuple[tuple[int, float], ...] = field(default=(), metadata={"help": "(token id, bias) pairs added "
                                                                                    "to the logits; bias -100 to 100"})

    def validate(self) -> RequestParams:
        super().validate()
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise UserError(f"{name} must lie in [-2, 2], got {getattr(self, name)}")
        for token, bias in self.logit_bias:
            if token < 0 or not -100 <= bias <= 100:
                raise UserError(f"logit_bias: token ids must be >= 0 and biases lie in [-100, 100], got "
                                f"{token}: {bias}")
        return self

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


class OpenAIPenalties:
    """OpenAI's `logit_bias`, `presence_penalty` and `frequency_penalty` as a transformers logits processor:

        logit[j] += bias[j];  logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty

    where count[j] is how often token j was generated so far: ids from position `start` on (the prompt does not
    count, as in OpenAI's and vLLM's definition; transformers' repetition penalty counts the prompt too, so it
    is not this). Called by `generate` (with `start` the padded prompt width) and by the continuous batcher per
    request (with its prompt length)."""

    def __init__(self, start: int, presence: float, frequency: float, bias: tuple[tuple[int, float], ...]) -> None:
        self.start, self.presence, self.frequency = start, presence, frequency
        self.bias_ids = [t for t, _ in bias]
        self.bias_values = [b for _, b in bias]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        scores = scores.clone()
        if self.bias_ids:
            ids = torch.tensor(self.bias_ids, device=scores.device)
            scores[:, ids] += torch.tensor(self.bias_values, device=scores.device, dtype=scores.dtype)
        generated = input_ids[:, self.start:]
        if generated.shape[1] and (self.presence or self.frequency):
            counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
            scores -= counts * self.frequency + (counts > 0).to(scores.dtype) * self.presence
        return scores


def penalty_processors(params: GenerationParams, start: int) -> list:
    """[OpenAIPenalties] for a RequestParams that sets a penalty or a bias, else []."""
    if not isinstance(params, RequestParams) or not params.penalised:
        return []
    return [OpenAIPenalties(start, params.presence_penalty, params.frequency_penalty, params.logit_bias)]


def logits_processors(params: GenerationParams, start: int = 0) -> Any:
    """transformers' logits processors for these settings, in the order `generate` applies them (repetition
    penalty; then OpenAI's penalties (`penalty_processors`, given to `generate` as its custom `logits_processor`,
    which it runs after its own); with sampling: temperature, top-k, top-p); None when there are none. The
    continuous batcher applies them per request (`start`: the prompt's length), so a request decodes as
    `generate` would decode it alone."""
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    procs.extend(penalty_processors(params, start))
    if params.do_sample:
        if params.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            procs.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            procs.append(TopPLogitsWarper(params.top_p))
    return procs or None


def field_help(name: str) -> str:
    """The `--help` text of a GenerationParams field."""
    return next(f.metadata["help"] for f in fields(GenerationParams) if f.name == name)


# Named presets: where a verb's defaults differ from GenerationParams' own, and why.
PRESETS: dict[str, GenerationParams] = {
    # Scores must be reproducible and comparable between runs: greedy decoding, GenerationParams' defaults.
    "predict": GenerationParams(),
    # A person reading in a terminal: sampling for natural answers, and a mild repetition penalty because
    # small models loop without one.
    "chat": GenerationParams(max_new_tokens=512, do_sample=True, temperature=0.7, top_p=0.9, top_k=50,
                             repetition_penalty=1.1),
    # OpenAI clients leave out what the OpenAI API does not have: no top-k and no repetition penalty unless
    # a request asks for them (vLLM's extensions `top_k`, `repetition_penalty`).
    "serve": GenerationParams(max_new_tokens=512, do_sample=True, temperature=0.7, top_p=0.9, top_k=0,
                              repetition_penalty=1.0),
}
