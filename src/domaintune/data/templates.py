"""Prompt templates as data (JSON files in `data/prompt_templates/`), and the one encoder of conversations.

A template describes how a conversation becomes text:

    [system_format(system)] user_format(q1) assistant_format(a1) <eos> turn_separator user_format(q2) ...

`user_format` ends with the assistant prefix (e.g. `用户:{content}\\n\\n助手:`), so a generation prompt is
everything up to and including the last user turn. `encode()` tokenizes segment by segment and returns
token ids with a per-token "trainable" flag. Training (loss masking) and inference (predict, chat,
serve) both call `encode()`, so the prompt the model sees at inference is token-for-token the prompt it
was trained on. The template used in training is saved as `template.json` in the run directory.

The special kind `tokenizer` uses the model's own `chat_template` (Jinja) instead: each assistant turn is
trained after exactly the generation prompt the template gives its history, and a template that rewrites
earlier turns (Qwen3, Qwen3.5, GLM-4) gives one sample per assistant turn (chat_template.py says how and
why). `encode()` returns the last sample (the one holding the last turn, or the generation prompt), and
`encode_samples()` all of them. A chat_template that rejects a conversation (`raise_exception(...)`, as
Mistral's, LLaMA-2's and Gemma's do for a system message or non-alternating roles) becomes a UserError
carrying the template's message.

Reasoning: `thinking` (data.thinking: keep / drop / empty, thinking.py) says what `encode()` does with an
assistant turn's `reasoning_content`, in training and at inference alike; `chat_template_kwargs` (e.g.
`{"enable_thinking": false}`, set by data.thinking: drop for templates with that switch) are passed to the
chat_template. Both are saved in template.json, so predict, chat, serve and export send the training prompt.

Known limitation (segment boundaries): `encode()` tokenizes each segment on its own and concatenates the
ids. Byte-level BPE tokenizers (Qwen, BLOOM, LLaMA-3, GPT-2 style) give the same ids as tokenizing the
whole rendered string, in practice. SentencePiece / Metaspace tokenizers (LLaMA-2, Mistral, Yi, Baichuan)
may not: each segment gets its own word-start marker ("▁") and merges never cross a boundary. Training and
inference inside domaintune are unaffected (both use `encode()`), but a chat_template exported for other
tools (`to_jinja`, tokenized as one string) can yield different ids at those boundaries, i.e. once there
is a system message or an earlier turn. The kind `tokenizer` has no such limitation: a sample is tokenized as
one string and its masks follow the characters (`_tokenize`), so its ids are `apply_chat_template`'s.
"""
from __future__ import annotations

import json
import re
from bisect import bisect_right
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import console
from ..errors import UserError
from .chat_template import chat_segments, check_kwargs, close_turn_token, renders_reasoning, renders_tools
from .formats import split_row, uses_tools, with_system
from .thinking import SWITCH, THINKING_MODES, apply_thinking, has_switch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BUILTIN = ("domain_zh", "alpaca", "chatml", "tokenizer")
TRAIN_ON_TURNS = ("all", "last")
_JOIN_FIELDS = re.compile(r"\{(instruction|input)\}")
EOS = object()  # marker for "the tokenizer's EOS token id" inside a segment list


