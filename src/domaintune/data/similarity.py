"""Text similarity shared by gen-data's question filters and the training data's dedup (data/dedup.py): ROUGE-L
tokens and score, and MinHash LSH candidates for it at scale. It lives in data/ (a lower layer than datagen/) so
that both can use the one implementation.

ROUGE-L (`tokenize`, `rouge_l`): each CJK character is one token (character level for Chinese); runs of
``[a-z0-9]`` after NFKC and lower-casing are word tokens (word level for English, exactly the tokenisation of
``rouge_score``'s default tokenizer without stemming); everything else (punctuation, spaces) is dropped. The LCS is
bit-parallel (Hyyroe 2004). datagen/filters.py re-exports these functions (gen-data's tests check them against
``rouge_score`` and ``rouge-chinese``).

MinHash LSH (`MinHashCandidates`, moved here from datagen/neardup.py, which re-exports it): candidate search for the
ROUGE-L near-duplicate filter at scale: MinHash LSH (datasketch) over token multisets.

`filters.NearDupIndex` scores a question against every pool entry, which is quadratic over a run: 100,000
questions would take hours. Past `EXACT_POOL` entries it asks this index for candidates instead and scores only
those, with the same exact ROUGE-L (so every drop is still a real ROUGE-L >= threshold match, and the entry
reported is the first such candidate in pool order, as the full scan reports the first such entry).

Why MinHash over numbered tokens: each text is the set of its tokens numbered by occurrence ("a b a" ->
a#0, b#0, a#1), so set overlap is multiset overlap. ROUGE-L F1 = 2L/(n+m) >= t with LCS L <= overlap gives a
Jaccard similarity J = overlap/(n+m-overlap) >= t/(2-t): 0.538 at the default t = 0.7. MinHash LSH with `bands`
bands of `rows` hash values proposes a pair with probability 1-(1-J^rows)^bands: with 25 bands of 4 rows, 0.89
at J = 0.538 (the worst case), 0.97 at J = 0.6, 0.993 at J = 0.65 and 0.9999 at J = 0.75; an unrelated pair of
the same domain (J about 0.2-0.3, Chinese questions share 孩子, 家长, 怎么办) is proposed with probability
0.04-0.18 and costs one bit-parallel LCS. Typical near-duplicates (a word or two changed) have J of 0.7-0.9, so
the pairs missed are the ones at the edge of the threshold. 20 bands of 5 rows were a third faster but missed
about 3% of the near-duplicates in the bench; the measured recall against the exact filter is in
bench/results/dedup_scale.md (bench/dedup_scale.py).

The trade-off: a missed candidate keeps a question that the full scan would drop (never the reverse, except
that a question kept by mistake joins the pool and can then be the first match of a later one). More bands raise
recall and the number of candidates to score; fewer rows per band raise both too.

Deterministic: the element hash is CRC-32 of the token's UTF-8 (not Python's salted `hash`), and the MinHash
permutations come from datasketch's fixed `seed`; the same questions in the same order give the same decisions.
"""
from __future__ import annotations

import re
import unicodedata
import zlib

from datasketch import MinHash, MinHashLSH

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN_RE = re.compile(rf"[{_CJK}]|[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """ROUGE tokens: CJK characters one by one, ASCII letters/digits as lower-cased words."""
    return _TOKEN_RE.findall(unicodedata.normalize("NFKC", text).lower())


def dedup_key(text: str) -> str:
    """gen-data's identity of a question for exact duplicates: NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def masks_of(tokens: list[str]) -> dict[str, int]:
    """Token -> bit mask of its positions: one side of the bit-parallel LCS."""
    masks: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    return masks


def lcs_from_masks(masks: dict[str, int], n: int, other: list[str]) -> int:
    """LCS length of the n tokens behind `masks` and `other`."""
    # v starts as all ones (Python's -1); every zero bit in the low n bits of the final v is one matched position,
    # so LCS = n - popcount(v & (2**n - 1)).
    v = -1
    for tok in other:
        u = v & masks.get(tok, 0)
        v = (v + u) | (v - u)
    return n - bin(v & ((1 << n) - 1)).count("1")


def f1(lcs: int, n_target: int, n_prediction: int) -> float:
    """ROUGE-L F1 from the LCS and the two lengths (rouge_score's arithmetic, so the same float)."""
    if lcs == 0:
        return 0.0
    precision, recall = lcs / n_prediction, lcs / n_target
    return 2 * precision * recall / (precision + recall)


def rouge_l(target: str, prediction: str) -> float:
    """ROUGE-L F1 of two texts with this module's tokenisation."""
    t, p = tokenize(target), tokenize(prediction)
    return f1(lcs_from_masks(masks_of(t), len(t), p), len(t), len(p)) if t and p else 0.0


NUM_PERM = 100
BANDS, ROWS = 25, 4  # BANDS * ROWS <= NUM_PERM
SEED = 1  # datasketch's permutation seed: fixed so that decisions repeat across runs and machines


def _identity(x: int) -> int:
    return x


class MinHashCandidates:
    """Entries (token lists, keyed by their index in the pool) and `candidates(tokens)`: the indices of entries
    that share at least one LSH band with `tokens`, in pool order."""

    def __init__(self, num_perm: int = NUM_PERM, bands: int = BANDS, rows: int = ROWS, seed: int = SEED) -> None:
        self._lsh = MinHashLSH(num_perm=num_perm, params=(bands, rows))
        self._proto = MinHash(num_perm=num_perm, seed=seed, hashfunc=_identity)
        self._hashes: dict[tuple[str, int], int] = {}  # numbered token -> CRC-32 (cached: tokens repeat a lot)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def signature(self, tokens: list[str]) -> MinHash:
        seen: dict[str, int] = {}
        hv = []
        for tok in tokens:
            k = seen.get(tok, 0)
            seen[tok] = k + 1
            h = self._hashes.get((tok, k))
            if h is None:
                h = self._hashes[(tok, k)] = zlib.crc32(f"{tok}\x00{k}".encode())
            hv.append(h)
        m = self._proto.copy()  # shares the permutations: no per-text setup
        m.update_batch(hv)
        return m

    def add(self, tokens: list[str], signature: MinHash | None = None) -> int:
        """Index `tokens` as the next entry; returns its index."""
        key = self._n
        self._lsh.insert(key, signature if signature is not None else self.signature(tokens),
                         check_duplication=False)
        self._n += 1
        return key

    def candidates(self, tokens: list[str], signature: MinHash | None = None) -> list[int]:
        if not self._n:
            return []
        return sorted(self._lsh.query(signature if signature is not None else self.signature(tokens)))
