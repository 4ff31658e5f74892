"""data/dedup.py: which rows duplicate which (exact and near), and which training prompts are test prompts."""
from __future__ import annotations

import random

import pytest

from domaintune.data import similarity
from domaintune.data.dedup import EXACT_POOL, contaminated, duplicates, text_key
from domaintune.data.similarity import rouge_l
from domaintune.datagen import filters


def test_text_key_removes_case_space_and_punctuation_only():
    assert text_key("Hello, World!") == text_key("hello   world") == text_key("ＨＥＬＬＯ　ｗｏｒｌｄ。")
    assert text_key("你好，世界。") == text_key("你好世界") == text_key(" 你好 世界 ")
    # Different words, symbols, emoji and other scripts are kept apart.
    assert text_key("I love 🍕") != text_key("I love 🍔")
    assert text_key("1+1=2") != text_key("1-1=2")
    assert text_key("a b") != text_key("ab")
    assert text_key("Привет мир") != text_key("Пока мир")
    assert text_key("café") != text_key("cafe")
    # No letter at all: punctuation is the text, so "???" and "!!!" stay different.
    assert text_key("???") != text_key("!!!")
    assert text_key("? ?") == text_key("?  ?")


EXACT_ROWS = [
    "How can I help my child sleep?",       # 0 kept
    "how can i help my child sleep",        # 1 -> 0 (case, punctuation)
    "孩子不爱写作业怎么办？",                  # 2 kept
    "孩子 不爱写作业，怎么办",                 # 3 -> 2 (spaces, full-width punctuation)
    "How can I help my child sleep better?",  # 4 kept (one word more: near, not exact)
    "孩子不爱写作业怎么办？",                  # 5 -> 2 (identical)
    "HOW CAN I HELP MY CHILD SLEEP?!",      # 6 -> 0
    "孩子不爱读书怎么办？",                    # 7 kept
]


def test_exact_indices_first_occurrence_kept():
    assert duplicates(EXACT_ROWS, "exact") == [None, 0, None, 2, None, 2, 0, None]


def test_exact_never_merges_different_texts():
    rng = random.Random(3)
    texts = [f"{rng.choice(['Q', 'q'])}uestion {i}: {'ab'[i % 2]} {i * 7 % 13}" for i in range(300)]
    texts += ["你好世界", "你好世间", "a b", "ab", "🍕", "🍔", "", " ", "?", "!"]
    got = duplicates(texts, "exact")
    for i, d in enumerate(got):
        if d is not None:
            assert d < i and got[d] is None and text_key(texts[d]) == text_key(texts[i])
    assert got[-10:] == [None, None, None, None, None, None, None, 6 + 300, None, None]
    assert sum(d is not None for d in got[:300]) == 0  # every one differs in its number


NEAR_ROWS = [
    "How can I help my teenage son manage his anger at school",    # 0 kept
    "What should I do when my daughter refuses to eat vegetables",  # 1 kept
    "How can I help my teenage son manage his anger at home",      # 2 -> 0 (one word changed)
    "孩子上初中以后总是玩手机不写作业家长应该怎么办",                   # 3 kept
    "孩子上初中以后总是玩手机不做作业家长应该怎么办",                   # 4 -> 3 (one character)
    "What should I do when my daughter refuses to eat her vegetables",  # 5 -> 1 (one word inserted)
    "How can I help my teenage son manage his anger",              # 6 -> 0 (near 0 and 2; 0 first)
    "The weather in Paris is sunny and warm today",                # 7 kept
    "how can i help my teenage son manage his anger at school!!",   # 8 -> 0 (exact)
]


def test_near_indices():
    assert rouge_l(NEAR_ROWS[0], NEAR_ROWS[6]) >= 0.7 and rouge_l(NEAR_ROWS[2], NEAR_ROWS[6]) >= 0.7
    assert duplicates(NEAR_ROWS, "near") == [None, None, 0, None, 3, 1, 0, None, 0]
    # exact mode keeps every near variant
    assert duplicates(NEAR_ROWS, "exact") == [None] * 8 + [0]


def test_near_reports_kept_text_only():
    # 1 is near 0 and dropped; 2 is near 1 but not 0: it is kept (1 is not a kept text), so 3 (= 2) points to 2.
    a = "one two three four five six seven eight nine ten"
    b = "one two three four five six seven eight eleven twelve"
    c = "one two three four five six thirteen fourteen fifteen sixteen"
    assert rouge_l(a, b) >= 0.7 and rouge_l(b, c) < 0.7 and rouge_l(a, c) < 0.7
    assert duplicates([a, b, c, c.upper()], "near") == [None, 0, None, 2]


