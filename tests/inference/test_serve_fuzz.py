"""Property test of the server's input handling: whatever a client sends to the POST endpoints, the answer is
never a 500, every error has the OpenAI error body, and a streamed 200 runs to `data: [DONE]` without an
in-band error (a request the schema accepted must generate).

Random JSON bodies shaped like real requests (every field random: roles, contents with control characters
and lone surrogates, stop, max_tokens, seed, temperature, n, stream, prompt as string/list/other) and random
raw bodies, against the app in-process (Starlette's TestClient) on the conftest's micro LLaMA. The server's
defaults generate 2 tokens and random `max_tokens` stay small (or beyond the context, which is cut to 128
tokens here: max_tokens is capped by the room the prompt leaves), so generation is quick.

Reproducible in CI: derandomize=True and no example database; about 250 examples in all.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from domaintune.inference.engine import Engine  # noqa: E402
from domaintune.inference.params import PRESETS  # noqa: E402
from domaintune.inference.serve.app import create_app  # noqa: E402

MODEL = "tiny"
PATHS = ("/v1/chat/completions", "/v1/completions")


def ci(max_examples: int) -> settings:
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    engine = Engine.from_run(tiny_model_dir("llama"), template="domain_zh")
    engine.model_id = MODEL
    engine.context_len = 128  # a max_tokens beyond the context is capped to what the prompt leaves: a few dozen
    app = create_app(engine, defaults=replace(PRESETS["serve"], max_new_tokens=2))
    # no API key: the Host check is on, and 127.0.0.1 passes it
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as c:
        yield c


# ---------------------------------------------------------------- strategies

def one_in_ten(common: st.SearchStrategy, rare: st.SearchStrategy) -> st.SearchStrategy:
    """`rare` one time in ten, else `common` (both drawn, one kept: a flatmap made the examples vary between runs)."""
    return st.tuples(st.integers(0, 9), common, rare).map(lambda t: t[2] if t[0] == 9 else t[1])


CLEAN_CHARS = st.one_of(st.characters(codec="ascii"),  # ASCII, control characters included
                        st.characters(codec=None, exclude_categories=("Cs",)))  # any code point but surrogates
CLEAN_TEXT = st.text(CLEAN_CHARS, max_size=12)
# a lone surrogate amid other text (built by hand: st.text drops surrogates from a mixed alphabet)
ODD_TEXT = st.builds(lambda a, s, b: a + s + b, st.text(CLEAN_CHARS, max_size=5), st.characters(categories=["Cs"]),
                     st.text(CLEAN_CHARS, max_size=5))
TEXT = one_in_ten(CLEAN_TEXT, ODD_TEXT)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(TEXT, kids, max_size=3),
                    max_leaves=8)


def mostly(valid: st.SearchStrategy, *odd: st.SearchStrategy) -> st.SearchStrategy:
    """`valid` nine times in ten, else one of `odd` or any JSON value: with a dozen random fields, many
    requests still get through the schema and generate."""
    return one_in_ten(valid, st.one_of(*odd, JSON))


# token counts: small, beyond any context, negative, or not a number (never a long generation)
COUNT = mostly(st.none() | st.integers(1, 4), st.integers(-3, 0), st.integers(2049, 2**80), st.integers(max_value=-4),
               JSON.filter(lambda v: not (isinstance(v, (int, float)) and 5 <= v <= 2048)))
SAMPLING = {
    "max_tokens": COUNT,
    "temperature": mostly(st.none() | st.floats(0, 2), st.floats(), st.integers(-2, 3)),
    "top_p": mostly(st.none() | st.floats(0, 1, exclude_min=True), st.floats()),
    "top_k": mostly(st.none() | st.integers(0, 100), st.integers()),
    "repetition_penalty": mostly(st.none() | st.floats(0.5, 2), st.floats()),
    "seed": mostly(st.none() | st.integers(-2**63, 2**64 - 1), st.integers(),
                   st.sampled_from([2**64 - 1, 2**64, -2**63, -2**63 - 1])),
    "n": mostly(st.just(1), st.integers(-1, 3)),
    "stop": mostly(st.none() | TEXT | st.lists(TEXT, max_size=4), st.lists(TEXT, min_size=5, max_size=6)),
    "stream_options": mostly(st.none() | st.fixed_dictionaries({"include_usage": st.booleans()}),
                             st.fixed_dictionaries({"include_usage": JSON})),
    "logprobs": mostly(st.none() | st.just(False) | st.just(0), st.booleans(), st.integers(-1, 3)),
    "presence_penalty": mostly(st.none() | st.floats(-2, 2), st.floats()),
    "frequency_penalty": mostly(st.none() | st.floats(-2, 2), st.floats()),
    "logit_bias": mostly(st.none() | st.dictionaries(st.integers(0, 3000).map(str), st.floats(-100, 100), max_size=3),
                         st.dictionaries(TEXT, JSON, max_size=2)),
    "user": TEXT,
}
CHAT_ONLY = {  # refused unless they ask for nothing (checks.py)
    "tools": mostly(st.none() | st.just([]), st.lists(JSON, min_size=1, max_size=2)),
    "tool_choice": mostly(st.none() | st.sampled_from(["none", "auto"]), st.just("required")),
    "response_format": mostly(st.none() | st.just({"type": "text"}), st.just({"type": "json_object"})),
    "top_logprobs": mostly(st.none() | st.just(0), st.integers(-1, 5)),
}
ROLE = mostly(st.sampled_from(["system", "user", "assistant"]), st.sampled_from(["tool", "developer"]), TEXT)
PART = st.fixed_dictionaries({"type": mostly(st.just("text"), st.just("image_url")), "text": mostly(TEXT)})
CONTENT = mostly(TEXT | st.lists(PART, max_size=3), st.none())
MESSAGE = st.fixed_dictionaries({}, optional={"role": ROLE, "content": CONTENT, "name": TEXT})
WELL_FORMED = st.builds(
    lambda system, turns: ([{"role": "system", "content": system}] if system is not None else [])
    + [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(turns)],
    st.none() | TEXT, st.lists(CONTENT, min_size=1, max_size=5).filter(lambda turns: len(turns) % 2 == 1))
MODEL_NAME = mostly(st.just(MODEL), TEXT)
STREAM = mostly(st.booleans())
CHAT_BODY = st.fixed_dictionaries({"model": MODEL_NAME, "messages": mostly(WELL_FORMED, st.lists(MESSAGE, max_size=4)),
                                   "stream": STREAM},
                                  optional={**SAMPLING, **CHAT_ONLY, "max_completion_tokens": COUNT})
COMPLETION_BODY = st.fixed_dictionaries(
    {"model": MODEL_NAME, "prompt": mostly(TEXT | st.lists(TEXT, min_size=1, max_size=1), st.lists(TEXT, max_size=3)),
     "stream": STREAM},
    optional={**SAMPLING, "echo": mostly(st.just(False), st.booleans()), "suffix": mostly(st.none(), TEXT),
              "best_of": mostly(st.none() | st.just(1), st.integers(-1, 3))})
RAW_BODY = st.one_of(st.binary(max_size=200),
                     TEXT.map(lambda s: s.encode("utf-8", "surrogatepass")),
                     st.one_of(JSON, CHAT_BODY, COMPLETION_BODY).map(lambda v: json.dumps(v).encode()))


# ---------------------------------------------------------------- the checks

def check(client: TestClient, path: str, body: dict | bytes) -> str:
    """Send `body`, check the answer; return what it was: "error", "answer" or "stream"."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()  # ASCII escapes: surrogates pass
    with client.stream("POST", path, content=content, headers={"Content-Type": "application/json"}) as r:
        data = r.read()
    assert r.status_code in (200, 400, 404), (r.status_code, data[:500])
    if r.status_code != 200:
        assert r.headers["content-type"] == "application/json"
        error = json.loads(data)
        assert list(error) == ["error"] and list(error["error"]) == ["message", "type", "param", "code"], error
        e = error["error"]
        assert isinstance(e["message"], str) and e["message"] and e["type"] == "invalid_request_error", error
        assert all(v is None or isinstance(v, str) for v in (e["param"], e["code"])), error
        return "error"
    if r.headers["content-type"].startswith("text/event-stream"):
        text = data.decode()
        assert text.endswith("\n\ndata: [DONE]\n\n"), text[-500:]
        events = text[:-2].split("\n\n")
        assert all(e.startswith("data: ") for e in events), text[:500]
        chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
        assert chunks and not [c for c in chunks if "error" in c], chunks  # no in-band error
        assert all(c["object"] in ("chat.completion.chunk", "text_completion") for c in chunks)
        return "stream"
    answer = json.loads(data)
    assert answer["object"] in ("chat.completion", "text_completion") and len(answer["choices"]) == 1
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")
    return "answer"


