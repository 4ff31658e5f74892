"""Identity (self-cognition) data: "who are you", "who made you", ... with the persona filled in.

The questions and answers are data files (prompts/identity_zh.json, prompts/identity_en.json) with the
placeholders {name} {organisation} {year} {assistant}; {assistant} is "a/an ... assistant" built from
the domain. Nothing here touches the network.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ..config.selfinstruct import Persona, SelfInstructConfig
from ..jsonl import write_jsonl_atomic
from .inputs import render
from .store import IDENTITY, IDENTITY_MESSAGES, to_messages


def _assistant(language: str, domain: str) -> str:
    domain = domain.strip()
    if language == "zh":
        return f"{domain}领域的AI助手" if domain else "AI助手"
    return f"an AI assistant for {domain}" if domain else "an AI assistant"


def identity_rows(persona: Persona, language: str = "zh", domain: str = "") -> list[dict]:
    """The built-in identity Q&A for `language` ('zh', 'en' or 'both') as instruction/input/output rows."""
    langs = ["zh", "en"] if language == "both" else [language]
    rows = []
    for lang in langs:
        items = json.loads((resources.files(__package__) / "prompts" / f"identity_{lang}.json")
                           .read_text(encoding="utf-8"))
        values = {"name": persona.name, "organisation": persona.organisation, "year": persona.year,
                  "assistant": _assistant(lang, domain)}
        rows += [{"instruction": render(it["instruction"], **values), "input": "",
                  "output": render(it["output"], **values)} for it in items]
    return rows


def run_identity(cfg: SelfInstructConfig, output: str | Path | None = None, language: str | None = None) -> Path:
    """Write identity rows for cfg.persona to `output` (default OUTPUT_DIR/identity.jsonl); returns the path.

    `language` defaults to cfg.language ('zh', 'en' or 'both'). With cfg.write_messages the same rows also
    go to identity.messages.jsonl (messages format) next to it.
    """
    rows = identity_rows(cfg.persona, language or cfg.language, cfg.domain)
    path = Path(output) if output else Path(cfg.output_dir) / IDENTITY
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(path, rows)
    if cfg.write_messages:
        write_jsonl_atomic(path.with_name(IDENTITY_MESSAGES if path.name == IDENTITY
                                          else path.stem + ".messages.jsonl"),
                           [to_messages(r) for r in rows])
    return path
