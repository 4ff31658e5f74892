"""Identity data, prompt templates, seed files, the config section and the gen-data CLI handler."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from domaintune.cli.datagen import register
from domaintune.config.selfinstruct import Persona, SelfInstructConfig
from domaintune.datagen.identity import identity_rows, run_identity
from domaintune.datagen.inputs import builtin_template, load_seeds, load_template, render
from domaintune.errors import UserError
from fake_llm_server import FakeLLM

REPO = Path(__file__).resolve().parents[2]
PERSONA = Persona(name="小知", organisation="知家实验室", year=2024)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_identity_rows_fill_the_persona():
    zh = identity_rows(PERSONA, "zh", domain="家庭教育")
    en = identity_rows(Persona(name="Kiko", organisation="Acme Labs", year=2024), "en", domain="family education")
    assert len(zh) == 12 and len(en) == 12
    assert zh[0] == {"instruction": "你是谁？", "input": "",
                     "output": "我是小知，由知家实验室于2024年开发的家庭教育领域的AI助手。有什么可以帮你的吗？"}
    assert en[3] == {"instruction": "Who made you?", "input": "",
                     "output": "I was developed by Acme Labs. My name is Kiko."}
    assert en[0]["output"] == ("I am Kiko, an AI assistant for family education developed by Acme Labs in 2024. "
                               "How can I help you?")
    for row in zh + en:
        assert not re.search(r"\{\w+\}", row["instruction"] + row["output"])
    assert identity_rows(PERSONA, "both") == identity_rows(PERSONA, "zh") + identity_rows(PERSONA, "en")
    assert identity_rows(PERSONA, "zh")[0]["output"].startswith("我是小知，由知家实验室于2024年开发的AI助手。")


def test_run_identity_writes_files(tmp_path):
    cfg = SelfInstructConfig(persona=PERSONA, domain="家庭教育", output_dir=str(tmp_path / "o"), write_messages=True)
    path = run_identity(cfg)
    assert path == tmp_path / "o" / "identity.jsonl"
    rows = read_jsonl(path)
    assert rows == identity_rows(PERSONA, "zh", "家庭教育")
    msgs = read_jsonl(tmp_path / "o" / "identity.messages.jsonl")
    assert msgs[1] == {"messages": [{"role": "user", "content": "你叫什么名字？"},
                                    {"role": "assistant",
                                     "content": "我叫小知，是知家实验室开发的家庭教育领域的AI助手。"}]}


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_builtin_templates_fill_every_placeholder(lang):
    values = dict(domain="DOMAINX", name="NAMEX", organisation="ORGX", year=1999)
    q = render(builtin_template("question", lang), examples="1. EX1\n2. EX2", num_examples=2, num_questions=7, **values)
    a = render(builtin_template("answer", lang), question="QUESTIONX", **values)
    assert not re.search(r"\{\w+\}", q + a)
    for token in ("DOMAINX", "NAMEX", "ORGX", "1999", "1. EX1\n2. EX2", "7"):
        assert token in q
    for token in ("DOMAINX", "NAMEX", "ORGX", "1999", "QUESTIONX"):
        assert token in a


def test_render_leaves_unknown_braces():
    assert render('{"a": 1} {question} {other}', question="Q") == '{"a": 1} Q {other}'


def test_user_template_needs_its_placeholder(tmp_path):
    t = tmp_path / "q.txt"
    t.write_text("Write {num_questions} questions about {domain}.", encoding="utf-8")
    with pytest.raises(UserError, match=r"q.txt: the question template has no \{examples\} placeholder"):
        load_template(SelfInstructConfig(question_template=str(t)), "question")
    with pytest.raises(UserError, match=r"selfinstruct.answer_template '.*nope.txt' not found"):
        load_template(SelfInstructConfig(answer_template=str(tmp_path / "nope.txt")), "answer")
    assert load_template(SelfInstructConfig(language="en"), "answer") == builtin_template("answer", "en")


def test_seed_errors_name_file_and_line(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text('{"question": "一个问题？"}\n\n{"q": "x"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"s.jsonl line 3: missing \"question\""):
        load_seeds(str(p))
    p.write_text('{"question": "一个问题？"}\nnot json\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"s.jsonl line 2: not valid JSON"):
        load_seeds(str(p))
    p.write_text('{"question": " 一个问题？ "}\n', encoding="utf-8")
    assert load_seeds(str(p)) == ["一个问题？"]
    with pytest.raises(UserError, match="seeds_path is not set"):
        load_seeds("")


def test_every_bad_seed_line_is_named_at_once(tmp_path):
    """Regression (issue 22, 31): a broken JSON line and a row without a question were reported one run apiece."""
    p = tmp_path / "s.jsonl"
    p.write_text('{"question": "一个问题？"}\n{"q": "x"}\nnot json\n{"question": ""}\n', encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_seeds(str(p))
    assert str(e.value).split("\n  ") == [
        "3 invalid seed question(s); fix them and run again:", f'{p} line 2: missing "question" (a non-empty string)',
        f"{p} line 3: not valid JSON (Expecting value at column 1); each line must hold one JSON object",
        f'{p} line 4: missing "question" (a non-empty string)']


def test_seed_file_read_like_training_data(tmp_path):
    """Regression: invalid UTF-8 gave a UnicodeDecodeError traceback, and a question holding U+2028 was cut in two
    (line iteration splits there): seeds are read by data.reader.read_records now."""
    p = tmp_path / "s.jsonl"
    p.write_bytes('{"question": "一个问题？"}\n'.encode() + b'{"question": "\xff\xfe"}\n')
    with pytest.raises(UserError) as e:
        load_seeds(str(p))
    assert str(e.value) == f"{p} line 2: invalid UTF-8 (byte offset 46); re-save the file as UTF-8"
    p.write_text(json.dumps({"question": "第一行\u2028第二行"}, ensure_ascii=False) + "\r\n\r\n"
                 + json.dumps({"question": "二"}) + "\n", encoding="utf-8")
    assert load_seeds(str(p)) == ["第一行\u2028第二行", "二"]
    for body in ("", "\n \n", "\ufeff"):
        p.write_text(body, encoding="utf-8")
        with pytest.raises(UserError) as e:
            load_seeds(str(p))
        assert str(e.value) == f'{p}: no seed questions; add lines like {{"question": "..."}}'


def test_config_rejects_unknown_keys_and_has_descriptions():
    with pytest.raises(Exception, match="extra"):
        SelfInstructConfig(api_key="sk-secret")
    for cls in (SelfInstructConfig, Persona):
        for name, field in cls.model_fields.items():
            assert field.description and "\n" not in field.description, name


def make_parser():
    parser = argparse.ArgumentParser(prog="domaintune")
    register(parser.add_subparsers(dest="verb"))
    return parser


def test_every_option_states_its_default():
    sub = make_parser()._subparsers._group_actions[0].choices["gen-data"]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert "%(default)s" in action.help, action.dest


def test_shipped_config_first_line_and_values():
    text = (REPO / "configs" / "selfinstruct.yaml").read_text(encoding="utf-8")
    assert text.splitlines()[0] == "# domaintune gen-data configs/selfinstruct.yaml"
    from domaintune.config import load_config

    cfg = load_config(REPO / "configs" / "selfinstruct.yaml",
                      ["selfinstruct.base_url=http://127.0.0.1:8000/v1"]).selfinstruct
    assert (cfg.domain, cfg.language, cfg.seeds_path) == ("家庭教育", "zh", "examples/data/seeds.jsonl")
    assert cfg.base_url == "http://127.0.0.1:8000/v1"


def test_cli_identity_and_gen_data(tmp_path, monkeypatch, capsys):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"question": "How can parents support alpha bravo charlie?"}\n', encoding="utf-8")
    (tmp_path / "q.txt").write_text("QUESTIONS {num_questions}\n{examples}", encoding="utf-8")
    (tmp_path / "a.txt").write_text("ANSWER: {question}", encoding="utf-8")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "selfinstruct:\n  domain: parenting\n  language: en\n"
        f"  seeds_path: {seeds}\n  question_template: {tmp_path / 'q.txt'}\n  answer_template: {tmp_path / 'a.txt'}\n"
        f"  num_questions: 4\n  questions_per_call: 2\n  output_dir: {tmp_path / 'out'}\n", encoding="utf-8")
    parser = make_parser()

    args = parser.parse_args(["gen-data", str(cfg), "selfinstruct.persona.name=Kiko", "--identity",
                              "--identity-language", "both"])
    assert args.func(args) == 0
    rows = read_jsonl(tmp_path / "out" / "identity.jsonl")
    assert len(rows) == 24 and rows[12]["instruction"] == "Who are you?" and "Kiko" in rows[12]["output"]
    assert capsys.readouterr().out == f"wrote 24 identity rows to {tmp_path / 'out' / 'identity.jsonl'}\n"

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeLLM(questions_per_reply=2) as srv:
        args = parser.parse_args(["gen-data", str(cfg), f"selfinstruct.base_url={srv.base_url}"])
        assert args.func(args) == 0
        assert {e["auth"] for e in srv.log} == {"Bearer EMPTY"}  # no key set: a placeholder, not a crash
    out = capsys.readouterr().out
    assert out.startswith(f"wrote 4 rows to {tmp_path / 'out' / 'train.jsonl'}")
    assert len(read_jsonl(tmp_path / "out" / "train.jsonl")) == 4

    # An endpoint that cannot deliver: exit code 1 and a warning, not silence.
    with FakeLLM(questions_per_reply=0) as srv:
        args = parser.parse_args(["gen-data", str(cfg), f"selfinstruct.base_url={srv.base_url}",
                                  "selfinstruct.num_questions=6", "selfinstruct.max_stalled_calls=2"])
        assert args.func(args) == 1
    err = capsys.readouterr().err
    assert "train.jsonl has 4 of 6 rows: target not reached: the last 2 question calls kept no new question" in err
