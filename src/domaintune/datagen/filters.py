"""Filters for generated questions and answers, and the parser for numbered question lists.

Near-duplicates use ROUGE-L F1 (as in self-instruct) against the whole pool (seeds + kept questions).
Tokens: each CJK character is one token (character level for Chinese); runs of ``[a-z0-9]`` after
lower-casing are word tokens (word level for English, exactly the tokenisation of ``rouge_score``'s default
tokenizer without stemming); everything else (punctuation, spaces) is dropped. Text is NFKC-normalised
first so full-width letters and digits count as their ASCII forms.

Scale: exact duplicates are a set lookup; near-duplicates are scored against every pool entry up to
`EXACT_POOL` entries, and past that only against the candidates of a MinHash LSH index (neardup.py), with the
same exact ROUGE-L: every drop is still a real match, but a match that LSH does not propose is missed (recall
just under 1, at the edge of the threshold: see neardup.py and bench/results/dedup_scale.md).

The tokeniser, the key and the scorer are data/similarity.py's (one implementation for gen-data and the training
data's dedup), re-exported here. The LCS is our own bit-parallel one (Hyyrö 2004): ``rouge_score`` computes the
same value with a pure-Python O(n·m) table, which is too slow for pool x candidates comparisons; the tests check our
scores against ``rouge_score`` (English) and against ``rouge_score`` with a character tokenizer and
``rouge-chinese`` (Chinese).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from ..data.similarity import dedup_key, rouge_l, tokenize
from ..data.similarity import f1 as _f1
from ..data.similarity import lcs_from_masks as _lcs_from_masks
from ..data.similarity import masks_of as _masks

if TYPE_CHECKING:
    from .neardup import MinHashCandidates

__all__ = ["dedup_key", "lcs_length", "rouge_l", "tokenize"]  # the ROUGE-L functions gen-data's callers import here

# "1. q", "1) q", "1、q", "(1) q", "第1题：q", "- q": the markers models put in front of list items.
_ITEM_RE = re.compile(r"^\s*(?:[-*•]\s+|[(（]?\d{1,3}\s*[.)、:：）．]\s*|"
                      r"第\s*\d{1,3}\s*[题个]?\s*[.、:：]\s*)(?P<q>.+)$")
_LABEL_RE = re.compile(r"^(?:问题|question|q)\s*[:：]\s*", re.IGNORECASE)

# Control characters (Unicode category Cc) other than tab and line ends: a model's stray \x06 is invisible in
# an editor, but it ends up in the training data and in every answer the tuned model learns to give.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")

# Rejection reasons (the keys of the counts in manifest.json).
TOO_SHORT, TOO_LONG, BLOCKLIST, DUPLICATE, NEAR_DUPLICATE, CONTROL_CHARS = (
    "too_short", "too_long", "blocklist", "duplicate", "near_duplicate", "control_chars")
ANSWER_TRUNCATED, ANSWER_TOO_SHORT, ANSWER_BLOCKLIST, ANSWER_MALFORMED, ANSWER_CONTROL_CHARS = (
    "answer_truncated", "answer_too_short", "answer_blocklist", "answer_malformed", "answer_control_chars")
# Question replies that gave no question at all (rejected.jsonl stage "reply").
UNPARSABLE_REPLY, MALFORMED_REPLY = "unparsable_reply", "malformed_reply"


def control_chars(text: str) -> dict | None:
    """{"control_chars": ["\\u0006", ...], "at": first index} when `text` holds control characters (tab and line
    ends are fine), else None: the detail of a `control_chars` rejection."""
    first = _CONTROL_RE.search(text)
    if first is None:
        return None
    found = _CONTROL_RE.findall(text, first.start())
    return {"control_chars": sorted({f"\\u{ord(c):04x}" for c in found}), "at": first.start()}


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    if not a or not b:
        return 0
    return _lcs_from_masks(_masks(a), len(a), b)


@dataclass
class _Entry:
    text: str
    n: int
    masks: dict[str, int] = field(repr=False)
    tokens: list[str] = field(repr=False)


# Pools up to this size are scanned in full (exact); larger ones are searched through MinHash LSH candidates
# (neardup.py: recall below 1 at the edge of the threshold, measured by bench/dedup_scale.py). A gen-data run of a
# few thousand questions never leaves the exact scan for most of its questions.
EXACT_POOL = 2000


class NearDupIndex:
    """The pool of questions; `most_similar` finds the first pool entry at or above the threshold.

    Up to `exact_pool` entries every entry is scored; past that, only the candidates that MinHash LSH proposes
    (`neardup.MinHashCandidates`, built on the first add past `exact_pool`), in pool order, with the same score.
    """

    def __init__(self, threshold: float, exact_pool: int = EXACT_POOL):
        self.threshold, self.exact_pool = threshold, exact_pool
        self._entries: list[_Entry] = []
        self._lsh: MinHashCandidates | None = None  # once the pool outgrows exact_pool

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, text: str) -> None:
        toks = tokenize(text)
        if not toks:
            return
        self._entries.append(_Entry(text, len(toks), _masks(toks), toks))
        if self._lsh is not None:
            self._lsh.add(toks)
        elif len(self._entries) > self.exact_pool:
            from .neardup import MinHashCandidates  # datasketch only for pools that need it

            self._lsh = MinHashCandidates()
            for e in self._entries:
                self._lsh.add(e.tokens)

    def most_similar(self, text: str) -> tuple[float, str | None]:
        """(score, entry) of the first entry with ROUGE-L >= threshold, else (best score, None); with LSH, the
        first and best among the candidates."""
        toks = tokenize(text)
        m, best = len(toks), 0.0
        if not m:
            return 0.0, None
        entries = self._entries if self._lsh is None else [self._entries[i] for i in self._lsh.candidates(toks)]
        for e in entries:
            # F1 <= 2*min(n, m)/(n + m): skip entries whose length alone rules them out.
            if 2 * min(e.n, m) / (e.n + m) < self.threshold:
                continue
            score = _f1(_lcs_from_masks(e.masks, e.n, toks), e.n, m)
            if score >= self.threshold:
                return score, e.text
            best = max(best, score)
        return best, None


@lru_cache(maxsize=16)
def _keyword_matcher(words: tuple[str, ...]) -> re.Pattern | None:
    parts = []
    for w in words:
        w = w.strip().lower()
        if not w:
            continue
        # Whole words for ASCII keywords; substrings for CJK (there are no spaces between words).
        parts.append(rf"\b{re.escape(w)}\b" if w.isascii() else re.escape(w))
    return re.compile("|".join(parts), re.IGNORECASE) if parts else None


@dataclass
class Rejection:
    reason: str
    detail: dict = field(default_factory=dict)


class QuestionFilter:
    """Control characters, length bounds, keyword blocklist, exact duplicates and ROUGE-L near-duplicates, in that
    order.

    `check` does not change the pool; `add` puts a kept question (or a seed) into it.
    """

    def __init__(self, *, min_chars: int, max_chars: int, blocklist: list[str], threshold: float,
                 exact_pool: int = EXACT_POOL):
        self.min_chars, self.max_chars = min_chars, max_chars
        self._blocked = _keyword_matcher(tuple(blocklist))
        self._keys: set[str] = set()
        self.index = NearDupIndex(threshold, exact_pool)

    def __contains__(self, question: str) -> bool:
        """Whether an exact duplicate of `question` is in the pool."""
        return dedup_key(question) in self._keys

    def add(self, question: str) -> None:
        self._keys.add(dedup_key(question))
        self.index.add(question)

    def check(self, question: str) -> Rejection | None:
        if (bad := control_chars(question)) is not None:
            return Rejection(CONTROL_CHARS, bad)
        n = len(question)
        if n < self.min_chars:
            return Rejection(TOO_SHORT, {"chars": n})
        if n > self.max_chars:
            return Rejection(TOO_LONG, {"chars": n})
        if self._blocked and (m := self._blocked.search(question)):
            return Rejection(BLOCKLIST, {"keyword": m.group(0)})
        if dedup_key(question) in self._keys:
            return Rejection(DUPLICATE)
        score, match = self.index.most_similar(question)
        if match is not None:
            return Rejection(NEAR_DUPLICATE, {"similar_to": match, "rouge_l": round(score, 4)})
        return None


def check_completion(comp: Any, cfg: Any) -> Rejection | None:
    """A teacher's answer (a Completion, or None when it never gave a well-formed one) checked as gen-data checks
    answers, with `cfg`'s min_answer_chars and answer_blocklist."""
    if comp is None:
        return Rejection(ANSWER_MALFORMED)
    return check_answer(comp.text, comp.finish_reason, min_chars=cfg.min_answer_chars, blocklist=cfg.answer_blocklist)


