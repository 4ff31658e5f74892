"""OpenAI wire format: request and response schemas of the chat and text completion endpoints.

Kept apart from the app (`app.py`) so the shapes can be read in one place. Unknown request fields are
ignored, as OpenAI-compatible servers usually do (clients send fields such as `user`); the fields that would
change the answer are all read here, and those this server cannot honour (`n` > 1, `logprobs`, `top_logprobs`,
`echo`, `suffix`, `best_of` > 1, `tools`, `functions`, a `tool_choice` / `function_call` other than "none" or
"auto", a `response_format` other than text) are refused with 400 by `checks.py` rather than silently ignored.
`presence_penalty`, `frequency_penalty` and `logit_bias` are honoured (params.OpenAIPenalties).

Extensions beyond OpenAI (as vLLM accepts them): `top_k`, `repetition_penalty`, and on chat completions
`chat_template_kwargs` (e.g. `{"enable_thinking": false}` for a Qwen3-style template; checks.py refuses keys and
values the template does not read with 400).

Values the model cannot take are refused here, so they are a 400 before anything generates or streams:
text holding a lone UTF-16 surrogate (JSON `"\\ud800"` alone: not Unicode, and the tokenizer cannot encode it)
in any string of the request (`_Request` checks every field, present and future, and names it in `param`),
a `seed` outside what torch.manual_seed takes ([-2**63, 2**64 - 1]), NaN and infinities (Python's JSON
parser reads `NaN` and `Infinity`), a `repetition_penalty` outside [0.01, 100] (near 0 it divides the
logits by zero), penalties outside OpenAI's [-2, 2], and `logit_bias` keys that are not token ids or biases
outside [-100, 100] (ids past the model's vocabulary: checks.py, which knows the model). A `temperature` in
(0, 1e-5) decodes greedily, the limit it approaches: dividing the logits by it would overflow them.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.manual_seed accepts
MIN_TEMPERATURE = 1e-5  # below it (and above 0), sampling is greedy decoding, and dividing by it overflows
INVALID_UNICODE = "invalid_unicode"  # the error type of a string with a lone surrogate; ctx["param"] names it


def lone_surrogate(value: Any, path: str = "") -> tuple[str, str, int] | None:
    """(dotted path, character, index) of the first string in `value` (a model, list, dict or str) holding a
    lone surrogate; None when every string is valid Unicode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return path, value[e.start], e.start
        return None
    items: Iterable[tuple[Any, Any]]
    if isinstance(value, BaseModel):
        items = ((name, getattr(value, name)) for name in type(value).model_fields)
    elif isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = lone_surrogate(item, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), allow_inf_nan=False)

    @model_validator(mode="after")
    def _valid_unicode(self) -> _Request:
        found = lone_surrogate(self)
        if found:
            param, char, index = found
            raise PydanticCustomError(
                INVALID_UNICODE, "the text is not valid Unicode: it holds a lone surrogate ({char} at index {index}); "
                "send well-formed text (in JSON, a \\ud800-\\udfff escape must be one half of a high-low pair).",
                {"param": param, "char": f"U+{ord(char):04X}", "index": index})
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(_Request):
    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    repetition_penalty: Optional[float] = Field(None, ge=0.01, le=100)
    seed: Optional[int] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict[str, Annotated[float, Field(ge=-100, le=100)]]] = None
    n: int = 1
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Union[bool, int, None] = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        for key in bias or {}:
            if not (key.isascii() and key.isdigit() and len(key) <= 9):
                raise ValueError(f"keys must be token ids (non-negative integers, as strings), got {key[:40]!r}")
        return bias

    @field_validator("temperature")
    @classmethod
    def _tiny_temperature_is_greedy(cls, t: Optional[float]) -> Optional[float]:
        return 0.0 if t is not None and 0 < t < MIN_TEMPERATURE else t

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None  # the newer name of max_tokens
    # read only to refuse what cannot be honoured yet (checks.py): never silently dropped
    tools: Optional[list[Any]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    functions: Optional[list[Any]] = None  # the older name of tools
    function_call: Union[str, dict[str, Any], None] = None  # the older name of tool_choice
    response_format: Optional[dict[str, Any]] = None
    top_logprobs: Optional[int] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None  # vLLM's extension: variables for the chat template


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]]
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None


# ---------------------------------------------------------------- responses (plain dicts: exact wire shapes)

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(rid: str, model: str, text: str, finish_reason: str, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": now(), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": use}


def chat_chunk(rid: str, model: str, delta: dict, finish_reason: str | None = None,
               with_usage_field: bool = False) -> dict:
    d = {"id": rid, "object": "chat.completion.chunk", "created": now(), "model": model,
         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if with_usage_field:  # OpenAI sends "usage": null on every chunk but the last when usage is requested
        d["usage"] = None
    return d


def text_completion(rid: str, model: str, text: str, finish_reason: str, use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": now(), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": use}


def text_chunk(rid: str, model: str, text: str, finish_reason: str | None = None,
               with_usage_field: bool = False) -> dict:
    d = {"id": rid, "object": "text_completion", "created": now(), "model": model,
         "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    if with_usage_field:
        d["usage"] = None
    return d


def usage_chunk(rid: str, model: str, obj: str, use: dict) -> dict:
    """The final stream chunk of `stream_options.include_usage`: empty choices, the usage."""
    return {"id": rid, "object": obj, "created": now(), "model": model, "choices": [], "usage": use}


def model_list(model_id: str, created: int) -> dict:
    return {"object": "list",
            "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "domaintune"}]}


# ---------------------------------------------------------------- errors

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
               404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               503: "server_error", 500: "server_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI error body: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
