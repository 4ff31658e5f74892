"""`domaintune export --format gguf`: the GGUF loaded by llama.cpp (llama-cpp-python) gives `domaintune predict`'s
greedy tokens for llama, qwen2 and bloom; q8_0 stays close to f16; the embedded chat template sends llama.cpp the
training prompt; the Modelfile's Go template renders the training prompt; refusals."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from llama_cpp import Llama

import llama_cpp_run
from domaintune.cli import main
from domaintune.data.encode import with_system
from domaintune.data.templates import EOS, get_template
from domaintune.errors import UserError
from domaintune.inference import gguf_arch, gguf_export
from domaintune.inference.engine import Engine
from domaintune.inference.gguf_export import run_export_gguf
from domaintune.inference.gguf_vocab import PRE_TOKENIZERS, pre_tokenizer_name
from domaintune.inference.params import PRESETS, GenerationParams
from domaintune.inference.predict import run_predict
from domaintune.training.trainer import run_train
from llama_cpp_run import llama_logits

PROMPTS = ["孩子不爱吃饭怎么办", "How do I help my child sleep?", "怎样培养阅读习惯",
           "孩子总是拖延写作业，我该怎么做？", "Is screen time before bed harmful?"]
SINGLE = [{"role": "user", "content": "孩子不睡觉怎么办"}]
MULTI = [{"role": "system", "content": "你是一位温和的家庭教育助手。"},
         {"role": "user", "content": "孩子不睡觉怎么办"},
         {"role": "assistant", "content": "可以先建立固定的睡前流程。"},
         {"role": "user", "content": "What else can I try?"}]
# One template per architecture, so each translation (Jinja, Go) is checked on each layout.
ARCH_TEMPLATE = {"llama": "domain_zh", "qwen2": "chatml", "bloom": "alpaca"}
MAX_NEW = 24


@pytest.fixture(scope="module")
def runs(tiny_train_config, tmp_path_factory):
    """A LoRA run per architecture (4 steps at a high learning rate, so the adapter changes the answers)."""
    return {arch: run_train(tiny_train_config(tmp_path_factory.mktemp(f"gguf-{arch}") / "run", arch,
                                              f"data.template={tpl}"))
            for arch, tpl in ARCH_TEMPLATE.items()}


@pytest.fixture(scope="module")
def f32(runs, tmp_path_factory):
    return {arch: run_export_gguf(run, tmp_path_factory.mktemp(f"gguf-f32-{arch}") / "out", quant="f32")
            for arch, run in runs.items()}


def llama(path, **kw) -> Llama:
    return llama_cpp_run.llama(path, n_threads=2, **kw)


def llama_greedy(llm: Llama, prompt: list[int], n: int = MAX_NEW) -> list[int]:
    return llama_cpp_run.llama_greedy(llm, prompt, n)


@pytest.mark.parametrize("arch", list(ARCH_TEMPLATE))
def test_llama_cpp_gives_predicts_greedy_tokens(arch, runs, f32, tmp_path):
    run = runs[arch]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"instruction": p, "output": "x"}, ensure_ascii=False) + "\n"
                            for p in PROMPTS), encoding="utf-8")
    preds = run_predict(run, data, out=tmp_path / "pred.jsonl", params=GenerationParams(max_new_tokens=MAX_NEW),
                        batch_size=1, evaluate=False)
    rows = [json.loads(line) for line in preds.read_text(encoding="utf-8").splitlines()]
    predicted = [r["predict"] for r in rows]

    engine = Engine.from_run(run, device="cpu")
    prompts = [engine.encode_messages([{"role": "user", "content": p}]) for p in PROMPTS]
    assert [engine.tokenizer.decode(p) for p in prompts] == [r["input"] for r in rows]  # predict's prompts
    want = [g.token_ids for g in engine.generate(prompts, GenerationParams(max_new_tokens=MAX_NEW), batch_size=1)]
    assert [engine.decode(ids) for ids in want] == predicted  # the same decoding as `domaintune predict`

    llm = llama(f32[arch], logits_all=True)
    got = [llama_greedy(llm, p) for p in prompts]
    assert got == want
    assert [engine.decode(ids) for ids in got] == predicted
    assert sum(map(len, got)) > 2 * len(PROMPTS)  # real generations, not immediate stops

    # The logits themselves, over prompt + answer: the f32 file computes what transformers computes.
    seq = prompts[0] + want[0]
    ours = llama_logits(llm, seq)
    with torch.no_grad():
        theirs = engine.model(torch.tensor([seq])).logits[0].float().numpy()
    n_vocab = theirs.shape[1]
    assert ours.shape == (len(seq), n_vocab)
    assert np.abs(ours - theirs).max() < 1e-3


def top1(llm: Llama, seqs: list[list[int]]) -> list[np.ndarray]:
    out = []
    for seq in seqs:
        out.append(llama_logits(llm, seq).argmax(axis=1))
    return out


def test_q8_0_loads_generates_and_agrees_with_f16(runs, tmp_path):
    """q8_0 stores each block of 32 weights as int8 with one f16 scale (relative error about 0.4%). Measured
    top-1 agreement with f16: 1.000 for llama, qwen2 and bloom (193, 268 and 418 positions). The threshold, 0.95,
    leaves room for the odd flip where two logits of these random micro models nearly tie (another CPU, another
    llama.cpp build), and still fails a broken quantisation (wrong block layout or scale), which agrees at
    about 1/vocab."""
    for arch, run in runs.items():
        f16 = run_export_gguf(run, tmp_path / arch / "f16", quant="f16")
        q8 = run_export_gguf(run, tmp_path / arch / "q8", quant="q8_0")
        assert q8.name.endswith("-q8_0.gguf") and f16.name.endswith("-f16.gguf")
        assert q8.stat().st_size < 0.75 * f16.stat().st_size
        engine = Engine.from_run(run, device="cpu")
        prompts = [engine.encode_messages([{"role": "user", "content": p}]) for p in PROMPTS]
        llm_q8, llm_f16 = llama(q8, logits_all=True), llama(f16, logits_all=True)
        answers = [llama_greedy(llm_q8, p) for p in prompts]
        assert sum(map(len, answers)) > 0
        seqs = [p + a for p, a in zip(prompts, answers, strict=True)]
        agree = np.concatenate([a == b for a, b in zip(top1(llm_q8, seqs), top1(llm_f16, seqs), strict=True)])
        print(f"{arch}: q8_0 vs f16 top-1 agreement {agree.mean():.3f} over {agree.size} positions")
        assert agree.mean() >= 0.95


@pytest.mark.parametrize("arch", list(ARCH_TEMPLATE))
def test_embedded_chat_template_sends_the_training_prompt(arch, runs, f32):
    """llama-cpp-python's chat completion renders the GGUF's tokenizer.chat_template; the tokens it evaluates
    are the ones training used (Template.encode, with the run's data.system rule)."""
    engine = Engine.from_run(runs[arch], device="cpu")
    llm = llama(f32[arch])
    assert llm.metadata["tokenizer.chat_template"] == engine.template.chat_template_for(engine.tokenizer)
    for messages in (SINGLE, MULTI):
        llm.reset()
        llm.create_chat_completion(messages=messages, max_tokens=1, temperature=0.0)
        sent = llm.input_ids[: llm.n_tokens].tolist()
        want, _ = engine.template.encode(engine.tokenizer, with_system(messages, engine.default_system),
                                         add_generation_prompt=True)
        assert sent == want == engine.encode_messages(messages)


def test_gguf_metadata(runs, f32):
    from gguf import GGUFReader

    engine = Engine.from_run(runs["qwen2"], device="cpu")
    r = GGUFReader(f32["qwen2"])
    fields = {k: f.contents() for k, f in r.fields.items()}
    tok = engine.tokenizer
    assert fields["general.architecture"] == "qwen2"
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "qwen2"
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert fields["tokenizer.ggml.eot_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")  # ChatML's turn end
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert len(fields["tokenizer.ggml.tokens"]) == engine.model.config.vocab_size
    assert fields["general.sampling.temp"] == pytest.approx(PRESETS["chat"].temperature)
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names  # tied embeddings: llama.cpp reuses them
    llama_fields = GGUFReader(f32["llama"]).fields
    assert llama_fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert "output.weight" in {t.name for t in GGUFReader(f32["llama"]).tensors}


# ------------------------------------------------------------------ the Modelfile
class GoTemplate:
    """Renders the Go text/template subset the Modelfile uses: text, string literals, .Field, variables
    ($x := v, $x = v), if / else if / else / end with eq and not, range over a list, and {{- -}} trimming."""

    # An action: {{ [-] words and "strings" (which may hold braces, as in Go's lexer) [-] }}
    TOKEN = re.compile(r'\{\{(-?)\s*((?:"(?:[^"\\]|\\.)*"|[^"}])*?)\s*(-?)\}\}', re.S)

    def __init__(self, src: str):
        parts, pos, trim_next = [], 0, False
        for m in self.TOKEN.finditer(src):
            text = src[pos:m.start()]
            if trim_next:
                text = text.lstrip(" \t\r\n")
            if m.group(1):
                text = text.rstrip(" \t\r\n")
            parts += [("text", text), ("act", m.group(2))]
            trim_next, pos = bool(m.group(3)), m.end()
        tail = src[pos:]
        parts.append(("text", tail.lstrip(" \t\r\n") if trim_next else tail))
        self.body, rest = self._parse(parts, 0)
        assert rest == len(parts), "unbalanced end"

    def _parse(self, parts, i, stop=("end",)):
        nodes = []
        while i < len(parts):
            kind, s = parts[i]
            if kind == "act" and (s in stop or s.startswith("else")):
                return nodes, i
            if kind == "act" and s.startswith("if "):
                branches, i = [], i + 1
                cond = s[3:]
                while True:
                    body, i = self._parse(parts, i)
                    branches.append((cond, body))
                    s = parts[i][1]
                    i += 1
                    if s == "end":
                        break
                    cond = s[len("else if "):] if s.startswith("else if ") else "true"
                nodes.append(("if", branches))
                continue
            if kind == "act" and s.startswith("range "):
                body, i = self._parse(parts, i + 1)
                assert parts[i][1] == "end"
                nodes.append(("range", s[6:], body))
                i += 1
                continue
            nodes.append((kind, s))
            i += 1
        return nodes, i

    def render(self, data: dict) -> str:
        out: list[str] = []
        self._run(self.body, data, {"$": data}, out)
        return "".join(out)

    def _value(self, expr: str, dot: dict, vars_: dict):
        expr = expr.strip()
        if expr.startswith('"'):
            return json.loads(expr)
        if expr in ("true", "false"):
            return expr == "true"
        if expr.startswith("$"):
            return vars_[expr]
        if expr.startswith("."):
            return dot.get(expr[1:], "")
        if expr.startswith("not "):
            return not self._value(expr[4:], dot, vars_)
        if expr.startswith("eq "):
            a, b = re.match(r'eq (\S+) (".*")$', expr).groups()
            return self._value(a, dot, vars_) == json.loads(b)
        raise AssertionError(f"unsupported expression {expr!r}")

    def _run(self, nodes, dot, vars_, out):
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "if":
                for cond, body in node[1]:
                    if self._value(cond, dot, vars_):
                        self._run(body, dot, vars_, out)
                        break
            elif node[0] == "range":
                for item in self._value(node[1], dot, vars_) or []:
                    self._run(node[2], item, vars_, out)
            elif m := re.match(r"(\$\w+) :?= (.+)$", node[1]):
                vars_[m.group(1)] = self._value(m.group(2), dot, vars_)
            else:
                out.append(str(self._value(node[1], dot, vars_)))


def test_go_template_renderer_follows_go_semantics():
    """The renderer itself, on cases whose Go output is known (text/template's documented trimming)."""
    t = GoTemplate('{{- $f := true }}\n{{- range .Messages }}{{ if not $f }}, {{ end }}{{ .Content }}'
                   '{{- $f = false }}{{ end }} x  {{- " y" }}  {{ "}} {{" -}}  z')
    assert t.render({"Messages": [{"Content": "a"}, {"Content": "b"}]}) == "a, b x y  }} {{z"


def parse_modelfile(text: str) -> dict:
    out: dict = {"PARAMETER": []}
    for m in re.finditer(r'^(FROM|TEMPLATE|SYSTEM|PARAMETER)\s+(?:(\w+)\s+)?("""(.*?)"""|"(.*?)"|(\S+))\s*$',
                         text, re.S | re.M):
        key, pname, _, triple, quoted, bare = m.groups()
        value = triple if triple is not None else quoted if quoted is not None else bare
        if key == "PARAMETER":
            out["PARAMETER"].append((pname, value))
        else:
            out[key] = value if pname is None else f"{pname} {value}"
    return out


def expected_text(tpl, tok, messages) -> str:
    """The prompt as text, from the template's own segments (EOS as its token text)."""
    return "".join(tok.eos_token if s is EOS else s for s, _ in tpl.segments(messages, add_generation_prompt=True))


@pytest.mark.parametrize("arch", list(ARCH_TEMPLATE))
def test_modelfile_template_renders_the_training_prompt(arch, runs, f32):
    engine = Engine.from_run(runs[arch], device="cpu")
    tpl, tok = engine.template, engine.tokenizer
    text = (f32[arch].parent / "Modelfile").read_text(encoding="utf-8")
    mf = parse_modelfile(text)
    assert mf["FROM"] == f"./{f32[arch].name}"
    go = GoTemplate(mf["TEMPLATE"])
    for messages in (MULTI, SINGLE):
        # Ollama: .System is the request's system message, else the Modelfile's SYSTEM; .Messages the turns.
        system = messages[0]["content"] if messages[0]["role"] == "system" else mf.get("SYSTEM", "")
        rendered = go.render({"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]}
                                                              for m in messages]})
        assert rendered == expected_text(tpl, tok, messages)
        ids, _ = tpl.encode(tok, messages, add_generation_prompt=True)
        bos = [tok.bos_token_id] if ids[:1] == [tok.bos_token_id] else []  # llama.cpp adds BOS itself
        assert bos + tok(rendered, add_special_tokens=False)["input_ids"] == ids
    params = mf["PARAMETER"]
    stops = [v for k, v in params if k == "stop"]
    assert stops == list(dict.fromkeys([*tpl.stop, tok.eos_token]))
    chat = PRESETS["chat"]
    assert ("temperature", str(chat.temperature)) in params and ("top_p", str(chat.top_p)) in params
    assert ("repeat_penalty", str(chat.repetition_penalty)) in params
    assert ("num_predict", str(chat.max_new_tokens)) in params
    if tpl.default_system:
        assert mf["SYSTEM"] == tpl.default_system
    else:
        assert "SYSTEM" not in mf


