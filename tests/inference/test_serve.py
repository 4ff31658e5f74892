"""The OpenAI-compatible server: a real uvicorn server on 127.0.0.1 with a tiny LLaMA, driven by the
official openai client and raw httpx. One server is shared by the module (see `server`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from chat_templates import STRICT_INST
from served_tiny_model import free_port
from served_tiny_model import running_app as running

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from domaintune.data.templates import Template  # noqa: E402
from domaintune.inference.engine import Engine  # noqa: E402
from domaintune.inference.params import PRESETS, GenerationParams  # noqa: E402
from domaintune.inference.serve.app import create_app  # noqa: E402
from domaintune.inference.stops import StopScanner  # noqa: E402

KEY = "test-key-123"
MODEL = "tiny"
MAX_BODY = 64 * 1024
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir):
    """The conftest's micro LLaMA: untied embeddings, so different prompts get different greedy answers."""
    return tiny_model_dir("llama")


class RecordingEngine(Engine):
    """The real engine, remembering each stream's state (to observe when a generation stopped)."""

    states: list

    def stream(self, prompt, params, stop_event=None, state=None):
        self.states.append(state)
        return super().stream(prompt, params, stop_event=stop_event, state=state)


@pytest.fixture(scope="module")
def engine(llama_dir):
    base = Engine.from_run(llama_dir, template="domain_zh")
    eng = RecordingEngine(base.model, base.tokenizer, base.template, MODEL)
    eng.states = []
    return eng


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(engine, api_key=KEY, max_body_bytes=MAX_BODY, defaults=PRESETS["serve"])
    with running(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def solo(engine, messages, max_new):
    """The engine's own greedy answer for one conversation, generated alone."""
    ids = engine.encode_messages(messages)
    return ids, engine.generate([ids], GenerationParams(max_new_tokens=max_new), batch_size=1)[0]


def sse_events(resp) -> list[str]:
    """The data payloads of a raw SSE response, in order (and a check of the framing)."""
    body = resp.read().decode()
    assert body.endswith("\n\n")
    events = body[:-2].split("\n\n")
    assert all(e.startswith("data: ") for e in events), body
    return [e[len("data: "):] for e in events]


MSGS = [{"role": "user", "content": "孩子不爱吃饭怎么办"}]


# ---------------------------------------------------------------- answers

def test_chat_streamed_equals_non_streamed_and_engine(client, engine):
    ids, want = solo(engine, MSGS, 12)
    assert want.finish_reason == "length"  # the random model does not stop within 12 tokens
    r = client.chat.completions.create(model=MODEL, messages=MSGS, temperature=0, max_tokens=12)
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12, len(ids) + 12)

    chunks = list(client.chat.completions.create(model=MODEL, messages=MSGS, temperature=0, max_tokens=12, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(chunks) >= 4  # role, several deltas, finish: tokens arrive one by one
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert len({c.id for c in chunks}) == 1


def test_raw_stream_framing_usage_and_done(server, engine):
    ids, want = solo(engine, MSGS, 5)
    body = {"model": MODEL, "messages": MSGS, "temperature": 0, "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 5, "total_tokens": len(ids) + 5}
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-2]["choices"][0]["delta"] == {}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1]) == want.text


