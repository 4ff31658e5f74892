"""templates: exact prompt text and loss masks for every built-in template and row format, BOS handling,
generation prompts equal to training prompts, stop tokens, template files."""
from __future__ import annotations

import copy
import json
import logging

import pytest

from chat_templates import spans
from domaintune.data.examples import parse_example
from domaintune.data.templates import BUILTIN, Template, get_template
from domaintune.errors import UserError
from domaintune.training.tiny import CHATML_JINJA, train_tokenizer


@pytest.fixture(params=["bloom", "qwen2", "llama"])
def tok(request):
    return request.getfixturevalue({"bloom": "bloom_tok", "qwen2": "qwen_tok", "llama": "llama_tok"}[request.param])


# ---------------------------------------------------------------- the expected layouts, written out by hand

ALPACA_SYS = ("Below is an instruction that describes a task. Write a response that appropriately completes "
              "the request.")
CHATML_USER = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
SPEC = {
    "domain_zh": dict(default_system="", system="{}\n\n", user="用户:{}\n\n助手:", sep="\n\n",
                      answer="{}</s>", join="{}{}"),
    "alpaca": dict(default_system=ALPACA_SYS, system="{}\n\n", user="### Instruction:\n{}\n\n### Response:\n",
                   sep="\n\n", answer="{}</s>", join="{}\n\n### Input:\n{}"),
    "chatml": dict(default_system="You are a helpful assistant.", system="<|im_start|>system\n{}<|im_end|>\n",
                   user=CHATML_USER, sep="\n", answer="{}<|im_end|></s>", join="{}\n\n{}"),
    # the tiny tokenizers' own chat_template (ChatML): the turn ends with <|im_end|>\n, no EOS, no BOS
    "tokenizer": dict(default_system="", system="<|im_start|>system\n{}<|im_end|>\n", user=CHATML_USER, sep="",
                      answer="{}<|im_end|>\n", join="{}\n{}"),
}

Q, INP, A = "孩子不爱吃饭怎么办？", "他三岁，挑食。", "先别着急，规律进餐，少吃零食。"
HQ, HA = "你好", "您好！有什么可以帮您？"
SYS = "你是一位家庭教育助手。"
CASES = {
    "plain": ({"instruction": Q, "input": "", "output": A}, None, [("Q", A)]),
    "input": ({"instruction": Q, "input": INP, "output": A}, None, [("QI", A)]),
    "system": ({"instruction": Q, "output": A, "system": SYS}, SYS, [("Q", A)]),
    "history": ({"instruction": Q, "input": INP, "output": A, "history": [[HQ, HA]]}, None, [(HQ, HA), ("QI", A)]),
    "messages": ({"messages": [{"role": "system", "content": SYS},
                               {"role": "user", "content": "我儿子10岁，写作业很慢。"},
                               {"role": "assistant", "content": "先观察时间花在哪里。"},
                               {"role": "user", "content": "他经常分心。"},
                               {"role": "assistant", "content": "试试专注二十五分钟、休息五分钟。"}]},
                 SYS, [("我儿子10岁，写作业很慢。", "先观察时间花在哪里。"),
                       ("他经常分心。", "试试专注二十五分钟、休息五分钟。")]),
}


def expected_spans(name: str, system: str | None, turns, bos: str = "") -> list[tuple[bool, str]]:
    s = SPEC[name]
    prompt = bos
    system = system if system is not None else s["default_system"]
    if system:
        prompt += s["system"].format(system)
    out = []
    for k, (q, a) in enumerate(turns):
        q = {"Q": Q, "QI": s["join"].format(Q, INP)}.get(q, q)
        prompt += (s["sep"] if k else "") + s["user"].format(q)
        out += [(False, prompt), (True, s["answer"].format(a))]
        prompt = ""
    return out


def _encode(tok, name, row):
    tpl = get_template(name, tok)
    ex = parse_example(row, "t.jsonl line 1", template=tpl)
    ids, mask = tpl.encode(tok, ex.messages)
    return tpl, ex, ids, mask


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", BUILTIN)
def test_trained_tokens_are_exactly_the_answers(tok, name, case):
    row, system, turns = CASES[case]
    tpl, ex, ids, mask = _encode(tok, name, row)
    adds_bos = tok("a")["input_ids"][0] == tok.bos_token_id  # the LLaMA-style tokenizer; format templates add it
    bos = "<s>" if adds_bos and name != "tokenizer" else ""
    assert spans(tok, ids, mask) == expected_spans(name, system, turns, bos)
    assert len(ids) == len(mask)


