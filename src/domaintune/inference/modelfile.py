"""The Ollama `Modelfile` written beside a GGUF export, so `ollama create NAME -f Modelfile` gives a model
that sees exactly the prompt it was trained on.

- `FROM ./FILE.gguf`.
- `TEMPLATE`: the run's template.json translated into Ollama's Go-template syntax: `.System` (the request's
  system message, else the Modelfile's `SYSTEM`, which is the template's default system prompt), then the
  conversation in `.Messages` (user and assistant turns, with the template's turn separator before every user
  turn after the first, and EOS after each assistant turn when the template appends one). The user turn
  ends with the assistant prefix, so the rendered prompt ends where the answer starts, as in training. Every
  literal is written as a Go string (`{{ "..." }}`), so Go's whitespace trimming (`{{-`) never eats a
  newline that belongs to the prompt. BOS is not in the template: llama.cpp adds it when the GGUF says so.
  Templates of kind `tokenizer` (the model's own Jinja chat_template) are not translated: Ollama reads the
  GGUF's `tokenizer.chat_template` and applies its own template for the families it recognises; the
  Modelfile says so in a comment.
- `PARAMETER stop`: the template's stop strings and the EOS token's text.
- Sampling `PARAMETER`s: the chat preset of `params.PRESETS` (temperature, top_p, top_k, repeat_penalty,
  num_predict), the one home of sampling defaults.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..data.templates import Template


def go_string(s: str) -> str:
    """`s` as a Go template action printing it: a double-quoted Go string (JSON escapes are valid Go ones)."""
    return "{{ " + json.dumps(s, ensure_ascii=False) + " }}"


def _fmt(f: str, var: str) -> str:
    head, _, tail = f.partition("{content}")
    return (go_string(head) if head else "") + "{{ " + var + " }}" + (go_string(tail) if tail else "")


def ollama_template(tpl: Template, eos_text: str | None) -> str:
    """The Go template of a `format` template (see the module docstring)."""
    if tpl.kind != "format":
        raise UserError(f"template {tpl.name!r} of kind {tpl.kind!r} has no Ollama translation")
    sep = go_string(tpl.turn_separator) if tpl.turn_separator else ""
    # As Template.encode: EOS after an answer unless the answer already ends with it (ChatML with an <|im_end|> EOS).
    eos = go_string(eos_text) if tpl.append_eos and eos_text and not tpl.assistant_format.endswith(eos_text) else ""
    lines = [
        "{{- if .System }}" + _fmt(tpl.system_format, ".System") + "{{ end }}" if tpl.system_format else "",
        "{{- $first := true }}",
        "{{- range .Messages }}",
        "{{- if eq .Role \"user\" }}",
        ("{{- if not $first }}" + sep + "{{ end }}") if sep else "",
        "{{- " + _fmt(tpl.user_format, ".Content").removeprefix("{{ "),
        "{{- $first = false }}",
        "{{- else if eq .Role \"assistant\" }}",
        "{{- " + _fmt(tpl.assistant_format, ".Content").removeprefix("{{ ") + eos,
        "{{- $first = false }}",
        "{{- end }}",
        "{{- end }}",
    ]
    return "\n".join(x for x in lines if x)


def _quoted(s: str) -> str:
    """A Modelfile value: a "..." string, or \"\"\"...\"\"\" when it spans lines."""
    if '"""' in s:
        raise UserError(f'cannot write {s!r} into the Modelfile: it contains """')
    return f'"""{s}"""' if ("\n" in s or '"' in s) else f'"{s}"'


def modelfile_text(gguf_name: str, tpl: Template, tok: PreTrainedTokenizerBase) -> str:
    from .params import PRESETS

    eos_text = tok.eos_token
    lines = ["# Ollama: ollama create NAME -f Modelfile   (written by domaintune export)",
             f"FROM ./{gguf_name}", ""]
    if tpl.kind == "format":
        lines.append(f'TEMPLATE """{ollama_template(tpl, eos_text)}"""')
        if tpl.default_system:
            lines.append(f"SYSTEM {_quoted(tpl.default_system)}")
    else:
        lines.append("# TEMPLATE: this run used the model's own chat_template (template 'tokenizer'); the GGUF "
                     "carries it as tokenizer.chat_template, and Ollama applies its own template for the "
                     "families it recognises.")
        if tpl.default_system:  # data.system: Ollama's template puts it where the conversation has none
            lines.append(f"SYSTEM {_quoted(tpl.default_system)}")
    lines.append("")
    stops = list(dict.fromkeys([*tpl.stop, *([eos_text] if eos_text else [])]))
    lines += [f"PARAMETER stop {_quoted(s)}" for s in stops]
    p = PRESETS["chat"]
    lines += [f"PARAMETER temperature {p.temperature}", f"PARAMETER top_p {p.top_p}"]
    if p.top_k:
        lines.append(f"PARAMETER top_k {p.top_k}")
    lines += [f"PARAMETER repeat_penalty {p.repetition_penalty}", f"PARAMETER num_predict {p.max_new_tokens}"]
    return "\n".join(lines) + "\n"


def write_modelfile(path: Path, text: str) -> Path:
    """`text` (from `modelfile_text`) into `path`, flushed and fsynced: the caller writes it under a temporary
    name and renames it into place (gguf_export.py pairs it with its GGUF that way)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return path


def modelfile_target(text: str) -> str | None:
    """The file name of the Modelfile's `FROM ./NAME` line (the GGUF it belongs to), or None."""
    m = re.search(r"^FROM \./(.+)$", text, re.M)
    return m.group(1) if m else None
