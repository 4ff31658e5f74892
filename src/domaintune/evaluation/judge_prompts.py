"""The judge's prompts and the format of its replies: templates are data (built-in `prompts/*.txt` in zh and en,
or the user's files), and a reply is read by its last `VERDICT:` or `GRADE:` line.

Placeholders (only these names are replaced; other braces stay as written):
- pairwise: {question} {answer_a} {answer_b} (required) {reference} {rubric}
- grade: {question} {answer} (required) {reference} {rubric}

An empty reference, answer or rubric is shown as a word saying so ("none" / "无"), so that the judge never sees
an empty section it might misread.

The reply contract, stated at the end of each built-in template: a final line `VERDICT: A`, `VERDICT: B` or
`VERDICT: TIE` (pairwise) or `GRADE: N` with N from 1 to 10 (grade). The last such line counts, so a reply
that quotes the format before giving its own verdict is read right; markdown emphasis, full-width colons, case
and a few words before the keyword ("Final VERDICT: A") do not matter. A reply without one (or with a grade
outside 1..10) is malformed.
"""
from __future__ import annotations

import hashlib
import re
from importlib import resources
from pathlib import Path

from ..config.judge import JudgeConfig
from ..datagen.inputs import read_template_file, render
from ..errors import UserError

KINDS = ("pairwise", "grade")
REQUIRED = {"pairwise": ("question", "answer_a", "answer_b"), "grade": ("question", "answer")}
_EMPTY = {"zh": {"reference": "（未提供参考答案）", "answer": "（空回答）", "rubric": "无"},
          "en": {"reference": "(no reference answer given)", "answer": "(empty answer)", "rubric": "none"}}
_DECOR = r"[\s*_`#>\[\]()]*"  # markdown emphasis, quotes and brackets around the keyword or the value
_LEAD = r"^[^\n]{0,30}?(?<![A-Za-z])"  # a few words before the keyword ("Final VERDICT: A", "最终VERDICT：A")
_VERDICT = re.compile(rf"{_LEAD}VERDICT{_DECOR}[:：]{_DECOR}(A|B|TIE){_DECOR}[.。]?\s*$", re.I | re.M)
_GRADE = re.compile(rf"{_LEAD}GRADE{_DECOR}[:：]{_DECOR}(\d+(?:\.\d+)?)(?:\s*/\s*10)?{_DECOR}[.。]?\s*$",
                    re.I | re.M)
_RUBRIC_FILE = re.compile(r"^[^\n]{1,300}\.(txt|md)$", re.I)


def builtin_template(kind: str, language: str) -> str:
    """The shipped `kind` template ("pairwise" or "grade") for `language` ("zh" or "en")."""
    return (resources.files(__package__) / "prompts" / f"{kind}_{language}.txt").read_text(encoding="utf-8")


def load_template(cfg: JudgeConfig, kind: str) -> str:
    """`judge.<kind>_template` (a file) when set, else the built-in one for `judge.language`."""
    path = getattr(cfg, f"{kind}_template")
    if path is None:
        return builtin_template(kind, cfg.language)
    return read_template_file(path, f"judge.{kind}_template", kind, REQUIRED[kind])


def load_rubric(cfg: JudgeConfig) -> str:
    """`judge.rubric`: the text of the file it names (a .txt or .md path), else the text itself."""
    value = cfg.rubric.strip()
    if _RUBRIC_FILE.match(value):
        p = Path(value)
        if not p.is_file():
            raise UserError(f"judge.rubric '{value}' looks like a file name but no such file exists (relative "
                            "paths start from the current directory); fix the path or write the criteria inline")
        return p.read_text(encoding="utf-8-sig").strip()
    return value


def sha256_text(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


class Prompts:
    """The templates and filled-in values of one judge run."""

    def __init__(self, cfg: JudgeConfig, kinds: tuple[str, ...]):
        self.templates = {kind: load_template(cfg, kind) for kind in kinds}
        self.empty = _EMPTY[cfg.language]
        self.rubric = load_rubric(cfg)

    def fingerprint(self) -> dict:
        """What the verdicts depend on besides the answers: sha256 of each template and of the rubric."""
        return {**{f"{kind}_template_sha256": sha256_text(t) for kind, t in sorted(self.templates.items())},
                "rubric_sha256": sha256_text(self.rubric)}

    def _common(self, question: str, reference: str) -> dict:
        return {"question": question, "reference": reference if reference.strip() else self.empty["reference"],
                "rubric": self.rubric or self.empty["rubric"]}

    def _answer(self, text: str) -> str:
        return text if text.strip() else self.empty["answer"]

    def pairwise(self, question: str, reference: str, first: str, second: str) -> str:
        """The pairwise prompt with `first` shown as answer A and `second` as answer B."""
        return render(self.templates["pairwise"], **self._common(question, reference),
                      answer_a=self._answer(first), answer_b=self._answer(second))

    def grade(self, question: str, reference: str, answer: str) -> str:
        return render(self.templates["grade"], **self._common(question, reference), answer=self._answer(answer))


def _without_line(text: str, m: re.Match) -> str:
    return (text[: m.start()] + text[m.end():]).strip()


def parse_verdict(text: str) -> tuple[str | None, str]:
    """("A" | "B" | "tie", reason) from the last VERDICT line of a reply; (None, text) when it has none.
    The reason is the reply without that line."""
    found = list(_VERDICT.finditer(text))
    if not found:
        return None, text.strip()
    m = found[-1]
    word = m.group(1).upper()
    return ("tie" if word == "TIE" else word), _without_line(text, m)


def parse_grade(text: str) -> tuple[float | None, str]:
    """(grade, reason) from the last GRADE line of a reply, the grade in 1..10; (None, text) when there is no such
    line or its number lies outside 1..10."""
    found = list(_GRADE.finditer(text))
    if not found:
        return None, text.strip()
    m = found[-1]
    grade = float(m.group(1))
    if not 1 <= grade <= 10:
        return None, text.strip()
    return (int(grade) if grade.is_integer() else grade), _without_line(text, m)
