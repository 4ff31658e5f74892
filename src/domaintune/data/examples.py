"""Validating rows (with line numbers) and turning them into conversations.

Row formats, detected per row from its keys:

- instruction/input/output (alpaca): `{"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}`
- messages: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` (multi-turn), with the
  OpenAI chat fine-tuning extensions: `tool_calls`, `tool` messages, per-row `tools`, per-message `weight`
- ShareGPT: `{"conversations": [{"from": "human"|"gpt"|..., "value": str}, ...], "system"?, "tools"?}`

formats.py reads the last two (and says where a row's tools are kept).

An answer may carry its reasoning (thinking.py): an assistant message's `"reasoning_content": str`, or a
`<think>...</think>` block at the start of the answer (`"content"`, `"output"` or a `"history"` answer). Both
become the message's `reasoning_content`, and the answer the text after the block; data.thinking decides what is
trained. An unclosed `<think>`, or reasoning given both ways, is an error naming the field.

A row in both formats ("messages" and "instruction"/"input"/"output") is refused rather than half read.
Both become a list of OpenAI-style messages (`Example.messages`). Every problem of a row is reported in one
message (up to `MAX_PROBLEMS_SHOWN`, then "and N more"), and all bad rows of a file (up to `MAX_ERRORS_SHOWN`)
together, each naming the file and the line. Text must be valid Unicode: a JSON escape of half a surrogate pair
(e.g. a lone "\\ud83d", a cut emoji) is an error here, not a tokenizer crash later.

`check_data_files` validates the files of a `data` config section the same way, without a tokenizer and
without importing torch or transformers, so a bad file is reported before anything heavy loads.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from ..errors import UserError
from .formats import (
    TOOLS,
    Label,
    openai_label,
    parse_tool_calls,
    parse_tools,
    sharegpt_label,
    sharegpt_messages,
)
from .reader import read_records
from .templates import Template
from .thinking import CLOSE, OPEN, split_think

if TYPE_CHECKING:
    pass

T = TypeVar("T")
ROLES = ("system", "user", "assistant", "tool")
MAX_ERRORS_SHOWN = 10  # rows per file error
MAX_PROBLEMS_SHOWN = 5  # problems per row
_SURROGATE = "half of a UTF-16 surrogate pair (not valid Unicode)"


@dataclass
class Example:
    """One validated row: where it came from and its messages (system?, user, assistant, ...)."""

    where: str  # "file line N"
    messages: list[dict]
    index: int = 0  # row index within its file

    @property
    def tools(self) -> list[dict] | None:
        """The row's tool schemas (OpenAI form), kept on its first user message (formats.py)."""
        return next((m[TOOLS] for m in self.messages if TOOLS in m), None)

    def prompt_and_target(self) -> tuple[list[dict], str]:
        """For prediction: everything before the last assistant turn, and that turn's text."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            return self.messages, ""
        return self.messages[:-1], self.messages[-1]["content"]


def _type_name(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "true/false", type(None): "null"}.get(type(v), type(v).__name__)


def _short(v: Any, limit: int = 40) -> str:
    """repr(v), cut to about `limit` characters (a field dump must not swamp the message)."""
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + "..."


def _not_unicode(text: str) -> str | None:
    """The problem with `text` if it holds half of a UTF-16 surrogate pair (from a JSON escape such as "\\ud83d"
    without its partner): tokenizers reject such text and it cannot be written as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"holds \\u{ord(text[e.start]):04x}, {_SURROGATE} at character {e.start}"
    return None


def _joined(problems: list[str]) -> str:
    more = len(problems) - MAX_PROBLEMS_SHOWN
    text = "; ".join(problems[:MAX_PROBLEMS_SHOWN]) + (f"; and {more} more" if more > 0 else "")
    if any(_SURROGATE in x for x in problems):
        text += "; fix the \\u escape (write the whole character, or both halves)"
    return text


