"""data: reading (JSONL, JSON arrays, BOM, CRLF), validation errors naming file + line + problem, labels and
masks, over-length policies and their counts, the validation split, and `domaintune data-check`."""
from __future__ import annotations

import json
import statistics

import pytest

from chat_templates import STRICT_CHATML
from domaintune import cli
from domaintune.config import build_config
from domaintune.data.encode import (
    IGNORE_INDEX,
    DataReport,
    encode_example,
    encode_examples,
    render_masked,
    split_validation,
    validation_rows,
)
from domaintune.data.examples import MAX_ERRORS_SHOWN, Example, load_examples, parse_example
from domaintune.data.prepare import build_datasets
from domaintune.data.reader import read_records
from domaintune.data.templates import get_template
from domaintune.errors import UserError
from domaintune.training.tiny import make_tiny_model


def data_cfg(**kw):
    return build_config({"data": kw}).data


def write(path, rows_or_text, encoding="utf-8"):
    if isinstance(rows_or_text, bytes):
        path.write_bytes(rows_or_text)
    elif isinstance(rows_or_text, str):
        path.write_text(rows_or_text, encoding=encoding)
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows_or_text), encoding=encoding)
    return path


ROWS = [
    {"instruction": "孩子不爱吃饭怎么办？", "input": "", "output": "规律进餐，少吃零食。"},
    {"instruction": "How do I talk about online safety?", "input": "She is 12.",
     "output": "Start with open questions."},
    {"messages": [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"},
                  {"role": "assistant", "content": "您好！"}, {"role": "user", "content": "孩子怕黑"},
                  {"role": "assistant", "content": "陪她检查床底。"}]},
]


# ---------------------------------------------------------------- reading: accepted forms

def test_jsonl_rows_become_messages(tmp_path):
    exs = load_examples(write(tmp_path / "d.jsonl", ROWS))
    assert [e.messages for e in exs] == [
        [{"role": "user", "content": "孩子不爱吃饭怎么办？"}, {"role": "assistant", "content": "规律进餐，少吃零食。"}],
        [{"role": "user", "content": "How do I talk about online safety?She is 12."},
         {"role": "assistant", "content": "Start with open questions."}],
        ROWS[2]["messages"],
    ]
    assert [e.where for e in exs] == [f"{tmp_path / 'd.jsonl'} line {n}" for n in (1, 2, 3)]
    assert [e.index for e in exs] == [0, 1, 2]


def test_instruction_input_joined_by_template(tmp_path):
    ex = parse_example(ROWS[1], "x", template=get_template("alpaca"))
    assert ex.messages[0]["content"] == "How do I talk about online safety?\n\n### Input:\nShe is 12."


def test_system_and_history_rows():
    ex = parse_example({"instruction": "q2", "output": "a2", "system": "S", "history": [["q1", "a1"]]}, "x")
    assert ex.messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                           {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                           {"role": "assistant", "content": "a2"}]
    assert ex.prompt_and_target() == (ex.messages[:-1], "a2")


@pytest.mark.parametrize("variant", ["array", "bom", "crlf_blank", "array_bom_crlf"])
def test_accepted_variants_equal_plain_jsonl(tmp_path, variant):
    plain = load_examples(write(tmp_path / "plain.jsonl", ROWS))
    lines = [json.dumps(r, ensure_ascii=False) for r in ROWS]
    body = {
        "array": "[\n" + ",\n".join(lines) + "\n]\n",
        "bom": "\ufeff" + "\n".join(lines) + "\n",
        "crlf_blank": "\r\n\r\n" + "\r\n\r\n".join(lines) + "\r\n\r\n",
        "array_bom_crlf": "\ufeff  [" + ",\r\n".join(lines) + "]\r\n",
    }[variant]
    p = tmp_path / ("d.json" if "array" in variant else "d.jsonl")
    p.write_bytes(body.encode("utf-8"))
    got = load_examples(p)
    assert [e.messages for e in got] == [e.messages for e in plain]
    assert [e.index for e in got] == [0, 1, 2]


