"""What a request may ask, apart from the app (app.py): its schema errors as one message, the refusal of what this
server cannot honour (never ignored silently), the conversation's shape, and the decoding settings it gets.

- Refused with 400, naming the field: `n` > 1, `logprobs` / `top_logprobs`, `tools` / `functions`, a `tool_choice`
  / `function_call` other than "none" or "auto" (there are no tools to call: the model answers in plain text), a
  `response_format` other than {"type": "text"} (nothing constrains the answer to JSON), more than 4 `stop`
  strings, `logit_bias` token ids past the model's vocabulary, and penalties on an engine that cannot apply them.
- `max_tokens` (or `max_completion_tokens`) is capped by the context the prompt leaves, given or not: an
  answer cut there ends with finish_reason "length" (as vLLM's and llama.cpp's servers do with a long prompt).
  A prompt that leaves no room at all is a 400 `context_length_exceeded`.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ...errors import UserError
from ..params import GenerationParams, RequestParams
from . import protocol as P
from .lifecycle import APIError

if TYPE_CHECKING:
    from ..engine import EngineBase

_UNION_LABELS = ("str", "int", "float", "bool")  # pydantic names the member of a union in `loc`: not a field


def _where(err: dict) -> list[str]:
    return [str(x) for x in err.get("loc", ()) if x != "body" and x not in _UNION_LABELS and "[" not in str(x)]


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) of a request's schema errors: the most specific one (a union reports one error per
    member; the member the value was meant for gets deepest), with its siblings at the same place."""
    err = max(errors, key=lambda e: len(_where(e)))
    loc = _where(err)
    kind, msg, ctx = err.get("type"), err.get("msg"), err.get("ctx") or {}
    if kind == "json_invalid":
        at = f" at character {loc[0]}" if loc else ""
        return f"The request body is not valid JSON ({ctx.get('error', msg)}{at}): send a JSON object.", None
    where = ctx.get("param") if kind == P.INVALID_UNICODE else ".".join(loc)
    if not where:
        if kind == "missing":
            return "The request body is empty: send a JSON object.", None
        if kind in ("model_attributes_type", "dict_type"):
            return "The request body must be a JSON object, with the fields of the request.", None
    msgs = list(dict.fromkeys(str(e.get("msg")) for e in errors
                              if _where(e) == loc and e.get("type") != P.INVALID_UNICODE))
    return f"{where or 'request body'}: {'; or '.join(msgs) or msg}", where or None


class _Huge:
    def __init__(self, digits: int) -> None:
        self.digits = digits


