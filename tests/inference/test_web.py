"""The web chat page (GET /) in headless Chromium, driven over the Chrome DevTools protocol.

Needs Debian's `chromium` (/usr/bin/chromium) and the `websockets` package; skips with the reason
when either is missing, except under CI (CI=true), where .ci/run installs Chromium and a missing one fails."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from cdp import browser, require_chromium
from domaintune.inference.engine import Engine
from domaintune.inference.params import GenerationParams
from domaintune.inference.serve.app import create_app

require_chromium()
uvicorn = pytest.importorskip("uvicorn")

KEY = "web-key"


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir):
    """The conftest's micro LLaMA: untied embeddings, so different prompts get different greedy answers."""
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def engine(llama_dir):
    eng = Engine.from_run(llama_dir, template="domain_zh")
    eng.model_id = "tiny"
    return eng


@pytest.fixture(scope="module")
def server(engine):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, api_key=KEY), host="127.0.0.1", port=port,
                                        log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


def test_page_streams_a_reply_after_the_key_is_entered(server, engine, tmp_path):
    question = "孩子不爱吃饭怎么办"
    ids = engine.encode_messages([{"role": "user", "content": question}])
    want = engine.generate([ids], GenerationParams(max_new_tokens=16))[0].text

    with browser(server + "/", tmp_path) as page:
        # the page runs under its Content-Security-Policy: record any violation from the first byte, then reload
        page.call("Page.enable")
        page.call("Page.addScriptToEvaluateOnNewDocument", source=(
            "window.__csp = []; document.addEventListener('securitypolicyviolation',"
            " (e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"))
        page.call("Page.reload")
        page.wait_for("window.__csp !== undefined && document.readyState === 'complete'"
                      " && document.getElementById('send') !== null")
        page.wait_for("!document.getElementById('send').disabled")  # /health said ready: the inline script runs
        styles = page.js("[getComputedStyle(document.body).display,"
                         " getComputedStyle(document.getElementById('temperature')).width !=="
                         " getComputedStyle(document.getElementById('maxtokens')).width]")
        assert styles == ["flex", True]  # the inline stylesheet applies (its own widths, from it, not attributes)
        assert "API key required" in page.js("document.getElementById('status').textContent")
        send = ("(() => { const i = document.getElementById('input'); i.value = %s;"
                " document.getElementById('form').requestSubmit(); return true; })()")
        page.js("document.getElementById('temperature').value = '0'; document.getElementById('maxtokens').value = '16'")

        # without the key: 401, shown as a notice asking for it
        page.js(send % json.dumps(question))
        notice = page.wait_for("(() => { const n = document.querySelector('.msg.notice');"
                               " return n && n.textContent; })()")
        assert "needs an API key" in notice

        # enter the key, ask again: the answer streams into the assistant bubble
        page.js(f"const k = document.getElementById('apikey'); k.value = {json.dumps(KEY)};"
                " k.dispatchEvent(new Event('change'));")
        page.js("window.__lengths = []; new MutationObserver(() => {"
                " const b = document.querySelector('.msg.assistant');"
                " if (b) window.__lengths.push(b.textContent.length); })"
                ".observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true})")
        page.js(send % json.dumps(question))
        page.wait_for("(() => { const b = document.querySelector('.msg.assistant');"
                      " return b && b.dataset.done === '1'; })()")
        bubble = page.js("document.querySelector('.msg.assistant').textContent")
        finish = page.js("document.querySelector('.msg.assistant').dataset.finish")
        lengths = page.js("window.__lengths")
        violations = page.js("window.__csp")
        # the key is kept for this tab only (sessionStorage), never in localStorage
        assert page.js("sessionStorage.getItem('domaintune.apikey')") == KEY
        assert page.js("localStorage.getItem('domaintune.apikey')") is None

    assert violations == []  # the CSP blocked nothing the page uses
    assert bubble == want
    assert finish == "length"
    grown = sorted(set(x for x in lengths if 0 < x < len(want)))
    assert len(grown) >= 3, lengths  # the text grew in steps while streaming, not all at once
