"""Validating rows (with line numbers) and turning them into conversations.

Two row formats, detected per row:

- instruction/input/output: `{"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}`
- messages: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` (multi-turn)

Both become a list of OpenAI-style messages (`Example.messages`). All errors of a file (up to
`MAX_ERRORS_SHOWN`) are reported together, each naming the file and the line.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .reader import read_records

if TYPE_CHECKING:
    from .templates import Template

ROLES = ("system", "user", "assistant")
MAX_ERRORS_SHOWN = 10


@dataclass
class Example:
    """One validated row: where it came from and its messages (system?, user, assistant, ...)."""

    where: str  # "file line N"
    messages: list[dict]
    index: int = 0  # row index within its file

    def prompt_and_target(self) -> tuple[list[dict], str]:
        """For prediction: everything before the last assistant turn, and that turn's text."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            return self.messages, ""
        return self.messages[:-1], self.messages[-1]["content"]


def _type_name(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "true/false", type(None): "null"}.get(type(v), type(v).__name__)


def parse_example(obj: Any, where: str, require_answer: bool = True, template: Template | None = None) -> Example:
    """Validate one row and turn it into messages. `template` joins instruction + input."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {_type_name(obj)}")
    if "messages" in obj:
        return Example(where, _parse_messages(obj["messages"], where, require_answer))
    if "instruction" not in obj:
        raise UserError(f'{where}: missing "instruction" (or "messages"); found fields {sorted(obj)}')
    for key in ("instruction", "input", "output", "system"):
        if key in obj and obj[key] is not None and not isinstance(obj[key], str):
            raise UserError(f'{where}: "{key}" must be a string, got {_type_name(obj[key])}')
    instruction, inp = obj["instruction"], obj.get("input") or ""
    if not instruction.strip():
        raise UserError(f'{where}: "instruction" is blank')
    output = obj.get("output")
    if require_answer:
        if output is None:
            raise UserError(f'{where}: missing "output"')
        if not output.strip():
            raise UserError(f'{where}: "output" is blank; every training row needs an answer')
    msgs: list[dict] = []
    if obj.get("system"):
        msgs.append({"role": "system", "content": obj["system"]})
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise UserError(f'{where}: "history" must be a list of [question, answer] pairs, got {_type_name(history)}')
    for k, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise UserError(f'{where}: "history"[{k}] must be a [question, answer] pair of strings')
        if not pair[0].strip() or not pair[1].strip():
            raise UserError(f'{where}: "history"[{k}] has a blank question or answer')
        msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = template.join_instruction(instruction, inp) if template is not None else instruction + inp
    msgs.append({"role": "user", "content": user})
    if output is not None and output.strip():
        msgs.append({"role": "assistant", "content": output})
    return Example(where, msgs)


def _parse_messages(msgs: Any, where: str, require_answer: bool) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    out = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise UserError(f'{where}: messages[{k}] must be an object, got {_type_name(m)}')
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f'{where}: messages[{k}].role {role!r} is not one of {"/".join(ROLES)}')
        if not isinstance(content, str):
            raise UserError(f'{where}: messages[{k}].content must be a string, got {_type_name(content)}')
        if not content.strip() and role != "system":
            raise UserError(f'{where}: messages[{k}].content is blank')
        if role == "system" and k != 0:
            raise UserError(f'{where}: messages[{k}]: a system message may only come first')
        out.append({"role": role, "content": content})
    turns = [m["role"] for m in out if m["role"] != "system"]
    for k, role in enumerate(turns):
        expected = "user" if k % 2 == 0 else "assistant"
        if role != expected:
            raise UserError(f'{where}: turns must alternate user/assistant starting with user; '
                            f'turn {k + 1} is {role!r}')
    if not turns:
        raise UserError(f'{where}: "messages" has no user turn')
    if require_answer and turns[-1] != "assistant":
        raise UserError(f'{where}: the last message must be an assistant answer to train on')
    return out


def load_examples(path: str | Path, require_answer: bool = True, template: Template | None = None) -> list[Example]:
    """Read and validate every row; all errors (up to 10 shown) are reported together, before any training."""
    examples, errors = [], []
    for idx, (line, obj) in enumerate(read_records(path)):
        try:
            ex = parse_example(obj, f"{path} line {line}", require_answer, template)
            ex.index = idx
            examples.append(ex)
        except UserError as e:
            errors.append(str(e))
    if errors:
        more = f"\n  ... and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise UserError(f"{len(errors)} invalid row(s); fix them and run again:\n  "
                        + "\n  ".join(errors[:MAX_ERRORS_SHOWN]) + more)
    return examples
