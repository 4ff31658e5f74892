"""generation.Engine: batching and streaming change nothing about what greedy decoding produces."""
from __future__ import annotations

import pytest

from domaintune.data import load_examples
from domaintune.generation import Engine, GenerationParams

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
    by_prompt = {tuple(p): g.token_ids for p, g in zip(prompts, single)}
    assert any(out[i, width:].tolist() != by_prompt[tuple(p)] for i, p in enumerate(batch))


def test_llama_prompt_starts_with_bos_and_pads_with_unk(engines):
    engine = engines["llama"]
    ids = engine.encode_messages([{"role": "user", "content": "你好"}])
    assert ids[0] == engine.tokenizer.bos_token_id
    assert ids.count(engine.tokenizer.bos_token_id) == 1
    # The tiny LLaMA tokenizer ships without a pad token; the loader pads with <unk>, never with EOS.
    assert engine.tokenizer.pad_token == "<unk>"
    assert engines["qwen2"].encode_messages([{"role": "user", "content": "你好"}])[0] != engines["qwen2"].tokenizer.bos_token_id


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_stream_concatenation_equals_generate(engines, sample_data, arch):
    from domaintune.generation import StreamState

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
    from domaintune.generation import StreamState

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

    from domaintune.generation import Engine

    cfg = yaml.safe_load((tiny_run_copy / "config.yaml").read_text(encoding="utf-8"))
    cfg["data"]["system"] = "你是家庭教育顾问。"
    (tiny_run_copy / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    engine = Engine.from_run(tiny_run_copy)
    user = [{"role": "user", "content": "孩子不爱吃饭怎么办？"}]
    explicit = [{"role": "system", "content": "你是家庭教育顾问。"}] + user
    assert engine.encode_messages(user) == engine.template.encode(engine.tokenizer, explicit, add_generation_prompt=True)[0]
    assert engine.decode(engine.encode_messages(user)).startswith("你是家庭教育顾问。")
    # an explicit system message wins
    other = [{"role": "system", "content": "Be brief."}] + user
    assert engine.decode(engine.encode_messages(other)).startswith("Be brief.")


def test_base_only_on_a_plain_model_directory_is_refused(tiny_model_dir):
    import pytest as _pytest

    from domaintune.errors import UserError
    from domaintune.generation import Engine

    with _pytest.raises(UserError, match="--base-only needs a training run directory"):
        Engine.from_run(tiny_model_dir("qwen2"), base_only=True, template="domain_zh")
