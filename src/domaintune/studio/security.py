"""Who may talk to the studio: the token, the Host and Origin checks and the body size, in one ASGI middleware
that runs before routing (so no route can forget them).

- Token. Required when the studio binds anything but a loopback address (`studio_token` generates one with
  secrets.token_urlsafe when none is given; the CLI prints it in the URL it shows). It is accepted as
  `Authorization: Bearer T`, as the cookie `domaintune_studio`, or as `?token=T` on any GET (the event stream and
  download links, which a browser opens without headers). Opening a page with `?token=T` sets the cookie
  (HttpOnly, SameSite=Strict) and redirects to the same page without it, so the token leaves the address bar.
  Compared with hmac.compare_digest. Without it every route answers 401, pages and static files included.
- Host. Without a token the studio answers only requests addressed to a loopback name or the bound address
  (inference/serve/guard.py's host_name/accepted_hosts, the same rules as `serve`): a web page on a domain that
  its owner points at 127.0.0.1 (DNS rebinding) gets 403. With a token the check is off, as in `serve`: such a
  page cannot authenticate (the cookie belongs to the real origin).
- Origin. A request that carries an Origin header (browsers send it on cross-site fetches, form posts and
  event streams) must come from the page's own origin, the scheme-less host:port equal to the Host header;
  anything else, "null" included, is 403. This is the CSRF defence for the POST actions: a foreign page can make
  a browser send a form to 127.0.0.1 without a preflight.
- Size. A Content-Length over the limit is 413 before the body is read: `upload_limit` on upload routes, 1 MiB on
  the others. Uploads without a length are counted as they stream (`project.save_upload` stops at the limit and
  removes the partial file).
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import secrets
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from ..errors import UserError
from ..inference.serve.guard import LOOPBACK_HOSTS, WILDCARD_BINDS, accepted_hosts, host_name, normalise_api_key

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE = "domaintune_studio"
DEFAULT_UPLOAD_LIMIT = 256 << 20  # bytes of one uploaded file (a flag of the CLI)
JSON_BODY_LIMIT = 1 << 20  # bytes of a request body on the routes that take no upload
UPLOAD_PREFIXES = ("/api/upload",)


def is_loopback(host: str) -> bool:
    """Whether binding `host` reaches this machine only: localhost or a loopback address (127.0.0.0/8, ::1)."""
    name = host_name(host)
    if name is None or name in WILDCARD_BINDS:
        return False
    if name in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def studio_token(host: str, token: str | None) -> str | None:
    """The token requests must carry: `token` (stripped; UserError when no browser could send it), else a new
    random one when `host` is not a loopback address, else None (a local studio needs none)."""
    token = normalise_api_key(token, "--token", "leave --token out")
    if token is None and not is_loopback(host):
        token = secrets.token_urlsafe(24)
    return token


def studio_hosts(host: str) -> tuple[str, ...] | None:
    """The Host names answered without a token: the loopback names and the bound address (None: any)."""
    name = host_name(host)
    if name is None:
        raise UserError(f"--host '{host}' is not a host name or address: give e.g. 127.0.0.1 or 0.0.0.0")
    return accepted_hosts([] if name in WILDCARD_BINDS else [name])


def _origin_host(origin: str) -> str | None:
    """'http://127.0.0.1:7860' -> '127.0.0.1:7860' (lower case, default ports dropped); None when unreadable."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    name = host_name(parts.hostname)
    if name is None:
        return None
    shown = f"[{name}]" if ":" in name else name
    default = 80 if parts.scheme == "http" else 443
    return shown if port in (None, default) else f"{shown}:{port}"


def _host_header(value: str) -> str | None:
    """The Host header in the spelling `_origin_host` gives (lower case, no default port 80)."""
    v = value.strip().lower()
    name, port = host_name(v), None
    if name is None:
        return None
    tail = v.rsplit("]", 1)[-1] if v.startswith("[") else v
    if ":" in tail:
        port = tail.rsplit(":", 1)[1]
    shown = f"[{name}]" if ":" in name else name
    return shown if port in (None, "80", "443") else f"{shown}:{port}"