def test_finish_reason_stop_at_a_stop_token(engine, llama_dir):
    """A template stop token ends the answer early: finish_reason 'stop', streamed and not."""
    ids, long = solo(engine, MSGS, 12)
    stop_tok = engine.tokenizer.convert_ids_to_tokens(long.token_ids[4])
    k = long.token_ids.index(long.token_ids[4])
    tpl = Template.from_dict({**engine.template.to_dict(), "stop": [stop_tok]})
    eng = Engine(engine.model, engine.tokenizer, tpl, MODEL)
    with running(create_app(eng)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = c.chat.completions.create(model=MODEL, messages=MSGS, temperature=0, max_tokens=12)
        chunks = list(c.chat.completions.create(model=MODEL, messages=MSGS, temperature=0, max_tokens=12, stream=True))
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == engine.decode(long.token_ids[:k])
    assert r.usage.completion_tokens == k
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content


def test_stop_strings_cut_the_text(client, engine):
    _, want = solo(engine, MSGS, 12)
    stop = want.text[6:8]
    cut = want.text.index(stop)
    r = client.chat.completions.create(model=MODEL, messages=MSGS, temperature=0, max_tokens=12, stop=[stop])
    assert r.choices[0].message.content == want.text[:cut]
    assert r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model=MODEL, messages=MSGS, temperature=0, max_tokens=12,
                                                 stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_scanner_holds_back_partial_matches():
    s = StopScanner(["END", "##"])
    assert [s.feed(d) for d in ["ab", "cE", "N", "x#", "y", "E", "ND tail"]] == ["ab", "c", "", "ENx", "#y", "", ""]
    assert s.hit and s.feed("more") == "" and s.flush() == ""
    s = StopScanner(["END"])
    assert (s.feed("aEN"), s.flush(), s.hit) == ("a", "EN", False)  # a partial match at the end is text after all
    assert StopScanner([]).feed("x") == "x"




def test_a_conversation_the_chat_template_refuses_is_400(llama_dir, tmp_path):
    """Regression: a model whose own chat_template raises (here on a system message) answered a plain-text 500."""
    import shutil

    from transformers import AutoTokenizer

    strict = Path(shutil.copytree(llama_dir, tmp_path / "strict"))
    tok = AutoTokenizer.from_pretrained(strict)
    tok.chat_template = STRICT_INST
    tok.save_pretrained(strict)
    eng = Engine.from_run(strict, template="tokenizer", device="cpu")
    eng.model_id = MODEL
    with running(create_app(eng)) as url:
        body = {"model": MODEL, "max_tokens": 3, "temperature": 0,
                "messages": [{"role": "system", "content": "你是老师"}, *MSGS]}
        for stream in (False, True):
            r = httpx.post(url + "/v1/chat/completions", json={**body, "stream": stream}, timeout=60)
            assert r.status_code == 400 and r.headers["content-type"] == "application/json"
            error = r.json()["error"]
            assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "messages", None)
            assert "System role not supported" in error["message"]
        r = httpx.post(url + "/v1/chat/completions", json={**body, "messages": MSGS}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3  # the model itself works


def test_text_completions(client, engine):
    prompt = "用户:睡前故事\n\n助手:"
    ids = engine.tokenizer(prompt)["input_ids"]
    want = engine.generate([ids], GenerationParams(max_new_tokens=7))[0]
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=7)
    assert r.object == "text_completion"
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 7)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=7, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_and_health(server):
    r = httpx.get(server + "/v1/models", headers=AUTH)
    assert r.status_code == 200
    assert [(m["id"], m["object"], m["owned_by"]) for m in r.json()["data"]] == [(MODEL, "model", "domaintune")]
    assert httpx.get(server + "/health").json() == {"status": "ok", "model": MODEL, "auth": True}


# ---------------------------------------------------------------- refusals

def err(message, param=None, code=None, type_="invalid_request_error"):
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def test_missing_or_wrong_key_is_401(server):
    body = {"model": MODEL, "messages": MSGS}
    r = httpx.post(server + "/v1/chat/completions", json=body)
    assert r.status_code == 401
    assert r.json() == err("Missing API key: send the header 'Authorization: Bearer KEY'.", code="invalid_api_key")
    r = httpx.post(server + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json() == err("Incorrect API key provided.", code="invalid_api_key")
    assert httpx.get(server + "/v1/models").status_code == 401
    assert httpx.get(server + "/health").status_code == 200  # open
    page = httpx.get(server + "/")
    assert page.status_code == 200 and 'id="apikey"' in page.text  # open, with a key field
    bad = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=1)


