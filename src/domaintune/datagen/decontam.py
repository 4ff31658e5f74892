"""Decontamination: drop generated questions that overlap the files listed in `selfinstruct.exclude`.

The files are typically the evaluation set: a teacher LLM asked about a domain will sometimes write a question
that is (nearly) a test question, or that copies a clause of a test answer, and a model trained on it scores
well on the test for the wrong reason. `load_excluded` reads the files; `Decontaminator.check` tells whether a
question is contaminated, and by which excluded text ("path:line"), so a drop can be traced.

Tokens are those of `filters.tokenize` (the tokens of the ROUGE-L near-duplicate filter): one token per CJK
character, one per lower-cased ASCII word; punctuation and spaces are dropped, so they never hide a match.
A question is contaminated when the first of these rules holds:

1. exact: `filters.dedup_key(question)` (NFKC, case-folded, whitespace collapsed) equals that of an excluded
   text. Cheap, and it is the only rule for texts with no tokens at all.
2. ngram: the question shares a run of `ngram` consecutive tokens with any excluded text, answers included
   (a question that quotes a test answer leaks that answer). The default 8 is the trade-off between the two
   errors: common phrases of a domain ("how can parents help their child", 6 words) must not drop good
   questions, while a copied clause (8+ words) should be caught. Larger n misses shorter copies; smaller n
   drops questions for sharing idioms: against the bundled examples/data/test.jsonl, n=6 drops 5 of the 82
   bundled train/seed questions for "how can i help my child" and "青春期的孩子", n=7 and n=8 drop none.
   Chinese counts per character, so 8 tokens are a shorter phrase there (about four words); raise `ngram`
   if Chinese questions of one domain are dropped for stock phrases. Questions shorter than `ngram` tokens
   can only be caught by the other two rules.
3. near_duplicate: ROUGE-L F1 (`filters.rouge_l`, the self-instruct measure) of the question against an
   excluded *question-like* text is >= `rouge_threshold`. Question-like: an instruction, an input, a user turn,
   a "question" or "text" field, a line of a .txt file, any other string field except answer-like keys
   (output, answer, response, ...). Answers are left out because they are long: ROUGE-L F1 is at most
   2m/(n+m), so a text about twice the question's length cannot reach 0.7; the n-gram rule covers them.
   A test question with a word or two of twelve changed scores 0.83-0.92; a question that shares only a
   stock phrase with one scores about 0.5.

Speed: the excluded texts are indexed once. For the ngram rule, a dict from the hash of each n-gram tuple to
the text holding it makes a check O(len(question)); a hit is confirmed against the text's tokens (so a hash
collision cannot drop a question). For the near-duplicate rule, `filters.NearDupIndex` scores every entry per
check, too slow for thousands of test rows times thousands of questions, so candidates come from an inverted
index (a set-similarity join, as in PPJoin): F1 = 2*LCS/(n+m) >= t needs an LCS, and so a multiset overlap,
of at least t*len/(2-t) tokens for either text. With tokens numbered by occurrence and ordered rarest first,
two texts with that overlap share a token among their first len - ceil(t*len/(2-t)) + 1 ("prefixes"), so
only prefixes are indexed and looked up; a positional bound (shared tokens seen so far, this one, and at most
the tokens left after it in the shorter remainder) drops most candidates on the spot, then the multiset
overlap and `filters.lcs_length` rule out most of the rest before `filters.rouge_l` scores a candidate.
Every filter is exact (no match is missed; a test checks against a full scan). 5,000 test rows x 2,000
questions take about 1-3 s on one core (build the index once: about 1 s of that).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from ..data.examples import parse_example
from ..data.reader import read_records
from ..data.templates import Template
from ..errors import UserError
from .filters import Rejection, dedup_key, lcs_length, rouge_l, tokenize

CONTAMINATED = "contaminated"  # the Rejection reason (a key of the counts in manifest.json)
FIELD = "selfinstruct.exclude"
# String fields of free-form rows that hold answers: n-gram rule only (see the module docstring).
ANSWER_KEYS = frozenset({"output", "answer", "answers", "response", "completion", "chosen", "rejected",
                         "target", "reference", "references", "label"})
_ROWS = ("instruction/input/output, messages, question or text fields (or use a .txt file, one text per line)")
# instruction + "\n" + input: the newline keeps the last word of one and the first of the other apart.
_JOIN = Template(name="exclude", instruction_input_format="{instruction}\n{input}")


@dataclass(frozen=True)
class ExcludedText:
    """One text that must not leak into generated data, and where it came from."""

    text: str
    where: str  # "path:line", the 1-based line where the record starts
    question_like: bool = True  # also compared by ROUGE-L (False for answers: n-gram and exact rules only)


def _with_counts(tokens: list[str]) -> list[tuple[str, int]]:
    """Tokens numbered by occurrence ("a", "b", "a" -> (a,0), (b,0), (a,1)): set overlap = multiset overlap."""
    seen: dict[str, int] = {}
    out = []
    for tok in tokens:
        k = seen.get(tok, 0)
        seen[tok] = k + 1
        out.append((tok, k))
    return out


def _as_text(gram: tuple[str, ...]) -> str:
    """An n-gram as readable text: words spaced, CJK characters joined ("孩子玩ipad 3小时")."""
    out = gram[0]
    for prev, tok in pairwise(gram):
        out += (" " if prev.isascii() and tok.isascii() else "") + tok
    return out


class Decontaminator:
    """The excluded texts, indexed for the three rules of the module docstring; `check` one question at a time."""

    def __init__(self, texts: list[ExcludedText], ngram: int = 8, rouge_threshold: float = 0.7) -> None:
        if ngram < 1:
            raise ValueError(f"ngram must be >= 1, got {ngram}")
        if not 0 < rouge_threshold <= 1:
            raise ValueError(f"rouge_threshold must be in (0, 1], got {rouge_threshold}")
        self.ngram, self.threshold = ngram, rouge_threshold
        self._texts = list(texts)
        self._exact: dict[str, str] = {}  # dedup_key -> where (the first text with it)
        self._grams: dict[int, int] = {}  # hash of an n-gram tuple -> index of the first text holding it
        # question-like texts: (text, where, tokens, numbered tokens as a set)
        self._near: list[tuple[str, str, list[str], frozenset[tuple[str, int]]]] = []
        near_seen: set[str] = set()
        for i, t in enumerate(self._texts):
            if key := dedup_key(t.text):
                self._exact.setdefault(key, t.where)
            toks = tokenize(t.text)
            for j in range(len(toks) - ngram + 1):
                self._grams.setdefault(hash(tuple(toks[j:j + ngram])), i)
            if t.question_like and toks and t.text not in near_seen:
                near_seen.add(t.text)
                self._near.append((t.text, t.where, toks, frozenset(_with_counts(toks))))
        # Prefix filtering (module docstring): order the numbered tokens rarest first, index each text's prefix.
        df: dict[tuple[str, int], int] = {}
        for *_, elements in self._near:
            for el in elements:
                df[el] = df.get(el, 0) + 1
        self._rank = {el: r for r, el in enumerate(sorted(df, key=lambda el: (df[el], el)))}
        self._lengths = [len(toks) for _, _, toks, _ in self._near]
        # numbered token -> (index into _near, position in that text's prefix)
        self._postings: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for e, (_, _, toks, _) in enumerate(self._near):
            for j, el in enumerate(self._prefix(toks)):
                self._postings.setdefault(el, []).append((e, j))

    def _prefix(self, toks: list[str]) -> list[tuple[str, int]]:
        """The rarest len - L + 1 numbered tokens, L = the least LCS a match needs (tokens unknown to the index
        first): two texts with a multiset overlap >= L share one of their prefixes' elements."""
        n, t = len(toks), self.threshold
        # F1 = 2L/(n+m) >= t and L <= m give L >= t*n/(2-t); the epsilon only ever lengthens the prefix.
        need = max(1, math.ceil(t * n / (2 - t) - 1e-9))
        return sorted(_with_counts(toks), key=lambda el: self._rank.get(el, -1))[:n - need + 1]

    def __len__(self) -> int:
        return len(self._texts)

    def check(self, question: str) -> Rejection | None:
        """Rejection("contaminated", detail) if `question` overlaps an excluded text, else None.

        detail: {"match": "exact" | "ngram" | "near_duplicate", "excluded": "path:line"}, plus "ngram" (the
        shared n-gram as text) or "rouge_l" (the score, 4 decimals)."""
        key = dedup_key(question)
        if key in self._exact:
            return Rejection(CONTAMINATED, {"match": "exact", "excluded": self._exact[key]})
        toks = tokenize(question)
        if shared := self._shared_ngram(toks):
            gram, where = shared
            return Rejection(CONTAMINATED, {"match": "ngram", "excluded": where, "ngram": _as_text(gram)})
        if near := self._near_duplicate(toks, question):
            score, where = near
            return Rejection(CONTAMINATED, {"match": "near_duplicate", "excluded": where, "rouge_l": round(score, 4)})
        return None

    def _shared_ngram(self, toks: list[str]) -> tuple[tuple[str, ...], str] | None:
        n = self.ngram
        for j in range(len(toks) - n + 1):
            gram = tuple(toks[j:j + n])
            i = self._grams.get(hash(gram))
            if i is None:
                continue
            other = tokenize(self._texts[i].text)
            if any(tuple(other[k:k + n]) == gram for k in range(len(other) - n + 1)):
                return gram, self._texts[i].where
        return None

    def _near_duplicate(self, toks: list[str], question: str) -> tuple[float, str] | None:
        """(score, where) of the best question-like text with ROUGE-L >= threshold (the first on ties)."""
        m, t = len(toks), self.threshold
        if not m or not self._near:
            return None
        # F1 = 2*LCS/(n+m) >= t, and LCS <= the multiset overlap; every bound below keeps a margin of 1e-9 so
        # float rounding cannot rule out a match before rouge_l, the judge, scores it.
        found: dict[int, int] = {}  # candidate -> shared tokens seen so far in both prefixes; -1: ruled out
        lengths = self._lengths
        for i, el in enumerate(self._prefix(toks)):
            left = m - i  # this token and the ones ranked after it in the question
            for e, j in self._postings.get(el, ()):
                if (seen := found.get(e, 0)) < 0:
                    continue
                # Positional filter (PPJoin): every shared token ranked before this one has been seen, so
                # the overlap is at most seen + this one + min(m-i-1, n-j-1) tokens ranked after it.
                n = lengths[e]
                ok = 2 * (seen + (left if left < n - j else n - j)) >= t * (n + m) - 1e-9
                found[e] = seen + 1 if ok else -1
        elements = set(_with_counts(toks))
        best: tuple[float, str] | None = None
        for e in sorted(e for e, seen in found.items() if seen > 0):
            text, where, other, other_elements = self._near[e]
            least = t * (len(other) + m) - 1e-9
            if 2 * len(elements & other_elements) < least or 2 * lcs_length(other, toks) < least:
                continue
            score = rouge_l(text, question)
            if score >= t and (best is None or score > best[0]):
                best = (score, where)
        return best


