"""The family matrix: every family of `families.ARCHS`, on its tiny model with its own (official) chat template,
through every verb: data-check, train (`data.template: tokenizer`, multi-turn rows with a system prompt and
reasoning rows), predict, serve (3 concurrent greedy requests, each equal to its solo answer), export and GGUF.

The supported-models table (`domaintune models`, README.md) is built from `families.support()`: one column per
test below, each parametrised over every arch, so no row claims what this module does not prove
(`test_table_claims_only_what_the_matrix_proves`). One trained run per family is shared by the module.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from domaintune.errors import UserError
from domaintune.families import ARCHS, COLUMNS, TABLE_NOTE, TINY, family_of, render_table, support

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "你是一位耐心的儿科医生。"
MULTI = [{"role": "user", "content": "孩子发烧怎么办？"}, {"role": "assistant", "content": "先量体温，多喝温水。"},
         {"role": "user", "content": "要去医院吗？"}, {"role": "assistant", "content": "烧超过三天就去医院。"}]
ROWS = [
    {"messages": [{"role": "system", "content": SYSTEM}, *MULTI]},
    {"messages": MULTI},
    {"messages": [{"role": "user", "content": "What is a fever?"},
                  {"role": "assistant", "content": "A body temperature above 38 °C.",
                   "reasoning_content": "The parent asks for a definition; give the threshold."}]},
    {"instruction": "解释一下什么是积食", "output": "<think>\n家长想知道定义。\n</think>\n\n吃得太多，消化不了。"},
    {"instruction": "孩子不爱吃饭怎么办", "output": "定时定量，少吃零食。"},
    {"instruction": "How much should a toddler sleep?", "output": "About 11 to 14 hours a day."},
]
PROMPTS = [[{"role": "user", "content": "孩子咳嗽怎么办？"}],
           [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "How do I take a temperature?"}],
           [{"role": "user", "content": "宝宝几个月可以吃辅食"}]]
MAX_NEW = 8


def rows_for(arch: str) -> list[dict]:
    """Mistral's official template refuses a system role: its data has none (the refusal is tested below)."""
    if arch != "mistral":
        return ROWS
    return [r for r in ROWS if not (r.get("messages") and r["messages"][0]["role"] == "system")]


def prompts_for(arch: str) -> list[list[dict]]:
    return [p for p in PROMPTS if arch != "mistral" or p[0]["role"] != "system"]


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-data")
    out = {}
    for arch in ARCHS:
        path = root / f"{arch}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows_for(arch)), encoding="utf-8")
        out[arch] = path
    return out


@pytest.fixture(scope="module")
def family_config(tiny_train_config, data_files, tmp_path_factory):
    def make(arch: str, *overrides: str):
        return tiny_train_config(tmp_path_factory.mktemp(f"family-{arch}") / "run", arch,
                                 "data.template=tokenizer", f"data.path={data_files[arch]}", "data.val_size=0",
                                 "train.max_steps=2", "train.batch_size=2", "train.per_device_batch_size=2",
                                 "train.eval_steps=2", "train.save_steps=2", *overrides)
    return make


@pytest.fixture(scope="module")
def runs(family_config):
    """A LoRA run per family, built on first use."""
    from domaintune.training.trainer import run_train

    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = run_train(family_config(arch))
        return built[arch]

    return get


@pytest.fixture(scope="module")
def engines(runs):
    from domaintune.inference.engine import Engine

    built: dict = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = Engine.from_run(runs(arch), device="cpu")
        return built[arch]

    return get


def greedy(engine, messages: list[dict]):
    from domaintune.inference.params import GenerationParams

    ids = engine.encode_messages(messages)
    return ids, engine.generate([ids], GenerationParams(max_new_tokens=MAX_NEW), batch_size=1)[0]


