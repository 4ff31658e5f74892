"""Training with the model's own chat_template (`data.template: tokenizer`): the trained spans, turn by turn.

**Prompt and target of assistant turn k.** `prompt_k = render(messages[:k], add_generation_prompt=True)`, exactly
what predict, chat and serve send for that history, and `full_k = render(messages[:k+1])`. The target is
`full_k[len(prompt_k):]`: the tokens the model must emit after the very prompt inference gives it. A template whose
generation prompt is not a prefix of its own rendering (e.g. Qwen3 asked for `enable_thinking=False` on a turn that
carries reasoning) has no such target: UserError.

**Joining turns into samples.** Templates that keep earlier turns fixed (ChatML, Llama 3, Gemma 3, Mistral) give
one sample per row, as before: turn k+1 continues the sample when `prompt_{k+1}` starts with what stays of turn k.
What stays is `kept_k = lcp(full_k, render(messages[:k+1], add_generation_prompt=True))`: the end-of-conversation
tokens some templates add only to the last turn (Phi-3's EOS after `<|end|>\\n`) are not part of it, and are
trained only where a sample ends. Templates that rewrite earlier turns (Qwen3 and Qwen3.5 drop earlier reasoning
and render the empty `<think></think>` block only on the last turn; GLM-4 the same) make `prompt_{k+1}` differ
from `kept_k`; turn k+1 then starts a NEW sample from `prompt_{k+1}`. So every assistant turn is trained, each in
exactly the context inference sends.

Why not trl's `*_training.jinja` variants, which keep earlier reasoning so that the rendering is prefix-preserving:
then turn 2 and later would be trained in a context (earlier reasoning visible) that the official template, and so
predict, serve, vLLM and llama.cpp, never shows the model.

**Turns without an end-of-turn token.** GLM-4's template ends an answer with nothing: the next turn's `<|user|>`
ends it, and GLM ships `<|user|>` among its generation EOS ids. For such a template (`close_turn_token`) that role
token is trained: where the next turn follows in the same sample, its first token (the role token) is trained;
where a sample ends, the token is appended and trained. `Template.stop` holds it, so generation stops on it.

**Tools and weights.** A row's tools (formats.py) go to every rendering as `tools=`; an assistant turn that calls
tools is a turn like any other (its trained span is the call as the template writes it) and a `tool` result is part
of the next turn's prompt, so never trained. A turn marked untrained (`"weight": 0`, data.train_on_turns: last)
stays in the prompt of later turns with its span untrained. A template that drops tools (`renders_tools`, a probe)
is refused by `Template` rather than trained on calls the model never sees.

A sample is tokenized as one string, masks following its characters (templates.py `_tokenize`). A prompt for
inference is built by the same walk (`chat_segments(..., generation=True)`: the last sample, up to its generation
prompt), so it is token-for-token the prompt of the sample that trained that turn, and apply_chat_template's.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .thinking import SWITCH, has_switch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Segments = list[tuple[str, bool]]  # (text, trainable)


def render(tokenizer: PreTrainedTokenizerBase, chat_template: str, messages: list[dict], generation: bool,
           kwargs: dict | None = None, tools: list | None = None) -> str:
    """One conversation rendered as text; a template that rejects it (`raise_exception`, as Mistral's does for a
    system message) becomes a UserError carrying the template's message."""
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation,
                                             chat_template=chat_template, tools=tools, **(kwargs or {}))
    except TemplateError as e:
        raise UserError(f"the model's chat_template rejects this conversation ({e}); change the data "
                        "(e.g. drop the system message) or use data.template: chatml (or another "
                        "format template)") from None
    assert isinstance(text, str), "one conversation with tokenize=False renders to one string"
    return text


_PROBE = [{"role": "user", "content": "q"}]


_REASONING: dict[str, bool] = {}  # chat_template -> renders reasoning_content (a probe, once per template)


