"""Question/answer filters: ROUGE-L values against independent implementations, thresholds, bounds."""
from __future__ import annotations

import random

import pytest
from rouge_chinese import Rouge
from rouge_score import rouge_scorer

from domaintune.datagen import filters as F


class CjkCharTokenizer:
    """Independent character tokenizer for rouge_score: Chinese characters only."""

    def tokenize(self, text):
        return [c for c in text if "\u4e00" <= c <= "\u9fff"]


def dp_lcs(a, b):
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            t[i][j] = t[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(t[i - 1][j], t[i][j - 1])
    return t[-1][-1]


def test_tokenize_chars_for_chinese_words_for_english():
    assert F.tokenize("孩子，不爱写作业？") == ["孩", "子", "不", "爱", "写", "作", "业"]
    assert F.tokenize("How do I talk to my pre-teen?") == ["how", "do", "i", "talk", "to", "my", "pre", "teen"]
    assert F.tokenize("孩子玩iPad 3小时") == ["孩", "子", "玩", "ipad", "3", "小", "时"]
    assert F.tokenize("ＡＢＣ１２") == ["abc12"]  # full-width forms count as ASCII


def test_bit_parallel_lcs_matches_dynamic_programming():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 70))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 70))]
        assert F.lcs_length(a, b) == dp_lcs(a, b)
    assert F.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4


EN_BASE = "How can I help my child build a habit of reading every day?"
EN_NEAR = "How can I help my child build a reading habit every day?"       # LCS 11 of 13/12 words
EN_FAR = "How can I help my child develop a daily reading habit?"          # LCS 8 of 13/11 words
ZH_BASE = "孩子写作业拖拉怎么办？"
ZH_NEAR = "孩子写作业时总是拖拉磨蹭，家长该怎么办？"                          # LCS 10 of 10/18 chars
ZH_FAR = "孩子写作业总是拖拉，家长该怎么应对？"                               # LCS 9 of 10/16 chars


@pytest.mark.parametrize("a,b,expected", [
    (EN_BASE, EN_NEAR, 2 * 11 / (13 + 12)),
    (EN_BASE, EN_FAR, 2 * 8 / (13 + 11)),
])
def test_rouge_l_english_equals_rouge_score(a, b, expected):
    ours = F.rouge_l(a, b)
    ref = rouge_scorer.RougeScorer(["rougeL"]).score(a, b)["rougeL"].fmeasure
    assert ours == ref  # same tokens, same LCS, same float arithmetic
    assert ours == pytest.approx(expected, rel=1e-12)
    assert ours == pytest.approx(Rouge().get_scores(b.lower(), a.lower())[0]["rouge-l"]["f"], abs=1e-6)


@pytest.mark.parametrize("a,b,expected", [
    (ZH_BASE, ZH_NEAR, 2 * 10 / (10 + 18)),   # 0.714
    (ZH_BASE, ZH_FAR, 2 * 9 / (10 + 16)),     # 0.692
    ("孩子不爱写作业怎么办？", "孩子不喜欢写作业，怎么办？", 2 * 9 / (10 + 11)),
])
def test_rouge_l_chinese_is_character_level(a, b, expected):
    ours = F.rouge_l(a, b)
    ref = rouge_scorer.RougeScorer(["rougeL"], tokenizer=CjkCharTokenizer()).score(a, b)["rougeL"].fmeasure
    assert ours == ref
    assert ours == pytest.approx(expected, rel=1e-12)
    chars = CjkCharTokenizer().tokenize
    rc = Rouge().get_scores(" ".join(chars(b)), " ".join(chars(a)))[0]["rouge-l"]["f"]
    assert ours == pytest.approx(rc, abs=1e-6)


def make_filter(**kw):
    args = dict(min_chars=5, max_chars=60, blocklist=["draw", "图片"], threshold=0.7)
    args.update(kw)
    return F.QuestionFilter(**args)


@pytest.mark.parametrize("base,near,far", [(EN_BASE, EN_NEAR, EN_FAR), (ZH_BASE, ZH_NEAR, ZH_FAR)])
def test_near_duplicates_above_threshold_removed_below_kept(base, near, far):
    f = make_filter()
    f.add(base)
    rej = f.check(near)
    assert rej.reason == F.NEAR_DUPLICATE
    assert rej.detail == {"similar_to": base, "rouge_l": round(F.rouge_l(base, near), 4)}
    assert f.check(far) is None
    f.add(far)  # once kept, it is part of the pool too
    assert f.check(far + "!").reason == F.NEAR_DUPLICATE