@pytest.mark.parametrize("body, status, expected", [
    ({"model": MODEL, "messages": []}, 400, err("'messages' must contain at least one message.", "messages")),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     err("messages.0.role: Input should be 'system', 'user' or 'assistant'", "messages.0.role")),
    ({"model": MODEL, "messages": MSGS, "max_tokens": 0}, 400,
     err("max_tokens must be at least 1, got 0.", "max_tokens")),
    ({"model": MODEL, "messages": MSGS, "max_tokens": -5}, 400,
     err("max_tokens must be at least 1, got -5.", "max_tokens")),
    ({"model": MODEL, "messages": [{"role": "user", "content": "好" * 3000}]}, 400, lambda n: err(
        f"This model's context is 2048 tokens; the prompt has {n} tokens, which leaves no room for an answer.",
        "messages", "context_length_exceeded")),
    ({"model": "gpt-4o", "messages": MSGS}, 404,
     err("The model 'gpt-4o' does not exist: this server serves 'tiny' (see GET /v1/models).", "model",
         "model_not_found")),
    ({"model": MODEL, "messages": MSGS, "max_completion_tokens": 0}, 400,
     err("max_tokens must be at least 1, got 0.", "max_tokens")),
    ({"model": MODEL, "messages": MSGS, "n": 2}, 400, err("Only n=1 is supported.", "n")),
    ({"model": MODEL, "messages": MSGS + [{"role": "assistant", "content": "a"}]}, 400,
     err("messages[1]: the last message must have role 'user'.", "messages.1.role")),
    ({"model": MODEL, "messages": MSGS + [{"role": "system", "content": "s"}, *MSGS]}, 400,
     err("messages[1]: a system message may only come first.", "messages.1.role")),
    # roles: user and assistant alternate after an optional system message (regression: a template that cannot
    # render such a conversation answered 500)
    ({"model": MODEL, "messages": MSGS + MSGS}, 400, err(
        "messages[1]: expected role 'assistant', got 'user': after an optional system message, user and assistant "
        "messages must alternate, starting with user.", "messages.1.role")),
    ({"model": MODEL, "messages": [{"role": "assistant", "content": "a"}, *MSGS]}, 400, err(
        "messages[0]: expected role 'user', got 'assistant': after an optional system message, user and assistant "
        "messages must alternate, starting with user.", "messages.0.role")),
    ({"model": MODEL, "messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}, *MSGS]},
     400, err("messages[1]: expected role 'user', got 'assistant': after an optional system message, user and "
              "assistant messages must alternate, starting with user.", "messages.1.role")),
    ({"model": MODEL, "messages": [{"role": "system", "content": "s"}, {"role": "system", "content": "t"}, *MSGS]},
     400, err("messages[1]: a system message may only come first.", "messages.1.role")),
    ({"model": MODEL, "messages": MSGS, "temperature": "hot"}, 400,
     err("temperature: Input should be a valid number, unable to parse string as a number", "temperature")),
    ({"messages": MSGS}, 400, err("model: Field required", "model")),
    # a union (content: text or parts; stop: a string or a list) names the place the value was meant for, not
    # pydantic's member label (regression: "messages.0.content.str: Input should be a valid string")
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     err("messages.0.content.0.type: Input should be 'text'", "messages.0.content.0.type")),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400,
     err("messages.0.content: Input should be a valid string; or Input should be a valid list", "messages.0.content")),
    ({"model": MODEL, "messages": MSGS, "stop": ["ok", 1]}, 400,
     err("stop.1: Input should be a valid string", "stop.1")),
])
def test_invalid_requests(server, engine, body, status, expected):
    if callable(expected):  # the message names the prompt's token count
        n = len(engine.encode_messages(body["messages"]))
        assert n + body.get("max_tokens", 0) > 2048
        expected = expected(n)
    r = httpx.post(server + "/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == status
    assert r.json() == expected


def test_invalid_json_and_oversized_bodies(server):
    r = httpx.post(server + "/v1/chat/completions", content=b"{not json",
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["message"].startswith("The request body is not valid JSON")
    too_big = err(f"Request body too large: the limit is {MAX_BODY} bytes.", code="request_too_large")
    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * (MAX_BODY + 10)}]}).encode()
    r = httpx.post(server + "/v1/chat/completions", content=big, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json() == too_big
    # without a Content-Length (chunked upload) the guard counts while reading
    r = httpx.post(server + "/v1/chat/completions", content=iter([big[:40000], big[40000:]]),
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json() == too_big


def test_completions_refusals(server):
    r = httpx.post(server + "/v1/completions", json={"model": MODEL, "prompt": ["a", "b"]}, headers=AUTH)
    assert r.status_code == 400 and r.json() == err("Send exactly one prompt per request.", "prompt")
    r = httpx.post(server + "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 0}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_health_is_503_until_the_engine_is_set(engine):
    app = create_app(None, api_key=KEY)
    with running(app) as url:
        r = httpx.get(url + "/health")
        assert (r.status_code, r.json()) == (503, {"status": "loading"})
        r = httpx.get(url + "/v1/models", headers=AUTH)
        assert r.status_code == 503
        assert r.json() == err("The model is still loading; retry when GET /health returns 200.", code="model_loading",
                               type_="server_error")
        app.state.engine = engine
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/v1/models", headers=AUTH).json()["data"][0]["id"] == MODEL


# ---------------------------------------------------------------- concurrency and disconnects

PROMPTS = ["你好", "How do I help my child sleep?", "孩子不爱吃饭怎么办", "What is a good bedtime?",
           "怎样培养阅读习惯", "Tell me about homework", "孩子发脾气", "Screen time rules"]


def test_concurrent_streams_get_their_own_answers(server, engine):
    expected = {p: solo(engine, [{"role": "user", "content": p}], 10)[1].text for p in PROMPTS}
    assert len(set(expected.values())) == len(PROMPTS)  # distinct answers: a crossed stream would show

    def ask(p):
        c = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)
        stream = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}], temperature=0,
                                           max_tokens=10, stream=True)
        return "".join(ch.choices[0].delta.content or "" for ch in stream)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = dict(zip(PROMPTS, pool.map(ask, PROMPTS), strict=True))
    assert got == expected


