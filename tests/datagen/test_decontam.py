"""Decontamination against `selfinstruct.exclude` files: reading every format with "path:line", the exact /
n-gram / near-duplicate rules with their reported values, the candidate index against a brute-force scan, scale."""
from __future__ import annotations

import json
import random

import pytest

from domaintune.datagen import filters as F
from domaintune.datagen.decontam import CONTAMINATED, Decontaminator, ExcludedText, load_excluded
from domaintune.errors import UserError

EN_Q = "How can parents help their child stop procrastinating on homework every evening?"
EN_A = ("Break the homework into short blocks with a timer, and let the child pick the order of the subjects "
        "so that starting feels like a choice rather than an order.")
ZH_Q = "青春期的孩子总是把自己关在房间里，家长应该怎么沟通？"
ZH_A = "先尊重孩子对独处空间的需要，不要强行闯入；可以在吃饭或散步这类轻松的时候聊聊他感兴趣的话题。"


def write_jsonl(path, rows, blank_after_first=False):
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    if blank_after_first:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def test_set(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", [
        {"instruction": "孩子做家务总是敷衍了事，要不要给报酬？", "input": "",
         "output": "日常家务是家庭成员共同的责任。"},
        {"instruction": EN_Q, "input": "", "output": EN_A},
        {"instruction": ZH_Q, "input": "", "output": ZH_A},
    ], blank_after_first=True)
    return Decontaminator(load_excluded(["test.jsonl"], base=tmp_path))


def test_copied_question_is_caught_with_path_and_line(test_set):
    r = test_set.check(EN_Q)
    assert r == F.Rejection(CONTAMINATED, {"match": "exact", "excluded": "test.jsonl:3"})  # line 2 is blank
    assert test_set.check(ZH_Q).detail == {"match": "exact", "excluded": "test.jsonl:4"}
    assert len(test_set) == 6  # instruction + output of each row


def test_whitespace_case_width_and_punctuation_differences_still_match(test_set):
    # dedup_key: case-folded, whitespace collapsed, NFKC (full-width "？" and letters are their ASCII forms)
    assert test_set.check("  how can PARENTS help their child\tstop procrastinating on homework   every evening? "
                          ).detail["match"] == "exact"
    assert test_set.check(ZH_Q.replace("？", "?")).detail["match"] == "exact"
    assert test_set.check("孩子做家务总是敷衍了事，要不要给报酬?").detail == {"match": "exact",
                                                                 "excluded": "test.jsonl:1"}
    # punctuation is not in dedup_key, but it is not a token either: ROUGE-L over tokens is 1.0
    r = test_set.check("孩子做家务总是敷衍了事 要不要给报酬")  # 17 tokens: its first 8-gram is caught first
    assert r.detail == {"match": "ngram", "excluded": "test.jsonl:1", "ngram": "孩子做家务总是敷"}
    short = Decontaminator([ExcludedText("How do I set screen-time limits?", "t.txt:1")])
    assert short.check("how do i set screen time limits").detail == {
        "match": "near_duplicate", "excluded": "t.txt:1", "rouge_l": 1.0}


def test_question_copying_an_8_token_clause_of_an_answer_is_caught_by_ngram(test_set):
    q = "Why should I let the child pick the order of the subjects at all?"
    assert test_set.check(q).detail == {"match": "ngram", "excluded": "test.jsonl:3",
                                        "ngram": "let the child pick the order of the"}
    # 7 shared tokens are not enough (and the question is far from any test question)
    assert test_set.check("Is it fine to let the child pick the order in which chores are done?") is None


def test_chinese_ngram_counts_characters_and_reports_them_joined(test_set):
    q = "为什么要在散步这类轻松的时候和孩子谈心？"
    assert test_set.check(q).detail == {"match": "ngram", "excluded": "test.jsonl:4", "ngram": "散步这类轻松的时"}
    assert test_set.check("孩子吃饭时只顾看手机，轻松的时候也不说话怎么办？") is None  # shares 5 characters only