def _strings(value: Any) -> list[tuple[str, bool]]:
    """Every non-blank string in a JSON value, in order, with whether it is question-like (not under an
    answer-like key). Iterative: rows may nest as deep as the JSON reader allows."""
    out, stack = [], [(value, True)]
    while stack:
        v, question_like = stack.pop()
        if isinstance(v, str):
            if v.strip():
                out.append((v, question_like))
        elif isinstance(v, dict):
            stack += [(x, question_like and k.lower() not in ANSWER_KEYS)
                      for k, x in reversed(v.items()) if k != "role"]
        elif isinstance(v, list):
            stack += [(x, question_like) for x in reversed(v)]
    return out


def _row_texts(obj: Any) -> list[tuple[str, bool]]:
    """(text, question-like) of one row: the user and assistant turns of a valid training row (instruction/input/
    output, history, messages; system prompts are boilerplate, not test content), else every string value."""
    try:
        ex = parse_example(obj, "", require_answer=False, template=_JOIN)
    except UserError:
        return _strings(obj)
    out = [(m["content"], m["role"] == "user") for m in ex.messages if m["role"] != "system"]
    if "messages" not in obj and isinstance(obj.get("input"), str) and obj["input"].strip():
        # Against instruction + input joined, a copy of either part alone would score a diluted ROUGE-L.
        out += [(obj["instruction"], True), (obj["input"], True)]
    return out


