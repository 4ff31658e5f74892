"""data.template: tokenizer with every family's official chat template (trl's templates, llama-cpp-python's
Mistral one, read by `training.tiny`): the trained tokens of every sample are the official rendering's assistant
spans, every sample's prompt is the official generation prompt for its history, and reasoning rows train what
data.thinking says. Tokenizer-level only (no model): the tiny tokenizers of `training.tiny.train_tokenizer`.

The reference is always the official template's own rendering through `tokenizer.apply_chat_template`:
`full_k = apply_chat_template(messages[:k+1])` and `prompt_k = apply_chat_template(messages[:k],
add_generation_prompt=True)`, both tokenized as transformers tokenizes them.
"""
from __future__ import annotations

import copy
import json

import pytest

from chat_templates import spans
from domaintune.config import build_config
from domaintune.data.encode import DataReport, encode_examples
from domaintune.data.examples import load_examples, parse_example
from domaintune.data.templates import Template, get_template
from domaintune.errors import UserError
from domaintune.families import ARCHS

FAMILIES = [a for a in ARCHS if a not in ("qwen2", "llama", "bloom")]  # the official templates
THINKING = ("qwen3", "qwen3_5", "glm4")  # templates that render reasoning_content and read enable_thinking


SYS = "你是一位耐心的儿科医生。"
Q1, A1, Q2, A2 = "孩子发烧怎么办？", "先量体温，多喝温水。", "What if it lasts?", "See a doctor after three days."
CASES = {
    "single": [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1}],
    "multi": [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1},
              {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}],
    "system": [{"role": "system", "content": SYS}, {"role": "user", "content": Q1},
               {"role": "assistant", "content": A1}, {"role": "user", "content": Q2},
               {"role": "assistant", "content": A2}],
}


def official(tok, messages, gen=False, **kw) -> list[int]:
    return list(tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False, **kw))


def runs(mask: list[bool], start: int) -> int:
    """The end of the run of trained positions starting at `start`."""
    end = start
    while end < len(mask) and mask[end]:
        end += 1
    return end


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", FAMILIES)
def test_trained_spans_are_the_official_assistant_spans(family_tok, arch, case):
    """Every assistant turn is trained exactly once, in a sample that starts with the official generation prompt of
    its history; its trained tokens are `full_k` minus `prompt_k`. A sample is the official rendering of its last
    turn's conversation (plus GLM-4's closing `<|user|>`). Only end-of-conversation tokens (Phi-3's EOS after
    `<|end|>\\n`) are left out of a turn that the same sample continues."""
    tok, messages = family_tok(arch), CASES[case]
    tpl = get_template("tokenizer", tok)
    if arch == "mistral" and case == "system":
        with pytest.raises(UserError, match=r"rejects this conversation \(Conversation roles must alternate"):
            tpl.encode_samples(tok, messages)
        return
    close = [tok.convert_tokens_to_ids(tpl.close_turn)] if tpl.close_turn else []
    assert tpl.close_turn == ("<|user|>" if arch == "glm4" else "")
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    samples = tpl.encode_samples(tok, messages)
    seen = []
    for ids, mask in samples:
        in_sample = []
        for k in turns:
            p = official(tok, messages[:k], gen=True)
            if ids[: len(p)] == p and len(ids) > len(p) and mask[len(p)] and not mask[len(p) - 1]:
                in_sample.append((k, p))
        assert in_sample, "every sample trains a turn"
        for i, (k, p) in enumerate(in_sample):
            full = official(tok, messages[: k + 1])
            assert full[: len(p)] == p, "the official rendering starts with its own generation prompt"
            span, end = full[len(p):], runs(mask, len(p))
            trained = ids[len(p):end]
            if i == len(in_sample) - 1:  # the sample ends here: the whole official span, then GLM's <|user|>
                assert trained == span + close and end == len(ids)
                assert ids == full + close
            else:
                assert trained == span[: len(trained) - len(close)] + close
                assert span[len(trained) - len(close):] in ([], [tok.eos_token_id])
        assert sum(mask) == sum(runs(mask, len(p)) - len(p) for _, p in in_sample), "nothing else is trained"
        seen += [k for k, _ in in_sample]
    assert seen == turns
    # Templates that keep earlier turns fixed give one sample per row; Qwen3 and Qwen3.5 rewrite them (the empty
    # think block of the last turn is gone from the history). GLM-4 rewrites only turns that carry reasoning.
    rewrites = arch in ("qwen3", "qwen3_moe", "qwen3_5") and len(turns) > 1
    assert len(samples) == (len(turns) if rewrites else 1)