def test_line_numbers_count_blank_lines_and_array_rows(tmp_path):
    p = write(tmp_path / "d.jsonl", "\n" + json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    assert [n for n, _ in read_records(p)] == [2, 4]
    p = write(tmp_path / "d.json", "[\n  " + json.dumps(ROWS[0]) + ",\n\n  " + json.dumps(ROWS[1]) + "\n]")
    assert [n for n, _ in read_records(p)] == [2, 4]


def test_prediction_rows_need_no_answer(tmp_path):
    p = write(tmp_path / "t.jsonl", [{"instruction": "q"}, {"messages": [{"role": "user", "content": "hi"}]}])
    exs = load_examples(p, require_answer=False)
    assert [e.prompt_and_target() for e in exs] == [([{"role": "user", "content": "q"}], ""),
                                                   ([{"role": "user", "content": "hi"}], "")]


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85"])
def test_line_separators_inside_values_stay_in_the_row(tmp_path, sep):
    """Regression: `json.dumps(ensure_ascii=False)` writes U+2028/U+2029/U+0085 raw, and str.splitlines() split
    rows there, so a valid JSON-lines file was rejected as broken JSON."""
    rows = [{"instruction": f"第一行{sep}第二行", "output": f"答案{sep}好"}, {"instruction": "q2", "output": "a2"}]
    p = write(tmp_path / "d.jsonl", rows)
    assert sep in p.read_text(encoding="utf-8")  # written raw, not escaped
    assert read_records(p) == [(1, rows[0]), (2, rows[1])]
    exs = load_examples(p)
    assert [e.messages for e in exs] == [
        [{"role": "user", "content": f"第一行{sep}第二行"}, {"role": "assistant", "content": f"答案{sep}好"}],
        [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}],
    ]
    assert [e.where for e in exs] == [f"{p} line 1", f"{p} line 2"]


def test_line_numbers_after_a_value_with_a_line_separator(tmp_path):
    p = write(tmp_path / "d.jsonl", json.dumps({"instruction": "a\u2028b", "output": "c"}, ensure_ascii=False)
              + "\r\n\r\n" + '{"instruction": "q", "output": \r\n')
    assert _error(p) == (f"{p} line 3: not valid JSON (Expecting value at column 32); "
                         "each line must hold one JSON object")


# ---------------------------------------------------------------- reading: errors name file, line, problem

def _error(path) -> str:
    with pytest.raises(UserError) as e:
        load_examples(path)
    return str(e.value)


def _row_error(tmp_path, rows, name="d.jsonl") -> str:
    p = write(tmp_path / name, rows)
    msg = _error(p)
    head, _, rest = msg.partition("\n  ")
    assert head.endswith("invalid row(s); fix them and run again:")
    return rest


def test_broken_json_line(tmp_path):
    p = write(tmp_path / "d.jsonl", json.dumps(ROWS[0]) + '\n{"instruction": "q", "output": \n')
    assert _error(p) == (f"{p} line 2: not valid JSON (Expecting value at column 32); "
                         "each line must hold one JSON object")


def test_two_objects_on_one_line(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"instruction": "q", "output": "a"} {"instruction": "q"}\n')
    assert _error(p).startswith(f"{p} line 1: not valid JSON (Extra data at column 37)")


def test_missing_and_blank_output(tmp_path):
    p = tmp_path / "d.jsonl"
    rest = _row_error(tmp_path, [ROWS[0], {"instruction": "q"}, {"instruction": "q", "output": "  \n"},
                                 {"instruction": "q", "output": None}])
    assert rest.split("\n  ") == [f'{p} line 2: missing "output"',
                                  f'{p} line 3: "output" is blank; every training row needs an answer',
                                  f'{p} line 4: missing "output"']


@pytest.mark.parametrize("row, problem", [
    ({"instruction": "q", "output": 5}, '"output" must be a string, got a number'),
    ({"instruction": ["q"], "output": "a"}, '"instruction" must be a string, got a list'),
    ({"instruction": "q", "input": {"x": 1}, "output": "a"}, '"input" must be a string, got an object'),
    ({"instruction": "q", "output": "a", "system": True}, '"system" must be a string, got true/false'),
    ({"instruction": " ", "output": "a"}, '"instruction" is blank'),
    ({"output": "a"}, "missing \"instruction\" (or \"messages\"); found fields ['output']"),
    ({"instruction": "q", "output": "a", "history": "q1 a1"},
     '"history" must be a list of [question, answer] pairs, got a string'),
    ({"instruction": "q", "output": "a", "history": [["q1"]]},
     '"history"[0] must be a [question, answer] pair of strings'),
    ({"instruction": "q", "output": "a", "history": [["q1", ""]]}, '"history"[0] has a blank question or answer'),
    (["q", "a"], "expected a JSON object, got a list"),
    ({"messages": "hi"}, '"messages" must be a non-empty list of {"role", "content"} objects'),
    ({"messages": []}, '"messages" must be a non-empty list of {"role", "content"} objects'),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
     "messages[0].content must be a string, got a number"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
     "messages[1].role 'bot' is not one of system/user/assistant/tool"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
     "messages[1].content is blank"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "a"}]}, "messages[1]: a system message may only come first"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]},
     "turns must alternate user/assistant starting with user; turn 2 is 'user'"),
    ({"messages": [{"role": "user", "content": "q"}]}, "the last message must be an assistant answer to train on"),
    ({"messages": [{"role": "system", "content": "s"}]}, '"messages" has no user turn'),
])
def test_invalid_rows(tmp_path, row, problem):
    p = tmp_path / "d.jsonl"
    assert _row_error(tmp_path, [ROWS[0], row]) == f"{p} line 2: {problem}"