@dataclass(frozen=True)
class Template:
    name: str
    description: str = ""
    kind: str = "format"  # "format" (fields below) or "tokenizer" (the model's chat_template)
    system_format: str = "{content}\n\n"
    default_system: str = ""
    user_format: str = "{content}"
    assistant_format: str = "{content}"
    turn_separator: str = ""
    instruction_input_format: str = "{instruction}\n{input}"
    append_eos: bool = True
    stop: list[str] = field(default_factory=list)
    chat_template: str | None = None  # kind == "tokenizer": the Jinja template used in training
    thinking: str = "keep"  # data.thinking: what encode() does with reasoning_content (thinking.py)
    chat_template_kwargs: dict = field(default_factory=dict)  # passed to chat_template, e.g. enable_thinking
    close_turn: str = ""  # kind == "tokenizer": the token trained after an answer its template leaves open (GLM)
    train_on_turns: str = "all"  # data.train_on_turns: every assistant turn of a row trains, or the last one only

    # ------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, d: dict, source: str = "template") -> "Template":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise UserError(f"{source}: unknown template field(s) {sorted(unknown)}; known: {sorted(known)}")
        if "name" not in d:
            raise UserError(f"{source}: a template needs a 'name'")
        t = cls(**d)
        if t.kind == "format" and "{content}" not in t.user_format:
            raise UserError(f"{source}: user_format must contain {{content}}")
        if t.thinking not in THINKING_MODES:
            raise UserError(f"{source}: thinking must be one of {', '.join(THINKING_MODES)}, got {t.thinking!r}")
        if t.train_on_turns not in TRAIN_ON_TURNS:
            raise UserError(f"{source}: train_on_turns must be one of {', '.join(TRAIN_ON_TURNS)}")
        if not isinstance(t.chat_template_kwargs, dict):
            raise UserError(f"{source}: chat_template_kwargs must be an object")
        return t

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Template":
        p = Path(path)
        try:
            return cls.from_dict(json.loads(p.read_text(encoding="utf-8")), str(p))
        except json.JSONDecodeError as e:
            raise UserError(f"{p} line {e.lineno}: not valid JSON: {e.msg}") from None

    # ------------------------------------------------------------ rendering
    def join_instruction(self, instruction: str, input: str = "") -> str:
        """The user message for an instruction/input row."""
        if not input:
            return instruction
        # One pass over the format: an instruction that itself contains the text "{input}" stays as written.
        values = {"instruction": instruction, "input": input}
        return _JOIN_FIELDS.sub(lambda m: values[m.group(1)], self.instruction_input_format)

    def segments(self, messages: list[dict], add_generation_prompt: bool) -> list[tuple[Any, bool]]:
        """(text or EOS, trainable) pieces of a conversation (format templates).

        `messages`: optional leading system message, then alternating user/assistant. With
        `add_generation_prompt` the conversation must end with a user turn, and the result ends with the
        assistant prefix.
        """
        segs: list[tuple[Any, bool]] = []
        if uses_tools(messages):
            raise UserError(f"the template '{self.name}' cannot render tools, tool calls or tool results; use "
                            "data.template: tokenizer with a model whose chat_template renders tools (Qwen2.5, "
                            "Qwen3, Llama 3.1), or drop the tool rows")
        msgs, _, trains = split_row(messages, self.train_on_turns == "last")
        system = self.default_system
        if msgs and msgs[0]["role"] == "system":
            system = msgs[0]["content"]
            msgs, trains = msgs[1:], trains[1:]
        if system:
            segs.append((self.system_format.replace("{content}", system), False))
        for i, m in enumerate(msgs):
            if m["role"] == "user":
                if i > 0:
                    segs.append((self.turn_separator, False))
                segs.append((self.user_format.replace("{content}", m["content"]), False))
            else:
                segs.append((self.assistant_format.replace("{content}", m["content"]), trains[i]))
                if self.append_eos:
                    segs.append((EOS, trains[i]))
        return [(s, t) for s, t in segs if s is EOS or s]

    def encode(self, tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = False,
               chat_template_kwargs: dict | None = None) -> tuple[list[int], list[bool]]:
        """Token ids and per-token trainable flags for `messages` (see `segments`): the last of
        `encode_samples`, or with `add_generation_prompt` the prompt of the sample that trains the next answer.
        `chat_template_kwargs` add to (and override) the template's own (`check_kwargs` them first)."""
        if self.kind == "tokenizer":
            segs = self._chat_segments(tokenizer, messages, add_generation_prompt, chat_template_kwargs)[-1]
            return _tokenize(tokenizer, segs)
        ids: list[int] = []
        mask: list[bool] = []
        bos = leading_bos(tokenizer)
        if bos is not None:
            ids.append(bos)
            mask.append(False)
        for text, trainable in self.segments(apply_thinking(messages, self.thinking, False), add_generation_prompt):
            if text is EOS:
                piece = [] if ids and ids[-1] == tokenizer.eos_token_id else [tokenizer.eos_token_id]
            else:
                piece = _token_ids(tokenizer, text)
            ids.extend(piece)
            mask.extend([trainable] * len(piece))
        return ids, mask

    def encode_samples(self, tokenizer: PreTrainedTokenizerBase,
                       messages: list[dict]) -> list[tuple[list[int], list[bool]]]:
        """Every sample a conversation trains: one for format templates and templates that keep earlier turns
        fixed, one per assistant turn for templates that rewrite them (chat_template.py)."""
        if self.kind != "tokenizer":
            return [self.encode(tokenizer, messages)]
        samples = self._chat_segments(tokenizer, messages, False, None)
        # A sample whose turns are all untrained (weight 0, train_on_turns: last) teaches nothing: left out, but a
        # row keeps its last sample so that it is counted (as having nothing to train) rather than vanishing.
        kept = [s for s in samples if any(t for _, t in s)] or samples[-1:]
        return [_tokenize(tokenizer, s) for s in kept]

    def _chat_segments(self, tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation: bool,
                       kwargs: dict | None) -> list[list[tuple[str, bool]]]:
        tpl = self.chat_template or tokenizer.chat_template
        if not tpl:
            raise UserError("template 'tokenizer' needs a tokenizer with a chat_template; "
                            "choose domain_zh, alpaca or chatml")
        messages = with_system(messages, self.default_system)  # an export's data.system (format kind: segments)
        msgs, tools, trains = split_row(apply_thinking(messages, self.thinking, renders_reasoning(tokenizer, tpl)),
                                        self.train_on_turns == "last")
        if uses_tools(messages) and not renders_tools(tokenizer, tpl):
            raise UserError("this model's chat_template does not render tools, tool calls or tool results (a probe "
                            "with them renders without them); use a model whose chat_template does (Qwen2.5, Qwen3, "
                            "Llama 3.1), or drop the tool rows")
        return chat_segments(tokenizer, tpl, msgs, {**self.chat_template_kwargs, **(kwargs or {})}, self.close_turn,
                             generation, tools, trains) or [[]]

    def with_thinking(self, on: bool | None, flag: str = "--thinking") -> Template:
        """This template with `enable_thinking` set to `on` (None: as trained), for predict and chat. Off also drops
        reasoning from the conversation (data.thinking drop), as training with enable_thinking=false did. A
        template without the switch is a UserError naming `flag`."""
        if on is None:
            return self
        if not has_switch(self.chat_template if self.kind == "tokenizer" else None):
            raise UserError(f"{flag} {'on' if on else 'off'}: the template '{self.name}' has no thinking switch (only "
                            "a chat_template that reads enable_thinking has one: Qwen3, Qwen3.5, GLM-4); leave "
                            f"{flag} out")
        return replace(self, chat_template_kwargs={**self.chat_template_kwargs, SWITCH: on},
                       thinking=self.thinking if on else "drop")

    def check_kwargs(self, kwargs: object, where: str = "chat_template_kwargs") -> dict:
        """`kwargs` for `encode` (a request's chat_template_kwargs, a --thinking flag), checked: only
        `enable_thinking` (true/false), and only for a chat_template with that switch. UserError naming `where`."""
        return check_kwargs(kwargs, self.chat_template if self.kind == "tokenizer" else None, where)

    def stop_token_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """EOS plus every stop string that is a single token."""
        out = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for s in self.stop:
            tid = tokenizer.convert_tokens_to_ids(s)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in out:
                out.append(tid)
        return out

    def chat_template_for(self, tokenizer: PreTrainedTokenizerBase) -> str:
        """`to_jinja()`, plus the BOS token for tokenizers that add one themselves (LLaMA):
        `apply_chat_template` adds no special tokens, so the template must spell it."""
        jinja = self.to_jinja()
        if self.kind == "format" and leading_bos(tokenizer) is not None:
            jinja = "{{ bos_token }}" + jinja
        # The training kwargs become the template's defaults (a caller may still pass them), so tools that render
        # it (transformers, vLLM, llama.cpp) send the training prompt: e.g. enable_thinking=false for data.thinking
        # drop. At the top level of a Jinja template, a `set` inside an `if` sets the template's variable.
        defaults = "".join(f"{{%- if {k} is not defined %}}{{%- set {k} = {json.dumps(v)} %}}{{%- endif %}}"
                           for k, v in self.chat_template_kwargs.items())
        if self.kind == "tokenizer" and self.default_system:  # data.system, as training added it (format: to_jinja)
            system = json.dumps({"role": "system", "content": self.default_system}, ensure_ascii=False)
            defaults += ("{%- if not messages or messages[0]['role'] != 'system' %}"
                         f"{{%- set messages = [{system}] + messages %}}{{%- endif %}}")
        return defaults + jinja

    def to_jinja(self) -> str:
        """A Jinja chat_template equivalent to this template (for export, so other tools render the same prompt)."""
        if self.kind == "tokenizer":
            return self.chat_template or ""

        def lit(s: str) -> str:
            return json.dumps(s)  # a JSON string literal is a valid Jinja string literal

        def fmt(f: str, var: str) -> str:
            head, _, tail = f.partition("{content}")
            return "{{ " + lit(head) + " + " + var + " + " + lit(tail) + " }}"

        # As encode(): EOS after an answer, unless the answer already ends with it (e.g. ChatML with Qwen's
        # instruct tokenizers, whose EOS is <|im_end|>).
        head, _, tail = self.assistant_format.partition("{content}")
        assistant = "{%- set a = " + lit(head) + " + m['content'] + " + lit(tail) + " -%}{{ a }}"
        if self.append_eos:
            assistant += "{%- if eos_token and not a.endswith(eos_token) -%}{{ eos_token }}{%- endif -%}"
        parts = [
            "{%- set ns = namespace(i=0) -%}",
            "{%- if messages and messages[0]['role'] == 'system' -%}",
            ("{%- if messages[0]['content'] -%}" + fmt(self.system_format, "messages[0]['content']") + "{%- endif -%}")
            if self.system_format else "",
            "{%- set loop_messages = messages[1:] -%}",
            "{%- else -%}",
            (fmt(self.system_format, lit(self.default_system)) if self.default_system else ""),
            "{%- set loop_messages = messages -%}",
            "{%- endif -%}",
            "{%- for m in loop_messages -%}",
            "{%- if m['role'] == 'user' -%}",
            "{%- if not loop.first -%}" + ("{{ " + lit(self.turn_separator) + " }}" if self.turn_separator else "")
            + "{%- endif -%}",
            fmt(self.user_format, "m['content']"),
            "{%- else -%}",
            assistant,
            "{%- endif -%}",
            "{%- endfor -%}",
        ]
        return "".join(parts)


