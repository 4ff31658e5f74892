"""The continuous batcher (inference/batching.py) on the tiny model of every family: 3 concurrent greedy requests
each get their solo answer (itself transformers' `generate`), joined into one batch where the family's KV cache is
made of plain full-attention layers, and decoded one request at a time where it is not (Gemma 3's sliding-window
layers, Qwen3.5's linear attention, Mistral with a sliding window): there the batch limit is 1, which is what
`serve` reads to print its note. Weights are re-drawn so answers differ (a crossed row would show)."""
from __future__ import annotations

import json
import shutil
import threading
import time

import pytest

from domaintune.families import ARCHS, TINY, family_named, family_of
from domaintune.inference.engine import Engine, StreamState
from domaintune.inference.kvcache import joinable
from domaintune.inference.params import GenerationParams

# Families whose cache the batcher joins (proven below); the others decode one request at a time.
JOINED = {"qwen2", "llama", "bloom", "qwen3", "qwen3_moe", "llama3", "mistral", "phi3", "glm4"}
QUESTIONS = ["你好", "How do I help my child sleep at night when she keeps waking up?", "怎样培养阅读习惯"]


def _engine(path) -> Engine:
    import torch

    engine = Engine.from_run(path, template="chatml", device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # re-drawn weights: a fresh tiny model mostly echoes its last token
        for p in engine.model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return engine


def _requests(engine: Engine) -> list[tuple[list[int], GenerationParams]]:
    """Greedy requests of different prompt lengths that leave the batch at different steps."""
    return [(engine.encode_messages([{"role": "user", "content": q}]), GenerationParams(max_new_tokens=n))
            for q, n in zip(QUESTIONS, (12, 14, 6), strict=True)]


def _stream(engine: Engine, prompt, params) -> tuple[str, list[int]]:
    """(final text, token ids) of a streamed request, whose deltas add up to the final text (with SentencePiece
    byte fallback too: test_streamed_deltas_add_up_to_the_final_text_with_byte_fallback)."""
    state = StreamState()
    text = "".join(engine.stream(prompt, params, state=state))
    assert text == state.text
    return state.text, state.token_ids


def _together(engine: Engine, requests, monkeypatch) -> tuple[list, list[int]]:
    """Every request streamed from its own thread, the others once the first has decoded 3 steps (they join a
    running batch whose cache is longer than theirs); the results (or errors) and the batch size at every
    decoding step."""
    sizes: list[int] = []
    decode, submit = engine.batcher._decode, engine.batcher.submit
    submitted = []

    def counted(*a, **kw):
        submitted.append(1)
        return submit(*a, **kw)

    def watched():
        if len(sizes) == 3:  # the others were started after 3 steps: let them all be submitted first
            deadline = time.time() + 30
            while len(submitted) < len(requests) and time.time() < deadline:
                time.sleep(0.001)
        sizes.append(len(engine.batcher.rows))
        decode()

    monkeypatch.setattr(engine.batcher, "_decode", watched)
    monkeypatch.setattr(engine.batcher, "submit", counted)
    results: list = [None] * len(requests)

    def work(i):
        try:
            results[i] = _stream(engine, *requests[i])
        except Exception as e:  # noqa: BLE001 - the test looks at it
            results[i] = e

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(requests))]
    steps = engine.batch_status()["steps"]
    threads[0].start()
    deadline = time.time() + 30
    while engine.batch_status()["steps"] < steps + 3:
        assert time.time() < deadline
        time.sleep(0.001)
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a request was left waiting"
    return results, sizes


def _check(engine: Engine, joined: bool, monkeypatch) -> None:
    requests = _requests(engine)
    solo = [_stream(engine, p, params) for p, params in requests]
    for (prompt, params), (text, ids) in zip(requests, solo, strict=True):
        [gen] = engine.generate([prompt], params, batch_size=1)  # transformers' generate
        assert (text, ids) == (gen.text, gen.token_ids)
    assert len({text for text, _ in solo}) == 3  # distinct answers: a crossed row would show
    assert engine.batcher.joinable is joined
    assert engine.batch_status()["max_batch_size"] == (engine.max_batch_size if joined else 1)
    together, sizes = _together(engine, requests, monkeypatch)
    assert together == solo
    assert max(sizes) == (3 if joined else 1), sizes
    status = engine.batch_status()
    assert (status["running"], status["queued"]) == (0, 0)


