"""Row formats: ShareGPT, the OpenAI chat fine-tuning format (tool calls, tools, weights) and data.train_on_turns.

Tool rows are checked against the official rendering: the tiny qwen3's chat_template (trl's qwen3.jinja) through
`apply_chat_template(..., tools=...)`, each trained span being exactly what that template writes after its own
generation prompt."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from domaintune import cli
from domaintune.config import build_config
from domaintune.data.examples import load_examples, parse_example
from domaintune.data.load import check_data_files
from domaintune.data.templates import get_template
from domaintune.errors import UserError

WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TOOLS = [{"type": "function", "function": WEATHER}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
RESULT = "rain, 12C"
TOOL_ROW = {"messages": [{"role": "system", "content": "You help travellers."},
                         {"role": "user", "content": "Weather in Paris?"},
                         {"role": "assistant", "tool_calls": [CALL]},
                         {"role": "tool", "tool_call_id": "call_1", "content": RESULT},
                         {"role": "assistant", "content": "It rains in Paris."}],
            "tools": TOOLS}
MULTI = {"messages": [{"role": "user", "content": "孩子发烧怎么办？"},
                      {"role": "assistant", "content": "先量体温。", "weight": 0},
                      {"role": "user", "content": "What if it lasts?"},
                      {"role": "assistant", "content": "See a doctor."}]}


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def trained_text(tok, ids, mask) -> str:
    return tok.decode([i for i, m in zip(ids, mask, strict=True) if m])


@pytest.fixture(scope="module")
def qwen3_tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir("qwen3"))


# ---------------------------------------------------------------- ShareGPT

SHAREGPT = {"system": "You help travellers.", "tools": json.dumps([WEATHER]),
            "conversations": [{"from": "human", "value": "Weather in Paris?"},
                              {"from": "function_call", "value": json.dumps({"name": "get_weather",
                                                                              "arguments": {"city": "Paris"}})},
                              {"from": "observation", "value": RESULT},
                              {"from": "gpt", "value": "It rains in Paris."}]}


def test_sharegpt_rows_become_messages(tmp_path):
    plain = {"conversations": [{"from": "user", "value": "q1"}, {"from": "assistant", "value": "a1"},
                               {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}
    rows = load_examples(write(tmp_path / "sg.jsonl", [plain, SHAREGPT]))
    assert rows[0].messages == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    # the same conversation as the OpenAI row: bare tool schemas wrapped, the call's arguments an object
    openai = parse_example(TOOL_ROW, "x")
    assert _same_but_ids(rows[1].messages, openai.messages)
    assert rows[1].tools == TOOLS


def _same_but_ids(a: list[dict], b: list[dict]) -> bool:
    def strip(ms):
        out = []
        for m in ms:
            m = {k: v for k, v in m.items() if k != "tool_call_id"}
            if "tool_calls" in m:
                m["tool_calls"] = [{k: v for k, v in c.items() if k != "id"} for c in m["tool_calls"]]
            out.append(m)
        return out

    return strip(a) == strip(b)


def test_sharegpt_unknown_role_names_file_line_field_and_roles(tmp_path):
    bad = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                             {"from": "human", "value": "q2"}, {"from": "bot", "value": "a2"}]}
    path = write(tmp_path / "sg.jsonl", [SHAREGPT, bad])
    with pytest.raises(UserError) as e:
        load_examples(path)
    assert str(e.value) == (f'1 invalid row(s); fix them and run again:\n  {path} line 2: "conversations"[3].from '
                            "'bot' is not a known role; accepted: human, user, gpt, assistant, system, function_call, "
                            "observation, tool")


@pytest.mark.parametrize("conv, problem", [
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}], '"conversations"[1].value must be a string'),
    ([{"from": "human", "value": "q"}, {"from": "function_call", "value": "{not json"}],
     '"conversations"[1].value is not valid JSON'),
    ([{"from": "gpt", "value": "a"}], "turns must alternate user/assistant starting with user; turn 1 is 'assistant'"),
    ([{"from": "human", "value": "q"}, {"from": "observation", "value": "r"}], "turn 2 is 'tool': a tool result "
                                                                               "must follow"),
])
def test_sharegpt_problems_name_the_field(conv, problem):
    with pytest.raises(UserError, match="^f line 1: ") as e:
        parse_example({"conversations": conv}, "f line 1")
    assert problem in str(e.value)


# ---------------------------------------------------------------- OpenAI format: validation

@pytest.mark.parametrize("change, problem", [
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="{oops"),
     "messages[2].tool_calls[0].function.arguments is not valid JSON"),
    (lambda r: r["messages"][4].update(weight=2), "messages[4].weight must be 0 or 1, on an assistant message"),
    (lambda r: r["messages"][1].update(weight=0), "messages[1].weight must be 0 or 1, on an assistant message"),
    (lambda r: r["messages"].pop(2), "turn 2 is 'tool': a tool result must follow an assistant message with "
                                     "tool_calls"),
    (lambda r: r.update(tools=[{"description": "no name"}]), '"tools"[0] must be a function schema with a "name"'),
    (lambda r: r["messages"][4].update(weight=0), None),
])
def test_openai_row_problems(change, problem):
    row = json.loads(json.dumps(TOOL_ROW))
    change(row)
    if problem is None:  # weight 0 on the last answer alone is fine: the call still trains
        assert parse_example(row, "x").messages[4]["weight"] == 0
        return
    with pytest.raises(UserError) as e:
        parse_example(row, "f line 1")
    assert problem in str(e.value)


def test_all_weights_zero_is_an_error():
    row = json.loads(json.dumps(MULTI))
    row["messages"][3]["weight"] = 0
    with pytest.raises(UserError, match="every assistant message has weight 0: nothing to train in this row"):
        parse_example(row, "x")


# ---------------------------------------------------------------- OpenAI format: rendering and masks

def official(tok, messages, gen=False) -> list[int]:
    return list(tok.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=gen, tokenize=True,
                                        return_dict=False))


def test_tool_row_masks_match_the_official_rendering(qwen3_tok):
    """Each sample is the official rendering of the row up to an assistant turn (Qwen3 rewrites earlier turns: one
    sample per turn), and its trained ids are exactly what the template writes after its own generation prompt: the
    tool call in the first, the answer in the second. The tool result is never trained."""
    tpl = get_template("tokenizer", qwen3_tok)
    ex = parse_example(TOOL_ROW, "x")
    samples = tpl.encode_samples(qwen3_tok, ex.messages)
    raw = TOOL_ROW["messages"]  # the row as written (arguments a JSON string): the official template's input
    assert len(samples) == 2
    for (ids, mask), k in zip(samples, (2, 4), strict=True):
        prompt, full = official(qwen3_tok, raw[:k], gen=True), official(qwen3_tok, raw[:k + 1])
        assert ids == full
        assert mask == [i >= len(prompt) for i in range(len(full))]
    call_text = trained_text(qwen3_tok, *samples[0])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in call_text
    answer_ids, answer_mask = samples[1]
    assert "It rains in Paris." in trained_text(qwen3_tok, answer_ids, answer_mask)
    untrained = qwen3_tok.decode([i for i, m in zip(answer_ids, answer_mask, strict=True) if not m])
    assert f"<tool_response>\n{RESULT}\n</tool_response>" in untrained
    assert RESULT not in trained_text(qwen3_tok, answer_ids, answer_mask)
    # inference sends the tools too: the generation prompt after the tool result is the official one
    ids, _ = tpl.encode(qwen3_tok, ex.messages[:4], add_generation_prompt=True)
    assert ids == official(qwen3_tok, raw[:4], gen=True)


def test_weight_zero_turns_are_not_trained(qwen_tok, qwen3_tok):
    ex = parse_example(MULTI, "x")
    ids, mask = get_template("domain_zh").encode(qwen_tok, ex.messages)
    assert "先量体温" in qwen_tok.decode(ids) and "先量体温" not in trained_text(qwen_tok, ids, mask)
    assert "See a doctor." in trained_text(qwen_tok, ids, mask)
    # Qwen3 (one sample per turn): the weight-0 turn's sample is left out; the other trains only its answer
    samples = get_template("tokenizer", qwen3_tok).encode_samples(qwen3_tok, ex.messages)
    assert len(samples) == 1
    assert trained_text(qwen3_tok, *samples[0]) == "<think>\n\n</think>\n\nSee a doctor.<|im_end|>\n"


def test_train_on_turns_last(qwen_tok, qwen3_tok):
    row = {"messages": [{k: v for k, v in m.items() if k != "weight"} for m in MULTI["messages"]]}
    ex = parse_example(row, "x")
    all_ids, all_mask = get_template("chatml").encode(qwen_tok, ex.messages)
    assert "先量体温" in trained_text(qwen_tok, all_ids, all_mask)
    ids, mask = get_template("chatml", train_on_turns="last").encode(qwen_tok, ex.messages)
    assert ids == all_ids and "先量体温" not in trained_text(qwen_tok, ids, mask)
    assert "See a doctor." in trained_text(qwen_tok, ids, mask)
    assert len(get_template("tokenizer", qwen3_tok).encode_samples(qwen3_tok, ex.messages)) == 2
    assert len(get_template("tokenizer", qwen3_tok, train_on_turns="last").encode_samples(qwen3_tok,
                                                                                          ex.messages)) == 1
    with pytest.raises(Exception, match="train_on_turns"):
        build_config({"model": {"name_or_path": "m"}, "data": {"path": "d.jsonl", "train_on_turns": "first"}})
    assert build_config({"model": {"name_or_path": "m"}, "data": {"path": "d.jsonl"}}).data.train_on_turns == "all"


# ---------------------------------------------------------------- templates that cannot render tools

def test_format_template_refuses_tool_rows_before_the_tokenizer(tmp_path):
    path = write(tmp_path / "tools.jsonl", [MULTI, TOOL_ROW])
    cfg = build_config({"model": {"name_or_path": "m"}, "data": {"path": path, "template": "domain_zh"}}).data
    with pytest.raises(UserError) as e:
        check_data_files(cfg)
    assert str(e.value).startswith(f"{path} line 2: the template 'domain_zh' cannot render tools")
    assert "data.template: tokenizer" in str(e.value)


def test_chat_template_that_ignores_tools_is_refused(qwen_tok, qwen3_tok):
    ex = parse_example(TOOL_ROW, "x")
    plain = get_template("tokenizer", qwen_tok)  # a ChatML template that writes only role and content
    with pytest.raises(UserError, match="this model's chat_template does not render tools"):
        plain.encode_samples(qwen_tok, ex.messages)
    # the same template is fine for rows without tools
    assert plain.encode_samples(qwen_tok, parse_example(MULTI, "x").messages)
    tools_free = replace(get_template("tokenizer", qwen3_tok), chat_template=qwen_tok.chat_template)
    with pytest.raises(UserError, match="does not render tools"):
        tools_free.encode(qwen3_tok, ex.messages)


# ---------------------------------------------------------------- data-check

def test_data_check_shows_the_masks_of_a_tool_row(tmp_path, tiny_model_dir, capsys):
    data = write(tmp_path / "tools.jsonl", [TOOL_ROW, MULTI])
    cfg = str(tmp_path / "cfg.yaml")
    (tmp_path / "cfg.yaml").write_text(f"model:\n  name_or_path: {tiny_model_dir('qwen3')}\n"
                                       f"data:\n  path: {data}\n  template: tokenizer\n  val_size: 0\n")
    assert cli.main(["data-check", cfg, "--example", "0"]) == 0
    out = capsys.readouterr().out
    assert "2 sample(s), one per assistant turn" in out
    assert ('<|im_start|>assistant\n«<think>\n\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call><|im_end|>\n»') in out
    assert f"<|im_start|>user\n<tool_response>\n{RESULT}\n</tool_response><|im_end|>\n<|im_start|>assistant\n«" in out
    # train_on_turns: last trains only the answer after the tool result
    assert cli.main(["data-check", cfg, "--example", "0", "data.train_on_turns=last"]) == 0
    out = capsys.readouterr().out
    assert "<tool_call>" in out and out.count("«") == 2  # the header's «like this» and the one trained answer


def test_training_reads_train_on_turns(tiny_train_config, tmp_path):
    """Regression: `data.train_on_turns` reached data-check but not the training run's template; the run trains
    (and saves in template.json) what the setting says."""
    import json

    from domaintune.data.encode import IGNORE_INDEX
    from domaintune.training.run import TrainingRun

    rows = [{"messages": [{"role": "user", "content": "一"}, {"role": "assistant", "content": "甲"},
                          {"role": "user", "content": "二"}, {"role": "assistant", "content": "乙"}]}] * 4
    data = tmp_path / "multi.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    trained = {}
    for turns in ("all", "last"):
        cfg = tiny_train_config(tmp_path / turns, "qwen2", "data.template=chatml", f"data.path={data}",
                                "data.val_size=0", f"data.train_on_turns={turns}")
        run = TrainingRun(cfg)
        run.setup_data()
        assert run.template.train_on_turns == turns
        sample = run.data.train[0]
        trained[turns] = sum(1 for x in sample["labels"] if x != IGNORE_INDEX)
    assert 0 < trained["last"] < trained["all"]