# ------------------------------------------------------------------ the columns
@pytest.mark.parametrize("arch", ARCHS)
def test_template(arch, tiny_model_dir):
    """The tiny model carries the family's chat template, the one the row names."""
    from transformers import AutoTokenizer

    from domaintune.training.tiny import chat_template

    tok = AutoTokenizer.from_pretrained(tiny_model_dir(arch))
    assert tok.chat_template == chat_template(TINY[arch].template)
    assert TINY[arch].template.partition(":")[2] in support(arch)["template"] or arch in ("qwen2", "llama", "bloom")


@pytest.mark.parametrize("arch", ARCHS)
def test_train(arch, runs, tiny_model_dir):
    """`data.template: tokenizer` on multi-turn rows with a system prompt (none for Mistral) and reasoning rows:
    2 logged steps with finite losses, and the run keeps the official template for every later verb."""
    import math

    run = runs(arch)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    saved = json.loads((run / "template.json").read_text(encoding="utf-8"))
    from transformers import AutoTokenizer

    assert saved["kind"] == "tokenizer"
    assert saved["chat_template"] == AutoTokenizer.from_pretrained(tiny_model_dir(arch)).chat_template
    info = json.loads((run / "run_info.json").read_text(encoding="utf-8"))
    assert info["data"]["rows"] == len(rows_for(arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_data_check(arch, family_config, capsys):
    """data-check prints the multi-turn example with both answers in trained spans."""
    from domaintune.training.data_check import run_data_check

    report = run_data_check(family_config(arch), example=0)
    out = capsys.readouterr().out
    assert report["rows"] == len(rows_for(arch))
    for answer in ("先量体温，多喝温水。", "烧超过三天就去医院。"):
        at = out.index(answer)
        assert out.rfind("«", 0, at) > out.rfind("»", 0, at), (answer, out)  # inside a trained span
        assert out.find("»", at) >= at + len(answer), (answer, out)


@pytest.mark.parametrize("arch", ARCHS)
def test_thinking(arch, engines, family_config, tiny_model_dir):
    """Reasoning rows (a `reasoning_content` field, a leading <think> block) train their reasoning; the prompt
    inference sends is the official generation prompt, both ways of the thinking switch where the template has
    one (and the run's own setting by default)."""
    from transformers import AutoTokenizer

    from domaintune.data.encode import IGNORE_INDEX
    from domaintune.data.prepare import build_datasets
    from domaintune.data.templates import get_template

    engine = engines(arch)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir(arch))
    assert ("enable_thinking" in tok.chat_template) == TINY[arch].thinking
    switches = [{"enable_thinking": True}, {"enable_thinking": False}] if TINY[arch].thinking else [{}]
    for messages in prompts_for(arch):
        for kw in switches:
            want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                           **kw)
            assert engine.encode_messages(messages, chat_template_kwargs=kw or None) == list(want), kw
        # by default, the run's setting (data.thinking: keep = thinking on)
        want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                       **switches[0])
        assert engine.encode_messages(messages) == list(want)
    cfg = family_config(arch)
    ds = build_datasets(cfg.data, tok, get_template("tokenizer", tok, "keep"), seed=0)
    trained = [tok.decode([t for t in s["labels"] if t != IGNORE_INDEX]) for s in ds.train]
    for reasoning in ("The parent asks for a definition; give the threshold.", "家长想知道定义。"):
        assert any(reasoning in t for t in trained), (reasoning, trained)


@pytest.mark.parametrize("arch", ARCHS)
def test_predict(arch, runs, engines, tmp_path):
    """predict writes one greedy answer per row, equal to the engine's own greedy answer."""
    from domaintune.inference.params import GenerationParams
    from domaintune.inference.predict import run_predict

    data = tmp_path / "test.jsonl"
    rows = [{"messages": [*p, {"role": "assistant", "content": "参考答案"}]} for p in prompts_for(arch)]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = run_predict(runs(arch), data, out=tmp_path / "pred.jsonl", params=GenerationParams(max_new_tokens=MAX_NEW),
                      evaluate=False)
    preds = [json.loads(line) for line in Path(out).read_text(encoding="utf-8").splitlines()]
    assert len(preds) == len(rows)
    engine = engines(arch)
    for p, messages in zip(preds, prompts_for(arch), strict=True):
        assert p["predict"] == greedy(engine, messages)[1].text