def check_answer(text: str, finish_reason: str | None, *, min_chars: int,
                 blocklist: list[str]) -> Rejection | None:
    """Why an answer is unusable, or None. A cut answer (finish_reason 'length') is reported first, then control
    characters (see `control_chars`), length and blocklist."""
    if finish_reason == "length":
        return Rejection(ANSWER_TRUNCATED, {"answer": text})
    if (bad := control_chars(text)) is not None:
        return Rejection(ANSWER_CONTROL_CHARS, {**bad, "answer": text})
    if len(text.strip()) < min_chars:
        return Rejection(ANSWER_TOO_SHORT, {"answer": text})
    blocked = _keyword_matcher(tuple(blocklist))
    if blocked and (m := blocked.search(text)):
        return Rejection(ANSWER_BLOCKLIST, {"keyword": m.group(0), "answer": text})
    return None


def parse_questions(text: str, truncated: bool = False) -> list[str]:
    """Questions from a model's numbered list, markers and labels stripped.

    Lines without a list marker are ignored when some lines have one (they are preambles such as
    "Here are 10 questions:"); otherwise every non-empty line counts. A reply cut by max_tokens
    (`truncated`) loses its last item, which may be incomplete.
    """
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    items = [m.group("q") for ln in lines if (m := _ITEM_RE.match(ln))]
    if not items:
        items = lines
    if truncated and items:
        items = items[:-1]
    out = []
    for q in items:
        q = _LABEL_RE.sub("", q.strip().strip("*").strip()).strip().strip('"“”').strip()
        if q:
            out.append(q)
    return out