def test_paraphrase_above_threshold_is_a_near_duplicate_with_its_score(test_set):
    q = "How can parents help a child stop putting off homework every evening?"  # no 8-gram left in common
    expected = F.rouge_l(EN_Q, q)
    assert expected >= 0.7
    assert test_set.check(q).detail == {"match": "near_duplicate", "excluded": "test.jsonl:3",
                                        "rouge_l": round(expected, 4)}
    zq = "青春期孩子总把自己关在屋里，父母该怎样沟通？"
    assert F.rouge_l(ZH_Q, zq) >= 0.7
    assert test_set.check(zq).detail == {"match": "near_duplicate", "excluded": "test.jsonl:4",
                                         "rouge_l": round(F.rouge_l(ZH_Q, zq), 4)}


def test_unrelated_question_sharing_a_common_6_token_phrase_is_kept(test_set):
    q = "How can parents help their child make friends after moving to a new school?"
    assert F.rouge_l(EN_Q, q) < 0.7
    assert test_set.check(q) is None
    assert test_set.check("青春期的孩子熬夜玩手机，怎么让他早点睡？") is None  # shares "青春期的孩子" (6)


def test_answers_are_not_compared_by_rouge():
    d = Decontaminator([ExcludedText("Read a book together every night before bed.", "a:1", question_like=False)])
    assert d.check("Read a book together each night before bed?") is None  # runs of 4 and 3 tokens; ROUGE-L 0.875
    d = Decontaminator([ExcludedText("Read a book together every night before bed.", "q:1")])
    assert d.check("Read a book together each night before bed?").detail["match"] == "near_duplicate"


def test_instruction_input_rows_give_each_part_and_the_output(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"instruction": "Summarise the advice.", "input": "Praise effort, not talent.",
                                        "output": "Praise effort."}])
    assert load_excluded([str(tmp_path / "t.jsonl")]) == [
        ExcludedText("Summarise the advice.\nPraise effort, not talent.", f"{tmp_path / 't.jsonl'}:1", True),
        ExcludedText("Praise effort.", f"{tmp_path / 't.jsonl'}:1", False),
        ExcludedText("Summarise the advice.", f"{tmp_path / 't.jsonl'}:1", True),
        ExcludedText("Praise effort, not talent.", f"{tmp_path / 't.jsonl'}:1", True),
    ]


def test_messages_rows_give_user_and_assistant_turns_not_the_system_prompt(tmp_path):
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "You are a kind and practical parenting assistant for busy families."},
        {"role": "user", "content": "My son is ten and does homework until ten at night."},
        {"role": "assistant", "content": "Look at where the time goes first."},
        {"role": "user", "content": "他说题目太难了。"},
        {"role": "assistant", "content": "那就先和老师沟通一下作业量。"}]}])
    texts = load_excluded(["chat.jsonl"], base=tmp_path)
    assert texts == [ExcludedText("My son is ten and does homework until ten at night.", "chat.jsonl:1", True),
                     ExcludedText("Look at where the time goes first.", "chat.jsonl:1", False),
                     ExcludedText("他说题目太难了。", "chat.jsonl:1", True),
                     ExcludedText("那就先和老师沟通一下作业量。", "chat.jsonl:1", False)]
    d = Decontaminator(texts)
    assert d.check("You are a kind and practical parenting assistant: what should I do?") is None
    assert d.check("他说题目太难了").detail == {"match": "near_duplicate", "excluded": "chat.jsonl:1", "rouge_l": 1.0}