def test_modelfile_survives_literals_that_look_like_go():
    """Literals with braces, quotes, backslashes and trailing newlines come out of the Go template unchanged."""
    from domaintune.data.templates import Template
    from domaintune.inference.modelfile import ollama_template

    tpl = Template(name="odd", system_format="{{sys}} \\n\"{content}\"\n", user_format="Q {{x}}:\n{content}\n\nA:\n",
                   assistant_format="{content}", turn_separator="\n---\n")
    go = GoTemplate(ollama_template(tpl, "</s>"))
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    rendered = go.render({"System": "S", "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})
    assert rendered == ('{{sys}} \\n"S"\nQ {{x}}:\nq1\n\nA:\na1</s>\n---\nQ {{x}}:\nq2\n\nA:\n')


def test_modelfile_adds_no_second_eos_when_the_answer_ends_with_it(qwen_tok):
    """ChatML with an <|im_end|> EOS (Qwen's instruct tokenizers): encode() adds no second EOS after an answer,
    and neither does the Modelfile."""
    import copy

    from domaintune.inference.modelfile import ollama_template

    tok = copy.deepcopy(qwen_tok)
    tok.eos_token = "<|im_end|>"
    tpl = get_template("chatml")
    go = GoTemplate(ollama_template(tpl, tok.eos_token))
    rendered = go.render({"System": MULTI[0]["content"], "Messages": [{"Role": m["role"], "Content": m["content"]}
                                                                       for m in MULTI]})
    ids, _ = tpl.encode(tok, MULTI, add_generation_prompt=True)
    assert tok(rendered, add_special_tokens=False)["input_ids"] == ids
    assert "<|im_end|><|im_end|>" not in rendered


def test_data_system_is_the_default_system(tiny_train_config, tmp_path):
    """A run trained with data.system: the GGUF's chat template and the Modelfile's SYSTEM use it."""
    run = run_train(tiny_train_config(tmp_path / "run", "qwen2", "data.template=chatml",
                                      "data.system=你是育儿助手。", "train.max_steps=1"))
    path = run_export_gguf(run, tmp_path / "out", quant="f32")
    assert parse_modelfile((path.parent / "Modelfile").read_text(encoding="utf-8"))["SYSTEM"] == "你是育儿助手。"
    engine = Engine.from_run(run, device="cpu")
    llm = llama(path)
    llm.create_chat_completion(messages=SINGLE, max_tokens=1, temperature=0.0)
    assert llm.input_ids[: llm.n_tokens].tolist() == engine.encode_messages(SINGLE)
    assert "你是育儿助手。" in engine.decode(engine.encode_messages(SINGLE))


def test_tokenizer_kind_template_writes_no_go_template(tiny_train_config, tmp_path):
    run = run_train(tiny_train_config(tmp_path / "run", "qwen2", "data.template=tokenizer", "train.max_steps=1"))
    path = run_export_gguf(run, tmp_path / "out", quant="f32")
    mf = (path.parent / "Modelfile").read_text(encoding="utf-8")
    assert "TEMPLATE" not in parse_modelfile(mf) and "tokenizer.chat_template" in mf
    engine = Engine.from_run(run, device="cpu")
    llm = llama(path)
    llm.create_chat_completion(messages=SINGLE, max_tokens=1, temperature=0.0)
    assert llm.input_ids[: llm.n_tokens].tolist() == engine.encode_messages(SINGLE)


# ------------------------------------------------------------------ refusals and files
def test_refusals(runs, f32, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    with pytest.raises(UserError, match=r"GPT2LMHeadModel \(model type 'gpt2'\) has no GGUF conversion here "
                                        r"\(domaintune writes GGUF for bloom, llama, mistral, qwen2, qwen3, .*\); "
                                        r"export safetensors"):
        run_export_gguf(gpt2, tmp_path / "g")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="has no final weights"):
        run_export_gguf(empty, tmp_path / "x")
    out = Path(shutil.copytree(f32["qwen2"].parent, tmp_path / "taken"))
    with pytest.raises(UserError, match=r"run-f32.gguf and .*Modelfile already exist: choose another --out, or "
                                        r"pass --overwrite to replace the GGUF file and the Modelfile"):
        run_export_gguf(runs["qwen2"], out, quant="f32")
    (out / "Modelfile").unlink()
    with pytest.raises(UserError, match=r"run-f32.gguf already exists: "):
        run_export_gguf(runs["qwen2"], out / "run-f32.gguf", quant="f16")  # an explicit file name, taken
    with pytest.raises(UserError, match="must be outside the run directory"):
        run_export_gguf(runs["qwen2"], runs["qwen2"] / "model.gguf")
    with pytest.raises(UserError, match="--quant 'q4_k_m': choose one of f32, f16, bf16, q8_0"):
        run_export_gguf(runs["qwen2"], tmp_path / "q", quant="q4_k_m")
    assert main(["export", str(runs["qwen2"]), "--out", str(out / "run-f32.gguf"), "--format", "gguf"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(runs["qwen2"]), "--out", str(tmp_path / "s"), "--quant", "q8_0"]) == 2
    assert "--quant applies to --format gguf" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_overwrite_keeps_other_files(runs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")  # a folder with other things: written beside, never deleted
    assert main(["export", str(runs["bloom"]), "--out", str(out), "--format", "gguf", "--quant", "f32"]) == 0
    assert "ollama create run -f Modelfile" in capsys.readouterr().err
    assert main(["export", str(runs["bloom"]), "--out", str(out / "tuned.gguf"), "--format", "gguf",
                 "--quant", "bf16", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "notes.txt", "run-f32.gguf", "tuned.gguf"]
    assert (out / "notes.txt").read_text() == "keep me"
    assert parse_modelfile((out / "Modelfile").read_text(encoding="utf-8"))["FROM"] == "./tuned.gguf"
    engine = Engine.from_run(runs["bloom"], device="cpu")
    prompt = engine.encode_messages(SINGLE)
    assert llama_greedy(llama(out / "tuned.gguf"), prompt, 4)  # bf16 loads and generates


def test_an_interrupted_export_leaves_no_file(runs, tmp_path, monkeypatch):
    calls = []

    def failing(gguf, arr, qtype):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(gguf, arr, qtype)

    real = gguf_export._encode
    monkeypatch.setattr(gguf_export, "_encode", failing)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_export_gguf(runs["llama"], out, quant="f16")
    assert list(out.iterdir()) == []  # no .gguf, no .partial, no Modelfile pointing at nothing


KILL_AT_THE_MODELFILE = """
import os, signal, sys
from domaintune.inference.gguf_export import run_export_gguf
real = os.replace
def replace(src, dst):  # SIGKILL just after the GGUF got its name
    real(src, dst)
    if str(dst).endswith(".gguf"):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
run_export_gguf(sys.argv[1], sys.argv[2], quant="f32")
"""


def test_a_kill_between_the_gguf_and_the_modelfile_is_finished_by_the_rerun(runs, f32, tmp_path, capsys):
    """Regression: a kill between the two files left a complete .gguf, no Modelfile and a stray Modelfile.tmp.
    Now the Modelfile is written whole before the GGUF is renamed, and the rerun moves it into place."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILL_AT_THE_MODELFILE, str(runs["llama"]), str(out)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile.partial", "run-f32.gguf"]
    assert run_export_gguf(runs["llama"], out, quant="f32") == out / "run-f32.gguf"  # the same command again
    assert "moved its Modelfile into place" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "run-f32.gguf"]
    assert (out / "Modelfile").read_bytes() == (f32["llama"].parent / "Modelfile").read_bytes()
    assert (out / "run-f32.gguf").read_bytes() == f32["llama"].read_bytes()


def test_a_kill_before_the_gguf_is_renamed_changes_nothing(runs, f32, tmp_path, capsys):
    """Killed after both temporary files were written but before the renames (an --overwrite of an existing
    pair): the previous pair stays as it was, and the next export removes the two temporary files."""
    out = Path(shutil.copytree(f32["qwen2"].parent, tmp_path / "out"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "run-f32.gguf.partial").write_bytes(b"GGUF, complete or not")
    (out / "Modelfile.partial").write_text("FROM ./run-f32.gguf\n", encoding="utf-8")
    with pytest.raises(UserError, match="already exist"):  # no --overwrite: refused, after tidying up
        run_export_gguf(runs["qwen2"], out, quant="f32")
    assert "removed the unfinished files an interrupted export left" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("where", ["tensor", "modelfile"])
def test_a_full_disk_is_one_line_and_keeps_the_previous_pair(where, runs, f32, tmp_path, monkeypatch, capsys):
    """Regression: a full disk during the GGUF export was a traceback."""
    from domaintune.inference import modelfile

    out = Path(shutil.copytree(f32["bloom"].parent, tmp_path / "out"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    if where == "tensor":  # numpy's tofile on a full disk: an OSError without errno (seen on a 2 MB tmpfs)
        real = gguf_export._encode
        calls = []

        def encode(gguf, arr, qtype):
            calls.append(1)
            if len(calls) == 3:
                raise OSError("4194304 requested and 262144 written")
            return real(gguf, arr, qtype)

        monkeypatch.setattr(gguf_export, "_encode", encode)
    else:
        def write_modelfile(path, text):
            path.write_text(text[:10], encoding="utf-8")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(modelfile, "write_modelfile", write_modelfile)
    assert main(["export", str(runs["bloom"]), "--out", str(out), "--format", "gguf", "--quant", "f32",
                 "--overwrite"]) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert "Traceback" not in err and last.startswith(f"error: '{out / 'run-f32.gguf'}': ")
    assert last.endswith("Nothing was written (the previous run-f32.gguf and Modelfile are unchanged). Free some "
                         "space (or choose another --out) and run the same command again")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no .partial left, the old pair intact


def test_pre_tokenizer_names():
    def seq(regex):
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}}

    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    for regex, name in PRE_TOKENIZERS.items():
        if regex:
            assert pre_tokenizer_name(seq(regex)) == name
    with pytest.raises(UserError, match="pre-tokenizer is not one llama.cpp is known to reproduce"):
        pre_tokenizer_name(seq(r"\p{N}+|[^\s]+"))
    with pytest.raises(UserError, match="pre-tokenizer"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace"}})


def test_llama3_rope_factors_match_transformers():
    """The rope_freqs tensor written for Llama 3.1+ equals transformers' own llama3 scaling."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    got = torch.tensor(gguf_arch.llama3_rope_factors(cfg.to_dict()))
    assert torch.allclose(plain / scaled, got, rtol=1e-4)
    assert got.min() == 1.0 and got.max() == 32.0


def test_tokenizer_and_modelfile_refusals_come_before_any_file(tiny_run_copy, tiny_train_config, tmp_path,
                                                                monkeypatch):
    """A tokenizer llama.cpp would split differently is refused before the model loads and merges; a system
    prompt a Modelfile cannot hold is refused before the GGUF is written."""
    import domaintune.inference.export as export

    tj_path = tiny_run_copy / "tokenizer.json"
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{N}+|[^\s]+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    tj_path.write_text(json.dumps(tj), encoding="utf-8")
    tc_path = tiny_run_copy / "tokenizer_config.json"  # the generic class keeps tokenizer.json's pipeline as written
    tc_path.write_text(json.dumps({**json.loads(tc_path.read_text(encoding="utf-8")),
                                   "tokenizer_class": "PreTrainedTokenizerFast"}), encoding="utf-8")
    monkeypatch.setattr(export, "_torch_dtype", lambda *a: pytest.fail("the model was loaded before the check"))
    with pytest.raises(UserError, match="pre-tokenizer is not one llama.cpp is known to reproduce"):
        run_export_gguf(tiny_run_copy, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    monkeypatch.undo()

    run = run_train(tiny_train_config(tmp_path / "quoted", "qwen2", 'data.system=Say """hi"""', "train.max_steps=1"))
    with pytest.raises(UserError, match='contains """'):
        run_export_gguf(run, tmp_path / "b", quant="f32")
    assert not (tmp_path / "b").exists() or list((tmp_path / "b").iterdir()) == []
