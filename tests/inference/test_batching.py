"""inference.batching.Batcher: streams decoded together give each request what it gets alone.

The engines are the conftest's micro models with re-drawn weights (diverse answers: a crossed row or a wrong
position would show). "Solo" is the same request streamed with nothing else running; the solo stream itself
is checked against transformers' `generate` (what predict uses), greedy and seeded sampling alike.
"""
from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

from domaintune.inference.engine import Engine, StreamState
from domaintune.inference.params import GenerationParams

ARCHS = ("llama", "qwen2", "bloom")
QUESTIONS = ["你好", "How do I help my child sleep?", "孩子不爱吃饭怎么办？请给出详细的建议，谢谢",
             "What is a good bedtime?",
             "怎样培养阅读习惯", "Tell me about homework, and about how much help a ten-year-old needs with it",
             "孩子发脾气", "Screen time rules", "问", "青春期的孩子不愿意和父母说话，家长应该怎样开始一次谈话？"]


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    import torch

    out = {}
    for arch in ARCHS:
        engine = Engine.from_run(tiny_model_dir(arch), template="domain_zh", device="cpu")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # re-drawn weights: a fresh tiny model mostly echoes its last token
            for p in engine.model.parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        out[arch] = engine
    return out


def _requests(engine: Engine) -> list[tuple[list[int], GenerationParams]]:
    """Prompts of different lengths, each with its own decoding: greedy, seeded sampling with top-k / top-p /
    temperature, a repetition penalty, and different lengths (rows leave the batch at different steps)."""
    out = []
    for i, q in enumerate(QUESTIONS):
        p = GenerationParams(max_new_tokens=6 + 5 * (i % 4), repetition_penalty=1.3 if i % 3 == 0 else 1.0)
        if i % 2:
            p = replace(p.with_temperature(0.7 + 0.1 * (i % 3)), seed=1000 + i, top_k=(0, 20, 5)[i % 3],
                        top_p=(1.0, 0.9, 0.8)[i % 3])
        out.append((engine.encode_messages([{"role": "user", "content": q}]), p))
    return out


def _stream(engine: Engine, prompt: list[int], params: GenerationParams,
            stop_event: threading.Event | None = None) -> tuple[str, StreamState]:
    state = StreamState()
    text = "".join(engine.stream(prompt, params, stop_event=stop_event, state=state))
    return text, state


class _Watch:
    """Records the batch size at every decode step and checks the cache's shape after every removal."""

    def __init__(self, batcher, monkeypatch):
        self.sizes: list[int] = []
        decode, drop = batcher._decode, batcher._drop

        def watched_decode():
            self.sizes.append(len(batcher.rows))
            decode()

        def watched_drop(indices):
            drop(indices)
            if batcher.rows:  # no leading column is padding in every row, and the cache matches the mask
                assert bool(batcher.mask[:, 0].any())
                assert batcher.cache.layers[0].keys.shape[2] == batcher.mask.shape[1]
                assert batcher.cache.layers[0].keys.shape[0] == len(batcher.rows)

        monkeypatch.setattr(batcher, "_decode", watched_decode)
        monkeypatch.setattr(batcher, "_drop", watched_drop)


