"""OpenAI wire format: request and response schemas of the chat and text completion endpoints.

Kept apart from the app (`app.py`) so the shapes can be read in one place. Unknown request fields are
ignored, as OpenAI-compatible servers usually do (clients send fields such as `user`); fields this
server cannot honour (`n` > 1, `logprobs`, `echo`, `suffix`, `best_of` > 1) are rejected with 400 by
`app.py` rather than silently ignored.

Extensions beyond OpenAI (as vLLM accepts them): `top_k` and `repetition_penalty`.
"""
from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


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
    repetition_penalty: Optional[float] = Field(None, gt=0)
    seed: Optional[int] = None
    n: int = 1
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Union[bool, int, None] = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None  # the newer name of max_tokens


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

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               413: "invalid_request_error", 503: "server_error", 500: "server_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI error body: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
