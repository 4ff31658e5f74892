"""Inputs of gen-data: seed questions and prompt templates (built-in data files or the user's own).

Templates are plain text with ``{placeholder}`` fields; only the known names below are replaced, so other
braces (e.g. a JSON example in a user template) stay as written.

- question template: {domain} {num_questions} (questions to write) {num_examples} (examples shown)
  {examples} (the numbered example questions; required) {name} {organisation} {year}
- answer template: {question} (required) {domain} {name} {organisation} {year}
- doc_question template (documents): {passage} (required) {source} {examples} {num_examples} {num_questions}
  {domain} {name} {organisation} {year}
- doc_answer template (documents): {question} {passage} (both required) {source} {domain} {name} {organisation}
  {year}
- judge template (documents): {question} {answer} {passage} (all required); the reply must say SUPPORTED or
  UNSUPPORTED (see grounded.parse_verdict)
"""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

from ..config.selfinstruct import SelfInstructConfig
from ..data.examples import read_valid_rows
from ..errors import UserError

_PLACEHOLDER = re.compile(r"\{(\w+)\}")
REQUIRED = {"question": ("examples",), "answer": ("question",), "weak_answer": ("question",),
            "doc_question": ("passage",), "doc_answer": ("question", "passage"),
            "judge": ("question", "answer", "passage")}


def load_seeds(path: str) -> list[str]:
    """Seed questions from a JSONL file (or JSON array) with a "question" field; errors name the file and line.

    Read by `data.examples.read_valid_rows` (`data.reader.read_records`), as training data: BOM, CRLF, invalid
    UTF-8 and broken JSON are handled, and every bad line is reported at once."""
    if not path:
        raise UserError("selfinstruct.seeds_path is not set: give a JSONL file with one {\"question\": ...} per line")
    p = Path(path)
    if not p.is_file():
        raise UserError(f"selfinstruct.seeds_path '{p}' not found (relative paths start from the current directory)")
    if not p.read_bytes().removeprefix(b"\xef\xbb\xbf").strip():
        raise UserError(f"{p}: no seed questions; add lines like {{\"question\": \"...\"}}")
    def seed(obj: Any, where: str) -> str:
        q = obj.get("question") if isinstance(obj, dict) else None
        if not isinstance(q, str) or not q.strip():
            raise UserError(f"{where}: missing \"question\" (a non-empty string)")
        return q.strip()

    return read_valid_rows(p, seed, "seed question(s)")


def builtin_template(kind: str, language: str) -> str:
    """The shipped template `kind` (a key of REQUIRED) for `language` ('zh' or 'en')."""
    return (resources.files(__package__) / "prompts" / f"{kind}_{language}.txt").read_text(encoding="utf-8")


def load_template(cfg: SelfInstructConfig, kind: str) -> str:
    """The `kind` template (a key of REQUIRED): the user's file (`selfinstruct.<kind>_template`) if configured,
    else the built-in one for `selfinstruct.language`."""
    path = getattr(cfg, f"{kind}_template")
    if path is None:
        return builtin_template(kind, cfg.language)
    return read_template_file(path, f"selfinstruct.{kind}_template", kind, REQUIRED[kind])


def read_template_file(path: str, field: str, kind: str, required: tuple[str, ...]) -> str:
    """A user's prompt template file (named by the config `field`), checked for its `required` placeholders."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{field} '{p}' not found (relative paths start from the current directory)")
    text = p.read_text(encoding="utf-8-sig")
    missing = [name for name in required if "{" + name + "}" not in text]
    if missing:
        raise UserError(f"{p}: the {kind} template has no {', '.join('{' + m + '}' for m in missing)} "
                        f"placeholder; add it where the {' and the '.join(missing)} should go")
    return text


def render(template: str, **values) -> str:
    """Fill the known {placeholders}; leave any other brace text untouched."""
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), template)


def persona_values(cfg: SelfInstructConfig) -> dict:
    return {"domain": cfg.domain, "name": cfg.persona.name, "organisation": cfg.persona.organisation,
            "year": cfg.persona.year}


def numbered(items: list[str]) -> str:
    return "\n".join(f"{i}. {q}" for i, q in enumerate(items, 1))