def _wait_idle(engine, timeout=15.0) -> float:
    t0 = time.time()
    while engine.lock.locked():
        assert time.time() - t0 < timeout, "generation did not stop"
        time.sleep(0.01)
    return time.time() - t0


def test_stream_disconnect_stops_generation(server, engine):
    body = {"model": MODEL, "messages": MSGS, "temperature": 0, "max_tokens": 1500, "stream": True}
    n_before = len(engine.states)
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server + "/v1/chat/completions", json=body, headers=AUTH) as resp:
            lines = resp.iter_lines()
            got = 0
            for line in lines:
                got += line.startswith("data: ")
                if got >= 4:
                    break
            assert engine.lock.locked()  # generating
    # leaving the blocks closed the connection
    _wait_idle(engine)
    state = engine.states[n_before]
    assert 3 <= len(state.token_ids) < 300  # stopped soon after the client left, far from 1500


def test_non_streamed_disconnect_stops_generation(server, engine):
    body = {"model": MODEL, "messages": MSGS, "temperature": 0, "max_tokens": 1500}
    n_before = len(engine.states)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + "/v1/chat/completions", json=body, headers=AUTH, timeout=1.0)
    _wait_idle(engine)
    state = engine.states[n_before]
    assert len(state.token_ids) < 1500 and state.finish_reason == "stop"


# ---------------------------------------------------------------- the CLI

def test_cli_serve_loads_in_background_and_takes_key_from_env(llama_dir):
    port = free_port()
    env = {**os.environ, "DOMAINTUNE_API_KEY": "env-key", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "domaintune", "serve", str(llama_dir), "--template", "domain_zh",
                             "--port", str(port), "--log-level", "info"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        deadline, statuses = time.time() + 120, []
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "server never became ready"
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                statuses.append(r.status_code)
                if r.status_code == 200:
                    break
                assert r.json() == {"status": "loading"}
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert statuses[-1] == 200 and set(statuses) <= {200, 503}
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer env-key"})
        assert r.json()["data"][0]["id"] == llama_dir.name
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert f"Uvicorn running on http://127.0.0.1:{port}" in out


def test_cli_serve_stops_with_the_load_error(tmp_path):
    from domaintune.errors import UserError
    from domaintune.inference.serve.server import run_serve

    with pytest.raises(UserError, match="has no final weights"):
        run_serve(tmp_path, port=free_port(), log_level="warning")
    with pytest.raises(UserError, match="is not a directory"):
        run_serve(tmp_path / "missing", port=free_port())
    with pytest.raises(UserError, match=r"^temperature must be > 0 when sampling \(0 means greedy\), got -1.0$"):
        run_serve(tmp_path, port=free_port(), defaults=PRESETS["serve"].with_temperature(-1.0))
    with pytest.raises(UserError, match=r"^top_k must be >= 0 \(0 = off\), got -2$"):
        run_serve(tmp_path, port=free_port(), defaults=replace(PRESETS["serve"], top_k=-2))


@pytest.mark.parametrize("verb, target, extra", [
    ("serve", "domaintune.inference.serve.server.run_serve", []),
    ("chat", "domaintune.inference.chat.run_chat", []),
    ("predict", "domaintune.inference.predict.run_predict", ["--data", "test.jsonl"]),
])
def test_threads_sets_torchs_cpu_threads_for_serve_chat_and_predict(monkeypatch, capsys, verb, target, extra):
    """Regression: serve (and predict, chat) on a CPU used every core, which made a loaded server ~4x slower than
    one thread. --threads N sets torch's threads before the model loads; the default is $OMP_NUM_THREADS if set,
    else the usable cores up to 4."""
    import importlib

    import torch

    from domaintune import cli
    from domaintune.cli.inference import default_threads

    seen = []
    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, lambda *a, **kw: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    try:
        assert cli.main([verb, "RUN", *extra, "--threads", "1"]) == 0
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert cli.main([verb, "RUN", *extra]) == 0
        cores = len(os.sched_getaffinity(0))
        assert seen == [1, min(cores, 4)]
        assert cli.main([verb, "RUN", *extra, "--threads", "0"]) == 2
        assert "error: --threads must be at least 1, got 0" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)
    assert default_threads({"OMP_NUM_THREADS": "2"}, 16) is None  # torch reads the variable itself
    assert [default_threads({}, n) for n in (1, 3, 4, 64)] == [1, 3, 4, 4]
    with pytest.raises(SystemExit):
        cli.main([verb, "--help"])
    assert "$OMP_NUM_THREADS if set, else the usable cores up to 4" in " ".join(capsys.readouterr().out.split())


