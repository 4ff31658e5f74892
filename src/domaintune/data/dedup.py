"""Duplicate training rows and test-set contamination (`data.dedup`, `data.exclude`), on whole lists of texts.

`duplicates(texts, mode)` says for each text whether it repeats an earlier kept one (and which); `contaminated(
prompts, test_prompts, near)` whether a training prompt is (nearly) a test prompt. The data pipeline calls them on
the rows' texts and drops the rows that get an index; these functions only decide.

Two measures, the same as gen-data's question filters so that `gen-data` and `train` agree on what a duplicate is:

- exact: `text_key` equal. NFKC (full-width letters and digits count as ASCII), case-folded, punctuation and
  spaces removed as separators: "Hello, World!" = "hello world", "你好，世界。" = "你好世界". Letters of every
  script, digits, symbols and emoji are kept, so texts that differ in anything but case, spacing and punctuation
  never merge ("a b" and "ab" differ: a space between two words is one separator; CJK characters, which need none,
  are separated one by one). A text with no letter, digit or symbol at all keeps gen-data's `dedup_key` (spaces
  collapsed, punctuation kept): "???" and "!!!" are not one text.
- near: ROUGE-L F1 >= threshold with gen-data's tokens and scorer (data/similarity.py: CJK characters one by one,
  ASCII words; the self-instruct measure gen-data uses for questions). Up to `EXACT_POOL` (200) kept texts every
  one is scored; past that only the candidates of a MinHash LSH index (`similarity.MinHashCandidates`), which is what
  keeps a million texts tractable. Recall is just under 1 at the edge of the threshold (bench/results/
  dedup_scale.md); every reported match is a real ROUGE-L >= threshold match, and the one reported is the earliest
  kept text that matches among those scored, as in gen-data.

Memory at scale: only the first EXACT_POOL kept texts keep their tokens; past them a candidate is tokenised again
from `texts` when scored (a few candidates per text), so the cost per kept text is the LSH index's.

Contamination (`contaminated`): the test prompts are the pool, indexed once, and every training prompt is looked
up: `text_key` equal, else (near) ROUGE-L >= threshold with a MinHash LSH candidate, always through LSH (a scan of
even a few hundred test prompts per training prompt is too slow for a million rows; the same recall just under 1).
gen-data's own decontamination (datagen/decontam.py) also drops questions sharing an 8-gram with a test answer;
training rows are checked on their prompts only, as `data.exclude` says.
"""
from __future__ import annotations

import re
import sys
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

from .similarity import dedup_key, f1, lcs_from_masks, masks_of, tokenize

if TYPE_CHECKING:
    from datasketch import MinHash

    from .similarity import MinHashCandidates

# Scripts written without spaces between words: each character is one unit of the key (so a comma between two of
# them, which removing punctuation leaves as a separator, changes nothing).
_NO_SPACE = [(0x2E80, 0x2FDF), (0x3040, 0x30FF), (0x3100, 0x312F), (0x31A0, 0x31FF), (0x3400, 0x4DBF),
             (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x323AF)]
# Kept texts scanned in full before MinHash LSH takes over. gen-data's question pool scans 2,000
# (filters.EXACT_POOL): there a pool grows by a few thousand questions a run; training data runs to millions of
# rows, and 200 keeps the scan's quadratic start to a fraction of a second (20,000 dense near-duplicate rows: 6.8 s
# at 200, 17 s at 2,000, the same decisions on all but 7 rows).
EXACT_POOL = 200


def _char_class(codepoints: list[int]) -> str:
    """A regex character class for these (sorted) code points, as ranges."""
    parts, start, prev = [], codepoints[0], codepoints[0]
    for cp in [*codepoints[1:], -1]:
        if cp == prev + 1:
            prev = cp
            continue
        parts.append(re.escape(chr(start)) + ("" if prev == start else "-" + re.escape(chr(prev))))
        start = prev = cp
    return "[" + "".join(parts) + "]"


@lru_cache(maxsize=1)
def _patterns() -> tuple[re.Pattern[str], re.Pattern[str]]:
    """(separators: runs of punctuation, spaces and control/format characters; units: characters that stand alone:
    symbols and characters of scripts without spaces). Built once from the Unicode database (about 0.5 s)."""
    no_space = {cp for a, b in _NO_SPACE for cp in range(a, b + 1)}
    seps, units = [], []
    for cp in range(sys.maxunicode + 1):
        cat = unicodedata.category(chr(cp))
        if cat[0] in "PZ" or cat in ("Cc", "Cf"):
            seps.append(cp)
        elif cat[0] == "S" or cp in no_space:
            units.append(cp)
    return re.compile(_char_class(seps) + "+"), re.compile("(" + _char_class(units) + ")")


