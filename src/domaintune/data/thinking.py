"""Reasoning ("thinking") in assistant turns: reading it from rows, and what `data.thinking` does with it.

Rows carry an answer's reasoning in one of two shapes, both read into the message's `reasoning_content`
(the field Qwen3-style chat templates render, and vLLM's reasoning parsers return):

- `{"role": "assistant", "content": "ANSWER", "reasoning_content": "REASONING"}`;
- `{"role": "assistant", "content": "<think>REASONING</think>ANSWER"}` (the `<think>` block first; whitespace
  around REASONING and before ANSWER is dropped, as Qwen3's template drops it).

`data.thinking` (`apply_thinking`, applied by `Template.encode` in training AND at inference, so both see the
same conversation) decides what is trained:

- keep: the reasoning is trained. A template that renders `reasoning_content` itself (Qwen3, Qwen3.5, GLM-4) gets
  it as that field, with `enable_thinking=True` where it has the switch; any other template (format ones, ChatML,
  Llama 3, Gemma 3, Mistral, Phi-3) gets `<think>\nREASONING\n</think>\n\n` before the answer. Rows without
  reasoning are unchanged (Qwen3's template still trains its empty think block on the last turn).
- drop: the reasoning is removed; a template with the `enable_thinking` switch is rendered with
  `enable_thinking=False` (Qwen3's non-thinking mode: the empty think block is in the prompt, not trained).
- empty: the answer is trained after an empty think block: `reasoning_content=""` for templates that render it
  (Qwen3.5's prompt already opens the block, so `\n</think>\n\n` is trained), `<think>\n\n</think>\n\n`
  before every answer for the others.

Which earlier turns keep their reasoning is the template's own choice (Qwen3 drops it from turns before the last
user message); see `chat_template.py` for how such templates are trained.
"""
from __future__ import annotations

THINKING_MODES = ("keep", "drop", "empty")
OPEN, CLOSE = "<think>", "</think>"
SWITCH = "enable_thinking"  # the chat_template variable of Qwen3-style templates (and GLM-4's)


def split_think(content: str) -> tuple[str | None, str, str | None]:
    """(reasoning or None, answer, problem or None) of an answer that may start with a `<think>` block."""
    text = content.lstrip()
    if not text.startswith(OPEN):
        return None, content, None
    end = text.find(CLOSE)
    if end < 0:
        return None, content, f"starts with {OPEN} but has no {CLOSE}: close the reasoning block"
    return text[len(OPEN):end].strip(), text[end + len(CLOSE):].lstrip(), None


def split_generated(text: str) -> tuple[str | None, str]:
    """(reasoning or None, answer) of a generated text: a model trained with reasoning writes `<think>…</think>`
    before its answer. A block left open (generation stopped while reasoning) is all reasoning and no answer."""
    reasoning, answer, problem = split_think(text)
    if problem:
        return text.lstrip()[len(OPEN):].strip(), ""
    return reasoning, answer


def think_block(reasoning: str) -> str:
    """The reasoning as Qwen3's template writes it before an answer (an empty block for "")."""
    return f"{OPEN}\n{reasoning.strip()}\n{CLOSE}\n\n"


def apply_thinking(messages: list[dict], mode: str, renders_reasoning: bool) -> list[dict]:
    """`messages` as `mode` (keep / drop / empty, see the module docstring) wants them rendered.
    `renders_reasoning`: the chat_template renders `reasoning_content` itself."""
    out = []
    for m in messages:
        if m.get("role") != "assistant":
            out.append(m)
            continue
        reasoning = m.get("reasoning_content")
        m = {k: v for k, v in m.items() if k != "reasoning_content"}
        if mode == "empty":
            reasoning = ""
        elif mode == "drop":
            reasoning = None
        if reasoning is not None:
            if renders_reasoning:
                m["reasoning_content"] = reasoning
            else:
                m["content"] = think_block(reasoning) + m["content"]
        out.append(m)
    return out


def has_switch(chat_template: str | None) -> bool:
    """The chat_template reads `enable_thinking` (Qwen3, Qwen3.5, GLM-4's templates)."""
    return chat_template is not None and SWITCH in chat_template