def test_many_errors_are_summarised(tmp_path):
    msg = _error(write(tmp_path / "d.jsonl", [{"instruction": "q"}] * 13))
    lines = msg.splitlines()
    assert lines[0] == "13 invalid row(s); fix them and run again:"
    assert len(lines) == 1 + 10 + 1 and lines[-1] == "  ... and 3 more"


def test_invalid_utf8(tmp_path):
    p = write(tmp_path / "d.jsonl", json.dumps(ROWS[0]).encode() + b'\n{"instruction": "\xff\xfe", "output": "a"}\n')
    assert _error(p).startswith(f"{p} line 2: invalid UTF-8")
    assert _error(p).endswith("re-save the file as UTF-8")
    p = write(tmp_path / "gbk.jsonl", '{"instruction": "孩子", "output": "好"}\n', encoding="gbk")
    assert _error(p).startswith(f"{p} line 1: invalid UTF-8")


@pytest.mark.parametrize("body", ["", "\n\n  \r\n", "\ufeff"])
def test_empty_file(tmp_path, body):
    p = write(tmp_path / "d.jsonl", body.encode("utf-8"))
    assert _error(p) == f"{p}: the file is empty; it needs at least one row"


def test_missing_file(tmp_path):
    assert _error(tmp_path / "nope.jsonl") == f"data file '{tmp_path / 'nope.jsonl'}' not found"


@pytest.mark.parametrize("body, problem", [
    ("[]", ": the JSON array is empty; it needs at least one row"),
    ('[\n {"instruction": "q", "output": "a"}\n {"instruction": "q2", "output": "b"}\n]',
     " line 3: expected ',' or ']' in the JSON array"),
    ('[\n {"instruction": "q", "output": "a"},\n {"instruction": "q2", "output": }\n]',
     " line 3: not valid JSON (Expecting value at column 34)"),
    ('[\n {"instruction": "q", "output": "a"},\n {"instruction": "q2", "output": "b"}\n',
     " line 4: expected ',' or ']' in the JSON array"),
    # regression: text after the closing bracket used to be ignored silently
    ('[\n {"instruction": "q", "output": "a"}\n]\n[\n {"instruction": "q2", "output": "b"}\n]\n',
     " line 4: unexpected text after the closing ']' of the JSON array"),
])
def test_json_array_errors(tmp_path, body, problem):
    p = write(tmp_path / "d.json", body)
    assert _error(p) == f"{p}{problem}"


def test_json_array_row_errors_name_the_row_line(tmp_path):
    p = tmp_path / "d.json"
    assert _row_error(tmp_path, '[\n {"instruction": "q", "output": "a"},\n\n {"instruction": "q2"}\n]', "d.json") \
        == f'{p} line 4: missing "output"'


# ---------------------------------------------------------------- labels and masks

def _prompt_len(tok, tpl, messages):
    return len(tpl.encode(tok, messages[:-1], add_generation_prompt=True)[0])