def test_threshold_is_inclusive_and_configurable():
    f = make_filter(threshold=2 * 8 / (13 + 11))  # exactly EN_FAR's score
    f.add(EN_BASE)
    assert f.check(EN_FAR).reason == F.NEAR_DUPLICATE
    f = make_filter(threshold=0.9)
    f.add(EN_BASE)
    assert f.check(EN_NEAR) is None  # 0.88 < 0.9


def test_length_bounds():
    f = make_filter(min_chars=5, max_chars=10)
    assert f.check("abcd").reason == F.TOO_SHORT and f.check("abcd").detail == {"chars": 4}
    assert f.check("abcde") is None
    assert f.check("一二三四五六七八九十") is None
    assert f.check("一二三四五六七八九十？").reason == F.TOO_LONG


def test_blocklist_whole_words_for_ascii_substrings_for_chinese():
    f = make_filter()
    assert f.check("How do I draw a family tree?").detail == {"keyword": "draw"}
    assert f.check("How to DRAW a family tree?").reason == F.BLOCKLIST
    assert f.check("Where should the toy drawer go?") is None  # 'draw' only inside a word
    assert f.check("怎样用图片教孩子认字？").detail == {"keyword": "图片"}


def test_exact_duplicates_ignore_case_width_and_spacing():
    f = make_filter()
    f.add("How do I talk to my preteen about online safety?")
    assert f.check("how do I  talk to my PRETEEN about online safety?").reason == F.DUPLICATE
    f.add("孩子挑食怎么办？")
    assert f.check(" 孩子挑食怎么办？ ".strip()).reason == F.DUPLICATE
    assert "孩子挑食怎么办？" in f and "孩子挑食怎么办" not in f


def test_checks_do_not_change_the_pool():
    f = make_filter()
    assert f.check(EN_BASE) is None
    assert f.check(EN_BASE) is None
    assert len(f.index) == 0


def test_parse_numbered_lists():
    text = "Here are 4 new questions:\n\n1. What helps?\n2) **Why now?**\n3、问题：怎么办？\n（4）“Quoted?”\n"
    assert F.parse_questions(text) == ["What helps?", "Why now?", "怎么办？", "Quoted?"]
    assert F.parse_questions("1. One?\n2. Two?\n3. Thr", truncated=True) == ["One?", "Two?"]
    assert F.parse_questions("Just one question?\nAnd another?") == ["Just one question?", "And another?"]
    assert F.parse_questions("") == []


def test_check_answer():
    kw = dict(min_chars=10, blocklist=["as an AI language model", "作为一个AI"])
    assert F.check_answer("Half an answ", "length", **kw).reason == F.ANSWER_TRUNCATED
    assert F.check_answer("  Too short ", "stop", **kw).reason == F.ANSWER_TOO_SHORT
    assert F.check_answer("As an AI language model, I think you should read.", "stop", **kw).detail["keyword"] \
        == "As an AI language model"
    assert F.check_answer("作为一个AI助手，我建议每天陪孩子读书二十分钟。", "stop", **kw).reason == F.ANSWER_BLOCKLIST
    assert F.check_answer("Read together for twenty minutes every evening.", "stop", **kw) is None


def test_control_characters_are_refused_tabs_and_line_ends_are_not():
    """Regression (issue 22, 31): control characters (a teacher's stray \\u0006) passed every check."""
    assert F.control_chars("a\tb\nc\r\nd") is None
    assert F.control_chars("a\u0006b\x7fc\x85") == {"control_chars": ["\\u0006", "\\u007f", "\\u0085"], "at": 1}
    qf = F.QuestionFilter(min_chars=1, max_chars=100, blocklist=[], threshold=0.7)
    assert qf.check("How\u0000 now?").reason == F.CONTROL_CHARS
    assert F.check_answer("A full answer\u0006.", "stop", min_chars=1, blocklist=[]).reason == F.ANSWER_CONTROL_CHARS
    assert F.check_answer("A full answer\u0006.", "length", min_chars=1, blocklist=[]).reason == F.ANSWER_TRUNCATED