def renders_reasoning(tokenizer: PreTrainedTokenizerBase, chat_template: str | None) -> bool:
    """The chat_template writes an assistant message's `reasoning_content` (Qwen3, Qwen3.5, GLM-4)."""
    if not chat_template:
        return False
    if chat_template not in _REASONING:
        probe = "R\u2063EASONING"  # no word any template writes
        msgs = [*_PROBE, {"role": "assistant", "content": "a", "reasoning_content": probe}]
        try:
            _REASONING[chat_template] = probe in render(tokenizer, chat_template, msgs, False)
        except Exception:  # a template that cannot render the probe renders no reasoning we could rely on
            _REASONING[chat_template] = False
    return _REASONING[chat_template]


_TOOLS: dict[str, bool] = {}  # chat_template -> renders tools, tool calls and tool results (a probe)
_TOOL_PROBE = ("PROBE\u2063TOOL", "PROBE\u2063ARG", "PROBE\u2063RESULT")  # no word any template writes


def renders_tools(tokenizer: PreTrainedTokenizerBase, chat_template: str | None) -> bool:
    """The chat_template writes the `tools` it is given, an assistant message's `tool_calls` (name and arguments)
    and a `tool` message's content (Qwen2.5, Qwen3, Llama 3.1 do; ChatML-only templates drop them silently, which
    would train the model on answers to calls it never sees)."""
    if not chat_template:
        return False
    if chat_template not in _TOOLS:
        name, arg, result = _TOOL_PROBE
        tools = [{"type": "function", "function": {"name": name, "description": "d",
                                                   "parameters": {"type": "object", "properties": {}}}}]
        call = {"type": "function", "id": "c1", "function": {"name": name, "arguments": {"x": arg}}}
        msgs: list[dict] = [*_PROBE, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": result}, {"role": "assistant", "content": "a"}]
        try:
            text = render(tokenizer, chat_template, msgs, False, tools=tools)
            # the schema, the call and the result: the name appears twice (schema and call)
            _TOOLS[chat_template] = text.count(name) >= 2 and arg in text and result in text
        except Exception:  # a template that fails on the probe renders no tools we could rely on
            _TOOLS[chat_template] = False
    return _TOOLS[chat_template]


def close_turn_token(tokenizer: PreTrainedTokenizerBase, chat_template: str) -> str:
    """The token that ends an answer in a template that writes nothing after the answer itself (GLM-4: the next
    turn's `<|user|>`); "" for templates that close their answers (ChatML's `<|im_end|>`, Mistral's EOS)."""
    answer = [*_PROBE, {"role": "assistant", "content": "ANSWER"}]
    try:
        if render(tokenizer, chat_template, answer, False).rpartition("ANSWER")[2].strip():
            return ""
        tail = render(tokenizer, chat_template, [*answer, *_PROBE], False).rpartition("ANSWER")[2]
    except Exception:  # _turn_end_tokens (templates.py) warns about a template that fails on this probe
        return ""
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    if not ids or ids[0] not in set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder):
        return ""
    token = tokenizer.convert_ids_to_tokens(ids[0])
    return token if isinstance(token, str) and tail.startswith(token) else ""


def _kept(full: str, cont: str, atoms: list[str]) -> int:
    """Length of the common prefix of `full` and `cont`, moved back to the start of a special token it would cut
    (Phi-3: `<|endoftext|>` and `<|assistant|>` share `<|`)."""
    n = 0
    for a, b in zip(full, cont, strict=False):
        if a != b:
            break
        n += 1
    moved = True
    while moved and n < len(full):
        moved = False
        for tok in atoms:  # an occurrence starting before n and ending after it
            start = full.find(tok, max(0, n - len(tok) + 1))
            if 0 <= start < n:
                n, moved = start, True
    return n