def _run_together(engine: Engine, requests, stagger: bool) -> list[tuple[str, StreamState]]:
    """Stream every request from its own thread; with `stagger`, the second half starts after the first half
    decoded a few steps (they join a running batch whose cache is longer or shorter than theirs)."""
    results: list = [None] * len(requests)

    def work(i):
        results[i] = _stream(engine, *requests[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    half = len(threads) // 2 if stagger else len(threads)
    steps = engine.batch_status()["steps"]
    for t in threads[:half]:
        t.start()
    if stagger:
        deadline = time.time() + 30
        while engine.batch_status()["steps"] < steps + 4:
            assert time.time() < deadline
            time.sleep(0.001)
        for t in threads[half:]:
            t.start()
    for t in threads:
        t.join(60)
    return results


@pytest.mark.parametrize("arch", ARCHS)
def test_solo_streams_equal_generate_greedy_and_seeded(engines, arch):
    engine = engines[arch]
    for prompt, params in _requests(engine)[:6]:
        text, state = _stream(engine, prompt, params)
        [gen] = engine.generate([prompt], params, batch_size=1)  # transformers' generate, after manual_seed(seed)
        assert (text, state.token_ids, state.finish_reason) == (gen.text, gen.token_ids, gen.finish_reason)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("stagger", [False, True])
def test_concurrent_streams_each_equal_their_solo_answer(engines, arch, stagger, monkeypatch):
    engine = engines[arch]
    requests = _requests(engine)
    solo = [_stream(engine, p, params) for p, params in requests]
    assert len({t for t, _ in solo}) == len(requests)  # distinct answers: a crossed row would show
    watch = _Watch(engine.batcher, monkeypatch)
    together = _run_together(engine, requests, stagger)
    for (text, state), (want_text, want) in zip(together, solo, strict=True):
        assert text == want_text == state.text
        assert (state.token_ids, state.finish_reason, state.prompt_tokens) == \
            (want.token_ids, want.finish_reason, want.prompt_tokens)
    assert max(watch.sizes) >= len(requests) // 2  # they were decoded together
    status = engine.batch_status()
    assert (status["running"], status["queued"]) == (0, 0)


def test_openai_penalties_apply_per_request_in_a_batch(engines, monkeypatch):
    """presence/frequency penalties and logit_bias are each request's own: mixed with plain requests in one batch,
    every answer equals its solo stream, and the solo stream equals transformers' generate with the same
    processor (greedy and seeded sampling)."""
    from domaintune.inference.params import RequestParams

    engine = engines["llama"]
    requests = []
    for i, (prompt, params) in enumerate(_requests(engine)[:8]):
        extra = [{}, {"frequency_penalty": 2.0}, {"presence_penalty": 2.0, "logit_bias": ((5, 30.0), (17, -100.0))},
                 {"frequency_penalty": -2.0, "presence_penalty": 0.5, "logit_bias": ((40 + i, 100.0),)}][i % 4]
        requests.append((prompt, RequestParams(**{**params.__dict__, **extra})))
    solo = [_stream(engine, p, params) for p, params in requests]
    for (prompt, params), (text, state) in zip(requests, solo, strict=True):
        [gen] = engine.generate([prompt], params, batch_size=1)
        assert (text, state.token_ids) == (gen.text, gen.token_ids)
    plain = [_stream(engine, p, GenerationParams(**{k: v for k, v in params.__dict__.items()
                                                    if k in GenerationParams.__dataclass_fields__}))[0]
             for p, params in requests]
    changed = [a != b for a, b in zip(plain, [t for t, _ in solo], strict=True)]
    assert changed[3] and changed[7] and sum(changed) >= 4, changed  # the penalties changed them
    watch = _Watch(engine.batcher, monkeypatch)
    together = _run_together(engine, requests, stagger=True)
    assert [(t, s.token_ids) for t, s in together] == [(t, s.token_ids) for t, s in solo]
    assert max(watch.sizes) >= 4


def test_max_batch_size_bounds_the_batch_and_the_rest_wait(engines, monkeypatch):
    engine = engines["qwen2"]
    requests = _requests(engine)
    solo = [_stream(engine, p, params)[0] for p, params in requests]
    monkeypatch.setattr(engine, "max_batch_size", 3)
    watch = _Watch(engine.batcher, monkeypatch)
    together = [t for t, _ in _run_together(engine, requests, stagger=False)]
    assert together == solo
    assert max(watch.sizes) == 3


def test_a_stopped_request_leaves_at_the_next_step_and_its_place_is_taken(engines, monkeypatch):
    engine = engines["llama"]
    monkeypatch.setattr(engine, "max_batch_size", 2)
    (p1, _), (p2, _), (p3, _) = _requests(engine)[:3]
    long = GenerationParams(max_new_tokens=400)
    short = GenerationParams(max_new_tokens=12)
    want2, want3 = _stream(engine, p2, short)[0], _stream(engine, p3, short)[0]

    stop = threading.Event()
    first = StreamState()
    got: dict = {}
    it = engine.stream(p1, long, stop_event=stop, state=first)
    head = next(it)  # request 1 is running
    t2 = threading.Thread(target=lambda: got.__setitem__(2, _stream(engine, p2, short)[0]))
    t3 = threading.Thread(target=lambda: got.__setitem__(3, _stream(engine, p3, short)[0]))
    t2.start()
    deadline = time.time() + 30
    while engine.batch_status()["running"] < 2:
        assert time.time() < deadline
    t3.start()
    while engine.batch_status()["queued"] < 1 and t3.is_alive():
        assert time.time() < deadline
    t2.join(30)
    # request 2 finished: its place went to request 3; request 1 still runs
    t3.join(30)
    assert got == {2: want2, 3: want3}
    assert len(first.token_ids) < 400
    stop.set()
    text = head + "".join(it)  # ends at the next step
    assert first.finish_reason == "stop" and len(first.token_ids) < 400
    assert text == first.text == engine.decode(first.token_ids)
    status = engine.batch_status()
    assert (status["running"], status["queued"]) == (0, 0) and status["stopped"] >= 1


def test_a_request_whose_client_left_while_queued_never_runs(engines, monkeypatch):
    engine = engines["llama"]
    monkeypatch.setattr(engine, "max_batch_size", 1)
    (p1, _), (p2, _) = _requests(engine)[:2]
    it = engine.stream(p1, GenerationParams(max_new_tokens=300))
    next(it)
    stop, state = threading.Event(), StreamState()
    waiting = threading.Thread(target=lambda: list(engine.stream(p2, GenerationParams(max_new_tokens=50), stop, state)))
    before = engine.batch_status()["stopped"]
    stop.set()
    waiting.start()  # submitted with its stop event already set: dropped when its turn comes
    it.close()  # request 1's consumer went away: it stops too
    waiting.join(30)
    assert not waiting.is_alive()
    deadline = time.time() + 30
    while engine.batch_status()["running"]:  # request 1 leaves at the batcher's next step
        assert time.time() < deadline
        time.sleep(0.001)
    assert engine.batch_status()["stopped"] == before + 2
    assert (state.token_ids, state.text, state.prompt_tokens) == ([], "", len(p2))


def test_a_failing_step_fails_its_requests_and_the_next_requests_run(engines, monkeypatch):
    engine = engines["bloom"]
    prompt, params = _requests(engine)[0]
    want = _stream(engine, prompt, params)[0]
    batcher = engine.batcher
    forward = batcher._forward
    calls = {"n": 0}

    def failing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return forward(*a, **kw)

    monkeypatch.setattr(batcher, "_forward", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        _stream(engine, prompt, params)
    assert _stream(engine, prompt, params)[0] == want
    assert engine.batch_status()["failed"] >= 1


def _stream_within(engine: Engine, prompt, params, seconds: float = 30.0) -> tuple[str, StreamState | Exception]:
    """_stream in a thread that must end within `seconds` (a request left waiting forever fails the test)."""
    out: dict = {}

    def work():
        try:
            out["result"] = _stream(engine, prompt, params)
        except Exception as e:  # noqa: BLE001 - the test looks at it
            out["result"] = ("", e)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "the request was left waiting"
    return out["result"]


def test_a_worker_that_fails_outside_a_step_fails_its_requests_and_the_next_ones_run(engines, monkeypatch):
    """Regression: an exception in the worker's loop outside the guarded step (here: handing items over) killed
    the thread; its requests and every later one waited forever, since no new worker was ever started."""
    from domaintune.inference.batching import WorkerCrash

    engine = engines["llama"]
    prompt, params = _requests(engine)[0]
    want = _stream(engine, prompt, params)[0]
    batcher = engine.batcher
    flush, calls = batcher._flush, {"n": 0}

    def failing():
        calls["n"] += 1
        if calls["n"] == 3:
            raise ValueError("injected")
        flush()

    monkeypatch.setattr(batcher, "_flush", failing)
    failed_before = engine.batch_status()["failed"]
    _, error = _stream_within(engine, prompt, params)
    assert isinstance(error, WorkerCrash)
    assert str(error).startswith("the generation worker failed (ValueError: injected); this request was stopped")
    assert isinstance(error.__cause__, ValueError)
    assert _stream_within(engine, prompt, params)[0] == want  # a worker serves the next request
    status = engine.batch_status()
    assert (status["running"], status["queued"], status["failed"]) == (0, 0, failed_before + 1)
    deadline = time.time() + 10
    while engine.lock.locked():  # the worker leaves the model once the batch is empty
        assert time.time() < deadline
        time.sleep(0.01)


def test_a_worker_that_keeps_failing_fails_the_queue_too_and_a_later_request_starts_a_new_one(engines, monkeypatch):
    """A loop that fails at every step (no step completes): the running request and the queued ones all get
    the error (none waits forever); once the fault is gone, the next request is served."""
    from domaintune.inference.batching import WorkerCrash

    engine = engines["qwen2"]
    monkeypatch.setattr(engine, "max_batch_size", 1)
    requests = _requests(engine)[:4]
    want = _stream(engine, *requests[0])[0]
    batcher = engine.batcher
    flush = batcher._flush

    def broken():
        raise OSError("injected")

    monkeypatch.setattr(batcher, "_flush", broken)
    results: list = [None] * len(requests)

    def work(i):
        results[i] = _stream_within(engine, *requests[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(isinstance(err, WorkerCrash) and "OSError: injected" in str(err) for _, err in results)
    deadline = time.time() + 10
    while batcher.thread is not None:  # the worker gave up and ended
        assert time.time() < deadline
        time.sleep(0.01)
    monkeypatch.setattr(batcher, "_flush", flush)
    assert _stream_within(engine, *requests[0])[0] == want
    assert engine.batch_status()["queued"] == 0


def test_a_model_whose_cache_cannot_be_joined_decodes_one_request_at_a_time(engines, monkeypatch):
    engine = engines["qwen2"]
    requests = _requests(engine)[:4]
    solo = [_stream(engine, p, params)[0] for p, params in requests]
    monkeypatch.setattr(engine.batcher, "joinable", False)
    watch = _Watch(engine.batcher, monkeypatch)
    assert engine.batch_status()["max_batch_size"] == 1
    assert [t for t, _ in _run_together(engine, requests, stagger=False)] == solo
    assert set(watch.sizes) == {1}


def test_a_failing_prefill_fails_only_the_joiners(engines, monkeypatch):
    """E.g. out of memory on a newcomer's long prompt: the running batch and the queue go on."""
    engine = engines["llama"]
    (p1, _), (p2, _), (p3, _) = _requests(engine)[:3]
    long, short = GenerationParams(max_new_tokens=60), GenerationParams(max_new_tokens=8)
    want1, want3 = _stream(engine, p1, long)[0], _stream(engine, p3, short)[0]
    batcher = engine.batcher
    forward, armed = batcher._forward, threading.Event()

    def failing(ids, *a, **kw):
        if ids.shape[1] > 1 and armed.is_set():  # a prefill, once armed
            armed.clear()
            raise RuntimeError("out of memory (simulated)")
        return forward(ids, *a, **kw)

    monkeypatch.setattr(batcher, "_forward", failing)
    first = engine.stream(p1, long)
    head = next(first)  # request 1 is running
    armed.set()
    with pytest.raises(RuntimeError, match="simulated"):
        _stream(engine, p2, short)
    assert head + "".join(first) == want1  # untouched by the failure next to it
    assert _stream(engine, p3, short)[0] == want3
    assert engine.batch_status()["failed"] >= 1


def test_an_idle_worker_ends_and_the_next_request_starts_one(engines, monkeypatch):
    from domaintune.inference import batching

    engine = engines["qwen2"]
    prompt, params = _requests(engine)[0]
    want = _stream(engine, prompt, params)[0]
    monkeypatch.setattr(batching, "IDLE_EXIT_SECONDS", 0.05)
    _stream(engine, prompt, params)
    deadline = time.time() + 10
    while engine.batcher.thread is not None:  # nothing holds the engine once idle
        assert time.time() < deadline
        time.sleep(0.01)
    assert not engine.lock.locked()
    assert _stream(engine, prompt, params)[0] == want


def test_a_lora_run_batches_through_its_adapter(tiny_run):
    """The run's adapter (a PeftModel around the base) takes the batcher's cache, mask and positions too."""
    engine = Engine.from_run(tiny_run, device="cpu")
    assert type(engine.model).__name__ == "PeftModelForCausalLM" and engine.batcher.takes_positions
    requests = _requests(engine)[:6]
    want = [engine.generate([p], params, batch_size=1)[0].text for p, params in requests]
    assert [t for t, _ in _run_together(engine, requests, stagger=False)] == want


@pytest.mark.parametrize("arch", ARCHS)
def test_long_answers_decoded_piece_by_piece_equal_the_whole_decode(engines, arch, monkeypatch):
    """Past STABLE_EVERY tokens only the text after the last whole character is decoded again; the stream and
    its final text stay those of decoding everything (broken characters included), and so does the full
    decode used for tokenizers that do not concatenate."""
    engine = engines[arch]
    assert engine.batcher.concatenative  # the tiny models' byte-level BPE
    requests = [(p, GenerationParams(max_new_tokens=250)) for p, _ in _requests(engine)[:4]]
    want = [engine.generate([p], params)[0] for p, params in requests]
    assert any("\ufffd" in g.text for g in want)  # random weights write broken characters: boundaries matter
    for concatenative in (True, False):
        monkeypatch.setattr(engine.batcher, "concatenative", concatenative)
        got = _run_together(engine, requests, stagger=False)
        assert [(t, s.text, s.token_ids) for t, s in got] == [(g.text, g.text, g.token_ids) for g in want]


def test_which_tokenizers_decode_piece_by_piece(engines):
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from domaintune.inference.kvcache import concatenative_decoding

    assert concatenative_decoding(engines["qwen2"].tokenizer)
    sentencepiece_like = Tokenizer(models.BPE())
    sentencepiece_like.decoder = decoders.Metaspace()  # drops the leading space of a piece: not concatenative
    assert not concatenative_decoding(PreTrainedTokenizerFast(tokenizer_object=sentencepiece_like))
    byte_level = Tokenizer(models.BPE())
    byte_level.decoder = decoders.ByteLevel()
    assert concatenative_decoding(PreTrainedTokenizerFast(tokenizer_object=byte_level))
    assert not concatenative_decoding(PreTrainedTokenizerFast(tokenizer_object=byte_level,
                                                              clean_up_tokenization_spaces=True))
