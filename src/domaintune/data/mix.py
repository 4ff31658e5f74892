"""Mixing several sources: how many rows each gives, and which, seeded by `train.seed`.

The rules (also in config/sources.py, where users read them):

- no amount: every row once;
- `rows: N`: exactly N rows. N <= n: a seeded sample without repetition. N > n: every row N // n times plus a
  seeded sample of N mod n rows (upsampling);
- `fraction: f`: round(f x n) rows, by the same rule;
- `weight: w`: the weighted sources share one total in proportion to their weights, and the total is the
  largest at which none of them repeats a row: source i takes floor(min_j n_j x w_i / w_j) rows, so the source
  that runs out first gives all its rows and the others their share of that. Computed in exact fractions, so
  the counts do not depend on float rounding.

Rows keep their order within a source (a sample is sorted; repeats follow each other), sources follow in the
order of `data.path`: the training sampler shuffles, and the validation split is seeded on its own.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from ..config.sources import SourceConfig


@dataclass
class SourceCount:
    """What one source gave, for the start summary, run_info.json and the report."""

    name: str
    amount: str  # "all rows", "weight 2", "1000 rows", "fraction 0.5"
    read: int = 0  # valid rows read
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows (duplicate, contaminated)
    kept: int = 0  # rows left after the drops
    sampled: int = 0  # rows the mix took (repeats counted)
    validation: int = 0  # of those, rows split off for validation
    samples: int | None = None  # training samples kept after tokenising (None: not counted per source)
    tokens: int | None = None  # tokens of those samples

    def to_dict(self) -> dict:
        return {"name": self.name, "amount": self.amount, "read": self.read, "dropped": dict(self.dropped),
                "kept": self.kept, "sampled": self.sampled, "validation": self.validation,
                "train_samples": self.samples, "tokens": self.tokens}

    @classmethod
    def from_dict(cls, d: dict) -> SourceCount:
        return cls(name=d["name"], amount=d["amount"], read=d["read"], dropped=dict(d["dropped"]), kept=d["kept"],
                   sampled=d["sampled"], validation=d["validation"], samples=d["train_samples"], tokens=d["tokens"])

    def line(self) -> str:
        drops = ", ".join(f"{v} {k}" for k, v in self.dropped.items())  # a check that ran says so, 0 or not
        return (f"  {self.name} ({self.amount}): read {self.read}"
                + (f", dropped {drops}" if drops else "")
                + f", sampled {self.sampled}"
                + (f" ({self.sampled / self.kept:.2f}x its {self.kept} rows)" if self.kept and self.sampled != self.kept
                   else "")
                + (f", {self.validation} to validation" if self.validation else "")
                + (f" -> {self.samples} training samples, {self.tokens} tokens" if self.samples is not None else ""))


def mix_counts(sources: list[SourceConfig], available: list[int]) -> list[int]:
    """Rows each source gives, from the rows it has left (`available`), per the module docstring."""
    counts: list[int] = []
    weighted = [(i, Fraction(s.weight)) for i, s in enumerate(sources) if s.weight is not None]
    for s, n in zip(sources, available, strict=True):
        if s.rows is not None:
            counts.append(s.rows)
        elif s.fraction is not None:
            counts.append(int(Fraction(s.fraction) * n + Fraction(1, 2)))  # round half up, exactly
        else:
            counts.append(n)
    for i, w in weighted:
        counts[i] = int(min(Fraction(available[j]) * w / wj for j, wj in weighted))
    for s, n, c in zip(sources, available, counts, strict=True):
        if c > 0 and n == 0:
            raise UserError(f"data source {s.label}: no row left to sample ({s.amount} asked for, 0 rows kept)")
    return counts


def take(n: int, count: int, rng: random.Random) -> list[int]:
    """`count` indices into `n` rows: a sorted seeded sample, or every row count // n times and a sample of the
    rest (module docstring)."""
    if count <= 0 or n == 0:
        return []
    whole, rest = divmod(count, n)
    picked = set(rng.sample(range(n), rest)) if rest else set()
    return [i for i in range(n) for _ in range(whole + (i in picked))]


def mix(sources: list[SourceConfig], kept: list[list[int]], seed: int) -> list[list[int]]:
    """For each source, the row indices the mix takes, out of its `kept` indices; seeded by `seed` and the source's
    position, so adding a source does not change which rows the others give."""
    counts = mix_counts(sources, [len(k) for k in kept])
    out = []
    for i, (rows, count) in enumerate(zip(kept, counts, strict=True)):
        if count == len(rows):
            out.append(list(rows))
            continue
        rng = random.Random(seed * 1_000_003 + i)
        out.append([rows[j] for j in take(len(rows), count, rng)])
    return out