def parse_example(obj: Any, where: str, require_answer: bool = True, template: Template | None = None) -> Example:
    """Validate one row and turn it into messages. `template` joins instruction + input.

    Raises one UserError naming `where` and every problem of the row (see `MAX_PROBLEMS_SHOWN`)."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {_type_name(obj)}")
    problems: list[str] = []
    if "messages" in obj and (both := [k for k in ("instruction", "input", "output") if k in obj]):
        # Either form alone is a whole conversation: reading one would silently drop the other.
        fields = " and ".join(f'"{k}"' for k in both)
        problems.append(f'"messages" and {fields} in one row: use one format per row, "messages" or '
                        '"instruction"/"input"/"output"')
    if "conversations" in obj and (both := [k for k in ("messages", "instruction", "output") if k in obj]):
        problems.append(f'"conversations" and {" and ".join(repr(k) for k in both)} in one row: use one format per row')
    if "conversations" in obj:
        raw, index = sharegpt_messages(obj, problems)
        tools = parse_tools(obj.get("tools"), '"tools"', problems)
        msgs = _parse_messages(raw, problems, require_answer, sharegpt_label(index)) if raw else []
    elif "messages" in obj:
        tools = parse_tools(obj.get("tools"), '"tools"', problems)
        msgs = _parse_messages(obj["messages"], problems, require_answer)
    else:
        tools = None
        msgs = _parse_fields(obj, problems, require_answer, template)
    if tools and not problems:
        first_user = next(k for k, m in enumerate(msgs) if m["role"] == "user")
        msgs[first_user] = {**msgs[first_user], TOOLS: tools}
    if problems:
        raise UserError(f"{where}: {_joined(problems)}")
    return Example(where, msgs)


def _text(obj: dict, key: str, problems: list[str]) -> str | None:
    """obj[key] if it is valid text, else None. A wrong type or text that is not valid Unicode goes to `problems`;
    absent or null is fine here (a null "instruction" is recorded as a wrong type)."""
    v = obj.get(key)
    if v is None and (key != "instruction" or key not in obj):
        return None
    if not isinstance(v, str):
        problems.append(f'"{key}" must be a string, got {_type_name(v)}')
        return None
    bad = _not_unicode(v)
    if bad:
        problems.append(f'"{key}" {bad}')
        return None
    return v


def _parse_fields(obj: dict, problems: list[str], require_answer: bool, template: Template | None) -> list[dict]:
    """The instruction/input/output/system/history format; every problem goes to `problems`."""
    if "instruction" not in obj:
        fields = sorted(obj)
        shown = f"{fields[:10]} and {len(fields) - 10} more" if len(fields) > 10 else f"{fields}"
        problems.append(f'missing "instruction" (or "messages"); found fields {shown}')
    instruction = _text(obj, "instruction", problems)
    if instruction is not None and not instruction.strip():
        problems.append('"instruction" is blank')
    inp = _text(obj, "input", problems) or ""
    output = _text(obj, "output", problems)
    reasoning = None
    if output is not None:
        reasoning, output, bad = split_think(output)
        if bad:
            problems.append(f'"output" {bad}')
    if require_answer and obj.get("output") is None:
        problems.append('missing "output"')
    elif require_answer and output is not None and not output.strip():
        problems.append('"output" is blank; every training row needs an answer')
    system = _text(obj, "system", problems)
    history = obj.get("history") or []
    if not isinstance(history, list):
        problems.append(f'"history" must be a list of [question, answer] pairs, got {_type_name(history)}')
        history = []
    turns: list[dict] = []
    for k, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            problems.append(f'"history"[{k}] must be a [question, answer] pair of strings')
        elif not pair[0].strip() or not pair[1].strip():
            problems.append(f'"history"[{k}] has a blank question or answer')
        elif not_text := [f'"history"[{k}][{j}] {b}' for j, x in enumerate(pair) if (b := _not_unicode(x))]:
            problems += not_text
        elif (think := split_think(pair[1]))[2]:
            problems.append(f'"history"[{k}][1] {think[2]}')
        else:
            turns += [{"role": "user", "content": pair[0]}, _answer(think[1], think[0])]
    if problems or instruction is None:  # (instruction is valid text when nothing was found wrong)
        return []
    msgs = [{"role": "system", "content": system}] if system else []
    user = template.join_instruction(instruction, inp) if template is not None else instruction + inp
    msgs += turns + [{"role": "user", "content": user}]
    if output is not None and output.strip():
        msgs.append(_answer(output, reasoning))
    return msgs


def _answer(content: str, reasoning: str | None) -> dict:
    m = {"role": "assistant", "content": content}
    if reasoning is not None:
        m["reasoning_content"] = reasoning
    return m


def _parse_messages(msgs: Any, problems: list[str], require_answer: bool, label: Label = openai_label) -> list[dict]:
    """The messages format (OpenAI's, tool calls and weights included); every bad message goes to `problems`, then
    (if none) the first problem of the order of turns. `label(k, field)` names a field as the row has it."""
    if not isinstance(msgs, list) or not msgs:
        problems.append('"messages" must be a non-empty list of {"role", "content"} objects')
        return []
    out = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict):
            problems.append(f"messages[{k}] must be an object, got {_type_name(m)}")
            continue
        role, content = m.get("role"), m.get("content")
        calls = m.get("tool_calls")
        if role not in ROLES:
            problems.append(f'{label(k, "role")} {_short(role)} is not one of {"/".join(ROLES)}')
        if calls is not None and role != "assistant":
            problems.append(f"{label(k, 'tool_calls')}: only an assistant message calls tools")
        if role == "assistant" and calls is not None and content in (None, ""):
            content = ""  # a tool call without words
        elif not isinstance(content, str):
            problems.append(f"{label(k, 'content')} must be a string, got {_type_name(content)}")
        elif not content.strip() and role not in ("system", "tool"):
            problems.append(f"{label(k, 'content')} is blank")
        elif bad := _not_unicode(content):
            problems.append(f"{label(k, 'content')} {bad}")
        if role == "system" and k != 0:
            problems.append(f"{label(k, 'role').rsplit('.', 1)[0]}: a system message may only come first")
        weight = m.get("weight")
        if "weight" in m and (role != "assistant" or isinstance(weight, bool) or weight not in (0, 1)):
            problems.append(f"{label(k, 'weight')} must be 0 or 1, on an assistant message (got {_short(weight)} on "
                            f"{_short(role)})")
        msg = _reasoning({**m, "content": content}, k, problems)
        if calls is not None and role == "assistant":
            msg["tool_calls"] = parse_tool_calls(calls, label(k, "tool_calls"), problems)
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            msg["tool_call_id"] = m["tool_call_id"]
        if "weight" in m:
            msg["weight"] = weight
        out.append(msg)
    if problems:
        return []
    _check_order(out, problems, require_answer)
    return [] if problems else out


def _check_order(out: list[dict], problems: list[str], require_answer: bool) -> None:
    """User and assistant turns alternate, starting with user; an assistant turn with tool_calls is followed by its
    tool results, then by the assistant's next turn."""
    turns = [m for m in out if m["role"] != "system"]
    for k, m in enumerate(turns):
        prev = turns[k - 1] if k else None
        expected: tuple[str, ...]
        if prev is None:
            expected = ("user",)
        elif prev["role"] == "user":
            expected = ("assistant",)
        elif prev["role"] == "tool" or "tool_calls" in prev:
            expected = ("tool", "assistant") if prev["role"] == "tool" else ("tool",)
        else:
            expected = ("user",)
        if m["role"] not in expected:
            if m["role"] == "tool" or (prev is not None and (prev["role"] == "tool" or "tool_calls" in prev)):
                problems.append(f"turn {k + 1} is {m['role']!r}: a tool result must follow an assistant message with "
                                "tool_calls, and the assistant answers after the results")
            else:
                problems.append(f"turns must alternate user/assistant starting with user; turn {k + 1} is "
                                f"{m['role']!r}")
            return
    if not turns:
        problems.append('"messages" has no user turn')
    elif require_answer and turns[-1]["role"] != "assistant":
        problems.append("the last message must be an assistant answer to train on")
    elif require_answer and all(m.get("weight", 1) == 0 for m in turns if m["role"] == "assistant"):
        problems.append("every assistant message has weight 0: nothing to train in this row")


def _reasoning(m: dict, k: int, problems: list[str]) -> dict:
    """messages[k] as a message, its reasoning (`reasoning_content`, or a leading `<think>` block of an
    assistant's content) read into `reasoning_content`; problems go to `problems`."""
    out = {"role": m.get("role"), "content": m.get("content")}
    reasoning = m.get("reasoning_content")
    if "reasoning_content" in m and reasoning is not None:
        if m.get("role") != "assistant":
            problems.append(f"messages[{k}].reasoning_content: only an assistant message carries reasoning")
        elif not isinstance(reasoning, str):
            problems.append(f"messages[{k}].reasoning_content must be a string, got {_type_name(reasoning)}")
        elif bad := _not_unicode(reasoning):
            problems.append(f"messages[{k}].reasoning_content {bad}")
        else:
            out["reasoning_content"] = reasoning.strip()
    if m.get("role") == "assistant" and isinstance(out["content"], str):
        think, answer, bad = split_think(out["content"])
        if bad:
            problems.append(f"messages[{k}].content {bad}")
        elif think is not None and "reasoning_content" in out:
            problems.append(f"messages[{k}] gives its reasoning twice (reasoning_content and a {OPEN}...{CLOSE} "
                            "block in content): keep one")
        elif think is not None:
            if not answer.strip():
                problems.append(f"messages[{k}].content has no answer after its {CLOSE}")
            out.update(content=answer, reasoning_content=think)
    return out


def read_valid_rows(path: str | Path, parse: Callable[[Any, str], T], what: str = "row(s)") -> list[T]:
    """`parse(obj, "FILE line N")` for every record of `path`; the UserErrors of all bad rows, rows that are not
    valid JSON included, are raised together in line order (up to MAX_ERRORS_SHOWN shown), so one run of the
    command names every row to fix. A file whose only problem is one broken JSON row gets the reader's message."""
    broken: list[tuple[int, str]] = []  # rows that are not valid JSON
    rows, errors = [], []
    for line, obj in read_records(path, bad=broken):
        try:
            rows.append(parse(obj, f"{path} line {line}"))
        except UserError as e:
            errors.append((line, str(e)))
    if broken or errors:
        # each message names its row already: the reader's as Path(path) does, parse's as `path` was given
        bad = [(m, m) for _, m in sorted(broken + errors, key=lambda e: e[0])]
        raise bad_rows(bad, what, unreadable_alone=not errors)
    return rows


def bad_rows(bad: list[tuple[str, str]], what: str = "row(s)", unreadable_alone: bool = False) -> UserError:
    """One error naming a source's bad rows (where, message), the first MAX_ERRORS_SHOWN of them. A source whose
    only problem is one row that could not be read (`unreadable_alone`: broken JSON, a ragged CSV line) gets the
    reader's message alone."""
    if unreadable_alone and len(bad) == 1:
        where, m = bad[0]
        return UserError(m if m.startswith(where) else f"{where}: {m}")
    more = f"\n  ... and {len(bad) - MAX_ERRORS_SHOWN} more" if len(bad) > MAX_ERRORS_SHOWN else ""
    return UserError(f"{len(bad)} invalid {what}; fix them and run again:\n  "
                     + "\n  ".join(m if m.startswith(w) else f"{w}: {m}" for w, m in bad[:MAX_ERRORS_SHOWN]) + more)


def load_examples(path: str | Path, require_answer: bool = True, template: Template | None = None) -> list[Example]:
    """Read and validate every row; all errors (up to 10 shown) are reported together, before any training."""
    examples = read_valid_rows(path, lambda obj, where: parse_example(obj, where, require_answer, template))
    for idx, ex in enumerate(examples):
        ex.index = idx
    return examples
