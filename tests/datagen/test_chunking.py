"""Chunking: budgets, overlap of whole sentences, exact spans, sections never crossed, CJK sentence ends,
character splits, stable ids, small passages. Documents are built in memory with `build_document`."""
from __future__ import annotations

import hashlib
import re
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domaintune.datagen.chunking import Passage, _Section, approx_tokens, chunk_document, chunk_documents
from domaintune.datagen.documents import Document, build_document

ZH_SENTENCE = "第{}条规定员工应当遵守公司的各项规章制度。"  # 20 or 21 tokens: one per character
END = "。！？；….!?\n"


def zh_paragraph(n: int, start: int = 1) -> str:
    return "".join(ZH_SENTENCE.format(i) for i in range(start, start + n))


def mixed_doc() -> Document:
    en = " ".join(f"Sentence number {i} explains how the leave policy works in practice." for i in range(40))
    return build_document(Path("docs/handbook.pdf"), [
        ("总则。", 1, "第一章"),
        (zh_paragraph(30), 1, "第一章"),
        (zh_paragraph(3, 31), 2, "第一章"),
        (en, 2, "第一章 > Leave"),
        ("A short one.", 3, "第一章 > Leave"),
        ("字" * 900, 3, "第二章"),  # one "sentence" longer than any budget: cut by characters
        (zh_paragraph(12), 4, "第二章"),
    ])


def check(doc: Document, passages: list[Passage], budget: int, count=approx_tokens) -> None:
    """Invariants every chunking must keep."""
    for p in passages:
        assert doc.text[p.start:p.end] == p.text and p.text == p.text.strip() and p.text
        assert p.tokens == count(p.text) <= budget
        covered = [b for b in doc.blocks if b.start < p.end and p.start < b.end]
        assert {b.heading for b in covered} == {p.heading}  # never across a heading change
        assert p.pages == tuple(sorted({b.page for b in covered if b.page is not None}))
        assert p.page == covered[0].page and p.source == str(doc.path)
    # in order, every character of the document (outside the blank lines between blocks) in some passage
    assert [p.start for p in passages] == sorted(p.start for p in passages)
    seen = [False] * len(doc.text)
    for p in passages:
        seen[p.start:p.end] = [True] * (p.end - p.start)
    assert all(seen[i] or doc.text[i].isspace() for i in range(len(doc.text)))


def sentence_start(text: str, i: int) -> bool:
    return i == 0 or text[i - 1] in END or text[i - 1].isspace()


def test_approx_tokens_rule():
    assert approx_tokens("") == approx_tokens(" \n\t\u3000") == 0
    assert approx_tokens("本办法适用于员工。") == 9  # one per CJK character and CJK punctuation
    assert approx_tokens("2024年") == 5  # one per digit
    assert approx_tokens("The leave policy, explained!") == 1 + 1 + 1 + 1 + 2 + 1  # ceil(len/6) per word
    assert approx_tokens("internationalization") == 4
    assert approx_tokens("한국어 ＡＢ") == 5


@pytest.mark.parametrize("budget,overlap", [(60, 0), (60, 25), (120, 40), (400, 40)])
def test_budget_spans_sections_pages(budget, overlap):
    doc = mixed_doc()
    passages = chunk_document(doc, budget=budget, overlap=overlap)
    check(doc, passages, budget)
    assert {p.heading for p in passages} == {"第一章", "第一章 > Leave", "第二章"}
    assert any(len(p.pages) == 2 for p in passages) or budget < 120  # passages may span pages, and say so


def test_custom_count_function():
    doc = mixed_doc()
    chars = len  # e.g. a character budget
    passages = chunk_document(doc, budget=150, overlap=30, count=chars)
    check(doc, passages, 150, count=chars)
    assert max(p.tokens for p in passages) > 120  # packed close to the budget


def test_overlap_is_whole_trailing_sentences_within_limit():
    doc = build_document(Path("a.md"), [(zh_paragraph(40), None, "H"), (zh_paragraph(10), None, "I")])
    passages = chunk_document(doc, budget=100, overlap=45)
    check(doc, passages, 100)
    pairs = [(a, b) for a, b in pairwise(passages) if a.heading == b.heading]
    assert pairs
    for a, b in pairs:
        assert b.start < a.end  # each passage after the first of its section starts inside the previous one
        shared = doc.text[b.start:a.end]
        assert 0 < approx_tokens(shared) <= 45
        assert sentence_start(doc.text, b.start) and shared.endswith("。")
        assert shared.count("。") == 2  # two 20-21 token sentences fit in 45, three would not
    first_i = next(p for p in passages if p.heading == "I")
    assert first_i.start == doc.blocks[1].start  # no overlap across a heading change
    no_overlap = chunk_document(doc, budget=100, overlap=0)
    assert all(b.start >= a.end for a, b in pairwise(no_overlap))


def test_chinese_without_spaces_splits_at_sentence_ends():
    text = "".join(f"第{i}句：这是没有空格的中文长句{'！' if i % 3 else '？'}" for i in range(100))
    doc = build_document(Path("zh.txt"), [(text, None, None)])
    passages = chunk_document(doc, budget=50, overlap=0)
    check(doc, passages, 50)
    assert len(passages) > 10
    for p in passages:
        assert p.text[-1] in "！？" and sentence_start(doc.text, p.start)
    assert "".join(p.text for p in passages) == text


