"""inference.engine.Engine: batching and streaming change nothing about what greedy decoding or beam search produces."""
from __future__ import annotations

import pytest

from domaintune.data.examples import load_examples
from domaintune.inference.engine import Engine
from domaintune.inference.params import GenerationParams

ARCHS = ("qwen2", "llama", "bloom")


def _scramble(model) -> None:
    """Re-draw the weights with a large std. A freshly initialised tiny model with tied embeddings mostly
    echoes its last input token (":::::"), which would make "same tokens" comparisons nearly trivial."""
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    out = {}
    for arch in ARCHS:
        engine = Engine.from_run(tiny_model_dir(arch), template="domain_zh", device="cpu")
        _scramble(engine.model)
        out[arch] = engine
    return out


def _prompts(engine: Engine, sample_data) -> list[list[int]]:
    examples = load_examples(sample_data / "test.jsonl", require_answer=False, template=engine.template)
    msgs = [ex.prompt_and_target()[0] for ex in examples[:5]]
    msgs.append([{"role": "user", "content": "你好"}])  # a much shorter prompt: more left padding in its batch
    msgs.append([{"role": "user", "content": "问"}, {"role": "assistant", "content": "答" * 30},
                 {"role": "user", "content": examples[0].messages[0]["content"]}])  # a much longer one
    return [engine.encode_messages(m) for m in msgs]


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_greedy_equals_one_at_a_time(engines, sample_data, arch):
    import torch

    engine = engines[arch]
    prompts = _prompts(engine, sample_data)
    assert len({len(p) for p in prompts}) >= 4  # padding really happens inside the batches of 4
    params = GenerationParams(max_new_tokens=12)
    batched = engine.generate(prompts, params, batch_size=4)
    single = engine.generate(prompts, params, batch_size=1)
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.prompt_tokens for g in batched] == [len(p) for p in prompts]
    assert len({t for g in single for t in g.token_ids}) > 10  # varied output, not one repeated token

    # The comparison has teeth: the same padded batch without its attention mask decodes differently.
    pad = engine.tokenizer.pad_token_id
    batch = sorted(prompts, key=len)[-4:]
    width = max(map(len, batch))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
    out = engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                do_sample=False, eos_token_id=engine.stop_ids, pad_token_id=pad)
    by_prompt = {tuple(p): g.token_ids for p, g in zip(prompts, single, strict=True)}
    assert any(out[i, width:].tolist() != by_prompt[tuple(p)] for i, p in enumerate(batch))


# ---------------------------------------------------------------- beam search

def _beam_prompts(engine: Engine, sample_data) -> list[list[int]]:
    """`_prompts` with one more very short prompt: 8 prompts of clearly different lengths, one batch of 8."""
    prompts = _prompts(engine, sample_data) + [engine.encode_messages([{"role": "user", "content": "好"}])]
    assert len(prompts) == 8
    return prompts


def _same_batched_and_alone(engine: Engine, prompts: list[list[int]], params: GenerationParams) -> list:
    """Generate `prompts` as one left-padded batch of 8 and each prompt alone; assert every field matches."""
    batched = engine.generate(prompts, params, batch_size=8)
    single = engine.generate(prompts, params, batch_size=1)
    for i, (b, s) in enumerate(zip(batched, single, strict=True)):
        assert (b.token_ids, b.text, b.finish_reason) == (s.token_ids, s.text, s.finish_reason), \
            f"prompt {i} ({len(prompts[i])} tokens)"
        assert b.prompt_tokens == s.prompt_tokens == len(prompts[i])
    return single


