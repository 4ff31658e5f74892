"""The only outbound HTTP of domaintune: chat completions against an OpenAI-compatible endpoint.

Uses the official `openai` client with its own retry machinery: 408/409/429/5xx, timeouts and connection
errors are retried `max_retries` times with exponential backoff (0.5 s doubling, at most 8 s, with jitter)
or the server's Retry-After / retry-after-ms (up to 2 minutes). Only a plain
``POST {base_url}/chat/completions`` with ``model``, ``messages``, ``temperature`` and ``max_tokens`` is sent
(no tools, no response_format), so any compatible server works, including ``domaintune serve``.

What the client does not do, and this module adds:
- replies that are not a chat completion (not JSON, no choices, no text) raise `MalformedResponse`, which
  the pipeline counts and retries a bounded number of times;
- errors that retrying cannot fix (400, 401, 403, 404, ...) and retries that ran out become `UserError`
  with a message saying what to check;
- every HTTP attempt and every response status is counted (httpx event hooks) for manifest.json.

The client reads its settings from any config section with the endpoint fields of `EndpointSettings`
(`selfinstruct` for gen-data, `judge` for the judge verb); `section` names it in error messages.
"""
from __future__ import annotations

import json
import os
import threading
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol, TypedDict

from ..errors import UserError

if TYPE_CHECKING:
    import httpx
    import openai


class EndpointSettings(Protocol):
    """The fields of a config section that the client reads (`SelfInstructConfig`, `JudgeConfig`)."""

    @property
    def base_url(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def api_key_env(self) -> str: ...
    @property
    def temperature(self) -> float: ...
    @property
    def max_tokens(self) -> int | None: ...
    @property
    def max_retries(self) -> int: ...
    @property
    def request_timeout(self) -> float: ...


class MalformedResponse(Exception):
    """The endpoint answered 200 but not with a usable chat completion."""


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None
    prompt_tokens: int | None = None  # the endpoint's usage, when it reports one
    completion_tokens: int | None = None


class HttpCounts(TypedDict):
    attempts: int
    status: dict[str, int]
    no_response: int


class ChatClient:
    """Thread-safe: one instance is shared by the pipeline's worker threads."""

    def __init__(self, cfg: EndpointSettings, section: str = "selfinstruct"):
        import openai  # heavy: imported only when a run starts

        self.cfg = cfg
        self.section = section  # the config section named in error messages
        self._openai = openai
        self._lock = threading.Lock()
        self.attempts = 0  # HTTP requests sent, retries included
        self.statuses: Counter[int] = Counter()  # responses received, by status code
        key = os.environ.get(cfg.api_key_env, "")
        self._key_missing = not key
        http_client = openai.DefaultHttpxClient(
            event_hooks={"request": [self._on_request], "response": [self._on_response]})
        # An explicit key (placeholder when unset) so the client never falls back to $OPENAI_API_KEY
        # when the user named another variable; servers without auth ignore it.
        self._client = openai.OpenAI(
            base_url=cfg.base_url, api_key=key or "EMPTY", max_retries=cfg.max_retries,
            timeout=cfg.request_timeout, http_client=http_client)

    # httpx event hooks run in the worker thread that sends the request.
    def _on_request(self, request: httpx.Request) -> None:
        with self._lock:
            self.attempts += 1

    def _on_response(self, response: httpx.Response) -> None:
        with self._lock:
            self.statuses[response.status_code] += 1

    def http_counts(self) -> HttpCounts:
        """{"attempts", "status": {code: n}, "no_response"}; no_response = timeouts and connection errors."""
        with self._lock:
            got = sum(self.statuses.values())
            return {"attempts": self.attempts, "status": {str(k): v for k, v in sorted(self.statuses.items())},
                    "no_response": self.attempts - got}

    def close(self) -> None:
        self._client.close()

    def complete(self, prompt: str) -> Completion:
        """One chat completion for a single user message. Raises MalformedResponse or UserError."""
        openai, cfg, sec = self._openai, self.cfg, self.section
        kwargs: dict[str, Any] = {"model": cfg.model, "messages": [{"role": "user", "content": prompt}],
                                  "temperature": cfg.temperature}
        if cfg.max_tokens is not None:
            kwargs["max_tokens"] = cfg.max_tokens
        try:
            resp = self._client.chat.completions.create(**kwargs)
        except (json.JSONDecodeError, openai.APIResponseValidationError) as e:
            raise MalformedResponse(f"reply is not JSON: {e}") from None
        except openai.AuthenticationError:
            hint = " (it is not set)" if self._key_missing else ""
            raise UserError(f"{cfg.base_url} answered 401 Unauthorized: check the API key in "
                            f"${cfg.api_key_env}{hint}") from None
        except openai.APIStatusError as e:
            raise UserError(self._status_message(e)) from None
        except openai.APITimeoutError:
            raise UserError(
                f"no reply from {cfg.base_url} within {sec}.request_timeout={cfg.request_timeout}s "
                f"(tried {cfg.max_retries + 1} times); raise the timeout or check the server, then run the same "
                f"command again to resume") from None
        except openai.APIConnectionError as e:
            raise UserError(
                f"cannot connect to {cfg.base_url} ({e.__cause__ or e}; tried {cfg.max_retries + 1} times); check "
                f"{sec}.base_url and that the server runs, then run the same command again to resume") from None
        return _completion_of(resp)

    def _status_message(self, e: openai.APIStatusError) -> str:
        cfg, sec, status = self.cfg, self.section, e.status_code
        detail = _error_detail(e)
        if status == 400:
            return (f"{cfg.base_url} answered 400 Bad Request ({detail}); not retried: check {sec}.model "
                    f"({cfg.model!r}), max_tokens and the prompt templates")
        if status in (403, 404):
            return (f"{cfg.base_url} answered {status} ({detail}): check {sec}.base_url (it should end "
                    f"in /v1) and {sec}.model ({cfg.model!r})")
        if status == 429 or status >= 500:
            return (f"{cfg.base_url} still answered {status} ({detail}) after {sec}.max_retries="
                    f"{cfg.max_retries} retries; wait, lower max_concurrency or raise max_retries, then run the "
                    f"same command again to resume")
        return f"{cfg.base_url} answered {status} ({detail}); not retried"


def _error_detail(e: openai.APIStatusError) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):  # openai unwraps {"error": {...}}; other servers may not
        err = body.get("error")
        msg = err.get("message") if isinstance(err, dict) else body.get("message")
        if msg:
            return str(msg)[:300]
    return str(getattr(e, "message", e))[:300]