def test_labels_mask_prompts_and_keep_answers(qwen_tok):
    tpl = get_template("domain_zh")
    ex = parse_example(ROWS[2], "x", template=tpl)
    sample, n = encode_example(ex, qwen_tok, tpl, cutoff_len=512)
    ids, labels = sample["input_ids"], sample["labels"]
    assert n == len(ids) and sample["attention_mask"] == [1] * n
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels, strict=True))
    trained = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert qwen_tok.decode(trained) == "您好！</s>陪她检查床底。</s>"
    assert qwen_tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab == IGNORE_INDEX]) == \
        "你是助手。\n\n用户:你好\n\n助手:\n\n用户:孩子怕黑\n\n助手:"
    assert render_masked(qwen_tok, sample) == \
        "你是助手。\n\n用户:你好\n\n助手:«您好！</s>»\n\n用户:孩子怕黑\n\n助手:«陪她检查床底。</s>»"


def test_train_on_inputs_trains_everything(llama_tok):
    tpl = get_template("alpaca")
    ex = parse_example(ROWS[1], "x", template=tpl)
    sample, _ = encode_example(ex, llama_tok, tpl, cutoff_len=512, train_on_inputs=True)
    assert sample["labels"] == sample["input_ids"]
    assert sample["input_ids"][0] == llama_tok.bos_token_id
    masked, _ = encode_example(ex, llama_tok, tpl, cutoff_len=512)
    assert masked["input_ids"] == sample["input_ids"]
    assert masked["labels"][0] == IGNORE_INDEX  # BOS is never a target when prompts are masked


def test_config_system_only_when_row_has_none(qwen_tok):
    tpl = get_template("domain_zh")
    own = parse_example({"instruction": "q", "output": "a", "system": "ROW"}, "x")
    bare = parse_example({"instruction": "q", "output": "a"}, "x")
    s1, _ = encode_example(own, qwen_tok, tpl, 512, system="CFG")
    s2, _ = encode_example(bare, qwen_tok, tpl, 512, system="CFG")
    assert qwen_tok.decode(s1["input_ids"]) == "ROW\n\n用户:q\n\n助手:a</s>"
    assert qwen_tok.decode(s2["input_ids"]) == "CFG\n\n用户:q\n\n助手:a</s>"


# ---------------------------------------------------------------- over-length policies

LONG = {"instruction": "孩子不爱吃饭怎么办？每次吃饭都要哄很久，我试了很多方法都没有用。", "output": "先别着急。" * 12}
SHORT = {"instruction": "你好", "output": "您好！"}


def _examples(rows):
    return [parse_example(r, f"d.jsonl line {k + 1}") for k, r in enumerate(rows)]


@pytest.fixture(scope="module")
def lens(qwen_tok):
    tpl = get_template("domain_zh")
    long_ex, short_ex = _examples([LONG, SHORT])
    full = len(tpl.encode(qwen_tok, long_ex.messages)[0])
    prompt = _prompt_len(qwen_tok, tpl, long_ex.messages)
    short = len(tpl.encode(qwen_tok, short_ex.messages)[0])
    assert short <= prompt < prompt + 5 < full  # cutoffs prompt and prompt + 5 cut only LONG
    return {"full": full, "prompt": prompt, "short": short, "tpl": tpl}


def test_truncate_cuts_and_counts(qwen_tok, lens):
    cutoff = lens["prompt"] + 5
    report = DataReport()
    out = encode_examples(_examples([SHORT, LONG]), qwen_tok, lens["tpl"], data_cfg(cutoff_len=cutoff), report)
    assert len(out) == 2
    cut = out[1]
    assert len(cut["input_ids"]) == len(cut["labels"]) == cutoff
    assert sum(lab != IGNORE_INDEX for lab in cut["labels"]) == 5
    assert qwen_tok.decode(cut["input_ids"][: lens["prompt"]]) == f"用户:{LONG['instruction']}\n\n助手:"
    assert (report.overlength, report.truncated, report.dropped_overlength, report.dropped_no_target) == (1, 1, 0, 0)
    assert report.lengths == [lens["short"], lens["full"]]  # lengths before truncation


def test_truncate_drops_sample_whose_answer_starts_beyond_cutoff(qwen_tok, lens):
    report = DataReport()
    out = encode_examples(_examples([SHORT, LONG]), qwen_tok, lens["tpl"], data_cfg(cutoff_len=lens["prompt"]), report)
    assert len(out) == 1 and qwen_tok.decode(out[0]["input_ids"]) == "用户:你好\n\n助手:您好！</s>"
    assert (report.overlength, report.truncated, report.dropped_overlength, report.dropped_no_target) == (1, 0, 0, 1)
    assert all(any(lab != IGNORE_INDEX for lab in s["labels"]) for s in out)


