"""The ASGI guard in front of the app: who may send requests, and how large they may be.

It runs before routing and body parsing, in this order:

1. Host check, only when no API key is set: a web page on a domain its owner points at 127.0.0.1 (DNS
   rebinding) could otherwise use the model and read the answers from any browser on this machine. A request
   is answered only when its Host header names localhost, 127.0.0.1, ::1, the bound address or an
   `--allowed-hosts` entry (port ignored, IPv6 in brackets, case and a final dot ignored); other hosts get
   403 `host_not_allowed` on every path, / and /health included, and a malformed Host header 400
   `invalid_host`. A request without a Host header (HTTP/1.0), or with an empty one, comes from no browser
   and is answered; `*` in the allowed hosts turns the check off. With a key the check is off: a rebinding
   page cannot authenticate. Refused with 403 (a well-formed request this server will not answer: the
   openai client raises PermissionDeniedError), naming the host and the flag that would admit it.
2. API key on paths under /v1/, compared in constant time (hmac.compare_digest) as bytes: the key's ASCII
   bytes against the header's bytes after "Bearer ", both stripped of surrounding whitespace.
   `normalise_api_key` refuses, when the server starts, keys no client could send: empty, only whitespace,
   or with characters other than printable ASCII (HTTP clients and browsers cannot put them in a header).
   Surrounding whitespace is not part of the key (HTTP header values cannot carry it).
   A request with more than one Authorization header is refused (400 `duplicate_header`, on every path): which
   one counts would otherwise be up to the server (Starlette takes the last).
3. Content type: a POST under /v1/ must say `Content-Type: application/json` (or `application/*+json`): a body
   of another type, or of none, is refused with 400 `unsupported_content_type` saying so, rather than parsed as
   something else and answered "must be a JSON object". It is not read as JSON regardless: a web page can send
   a form or text/plain body without the browser's CORS preflight, and this server may run without a key
   (FastAPI refuses bodies without a JSON type for the same reason).
4. Body size and time: a Content-Length over `max_body_bytes`, or a chunked body that grows past it, gets 413;
   a body that does not arrive in full within `body_timeout` seconds (a client that declares more than it
   sends) gets 408 and the connection is closed, so no client holds a connection open indefinitely.
5. Numbers: a JSON integer too long for Python's reader (over 4300 digits) is refused with 400 naming its field
   (`checks.huge_integer`), instead of the parser's "could not read the body".
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import re
import sys
from typing import TYPE_CHECKING, Iterable

from ...errors import UserError
from . import ENV_KEY
from . import protocol as P

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("", "0.0.0.0", "::")  # bind addresses that are not names a client could address
ANY_HOST = "*"
BODY_TIMEOUT_S = 30.0  # seconds a request body may take to arrive in full (1 MiB at ~35 KB/s)
KEY_HINT = "python -c 'import secrets; print(secrets.token_urlsafe(24))'"

_HOST = re.compile(r"(?:\[(?P<v6>[0-9a-z:.%_-]+)\]|(?P<name>[a-z0-9_.-]+))(?::(?P<port>[0-9]{1,5}))?")


def host_name(value: str) -> str | None:
    """The host a Host header (or an --allowed-hosts entry) names, in one spelling: lower case, no port, no
    final dot, IP addresses in their compressed form ('[0:0::1]:80' -> '::1'); None when it is not a host
    name or address with an optional port."""
    v = value.strip().lower()
    if v.count(":") >= 2 and not v.startswith("["):  # a bare IPv6 address: invalid in a Host header, unambiguous
        v = f"[{v}]"
    m = _HOST.fullmatch(v)
    if not m:
        return None
    if m["v6"] is not None:
        try:
            return ipaddress.IPv6Address(m["v6"]).compressed
        except ValueError:
            return None
    name = m["name"].removesuffix(".")
    if not name or ".." in name:
        return None
    try:
        return ipaddress.IPv4Address(name).compressed
    except ValueError:
        return name


def shown(name: str) -> str:
    """A host name as a URL writes it: IPv6 addresses in brackets."""
    return f"[{name}]" if ":" in name else name


def accepted_hosts(allowed: Iterable[str]) -> tuple[str, ...] | None:
    """The host names answered without an API key: the loopback names, then `allowed` (normalised, in order,
    without repeats); None when `allowed` holds "*" (any host). Raises UserError on an entry that is not a host
    name or address."""
    names = list(LOOPBACK_HOSTS)
    for entry in allowed:
        if entry.strip() == ANY_HOST:
            return None
        if not entry.strip():
            raise UserError("--allowed-hosts has an empty name: give host names or addresses separated by commas, "
                            "e.g. --allowed-hosts myhost.lan,192.168.1.5")
        name = host_name(entry)
        if name is None:
            raise UserError(f"--allowed-hosts: '{entry}' is not a host name: give the name or address alone, e.g. "
                            "myhost.lan or 192.168.1.5 (no scheme or path)")
        if name not in names:
            names.append(name)
    return tuple(names)


def describe_hosts(names: Iterable[str]) -> str:
    """'localhost, 127.0.0.1 or [::1]'."""
    shown_names = [shown(n) for n in names]
    return ", ".join(shown_names[:-1]) + " or " + shown_names[-1] if len(shown_names) > 1 else shown_names[0]


def normalise_api_key(key: str | None, source: str, unset_hint: str) -> str | None:
    """The key clients must send: `key` without surrounding whitespace. UserError when no client could send
    it (empty, only whitespace, or not printable ASCII). `source` names where the key came from, and
    `unset_hint` says how to serve without one."""
    if key is None:
        return None
    stripped = key.strip()
    if not stripped:
        what = "is only whitespace" if key else ("is set but empty" if source.startswith("$") else "is empty")
        give = "set it to" if source.startswith("$") else "give"
        raise UserError(f"{source} {what}: {give} the key clients must send (for example one made by `{KEY_HINT}`), "
                        f"or {unset_hint} to serve without a key.")
    bad = next(((i, c) for i, c in enumerate(stripped) if not " " <= c <= "~"), None)
    if bad:
        raise UserError(f"{source} holds a character HTTP clients cannot send in a header ({bad[1]!r} at index "
                        f"{bad[0]}): the openai library and browsers send printable ASCII only, so no request could "
                        "authenticate; use letters, digits and punctuation.")
    return stripped


async def _send_error(send: Send, status: int, message: str, code: str, param: str | None = None,
                      close: bool = False) -> None:
    body = json.dumps(P.error_body(status, message, param, code), ensure_ascii=False, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:  # the rest of the request never came: this connection cannot carry another one
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def json_content_type(value: str) -> bool:
    """application/json or application/*+json, parameters (charset) allowed."""
    kind = value.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


class Guard:
    """ASGI middleware: the Host check (without a key), the API key (paths under /v1/) and the body size,
    before FastAPI parses anything. `hosts`: the names answered without a key (`accepted_hosts`), None = any."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int,
                 hosts: tuple[str, ...] | None = LOOPBACK_HOSTS, body_timeout: float = BODY_TIMEOUT_S) -> None:
        self.app, self.max_body, self.hosts, self.body_timeout = app, max_body_bytes, hosts, body_timeout
        self.key = api_key.encode("ascii") if api_key else None
        limit = sys.get_int_max_str_digits()  # the most digits int() reads (0: no limit)
        self.long_digits = re.compile(rb"[0-9]{%d}" % (limit + 1)) if limit else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.key is None and self.hosts is not None:
            for raw in (v for k, v in scope["headers"] if k.lower() == b"host"):
                refusal = self._refuse_host(raw.decode("latin-1"), self.hosts)
                if refusal:
                    return await _send_error(send, *refusal)
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        auth_count = sum(k.lower() == b"authorization" for k, _ in scope["headers"])
        if auth_count > 1:
            return await _send_error(send, 400, f"The request has {auth_count} Authorization headers: send exactly "
                                                "one.", "duplicate_header")
        if self.key and scope["path"].startswith("/v1/"):
            scheme, _, given = headers.get("authorization", b"").partition(b" ")
            given = given.strip()
            if scheme.lower() != b"bearer" or not given:
                return await _send_error(send, 401, "Missing API key: send the header 'Authorization: Bearer KEY'.",
                                         "invalid_api_key")
            if not hmac.compare_digest(given, self.key):
                return await _send_error(send, 401, "Incorrect API key provided.", "invalid_api_key")
        length = headers.get("content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > self.max_body:
            return await self._too_big(send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        kind = headers.get("content-type", b"").decode("latin-1")
        if scope["path"].startswith("/v1/") and not json_content_type(kind):
            said = f"this request says '{kind[:100]}'" if kind.strip() else "this request has no Content-Type"
            return await _send_error(send, 400, f"Send the request body as JSON with the header 'Content-Type: "
                                                f"application/json' ({said}; curl -d sends a form type unless given "
                                                "-H 'Content-Type: application/json').", "unsupported_content_type")
        # Read the whole body (counting, for chunked uploads without a length; within the time limit), then replay
        # it; later receive() calls go to the server, so the app still sees http.disconnect.
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.body_timeout
        while True:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                return await _send_error(send, 408, f"The request body did not arrive within {self.body_timeout:g} s "
                                                    f"({size} bytes came): send the whole body at once, as its "
                                                    "Content-Length says.", "request_timeout", close=True)
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await self._too_big(send)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        if self.long_digits and self.long_digits.search(body):  # rare: only then is the body parsed here
            from .checks import huge_integer

            found = huge_integer(body)
            if found:
                where, digits = found
                return await _send_error(send, 400, f"{where or 'request body'}: the integer has {digits} digits, "
                                                    "far too large for any field of this API (send a number in the "
                                                    "field's range).", "number_too_large", param=where)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    def _refuse_host(self, host: str, hosts: tuple[str, ...]) -> tuple[int, str, str] | None:
        """(status, message, code) for a Host header that `hosts` (this server's names) does not hold; None for one
        it does."""
        if not host.strip():
            return None
        name = host_name(host)
        quoted = host[:200]
        if name is None:
            return (400, f"The Host header '{quoted}' is not a host name or address with an optional port (such as "
                         "localhost:8000).", "invalid_host")
        if name in hosts:
            return None
        return (403, f"Host '{quoted}' is not allowed: without an API key this server answers only requests addressed "
                     f"to {describe_hosts(hosts)} (a defence against DNS rebinding). To reach it by this name, "
                     f"restart it with --allowed-hosts {shown(name)}, or set an API key (--api-key or "
                     f"${ENV_KEY}).", "host_not_allowed")

    async def _too_big(self, send: Send) -> None:
        await _send_error(send, 413, f"Request body too large: the limit is {self.max_body} bytes.",
                          "request_too_large")