# ---------------------------------------------------------------- input that used to answer 500

def post_raw(url, path, body, **kw):
    """POST `body` serialised by json.dumps (ASCII escapes, so lone surrogates and NaN go through as written)."""
    return httpx.post(url + path, content=json.dumps(body).encode(), timeout=60,
                      headers={**AUTH, "Content-Type": "application/json"}, **kw)


def not_unicode(param, char="U+D800", index=1):
    return err(f"{param}: the text is not valid Unicode: it holds a lone surrogate ({char} at index {index}); send "
               "well-formed text (in JSON, a \\ud800-\\udfff escape must be one half of a high-low pair).", param)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}], "stream": True},
     "messages.0.content"),
    ("/v1/chat/completions", {"messages": [*MSGS, {"role": "assistant", "content": "ok"},
                                           {"role": "user", "content": [{"type": "text", "text": "fine"},
                                                                        {"type": "text", "text": "x\ud800"}]}]},
     "messages.2.content.1.text"),
    ("/v1/chat/completions", {"messages": MSGS, "stop": ["ok", "a\ud800"]}, "stop.1"),
    ("/v1/chat/completions", {"messages": MSGS, "stop": "a\ud800", "stream": True}, "stop"),
    ("/v1/completions", {"prompt": "a\ud800b"}, "prompt"),
    ("/v1/completions", {"prompt": "a\ud800b", "stream": True}, "prompt"),
    ("/v1/completions", {"prompt": ["a\ud800b"]}, "prompt.0"),
    ("/v1/completions", {"prompt": "ok", "suffix": "a\ud800"}, "suffix"),
])
def test_lone_surrogates_are_400_naming_the_field(server, path, body, param):
    """Regression: a lone surrogate reached the tokenizer (TypeError) and answered 500."""
    r = post_raw(server, path, {"model": MODEL, **body})
    assert (r.status_code, r.headers["content-type"]) == (400, "application/json")
    assert r.json() == not_unicode(param)


def test_a_lone_surrogate_in_the_model_name_is_400(server):
    """Regression: the 404 message echoed the name and the JSON response could not be encoded (500)."""
    r = post_raw(server, "/v1/chat/completions", {"model": "t\udc00", "messages": MSGS})
    assert r.status_code == 400 and r.json() == not_unicode("model", "U+DC00")
    # a surrogate pair is one character (U+1F600), not an error
    r = post_raw(server, "/v1/chat/completions", {"model": "\ud83d\ude00", "messages": MSGS})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


SEED_HIGH = err("seed: Input should be less than or equal to 18446744073709551615", "seed")
SEED_LOW = err("seed: Input should be greater than or equal to -9223372036854775808", "seed")


@pytest.mark.parametrize("path, extra", [("/v1/chat/completions", {"messages": MSGS}),
                                         ("/v1/completions", {"prompt": "睡前故事"})])
@pytest.mark.parametrize("stream", [False, True])
def test_seed_outside_torchs_range_is_400_before_streaming(server, path, extra, stream):
    """Regression: seed >= 2**64 answered 500 ('Overflow when unpacking long long'), streamed a 200 with an
    in-band error. torch.manual_seed accepts [-2**63, 2**64 - 1]; both ends work."""
    base = {"model": MODEL, **extra, "max_tokens": 2, "stream": stream}
    for seed, expected in [(2**64, SEED_HIGH), (10**30, SEED_HIGH), (-2**63 - 1, SEED_LOW)]:
        r = post_raw(server, path, {**base, "seed": seed})
        assert (r.status_code, r.headers["content-type"], r.json()) == (400, "application/json", expected)
    for seed in (2**64 - 1, -2**63):
        r = post_raw(server, path, {**base, "seed": seed})
        assert r.status_code == 200
        if stream:
            events = r.text.removesuffix("\n\n").split("\n\n")
            assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events)


