"""Passages for grounded gen-data: each Document cut into pieces that fit a token budget and cite their source.

A passage is a span of `Document.text` (`doc.text[p.start:p.end] == p.text`), so a generated question can
point back to the exact text, file, page(s) and heading it came from. The rules:

- A passage never crosses a heading change: each run of blocks under one heading path (a *section*) is cut on
  its own.
- The blocks of a section are packed greedily up to `budget` tokens; a block that does not fit in the open
  passage starts the next one whole if it fits alone. A block larger than the budget is cut at sentence ends
  (。！？；… and ASCII .!? before a space, a CJK character or the end; also line breaks); a sentence still
  larger is cut by characters (at a space in its second half when there is one, so English words stay whole).
- Overlap: a passage after the first of its section starts with the last whole sentences of the previous
  passage, at most `overlap` tokens of them (fewer where the budget needs the room; 0 turns it off).
- A passage whose own text (without the overlap) is under `min_tokens` is merged with a neighbour of its
  section when the result fits the budget; failing that, sentences move to it from the previous passage
  (greedy packing leaves such tails, e.g. a paragraph of 410 tokens in a budget of 400); else it is kept.

`count` is any text -> tokens function (a real tokenizer's `lambda t: len(tok.encode(t))` works and should be
monotone: a longer span never counts less); `approx_tokens` is the default, a model-free estimate.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby

from .documents import CJK, Block, Document

_CLOSE = "”’」』）)\"'"
_SENTENCE_END = re.compile(rf"[。！？；]+[{_CLOSE}]*|…+[{_CLOSE}]*|[.!?]+[{_CLOSE}]*(?=\s|$|[{CJK}])|\n")
_WORD = re.compile(rf"[^\W\d_{CJK}\uac00-\ud7af]+")  # a run of letters other than CJK and Hangul


@dataclass(frozen=True)
class Passage:
    """A span of a Document (`doc.text[start:end] == text`), overlap included, with where it came from."""
    id: str
    text: str
    source: str
    page: int | None  # the page where the passage starts (PDF)
    pages: tuple[int, ...]  # every page it covers (empty if the document has no pages)
    heading: str | None
    start: int
    end: int
    tokens: int  # count(text)


def approx_tokens(text: str) -> int:
    """A model-free token estimate, close to or above what the BPE tokenizers of Qwen, LLaMA and BLOOM give:
    1 per CJK (and Hangul) character or CJK punctuation mark, 1 per digit (Qwen and LLaMA-2 split numbers into
    digits), 1 per other symbol, and ceil(n/6) per run of n other letters (common English words are one token:
    about 1.3 tokens per English word with its punctuation). Whitespace counts 0."""
    words = _WORD.findall(text)  # every other non-space character counts 1 (computed in C: it runs often)
    return len("".join(text.split())) - sum(map(len, words)) + sum((len(w) + 5) // 6 for w in words)


def _trim(text: str, s: int, e: int) -> tuple[int, int]:
    while s < e and text[s].isspace():
        s += 1
    while e > s and text[e - 1].isspace():
        e -= 1
    return s, e


def _split_chars(text: str, s: int, e: int, budget: int, count: Callable[[str], int]) -> list[tuple[int, int]]:
    """Cut text[s:e] into spans of at most `budget` tokens, each as long as possible (a search on the cut point:
    doubling, then bisection). At least one character per span, whatever `count` says of it."""
    spans = []
    while s < e:
        if count(text[s:e]) <= budget:
            spans.append((s, e))
            break
        lo, hi = s + 1, min(e, s + max(budget, 1))  # count(text[s:lo]) <= budget is assumed, count(s:hi) tested
        while hi < e and count(text[s:hi]) <= budget:
            lo, hi = hi, min(e, s + 2 * (hi - s))
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if count(text[s:mid]) <= budget else (lo, mid)
        cut = lo
        if not text[cut - 1].isspace() and not text[cut].isspace():  # mid-word: back up to a space if near
            space = max(text.rfind(" ", s + (cut - s) // 2, cut), text.rfind("\n", s + (cut - s) // 2, cut))
            cut = space + 1 if space > s else cut
        spans.append(_trim(text, s, cut))
        s = _trim(text, cut, e)[0]
    return [sp for sp in spans if sp[0] < sp[1]]


def _pieces(text: str, block: Block, budget: int, count: Callable[[str], int]) -> list[tuple[int, int]]:
    """The sentences of a block as spans of Document.text (trimmed), those over the budget cut by characters."""
    bounds, pos = [], block.start
    for m in _SENTENCE_END.finditer(text, block.start, block.end):
        bounds.append((pos, m.end()))
        pos = m.end()
    bounds.append((pos, block.end))
    pieces = []
    for s, e in (_trim(text, s, e) for s, e in bounds):
        if s < e:
            pieces += [(s, e)] if count(text[s:e]) <= budget else _split_chars(text, s, e, budget, count)
    return pieces


class _Section:
    """Packs the pieces (sentences) of one section into passages: [first, core, last] piece indices, where
    pieces first..core-1 are the overlap taken from the previous passage."""

    def __init__(self, text: str, pieces: list[tuple[int, int]], budget: int, overlap: int,
                 count: Callable[[str], int]) -> None:
        self.text, self.pieces, self.budget, self.overlap, self.count = text, pieces, budget, overlap, count

    def tokens(self, i: int, j: int) -> int:
        return self.count(self.text[self.pieces[i][0]:self.pieces[j][1]])

    def fits(self, i: int, j: int) -> bool:
        return self.tokens(i, j) <= self.budget

    def opening(self, prev: list[int] | None, core: int, last: int) -> int:
        """First piece of a passage with new text core..last: the overlap start (prev's trailing sentences,
        never all of prev, at most `overlap` tokens, within the budget), or `core` for none."""
        first = core
        if prev is not None and self.overlap > 0:
            for m in range(prev[2], prev[0], -1):
                if self.tokens(m, prev[2]) > self.overlap or not self.fits(m, last):
                    break
                first = m
        return first

    def pack(self, block_ranges: list[tuple[int, int]]) -> list[list[int]]:
        passages: list[list[int]] = []

        def start(core: int, last: int) -> list[int]:
            passage = [self.opening(passages[-1] if passages else None, core, last), core, last]
            passages.append(passage)
            return passage

        current: list[int] | None = None
        for lo, hi in block_ranges:
            if current is not None and self.fits(current[0], hi):
                current[2] = hi
            elif self.fits(lo, hi):  # the whole block opens the next passage
                current = start(lo, hi)
            else:  # larger than the budget: sentence by sentence
                for k in range(lo, hi + 1):
                    if current is not None and self.fits(current[0], k):
                        current[2] = k
                    else:
                        current = start(k, k)
        return passages

    def merge_small(self, passages: list[list[int]], min_tokens: int) -> list[list[int]]:
        i = 0
        while i < len(passages) and len(passages) > 1:
            p = passages[i]
            if self.tokens(p[1], p[2]) >= min_tokens:
                i += 1
            elif i > 0 and self.fits(passages[i - 1][0], p[2]):  # into the previous passage
                passages[i - 1][2] = p[2]
                del passages[i]
            elif i + 1 < len(passages) and self.fits(p[0], passages[i + 1][2]):  # the next one into this one
                p[2] = passages[i + 1][2]
                del passages[i + 1]
            else:
                if i > 0:
                    self.borrow(passages[i - 1], p, min_tokens)
                i += 1
        return passages

    def borrow(self, prev: list[int], p: list[int], min_tokens: int) -> None:
        """Move sentences from the end of `prev` (keeping at least one of its own, and min_tokens) to `p`."""
        for core in range(p[1] - 1, prev[1], -1):
            if not self.fits(core, p[2]) or self.tokens(prev[1], core - 1) < min_tokens:
                return
            prev[2] = core - 1
            p[0], p[1] = self.opening(prev, core, p[2]), core
            if self.tokens(core, p[2]) >= min_tokens:
                return


def chunk_document(doc: Document, budget: int = 400, overlap: int = 40, count: Callable[[str], int] = approx_tokens,
                   min_tokens: int = 20) -> list[Passage]:
    """Cut `doc` into passages of at most `budget` tokens (by `count`), in document order; see the module
    docstring for the rules. Passage ids are stable: "p-" + sha1("source:start:end")[:12]."""
    if budget < 1 or not 0 <= overlap < budget or min_tokens < 0:
        raise ValueError(f"chunking needs budget >= 1 and 0 <= overlap < budget, min_tokens >= 0; got "
                         f"budget={budget}, overlap={overlap}, min_tokens={min_tokens}")
    out: list[Passage] = []
    for heading, group in groupby(doc.blocks, key=lambda b: b.heading):
        blocks = list(group)
        pieces: list[tuple[int, int]] = []
        owner: list[Block] = []  # the block of each piece
        ranges = []
        for block in blocks:
            found = _pieces(doc.text, block, budget, count)
            if found:
                ranges.append((len(pieces), len(pieces) + len(found) - 1))
                pieces += found
                owner += [block] * len(found)
        section = _Section(doc.text, pieces, budget, overlap, count)
        for first, _, last in section.merge_small(section.pack(ranges), min_tokens):
            start, end = pieces[first][0], pieces[last][1]
            text = doc.text[start:end]
            pages = tuple(sorted({b.page for b in owner[first:last + 1] if b.page is not None}))
            source = owner[first].source
            digest = hashlib.sha1(f"{source}:{start}:{end}".encode()).hexdigest()[:12]
            out.append(Passage(f"p-{digest}", text, source, owner[first].page, pages, heading, start, end,
                               count(text)))
    return out


def chunk_documents(docs: list[Document], budget: int = 400, overlap: int = 40,
                    count: Callable[[str], int] = approx_tokens, min_tokens: int = 20) -> list[Passage]:
    """The passages of every document, in order (see `chunk_document`)."""
    return [p for doc in docs for p in chunk_document(doc, budget, overlap, count, min_tokens)]