def test_domain_zh_prompt_literal(qwen_tok):
    _, _, ids, mask = _encode(qwen_tok, "domain_zh",
                              {"instruction": "孩子不爱吃饭", "input": "三岁", "output": "别着急。"})
    assert qwen_tok.decode([i for i, m in zip(ids, mask, strict=True) if not m]) == "用户:孩子不爱吃饭三岁\n\n助手:"
    assert qwen_tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "别着急。</s>"
    assert ids[-1] == qwen_tok.eos_token_id and mask[-1] is True


@pytest.mark.parametrize("name", ["domain_zh", "alpaca", "chatml"])
def test_llama_tokenizer_bos_once_and_masked(llama_tok, name):
    _, _, ids, mask = _encode(llama_tok, name, CASES["history"][0])
    bos = llama_tok.bos_token_id
    assert ids[0] == bos and mask[0] is False
    assert ids.count(bos) == 1


@pytest.mark.parametrize("name", ["domain_zh", "alpaca", "chatml"])
def test_no_bos_for_bloom_and_qwen(qwen_tok, name):
    _, _, ids, _ = _encode(qwen_tok, name, CASES["plain"][0])
    assert qwen_tok.bos_token_id not in ids


def test_chat_template_with_bos_gives_exactly_one_bos(llama_tok):
    tpl = Template(name="tokenizer", kind="tokenizer", append_eos=False, chat_template="{{ bos_token }}" + CHATML_JINJA)
    msgs = parse_example(CASES["messages"][0], "x").messages
    ids, mask = tpl.encode(llama_tok, msgs)
    assert ids[0] == llama_tok.bos_token_id and mask[0] is False
    assert ids.count(llama_tok.bos_token_id) == 1
    gen, _ = tpl.encode(llama_tok, msgs[:-1], add_generation_prompt=True)
    assert gen.count(llama_tok.bos_token_id) == 1


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", BUILTIN)
def test_generation_prompt_is_prefix_of_training_encoding(tok, name, case):
    """The inference prompt is token-for-token the training prompt up to the last answer."""
    tpl, ex, ids, mask = _encode(tok, name, CASES[case][0])
    prompt_msgs, target = ex.prompt_and_target()
    gen, gen_mask = tpl.encode(tok, prompt_msgs, add_generation_prompt=True)
    assert ids[: len(gen)] == gen
    assert gen_mask == mask[: len(gen)]
    assert tok.decode(ids[len(gen):]) == SPEC[name]["answer"].format(target)
    assert all(mask[len(gen):]) and not mask[len(gen) - 1]


@pytest.mark.parametrize("name", ["domain_zh", "alpaca", "chatml"])
def test_to_jinja_renders_the_same_text(tok, name):
    """The exported chat_template renders what training encoded (other tools then prompt the same way)."""
    tpl = get_template(name)
    for case in CASES:
        msgs = parse_example(CASES[case][0], "x", template=tpl).messages
        ids, _ = tpl.encode(tok, msgs)
        text = tok.apply_chat_template(msgs, tokenize=False, chat_template=tpl.to_jinja())
        bos = tok.bos_token if tok("a")["input_ids"][0] == tok.bos_token_id else ""
        assert bos + text == tok.decode(ids), case


def test_to_jinja_adds_no_second_eos_when_the_answer_ends_with_it(qwen_tok):
    """Regression: with an EOS of <|im_end|> (Qwen's instruct tokenizers) ChatML answers already end with EOS;
    encode() adds none, but the exported chat_template added a second one after every earlier answer."""
    import copy

    tok = copy.deepcopy(qwen_tok)
    tok.eos_token = "<|im_end|>"
    tpl = get_template("chatml")
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    ids, _ = tpl.encode(tok, msgs, add_generation_prompt=True)
    assert ids.count(tok.eos_token_id) == 4  # the <|im_end|> of system, q1, a1 and q2: none doubled
    assert tok.apply_chat_template(msgs, tokenize=False, chat_template=tpl.to_jinja()) == tok.decode(ids)
    ids, _ = tpl.encode(qwen_tok, msgs, add_generation_prompt=True)  # EOS </s>: appended after <|im_end|>
    assert qwen_tok.apply_chat_template(msgs, tokenize=False, chat_template=tpl.to_jinja()) == qwen_tok.decode(ids)
    assert "<|im_end|></s>" in qwen_tok.decode(ids)