def text_key(text: str) -> str:
    """The identity of a text for exact duplicates (module docstring): NFKC, case-folded, punctuation and spaces
    as separators, one space between units."""
    seps, units = _patterns()
    norm = unicodedata.normalize("NFKC", text).casefold()
    key = " ".join(units.sub(r" \1 ", seps.sub(" ", norm)).split())
    return key or dedup_key(text)


class _NearPool:
    """Texts for the near-duplicate check: the first `exact_pool` with their tokens (scanned in full), the rest
    through MinHash LSH candidates, re-tokenised from `texts` when scored."""

    def __init__(self, texts: Sequence[str], threshold: float, exact_pool: int = EXACT_POOL) -> None:
        self.texts, self.threshold, self.exact_pool = texts, threshold, exact_pool
        self._small: list[tuple[int, list[str]]] = []  # (index into texts, tokens)
        self._lsh: MinHashCandidates | None = None
        self._keys: list[int] = []  # LSH entry -> index into texts
        self._sig: tuple[list[str], MinHash] | None = None  # the last query's signature, reused by add()

    def add(self, i: int, toks: list[str]) -> None:
        """Put texts[i] (its tokens `toks`) into the pool; indices must grow."""
        if not toks:
            return
        self._keys.append(i)
        if self._lsh is not None:
            sig = self._sig[1] if self._sig is not None and self._sig[0] is toks else None
            self._lsh.add(toks, sig)
            return
        self._small.append((i, toks))
        if len(self._small) > self.exact_pool:
            from .similarity import MinHashCandidates  # datasketch only where a pool needs it

            self._lsh = MinHashCandidates()
            for _, t in self._small:
                self._lsh.add(t)
            self._small = []

    def first_match(self, toks: list[str]) -> int | None:
        """The index of the earliest scored pool text with ROUGE-L >= threshold, else None."""
        m = len(toks)
        if not m:
            return None
        masks = masks_of(toks)  # LCS is symmetric: the query's masks, the candidates' tokens
        if self._lsh is None:
            pool = iter(self._small)
        else:
            sig = self._lsh.signature(toks)
            self._sig = (toks, sig)
            pool = ((self._keys[k], tokenize(self.texts[self._keys[k]])) for k in self._lsh.candidates(toks, sig))
        for i, other in pool:
            n = len(other)
            # F1 <= 2*min(n, m)/(n + m): lengths alone rule most pairs out.
            if 2 * min(n, m) / (n + m) < self.threshold:
                continue
            if f1(lcs_from_masks(masks, m, other), n, m) >= self.threshold:
                return i
        return None


def duplicates(texts: Sequence[str], mode: Literal["exact", "near"], threshold: float = 0.7) -> list[int | None]:
    """For each text, the index of the earlier kept text it duplicates, or None when it is kept.

    The first occurrence (lowest index) is kept. exact: `text_key` equal; near: that, or else ROUGE-L >= threshold
    with a kept text (module docstring), the earliest such text reported. Deterministic: the same texts in the same
    order give the same answer on every run and machine.
    """
    if mode not in ("exact", "near"):
        raise ValueError(f"mode must be 'exact' or 'near', got {mode!r}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    first: dict[str, int] = {}
    pool = _NearPool(texts, threshold) if mode == "near" else None
    out: list[int | None] = []
    for i, text in enumerate(texts):
        key = text_key(text)
        hit = first.get(key)
        if hit is None and pool is not None:
            toks = tokenize(text)
            hit = pool.first_match(toks)
            if hit is None:
                pool.add(i, toks)
        if hit is None:
            first[key] = i
        out.append(hit)
    return out


def contaminated(prompts: Sequence[str], test_prompts: Sequence[str], near: bool,
                 threshold: float = 0.7) -> list[int | None]:
    """For each training prompt, the index of a test prompt it equals (`text_key`; the first such test prompt) or,
    with `near`, has ROUGE-L >= threshold with (the first such among the MinHash LSH candidates); None when clean."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    keys: dict[str, int] = {}
    pool = _NearPool(test_prompts, threshold, exact_pool=0) if near else None
    for j, t in enumerate(test_prompts):
        if keys.setdefault(text_key(t), j) == j and pool is not None:
            pool.add(j, tokenize(t))
    out: list[int | None] = []
    for p in prompts:
        hit = keys.get(text_key(p))
        if hit is None and pool is not None:
            hit = pool.first_match(tokenize(p))
        out.append(hit)
    return out