def _tokenize(tokenizer: PreTrainedTokenizerBase, segments: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """A chat_template's sample as `tokenizer(text)` of its whole text (what `apply_chat_template(tokenize=True)`,
    vLLM and llama.cpp give), each token trainable when it starts in a trainable segment. Tokenizing segment by
    segment would differ for SentencePiece-style tokenizers (Mistral, Phi-3: every piece would start with "▁").
    A token that straddles a boundary between trained and untrained text (rare: the template joins them with
    special tokens or newlines), or a tokenizer without offsets (not a fast one), falls back to segment by segment."""
    text = "".join(t for t, _ in segments)
    starts, flags, pos = [], [], 0
    for t, trainable in segments:
        starts.append(pos)
        flags.append(trainable)
        pos += len(t)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # A fast tokenizer: what tokenizer(text) calls, without its per-call overhead (a third of the time at a million
    # rows), where tokenizer(text) would not first switch the backend's truncation, padding or special-token
    # splitting (a tokenizer.json may ship with them set).
    plain = backend is not None and backend.truncation is None and backend.padding is None and \
        backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))
    offsets = None
    if plain and backend is not None and text:
        enc = backend.encode(text, add_special_tokens=False)
        ids, offsets = enc.ids, enc.offsets
    else:
        try:
            out = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            ids, offsets = list(out["input_ids"]), out["offset_mapping"]
        except NotImplementedError:  # a slow tokenizer has no offsets
            pass
    if offsets is not None and text:
        mask = []
        for a, b in offsets:
            first, last = bisect_right(starts, a) - 1, bisect_right(starts, max(a, b - 1)) - 1
            if last != first and any(flags[k] != flags[first] for k in range(first, last + 1)):
                break
            mask.append(flags[first])
        else:
            return ids, mask
    ids, mask = [], []
    for t, trainable in segments:
        piece = _token_ids(tokenizer, t) if t else []
        ids.extend(piece)
        mask.extend([trainable] * len(piece))
    return ids, mask


