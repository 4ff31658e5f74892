"""`domaintune chat`: streaming answers, history within the context window, commands, Ctrl-C."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from chat_templates import STRICT_INST
from domaintune.cli.inference import CHAT_SAMPLING
from domaintune.cli.options import sampling_params
from domaintune.errors import UserError
from domaintune.inference.chat import HELP, ChatSession, run_chat
from domaintune.inference.engine import Engine
from domaintune.inference.params import PRESETS, GenerationParams


def chat_params(**given) -> GenerationParams:
    """What `domaintune chat` builds from its flags (cli.options.sampling_params): the "chat" preset with the
    `given` flags changed."""
    flags = {name: getattr(PRESETS["chat"], name) for name in CHAT_SAMPLING} | given
    return sampling_params(argparse.Namespace(**flags), "chat", CHAT_SAMPLING, zero_is_greedy=True)


GREEDY8 = chat_params(max_new_tokens=8, temperature=0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir):
    """The conftest's micro LLaMA: untied embeddings, so different prompts get different greedy answers."""
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def engine(llama_dir):
    return Engine.from_run(llama_dir, template="domain_zh")


def greedy(engine, messages, n=8) -> str:
    ids = engine.encode_messages(messages)
    return engine.generate([ids], GenerationParams(max_new_tokens=n))[0].text


class Writes:
    """A text stream that remembers every write."""

    def __init__(self, on_write=None):
        self.parts: list[str] = []
        self.on_write = on_write

    def write(self, s):
        self.parts.append(s)
        if self.on_write:
            self.on_write(s)

    def flush(self):
        pass

    def text(self):
        return "".join(self.parts)


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def test_answers_stream_and_keep_history(engine):
    out = Writes()
    s = ChatSession(engine, GREEDY8, out=out)
    first = s.answer("你好")
    want1 = greedy(engine, [u("你好")])
    assert first == want1
    assert out.parts[:-1] == [p for p in out.parts[:-1] if p]  # deltas, then the newline
    assert len(out.parts) >= 4 and "".join(out.parts[:-1]) == want1 and out.parts[-1] == "\n"
    second = s.answer("孩子不睡觉")
    assert second == greedy(engine, [u("你好"), a(want1), u("孩子不睡觉")])
    assert s.history == [u("你好"), a(want1), u("孩子不睡觉"), a(second)]


def test_oldest_turns_are_dropped_to_fit_the_context(engine):
    history = [u("你好"), a("您好，有什么可以帮您"), u("孩子不睡觉"), a("可以先建立规律的作息")]
    rest = engine.encode_messages(history[2:] + [u("怎么办")])
    out = Writes()
    s = ChatSession(engine, GREEDY8, context_len=len(rest) + 8, out=out)
    assert len(engine.encode_messages(history + [u("怎么办")])) + 8 > s.context_len  # all of it does not fit
    s.history = list(history)
    answer = s.answer("怎么办")
    assert out.parts[0] == f"[dropped the 1 oldest turn(s) to fit the {len(rest) + 8}-token context]\n"
    assert answer == greedy(engine, history[2:] + [u("怎么办")])
    assert s.history == history[2:] + [u("怎么办"), a(answer)]


def test_a_message_longer_than_the_context_is_refused(engine):
    out = Writes()
    s = ChatSession(engine, GREEDY8, context_len=20, out=out)
    n = len(engine.encode_messages([u("好" * 40)]))
    assert s.answer("好" * 40) is None
    assert out.text() == f"[your message is too long: {n} tokens, the context holds 20]\n"
    assert s.history == []


def test_commands(engine):
    out = Writes()
    s = ChatSession(engine, GREEDY8, out=out)
    s.history = [u("x"), a("y")]
    assert s.command("/clear") and s.history == []
    assert s.command("/system 你是一位老师") and s.system == "你是一位老师"
    assert s.messages("q") == [{"role": "system", "content": "你是一位老师"}, u("q")]
    assert s.command("/system") and s.command("/system -") and s.system is None
    assert s.command("/help") and s.command("/nope")
    assert s.command("/exit") is False
    assert out.text() == ("[conversation cleared]\n[system prompt set]\n[system prompt: '你是一位老师']\n"
                          "[system prompt removed: the template's default applies]\n" + HELP + "\n"
                          "[unknown command /nope; /help lists the commands]\n")


def test_ctrl_c_stops_the_answer_but_not_the_chat(engine):
    previous = signal.getsignal(signal.SIGINT)
    sent = []

    def interrupt_once(s):
        if not sent and s.strip():
            sent.append(s)
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does

    out = Writes(interrupt_once)
    s = ChatSession(engine, chat_params(max_new_tokens=1500, temperature=0), out=out)
    answer = s.answer("你好")
    assert out.parts[-1] == "\n[stopped]\n"
    assert 0 < len(answer) and len(engine.tokenizer(answer, add_special_tokens=False)["input_ids"]) < 300
    assert s.history == [u("你好"), a(answer)]  # the partial answer stays
    assert signal.getsignal(signal.SIGINT) is previous  # the chat's handler is gone again