def test_threshold_is_used():
    a, b = NEAR_ROWS[0], NEAR_ROWS[2]
    score = rouge_l(a, b)
    assert duplicates([a, b], "near", threshold=score) == [None, 0]
    assert duplicates([a, b], "near", threshold=min(1.0, score + 0.01)) == [None, None]


def test_near_past_the_exact_pool_uses_lsh_and_keeps_first_occurrence():
    # More kept texts than EXACT_POOL, then near variants of early and late ones: found through MinHash LSH.
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(5000)]
    base = [" ".join(rng.choice(vocab) for _ in range(15)) for _ in range(EXACT_POOL + 300)]
    variants = [base[5].replace(base[5].split()[3], "changed", 1), base[-1] + " extra"]
    got = duplicates(base + variants, "near")
    assert got[:len(base)] == [None] * len(base)
    assert got[len(base):] == [5, len(base) - 1]


def test_contaminated():
    tests = ["How can I help my teenage son manage his anger at school?", "孩子不爱写作业怎么办？", "Unrelated"]
    prompts = [
        "how can i help my teenage son manage his anger at school",  # exact -> 0
        "孩子不爱写作业，怎么办",                                      # exact -> 1
        "How can I help my teenage son manage his anger at home",    # near -> 0
        "What is the capital of France",                             # clean
    ]
    assert contaminated(prompts, tests, near=False) == [0, 1, None, None]
    assert contaminated(prompts, tests, near=True) == [0, 1, 0, None]
    assert contaminated(prompts, [], near=True) == [None] * 4
    assert contaminated(prompts, tests, near=True, threshold=1.0) == [0, 1, None, None]


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        duplicates(["a"], "fuzzy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threshold"):
        duplicates(["a"], "near", threshold=0)


def _synthetic(n: int, seed: int) -> list[str]:
    """Questions in Chinese and English with ~20% exact and ~10% near repeats of earlier rows. The vocabularies are
    thousands of words and characters wide, as real text is: a 30-character one makes every pair of Chinese rows
    share most of their characters, and every row a candidate of every other."""
    rng = random.Random(seed)
    en = "child parent homework school sleep phone game reading math friend teacher anger fear music sport".split()
    en += [f"topic{i}" for i in range(3000)]
    zh = "孩子家长作业学校睡觉手机游戏阅读数学朋友老师生气害怕音乐运动青春期沟通情绪习惯" + "".join(
        chr(0x4E00 + k) for k in range(0, 6000, 2))
    out: list[str] = []
    for i in range(n):
        r = rng.random()
        if out and r < 0.2:
            out.append(rng.choice(out).upper() + "!")
        elif out and r < 0.3:
            words = rng.choice(out).split()
            words[rng.randrange(len(words))] = "very"
            out.append(" ".join(words))
        elif r < 0.6:
            out.append("".join(rng.choice(zh) for _ in range(18)) + f"{i}怎么办？")
        else:
            out.append(" ".join(rng.choice(en) for _ in range(14)) + f" {i}?")
    return out


def test_past_the_scanned_pool_every_drop_is_a_real_duplicate():
    """3,000 texts: well past EXACT_POOL, so most candidates come from MinHash LSH. (Speed is bench/dedup_scale.py's
    to measure, not a timed test's.)"""
    texts = _synthetic(3_000, 0)
    exact = duplicates(texts, "exact")
    near = duplicates(texts, "near")
    # Every exact drop is a drop in near mode too, pointing at a kept text with the same key or a near one.
    n_exact, n_near = sum(d is not None for d in exact), sum(d is not None for d in near)
    assert 0.15 * len(texts) < n_exact < n_near
    assert all(near[i] is not None for i, d in enumerate(exact) if d is not None)
    for i, d in enumerate(near):
        if d is not None:
            assert d < i and near[d] is None
            assert text_key(texts[d]) == text_key(texts[i]) or rouge_l(texts[d], texts[i]) >= 0.7


def test_similarity_agrees_with_gen_data_filters():
    # data/similarity.py and datagen/filters.py hold the same tokeniser and scorer: one measure for both verbs.
    texts = _synthetic(400, 1) + NEAR_ROWS + EXACT_ROWS
    texts += ["Ｆｕｌｌ　ｗｉｄｔｈ ＡＢＣ１２３", "", "!!", "Ünïcödé wörds"]
    for a, b in zip(texts, texts[1:] + texts[:1], strict=True):
        assert similarity.tokenize(a) == filters.tokenize(a)
        assert similarity.dedup_key(a) == filters.dedup_key(a)
        assert similarity.rouge_l(a, b) == filters.rouge_l(a, b)