def huge_integer(body: bytes) -> tuple[str, int] | None:
    """(dotted field path, digit count) of the first integer in a JSON body with more digits than Python's int()
    reads (sys.get_int_max_str_digits: json.loads fails on it with a message about int conversion); None when
    there is none or the body is not JSON."""
    limit = sys.get_int_max_str_digits()

    def parse_int(text: str) -> Any:
        digits = len(text.lstrip("-"))
        return _Huge(digits) if limit and digits > limit else int(text)

    def find(value: Any, path: str) -> tuple[str, int] | None:
        if isinstance(value, _Huge):
            return path, value.digits
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            found = find(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
        return None

    try:
        return find(json.loads(body, parse_int=parse_int), "")
    except (ValueError, RecursionError):  # not JSON (FastAPI's parser says so), or nested past Python's stack
        return None


def unreadable_body(cause: BaseException | None) -> str:
    """What was wrong with a body FastAPI could not parse (`cause`: the parser's exception)."""
    if isinstance(cause, UnicodeDecodeError):
        return (f"The request body is not UTF-8 (byte 0x{cause.object[cause.start]:02x} at position {cause.start}): "
                "send a JSON object encoded in UTF-8.")
    if isinstance(cause, RecursionError):
        return "The request body is nested too deeply to read: send a JSON object with the fields of the request."
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "A number in the request body has too many digits to read: send numbers in the fields' ranges."
    return "The request body could not be read: send a JSON object encoded in UTF-8."


# ---------------------------------------------------------------- refusals

def _choice_name(value: Any) -> str:
    return value if isinstance(value, str) else f"an object ({', '.join(map(str, value))})"


def refuse_unsupported(req: P.ChatCompletionRequest | P.CompletionRequest, engine: EngineBase) -> None:
    """400 naming the first field this server cannot honour (see the module docstring)."""
    if req.model != engine.model_id:
        raise APIError(404, f"The model '{req.model}' does not exist: this server serves '{engine.model_id}' "
                            "(see GET /v1/models).", param="model", code="model_not_found")
    if req.n != 1:
        raise APIError(400, "Only n=1 is supported.", param="n")
    if req.logprobs:
        raise APIError(400, "logprobs are not supported by this server.", param="logprobs")
    if len(req.stop_list()) > 4:
        raise APIError(400, "At most 4 stop sequences are allowed.", param="stop")
    if isinstance(req, P.ChatCompletionRequest):
        if req.top_logprobs:
            raise APIError(400, "top_logprobs are not supported by this server (nor logprobs).", param="top_logprobs")
        for name in ("tools", "functions"):
            if getattr(req, name):
                raise APIError(400, f"{name} are not supported by this server yet: the model answers in plain text and "
                                    f"makes no tool calls. Leave '{name}' out.", param=name)
        for name in ("tool_choice", "function_call"):
            value = getattr(req, name)
            if value is not None and value not in ("none", "auto"):
                raise APIError(400, f"{name} {_choice_name(value)!s} cannot be honoured: this server has no tools to "
                                    f"call (the model answers in plain text). Leave '{name}' out or send \"none\".",
                               param=name)
        kind = (req.response_format or {}).get("type", "text")
        if kind != "text":
            raise APIError(400, f"response_format '{str(kind)[:40]}' is not supported by this server: nothing "
                                "constrains the answer to JSON. Leave 'response_format' out or send "
                                "{\"type\": \"text\"}; ask for JSON in the prompt instead.", param="response_format")
    penalties = [name for name in ("presence_penalty", "frequency_penalty", "logit_bias") if getattr(req, name)]
    if penalties and not getattr(engine, "takes_penalties", False):
        raise APIError(400, f"{penalties[0]} is not supported by this engine yet (--engine hf applies it).",
                       param=penalties[0])
    for key in req.logit_bias or {}:
        if int(key) >= engine.vocab_size:
            raise APIError(400, f"logit_bias: token id {key} is not in this model's vocabulary (ids 0 to "
                                f"{engine.vocab_size - 1}).", param=f"logit_bias.{key}")


def chat_messages(req: P.ChatCompletionRequest) -> list[dict]:
    """The conversation as role/content dicts, checked for the shape every template can render: an optional
    system message first, then user and assistant turns alternating, starting and ending with user."""
    if not req.messages:
        raise APIError(400, "'messages' must contain at least one message.", param="messages")
    msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
    start = 1 if msgs[0]["role"] == "system" else 0
    for i, m in enumerate(msgs):
        if m["role"] == "system" and i > 0:
            raise APIError(400, f"messages[{i}]: a system message may only come first.", param=f"messages.{i}.role")
        want = "user" if (i - start) % 2 == 0 else "assistant"
        if i >= start and m["role"] != want:
            raise APIError(400, f"messages[{i}]: expected role '{want}', got '{m['role']}': after an optional system "
                                "message, user and assistant messages must alternate, starting with user.",
                           param=f"messages.{i}.role")
    if msgs[-1]["role"] != "user":
        raise APIError(400, f"messages[{len(msgs) - 1}]: the last message must have role 'user'.",
                       param=f"messages.{len(msgs) - 1}.role")
    return msgs


def encode_chat(engine: EngineBase, msgs: list[dict], chat_template_kwargs: dict | None = None) -> list[int]:
    """Prompt ids; a conversation the model's chat template refuses is the client's mistake (400), and so are
    `chat_template_kwargs` (vLLM's request field, e.g. {"enable_thinking": false}) the template does not read."""
    kw = {}
    if chat_template_kwargs is not None:
        try:
            kw["chat_template_kwargs"] = engine.template.check_kwargs(chat_template_kwargs, "chat_template_kwargs")
        except UserError as e:
            raise APIError(400, str(e), param="chat_template_kwargs") from None
    try:
        return engine.encode_messages(msgs, **kw)
    except UserError as e:  # templates.py turns a chat_template's raise_exception into UserError
        raise APIError(400, str(e), param="messages") from None


# ---------------------------------------------------------------- decoding settings

def request_params(req: P.ChatCompletionRequest | P.CompletionRequest, prompt_len: int, engine: EngineBase,
                   defaults: GenerationParams) -> GenerationParams:
    """The request's decoding: the server's `defaults` with what the request sets; max_new_tokens is the
    request's max_tokens (else the default), capped by the room the prompt leaves in the context. A RequestParams
    when the request sets a penalty or logit_bias."""
    prompt_field = "messages" if isinstance(req, P.ChatCompletionRequest) else "prompt"
    requested = getattr(req, "max_completion_tokens", None)
    requested = req.max_tokens if requested is None else requested
    room = engine.context_len - prompt_len
    if requested is not None and requested <= 0:
        raise APIError(400, f"max_tokens must be at least 1, got {requested}.", param="max_tokens")
    if room <= 0:
        raise APIError(400, f"This model's context is {engine.context_len} tokens; the prompt has {prompt_len} tokens, "
                            "which leaves no room for an answer.", param=prompt_field, code="context_length_exceeded")
    params = defaults if req.temperature is None else defaults.with_temperature(req.temperature)
    given = {"top_p": req.top_p, "top_k": req.top_k, "repetition_penalty": req.repetition_penalty,
             "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty}
    fields = {**asdict(params), **{k: v for k, v in given.items() if v is not None},
              "max_new_tokens": min(requested or defaults.max_new_tokens, room), "seed": req.seed,
              "logit_bias": tuple((int(k), v) for k, v in (req.logit_bias or {}).items())}
    penalised = RequestParams(**fields)
    # plain settings stay a GenerationParams (what every engine takes)
    out = penalised if penalised.penalised else GenerationParams(
        **{k: v for k, v in fields.items() if k in GenerationParams.__dataclass_fields__})
    return out.validate()  # a UserError here (bad server defaults) becomes a 400 like the others