def test_truncate_keeps_multi_turn_sample_with_an_earlier_answer(qwen_tok, lens):
    row = {"instruction": LONG["instruction"], "output": LONG["output"], "history": [["你好", "您好！"]]}
    ex = _examples([row])
    tpl = lens["tpl"]
    first_answer_end = len(tpl.encode(qwen_tok, ex[0].messages[:2])[0])
    report = DataReport()
    out = encode_examples(ex, qwen_tok, tpl, data_cfg(cutoff_len=first_answer_end + 2), report)
    trained = [i for i, lab in zip(out[0]["input_ids"], out[0]["labels"], strict=True) if lab != IGNORE_INDEX]
    assert qwen_tok.decode(trained) == "您好！</s>"
    assert (report.overlength, report.truncated, report.dropped_no_target) == (1, 1, 0)


def test_drop_removes_and_counts(qwen_tok, lens):
    report = DataReport(overlength_policy="drop")
    cfg = data_cfg(cutoff_len=lens["prompt"] + 5, overlength="drop")
    out = encode_examples(_examples([SHORT, LONG, SHORT]), qwen_tok, lens["tpl"], cfg, report)
    assert [qwen_tok.decode(s["input_ids"]) for s in out] == ["用户:你好\n\n助手:您好！</s>"] * 2
    assert (report.overlength, report.truncated, report.dropped_overlength, report.dropped_no_target) == (1, 0, 1, 0)


def test_error_lists_the_lines(qwen_tok, lens):
    cutoff = lens["prompt"] + 5
    cfg = data_cfg(cutoff_len=cutoff, overlength="error")
    with pytest.raises(UserError) as e:
        encode_examples(_examples([SHORT, LONG, SHORT, LONG]), qwen_tok, lens["tpl"], cfg, DataReport())
    assert str(e.value) == (
        f"2 sample(s) exceed data.cutoff_len={cutoff} (data.overlength: error):\n"
        f"  d.jsonl line 2: {lens['full']} tokens\n  d.jsonl line 4: {lens['full']} tokens\n"
        "Raise data.cutoff_len, or set data.overlength to truncate or drop.")


def test_report_names_over_length_and_dropped_rows(qwen_tok, lens):
    """Regression: a sample dropped with nothing to train on (or cut at cutoff_len) was counted, but which row
    it was appeared nowhere, neither printed nor in run_info.json."""
    longer = {"instruction": LONG["instruction"] * 2, "output": "好"}  # its prompt alone is over the cutoff
    report = DataReport()
    out = encode_examples(_examples([SHORT, LONG, longer, SHORT]), qwen_tok, lens["tpl"],
                          data_cfg(cutoff_len=lens["prompt"] + 5), report)
    n_longer = report.lengths[2]
    assert len(out) == 3 and n_longer > lens["prompt"] + 5
    assert (report.overlength, report.truncated, report.dropped_overlength, report.dropped_no_target) == (2, 1, 0, 1)
    d = report.to_dict()
    assert d["overlength"] == {"policy": "truncate", "count": 2, "truncated": 1, "dropped": 0}  # keys kept
    assert d["dropped_no_target"] == 1
    assert d["overlength_rows"] == [f"d.jsonl line 2: {lens['full']} tokens", f"d.jsonl line 3: {n_longer} tokens"]
    assert d["dropped_no_target_rows"] == ["d.jsonl line 3"]
    assert report.summary_lines()[2:] == [
        "over cutoff_len: 2 (policy truncate: truncated 1, dropped 0); dropped with nothing to train on: 1",
        "rows over cutoff_len (policy truncate):",
        f"  d.jsonl line 2: {lens['full']} tokens",
        f"  d.jsonl line 3: {n_longer} tokens",
        "rows dropped with nothing to train on (no answer token within cutoff_len; raise data.cutoff_len or "
        "shorten them):",
        "  d.jsonl line 3",
    ]


def test_report_row_lists_are_capped(qwen_tok, lens):
    n = MAX_ERRORS_SHOWN + 3
    report = DataReport(overlength_policy="drop")
    cfg = data_cfg(cutoff_len=lens["prompt"] + 5, overlength="drop")
    encode_examples(_examples([LONG] * n + [SHORT]), qwen_tok, lens["tpl"], cfg, report)
    assert (report.overlength, report.dropped_overlength, report.dropped_no_target) == (n, n, 0)
    named = [f"d.jsonl line {k + 1}: {lens['full']} tokens" for k in range(MAX_ERRORS_SHOWN)]
    d = report.to_dict()
    assert d["overlength_rows"] == named + ["... and 3 more"]
    assert d["dropped_no_target_rows"] == []
    lines = report.summary_lines()
    assert lines[3:] == ["rows over cutoff_len (policy drop):"] + [f"  {r}" for r in named] + ["  ... and 3 more"]