def _token_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of `text`, no special tokens added. `verbose=False` silences transformers' "Token indices sequence
    length is longer than the specified maximum sequence length for this model" warning, which misleads here:
    samples longer than data.cutoff_len are cut or dropped (encode.py), never fed to the model whole."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def leading_bos(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS id if this tokenizer adds one by itself (LLaMA does, BLOOM/Qwen do not)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(with_special) > len(without) and with_special[0] == tokenizer.bos_token_id:
        return tokenizer.bos_token_id
    return None


def _turn_end_tokens(tokenizer: PreTrainedTokenizerBase, chat_template: str) -> list[str]:
    """The token a chat_template puts right after an answer (e.g. ChatML's `<|im_end|>`, Llama 3's
    `<|eot_id|>`). Training teaches the model to emit it instead of EOS, so generation must stop on it."""
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ANSWER"}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False, chat_template=chat_template)
        assert isinstance(text, str), "one conversation with tokenize=False renders to one string"
    except Exception as e:  # any failure (Jinja syntax, raise_exception, a missing field) means the same here
        # Not an error: the template may still render the user's own conversations (e.g. it demands a system
        # message). But without the probe the turn-end token is unknown, so generation stops at EOS only, and a
        # model trained to end answers with that token runs on: say so, with the template's own message.
        console.warn(f"the model's chat_template fails to render a user/assistant exchange "
              f"({e.__class__.__name__}: {e}); the token that ends an answer is unknown, so generation stops only "
              "at EOS (answers may run on): fix the chat_template or use data.template: chatml (or another "
              "format template)")
        return []
    tail = text.rpartition("ANSWER")[2].strip()
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    if not ids or ids[0] not in tokenizer.all_special_ids or ids[0] == tokenizer.eos_token_id:
        return []
    token = tokenizer.convert_ids_to_tokens(ids[0])
    assert isinstance(token, str), "one id converts to one token"
    return [token]


