"""Who may use the server: the API key (checked when the server starts, compared in constant time) and, when
no key is set, the Host check against DNS rebinding.

Real uvicorn servers on 127.0.0.1. Most need no model: an app without an engine answers GET /health with
503 {"status": "loading"} (and /v1/* with 503 model_loading), which shows a request got past the guard.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from served_tiny_model import free_port
from served_tiny_model import running_app as running

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from domaintune import cli  # noqa: E402
from domaintune.errors import UserError  # noqa: E402
from domaintune.inference.serve import guard  # noqa: E402
from domaintune.inference.serve.app import create_app  # noqa: E402
from domaintune.inference.serve.server import resolve_api_key, run_serve, startup_notes  # noqa: E402

LOADING = (503, {"status": "loading"})
KEY_HINT = "python -c 'import secrets; print(secrets.token_urlsafe(24))'"


def err(message, param=None, code=None, type_="invalid_request_error"):
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def health(url, host=None, **headers):
    r = httpx.get(url + "/health", headers={**({"Host": host} if host is not None else {}), **headers}, timeout=10)
    return r.status_code, r.json()


# ---------------------------------------------------------------- the API key

@pytest.mark.parametrize("given, env, message", [
    ("", None, "--api-key is empty: give the key clients must send (for example one made by "
               f"`{KEY_HINT}`), or leave --api-key out to serve without a key."),
    ("   ", None, "--api-key is only whitespace: give the key clients must send (for example one made by "
                  f"`{KEY_HINT}`), or leave --api-key out to serve without a key."),
    (None, "", "$DOMAINTUNE_API_KEY is set but empty: set it to the key clients must send (for example one made by "
               f"`{KEY_HINT}`), or unset it (`unset DOMAINTUNE_API_KEY`) to serve without a key."),
    (None, " \t\n", "$DOMAINTUNE_API_KEY is only whitespace: set it to the key clients must send (for example one "
                    f"made by `{KEY_HINT}`), or unset it (`unset DOMAINTUNE_API_KEY`) to serve without a key."),
    ("", "env-key", "--api-key is empty: give the key clients must send (for example one made by "
                    f"`{KEY_HINT}`), or leave --api-key out to serve without a key."),
    ("clé", None, "--api-key holds a character HTTP clients cannot send in a header ('é' at index 2): the openai "
                  "library and browsers send printable ASCII only, so no request could authenticate; use letters, "
                  "digits and punctuation."),
    ("a\tb", None, "--api-key holds a character HTTP clients cannot send in a header ('\\t' at index 1): the openai "
                   "library and browsers send printable ASCII only, so no request could authenticate; use letters, "
                   "digits and punctuation."),
])
def test_keys_no_client_could_send_are_refused_at_start(tmp_path, monkeypatch, capsys, given, env, message):
    """Regression: `--api-key ''` (or an empty $DOMAINTUNE_API_KEY) silently served without a key, and a key of
    spaces locked every client out (HTTP strips the spaces of a header value)."""
    if env is None:
        monkeypatch.delenv("DOMAINTUNE_API_KEY", raising=False)
    else:
        monkeypatch.setenv("DOMAINTUNE_API_KEY", env)
    with pytest.raises(UserError) as e:
        run_serve(tmp_path, port=free_port(), api_key=given, log_level="warning")
    assert str(e.value) == message
    argv = ["serve", str(tmp_path), "--port", str(free_port())] + ([] if given is None else ["--api-key", given])
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_surrounding_whitespace_is_not_part_of_the_key(capsys):
    """HTTP header values cannot carry leading or trailing whitespace: the key is used without it, with a note."""
    assert resolve_api_key(" k3y \n", {}) == "k3y"
    assert capsys.readouterr().err == ("note: the API key from --api-key has leading or trailing whitespace, which "
                                       "HTTP cannot carry in a header; it is used without that whitespace.\n")
    assert resolve_api_key(None, {"DOMAINTUNE_API_KEY": "k 3 y\r\n"}) == "k 3 y"  # inner spaces are kept
    assert "from $DOMAINTUNE_API_KEY has leading or trailing" in capsys.readouterr().err
    assert resolve_api_key(None, {}) is None
    assert resolve_api_key("k3y", {"DOMAINTUNE_API_KEY": "other"}) == "k3y"  # the flag wins
    assert capsys.readouterr().err == ""
    with pytest.raises(UserError, match=r"^api_key is empty"):
        create_app(None, api_key="")  # the app refuses it too: no silent "no key"

    with running(create_app(None, api_key=" k3y\n")) as url:
        r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k3y"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"  # authenticated
        r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k3y2"})
        assert r.status_code == 401 and r.json() == err("Incorrect API key provided.", code="invalid_api_key")


def test_keys_are_compared_in_constant_time_on_bytes(monkeypatch):
    calls, original = [], guard.hmac.compare_digest

    def compare(a, b):
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(guard.hmac, "compare_digest", compare)
    with running(create_app(None, api_key="s3cret key")) as url:
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer s3cret key"}).status_code == 503
        assert httpx.get(url + "/v1/models", headers={"Authorization": "bearer  s3cret"}).status_code == 401
        # a non-ASCII header value is compared as the bytes it is, and does not match
        r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer s3cret k\u00e9y".encode()})
        assert r.status_code == 401
    assert calls == [(b"s3cret key", b"s3cret key"), (b"s3cret", b"s3cret key"),
                     (b"s3cret k\xc3\xa9y", b"s3cret key")]


# ---------------------------------------------------------------- the Host check (no key)

def refused(host: str, name: str, names: str = "localhost, 127.0.0.1 or [::1]") -> dict:
    return err(f"Host '{host}' is not allowed: without an API key this server answers only requests addressed to "
               f"{names} (a defence against DNS rebinding). To reach it by this name, restart it with --allowed-hosts "
               f"{name}, or set an API key (--api-key or $DOMAINTUNE_API_KEY).", code="host_not_allowed")


@pytest.fixture(scope="module")
def open_server():
    with running(create_app(None)) as url:
        yield url


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LocalHost", "localhost.", "[::1]:{port}",
                                  "[::1]", "::1", "127.0.0.1", "[0:0:0:0:0:0:0:1]:{port}"])
def test_loopback_hosts_are_answered(open_server, host):
    port = open_server.rsplit(":", 1)[1]
    assert health(open_server, host.format(port=port)) == LOADING


@pytest.mark.parametrize("host, name", [("evil.example", "evil.example"), ("evil.example:{port}", "evil.example"),
                                        ("localhost.evil.example", "localhost.evil.example"),
                                        ("127.0.0.1.nip.io:{port}", "127.0.0.1.nip.io"), ("[::2]:{port}", "[::2]"),
                                        ("0.0.0.0:{port}", "0.0.0.0"), ("192.168.1.5", "192.168.1.5")])
@pytest.mark.parametrize("method, path", [("GET", "/"), ("GET", "/health"), ("GET", "/v1/models"),
                                          ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                                          ("GET", "/missing")])
def test_other_hosts_are_refused_on_every_path(open_server, host, name, method, path):
    """Regression: without a key, a web page on a domain that resolves to 127.0.0.1 (DNS rebinding) could use
    the model and read the answers."""
    host = host.format(port=open_server.rsplit(":", 1)[1])
    r = httpx.request(method, open_server + path, headers={"Host": host}, json={"model": "m", "prompt": "x"})
    assert (r.status_code, r.headers["content-type"]) == (403, "application/json")
    assert r.json() == refused(host, name)


@pytest.mark.parametrize("host", ["localhost:8000@evil.example", "localhost:port", "[::1", "[nonsense]:80",
                                  "exa mple.com", "caf\u00e9.example"])
def test_malformed_hosts_are_400(open_server, host):
    r = httpx.get(open_server + "/health", headers={"Host": host.encode("latin-1")})
    assert (r.status_code, r.headers["content-type"]) == (400, "application/json")
    assert r.json() == err(f"The Host header '{host}' is not a host name or address with an optional port (such as "
                           "localhost:8000).", code="invalid_host")


def test_the_openai_client_reports_the_refusal(open_server):
    c = openai.OpenAI(base_url=open_server + "/v1", api_key="unused", max_retries=0,
                      default_headers={"Host": "rebind.example"})
    with pytest.raises(openai.PermissionDeniedError) as e:
        c.models.list()
    assert e.value.status_code == 403 and "restart it with --allowed-hosts rebind.example" in e.value.message


def test_a_request_without_a_host_header_is_answered(open_server):
    """Browsers always send Host; a client that sends none (HTTP/1.0) is no rebinding page."""
    port = int(open_server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 503") and data.endswith(b'{"status":"loading"}')


def test_allowed_hosts_extend_the_loopback_names():
    app = create_app(None, allowed_hosts=["MyHost.LAN", "[fe80::1]:8000", "10.0.0.7", "::2"])
    names = "localhost, 127.0.0.1, [::1], myhost.lan, [fe80::1], 10.0.0.7 or [::2]"
    with running(app) as url:
        for host in ["myhost.lan:8000", "MYHOST.lan.", "[fe80::1]", "10.0.0.7:1234", "[::2]:80", "localhost"]:
            assert health(url, host) == LOADING, host
        for host in ["other.lan", "myhost.lan.evil.example", "10.0.0.8"]:
            r = httpx.get(url + "/health", headers={"Host": host})
            assert (r.status_code, r.json()) == (403, refused(host, host, names))


def test_a_star_turns_the_host_check_off():
    with running(create_app(None, allowed_hosts=["*"])) as url:
        assert health(url, "anything.example:1") == LOADING


def test_with_a_key_hosts_are_not_checked():
    """A rebinding page cannot know the key: the key is the protection, and /health stays open."""
    with running(create_app(None, api_key="k")) as url:
        assert health(url, "evil.example") == LOADING
        r = httpx.get(url + "/v1/models", headers={"Host": "evil.example"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.get(url + "/v1/models", headers={"Host": "evil.example", "Authorization": "Bearer k"})
        assert r.status_code == 503


@pytest.mark.parametrize("entry, message", [
    ("", "--allowed-hosts has an empty name: give host names or addresses separated by commas, e.g. "
         "--allowed-hosts myhost.lan,192.168.1.5"),
    ("http://myhost.lan/", "--allowed-hosts: 'http://myhost.lan/' is not a host name: give the name or address "
                           "alone, e.g. myhost.lan or 192.168.1.5 (no scheme or path)"),
    ("my host", "--allowed-hosts: 'my host' is not a host name: give the name or address alone, e.g. myhost.lan or "
                "192.168.1.5 (no scheme or path)"),
])
def test_bad_allowed_hosts_are_refused(entry, message):
    with pytest.raises(UserError) as e:
        create_app(None, allowed_hosts=["ok.lan", entry])
    assert str(e.value) == message


def test_startup_notes_say_which_hosts_are_answered():
    assert startup_notes("127.0.0.1", 8000, None, []) == []
    assert startup_notes("0.0.0.0", 8000, "k", []) == []
    assert startup_notes("0.0.0.0", 8000, None, ["myhost.lan"]) == [
        "warning: serving on 0.0.0.0 without an API key: anyone who can reach this port can use the model (set "
        "--api-key or $DOMAINTUNE_API_KEY)",
        "note: without an API key only requests addressed to localhost, 127.0.0.1, [::1] or myhost.lan are answered "
        "(a defence against DNS rebinding); to use http://NAME:8000 from other machines, add NAME to "
        "--allowed-hosts (comma-separated), or set an API key, which lifts the check"]
    assert startup_notes("::", 9000, None, [])[1].startswith(
        "note: without an API key only requests addressed to localhost, 127.0.0.1 or [::1] are answered")
    assert startup_notes("192.168.1.5", 8000, None, [])[1].startswith(
        "note: without an API key only requests addressed to localhost, 127.0.0.1, [::1] or 192.168.1.5 are answered")
    assert startup_notes("127.0.0.1", 8000, None, ["*"]) == [
        "warning: --allowed-hosts * turns the Host check off: without an API key, any web page you visit can reach "
        "this server through DNS rebinding (set --api-key or $DOMAINTUNE_API_KEY)"]


def test_allowed_hosts_option_states_its_default_and_takes_lists(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: no wrapping at hyphens
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("--allowed-hosts HOSTS without an API key, also answer requests addressed to these host names or "
            "addresses (comma-separated, repeatable; '*' = any host, which turns the DNS-rebinding check off) "
            "(default: none: only the bound address, localhost, 127.0.0.1 and [::1])") in text
    args = cli.build_parser().parse_args(["serve", "RUN", "--allowed-hosts", "a.lan,b.lan", "--allowed-hosts", "c"])
    assert args.allowed_hosts == ["a.lan,b.lan", "c"]


# ---------------------------------------------------------------- the CLI, end to end

def test_cli_serve_checks_hosts_against_the_bound_address_and_allowed_hosts(tiny_model_dir):
    """`serve --host 127.0.0.2 --allowed-hosts ...` without a key: the bound address and the listed names are
    answered (before the model has even loaded), others refused."""
    port = free_port("127.0.0.2")
    env = {k: v for k, v in os.environ.items() if k != "DOMAINTUNE_API_KEY"}
    proc = subprocess.Popen([sys.executable, "-m", "domaintune", "serve", str(tiny_model_dir("llama")), "--template",
                             "domain_zh", "--host", "127.0.0.2", "--port", str(port), "--allowed-hosts", "foo.test",
                             "--allowed-hosts", "bar.test,[fe80::1]", "--log-level", "warning"],
                            env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=Path(__file__).resolve().parents[2])
    url = f"http://127.0.0.2:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "the server never answered"
            with contextlib.suppress(httpx.TransportError):
                httpx.get(url + "/health", timeout=2)
                break
            time.sleep(0.1)
        for host in [f"127.0.0.2:{port}", "localhost", "foo.test", "bar.test:8000", "[fe80::1]"]:
            assert health(url, host)[0] in (200, 503), host
        r = httpx.get(url + "/health", headers={"Host": "evil.example"})
        assert (r.status_code, r.json()) == (
            403, refused("evil.example", "evil.example",
                         "localhost, 127.0.0.1, [::1], 127.0.0.2, foo.test, bar.test or [fe80::1]"))
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


# ---------------------------------------------------------------- hardening: duplicate headers, slow bodies, the page

def test_two_authorization_headers_are_refused():
    """Regression: with two Authorization headers the last one won (a proxy adding its own could be bypassed or
    shadowed). Either order is a 400, on every path."""
    with running(create_app(None, api_key="s3cret")) as url:
        for pair in (["Bearer wrong", "Bearer s3cret"], ["Bearer s3cret", "Bearer wrong"]):
            for path in ("/v1/models", "/health"):
                r = httpx.get(url + path, headers=[("Authorization", v) for v in pair], timeout=10)
                assert (r.status_code, r.json()) == (400, err("The request has 2 Authorization headers: send exactly "
                                                              "one.", code="duplicate_header"))
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 503  # one: ok


def test_a_body_shorter_than_its_content_length_gets_408_and_the_connection_closes():
    """Regression: a client that declared a longer body than it sent held the connection (and the request) open
    indefinitely. After the body timeout the server answers 408 and closes the connection."""
    with running(create_app(None, body_timeout=0.5)) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            t0 = time.monotonic()
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"model\": ")
            data = b""
            while chunk := s.recv(4096):  # ends when the server closes the connection
                data += chunk
            waited = time.monotonic() - t0
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
        assert 0.4 < waited < 8
        assert json.loads(body) == err("The request body did not arrive within 0.5 s (10 bytes came): send the whole "
                                       "body at once, as its Content-Length says.", code="request_timeout")
        assert health(url) == LOADING  # the server goes on


def test_the_web_page_forbids_framing_sniffing_and_foreign_code():
    """Regression: the page was sent without X-Frame-Options or a Content-Security-Policy (clickjacking, injected
    scripts). Its CSP allows exactly its own inline script and style, by hash (test_web.py checks the page runs)."""
    import base64
    import hashlib
    import re

    with running(create_app(None)) as url:
        r = httpx.get(url + "/", timeout=10)
    assert r.status_code == 200
    assert (r.headers["x-frame-options"], r.headers["x-content-type-options"]) == ("DENY", "nosniff")
    policy = dict(p.strip().split(" ", 1) for p in r.headers["content-security-policy"].split(";"))
    assert (policy["default-src"], policy["frame-ancestors"], policy["connect-src"]) == ("'none'", "'none'", "'self'")
    for tag in ("script", "style"):
        [inline] = re.findall(rf"<{tag}>(.*?)</{tag}>", r.text, flags=re.S)
        digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
        assert policy[f"{tag}-src"] == f"'sha256-{digest}'"
    assert not re.search(r"<[^>]+\s(style|on[a-z]+)=", r.text)  # inline attributes the CSP would block