def test_build_datasets_names_rows_of_both_files(tmp_path, qwen_tok, lens):
    train = write(tmp_path / "train.jsonl", [SHORT, LONG, SHORT])
    ev = write(tmp_path / "eval.jsonl", [LONG, SHORT])
    cfg = data_cfg(path=str(train), eval_path=str(ev), cutoff_len=lens["prompt"])
    d = build_datasets(cfg, qwen_tok, lens["tpl"], seed=0).report.to_dict()
    assert d["overlength_rows"] == [f"{train} line 2: {lens['full']} tokens", f"{ev} line 1: {lens['full']} tokens"]
    assert d["dropped_no_target_rows"] == [f"{train} line 2", f"{ev} line 1"]
    assert (d["train_rows"], d["eval_rows"], d["dropped_no_target"]) == (2, 1, 2)


def test_no_trainable_sample_left_is_an_error(tmp_path, qwen_tok, lens):
    p = write(tmp_path / "d.jsonl", [LONG, LONG])
    cfg = data_cfg(path=str(p), cutoff_len=lens["prompt"], val_size=0)
    with pytest.raises(UserError, match=r"no trainable sample left .*raise data.cutoff_len"):
        build_datasets(cfg, qwen_tok, lens["tpl"], seed=0)


# ---------------------------------------------------------------- datasets, split, report

def test_build_datasets_split_and_report(tmp_path, qwen_tok, lens):
    rows = [{"instruction": f"问题{k}", "output": f"回答{k}。"} for k in range(9)] + [LONG]
    p = write(tmp_path / "d.jsonl", rows)
    cfg = data_cfg(path=str(p), cutoff_len=lens["prompt"] + 5, val_size=2)  # within the 20% cap: no note
    ds = build_datasets(cfg, qwen_tok, lens["tpl"], seed=1)
    assert (len(ds.train), len(ds.eval), len(ds.train_examples)) == (8, 2, 8)
    r = ds.report.to_dict()
    assert r["path"] == str(p) and (r["rows"], r["train_rows"], r["eval_rows"]) == (10, 8, 2)
    assert r["notes"] == [] and r["overlength_rows"] == [f"{p} line 10: {lens['full']} tokens"]
    assert r["overlength"] == {"policy": "truncate", "count": 1, "truncated": 1, "dropped": 0}
    assert r["dropped_no_target"] == 0
    assert r["token_lengths"]["max"] == lens["full"] and len(ds.report.lengths) == 10
    # the same seed gives the same split; train and validation are disjoint and cover the file
    again = build_datasets(cfg, qwen_tok, lens["tpl"], seed=1)
    assert [e.index for e in again.train_examples] == [e.index for e in ds.train_examples]
    texts = {qwen_tok.decode(s["input_ids"]) for s in [*ds.train, *ds.eval]}
    assert len(texts) == 10


def test_build_datasets_with_eval_path(tmp_path, qwen_tok, lens):
    train = write(tmp_path / "train.jsonl", [SHORT] * 4)
    ev = write(tmp_path / "eval.json", json.dumps([SHORT, LONG]))
    cfg = data_cfg(path=str(train), eval_path=str(ev), cutoff_len=lens["prompt"] + 5, overlength="drop")
    ds = build_datasets(cfg, qwen_tok, lens["tpl"], seed=0)
    assert (ds.report.train_rows, ds.report.eval_rows) == (4, 1)
    assert (ds.report.overlength, ds.report.dropped_overlength) == (1, 1)


def test_split_validation():
    rows = list(range(100))
    train, val = split_validation(rows, 0.1, None, seed=3)
    assert len(val) == 10 and sorted(train + val) == rows
    assert split_validation(rows, 0.1, None, seed=3) == (train, val)
    assert split_validation(rows, 0.1, None, seed=4)[1] != val
    assert train == sorted(train) and val == sorted(val)  # file order kept within each part
    assert len(split_validation(rows, 7, None, seed=0)[1]) == 7
    assert len(split_validation(rows, 0.5, 20, seed=0)[1]) == 20
    assert split_validation(rows, 0, None, seed=0) == (rows, [])
    # a row count above 20% of the rows is capped (it was an error whenever it reached the row count)
    assert split_validation(rows, 100, None, seed=0) == split_validation(rows, 20, None, seed=0)