def test_other_rows_give_every_string_and_answer_keys_are_answers(tmp_path):
    write_jsonl(tmp_path / "qa.jsonl", [
        {"question": "What is a reasonable bedtime for a seven-year-old?", "answer": "Around 8 pm.", "id": 3},
        {"text": "孩子挑食怎么办？"},
        {"prompt": "How much pocket money?", "meta": {"tags": ["money", ""]}, "responses": None},
        "A bare string row.",
    ])
    where = "qa.jsonl"
    assert load_excluded([where], base=tmp_path) == [
        ExcludedText("What is a reasonable bedtime for a seven-year-old?", "qa.jsonl:1", True),
        ExcludedText("Around 8 pm.", "qa.jsonl:1", False),
        ExcludedText("孩子挑食怎么办？", "qa.jsonl:2", True),
        ExcludedText("How much pocket money?", "qa.jsonl:3", True),
        ExcludedText("money", "qa.jsonl:3", True),
        ExcludedText("A bare string row.", "qa.jsonl:4", True),
    ]
    # a messages row that is not a valid training row: its strings, without the role names
    write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "assistant", "content": "Hi."}]}])
    assert load_excluded(["bad.jsonl"], base=tmp_path) == [ExcludedText("Hi.", "bad.jsonl:1", True)]


def test_json_array_files_report_the_line_each_row_starts_on(tmp_path):
    (tmp_path / "test.json").write_text(
        '[\n  {"instruction": "第一个问题是什么呢？", "output": "答一"},\n\n  {\n    "question": "How do I stop '
        'yelling at my kids when I am tired?"\n  }\n]\n', encoding="utf-8")
    texts = load_excluded(["test.json"], base=tmp_path)
    assert [(t.text, t.where) for t in texts] == [
        ("第一个问题是什么呢？", "test.json:2"), ("答一", "test.json:2"),
        ("How do I stop yelling at my kids when I am tired?", "test.json:4")]
    assert Decontaminator(texts).check("how do I stop yelling at my kids when I'm tired").detail["excluded"] \
        == "test.json:4"


def test_txt_files_give_one_text_per_non_empty_line(tmp_path):
    (tmp_path / "held_out.txt").write_bytes(
        "\ufeff孩子沉迷短视频怎么办？\r\n\r\n   \nHow do I explain divorce to a five-year-old?\r\n".encode())
    texts = load_excluded(["held_out.txt"], base=tmp_path)
    assert texts == [ExcludedText("孩子沉迷短视频怎么办？", "held_out.txt:1", True),
                     ExcludedText("How do I explain divorce to a five-year-old?", "held_out.txt:4", True)]
    d = Decontaminator(texts)
    assert d.check("How do I explain a divorce to a 5-year-old?").detail["excluded"] == "held_out.txt:4"
    assert d.check("孩子沉迷短视频，怎么办").detail == {"match": "ngram", "excluded": "held_out.txt:1",
                                               "ngram": "孩子沉迷短视频怎"}


def test_several_files_and_absolute_paths(tmp_path):
    (tmp_path / "a.txt").write_text("one\n", encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", [{"question": "two"}])
    texts = load_excluded([str(tmp_path / "a.txt"), "b.jsonl"], base=tmp_path)
    assert [t.where for t in texts] == [f"{tmp_path / 'a.txt'}:1", "b.jsonl:1"]
    assert load_excluded([]) == []
    assert Decontaminator([]).check("anything at all here") is None


@pytest.mark.parametrize("content", [None, b"", b"\xef\xbb\xbf \n\n", "dir"])
def test_missing_empty_or_directory_is_a_user_error_naming_path_and_field(tmp_path, content):
    p = tmp_path / "test_set.jsonl"
    if content == "dir":
        p.mkdir()
    elif content is not None:
        p.write_bytes(content)
    with pytest.raises(UserError) as e:
        load_excluded(["test_set.jsonl"], base=tmp_path)
    assert "selfinstruct.exclude" in str(e.value) and "'test_set.jsonl'" in str(e.value)
    if content is None:
        assert str(p) in str(e.value)  # where it looked


@pytest.mark.parametrize("name,content,says", [
    ("t.jsonl", '{"question": "ok"}\n{"id": 5, "n": [1, 2]}\n', "t.jsonl line 2: no text in this row"),
    ("t.jsonl", '{"question": "ok"}\n{"question": \n', "line 2: not valid JSON"),
    ("t.json", "[]", "the JSON array is empty"),
    ("t.txt", b"ok\n\xff\n", "t.txt line 2: invalid UTF-8"),
])
def test_unreadable_files_and_rows_without_text_name_the_field_and_line(tmp_path, name, content, says):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError, match="^selfinstruct.exclude: ") as e:
        load_excluded([name], base=tmp_path)
    assert says in str(e.value)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="ngram"):
        Decontaminator([], ngram=0)
    with pytest.raises(ValueError, match="rouge_threshold"):
        Decontaminator([], rouge_threshold=0)