# ---------------------------------------------------------------- stop tokens

def test_stop_token_ids(qwen_tok):
    eos, im_end = qwen_tok.eos_token_id, qwen_tok.convert_tokens_to_ids("<|im_end|>")
    assert get_template("domain_zh").stop_token_ids(qwen_tok) == [eos]
    assert get_template("alpaca").stop_token_ids(qwen_tok) == [eos]
    assert get_template("chatml").stop_token_ids(qwen_tok) == [eos, im_end]


def test_tokenizer_template_stops_at_its_turn_end(qwen_tok):
    """Regression: the chat_template teaches <|im_end|> (never EOS) after an answer, so generation must stop there."""
    tpl = get_template("tokenizer", qwen_tok)
    assert tpl.stop == ["<|im_end|>"]
    assert tpl.stop_token_ids(qwen_tok) == [qwen_tok.eos_token_id, qwen_tok.convert_tokens_to_ids("<|im_end|>")]
    _, _, ids, mask = _encode(qwen_tok, "tokenizer", CASES["plain"][0])
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    assert qwen_tok.convert_tokens_to_ids("<|im_end|>") in trained


@pytest.mark.parametrize("jinja, message", [
    ("{{ raise_exception('a system message is required') }}", "TemplateError: a system message is required"),
    ("{% for m in messages %}{{ m['content'] }", "TemplateSyntaxError"),
], ids=["raise_exception", "syntax_error"])
def test_tokenizer_template_that_fails_to_render_is_reported(qwen_tok, capsys, jinja, message):
    """Regression (issue 22, defect 5): a chat_template that failed on the stop-token probe was swallowed, so
    generation stopped only at EOS without a word. It is still not an error (the template may render the
    user's own conversations), but a warning on stderr names the template's error and the consequence."""
    tok = copy.deepcopy(qwen_tok)  # the fixture is shared by the session: never change it in place
    tok.chat_template = jinja
    tpl = get_template("tokenizer", tok)
    assert tpl.stop == [] and tpl.stop_token_ids(tok) == [tok.eos_token_id]
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("warning: the model's chat_template fails to render a user/assistant exchange (")
    assert message in err and "generation stops only at EOS" in err and "data.template: chatml" in err
    get_template("tokenizer", qwen_tok)  # a template that renders: no warning
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name, expected", [
    ("domain_zh", "Fill in {input} and {instruction}X {instruction}"),
    ("alpaca", "Fill in {input} and {instruction}\n\n### Input:\nX {instruction}"),
    ("chatml", "Fill in {input} and {instruction}\n\nX {instruction}"),
])
def test_join_instruction_substitutes_once(name, expected):
    """Regression: the format was filled with two str.replace calls, so an instruction containing the text
    "{input}" had the input spliced into it (and the input appeared twice)."""
    assert get_template(name).join_instruction("Fill in {input} and {instruction}", "X {instruction}") == expected
    custom = Template(name="c", instruction_input_format="<{input}|{instruction}|{input}>")
    assert custom.join_instruction("{input}", "{instruction}") == "<{instruction}|{input}|{instruction}>"
    assert custom.join_instruction("only", "") == "only"