@pytest.mark.parametrize("arch", FAMILIES)
def test_stop_tokens_hold_the_token_that_ends_an_answer(family_tok, arch):
    """Generation stops on what training teaches the model to emit after an answer: the template's end-of-turn
    token, or GLM-4's next-turn `<|user|>` (which GLM ships among its EOS ids)."""
    tok = family_tok(arch)
    tpl = get_template("tokenizer", tok)
    expected = {"qwen3": "<|im_end|>", "qwen3_moe": "<|im_end|>", "qwen3_5": "<|im_end|>", "llama3": "<|eot_id|>",
                "gemma3": "<end_of_turn>", "phi3": "<|end|>", "glm4": "<|user|>", "mistral": None}[arch]
    assert tpl.stop == ([expected] if expected and expected != tok.eos_token else [])
    want = [tok.eos_token_id] + ([tok.convert_tokens_to_ids(expected)] if tpl.stop else [])
    assert tpl.stop_token_ids(tok) == want


# ---------------------------------------------------------------- reasoning and data.thinking

REASONED = [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1, "reasoning_content": "想一想"}]
# The spans each thinking template's documented behaviour implies (decoded: (trained?, text)).
# - Qwen3 (trl qwen3.jinja): the last assistant turn always gets a think block (empty when there is no reasoning);
#   enable_thinking=false puts the empty block `<think>\n\n</think>\n\n` into the generation prompt.
# - Qwen3.5 (qwen3_5_think.jinja): the generation prompt opens the block (`<think>\n`); enable_thinking=false
#   closes it empty in the prompt.
# - GLM-4 (glm4moe.jinja): reasoning as `\n<think>R</think>\n`; enable_thinking=false appends `/nothink` to user
#   turns and puts `\n<think></think>` into the prompt; no end-of-turn token (the trained `<|user|>` closes it).
SPANS = {
    ("qwen3", "keep"): ("<|im_start|>assistant\n", "<think>\n想一想\n</think>\n\n" + A1 + "<|im_end|>\n"),
    ("qwen3", "drop"): ("<|im_start|>assistant\n<think>\n\n</think>\n\n", A1 + "<|im_end|>\n"),
    ("qwen3", "empty"): ("<|im_start|>assistant\n", "<think>\n\n</think>\n\n" + A1 + "<|im_end|>\n"),
    ("qwen3_5", "keep"): ("<|im_start|>assistant\n<think>\n", "想一想\n</think>\n\n" + A1 + "<|im_end|>\n"),
    ("qwen3_5", "drop"): ("<|im_start|>assistant\n<think>\n\n</think>\n\n", A1 + "<|im_end|>\n"),
    ("qwen3_5", "empty"): ("<|im_start|>assistant\n<think>\n", "\n</think>\n\n" + A1 + "<|im_end|>\n"),
    ("glm4", "keep"): (Q1 + "<|assistant|>", "\n<think>想一想</think>\n" + A1 + "<|user|>"),
    ("glm4", "drop"): (Q1 + "/nothink<|assistant|>\n<think></think>", "\n" + A1 + "<|user|>"),
    ("glm4", "empty"): (Q1 + "<|assistant|>", "\n<think></think>\n" + A1 + "<|user|>"),
}