VAL_NONE = "training runs without validation (no eval loss); add rows or set data.eval_path"


@pytest.mark.parametrize("n, val_size, val_max_rows, k, note", [
    (12, 8, None, 2, "validation split: 2 rows, not the 8 asked for by data.val_size=8 "
                     "(at most 20% of 12 rows go to validation)"),
    (12, 8, 5, 2, "validation split: 2 rows, not the 5 asked for by data.val_size=8 and data.val_max_rows=5 "
                  "(at most 20% of 12 rows go to validation)"),
    (4, 8, None, 0, f"validation split: none, not the 8 asked for by data.val_size=8 "
                    f"(at most 20% of 4 rows go to validation); {VAL_NONE}"),
    (4, 1, None, 0, f"validation split: none, not the 1 asked for by data.val_size=1 "
                    f"(at most 20% of 4 rows go to validation); {VAL_NONE}"),
    (10, 0.99, None, 9, "validation split: 9 rows, not the 10 asked for by data.val_size=0.99 "
                        "(at least one row must stay for training)"),
    (1, 0.6, None, 0, f"validation split: none, not the 1 asked for by data.val_size=0.6 "
                      f"(at least one row must stay for training); {VAL_NONE}"),
    (4, 0.1, None, 0, "validation split: none (data.val_size=0.1 of 4 rows rounds to 0 rows); training runs "
                      "without validation (no eval loss); raise data.val_size, add rows or set data.eval_path"),
    # unchanged: within the cap, a fraction below n - 1, val_max_rows, and no validation asked for
    (12, 2, None, 2, ""), (5, 1, None, 1, ""), (10, 0.8, None, 8, ""), (1000, 0.1, 50, 50, ""), (100, 0.5, 20, 20, ""),
    (12, 8, 1, 1, ""), (12, 8, 0, 0, ""), (12, 0, None, 0, ""), (12, 0.0, None, 0, ""), (12, 8.0, None, 2,
     "validation split: 2 rows, not the 8 asked for by data.val_size=8.0 (at most 20% of 12 rows go to validation)"),
])
def test_validation_rows_cap_and_note(n, val_size, val_max_rows, k, note):
    assert validation_rows(n, val_size, val_max_rows) == (k, note)


def test_small_file_split_is_capped_seeded_and_noted():
    """Regression: an integer data.val_size at or above the row count was an error, so the quickstart config
    (val_size: 8) refused every file under 9 rows; now at most 20% of the rows go to validation."""
    rows = list(range(12))
    report = DataReport()
    train, val = split_validation(rows, 8, None, seed=5, report=report)
    assert len(val) == 2 and sorted(train + val) == rows
    assert (train, val) == split_validation(rows, 2, None, seed=5)  # the same seeded rows as asking for 2
    assert report.notes == [validation_rows(12, 8, None)[1]]
    report = DataReport()
    assert split_validation(rows[:3], 8, None, seed=5, report=report) == (rows[:3], [])
    assert report.notes == [validation_rows(3, 8, None)[1]] and VAL_NONE in report.notes[0]
    report = DataReport()
    split_validation(rows, 2, None, seed=5, report=report)
    assert report.notes == []


def test_quickstart_val_size_trains_a_small_file(tmp_path, qwen_tok, lens):
    rows = [{"instruction": f"问题{k}", "output": f"回答{k}。"} for k in range(6)]
    p = write(tmp_path / "d.jsonl", rows)
    ds = build_datasets(data_cfg(path=str(p), val_size=8), qwen_tok, lens["tpl"], seed=0)
    assert (len(ds.train), len(ds.eval)) == (5, 1)
    note = "validation split: 1 row, not the 8 asked for by data.val_size=8 (at most 20% of 6 rows go to validation)"
    assert ds.report.notes == [note] and ds.report.to_dict()["notes"] == [note]
    assert ds.report.summary_lines()[0] == f"data: {p}: 6 rows -> train 5, validation 1"
    assert ds.report.summary_lines()[-1] == note
    p = write(tmp_path / "d3.jsonl", rows[:3])
    ds = build_datasets(data_cfg(path=str(p), val_size=8), qwen_tok, lens["tpl"], seed=0)
    assert (len(ds.train), len(ds.eval)) == (3, 0)
    assert ds.report.summary_lines()[-1] == validation_rows(3, 8, None)[1]