def test_tiny_temperatures_decode_greedily(client):
    """Regression: 0 < temperature < 1e-5 overflowed the logits (division by ~0) and answered 500; such
    temperatures are the greedy limit, and decode greedily."""
    greedy = client.chat.completions.create(model=MODEL, messages=MSGS, temperature=0, max_tokens=6)
    for t in (5e-324, 1e-300, 1e-40, 9.9e-6):
        r = client.chat.completions.create(model=MODEL, messages=MSGS, temperature=t, max_tokens=6)
        assert r.choices[0].message.content == greedy.choices[0].message.content
        chunks = list(client.chat.completions.create(model=MODEL, messages=MSGS, temperature=t, max_tokens=6,
                                                     stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == greedy.choices[0].message.content


@pytest.mark.parametrize("raw, expected", [
    # Regression: a repetition penalty of ~0 divided the logits by zero (NaN probabilities: 500)
    ({"repetition_penalty": 1e-300}, err("repetition_penalty: Input should be greater than or equal to 0.01",
                                         "repetition_penalty")),
    ({"repetition_penalty": 1e30}, err("repetition_penalty: Input should be less than or equal to 100",
                                       "repetition_penalty")),
    # Python's JSON parser reads NaN and Infinity; no parameter takes them
    ({"repetition_penalty": float("inf")}, err("repetition_penalty: Input should be a finite number",
                                               "repetition_penalty")),
    ({"temperature": float("nan")}, err("temperature: Input should be a finite number", "temperature")),
    ({"top_p": float("nan")}, err("top_p: Input should be a finite number", "top_p")),
])
def test_out_of_range_sampling_values_are_400(server, raw, expected):
    for stream in (False, True):
        r = post_raw(server, "/v1/chat/completions", {"model": MODEL, "messages": MSGS, "stream": stream, **raw})
        assert (r.status_code, r.json()) == (400, expected)


def test_unreadable_bodies_say_what_to_send(server):
    headers = {**AUTH, "Content-Type": "application/json"}
    r = httpx.post(server + "/v1/chat/completions", content=b'{"model": "\xff"}', headers=headers)
    assert r.status_code == 400
    assert r.json() == err("The request body is not UTF-8 (byte 0xff at position 11): send a JSON object encoded in "
                           "UTF-8.")
    r = httpx.post(server + "/v1/chat/completions", content=b'{"model": tiny}', headers=headers)
    assert r.status_code == 400
    assert r.json() == err("The request body is not valid JSON (Expecting value at character 10): send a JSON object.")
    r = httpx.post(server + "/v1/chat/completions", content=b"", headers=headers)
    assert r.status_code == 400 and r.json() == err("The request body is empty: send a JSON object.")
    r = httpx.post(server + "/v1/completions", content=b"[1, 2]", headers=headers)
    assert r.status_code == 400
    assert r.json() == err("The request body must be a JSON object, with the fields of the request.")


@pytest.mark.parametrize("content_type, said", [
    ("application/x-www-form-urlencoded", "this request says 'application/x-www-form-urlencoded'"),  # curl -d
    ("text/plain;charset=UTF-8", "this request says 'text/plain;charset=UTF-8'"),  # fetch with a string body
    (None, "this request has no Content-Type"),
])
def test_a_json_body_without_a_json_content_type_is_told_to_send_one(server, content_type, said):
    """Regression: curl's default (a form type) was told "The request body must be a JSON object", though it was
    one. The body must be sent as JSON (read as JSON regardless, a web page could send it without a CORS
    preflight); the message says which header to send."""
    body = json.dumps({"model": MODEL, "messages": MSGS, "max_tokens": 2, "temperature": 0}).encode()
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    r = httpx.post(server + "/v1/chat/completions", content=body, headers=headers, timeout=60)
    assert (r.status_code, r.json()) == (400, err(
        f"Send the request body as JSON with the header 'Content-Type: application/json' ({said}; curl -d sends a "
        "form type unless given -H 'Content-Type: application/json').", code="unsupported_content_type"))
    for ok in ("application/json; charset=utf-8", "Application/JSON"):
        r = httpx.post(server + "/v1/chat/completions", content=body, headers={**AUTH, "Content-Type": ok}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_a_huge_integer_is_too_large_naming_its_field(server):
    """Regression: a 5000-digit integer was told "send a JSON object encoded in UTF-8"."""
    huge = "9" * 5000
    for path, raw, param in [
        ("/v1/chat/completions", f'{{"model": "{MODEL}", "messages": [], "max_tokens": {huge}}}', "max_tokens"),
        ("/v1/chat/completions", f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": -{huge}}}]}}',
         "messages.0.content"),
        ("/v1/completions", f'{{"model": "{MODEL}", "prompt": "x", "seed": {huge}}}', "seed"),
        ("/v1/completions", f"[{huge}]", "0"),
    ]:
        r = httpx.post(server + path, content=raw.encode(), headers={**AUTH, "Content-Type": "application/json"},
                       timeout=60)
        assert (r.status_code, r.json()) == (400, err(
            f"{param}: the integer has 5000 digits, far too large for any field of this API (send a number in the "
            "field's range).", param, "number_too_large"))
    # digits inside a string are text, not a number
    r = httpx.post(server + "/v1/completions", json={"model": MODEL, "prompt": "x", "user": huge, "max_tokens": 1},
                   headers=AUTH, timeout=60)
    assert r.status_code == 200


def test_a_completion_prompt_longer_than_the_context_names_the_prompt(server):
    r = httpx.post(server + "/v1/completions", json={"model": MODEL, "prompt": "好" * 3000}, headers=AUTH)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "prompt" and r.json()["error"]["code"] == "context_length_exceeded"


def test_a_server_bug_still_answers_an_openai_error_body(engine):
    """An unexpected exception is a 500 (a bug, not the client's mistake), with the OpenAI error body."""

    class Broken(Engine):
        def encode_messages(self, messages):
            raise RuntimeError("boom")

    broken = Broken(engine.model, engine.tokenizer, engine.template, MODEL)
    with running(create_app(broken)) as url:
        r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": MSGS}, timeout=60)
    assert r.status_code == 500
    assert r.json() == err("The server failed on this request (RuntimeError: boom). This is a bug in domaintune: "
                           "please report it with the request that caused it.", type_="server_error")


# ---------------------------------------------------------------- what cannot be honoured is refused, never ignored

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("kw, param, message", [
    ({"tools": [TOOL]}, "tools", "tools are not supported by this server yet: the model answers in plain text and "
                                 "makes no tool calls. Leave 'tools' out."),
    ({"tool_choice": "required"}, "tool_choice", "tool_choice required cannot be honoured: this server has no tools "
                                                 "to call (the model answers in plain text). Leave 'tool_choice' out "
                                                 "or send \"none\"."),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice",
     "tool_choice an object (type, function) cannot be honoured: this server has no tools to call (the model answers "
     "in plain text). Leave 'tool_choice' out or send \"none\"."),
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions",
     "functions are not supported by this server yet: the model answers in plain text and makes no tool calls. "
     "Leave 'functions' out."),
    ({"function_call": {"name": "f"}}, "function_call",
     "function_call an object (name) cannot be honoured: this server has no tools to call (the model answers in "
     "plain text). Leave 'function_call' out or send \"none\"."),
    ({"response_format": {"type": "json_object"}}, "response_format",
     "response_format 'json_object' is not supported by this server: nothing constrains the answer to JSON. Leave "
     "'response_format' out or send {\"type\": \"text\"}; ask for JSON in the prompt instead."),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format",
     "response_format 'json_schema' is not supported by this server: nothing constrains the answer to JSON. Leave "
     "'response_format' out or send {\"type\": \"text\"}; ask for JSON in the prompt instead."),
    ({"top_logprobs": 2}, "top_logprobs", "top_logprobs are not supported by this server (nor logprobs)."),
    ({"logit_bias": {"99999999": 5}}, "logit_bias.99999999",
     "logit_bias: token id 99999999 is not in this model's vocabulary (ids 0 to {last})."),
    ({"logit_bias": {"abc": 5}}, "logit_bias",
     "logit_bias: Value error, keys must be token ids (non-negative integers, as strings), got 'abc'"),
    ({"logit_bias": {"5": 101}}, "logit_bias.5", "logit_bias.5: Input should be less than or equal to 100"),
    ({"presence_penalty": 2.5}, "presence_penalty", "presence_penalty: Input should be less than or equal to 2"),
    ({"frequency_penalty": -3}, "frequency_penalty",
     "frequency_penalty: Input should be greater than or equal to -2"),
])
def test_what_cannot_be_honoured_is_400_naming_the_field(client, engine, kw, param, message):
    """Regression: tools, tool_choice "required", response_format json_object, presence/frequency penalties and
    logit_bias got a plain 200 and were ignored. Those that cannot be honoured are a 400 naming the field, through
    the official client, streamed or not."""
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2, stream=stream, **kw)
        e = caught.value
        assert (e.status_code, e.param, e.body["type"]) == (400, param, "invalid_request_error")
        assert e.body["message"] == message.replace("{last}", str(engine.vocab_size - 1))