@pytest.mark.parametrize("mode", ["keep", "drop", "empty"])
@pytest.mark.parametrize("arch", THINKING)
def test_thinking_templates_train_the_documented_spans(family_tok, arch, mode):
    """The spans of `SPANS` (see there for each template's documented behaviour); and the generation prompt of
    the same history, with the enable_thinking data.thinking implies, is the official one."""
    tok = family_tok(arch)
    tpl = get_template("tokenizer", tok, thinking=mode)
    assert tpl.chat_template_kwargs == {"enable_thinking": mode != "drop"}
    (ids, mask), = tpl.encode_samples(tok, REASONED)
    (_, prompt_tail), (_, target) = spans(tok, ids, mask)
    want_prompt, want_target = SPANS[arch, mode]
    assert prompt_tail.endswith(want_prompt) and target == want_target
    prompt = official(tok, REASONED[:1], gen=True, enable_thinking=mode != "drop")
    assert ids[: len(prompt)] == prompt and not any(mask[: len(prompt)]) and all(mask[len(prompt):])


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_5"])
def test_qwen3_multi_turn_reasoning_gives_a_sample_per_turn_without_earlier_reasoning(family_tok, arch):
    """Qwen3's template drops reasoning from turns before the last user message, so turn 2 is trained after the
    history inference sends (turn 1 without its reasoning), never after a history with it."""
    tok = family_tok(arch)
    tpl = get_template("tokenizer", tok)
    messages = [*REASONED, {"role": "user", "content": Q2},
                {"role": "assistant", "content": A2, "reasoning_content": "第二次"}]
    (ids1, mask1), (ids2, mask2) = tpl.encode_samples(tok, messages)
    assert "想一想" in tok.decode([i for i, m in zip(ids1, mask1, strict=True) if m])
    history = tok.decode([i for i, m in zip(ids2, mask2, strict=True) if not m])
    assert "想一想" not in history and history.endswith(Q2 + "<|im_end|>\n" + SPANS[arch, "keep"][0])
    assert ids2[: len(official(tok, messages[:3], gen=True))] == official(tok, messages[:3], gen=True)
    assert tok.decode([i for i, m in zip(ids2, mask2, strict=True) if m]).startswith(
        "<think>\n第二次" if arch == "qwen3" else "第二次")


@pytest.mark.parametrize("mode, block", [("keep", "<think>\n想一想\n</think>\n\n"), ("drop", ""),
                                         ("empty", "<think>\n\n</think>\n\n")])
@pytest.mark.parametrize("arch", ["llama3", "gemma3", "phi3", "mistral"])
def test_templates_without_a_thinking_block_get_it_before_the_answer(family_tok, arch, mode, block):
    tok = family_tok(arch)
    tpl = get_template("tokenizer", tok, thinking=mode)
    assert tpl.chat_template_kwargs == {}
    (ids, mask), = tpl.encode_samples(tok, REASONED)
    answer = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert answer.startswith(block + A1)
    rendered = official(tok, [REASONED[0], {"role": "assistant", "content": block + A1}])
    assert ids == rendered


@pytest.mark.parametrize("mode, block", [("keep", "<think>\n想一想\n</think>\n\n"), ("drop", ""),
                                         ("empty", "<think>\n\n</think>\n\n")])
def test_format_templates_get_the_block_before_the_answer(qwen_tok, mode, block):
    tpl = get_template("chatml", thinking=mode)
    ids, mask = tpl.encode(qwen_tok, REASONED)
    plain, _ = get_template("chatml").encode(qwen_tok, [REASONED[0], {"role": "assistant", "content": block + A1}])
    assert ids == plain
    assert qwen_tok.decode([i for i, m in zip(ids, mask, strict=True) if m]).startswith(block + A1)


def test_reasoning_in_both_shapes_reads_the_same(tmp_path, family_tok):
    """`reasoning_content` and a leading `<think>` block (messages, output, history) become the same message."""
    rows = [{"messages": REASONED},
            {"messages": [REASONED[0], {"role": "assistant", "content": "<think>\n想一想\n</think>\n\n" + A1}]},
            {"instruction": Q1, "output": "<think>想一想</think>" + A1}]
    p = tmp_path / "r.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    exs = load_examples(p)
    assert [e.messages for e in exs] == [REASONED] * 3
    ex = parse_example({"instruction": Q2, "output": A2, "history": [[Q1, "<think>想一想</think>" + A1]]}, "x")
    assert ex.messages[:2] == REASONED
    tok = family_tok("qwen3")
    tpl = get_template("tokenizer", tok)
    assert len({json.dumps(tpl.encode_samples(tok, e.messages)) for e in exs}) == 1