@pytest.mark.parametrize("arch", ARCHS)
def test_three_concurrent_greedy_requests_each_get_their_solo_answer(tiny_model_dir, arch, monkeypatch):
    engine = _engine(tiny_model_dir(arch))
    joined = arch in JOINED
    assert joinable(engine.model) is joined is family_of(engine.model.config.model_type).batched
    _check(engine, joined, monkeypatch)


def test_mistral_with_a_sliding_window_is_decoded_one_request_at_a_time(tiny_model_dir, tmp_path, monkeypatch):
    """Mistral's cache is joined without a window (the tiny model, Mistral v0.2 and later) and not with one (v0.1:
    4096): the batcher reads the cache the config makes, not the family's name."""
    path = shutil.copytree(tiny_model_dir("mistral"), tmp_path / "mistral-window")
    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    (path / "config.json").write_text(json.dumps({**cfg, "sliding_window": 8}), encoding="utf-8")
    _check(_engine(path), False, monkeypatch)


def test_joining_a_cache_of_sliding_window_or_linear_attention_layers_would_fail(tiny_model_dir, monkeypatch):
    """Why those families decode one request at a time: forced to join a running batch, their requests fail (Gemma
    3's window-sized cache does not line up with the joined mask; Qwen3.5's linear-attention state has no keys)."""
    for arch in ("gemma3", "qwen3_5"):
        engine = _engine(tiny_model_dir(arch))
        monkeypatch.setattr(engine.batcher, "joinable", True)
        results, _ = _together(engine, _requests(engine), monkeypatch)
        assert any(isinstance(r, Exception) for r in results), arch


def test_a_failure_while_joining_the_caches_fails_the_joiners_too(tiny_model_dir, monkeypatch):
    """Regression: an error while joining the newcomers' cache to the running batch's (e.g. out of memory in the
    concatenation) failed the running requests but left the newcomers waiting forever, neither queued nor in the
    batch. Now they get the error too, and the next requests are served."""
    from domaintune.inference import batching

    engine = _engine(tiny_model_dir("qwen2"))
    requests = _requests(engine)
    want = _stream(engine, *requests[0])
    join = batching.join_rows

    def failing(*a, **kw):
        raise RuntimeError("out of memory (simulated) while joining")

    monkeypatch.setattr(batching, "join_rows", failing)
    solo = [_stream(engine, *r) for r in requests]
    results, _ = _together(engine, requests, monkeypatch)  # fails the test if a request is left waiting
    failed = [r for r in results if isinstance(r, RuntimeError) and "simulated" in str(r)]
    # the running request and the first joiner(s) got the error; one that came after it ran alone, as it would
    assert len(failed) >= 2 and all(r in failed or r == s for r, s in zip(results, solo, strict=True)), results
    monkeypatch.setattr(batching, "join_rows", join)
    assert _stream(engine, *requests[0]) == want
    status = engine.batch_status()
    assert (status["running"], status["queued"], status["failed"]) == (0, 0, len(failed))


def test_the_table_of_joined_families_is_the_family_records():
    assert JOINED <= set(ARCHS)
    assert {a for a in ARCHS if family_named(TINY[a].family).batched} == JOINED


def test_streamed_deltas_add_up_to_the_final_text_with_byte_fallback(tiny_model_dir):
    from domaintune.inference.streaming import TextDeltas

    engine = Engine.from_run(tiny_model_dir("mistral"), template="chatml", device="cpu")
    tok = engine.tokenizer
    ids = tok.convert_tokens_to_ids(["<0x32>", "<0x85>"])  # "2", then a lone UTF-8 continuation byte
    assert engine.decode(ids[:1]) == "2" and engine.decode(ids) == "\ufffd\ufffd"  # the run decodes as a whole
    deltas, state = TextDeltas(engine, engine.batcher.concatenative), StreamState()
    sent = deltas.feed(ids[:1]) + deltas.feed(ids)
    sent += deltas.finish(ids, 10, state)
    assert sent == state.text
    # A token that is not a byte closes the run: its text is sent then, never changed later.
    word = tok("hello", add_special_tokens=False)["input_ids"]
    ids2 = ids + word
    deltas, state = TextDeltas(engine, engine.batcher.concatenative), StreamState()
    early = [deltas.feed(ids2[:k]) for k in range(1, len(ids2) + 1)]
    assert early[:2] == ["", ""] and "".join(early) == engine.decode(ids2)
    assert "".join(early) + deltas.finish(ids2, 10, state) == state.text
