"""From judge records to numbers: each row's pairwise outcome, win/tie/loss, win-rate and mean grades with
bootstrap intervals, and the terminal summary.

Pairwise: a row is asked twice, (A, B) and (B, A). Mapped back to the files, a row is a win for B when both
orders say B, a loss when both say A, and a tie otherwise: the judge said tie in either order, the two orders
disagree (position bias), or either reply was unparseable. win_rate = (wins + ties / 2) / rows.

Bootstrap (`bootstrap_ci`): `samples` resamples of the per-row values, n rows drawn with replacement by
`numpy.random.default_rng(seed).integers(0, n, size=(samples, n))`; the interval is the 2.5th and 97.5th
percentile (numpy's default linear interpolation) of the resampled means. Every interval starts from a fresh
generator with the same seed, so each is reproducible on its own.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

# Which file's answer a verdict favours, by the order the answers were shown in.
_WINNER = {"AB": {"A": "a", "B": "b", "tie": "tie"}, "BA": {"A": "b", "B": "a", "tie": "tie"}}
ROW_SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def winner_of(order: str, verdict: str | None) -> str | None:
    """"a", "b" or "tie" for a verdict ("A", "B", "tie") given with the answers in `order` ("AB" or "BA")."""
    return None if verdict is None else _WINNER[order][verdict]


def pair_outcome(ab: str | None, ba: str | None) -> tuple[str, str]:
    """(outcome for B: win | tie | loss, why) from the winners ("a", "b", "tie", None = unparseable) of the two
    orders. why: consistent, judge_tie, inconsistent or unparseable."""
    if ab is None or ba is None:
        return "tie", "unparseable"
    if ab == ba == "b":
        return "win", "consistent"
    if ab == ba == "a":
        return "loss", "consistent"
    if "tie" in (ab, ba):
        return "tie", "judge_tie"
    return "tie", "inconsistent"


def bootstrap_ci(values: list[float], samples: int, seed: int) -> list[float] | None:
    """The 95% percentile-bootstrap interval of the mean of `values` (see the module docstring); None when empty."""
    if not values:
        return None
    import numpy as np

    x = np.asarray(values, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(samples, len(x)))
    lo, hi = np.percentile(x[idx].mean(axis=1), [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def pairwise_stats(outcomes: list[tuple[str, str]], first_picks: int, decided: int, samples: int,
                   seed: int) -> dict:
    """The "pairwise" block of judge.json from each row's (outcome, why), in row order. `first_picks` of the
    `decided` A/B verdicts chose the answer shown first (0.5 = no position bias)."""
    n = len(outcomes)
    counts = Counter(o for o, _ in outcomes)
    why = Counter(w for o, w in outcomes if o == "tie")
    scores = [ROW_SCORE[o] for o, _ in outcomes]
    usable = n - why["unparseable"]
    # Rows whose replies were all unparseable are ties by the rule above; with no usable row at all, that rule
    # alone would make a win-rate of exactly 0.5 with a zero-width interval, a number the judge never gave.
    block: dict[str, Any] = {
        "rows": n, "usable_rows": usable, "wins": counts["win"], "ties": counts["tie"], "losses": counts["loss"],
        "win_rate": _mean(scores) if usable else None,
        "win_rate_ci95": bootstrap_ci(scores, samples, seed) if usable else None,
        "ties_by_cause": {k: why[k] for k in ("judge_tie", "inconsistent", "unparseable")},
        "unparseable_rows": why["unparseable"],
        "first_position_rate": round(first_picks / decided, 4) if decided else None,
    }
    if n and not usable:
        block["problem"] = no_usable_verdict(n)
    return block


def no_usable_verdict(rows: int, what: str = "verdict") -> str:
    """The words judge.json, metrics.json, the terminal and report.md use when no reply of `rows` rows could be
    read (`what`: "verdict" for pairwise, "grade")."""
    if what == "verdict":
        return (f"no usable verdict: the judge's replies for all {rows} row(s) were unparseable (no VERDICT line; "
                "they are in judge.jsonl), so there is no win-rate; check judge.model and judge.max_tokens, or use "
                "a stronger judge")
    return (f"no usable grade: no row of {rows} has both answers graded (no GRADE line from 1 to 10; the replies "
            "are in judge.jsonl), so there is no difference of grades")


def grade_stats(grades: list[tuple[float | None, float | None]], samples: int, seed: int) -> dict:
    """The "grade" block of judge.json from each row's (grade of A, grade of B); None = unparseable, left out of
    that answer's mean; the difference B - A uses the rows where both were graded."""
    block: dict = {"rows": len(grades)}
    for side, k in (("a", 0), ("b", 1)):
        vals = [v for g in grades if (v := g[k]) is not None]
        block[side] = {"mean": _mean(vals), "ci95": bootstrap_ci(vals, samples, seed), "n": len(vals),
                       "unparseable": len(grades) - len(vals)}
    diffs = [g[1] - g[0] for g in grades if g[0] is not None and g[1] is not None]
    block["diff"] = {"mean": _mean(diffs), "ci95": bootstrap_ci(diffs, samples, seed), "n": len(diffs)}
    if grades and not diffs:
        block["problem"] = no_usable_verdict(len(grades), "grade")
    return block


def _ci(ci: list[float] | None) -> str:
    return f" [{ci[0]:g}, {ci[1]:g}]" if ci else ""


def format_summary(summary: dict) -> str:
    """A few lines for the terminal: win/tie/loss and win-rate, mean grades, what it cost."""
    lines = [f"judge {summary['judge']['model']}: B = {summary['b']['path']} vs A = {summary['a']['path']}, "
             f"{summary['rows']} rows"]
    p = summary.get("pairwise")
    if p:
        if not p["rows"]:
            line = "pairwise: no rows"
        elif p.get("win_rate") is None:  # no usable verdict (judge.json's "problem" says why)
            line = f"pairwise: B wins {p['wins']}, ties {p['ties']}, losses {p['losses']}; {p.get('problem')}"
        else:
            line = (f"pairwise: B wins {p['wins']}, ties {p['ties']}, losses {p['losses']}; win-rate of B "
                    f"{p['win_rate']:g}{_ci(p['win_rate_ci95'])} (95% bootstrap)")
            if p["unparseable_rows"]:
                line += f"; {p['unparseable_rows']} row(s) unparseable, counted as ties"
        lines.append(line)
    g = summary.get("grade")
    if g:
        parts = []
        for side in ("a", "b"):
            s = g[side]
            mean = f"{s['mean']:g}{_ci(s['ci95'])}" if s["mean"] is not None else "-"
            parts.append(f"{side.upper()} {mean} (n={s['n']}" + (f", {s['unparseable']} unparseable)"
                                                                   if s["unparseable"] else ")"))
        d = g["diff"]
        if d["mean"] is not None:
            parts.append(f"B - A {d['mean']:+g}{_ci(d['ci95'])}")
        elif g.get("problem"):
            parts.append(g["problem"])
        lines.append("grade 1-10: " + ", ".join(parts))
    c = summary["counts"]
    lines.append(f"calls {c['calls']} (asked again {c['retries']}, malformed replies {c['malformed']}, "
                 f"unparseable {c['unparseable']}); tokens {c['prompt_tokens']} prompt + {c['completion_tokens']} "
                 "completion")
    return "\n".join(lines)
