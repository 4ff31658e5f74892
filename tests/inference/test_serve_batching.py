"""The server under concurrent load: continuous batching, disconnects that free their place, and 429 when the
queue is full. A real uvicorn server on 127.0.0.1 with the conftest's micro LLaMA, driven by the official openai
client (and httpx for raw streams); `GET /status` shows what the batcher holds."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from served_tiny_model import running_app

openai = pytest.importorskip("openai")

from domaintune.inference.engine import Engine  # noqa: E402
from domaintune.inference.serve.app import create_app  # noqa: E402

KEY = "batch-key"
MODEL = "tiny"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUESTIONS = ["你好", "How do I help my child sleep?", "孩子不爱吃饭怎么办", "What is a good bedtime?",
             "怎样培养阅读习惯", "Tell me about homework", "孩子发脾气", "Screen time rules"]
LONG = {"model": MODEL, "messages": [{"role": "user", "content": "你好"}], "temperature": 0, "max_tokens": 1500,
        "stream": True}


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return Engine.from_run(tiny_model_dir("llama"), template="domain_zh")


@pytest.fixture
def engine(loaded):
    """An engine of its own (its own batcher and limits) on the shared model."""
    return Engine(loaded.model, loaded.tokenizer, loaded.template, MODEL)


@pytest.fixture
def slow_engine(engine, monkeypatch):
    """An engine whose decoding steps take at least 5 ms (a larger model's pace): a long answer still runs while
    the test looks at it (the micro model writes 1500 tokens in about a second)."""
    step = engine.batcher._forward

    def slow(*a, **kw):
        time.sleep(0.005)
        return step(*a, **kw)

    monkeypatch.setattr(engine.batcher, "_forward", slow)
    return engine


def status(url: str) -> dict:
    r = httpx.get(url + "/status", timeout=10)  # open, like /health: no key needed
    assert r.status_code == 200
    return r.json()


def wait_for(url: str, **want) -> dict:
    deadline = time.time() + 15
    while True:
        s = status(url)
        if all(s[k] == v for k, v in want.items()):
            return s
        assert time.time() < deadline, f"/status never showed {want}: {s}"
        time.sleep(0.02)


def next_text(lines) -> str:
    """The next piece of answer text in a raw SSE stream (chat or text completion chunks)."""
    for line in lines:
        if line.startswith("data: {"):
            choice = (json.loads(line[len("data: "):])["choices"] or [{}])[0]
            text = choice.get("delta", {}).get("content") or choice.get("text")
            if text:
                return text
    raise AssertionError("the stream ended without text")


def ask(client, spec: dict) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of one request, streamed or not, chat or text completion."""
    kw = {k: v for k, v in spec.items() if k not in ("endpoint", "question")}
    chat = spec["endpoint"] == "chat"
    api = client.chat.completions if chat else client.completions
    prompt = {"messages": [{"role": "user", "content": spec["question"]}]} if chat else {"prompt": spec["question"]}
    if not spec["stream"]:
        r = api.create(model=MODEL, **prompt, **kw)
        text = r.choices[0].message.content if chat else r.choices[0].text
        return text, r.choices[0].finish_reason, r.usage.completion_tokens
    parts, reason, tokens = [], None, None
    for c in api.create(model=MODEL, **prompt, **kw, stream_options={"include_usage": True}):
        if c.choices:
            parts.append((c.choices[0].delta.content if chat else c.choices[0].text) or "")
            reason = c.choices[0].finish_reason or reason
        if c.usage:
            tokens = c.usage.completion_tokens
    return "".join(parts), reason, tokens


def test_sixteen_concurrent_mixed_requests_each_equal_their_solo_answer(engine):
    with running_app(create_app(engine, api_key=KEY, max_batch_size=16)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        specs = []
        for i in range(16):
            sampling = {"temperature": 0} if i % 3 == 0 else {"temperature": 0.8 + 0.1 * (i % 2), "seed": 100 + i,
                                                              "top_p": 0.95}
            specs.append({"endpoint": "chat" if i % 4 < 2 else "completions", "question": QUESTIONS[i % 8],
                          "stream": i % 2 == 1, "max_tokens": 6 + i, **sampling})
        # Stop strings taken from the middle of some answers, so that they end early with finish_reason "stop".
        for i in (2, 5, 9, 14):
            text = ask(client, specs[i])[0]
            specs[i]["stop"] = [text[len(text) // 2: len(text) // 2 + 2], "never-generated"]
        solo = [ask(client, s) for s in specs]
        assert len({t for t, _, _ in solo}) == 16  # different answers: a crossed stream would show
        assert {solo[i][1] for i in (2, 5, 9, 14)} == {"stop"}

        before = status(url)
        gate = threading.Barrier(16)

        def together(spec):
            gate.wait()
            return ask(openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120), spec)

        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(together, specs))
        after = status(url)
    assert got == solo
    tokens = sum(n for _, _, n in got)
    steps = after["steps"] - before["steps"]
    assert steps < tokens / 3, (steps, tokens)  # decoded together, not one request after another
    # the four with a stop string were stopped by the server when their text reached it, unless the batcher ended
    # them first (the stop string's last token was their last one)
    completed, stopped = after["completed"] - before["completed"], after["stopped"] - before["stopped"]
    assert completed + stopped == 16 and stopped <= 4
    assert after["failed"] == 0


def test_a_client_that_disconnects_mid_batch_frees_its_place_at_once(slow_engine):
    with running_app(create_app(slow_engine, api_key=KEY, max_batch_size=2, max_queue=0)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        short = {"endpoint": "chat", "question": QUESTIONS[1], "stream": False, "max_tokens": 8, "temperature": 0}
        want = ask(client, short)
        with httpx.Client(timeout=60) as h1, h1.stream("POST", url + "/v1/chat/completions", json=LONG,
                                                       headers=AUTH) as first:
            lines1 = first.iter_lines()  # kept: a dropped line iterator closes the connection
            next_text(lines1)
            with httpx.Client(timeout=60) as h2, h2.stream("POST", url + "/v1/chat/completions", json=LONG,
                                                           headers=AUTH) as second:
                lines2 = second.iter_lines()  # kept: a dropped line iterator closes the connection
                next_text(lines2)
                s = wait_for(url, running=2, admitted=2)
                assert s["queued"] == 0 and s["max_batch_size"] == 2 and s["max_queue"] == 0
                with pytest.raises(openai.RateLimitError):
                    ask(client, short)  # both places taken, no queue
                stopped = s["stopped"]
            # the second client left mid-stream: it leaves the batch, and its place is free
            s = wait_for(url, running=1, admitted=1)
            assert s["stopped"] == stopped + 1
            assert ask(client, short) == want  # the freed place serves a new request, next to the first stream
            assert next_text(lines1)  # the first stream went on all along
        wait_for(url, running=0, admitted=0, queued=0)


def test_past_the_queue_limit_requests_get_429_with_retry_after(slow_engine):
    with running_app(create_app(slow_engine, api_key=KEY, max_batch_size=1, max_queue=1)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        with httpx.Client(timeout=60) as h1, h1.stream("POST", url + "/v1/chat/completions", json=LONG,
                                                       headers=AUTH) as running:
            lines = running.iter_lines()  # kept: a dropped line iterator closes the connection
            next_text(lines)
            with httpx.Client(timeout=60) as h2, h2.stream("POST", url + "/v1/completions", headers=AUTH,
                                                           json={**LONG, "messages": None, "prompt": "睡前"}) as queued:
                assert queued.status_code == 200
                wait_for(url, running=1, queued=1, admitted=2)
                for stream in (False, True):
                    r = httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=30,
                                   json={**LONG, "stream": stream, "max_tokens": 4})
                    assert r.status_code == 429 and r.headers["content-type"] == "application/json"
                    assert int(r.headers["retry-after"]) >= 1
                    error = r.json()["error"]
                    assert (error["type"], error["code"]) == ("rate_limit_error", "server_busy")
                    assert "--max-batch-size 1 + --max-queue 1" in error["message"]
                with pytest.raises(openai.RateLimitError) as caught:
                    client.completions.create(model=MODEL, prompt="你好", max_tokens=3)
                assert caught.value.response.headers["retry-after"]
            # the queued client left before its turn: it never ran, and its place is free again
            wait_for(url, running=1, queued=0, admitted=1)
        wait_for(url, running=0, admitted=0)
        assert ask(client, {"endpoint": "completions", "question": "你好", "stream": True, "max_tokens": 3,
                            "temperature": 0})[2] == 3


def test_status_is_open_and_503_while_loading(engine):
    app = create_app(None, api_key=KEY)
    with running_app(app) as url:
        r = httpx.get(url + "/status", timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        app.state.engine = engine
        s = status(url)
    assert s["model"] == MODEL
    assert {k: s[k] for k in ("running", "queued", "admitted", "max_queue")} == \
        {"running": 0, "queued": 0, "admitted": 0, "max_queue": 64}


def test_bad_limits_are_refused(engine):
    from domaintune.errors import UserError

    with pytest.raises(UserError, match="--max-batch-size must be at least 1, got 0"):
        create_app(engine, max_batch_size=0)
    with pytest.raises(UserError, match="--max-queue must be at least 0"):
        create_app(engine, max_queue=-1)


def test_a_worker_that_fails_outside_a_step_answers_500_and_the_server_goes_on(engine, monkeypatch):
    """Regression: an exception in the batcher's loop outside its guarded step killed the worker; the request
    and every later one waited forever. Now the request gets a 500 OpenAI error body (in-band when streamed)
    and the next request is served."""
    batcher = engine.batcher
    flush, armed = batcher._flush, threading.Event()

    def failing():
        if armed.is_set():
            armed.clear()
            raise ValueError("injected")
        flush()

    monkeypatch.setattr(batcher, "_flush", failing)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "你好"}], "temperature": 0, "max_tokens": 8}
    with running_app(create_app(engine, api_key=KEY)) as url:
        for stream in (False, True):
            armed.set()
            r = httpx.post(url + "/v1/chat/completions", json={**body, "stream": stream}, headers=AUTH, timeout=30)
            if stream:
                assert r.status_code == 200  # the status line was sent before the failure: the error is in-band
                events = r.text.removesuffix("\n\n").split("\n\n")
                assert events[-1] == "data: [DONE]"
                error = json.loads(events[-2][len("data: "):])["error"]
            else:
                assert (r.status_code, r.headers["content-type"]) == (500, "application/json")
                error = r.json()["error"]
            assert (error["type"], error["code"]) == ("server_error", "worker_failed")
            assert error["message"].startswith("the generation worker failed (ValueError: injected); this request "
                                               "was stopped and the worker restarted.")
            r = httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        s = wait_for(url, running=0, queued=0, admitted=0)
    assert s["failed"] == 2