def test_token_length_statistics():
    r = DataReport(lengths=list(range(20, 0, -1)))
    assert r.token_lengths() == {"min": 1, "mean": 10.5, "median": 10.5, "p95": 20, "max": 20}
    assert DataReport().token_lengths() == {}


def test_render_masked_color(qwen_tok):
    tpl = get_template("domain_zh")
    sample, _ = encode_example(parse_example(SHORT, "x"), qwen_tok, tpl, 512)
    assert render_masked(qwen_tok, sample, color=True) == "用户:你好\n\n助手:\x1b[32m您好！</s>\x1b[0m"


def test_example_without_answer_has_empty_target():
    ex = Example("x", [{"role": "user", "content": "q"}])
    assert ex.prompt_and_target() == ([{"role": "user", "content": "q"}], "")




def test_chat_template_rejection_names_file_and_line(tmp_path, qwen_tok):
    """Regression: a chat_template's raise_exception escaped as a jinja2 TemplateError (a traceback, no row)."""
    from domaintune.data.templates import Template

    tpl = Template(name="tokenizer", kind="tokenizer", append_eos=False, chat_template=STRICT_CHATML)
    p = write(tmp_path / "d.jsonl", [ROWS[0], {"system": "你是助手。", "instruction": "q", "output": "a"}])
    exs = load_examples(p, template=tpl)
    with pytest.raises(UserError) as e:
        encode_examples(exs, qwen_tok, tpl, data_cfg(cutoff_len=512), DataReport())
    assert str(e.value) == (f"{p} line 2: the model's chat_template rejects this conversation (System role not "
                            "supported); change the data (e.g. drop the system message) or use data.template: "
                            "chatml (or another format template)")


# ---------------------------------------------------------------- domaintune data-check

@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2", "qwen2", size="micro")


def test_data_check_cli(tmp_path, tiny_qwen_dir, capsys):
    from transformers import AutoTokenizer

    rows = [{"instruction": "孩子不爱吃饭怎么办？", "output": "规律进餐，少吃零食。"},
            {"instruction": "怎样提升孩子的自信？", "input": "他八岁。", "output": "多表扬努力，而不是聪明。"},
            LONG, SHORT,
            {"messages": [{"role": "user", "content": "孩子怕黑"}, {"role": "assistant", "content": "陪她检查床底。"}]}]
    data = write(tmp_path / "train.jsonl", rows)
    tok = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    tpl = get_template("domain_zh")
    lengths = [len(tpl.encode(tok, parse_example(r, "x", template=tpl).messages)[0]) for r in rows]
    cutoff = 40
    assert sum(n > cutoff for n in lengths) == 1  # only LONG is over
    cfg = write(tmp_path / "cfg.yaml", f"model:\n  name_or_path: {tiny_qwen_dir}\n"
                                        f"data:\n  path: {data}\n  cutoff_len: {cutoff}\n  val_size: 0\n")
    assert cli.main(["data-check", str(cfg), "--example", "1"]) == 0
    out = capsys.readouterr().out
    s = sorted(lengths)
    assert out.splitlines()[:3] == [
        f"data: {data}: 5 rows -> train 5, validation 0",
        f"tokens per sample: min {s[0]}, mean {round(statistics.fmean(s), 1)}, median {s[2]}, p95 {s[4]}, max {s[4]}",
        "over cutoff_len: 1 (policy truncate: truncated 1, dropped 0); dropped with nothing to train on: 0",
    ]
    assert "用户:怎样提升孩子的自信？他八岁。\n\n助手:«多表扬努力，而不是聪明。</s>»\n" in out
    assert out.count("«") == out.count("»") == 2  # the header's «like this» and the example's one span

    # overrides after the file reach the same config; a bad row stops with file and line
    assert cli.main(["data-check", str(cfg), "data.overlength=drop"]) == 0
    assert "over cutoff_len: 1 (policy drop: truncated 0, dropped 1)" in capsys.readouterr().out
    write(data, rows[:2] + [{"instruction": "q", "output": ""}])
    assert cli.main(["data-check", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 1 invalid row(s)") and f'{data} line 3: "output" is blank' in err