@pytest.mark.parametrize("assistant, problem", [
    ({"content": A1, "reasoning_content": 5}, "messages[1].reasoning_content must be a string, got a number"),
    ({"content": "<think>想一想" + A1}, "messages[1].content starts with <think> but has no </think>"),
    ({"content": "<think>x</think>" + A1, "reasoning_content": "y"}, "messages[1] gives its reasoning twice"),
    ({"content": "<think>x</think>  "}, "messages[1].content has no answer after its </think>"),
])
def test_bad_reasoning_names_file_line_and_field(tmp_path, assistant, problem):
    p = tmp_path / "bad.jsonl"
    good = {"messages": REASONED}
    bad = {"messages": [REASONED[0], {"role": "assistant", **assistant}]}
    p.write_text(json.dumps(good, ensure_ascii=False) + "\n" + json.dumps(bad, ensure_ascii=False) + "\n",
                 encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_examples(p)
    assert f"{p} line 2: {problem}" in str(e.value)
    with pytest.raises(UserError, match=f'{p} line 1: "output" starts with <think> but has no </think>'):
        p.write_text(json.dumps({"instruction": "q", "output": "<think>r"}) + "\n", encoding="utf-8")
        load_examples(p)


# ---------------------------------------------------------------- rows and samples in the report

def test_report_counts_rows_and_samples_and_names_expanded_rows(tmp_path, family_tok):
    tok = family_tok("qwen3")
    tpl = get_template("tokenizer", tok)
    rows = [{"messages": CASES["multi"]}, {"messages": CASES["single"]}]
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    exs = load_examples(p)
    lengths = [len(ids) for e in exs for ids, _ in tpl.encode_samples(tok, e.messages)]
    cfg = build_config({"data": {"path": str(p), "cutoff_len": lengths[1] - 1, "overlength": "drop"}}).data
    report = DataReport(path=str(p), rows=2)
    out = encode_examples(exs, tok, tpl, cfg, report)
    assert len(out) == 2 and report.samples == 3
    assert report.expanded_rows == [f"{p} line 1: 2 samples"]
    assert report.overlength_rows == [f"{p} line 1 sample 2 of 2: {lengths[1]} tokens"]
    report.train_rows = len(out)
    lines = report.summary_lines()
    assert lines[0] == (f"data: {p}: 2 rows, 3 samples (1 row(s) give one sample per assistant turn: the "
                        "chat_template rewrites earlier turns) -> train 2, validation 0 samples")
    assert f"  {p} line 1: 2 samples" in lines
    assert report.to_dict()["samples"] == 3 and report.to_dict()["expanded_rows"] == [f"{p} line 1: 2 samples"]


def test_prefix_preserving_templates_keep_one_sample_per_row(qwen_tok, tmp_path):
    """ChatML (the tiny models' template) is not rewritten: one sample per row, and the report says nothing new."""
    tpl = get_template("tokenizer", qwen_tok)
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"messages": CASES["system"]}, ensure_ascii=False) + "\n", encoding="utf-8")
    report = DataReport(path=str(p), rows=1)
    out = encode_examples(load_examples(p), qwen_tok, tpl, build_config({"data": {"path": str(p)}}).data, report)
    assert len(out) == 1 and report.samples == 1 and report.expanded_rows == []
    assert "samples (" not in report.summary_lines()[0]


# ---------------------------------------------------------------- saved with the run, exported

def test_thinking_and_kwargs_survive_template_json(tmp_path, family_tok):
    tok = family_tok("qwen3")
    tpl = get_template("tokenizer", tok, thinking="drop")
    tpl.save(tmp_path / "template.json")
    back = Template.load(tmp_path / "template.json")
    assert back == tpl and back.chat_template_kwargs == {"enable_thinking": False} and back.thinking == "drop"
    with pytest.raises(UserError, match="thinking must be one of keep, drop, empty"):
        Template.from_dict({**tpl.to_dict(), "thinking": "maybe"})
    glm = get_template("tokenizer", family_tok("glm4"))
    assert Template.from_dict(json.loads(json.dumps(glm.to_dict()))).close_turn == "<|user|>"