def test_huge_sentence_split_by_characters():
    doc = build_document(Path("a.txt"), [("字" * 1000, None, None)])
    passages = chunk_document(doc, budget=100, overlap=20)
    assert [p.tokens for p in passages] == [100] * 10  # full pieces; no overlap inside a sentence
    assert "".join(p.text for p in passages) == "字" * 1000
    words = " ".join(f"word{i:03d}" for i in range(300))  # English without punctuation: cut at spaces
    doc = build_document(Path("b.txt"), [(words, None, None)])
    passages = chunk_document(doc, budget=40, overlap=0)
    check(doc, passages, 40)
    assert " ".join(p.text for p in passages) == words
    assert all(re.fullmatch(r"word\d{3}( word\d{3})*", p.text) for p in passages)


def test_ids_stable_and_unique():
    docs = [mixed_doc(), build_document(Path("other.md"), [(zh_paragraph(20), None, None)])]
    first = chunk_documents(docs, budget=80, overlap=20)
    again = chunk_documents([mixed_doc(), docs[1]], budget=80, overlap=20)
    assert [p.id for p in first] == [p.id for p in again]
    assert len({p.id for p in first}) == len(first)
    p = first[3]
    assert p.id == "p-" + hashlib.sha1(f"{p.source}:{p.start}:{p.end}".encode()).hexdigest()[:12]
    assert {p.source for p in first} == {"docs/handbook.pdf", "other.md"}


def test_blocks_are_packed_whole_when_they_fit():
    blocks = [(f"第{i}段。" + "内容" * 10 + "。", None, None) for i in range(9)]  # 26 tokens each
    doc = build_document(Path("a.txt"), blocks)
    passages = chunk_document(doc, budget=60, overlap=0, min_tokens=0)
    assert [p.text.count("\n\n") for p in passages] == [1, 1, 1, 1, 0]  # two blocks a passage, none cut
    assert all(p.text.startswith("第") for p in passages)


def test_small_tail_takes_sentences_from_the_previous_passage():
    ten = "甲乙丙丁戊己庚辛壬。"  # 10 tokens
    doc = build_document(Path("a.txt"), [(ten * 6, None, None)])
    assert [p.tokens for p in chunk_document(doc, budget=50, overlap=0, min_tokens=0)] == [50, 10]
    assert [p.tokens for p in chunk_document(doc, budget=50, overlap=0, min_tokens=20)] == [40, 20]
    passages = chunk_document(doc, budget=50, overlap=10, min_tokens=20)
    check(doc, passages, 50)
    assert [p.tokens for p in passages] == [40, 30]  # 20 of its own plus one sentence of overlap
    alone = build_document(Path("b.txt"), [("短。", None, "H1"), (ten * 3, None, "H2")])
    assert [p.text for p in chunk_document(alone, min_tokens=20)] == ["短。", ten * 3]  # alone in its section


def test_small_passage_merged_with_a_neighbour_when_it_fits():
    text = "一二三。四五六七八九十。"
    section = _Section(text, [(0, 4), (4, 12)], budget=12, overlap=0, count=approx_tokens)
    assert section.merge_small([[0, 0, 0], [1, 1, 1]], min_tokens=5) == [[0, 0, 1]]
    assert section.merge_small([[0, 0, 0], [1, 1, 1]], min_tokens=3) == [[0, 0, 0], [1, 1, 1]]
    tight = _Section(text, [(0, 4), (4, 12)], budget=10, overlap=0, count=approx_tokens)
    assert tight.merge_small([[0, 0, 0], [1, 1, 1]], min_tokens=5) == [[0, 0, 0], [1, 1, 1]]  # kept


def test_bad_parameters():
    doc = build_document(Path("a.txt"), [("x。", None, None)])
    for kwargs in ({"budget": 0}, {"budget": 10, "overlap": 10}, {"overlap": -1}, {"min_tokens": -1}):
        with pytest.raises(ValueError, match="budget"):
            chunk_document(doc, **kwargs)
    assert chunk_document(build_document(Path("e.txt"), [])) == []


SENTENCES = st.sampled_from(["第一条规定了适用范围。", "员工请假须提前申请！", "是否可以延期？", "可以；但须审批…",
                             "Leave must be approved.", "Is it paid? ", "Yes!\n", "字" * 70, "word " * 30,
                             "2024年12月31日", "x"])


@settings(max_examples=60, deadline=None)
@given(blocks=st.lists(st.tuples(st.lists(SENTENCES, min_size=1, max_size=12).map("".join),
                                 st.sampled_from([None, 1, 2]), st.sampled_from([None, "A", "A > B"])),
                       max_size=8),
       budget=st.integers(5, 120), overlap_share=st.floats(0, 0.9), min_tokens=st.integers(0, 30))
def test_invariants_hold_for_any_document(blocks, budget, overlap_share, min_tokens):
    blocks = [(t.strip(), page, heading) for t, page, heading in blocks if t.strip()]
    doc = build_document(Path("any.txt"), blocks)
    overlap = int(budget * overlap_share)
    passages = chunk_document(doc, budget=budget, overlap=overlap, min_tokens=min_tokens)
    check(doc, passages, budget)
    for a, b in pairwise(passages):
        if b.start < a.end:  # overlap: whole sentences of the same section, within the limit
            assert a.heading == b.heading and approx_tokens(doc.text[b.start:a.end]) <= overlap