@pytest.mark.parametrize("num_beams", [2, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_batched_beam_search_equals_one_at_a_time(engines, sample_data, arch, num_beams):
    engine = engines[arch]
    prompts = _beam_prompts(engine, sample_data)
    lens = sorted(map(len, prompts))
    assert len(set(lens)) >= 6 and lens[-1] >= 3 * lens[0]  # much left padding in the one batch of 8
    params = GenerationParams(max_new_tokens=12, num_beams=num_beams, do_sample=False)
    single = _same_batched_and_alone(engine, prompts, params)
    assert len({t for g in single for t in g.token_ids}) > 10  # varied output, not one repeated token
    # random weights never say EOS: every beam answer runs to max_new_tokens
    assert all(len(g.token_ids) == 12 and g.finish_reason == "length" for g in single)
    # beam search really ran: it differs from greedy decoding on some prompt
    greedy = engine.generate(prompts, GenerationParams(max_new_tokens=12), batch_size=8)
    assert any(g.token_ids != s.token_ids for g, s in zip(greedy, single, strict=True))


def _most_cutting(engine: Engine, prompts: list[list[int]], params: GenerationParams, candidates, make):
    """Of `candidates`, the one whose engine (`make(candidate)`) ends the most of `prompts`' beam answers with
    reason "stop" (one batched run each), and that engine. Random weights never say EOS, and beam search may
    prefer a hypothesis running to max_new_tokens over one that stops, so some stops cut nothing."""
    best = max(candidates, key=lambda c: sum(g.finish_reason == "stop" for g in
                                             make(c).generate(prompts, params, batch_size=8)))
    return best, make(best)


@pytest.mark.parametrize("arch", ARCHS)
def test_stop_ids_cut_beam_outputs_batched_as_alone(engines, sample_data, arch, monkeypatch):
    """A stop token ends a beam hypothesis: no answer holds a stop token, some end early with reason
    "stop", and the batch of 8 still gives exactly what each prompt gives alone."""
    from collections import Counter

    engine = engines[arch]
    prompts = _beam_prompts(engine, sample_data)
    params = GenerationParams(max_new_tokens=12, num_beams=4)
    full = engine.generate(prompts, params, batch_size=8)
    base = list(engine.stop_ids)
    common = [t for t, _ in Counter(t for g in full for t in g.token_ids[2:]).most_common(8)]

    def make(t: int) -> Engine:
        monkeypatch.setattr(engine, "stop_ids", base + [t])
        return engine

    stop, engine = _most_cutting(engine, prompts, params, common, make)
    single = _same_batched_and_alone(engine, prompts, params)
    assert all(stop not in g.token_ids and g.text == engine.decode(g.token_ids) for g in single)
    assert sum(g.finish_reason == "stop" for g in single) >= 1
    assert all(len(g.token_ids) < 12 for g in single if g.finish_reason == "stop")
    assert all(g.finish_reason == "length" for g in single if len(g.token_ids) == 12)


def _multi_token_pieces(engine: Engine, gens: list) -> list[str]:
    """Pieces of the answers in `gens` that `_multi_token_stop` would pick, one per answer where there is one."""
    pieces = []
    for g in gens:
        try:
            pieces.append(_multi_token_stop(engine, g.token_ids, g.text))
        except AssertionError:
            pass
    return list(dict.fromkeys(pieces))


@pytest.mark.parametrize("arch", ARCHS)
def test_stop_strings_cut_beam_outputs_batched_as_alone(engines, sample_data, arch):
    """A multi-token stop string ends a beam hypothesis too (a stopping criterion; then the text is cut before
    it), and the batch of 8 still gives exactly what each prompt gives alone."""
    from domaintune.data.templates import Template

    base = engines[arch]
    prompts = _beam_prompts(base, sample_data)
    params = GenerationParams(max_new_tokens=12, num_beams=4)
    full = base.generate(prompts, params, batch_size=8)

    def make(stop: str) -> Engine:
        return Engine(base.model, base.tokenizer, Template.from_dict({**base.template.to_dict(), "stop": [stop]}), "m")

    stop, engine = _most_cutting(base, prompts, params, _multi_token_pieces(base, full), make)
    assert engine.stop_ids == base.stop_ids  # not a token: only the text can be cut
    single = _same_batched_and_alone(engine, prompts, params)
    assert all(stop not in g.text for g in single)
    cut = [g for g in single if g.finish_reason == "stop"]
    assert cut  # ids run up to the token that completed the stop string
    assert all(stop in engine.decode(g.token_ids) and engine.decode(g.token_ids).startswith(g.text) for g in cut)


def test_streaming_refuses_beam_search(engines):
    from domaintune.errors import UserError

    engine = engines["qwen2"]
    prompt = engine.encode_messages([{"role": "user", "content": "你好"}])
    with pytest.raises(UserError, match=r"not beam search \(num_beams > 1\)"):
        next(engine.stream(prompt, GenerationParams(max_new_tokens=4, num_beams=2)))


def test_llama_prompt_starts_with_bos_and_pads_with_unk(engines):
    engine = engines["llama"]
    ids = engine.encode_messages([{"role": "user", "content": "你好"}])
    assert ids[0] == engine.tokenizer.bos_token_id
    assert ids.count(engine.tokenizer.bos_token_id) == 1
    # The tiny LLaMA tokenizer ships without a pad token; the loader pads with <unk>, never with EOS.
    assert engine.tokenizer.pad_token == "<unk>"
    assert engines["qwen2"].encode_messages([{"role": "user", "content": "你好"}])[0] != \
        engines["qwen2"].tokenizer.bos_token_id


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_stream_concatenation_equals_generate(engines, sample_data, arch):
    from domaintune.inference.engine import StreamState

    engine = engines[arch]
    params = GenerationParams(max_new_tokens=16)
    for prompt in _prompts(engine, sample_data)[:3]:
        [gen] = engine.generate([prompt], params)
        state = StreamState()
        deltas = list(engine.stream(prompt, params, state=state))
        assert "".join(deltas) == gen.text == state.text
        assert all(deltas)  # no empty deltas
        assert state.token_ids == gen.token_ids
        assert gen.finish_reason == state.finish_reason == "length"  # random weights never say EOS in 16 tokens
        assert len(gen.token_ids) == 16 and state.prompt_tokens == len(prompt)


def test_stop_token_ends_generation_with_reason_stop(engines, sample_data, monkeypatch):
    from domaintune.inference.engine import StreamState

    engine = engines["qwen2"]
    prompt = _prompts(engine, sample_data)[0]
    params = GenerationParams(max_new_tokens=16)
    [full] = engine.generate([prompt], params)
    k = next(i for i in range(3, 16) if full.token_ids[i] not in full.token_ids[:i])
    monkeypatch.setattr(engine, "stop_ids", engine.stop_ids + [full.token_ids[k]])
    [cut] = engine.generate([prompt], params)
    assert cut.token_ids == full.token_ids[:k]
    assert cut.finish_reason == "stop"
    assert cut.text == engine.decode(full.token_ids[:k])
    state = StreamState()
    assert "".join(engine.stream(prompt, params, state=state)) == cut.text
    assert state.finish_reason == "stop" and state.token_ids == cut.token_ids
    # In a batch, a row that stops early is cut at its stop token, the others run on.
    other = _prompts(engine, sample_data)[1]
    [a, b] = engine.generate([prompt, other], params, batch_size=2)
    assert a.token_ids == cut.token_ids and a.finish_reason == "stop"
    [b_alone] = engine.generate([other], params)
    assert b.token_ids == b_alone.token_ids


def test_prompt_too_long_for_the_context_is_refused(engines):
    from domaintune.errors import UserError

    engine = engines["qwen2"]
    with pytest.raises(UserError, match=r"exceeds the model's context of 2048 tokens"):
        engine.generate([[5] * 2040], GenerationParams(max_new_tokens=16))


def test_run_system_prompt_is_applied_like_training(tiny_run_copy):
    """A run trained with data.system builds inference prompts with that system message (regression:
    chat/serve used to drop it)."""
    import yaml

    from domaintune.inference.engine import Engine

    cfg = yaml.safe_load((tiny_run_copy / "config.yaml").read_text(encoding="utf-8"))
    cfg["data"]["system"] = "你是家庭教育顾问。"
    (tiny_run_copy / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    engine = Engine.from_run(tiny_run_copy)
    user = [{"role": "user", "content": "孩子不爱吃饭怎么办？"}]
    explicit = [{"role": "system", "content": "你是家庭教育顾问。"}] + user
    assert engine.encode_messages(user) == \
        engine.template.encode(engine.tokenizer, explicit, add_generation_prompt=True)[0]
    assert engine.decode(engine.encode_messages(user)).startswith("你是家庭教育顾问。")
    # an explicit system message wins
    other = [{"role": "system", "content": "Be brief."}] + user
    assert engine.decode(engine.encode_messages(other)).startswith("Be brief.")


def test_base_only_on_a_plain_model_directory_is_refused(tiny_model_dir):
    import pytest as _pytest

    from domaintune.errors import UserError
    from domaintune.inference.engine import Engine

    with _pytest.raises(UserError, match="--base-only needs a training run directory"):
        Engine.from_run(tiny_model_dir("qwen2"), base_only=True, template="domain_zh")


# ---------------------------------------------------------------- stop strings

def _multi_token_stop(engine, ids: list[int], text: str) -> str:
    """A piece of `text` that the tokenizer spells in several tokens and that is no single vocabulary
    entry, so it can only be honoured as a string (like `<|im_end|>` on a tokenizer without ChatML)."""
    tok = engine.tokenizer
    for k in range(3, len(ids) - 3):
        s = engine.decode(ids[k: k + 3])
        if (len(s) >= 2 and "\ufffd" not in s and s.strip() == s and s in text
                and len(tok(s, add_special_tokens=False)["input_ids"]) >= 2
                and tok.convert_tokens_to_ids(s) in (None, tok.unk_token_id)):
            return s
    raise AssertionError("no multi-token piece in the output")


@pytest.mark.parametrize("arch", ["qwen2", "bloom"])
def test_multi_token_stop_string_cuts_generate_and_stream(engines, sample_data, arch, monkeypatch):
    """Regression: only single-token template stops were honoured; ChatML on a tokenizer without the ChatML
    specials ended every answer with a literal '<|im_end|>'."""
    from domaintune.data.templates import Template
    from domaintune.inference.engine import StreamState

    base = engines[arch]
    prompt, other = _prompts(base, sample_data)[:2]
    params = GenerationParams(max_new_tokens=20)
    [full] = base.generate([prompt], params)
    stop = _multi_token_stop(base, full.token_ids, full.text)
    tpl = Template.from_dict({**base.template.to_dict(), "stop": [stop]})
    engine = Engine(base.model, base.tokenizer, tpl, "m")
    assert engine.stop_ids == base.stop_ids  # not a token: only the text can be cut
    want_text = full.text[: full.text.index(stop)]
    j = next(n for n in range(1, 21) if stop in engine.decode(full.token_ids[:n]))

    lengths = []  # generated lengths: the batch stops as soon as the stop string is complete
    real_generate = engine.model.generate

    def spy(*a, **kw):
        out = real_generate(*a, **kw)
        lengths.append(out.shape[1] - kw["input_ids"].shape[1])
        return out

    monkeypatch.setattr(engine.model, "generate", spy)
    [cut] = engine.generate([prompt], params)
    assert (cut.text, cut.finish_reason, cut.token_ids) == (want_text, "stop", full.token_ids[:j])
    assert stop not in cut.text and lengths == [j] and j < 20

    state = StreamState()
    deltas = list(engine.stream(prompt, params, state=state))
    assert "".join(deltas) == want_text == state.text and all(deltas)
    assert (state.finish_reason, state.token_ids) == ("stop", cut.token_ids)

    # in a batch, each row is cut on its own; the other row is what it is alone
    [a, b] = engine.generate([prompt, other], params, batch_size=2)
    [b_alone] = engine.generate([other], params)
    assert (a.text, a.token_ids, a.finish_reason) == (cut.text, cut.token_ids, "stop")
    assert (b.text, b.token_ids, b.finish_reason) == (b_alone.text, b_alone.token_ids, b_alone.finish_reason)


def test_stop_scanner_equals_cutting_the_whole_text():
    import random

    from domaintune.inference.stops import StopScanner, find_stop

    rng = random.Random(0)
    stops = ["<|im_end|>", "END", "##"]
    for _ in range(300):
        text = "".join(rng.choice(["a", "b", "<|im_", "end|>", "<|", "E", "N", "D", "#", " "]) for _ in range(12))
        cuts = sorted(rng.sample(range(1, len(text)), 4))
        s = StopScanner(stops)
        got = "".join(s.feed(text[i:j]) for i, j in zip([0] + cuts, cuts + [len(text)], strict=True)) + s.flush()
        k = find_stop(text, stops)
        assert got == (text if k < 0 else text[:k]) and s.hit == (k >= 0), text


# ---------------------------------------------------------------- teacher-forced loss

def _plain_loss(engine, samples) -> tuple[float, int]:
    """The straightforward computation: one padded batch, full-vocabulary logits, float cross-entropy."""
    import torch

    pad = engine.tokenizer.pad_token_id
    width = max(len(x["input_ids"]) for x in samples)
    ids = torch.tensor([x["input_ids"] + [pad] * (width - len(x["input_ids"])) for x in samples])
    attn = torch.tensor([[1] * len(x["input_ids"]) + [0] * (width - len(x["input_ids"])) for x in samples])
    labels = torch.tensor([x["labels"] + [-100] * (width - len(x["labels"])) for x in samples])
    with torch.inference_mode():
        logits = engine.model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    tgt = labels[:, 1:]
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                              ignore_index=-100, reduction="sum")
    count = int((tgt != -100).sum())
    return total.item() / count, count


def _loss_samples(engine, sample_data) -> list[dict]:
    from domaintune.data.encode import encode_example

    examples = load_examples(sample_data / "test.jsonl", require_answer=False, template=engine.template)[:4]
    examples += load_examples(sample_data / "chat.jsonl", require_answer=False, template=engine.template)[:2]
    samples = [encode_example(ex, engine.tokenizer, engine.template, 512)[0] for ex in examples]
    return [s for s in samples if s is not None]


@pytest.mark.parametrize("arch", ARCHS)
def test_score_samples_keeps_only_the_needed_logits_and_equals_the_plain_loss(engines, sample_data, arch, monkeypatch):
    """Regression: the target loss built full-vocabulary logits (plus a float copy) for a whole batch, ~12 GB
    for BLOOM's 250k vocabulary at 8 x 1024 tokens. Now each sample asks for the logits from the position
    before its first target token only; the value is the plain computation's."""
    import math

    from domaintune.evaluation import loss as scoring

    engine = engines[arch]
    samples = _loss_samples(engine, sample_data)
    assert len(samples) >= 5
    want, count = _plain_loss(engine, samples)
    calls = []
    hook = engine.model.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append((kwargs.get("logits_to_keep"), tuple(out.logits.shape))),
        with_kwargs=True)
    try:
        got = engine.score_samples(samples)
        monkeypatch.setattr(scoring, "_accepts_logits_to_keep", lambda model: False)
        fallback = engine.score_samples(samples)  # a forward without logits_to_keep: full logits, same value
    finally:
        hook.remove()
    assert got["target_tokens"] == fallback["target_tokens"] == count
    assert got["loss"] == pytest.approx(want, abs=2e-5) and fallback["loss"] == pytest.approx(want, abs=2e-5)
    assert got["perplexity"] == pytest.approx(math.exp(want), rel=1e-4)
    vocab = engine.model.config.vocab_size
    kept = []
    for x in samples:
        first = next(t for t in range(1, len(x["labels"])) if x["labels"][t] != -100)
        kept.append((len(x["input_ids"]) - first + 1, (1, len(x["input_ids"]) - first + 1, vocab)))
    assert calls[: len(samples)] == kept
    # the prompt's logits are never built
    assert all(n < len(x["input_ids"]) for (n, _), x in zip(kept, samples, strict=True))
    assert calls[len(samples):] == [(None, (1, len(x["input_ids"]), vocab)) for x in samples]


def test_score_samples_passes_logits_to_keep_through_a_lora_adapter(tiny_run, sample_data):
    engine = Engine.from_run(tiny_run, device="cpu")
    assert type(engine.model).__name__.startswith("Peft")
    # what predict needs from the run comes from the engine (config.yaml is read once, by from_run)
    assert (engine.run_config.data.template, engine.cutoff_len, engine.default_system) == ("domain_zh", 512, None)
    samples = _loss_samples(engine, sample_data)[:3]
    shapes = []
    hook = engine.model.get_base_model().register_forward_hook(
        lambda mod, args, kwargs, out: shapes.append((kwargs.get("logits_to_keep"), out.logits.shape[1])),
        with_kwargs=True)
    try:
        got = engine.score_samples(samples)
    finally:
        hook.remove()
    assert all(k is not None and n == k for k, n in shapes) and len(shapes) == 3
    assert got["loss"] == pytest.approx(_plain_loss(engine, samples)[0], abs=2e-5)


# ---------------------------------------------------------------- loading helpers

def test_plain_model_directory_has_no_run_config(engines):
    engine = engines["qwen2"]
    assert engine.run_config is None and engine.cutoff_len == engine.context_len == 2048


def test_resolve_template_order(tmp_path, qwen_tok):
    from domaintune.data.templates import get_template
    from domaintune.errors import UserError
    from domaintune.rundir import resolve_template

    assert resolve_template(tmp_path, qwen_tok, "alpaca").name == "alpaca"
    assert resolve_template(tmp_path, qwen_tok).kind == "tokenizer"  # no template.json: the chat_template
    light = resolve_template(tmp_path)  # no tokenizer yet: a placeholder that only joins instruction + input
    assert light.kind == "tokenizer" and light.chat_template is None
    get_template("domain_zh").save(tmp_path / "template.json")
    assert resolve_template(tmp_path, qwen_tok).name == "domain_zh" == resolve_template(tmp_path).name
    assert resolve_template(tmp_path, qwen_tok, "chatml").name == "chatml"  # an explicit name wins
    (tmp_path / "template.json").unlink()

    class NoChat:
        chat_template = None

    with pytest.raises(UserError, match=r"has no template.json and its tokenizer no chat_template: pass --template"):
        resolve_template(tmp_path, NoChat())


def test_a_checkpoint_without_template_json_uses_its_run_template(tmp_path, qwen_tok):
    """A kill right after the Trainer saved checkpoint-N (before template.json was copied in) must not make
    predict/chat fall back to the tokenizer's chat_template, which training never used."""
    from domaintune.data.templates import get_template
    from domaintune.rundir import resolve_template

    get_template("alpaca").save(tmp_path / "template.json")
    ckpt = tmp_path / "checkpoint-8"
    ckpt.mkdir()
    assert resolve_template(ckpt, qwen_tok).name == "alpaca"
    get_template("domain_zh").save(ckpt / "template.json")
    assert resolve_template(ckpt, qwen_tok).name == "domain_zh"  # its own copy wins
    other = tmp_path / "not-a-checkpoint"
    other.mkdir()
    assert resolve_template(other, qwen_tok).kind == "tokenizer"  # only checkpoint-N looks at its parent


def test_adapter_base_name(tmp_path):
    from domaintune.errors import UserError
    from domaintune.rundir import adapter_base_name

    (tmp_path / "adapter_config.json").write_text('{"base_model_name_or_path": "org/base"}')
    assert adapter_base_name(tmp_path) == "org/base"
    (tmp_path / "adapter_config.json").write_text('{"r": 8}')
    with pytest.raises(UserError, match="adapter_config.json: no base_model_name_or_path"):
        adapter_base_name(tmp_path)


def test_generation_params_validate():
    from domaintune.errors import UserError

    assert GenerationParams().validate() == GenerationParams()
    assert GenerationParams(temperature=0).validate()  # ignored without sampling
    for kw, msg in [({"max_new_tokens": 0}, "max_new_tokens must be at least 1, got 0"),
                    ({"num_beams": 0}, "num_beams must be at least 1, got 0"),
                    ({"do_sample": True, "temperature": 0.0},
                     r"temperature must be > 0 when sampling \(0 means greedy\), got 0.0"),
                    ({"top_p": 1.5}, r"top_p must lie in \(0, 1\], got 1.5"),
                    ({"top_k": -1}, r"top_k must be >= 0 \(0 = off\), got -1"),
                    ({"repetition_penalty": 0}, "repetition_penalty must be > 0, got 0")]:
        with pytest.raises(UserError, match=f"^{msg}$"):
            GenerationParams(**kw).validate()