def test_exported_chat_template_defaults_to_the_training_switch(family_tok):
    """The template a run's tokenizer (and an export, a GGUF) carries renders the training prompt by default:
    data.thinking drop trains with enable_thinking=false, so plain apply_chat_template sends the empty block."""
    tok = copy.deepcopy(family_tok("qwen3"))
    tpl = get_template("tokenizer", tok, thinking="drop")
    tok.chat_template = tpl.chat_template_for(tok)
    q = [{"role": "user", "content": Q1}]
    assert official(tok, q, gen=True) == tpl.encode(tok, q, add_generation_prompt=True)[0]
    assert tok.decode(official(tok, q, gen=True)).endswith("<think>\n\n</think>\n\n")
    assert not tok.decode(official(tok, q, gen=True, enable_thinking=True)).endswith("</think>\n\n")


def test_data_check_shows_every_sample_of_a_multi_turn_thinking_row(tiny_model_dir, tmp_path, capsys):
    """data-check on the tiny Qwen3 with a multi-turn reasoning row: the row's two samples, each with its prompt
    (the second without the first turn's reasoning) and its trained part marked."""
    from domaintune import cli

    row = {"messages": [*REASONED, {"role": "user", "content": Q2},
                        {"role": "assistant", "content": "<think>第二次</think>" + A2}]}
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(row, ensure_ascii=False) + "\n" + json.dumps({"messages": CASES["single"]},
                                                                             ensure_ascii=False) + "\n")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model:\n  name_or_path: {tiny_model_dir('qwen3')}\n"
                   f"data:\n  path: {data}\n  template: tokenizer\n  val_size: 0\n")
    assert cli.main(["data-check", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (f"data: {data}: 2 rows, 3 samples (1 row(s) give one sample per assistant turn: "
                                   "the chat_template rewrites earlier turns) -> train 3, validation 0 samples")
    assert f"example 0 ({data} line 1; template tokenizer; 2 sample(s), one per assistant turn" in out
    first, second = out.split("\nsample 2 of 2")
    assert f"<|im_start|>assistant\n«<think>\n想一想\n</think>\n\n{A1}<|im_end|>\n»" in first
    assert (f"<|im_start|>assistant\n{A1}<|im_end|>\n<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n"
            f"«<think>\n第二次\n</think>\n\n{A2}<|im_end|>\n»") in second


def test_every_process_expands_rows_into_the_same_samples(tiny_model_dir, tmp_path):
    """N processes (torchrun) each encode the data themselves and must agree sample for sample, or the sampler's
    shared order would give them different rows: rows expanded into one sample per turn (Qwen3, reasoning) and
    masks by character offsets come out the same in processes with different hash seeds."""
    import os
    import subprocess
    import sys

    rows = [{"messages": [{"role": "system", "content": "你是医生。"}, {"role": "user", "content": "发烧怎么办？"},
                          {"role": "assistant", "content": "<think>先问体温。</think>量体温。"},
                          {"role": "user", "content": "要去医院吗？"},
                          {"role": "assistant", "content": "超过三天去。", "reasoning_content": "看时长。"}]},
            {"instruction": "什么是积食？", "output": "吃多了。"}] * 3
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    script = (
        "import hashlib, json, sys\n"
        "from transformers import AutoTokenizer\n"
        "from domaintune.config import build_config\n"
        "from domaintune.data.prepare import build_datasets\n"
        "from domaintune.data.templates import get_template\n"
        "cfg = build_config({'model': {'name_or_path': sys.argv[1]}, 'data': {'path': sys.argv[2], "
        "'template': 'tokenizer', 'val_size': 0, 'cache': False}}, 'x')\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "ds = build_datasets(cfg.data, tok, get_template('tokenizer', tok), 0)\n"
        "print(len(ds.train), hashlib.sha256(json.dumps(list(ds.train)).encode()).hexdigest())\n")
    out = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        r = subprocess.run([sys.executable, "-c", script, str(tiny_model_dir("qwen3")), str(data)], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        out.append(r.stdout.split())
    assert out[0] == out[1] and int(out[0][0]) == 9  # 3 two-turn rows expanded into 2 samples each, 3 single