@pytest.mark.parametrize("arch", ARCHS)
def test_serve(arch, engines):
    """3 concurrent greedy chat requests through the real server each get their solo answer; the batcher joins
    them where the family's cache allows it (the table's "batched" / "one request at a time")."""
    import openai

    from domaintune.inference.kvcache import joinable
    from domaintune.inference.serve.app import create_app
    from served_tiny_model import running_app

    engine = engines(arch)
    assert joinable(engine.model) == family_of(engine.model.config.model_type).batched
    prompts = prompts_for(arch)
    solo = [greedy(engine, m)[1].text for m in prompts]
    answers: dict[int, str] = {}
    with running_app(create_app(engine)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)

        def ask(i: int) -> None:
            r = client.chat.completions.create(model=engine.model_id, messages=prompts[i], temperature=0,
                                               max_tokens=MAX_NEW)
            answers[i] = r.choices[0].message.content

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert [answers.get(i) for i in range(len(prompts))] == solo


@pytest.mark.parametrize("arch", ARCHS)
def test_export(arch, runs, engines, tmp_path):
    """The merged safetensors export computes the run's logits and keeps the official chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domaintune.inference.export import run_export

    out = run_export(runs(arch), tmp_path / "export")
    engine = engines(arch)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([engine.encode_messages(prompts_for(arch)[0])])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, engine.model(ids).logits, atol=1e-4)
    assert AutoTokenizer.from_pretrained(out).chat_template == engine.template.chat_template_for(engine.tokenizer)


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf(arch, runs, engines, tmp_path):
    """The f32 GGUF in llama.cpp gives the run's greedy tokens; a family without GGUF is refused with the reason."""
    from domaintune.inference.gguf_export import run_export_gguf

    fam = family_of(engines(arch).model.config.model_type)
    if fam.gguf is None:
        with pytest.raises(UserError, match=fam.gguf_refusal.split(";")[0]):
            run_export_gguf(runs(arch), tmp_path / "out", quant="f32")
        return
    from llama_cpp_run import llama, llama_greedy

    path = run_export_gguf(runs(arch), tmp_path / "out", quant="f32")
    llm = llama(path, n_ctx=512)
    assert llm.metadata["general.architecture"] == fam.gguf
    engine = engines(arch)
    for messages in prompts_for(arch):
        ids, want = greedy(engine, messages)
        got = llama_greedy(llm, ids, MAX_NEW)
        assert got == want.token_ids[: len(got)] and len(got) >= min(len(want.token_ids), 1), (got, want.token_ids)


# ------------------------------------------------------------------ refusals and the table
def test_mistral_refuses_a_system_prompt_clearly(family_config, data_files, tmp_path):
    """The official Mistral template raises for a system role: a UserError naming the row and the way out."""
    from domaintune.training.data_check import run_data_check

    bad = tmp_path / "system.jsonl"
    bad.write_text(json.dumps(ROWS[0], ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"system\.jsonl line 1: .*rejects this conversation"):
        run_data_check(family_config("mistral", f"data.path={bad}"))


def test_table_claims_only_what_the_matrix_proves():
    """Every column of the table is a parametrised test of this module over every arch; README.md holds the
    table as `domaintune models --markdown` prints it."""
    import inspect
    import sys

    module = sys.modules[__name__]
    for column in COLUMNS:
        test = getattr(module, f"test_{column}")
        marks = [m for m in getattr(test, "pytestmark", []) if m.name == "parametrize"]
        assert marks and list(marks[0].args[1]) == list(ARCHS), column
        assert inspect.signature(test).parameters["arch"]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert render_table() in readme and TABLE_NOTE in readme


def test_models_verb_prints_the_table(capsys):
    from domaintune.cli import main

    assert main(["models", "--markdown"]) == 0
    assert capsys.readouterr().out == render_table()
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert out == render_table(markdown=False) and all(a in out for a in ARCHS)