def run_property(client: TestClient, paths: st.SearchStrategy, bodies: st.SearchStrategy, examples: int,
                 explicit: tuple[tuple[str, dict], ...] = ()) -> Counter:
    """Check `explicit` (path, body) pairs, then `examples` random ones; the count of each kind of outcome."""
    seen: Counter = Counter()

    def prop(path: str, body: dict | bytes) -> None:
        seen[check(client, path, body)] += 1

    for path, body in explicit:
        prop = example(path=path, body=body)(prop)
    ci(examples)(given(path=paths, body=bodies)(prop))()
    return seen


MSG = [{"role": "user", "content": "\x00a\x1f\t"}]


def test_chat_requests_never_get_a_500(client):
    seen = run_property(client, st.just(PATHS[0]), CHAT_BODY, 110, explicit=(
        (PATHS[0], {"model": MODEL, "messages": MSG, "stream": True, "stream_options": {"include_usage": True},
                    "seed": 2**64 - 1, "stop": ["\n", "。"], "temperature": 5e-324}),
        (PATHS[0], {"model": MODEL, "messages": MSG, "stream": False, "seed": -2**63, "max_tokens": 3})))
    # guards the test itself: the random requests reached generation, not only refusals (which of the random
    # requests Hypothesis makes depends on the modules loaded before it, so the bound leaves room)
    assert seen["stream"] >= 1 and seen["answer"] + seen["stream"] >= 15 and seen["error"] >= 20, seen


def test_completion_requests_never_get_a_500(client):
    seen = run_property(client, st.just(PATHS[1]), COMPLETION_BODY, 70, explicit=(
        (PATHS[1], {"model": MODEL, "prompt": "\x07", "stream": True, "top_k": 2**70, "repetition_penalty": 100}),
        (PATHS[1], {"model": MODEL, "prompt": ["好"], "stream": False, "top_p": 5e-324, "max_tokens": 1})))
    assert seen["stream"] >= 1 and seen["answer"] + seen["stream"] >= 10 and seen["error"] >= 10, seen


def test_raw_bodies_never_get_a_500(client):
    seen = run_property(client, st.sampled_from(PATHS), RAW_BODY, 70)
    assert seen["error"] >= 30, seen