def test_what_needs_no_tools_or_json_is_served(client, engine):
    """tool_choice "none" / "auto" without tools, an empty tools list and response_format text change nothing."""
    plain = client.chat.completions.create(model=MODEL, messages=MSGS, temperature=0, max_tokens=6)
    for kw in ({"tool_choice": "none"}, {"tool_choice": "auto"}, {"tools": []}, {"response_format": {"type": "text"}},
               {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}}):
        r = client.chat.completions.create(model=MODEL, messages=MSGS, temperature=0, max_tokens=6, **kw)
        assert r.choices[0].message.content == plain.choices[0].message.content, kw


def test_logit_bias_is_applied(client, engine):
    """+100 on one token makes greedy decoding write only it; -100 on the first greedy token makes it never come."""
    _, plain = solo(engine, MSGS, 6)
    token = engine.tokenizer.convert_tokens_to_ids(engine.tokenizer.tokenize("好")[0])
    assert token not in engine.stop_ids and plain.token_ids[:6] != [token] * 6
    for stream in (False, True):
        r = client.chat.completions.create(model=MODEL, messages=MSGS, temperature=0, max_tokens=6, stream=stream,
                                           logit_bias={str(token): 100}, stream_options={"include_usage": True}
                                           if stream else None)
        chunks = list(r) if stream else None
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) if stream else \
            r.choices[0].message.content
        usage = chunks[-1].usage if stream else r.usage
        assert (text, usage.completion_tokens) == (engine.decode([token] * 6), 6)
    first = plain.token_ids[0]
    r = client.completions.create(model=MODEL, prompt=engine.tokenizer.decode(engine.encode_messages(MSGS)),
                                  temperature=0, max_tokens=4, logit_bias={str(first): -100})
    assert not r.choices[0].text.startswith(engine.decode([first]))