def get_template(name_or_path: str, tokenizer: PreTrainedTokenizerBase | None = None,
                 thinking: str = "keep", train_on_turns: str = "all") -> Template:
    """A built-in template by name, a template JSON by path, or `tokenizer` (the model's chat_template), with
    data.thinking `thinking` (thinking.py); for a chat_template with a thinking switch, `enable_thinking` is set
    to what that mode trains (false for drop, true otherwise)."""
    if name_or_path == "tokenizer":
        tpl = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
        if tokenizer is not None and not tpl:
            raise UserError("data.template 'tokenizer': this model's tokenizer has no chat_template; "
                            "choose domain_zh, alpaca or chatml")
        close = close_turn_token(tokenizer, tpl) if tokenizer is not None and tpl else ""
        stop = _turn_end_tokens(tokenizer, tpl) if tokenizer is not None and tpl else []
        return Template(name="tokenizer", kind="tokenizer", append_eos=False,
                        description="the model's own chat_template", chat_template=tpl,
                        stop=stop or ([close] if close else []), close_turn=close, thinking=thinking,
                        chat_template_kwargs={SWITCH: thinking != "drop"} if has_switch(tpl) else {},
                        train_on_turns=train_on_turns)
    if name_or_path in BUILTIN:
        text = (resources.files("domaintune.data.prompt_templates").joinpath(f"{name_or_path}.json")
                .read_text(encoding="utf-8"))
        return replace(Template.from_dict(json.loads(text), name_or_path), thinking=thinking,
                       train_on_turns=train_on_turns)
    p = Path(name_or_path)
    if p.suffix == ".json" and p.is_file():
        return replace(Template.load(p), thinking=thinking, train_on_turns=train_on_turns)
    raise UserError(f"unknown template '{name_or_path}': use one of {', '.join(BUILTIN)} "
                    "or a path to a template .json file")