def chat_segments(tokenizer: PreTrainedTokenizerBase, chat_template: str, messages: list[dict],
                  kwargs: dict | None = None, close_turn: str = "", generation: bool = False,
                  tools: list[dict] | None = None, trains: list[bool] | None = None) -> list[Segments]:
    """The samples of a conversation (see the module docstring), each as (text, trainable) segments. With
    `generation`, only the last sample, ending with the generation prompt for `messages` (which end with a user
    turn): the prompt inference sends (the earlier answers in it still marked trainable). `tools` go to the
    template with every rendering; `trains[k]` (default: every assistant turn) says whether assistant turn k is
    trained: an untrained one (weight 0, data.train_on_turns: last) stays in the prompt of the turns after it.
    An assistant turn that calls tools is trained like any other (its call text); a tool result is never trained,
    being part of the next assistant turn's prompt."""
    atoms = sorted({*tokenizer.all_special_tokens, *(t.content for t in tokenizer.added_tokens_decoder.values())},
                   key=len, reverse=True)
    samples: list[Segments] = []
    cur: Segments | None = None
    done = ""  # the text of `cur` that stays when the conversation goes on
    tail = ""  # what the last turn of `cur` adds only where the conversation ends (Phi-3's EOS)
    trained = True  # the last assistant turn of `cur` is trained

    def close(segs: Segments) -> None:
        segs.append((tail, trained))
        if close_turn:
            segs.append((close_turn, trained))

    def start_turn(prompt: str) -> None:
        nonlocal cur
        if cur is not None and prompt.startswith(done):
            cont = prompt[len(done):]
            if close_turn and cont.startswith(close_turn):
                cur.append((close_turn, trained))
                cont = cont[len(close_turn):]
            cur.append((cont, False))
            return
        if cur is not None:
            close(cur)
            samples.append(cur)
        cur = [(prompt, False)]

    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(tokenizer, chat_template, messages[:k], True, kwargs, tools)
        full = render(tokenizer, chat_template, messages[: k + 1], False, kwargs, tools)
        if not full.startswith(prompt):
            raise UserError(f"the model's chat_template renders assistant turn {k} differently from its own generation "
                            f"prompt{_kwargs_note(kwargs)}, so the answer to train cannot be found; "
                            "change data.thinking, or use data.template: chatml (or another format template)")
        start_turn(prompt)
        assert cur is not None
        goes_on = render(tokenizer, chat_template, messages[: k + 1], True, kwargs, tools)
        n = max(_kept(full, goes_on, atoms), len(prompt))
        trained = trains is None or trains[k]
        cur.append((full[len(prompt):n], trained))
        done, tail = full[:n], full[n:]
    if generation:
        start_turn(render(tokenizer, chat_template, messages, True, kwargs, tools))
        assert cur is not None
        return [[(t, f) for t, f in cur if t]]
    if cur is not None:
        close(cur)
        samples.append(cur)
    return [[(t, f) for t, f in s if t] for s in samples]


def _kwargs_note(kwargs: dict | None) -> str:
    return f" (with {', '.join(f'{k}={v}' for k, v in kwargs.items())})" if kwargs else ""


def check_kwargs(kwargs: Any, chat_template: str | None, where: str) -> dict:
    """`kwargs` (a request's `chat_template_kwargs`, a --thinking flag) checked against what the template reads:
    today only `enable_thinking` (true/false), and only for a template with that switch. UserError naming `where`."""
    if not isinstance(kwargs, dict):
        raise UserError(f"{where} must be an object such as {{\"{SWITCH}\": false}}")
    unknown = sorted(set(kwargs) - {SWITCH})
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; supported: {SWITCH}")
    if SWITCH in kwargs:
        if not isinstance(kwargs[SWITCH], bool):
            raise UserError(f"{where}.{SWITCH} must be true or false, got {kwargs[SWITCH]!r}")
        if not has_switch(chat_template):
            raise UserError(f"{where}.{SWITCH}: this model's template has no thinking switch (only Qwen3-style "
                            "chat_templates read enable_thinking; the run uses a template without it)")
    return dict(kwargs)