def test_presence_and_frequency_penalties_are_applied_as_generate_applies_them(client, engine):
    """The served answer with penalties (the continuous batcher's OpenAIPenalties) equals transformers' generate
    with the same processor, and differs from the answer without them (the micro model repeats itself)."""
    from domaintune.inference.params import RequestParams

    ids, plain = solo(engine, MSGS, 16)
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"frequency_penalty": 1.0,
                                                                       "presence_penalty": -0.5}):
        want = engine.generate([ids], RequestParams(max_new_tokens=16, **kw), batch_size=1)[0]
        r = client.chat.completions.create(model=MODEL, messages=MSGS, temperature=0, max_tokens=16, **kw)
        assert r.choices[0].message.content == want.text, kw
        chunks = list(client.chat.completions.create(model=MODEL, messages=MSGS, temperature=0, max_tokens=16,
                                                     stream=True, **kw))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert want.text != plain.text


def test_openai_penalties_follow_openais_definition():
    """logit += bias; logit -= count * frequency + (count > 0) * presence, counting generated tokens only."""
    import torch

    from domaintune.inference.params import OpenAIPenalties

    proc = OpenAIPenalties(start=3, presence=0.5, frequency=2.0, bias=((1, 10.0), (4, -3.0)))
    ids = torch.tensor([[4, 4, 2, 5, 5, 7]])  # prompt [4, 4, 2]; generated 5 twice, 7 once
    scores = torch.zeros(1, 8)
    out = proc(ids, scores)
    assert out.tolist() == [[0.0, 10.0, 0.0, 0.0, -3.0, -4.5, 0.0, -2.5]]
    assert scores.tolist() == [[0.0] * 8]  # the input is left as it was


# ---------------------------------------------------------------- max_tokens beyond the room the prompt leaves

def test_max_tokens_beyond_the_context_left_is_capped_with_finish_reason_length(server, client, engine):
    """Regression: an explicit max_tokens larger than the room the prompt leaves was a 400, so the shipped configs
    (gen-data's max_tokens 1024, the judge's 512) failed every call against a 2,048-token model. It is capped, and
    an answer cut there ends with finish_reason "length", as `serve --help` says."""
    import yaml

    repo = Path(__file__).resolve().parents[2]
    shipped = [yaml.safe_load((repo / "configs" / name).read_text(encoding="utf-8"))[section]["max_tokens"]
               for name, section in (("selfinstruct.yaml", "selfinstruct"), ("judge.yaml", "judge"))]
    assert shipped == [1024, 512]
    k = 2000
    while (room := engine.context_len - len(engine.encode_messages([{"role": "user", "content": "好" * k}]))) > 5:
        k += 1
    msgs = [{"role": "user", "content": "好" * k}]
    n = len(engine.encode_messages(msgs))
    assert 0 < room <= 5
    for max_tokens in shipped:
        r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=max_tokens)
        assert r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n, room)
        chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=max_tokens,
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == room
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    r = client.completions.create(model=MODEL, prompt="好" * (engine.context_len - 3), temperature=0, max_tokens=512)
    assert r.choices[0].finish_reason == "length" and r.usage.total_tokens == engine.context_len