STRICT_JINJA = (  # the Mistral / LLaMA-2 / Gemma way of refusing a conversation
    "{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)


def test_chat_template_rejection_is_a_user_error(qwen_tok):
    """Regression: raise_exception() in a chat_template escaped as jinja2.TemplateError (a traceback, or a
    500 in serve); also a template with a syntax error."""
    tpl = Template(name="tokenizer", kind="tokenizer", append_eos=False, chat_template=STRICT_JINJA)
    ok = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    ids, mask = tpl.encode(qwen_tok, ok)
    assert spans(qwen_tok, ids, mask) == [(False, "<s>[INST] q [/INST]"), (True, "a</s>")]
    with pytest.raises(UserError) as e:
        tpl.encode(qwen_tok, [{"role": "system", "content": "s"}] + ok)
    assert str(e.value) == ("the model's chat_template rejects this conversation (Conversation roles must alternate "
                            "user/assistant/user/assistant/...); change the data (e.g. drop the system message) or "
                            "use data.template: chatml (or another format template)")
    with pytest.raises(UserError, match="rejects this conversation"):
        tpl.encode(qwen_tok, [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}],
                   add_generation_prompt=True)
    broken = Template(name="tokenizer", kind="tokenizer", chat_template="{% for m in messages %}{{ m['content'] }")
    with pytest.raises(UserError, match="rejects this conversation"):
        broken.encode(qwen_tok, ok)


# ---------------------------------------------------------------- registry and template files

def test_get_template_errors(qwen_tok):
    with pytest.raises(UserError, match="unknown template 'nope': use one of domain_zh, alpaca, chatml, tokenizer"):
        get_template("nope")
    tok = train_tokenizer(["ab", "cd"] * 5, "qwen2", vocab_size=300)
    tok.chat_template = None
    with pytest.raises(UserError, match="has no chat_template; choose domain_zh, alpaca or chatml"):
        get_template("tokenizer", tok)


def test_template_file_roundtrip_and_custom_template(tmp_path, qwen_tok):
    chatml = get_template("chatml")
    chatml.save(tmp_path / "template.json")
    assert Template.load(tmp_path / "template.json") == chatml
    assert get_template(str(tmp_path / "template.json")) == chatml
    custom = {"name": "qa", "user_format": "Q: {content}\nA:", "assistant_format": " {content}", "turn_separator": "\n"}
    (tmp_path / "qa.json").write_text(json.dumps(custom), encoding="utf-8")
    tpl = get_template(str(tmp_path / "qa.json"))
    ids, mask = tpl.encode(qwen_tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert spans(qwen_tok, ids, mask) == [(False, "Q: hi\nA:"), (True, " yo</s>")]


@pytest.mark.parametrize("d, fragment", [
    ({"name": "x", "colour": "red"}, "unknown template field(s) ['colour']"),
    ({"user_format": "{content}"}, "a template needs a 'name'"),
    ({"name": "x", "user_format": "Q:"}, "user_format must contain {content}"),
])
def test_template_validation(d, fragment):
    with pytest.raises(UserError) as e:
        Template.from_dict(d, "my.json")
    assert str(e.value).startswith("my.json: ") and fragment in str(e.value)


def test_template_broken_json_names_line(tmp_path):
    p = tmp_path / "t.json"
    p.write_text('{\n "name": "x",\n "user_format": \n}', encoding="utf-8")
    with pytest.raises(UserError, match=r"t\.json line 4: not valid JSON"):
        Template.load(p)


# ---------------------------------------------------------------- transformers' max-length warning

TOO_LONG = "Token indices sequence length is longer than the specified maximum sequence length"


@pytest.mark.parametrize("name", ["domain_zh", "tokenizer"])
def test_encoding_long_samples_does_not_warn_about_model_max_length(name, tiny_corpus):
    """Regression: tokenising a sample longer than the tokenizer's model_max_length printed transformers'
    "Token indices sequence length is longer than ... will result in indexing errors", which misleads: samples are
    cut or dropped at data.cutoff_len by us (encode.py), never fed to the model whole."""
    tok = train_tokenizer(tiny_corpus[:50], "qwen2", vocab_size=400)  # fresh: transformers warns once per tokenizer
    tok.model_max_length = 8
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        tpl = get_template(name, tok)
        long = "孩子不爱吃饭怎么办？每次吃饭都要哄很久。" * 4
        msgs = [{"role": "user", "content": long}, {"role": "assistant", "content": long}]
        ids, _ = tpl.encode(tok, msgs)
        gen, _ = tpl.encode(tok, msgs[:1], add_generation_prompt=True)
        assert min(len(ids), len(gen)) > 8 * 4
        assert [r.getMessage() for r in records if TOO_LONG in r.getMessage()] == []
        tok(long)  # control: the same tokenizer, called without verbose=False, does warn (so the check above can fail)
        assert [r.getMessage() for r in records if TOO_LONG in r.getMessage()] != []
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
