"""The near-duplicate filter at scale: MinHash LSH candidates (datagen/neardup.py) confirmed by the exact ROUGE-L make
the exact filter's decisions on rows with known near-duplicates, repeat across processes, and leave small pools
to the full scan; decontamination against the bundled test set still drops its copies."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from domaintune.datagen import filters as F
from domaintune.datagen.decontam import Decontaminator, load_excluded

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"


def bundled_questions() -> list[str]:
    out = []
    for name, key in (("seeds.jsonl", "question"), ("train.jsonl", "instruction"), ("test.jsonl", "instruction"),
                      ("preferences.jsonl", "instruction")):
        for line in (DATA / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.append(json.loads(line)[key])
    return out


def edit(q: str, rng: random.Random) -> str:
    """One or two characters (Chinese) or words (English) replaced, inserted or deleted."""
    zh = any("\u4e00" <= c <= "\u9fff" for c in q)
    units = list(q) if zh else q.split()
    for _ in range(rng.randint(1, 2)):
        k = rng.randrange(len(units))
        op = rng.randrange(3)
        new = rng.choice("的了家孩学玩") if zh else rng.choice(["really", "often", "kid", "now"])
        if op == 0:
            units[k] = new
        elif op == 1:
            units.insert(k, new)
        elif len(units) > 4:
            del units[k]
    return ("" if zh else " ").join(units)


def rows_with_near_duplicates(n: int = 400, seed: int = 0) -> list[str]:
    """Bundled questions, each with one or two edits: many rows have a near-duplicate earlier (about one edit
    apart, ROUGE-L 0.8-0.95); edits of edits, which reach the edge of the threshold where LSH may miss a pair
    (neardup.py), are left to the bench."""
    rng = random.Random(seed)
    base = bundled_questions()
    return [edit(rng.choice(base), rng) for _ in range(n)]


def decisions(rows: list[str], exact_pool: int) -> list[tuple[str, dict] | None]:
    f = F.QuestionFilter(min_chars=1, max_chars=10**6, blocklist=[], threshold=0.7, exact_pool=exact_pool)
    out = []
    for q in rows:
        rej = f.check(q)
        if rej is None:
            f.add(q)
        out.append(None if rej is None else (rej.reason, rej.detail))
    return out


def test_lsh_filter_makes_the_exact_filters_decisions():
    rows = rows_with_near_duplicates()
    exact = decisions(rows, exact_pool=10**9)  # every pool entry scored
    fast = decisions(rows, exact_pool=0)  # LSH candidates from the first row on
    assert fast == exact  # same rows dropped, same reason, same first match and score
    near = [rows[i] for i, d in enumerate(exact) if d and d[0] == F.NEAR_DUPLICATE]
    zh = [q for q in near if any("\u4e00" <= c <= "\u9fff" for c in q)]
    assert len(zh) >= 50 and len(near) - len(zh) >= 50  # both languages have known near-duplicates here
    assert sum(d is None for d in exact) >= 100


def test_small_pools_are_scanned_in_full_and_larger_ones_use_lsh():
    rows = list(dict.fromkeys(bundled_questions()))
    f = F.QuestionFilter(min_chars=1, max_chars=10**6, blocklist=[], threshold=0.7, exact_pool=len(rows))
    for q in rows:
        f.add(q)
    assert f.index._lsh is None  # datasketch not even imported for a pool this size
    f.add("A new question that makes the pool one entry larger than exact_pool?")
    assert f.index._lsh is not None and len(f.index._lsh) == len(rows) + 1
    assert F.QuestionFilter(min_chars=1, max_chars=9, blocklist=[], threshold=0.7).index.exact_pool == F.EXACT_POOL


_RUN = """
import json, sys
sys.path.insert(0, sys.argv[1])
from test_dedup_scale import decisions, rows_with_near_duplicates
from domaintune.datagen.neardup import MinHashCandidates
from domaintune.datagen.filters import tokenize
rows = rows_with_near_duplicates(200, seed=3)
lsh = MinHashCandidates()
cands = []
for q in rows:
    cands.append(lsh.candidates(tokenize(q)))
    lsh.add(tokenize(q))
print(json.dumps([decisions(rows, exact_pool=0), cands], ensure_ascii=False))
"""


def test_decisions_and_candidates_repeat_across_processes():
    # Python salts str hashes per process: a signature built on hash() would differ between these two runs.
    outs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run([sys.executable, "-c", _RUN, str(Path(__file__).parent)], env=env,
                              capture_output=True, text=True, timeout=120, check=True)
        outs.append(json.loads(done.stdout))
    assert outs[0] == outs[1]
    assert any(c for c in outs[0][1])  # candidates were proposed (the comparison is not of empty lists)


def test_decontamination_against_the_bundled_test_set_still_drops_its_copies():
    d = Decontaminator(load_excluded([str(DATA / "test.jsonl")]))
    rng = random.Random(1)
    tests = [json.loads(x)["instruction"] for x in (DATA / "test.jsonl").read_text(encoding="utf-8").splitlines()
             if x.strip()]
    assert all(d.check(q) is not None and d.check(q).detail["match"] == "exact" for q in tests)
    dropped = [d.check(edit(q, rng)) for q in tests]
    assert all(r is not None and r.reason == "contaminated" for r in dropped)
    # the bundled train and seed questions are not test questions: none is dropped
    others = [q for q in bundled_questions() if q not in tests]
    assert [q for q in others if d.check(q) is not None] == []
