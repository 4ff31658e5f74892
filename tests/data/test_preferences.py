"""Preference rows: the formats, every bad row named with its line, and the masks (only completion tokens and
EOS enter the preference loss, exactly the tokens SFT trains on)."""
from __future__ import annotations

import json

import pytest

from domaintune.config import build_config
from domaintune.data.encode import DataReport
from domaintune.data.preferences import (
    encode_preference,
    encode_preferences,
    load_preferences,
    parse_preference,
    render_preference,
)
from domaintune.data.templates import get_template
from domaintune.errors import UserError

Q, GOOD, BAD = "孩子不爱吃饭怎么办？", "先固定三餐时间，少给零食。", "随便吧。"


def write(tmp_path, rows, name="pref.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                 encoding="utf-8")
    return p


def test_the_three_pairwise_forms_give_the_same_prompt():
    tpl = get_template("domain_zh")
    rows = [{"prompt": Q, "chosen": GOOD, "rejected": BAD},
            {"instruction": Q, "input": "", "chosen": GOOD, "rejected": BAD},
            {"messages": [{"role": "user", "content": Q}], "chosen": {"role": "assistant", "content": GOOD},
             "rejected": [{"role": "assistant", "content": BAD}]}]
    parsed = [parse_preference(r, f"f line {i}", "dpo", tpl) for i, r in enumerate(rows)]
    assert {json.dumps(p.prompt) for p in parsed} == {json.dumps([{"role": "user", "content": Q}])}
    assert {(p.chosen, p.rejected) for p in parsed} == {(GOOD, BAD)}
    kto = parse_preference({"prompt": Q, "completion": GOOD, "label": True}, "f line 9", "kto", tpl)
    assert (kto.completion, kto.label, kto.paired) == (GOOD, True, False)


@pytest.mark.parametrize("row, problem", [
    ({"prompt": Q, "chosen": GOOD}, 'missing "rejected"'),
    ({"prompt": Q, "chosen": GOOD, "rejected": " " + GOOD + " "}, '"chosen" and "rejected" are identical'),
    ({"prompt": Q, "chosen": 3, "rejected": BAD}, '"chosen" must be a string or an assistant message, got a number'),
    ({"prompt": ["x"], "chosen": GOOD, "rejected": BAD}, '"prompt" must be a string, got a list'),
    ({"chosen": GOOD, "rejected": BAD}, 'missing the prompt: "prompt", "instruction" or "messages"'),
    ({"prompt": Q, "chosen": {"role": "user", "content": GOOD}, "rejected": BAD},
     '"chosen" must be an assistant message (role "assistant"), got role \'user\''),
    ({"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": GOOD}], "chosen": GOOD,
      "rejected": BAD}, '"messages" must end with a user turn'),
    ({"prompt": Q, "completion": GOOD, "label": True}, "train.stage dpo needs pairwise rows"),
    ({"prompt": Q, "chosen": "", "rejected": BAD}, '"chosen" is blank'),
    # Regression (issue 22, 19): "prompt" won and the instruction was dropped without a word.
    ({"prompt": Q, "instruction": "另一个问题", "chosen": GOOD, "rejected": BAD},
     '"prompt" and "instruction" are both given: a row has one prompt'),
    ({"instruction": Q, "messages": [{"role": "user", "content": "另一个问题"}], "chosen": GOOD, "rejected": BAD},
     '"instruction" and "messages" are both given'),
    ({"prompt": Q, "instruction": Q, "messages": [{"role": "user", "content": Q}], "chosen": GOOD, "rejected": BAD},
     '"prompt" and "instruction" and "messages" are all given'),
])
def test_bad_rows_are_refused_with_their_line(tmp_path, row, problem):
    path = write(tmp_path, [{"prompt": Q, "chosen": GOOD, "rejected": BAD}, row])
    with pytest.raises(UserError) as e:
        load_preferences(path, "dpo", get_template("domain_zh"))
    assert f"{path} line 2: " in str(e.value) and problem in str(e.value)
    assert "line 1" not in str(e.value)