def _read_json(given: str, p: Path) -> list[ExcludedText]:
    try:
        records = read_records(p)
    except UserError as e:
        raise UserError(f"{FIELD}: {e}") from None
    out = []
    for line, obj in records:
        texts = _row_texts(obj)
        if not texts:
            raise UserError(f"{FIELD}: {given} line {line}: no text in this row; expected {_ROWS}")
        out += [ExcludedText(text, f"{given}:{line}", q) for text, q in texts]
    return out


def _read_txt(given: str, p: Path) -> list[ExcludedText]:
    raw = p.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{FIELD}: {given} line {line}: invalid UTF-8 (byte offset {e.start}); "
                        "re-save the file as UTF-8") from None
    # Split on "\n" only, as data.reader does: str.splitlines() would also break lines at U+2028 and friends.
    return [ExcludedText(line.strip(), f"{given}:{n}")
            for n, line in enumerate(text.split("\n"), start=1) if line.strip()]


def load_excluded(paths: list[str], base: Path | None = None) -> list[ExcludedText]:
    """The texts of every file in `paths` (the `selfinstruct.exclude` list), each with its "path:line".

    A .txt file gives one text per non-empty line. Any other file is read as JSON lines or a JSON array by
    `data.reader.read_records`: training rows give their user turns (instruction, input, "messages" user
    turns, history questions; question-like) and assistant turns (output, answers); a row of any other shape
    gives every string value ({"question": ...}, {"text": ...}, ...; those under answer-like keys such as
    "answer" count as answers). Relative paths start from `base` (default: the current directory).

    Raises UserError naming the path and `selfinstruct.exclude` for a missing, empty or unreadable file and
    for a row without any text: an exclude list that excludes nothing is almost certainly the wrong file.
    """
    root = Path.cwd() if base is None else Path(base)
    out: list[ExcludedText] = []
    for given in paths:
        p = Path(given).expanduser()
        p = p if p.is_absolute() else root / p
        if not p.exists():
            looked = "" if str(p) == given else f" (looked for {p})"
            raise UserError(f"{FIELD}: '{given}' not found{looked}; list files whose content must not appear in "
                            "the generated data, such as the test set")
        if not p.is_file():
            raise UserError(f"{FIELD}: '{given}' is not a file; list the files themselves (e.g. data/test.jsonl)")
        if not p.read_bytes().removeprefix(b"\xef\xbb\xbf").strip():
            raise UserError(f"{FIELD}: '{given}' is empty, so it would exclude nothing; give the file with the "
                            "texts to keep out of the generated data (e.g. the test set), or remove it from the list")
        out += _read_txt(given, p) if p.suffix.lower() == ".txt" else _read_json(given, p)
    return out
