"""`domaintune chat RUN`: a terminal chat with streaming output.

The conversation (optional system prompt + turns) is rendered with the run's template, exactly as in
training. Before each answer the oldest turns are dropped, with a notice, until prompt + max new
tokens fit the context window. Ctrl-C stops the current answer (the partial answer stays in the
history) without leaving the chat; Ctrl-D or /exit leaves.

Sampling defaults suit conversation, not evaluation: temperature 0.7, top_p 0.9, top_k 50,
repetition_penalty 1.1 (small models loop without it). `--temperature 0` decodes greedily, as
`predict` does.
"""
from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from .errors import UserError

HELP = """commands:
  /clear          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt (/system alone shows it; /system - removes it)
  /help           this help
  /exit           leave (Ctrl-D too); Ctrl-C stops the current answer"""


class ChatSession:
    """A conversation with an engine: history, context fitting and streaming answers."""

    def __init__(self, engine, params, system: str | None = None, context_len: int | None = None, out=None):
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
        from dataclasses import replace

        fitted = self.fit(user_text)
        if fitted is None:
            return None
        ids, max_new = fitted
        stop = threading.Event()
        interrupted = threading.Event()

        def on_sigint(*_):
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


def run_chat(run: str | Path, base_only: bool = False, template: str | None = None, params=None,
             system: str | None = None, context_len: int | None = None, device: str | None = None,
             dtype: str = "auto", input_fn=input, out=None) -> int:
    """Load the run (or model directory) and chat until /exit or end of input."""
    from .generation import Engine

    out = out or sys.stdout
    params = params or chat_params()
    out.write(f"loading {run}{' (base model only)' if base_only else ''} ...\n")
    out.flush()
    engine = Engine.from_run(run, base_only=base_only, template=template, device=device, dtype=dtype)
    session = ChatSession(engine, params, system=system, context_len=context_len, out=out)
    mode = "greedy" if not params.do_sample else f"temperature {params.temperature}, top_p {params.top_p}"
    session.say(f"model {engine.model_id} (template {engine.template.name}; {mode}). /help for commands, /exit to leave.")
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


def chat_params(max_new_tokens: int = 512, temperature: float = 0.7, top_p: float = 0.9, top_k: int = 50,
                repetition_penalty: float = 1.1, seed: int | None = None):
    """GenerationParams for chat; temperature 0 = greedy. Out-of-range values raise UserError."""
    from .generation import GenerationParams

    return GenerationParams(max_new_tokens=max_new_tokens, do_sample=temperature != 0,
                            temperature=temperature if temperature != 0 else 1.0, top_p=top_p, top_k=top_k,
                            repetition_penalty=repetition_penalty, seed=seed).validate()


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a run (or an exported / local model) in the terminal, streaming",
                       description=__doc__.split("\n\n", 1)[1] + "\n" + HELP,
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory, exported model or local model directory")
    p.add_argument("--base-only", action="store_true", help="talk to the base model, without the run's adapter (default: off)")
    p.add_argument("--template", default=None,
                   help="prompt template for a directory without template.json: domain_zh, alpaca, chatml, tokenizer or "
                        "a .json path (default: the run's template.json, else the tokenizer's chat_template)")
    p.add_argument("--system", default=None, help="system prompt (default: the template's default)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest answer in tokens (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0 = off (default: %(default)s)")
    p.add_argument("--repetition-penalty", type=float, default=1.1,
                   help="penalty for repeating tokens; 1.0 = off (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: none)")
    p.add_argument("--context", type=int, default=None,
                   help="token budget for history + answer (default: the model's context length)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="weight dtype; auto = bf16/fp16 on GPU, fp32 on CPU (default: %(default)s)")
    p.set_defaults(func=_cmd_chat)


def _cmd_chat(a) -> int:
    params = chat_params(a.max_new_tokens, a.temperature, a.top_p, a.top_k, a.repetition_penalty, a.seed)
    return run_chat(a.run, base_only=a.base_only, template=a.template, params=params, system=a.system,
                    context_len=a.context, device=a.device, dtype=a.dtype)
