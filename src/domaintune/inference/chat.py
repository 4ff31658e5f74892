"""`domaintune chat RUN`: a terminal chat with streaming output.

The conversation (optional system prompt + turns) is rendered with the run's template, exactly as in
training. Before each answer the oldest turns are dropped, with a notice, until prompt + max new
tokens fit the context window. Ctrl-C stops the current answer (the partial answer stays in the
history) without leaving the chat; Ctrl-D or /exit leaves.

Sampling defaults suit conversation, not evaluation: the chat preset (temperature 0.7,
top_p 0.9, top_k 50, repetition_penalty 1.1: small models loop without it). `--temperature 0` decodes
greedily, as `predict` does.
"""
from __future__ import annotations

import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TextIO

from ..errors import UserError
from .params import PRESETS, GenerationParams

if TYPE_CHECKING:
    from .engine import Engine

HELP = """commands:
  /clear          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt (/system alone shows it; /system - removes it)
  /help           this help
  /exit           leave (Ctrl-D too); Ctrl-C stops the current answer"""


class ChatSession:
    """A conversation with an engine: history, context fitting and streaming answers."""

    def __init__(self, engine: Engine, params: GenerationParams, system: str | None = None,
                 context_len: int | None = None, out: TextIO | None = None) -> None:
        self.engine = engine
        self.params = params
        self.system = system
        self.context_len = min(context_len or engine.context_len, engine.context_len)
        self.history: list[dict] = []
        self.out = out or sys.stdout

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def messages(self, user_text: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history + [{"role": "user", "content": user_text}]

    def fit(self, user_text: str) -> tuple[list[int], int] | None:
        """Prompt ids and max new tokens, after dropping the oldest turns that do not fit (None: no fit)."""
        dropped = 0
        while True:
            ids = self.engine.encode_messages(self.messages(user_text))
            if len(ids) + self.params.max_new_tokens <= self.context_len or not self.history:
                break
            self.history = self.history[2:]  # one user + assistant pair
            dropped += 1
        if dropped:
            self.say(f"[dropped the {dropped} oldest turn(s) to fit the {self.context_len}-token context]")
        room = self.context_len - len(ids)
        if room <= 0:
            self.say(f"[your message is too long: {len(ids)} tokens, the context holds {self.context_len}]")
            return None
        if room < self.params.max_new_tokens:
            self.say(f"[the answer is limited to {room} tokens by the context]")
        return ids, min(room, self.params.max_new_tokens)

    def answer(self, user_text: str) -> str | None:
        """Stream one answer to the output; Ctrl-C (SIGINT) stops it. Returns the answer text."""
        fitted = self.fit(user_text)
        if fitted is None:
            return None
        ids, max_new = fitted
        stop = threading.Event()
        interrupted = threading.Event()

        def on_sigint(*_: object) -> None:
            interrupted.set()
            stop.set()

        old = signal.signal(signal.SIGINT, on_sigint) if threading.current_thread() is threading.main_thread() else None
        text = ""
        try:
            for delta in self.engine.stream(ids, replace(self.params, max_new_tokens=max_new), stop_event=stop):
                text += delta
                self.out.write(delta)
                self.out.flush()
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)
        self.out.write("\n[stopped]\n" if interrupted.is_set() else "\n")
        self.out.flush()
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": text}]
        return text

    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/clear":
            self.history = []
            self.say("[conversation cleared]")
        elif name == "/system":
            if not arg:
                self.say(f"[system prompt: {self.system!r}]" if self.system else "[no system prompt]")
            elif arg == "-":
                self.system = None
                self.say("[system prompt removed: the template's default applies]")
            else:
                try:  # a chat template may refuse system messages: say so now, keep the old prompt
                    self.engine.encode_messages([{"role": "system", "content": arg}, {"role": "user", "content": "?"}])
                except UserError as e:
                    self.say(f"[system prompt not set: {e}]")
                else:
                    self.system = arg
                    self.say("[system prompt set]")
        elif name == "/help":
            self.say(HELP)
        else:
            self.say(f"[unknown command {name}; /help lists the commands]")
        return True


def run_chat(run: str | Path, base_only: bool = False, template: str | None = None,
             params: GenerationParams | None = None, system: str | None = None, context_len: int | None = None,
             device: str | None = None, dtype: str = "auto", input_fn: Callable[[str], str] = input,
             out: TextIO | None = None, allow_pickle: bool = False, thinking: bool | None = None) -> int:
    """Load the run (or model directory) and chat until /exit or end of input. `params` default to the
    "chat" preset; `thinking`: the chat_template's enable_thinking (None: as the run was trained)."""
    from .engine import Engine

    out = out or sys.stdout
    params = (params or PRESETS["chat"]).validate()
    out.write(f"loading {run}{' (base model only)' if base_only else ''} ...\n")
    out.flush()
    engine = Engine.from_run(run, base_only=base_only, template=template, device=device, dtype=dtype,
                             allow_pickle=allow_pickle)
    engine.template = engine.template.with_thinking(thinking)
    session = ChatSession(engine, params, system=system, context_len=context_len, out=out)
    mode = "greedy" if not params.do_sample else f"temperature {params.temperature}, top_p {params.top_p}"
    session.say(f"model {engine.model_id} (template {engine.template.name}; {mode}). "
                "/help for commands, /exit to leave.")
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
    while True:
        try:
            line = input_fn(">>> ")
        except EOFError:
            out.write("\n")
            break
        except KeyboardInterrupt:
            out.write("\n[Ctrl-C stops an answer; /exit or Ctrl-D leaves]\n")
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not session.command(line):
                break
            continue
        try:
            session.answer(line)
        except UserError as e:  # e.g. the model's chat template refuses the conversation: the chat goes on
            session.say(f"[error: {e}]")
    session.say("bye")
    return 0