def test_kto_labels_must_be_booleans(tmp_path):
    path = write(tmp_path, [{"prompt": Q, "completion": GOOD, "label": "yes"}])
    with pytest.raises(UserError, match=r'line 1: "label" must be true \(a good completion\) or false'):
        load_preferences(path, "kto", get_template("domain_zh"))


def test_every_bad_row_is_reported_at_once(tmp_path):
    path = write(tmp_path, ['{"prompt": "a", "chosen": "b", "rejected": "b"}',
                            {"prompt": Q, "chosen": GOOD, "rejected": BAD}, {"prompt": Q}])
    with pytest.raises(UserError) as e:
        load_preferences(path, "orpo", get_template("domain_zh"))
    msg = str(e.value)
    assert msg.startswith("2 invalid preference row(s)")
    assert "line 1:" in msg and "line 3:" in msg and "line 2:" not in msg
    broken = write(tmp_path, [{"prompt": Q, "chosen": GOOD, "rejected": BAD}, "not json"], "broken.jsonl")
    with pytest.raises(UserError, match=r"broken.jsonl line 2: not valid JSON"):
        load_preferences(broken, "dpo", get_template("domain_zh"))


@pytest.mark.parametrize("template", ["domain_zh", "chatml", "alpaca"])
def test_only_completion_tokens_and_eos_enter_the_loss(template, qwen_tok, llama_tok):
    """The completion ids are exactly the tokens SFT marks trainable for the same conversation: the answer,
    the template's closing tokens and EOS; the prompt ids are SFT's generation prompt (BOS included)."""
    for tok in (qwen_tok, llama_tok):
        tpl = get_template(template, tok)
        ex = parse_preference({"system": "你是助手。", "prompt": Q, "chosen": GOOD, "rejected": BAD}, "f line 1",
                              "dpo", tpl)
        prompt_ids, completions = encode_preference(ex, tok, tpl, None)
        assert prompt_ids == tpl.encode(tok, ex.prompt, add_generation_prompt=True)[0]
        for (ids, _), answer in zip(completions, (GOOD, BAD), strict=True):
            full, trainable = tpl.encode(tok, ex.prompt + [{"role": "assistant", "content": answer}])
            assert full == prompt_ids + ids
            assert [t for t, m in zip(full, trainable, strict=True) if m] == ids
            assert ids[-1] == tok.eos_token_id and tok.decode(ids, skip_special_tokens=True).startswith(answer)
        assert [g for _, g in completions] == [True, False]


def test_data_system_goes_into_rows_without_a_system_message(qwen_tok):
    tpl = get_template("chatml", qwen_tok)
    ex = parse_preference({"prompt": Q, "chosen": GOOD, "rejected": BAD}, "f line 1", "dpo", tpl)
    with_sys, _ = encode_preference(ex, qwen_tok, tpl, "你是育儿助手。")
    assert "你是育儿助手。" in qwen_tok.decode(with_sys) and "你是育儿助手。" not in qwen_tok.decode(
        encode_preference(ex, qwen_tok, tpl, None)[0])


def _data_cfg(path, **kw):
    return build_config({"model": {"name_or_path": "x"}, "data": {"path": str(path), **kw}}, "t").data