async def send_error(send: Send, status: int, message: str, code: str,
                     extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """A JSON error `{"error": {"message", "code"}}`, the shape every studio route answers with."""
    body = json.dumps({"error": {"message": message, "code": code}}, ensure_ascii=False).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store"), *(extra_headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class StudioGuard:
    """ASGI middleware: Host (without a token), Origin, token and body size, before any route runs."""

    def __init__(self, app: ASGIApp, token: str | None, hosts: tuple[str, ...] | None,
                 upload_limit: int = DEFAULT_UPLOAD_LIMIT) -> None:
        self.app, self.hosts, self.upload_limit = app, hosts, upload_limit
        self.token = token.encode("ascii") if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        raw = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]
        headers = dict(raw)
        if sum(k == "authorization" for k, _ in raw) > 1:
            return await send_error(send, 400, "The request has more than one Authorization header: send one.",
                                    "duplicate_header")
        host = headers.get("host", "")
        if self.token is None and self.hosts is not None and host.strip():
            name = host_name(host)
            if name is None or name not in self.hosts:
                return await send_error(send, 403, f"Host '{host[:200]}' is not allowed: without a token the studio "
                                                   "answers only requests addressed to this machine (a defence "
                                                   "against DNS rebinding); open it as http://127.0.0.1:PORT, or "
                                                   "restart it with --token.", "host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and (not host.strip() or _origin_host(origin) != _host_header(host)):
            return await send_error(send, 403, f"Origin '{origin[:200]}' is not this studio's page: requests from "
                                               "other sites are refused.", "origin_not_allowed")
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
        if self.token is not None:
            if not self._authorised(headers, query if scope["method"] in ("GET", "HEAD") else {}):
                return await send_error(send, 401, "This studio needs its token: open the URL it printed at start "
                                                   "(…/?token=T), or send 'Authorization: Bearer T'.", "unauthorized")
            if "token" in query and scope["method"] == "GET" and not scope["path"].startswith("/api/"):
                return await self._set_cookie(scope, send, query)
        upload = scope["path"].startswith(UPLOAD_PREFIXES)
        limit = self.upload_limit if upload else JSON_BODY_LIMIT
        length = headers.get("content-length", "")
        too_large = (f"Request body too large: the limit is {limit} bytes"
                     + (" (studio --max-upload-mib)" if upload else "") + ".")
        if length.isdigit() and int(length) > limit:
            return await send_error(send, 413, too_large, "too_large", [(b"connection", b"close")])
        if upload or scope["method"] in ("GET", "HEAD"):  # an upload is counted as it is written (save_upload)
            return await self.app(scope, receive, send)
        # A JSON body without a Content-Length (chunked) is read here, counting, and replayed to the app: one
        # that grows past the limit is refused before anything parses it.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client left
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await send_error(send, 413, too_large, "too_large", [(b"connection", b"close")])
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls go to the server: the app still sees http.disconnect

        return await self.app(scope, replay, send)

    def _authorised(self, headers: dict[str, str], query: dict[str, str]) -> bool:
        assert self.token is not None
        given: list[str] = []
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            given.append(value.strip())
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                given.append(unquote(value))
        if "token" in query:
            given.append(query["token"])
        # every candidate is compared (no early exit on the first match), in constant time each
        ok = False
        for g in given:
            ok |= hmac.compare_digest(g.encode("utf-8", "replace"), self.token)
        return ok

    async def _set_cookie(self, scope: Scope, send: Send, query: dict[str, str]) -> None:
        """303 to the same page without ?token=, setting the cookie that authenticates the page's own requests."""
        assert self.token is not None
        rest = urlencode([(k, v) for k, v in query.items() if k != "token"])
        # The path as the client sent it (percent-encoded, so any character fits a header), with exactly one
        # leading slash: "//host/..." would be another site's address.
        raw = scope.get("raw_path") or quote(scope["path"]).encode("ascii")
        location = "/" + raw.decode("latin-1").lstrip("/") + (f"?{rest}" if rest else "")
        cookie = f"{COOKIE}={quote(self.token.decode(), safe='')}; Path=/; HttpOnly; SameSite=Strict"
        await send({"type": "http.response.start", "status": 303,
                    "headers": [(b"location", location.encode("latin-1")), (b"set-cookie", cookie.encode()),
                                (b"content-length", b"0"), (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": b""})
