"""Training prompt = inference prompt for every family's official chat template, and the thinking switch of
Qwen3-style templates in predict (--thinking), chat and serve (the `chat_template_kwargs` request field, as vLLM
takes it): the prompt ids inference sends are `tokenizer.apply_chat_template(..., add_generation_prompt=True)`'s,
with enable_thinking both ways where the family has the switch."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from domaintune.data.templates import get_template
from domaintune.errors import UserError
from domaintune.families import ARCHS
from domaintune.inference.engine import EngineBase

FAMILIES = [a for a in ARCHS if a not in ("qwen2", "llama", "bloom")]
SWITCH = ("qwen3", "qwen3_moe", "qwen3_5", "glm4")
SYS = "你是一位耐心的儿科医生。"
HISTORY = [{"role": "user", "content": "孩子发烧怎么办？"}, {"role": "assistant", "content": "先量体温，多喝温水。"}]
PROMPTS = {
    "single": [{"role": "user", "content": "孩子咳嗽怎么办？"}],
    "system": [{"role": "system", "content": SYS}, {"role": "user", "content": "How do I take a temperature?"}],
    "history": [*HISTORY, {"role": "user", "content": "要去医院吗？"}],
}


def official(tok, messages, **kw) -> list[int]:
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False, **kw))


def prompt_ids(tok, template, messages, kwargs=None) -> list[int]:
    """The prompt ids predict, chat and serve send: `EngineBase.encode_messages` (no model needed)."""
    engine = SimpleNamespace(tokenizer=tok, template=template, default_system=None)
    return EngineBase.encode_messages(engine, messages, kwargs)


@pytest.mark.parametrize("case", list(PROMPTS))
@pytest.mark.parametrize("arch", FAMILIES)
def test_inference_prompt_is_the_official_generation_prompt(family_tok, arch, case):
    tok, messages = family_tok(arch), PROMPTS[case]
    if arch == "mistral" and case == "system":
        return  # refused with the template's message (tests/data/test_template_families.py)
    for mode in ("keep", "drop", "empty"):
        tpl = get_template("tokenizer", tok, thinking=mode)
        # data.thinking empty trains every answer after an empty think block, the history's too: the template's
        # own (reasoning_content "") where it renders one, else the block written before the answer
        history = [m if m["role"] != "assistant" or mode != "empty" else
                   {**m, "reasoning_content": ""} if arch in SWITCH else
                   {**m, "content": "<think>\n\n</think>\n\n" + m["content"]} for m in messages]
        assert prompt_ids(tok, tpl, messages) == official(tok, history, **tpl.chat_template_kwargs)
    tpl = get_template("tokenizer", tok)
    if arch not in SWITCH:
        for on in (True, False):
            with pytest.raises(UserError, match=f"--thinking {'on' if on else 'off'}: the template 'tokenizer' "
                                                "has no thinking switch"):
                tpl.with_thinking(on)
        with pytest.raises(UserError, match="chat_template_kwargs.enable_thinking: this model's template has no "
                                            "thinking switch"):
            tpl.check_kwargs({"enable_thinking": False})
        return
    for on in (True, False):  # --thinking on/off (predict, chat), chat_template_kwargs (serve)
        want = official(tok, messages, enable_thinking=on)
        assert prompt_ids(tok, tpl.with_thinking(on), messages) == want
        assert prompt_ids(tok, tpl, messages, tpl.check_kwargs({"enable_thinking": on})) == want
    assert official(tok, messages, enable_thinking=True) != official(tok, messages, enable_thinking=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"enable_thinking": "no"}, "chat_template_kwargs.enable_thinking must be true or false, got 'no'"),
    ({"thinking_budget": 5}, "chat_template_kwargs: unknown key(s) ['thinking_budget']; supported: enable_thinking"),
    ([1], "chat_template_kwargs must be an object"),
])
def test_bad_kwargs_are_named(family_tok, kwargs, message):
    with pytest.raises(UserError) as e:
        get_template("tokenizer", family_tok("qwen3")).check_kwargs(kwargs)
    assert str(e.value).startswith(message)


# ---------------------------------------------------------------- predict and serve on the tiny Qwen3 model

GREEDY = dict(max_new_tokens=6)


@pytest.fixture(scope="module")
def qwen3_dir(tiny_model_dir):
    return tiny_model_dir("qwen3")


@pytest.fixture(scope="module")
def qwen3_engine(qwen3_dir):
    from domaintune.inference.engine import Engine

    return Engine.from_run(qwen3_dir)


def _greedy(engine, ids) -> str:
    from domaintune.inference.params import GenerationParams

    return engine.generate([ids], GenerationParams(**GREEDY), batch_size=1)[0].text


def test_predict_thinking_flag_sends_the_official_prompt(qwen3_dir, qwen3_engine, tmp_path):
    """predict --thinking off / on: each answer is the greedy answer to the official prompt with that switch; a
    predictions file written with one switch is not resumed with the other."""
    from domaintune.inference.params import GenerationParams
    from domaintune.inference.predict import run_predict

    q = PROMPTS["single"]
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"messages": [*q, {"role": "assistant", "content": "x"}]}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    tok = qwen3_engine.tokenizer
    for on in (False, True):
        out = tmp_path / f"pred-{on}.jsonl"
        run_predict(qwen3_dir, data, out=out, params=GenerationParams(**GREEDY), evaluate=False, thinking=on)
        row = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
        assert row["predict"] == _greedy(qwen3_engine, official(tok, q, enable_thinking=on))
    with pytest.raises(UserError, match="thinking False -> True"):
        run_predict(qwen3_dir, data, out=tmp_path / "pred-False.jsonl", params=GenerationParams(**GREEDY),
                    evaluate=False, thinking=True)


def test_thinking_flag_on_a_template_without_the_switch_exits_2(tiny_model_dir, tmp_path, capsys):
    from domaintune.cli import main

    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n", encoding="utf-8")
    assert main(["predict", str(tiny_model_dir("qwen2")), "--data", str(data), "--template", "chatml",
                 "--thinking", "off", "--no-eval", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "error: --thinking off: the template 'chatml' has no thinking switch (only a chat_template that reads "
        "enable_thinking has one: Qwen3, Qwen3.5, GLM-4); leave --thinking out")


def test_serve_chat_template_kwargs_send_the_prompt_predict_sends(qwen3_engine):
    """A real uvicorn server: with `chat_template_kwargs` {"enable_thinking": false} the prompt is the official
    non-thinking prompt (prompt_tokens, and the greedy answer to exactly those ids), as predict --thinking off
    sends; keys and values the template does not read are 400s naming the field."""
    import httpx

    from domaintune.inference.engine import Engine
    from domaintune.inference.serve.app import create_app
    from served_tiny_model import running_app

    q = PROMPTS["system"]
    tok = qwen3_engine.tokenizer
    with running_app(create_app(qwen3_engine)) as url:
        def ask(**extra):
            return httpx.post(url + "/v1/chat/completions", timeout=60, json={
                "model": qwen3_engine.model_id, "messages": q, "temperature": 0, "max_tokens": GREEDY["max_new_tokens"],
                **extra})

        for on in (False, True):
            r = ask(chat_template_kwargs={"enable_thinking": on})
            assert r.status_code == 200, r.text
            ids = official(tok, q, enable_thinking=on)
            assert ids == qwen3_engine.encode_messages(q, {"enable_thinking": on})
            assert r.json()["usage"]["prompt_tokens"] == len(ids)
            assert r.json()["choices"][0]["message"]["content"] == _greedy(qwen3_engine, ids)
        assert ask().json()["usage"]["prompt_tokens"] == len(official(tok, q))  # the run's own switch (on)
        for kwargs, message in [
            ({"enable_thinking": "no"}, "chat_template_kwargs.enable_thinking must be true or false, got 'no'"),
            ({"foo": 1}, "chat_template_kwargs: unknown key(s) ['foo']; supported: enable_thinking"),
        ]:
            r = ask(chat_template_kwargs=kwargs)
            assert r.status_code == 400 and r.json()["error"]["message"] == message
            assert r.json()["error"]["param"] == "chat_template_kwargs"
        r = ask(chat_template_kwargs=[1])
        assert r.status_code == 400 and "chat_template_kwargs" in r.json()["error"]["message"]
    chatml = Engine(qwen3_engine.model, tok, get_template("chatml"), "chatml")
    with running_app(create_app(chatml)) as url:
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "chatml", "messages": q, "max_tokens": 2, "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(
        "chat_template_kwargs.enable_thinking: this model's template has no thinking switch")


def test_predict_keeps_the_reasoning_apart_and_scores_the_answer(qwen3_dir, tmp_path, monkeypatch):
    """A generated `<think>…</think>` block goes to "reasoning"; "predict" (what eval scores) is the answer alone;
    a block left open is all reasoning and an empty answer; an answer without a block is kept whole."""
    from domaintune.data.thinking import split_generated
    from domaintune.inference.engine import Engine, Generation
    from domaintune.inference.params import GenerationParams
    from domaintune.inference.predict import run_predict

    texts = ["<think>\n先想一想。\n</think>\n\n多喝水。", "<think>\n还在想", "直接回答。"]
    assert [split_generated(t) for t in texts] == [("先想一想。", "多喝水。"), ("还在想", ""), (None, "直接回答。")]

    def fake(self, prompts, params, batch_size=8):
        for i in range(len(prompts)):
            yield i, Generation(texts[i], [1, 2], len(prompts[i]), "stop")

    monkeypatch.setattr(Engine, "generate_iter", fake)
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"问题{i}", "output": "多喝水。"}, ensure_ascii=False) + "\n"
                            for i in range(3)), encoding="utf-8")
    out = run_predict(qwen3_dir, data, out=tmp_path / "pred.jsonl", params=GenerationParams(**GREEDY),
                      evaluate=False)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(r.get("reasoning"), r["predict"]) for r in rows] == [("先想一想。", "多喝水。"), ("还在想", ""),
                                                                  (None, "直接回答。")]