def test_overlength_rows_are_cut_dropped_or_refused_and_counted(tmp_path, qwen_tok):
    tpl = get_template("domain_zh", qwen_tok)
    long = "很长的回答。" * 80
    path = write(tmp_path, [{"prompt": Q, "chosen": GOOD, "rejected": BAD},
                            {"prompt": Q, "chosen": long, "rejected": BAD},
                            {"prompt": long, "chosen": GOOD, "rejected": BAD}])
    examples = load_preferences(path, "dpo", tpl)
    cut = 64
    report = DataReport(overlength_policy="truncate")
    rows = encode_preferences(examples, qwen_tok, tpl, _data_cfg(path, cutoff_len=cut), False, report)
    assert len(rows) == 2 and max(len(r["prompt_ids"]) + len(r["chosen_ids"]) for r in rows) == cut
    assert (report.overlength, report.truncated, report.dropped_no_target) == (2, 1, 1)
    assert report.no_target_rows == [f"{path} line 3"] and report.overlength_rows[0].startswith(f"{path} line 2:")
    report = DataReport(overlength_policy="drop")
    rows = encode_preferences(examples, qwen_tok, tpl, _data_cfg(path, cutoff_len=cut, overlength="drop"), False,
                              report)
    assert len(rows) == 1 and report.dropped_overlength == 2
    with pytest.raises(UserError, match=r"2 row\(s\) exceed data.cutoff_len=64 \(data.overlength: error\)"):
        encode_preferences(examples, qwen_tok, tpl, _data_cfg(path, cutoff_len=cut, overlength="error"), False,
                           DataReport())


def test_kto_takes_pairs_as_a_good_and_a_bad_completion(tmp_path, qwen_tok):
    tpl = get_template("domain_zh", qwen_tok)
    path = write(tmp_path, [{"prompt": Q, "chosen": GOOD, "rejected": BAD},
                            {"prompt": Q, "completion": BAD, "label": False}])
    rows = encode_preferences(load_preferences(path, "kto", tpl), qwen_tok, tpl, _data_cfg(path), True, DataReport())
    assert [r["label"] for r in rows] == [True, False, False]
    assert rows[0]["prompt_ids"] == rows[1]["prompt_ids"] == rows[2]["prompt_ids"]
    assert rows[1]["completion_ids"] == rows[2]["completion_ids"]


def test_render_marks_both_completions(qwen_tok):
    tpl = get_template("domain_zh", qwen_tok)
    ex = parse_preference({"prompt": Q, "chosen": GOOD, "rejected": BAD}, "f line 1", "dpo", tpl)
    prompt_ids, ((c, _), (r, _)) = encode_preference(ex, qwen_tok, tpl, None)
    text = render_preference(qwen_tok, {"prompt_ids": prompt_ids, "chosen_ids": c, "rejected_ids": r})
    assert f"用户:{Q}\n\n助手:«{GOOD}</s>»" in text and f"«{BAD}</s>»" in text


def test_preference_sources_mix_like_sft_data(tmp_path, qwen_tok):
    """Preference pairs from two sources (JSON lines, and CSV with its columns mapped), mixed by row count: the counts
    per source, and a bad row named by its file and line."""
    from domaintune.data.preferences import build_preference_data

    a = write(tmp_path, [{"prompt": f"{Q}{k}", "chosen": GOOD, "rejected": BAD} for k in range(6)])
    (tmp_path / "b.csv").write_text("question,good,bad\n" + "".join(f"q{k},{GOOD},{BAD}\n" for k in range(4)),
                                    encoding="utf-8")
    srcs = [{"path": str(a), "rows": 3},
            {"path": str(tmp_path / "b.csv"), "columns": {"prompt": "question", "chosen": "good", "rejected": "bad"}}]
    cfg = build_config({"data": {"path": srcs, "template": "domain_zh", "val_size": 0}}, "x").data
    data = build_preference_data(cfg, qwen_tok, get_template("domain_zh", qwen_tok), "dpo", seed=0)
    assert [(c.read, c.sampled) for c in data.report.sources] == [(6, 3), (4, 4)] and len(data.train) == 7
    (tmp_path / "b.csv").write_text(f"question,good,bad\nq,{GOOD},{GOOD}\n", encoding="utf-8")
    with pytest.raises(UserError, match=f"{tmp_path / 'b.csv'} line 2: .*identical"):
        build_preference_data(cfg, qwen_tok, get_template("domain_zh", qwen_tok), "dpo", seed=0)