def _completion_of(resp: Any) -> Completion:
    if isinstance(resp, str):  # a non-JSON content type comes back as text
        raise MalformedResponse(f"reply is not JSON: {resp[:100]!r}")
    choices = getattr(resp, "choices", None)
    if not choices:
        raise MalformedResponse("reply has no choices")
    choice = choices[0]
    message = getattr(choice, "message", None)
    text = getattr(message, "content", None)
    if not isinstance(text, str):
        raise MalformedResponse("reply has no message text")
    usage = getattr(resp, "usage", None)

    def count(name: str) -> int | None:
        v = getattr(usage, name, None)
        return v if isinstance(v, int) and v >= 0 else None

    return Completion(text=text, finish_reason=getattr(choice, "finish_reason", None),
                      prompt_tokens=count("prompt_tokens"), completion_tokens=count("completion_tokens"))


def complete_with_retries(client: ChatClient, prompt: str, retries: int, base_delay: float,
                          count: Callable[[str, int], None], calls: str = "calls") -> Completion | None:
    """One completion, asked again (with backoff) up to `retries` times while the reply is malformed; None when
    it stays malformed. `count(key, n)` tallies each attempt under `calls`, each malformed reply
    ("malformed_replies"), and the tokens spent ("prompt_tokens", "completion_tokens": the endpoint's usage when
    it reports one, else an estimate from the text, see chunking.py). Shared by every caller of the teacher."""
    import time

    from .chunking import approx_tokens

    for attempt in range(retries + 1):
        count(calls, 1)
        try:
            comp = client.complete(prompt)
        except MalformedResponse:
            count("malformed_replies", 1)
        else:
            count("prompt_tokens", comp.prompt_tokens if comp.prompt_tokens is not None else approx_tokens(prompt))
            count("completion_tokens", comp.completion_tokens if comp.completion_tokens is not None
                  else approx_tokens(comp.text))
            return comp
        if attempt < retries:
            time.sleep(base_delay * 2 ** attempt)
    return None