def test_repl_loop(engine, llama_dir):
    lines = iter(["", "/system 你是一位老师", "你好", "/clear", "/exit", "never read"])
    prompts = []

    def fake_input(prompt):
        prompts.append(prompt)
        line = next(lines)
        if line == "":
            raise KeyboardInterrupt  # Ctrl-C at the prompt does not leave
        return line

    out = Writes()
    assert run_chat(llama_dir, template="domain_zh", params=GREEDY8, input_fn=fake_input, out=out) == 0
    want = greedy(engine, [{"role": "system", "content": "你是一位老师"}, u("你好")])
    assert prompts == [">>> "] * 5
    text = out.text()
    assert text.index("[Ctrl-C stops an answer; /exit or Ctrl-D leaves]") < text.index("[system prompt set]")
    assert text.endswith(f"[system prompt set]\n{want}\n[conversation cleared]\nbye\n")


def test_chat_params_validation():
    assert chat_params().do_sample and chat_params(temperature=0).do_sample is False
    with pytest.raises(UserError, match=r"^max_new_tokens must be at least 1, got 0$"):
        chat_params(max_new_tokens=0)
    with pytest.raises(UserError, match=r"^top_p must lie in \(0, 1\], got 0$"):
        chat_params(top_p=0)
    with pytest.raises(UserError, match=r"^temperature must be > 0 when sampling \(0 means greedy\), got -0.5$"):
        chat_params(temperature=-0.5)
    with pytest.raises(UserError, match=r"^top_k must be >= 0 \(0 = off\), got -1$"):
        chat_params(top_k=-1)
    with pytest.raises(UserError, match=r"^repetition_penalty must be > 0, got 0$"):
        chat_params(repetition_penalty=0)


def test_cli_chat_over_stdin(engine, llama_dir):
    """The real command, fed through a pipe: streamed answers, /system, /clear, /exit."""
    script = "你好\n/system 你是一位老师\n你好\n/clear\n你好\n/exit\n"
    proc = subprocess.run([sys.executable, "-m", "domaintune", "chat", str(llama_dir), "--template", "domain_zh",
                           "--temperature", "0", "--repetition-penalty", "1.0", "--max-new-tokens", "8"],
                          input=script, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    sys_msg = {"role": "system", "content": "你是一位老师"}
    a1 = greedy(engine, [u("你好")])
    a2 = greedy(engine, [sys_msg, u("你好"), a(a1), u("你好")])  # /system keeps the history
    a3 = greedy(engine, [sys_msg, u("你好")])  # /clear emptied it
    assert a1 != a3 and a2 != a3
    tail = proc.stdout[proc.stdout.index(">>> "):]
    assert tail == f">>> {a1}\n>>> [system prompt set]\n>>> {a2}\n>>> [conversation cleared]\n>>> {a3}\n>>> bye\n"




def test_system_prompt_on_a_template_that_refuses_it_keeps_the_chat_alive(llama_dir, tmp_path):
    """Regression: `/system TEXT` on a model whose chat_template raises on a system message crashed the chat
    at the next answer."""
    import shutil

    from transformers import AutoTokenizer

    strict = Path(shutil.copytree(llama_dir, tmp_path / "strict"))
    tok = AutoTokenizer.from_pretrained(strict)
    tok.chat_template = STRICT_INST
    tok.save_pretrained(strict)
    eng = Engine.from_run(strict, template="tokenizer")
    want = greedy(eng, [u("你好")])

    out = Writes()
    lines = iter(["/system 你是一位老师", "/system", "你好", "/exit"])
    assert run_chat(strict, template="tokenizer", params=GREEDY8, input_fn=lambda p: next(lines), out=out) == 0
    text = out.text()
    refused = text[text.index("[system prompt not set: "):].split("\n", 1)[0]
    assert "System role not supported" in refused
    assert text.endswith(f"{refused}\n[no system prompt]\n{want}\nbye\n")

    # a system prompt given on the command line fails at the first answer: the error is shown, the chat goes on
    out = Writes()
    lines = iter(["你好", "/system -", "你好", "/exit"])
    assert run_chat(strict, template="tokenizer", params=GREEDY8, system="你是一位老师", input_fn=lambda p: next(lines),
                    out=out) == 0
    text = out.text()
    error = text[text.index("[error: "):].split("\n", 1)[0]
    assert "System role not supported" in error
    assert text.endswith(f"{error}\n[system prompt removed: the template's default applies]\n{want}\nbye\n")