def test_near_duplicate_candidates_match_a_brute_force_scan():
    # The candidate index (prefix and positional filters) must never miss what a scan over every text finds.
    rng = random.Random(7)
    vocab = "abcdefgh孩子作业"
    for threshold in (0.5, 0.7, 0.9, 1.0):
        texts = [ExcludedText(" ".join(rng.choices(vocab, k=rng.randint(1, 16))), f"x:{i}") for i in range(80)]
        d = Decontaminator(texts, ngram=100, rouge_threshold=threshold)  # ngram rule off
        for _ in range(150):
            q = rng.choice(texts).text.split()  # a text with a few edits, so many scores lie near the threshold
            for _ in range(rng.randint(0, 4)):
                k = rng.randrange(len(q) + 1)
                q[k:k + rng.randint(0, 1)] = rng.choices(vocab, k=rng.randint(0, 1))
            q = " ".join(q) or "a"
            scores = [F.rouge_l(t.text, q) for t in texts]
            best = max(scores)
            r = d.check(q)
            assert (r is not None) == (best >= threshold), q
            if r is not None and r.detail["match"] == "near_duplicate":
                assert r.detail == {"match": "near_duplicate", "excluded": texts[scores.index(best)].where,
                                    "rouge_l": round(best, 4)}


def test_thousands_of_excluded_rows_give_exact_results(tmp_path):
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    fresh = (f"z{i}" for i in range(10**6))  # words no excluded text holds
    rows = [{"instruction": " ".join(rng.choices(vocab, k=12)), "input": "",
             "output": " ".join(rng.choices(vocab, k=40))} for _ in range(5000)]
    write_jsonl(tmp_path / "test.jsonl", rows)
    d = Decontaminator(load_excluded(["test.jsonl"], base=tmp_path))
    assert len(d) == 10000
    picks = rng.sample(range(5000), 2000)
    questions, expected = [], []
    for k, i in enumerate(picks):
        ins, out = rows[i]["instruction"].split(), rows[i]["output"].split()
        where = f"test.jsonl:{i + 1}"
        if k % 4 == 0:  # a copy, upper-cased
            questions.append(rows[i]["instruction"].upper() + " ")
            expected.append({"match": "exact", "excluded": where})
        elif k % 4 == 1:  # an 8-word clause of an answer inside new words
            clause = out[10:18]
            questions.append(" ".join([next(fresh), next(fresh), *clause, next(fresh)]))
            expected.append({"match": "ngram", "excluded": where, "ngram": " ".join(clause)})
        elif k % 4 == 2:  # two words of twelve changed: ROUGE-L 10/12, longest shared run 4
            ins[4], ins[8] = next(fresh), next(fresh)
            questions.append(" ".join(ins))
            expected.append({"match": "near_duplicate", "excluded": where, "rouge_l": round(10 / 12, 4)})
        else:  # six shared words of twelve: ROUGE-L 0.5, kept
            questions.append(" ".join(ins[3:9] + [next(fresh) for _ in range(6)]))
            expected.append(None)
    got = [r.detail if (r := d.check(q)) else None for q in questions]
    assert got == expected
