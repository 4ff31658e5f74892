"""GGUF for every family (issue 23): a LoRA run on each family's tiny model, trained with the family's own chat
template (`data.template: tokenizer`), exported to f32 GGUF and loaded by llama.cpp (llama-cpp-python):

- its greedy tokens equal `domaintune predict`'s, token for token, on 5 prompts, and its logits equal
  transformers' (the rules of gguf_arch.py: q/k norms, stacked experts, Gated DeltaNet layers, Gemma's norms,
  fused projections, partial rotary);
- its tokenizer gives the HF tokenizer's ids, on Chinese text and on characters outside the tiny vocabulary
  (byte fallback): byte-level vocabularies as llama.cpp's "gpt2" tokenizer, SentencePiece-style ones as its
  "llama" tokenizer (gguf_spm.py);
- its embedded chat template, rendered by llama-cpp-python for a conversation, sends the training prompt's ids;
- what stays unsupported is refused with the reason and the way out.

The original three families (llama, qwen2, bloom) are tested in test_gguf.py. Exported files are shared by the
module; the runs train on single-turn rows (multi-turn training with these templates is issue 23 item 2).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from llama_cpp import Llama

import llama_cpp_run
from domaintune.cli import main
from domaintune.errors import UserError
from domaintune.families import TINY, family_of
from domaintune.inference import gguf_arch, gguf_spm
from domaintune.inference.engine import Engine
from domaintune.inference.gguf_export import run_export_gguf
from domaintune.inference.params import GenerationParams
from domaintune.inference.predict import run_predict
from domaintune.training.trainer import run_train
from llama_cpp_run import llama, llama_logits

FAMILIES = ("qwen3", "qwen3_moe", "qwen3_5", "llama3", "gemma3", "mistral", "phi3", "glm4")
PROMPTS = ["孩子不爱吃饭怎么办", "How do I help my child sleep?", "怎样培养阅读习惯",
           "孩子总是拖延写作业，我该怎么做？", "Is screen time before bed harmful?"]
# Outside the tiny vocabularies: byte fallback (SentencePiece-style) and byte-level pieces.
ODD = ["龘靐齉 𠀀 ✨🦙 Ωmega ñandú", "  two  spaces\n\nand\ttabs ", "3.14159 ２０２４年 「引号」"]
SINGLE = [{"role": "user", "content": "孩子不睡觉怎么办"}]
MULTI = [{"role": "user", "content": "孩子不睡觉怎么办"},
         {"role": "assistant", "content": "可以先建立固定的睡前流程。"},
         {"role": "user", "content": "What else can I try? 🦙"}]
MAX_NEW = 16


def with_layers(src, dst, layer_types: list[str]):
    """A copy of a tiny model with another layer layout (the same weights)."""
    shutil.copytree(src, dst)
    conf = json.loads((dst / "config.json").read_text(encoding="utf-8"))
    (dst / "config.json").write_text(json.dumps({**conf, "layer_types": layer_types}, indent=2), encoding="utf-8")
    return dst


ROWS = [("孩子不爱吃饭怎么办？", "定时定量，少吃零食，饭前不喝饮料。"),
        ("How much should a toddler sleep?", "About 11 to 14 hours."),
        ("宝宝几个月可以吃辅食", "一般在六个月左右开始添加辅食。"),
        ("Is juice good for kids?", "Water and milk are better."),
        ("孩子发烧怎么办？", "先量体温，多喝温水，超过三天去医院。"),
        ("How do I stop tantrums?", "Stay calm and name the feeling."),
        ("怎样培养阅读习惯", "每天固定时间一起读书。"),
        ("When should kids brush teeth?", "Twice a day, for two minutes.")]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tiny_train_config, tmp_path_factory):
    """A LoRA run per family: 2 steps at the shared high learning rate on single-turn rows, with the family's own
    template."""
    root = tmp_path_factory.mktemp("gguf-fam")
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": a}, ensure_ascii=False) + "\n" for q, a in ROWS),
                    encoding="utf-8")
    return {arch: run_train(tiny_train_config(root / arch, arch, "data.template=tokenizer", f"data.path={data}",
                                              "data.val_size=0", "train.max_steps=2", "train.eval_steps=2",
                                              "train.save_steps=2"))
            for arch in FAMILIES}


@pytest.fixture(scope="module")
def f32(runs, tmp_path_factory):
    return {arch: run_export_gguf(run, tmp_path_factory.mktemp(f"gguf-fam-f32-{arch}") / "out", quant="f32")
            for arch, run in runs.items()}


@pytest.fixture(scope="module")
def engines(runs):
    return {arch: Engine.from_run(run, device="cpu") for arch, run in runs.items()}


def llama_greedy(llm: Llama, prompt: list[int], n: int = MAX_NEW) -> list[int]:
    return llama_cpp_run.llama_greedy(llm, prompt, n)


@pytest.mark.parametrize("arch", FAMILIES)
def test_llama_cpp_gives_predicts_greedy_tokens(arch, runs, f32, engines, tmp_path):
    run, engine = runs[arch], engines[arch]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"instruction": p, "output": "x"}, ensure_ascii=False) + "\n"
                            for p in PROMPTS), encoding="utf-8")
    params = GenerationParams(max_new_tokens=MAX_NEW)
    preds = run_predict(run, data, out=tmp_path / "pred.jsonl", params=params, batch_size=1, evaluate=False)
    predicted = [json.loads(line)["predict"] for line in preds.read_text(encoding="utf-8").splitlines()]
    prompts = [engine.encode_messages([{"role": "user", "content": p}]) for p in PROMPTS]
    want = [g.token_ids for g in engine.generate(prompts, params, batch_size=1)]
    assert [engine.decode(ids) for ids in want] == predicted  # the engine decodes as `domaintune predict`

    llm = llama(f32[arch], logits_all=True)
    got = [llama_greedy(llm, p) for p in prompts]
    assert got == want
    assert sum(map(len, got)) > 2 * len(PROMPTS)  # real generations, not immediate stops

    # The logits over prompt + answer: the f32 file computes what transformers computes.
    seq = prompts[1] + want[1]
    ours = llama_logits(llm, seq)
    with torch.no_grad():
        theirs = engine.model(torch.tensor([seq])).logits[0].float().numpy()
    # f32 sums in another order: measured 1e-4 to 1.7e-3 (MoE, Gemma 3); each wrong rule met while writing
    # gguf_arch.py was 1e-2 or more (M-RoPE sections 1e-2, value-head order 1e-1, Gemma 3's layer layout 0.5).
    diff = np.abs(ours - theirs).max()
    print(f"{arch}: logits within {diff:.1e} of transformers' (largest {np.abs(theirs).max():.1f})")
    assert diff < 2e-3


@pytest.mark.parametrize("arch", FAMILIES)
def test_tokenizer_gives_the_hf_ids(arch, engines, f32):
    """Chinese, English and characters outside the tiny vocabulary, as raw text and inside the chat template's
    prompt. A Metaspace "first" tokenizer (transformers 5's Mistral and Phi-3: "▁" only before text at the very
    start) matches on the template's prompts, which start with a special token; raw text then lacks that "▁"
    (gguf_spm.py says why), so its raw text is compared after a special token."""
    tok = engines[arch].tokenizer
    llm = llama(f32[arch], vocab_only=True)
    first = TINY[arch].tokenizer == "spm" and gguf_spm.space_rule(json.loads(tok.backend_tokenizer.to_str())) == "first"
    lead = tok.bos_token if first else ""
    for text in PROMPTS + ODD:
        want = tok(lead + text, add_special_tokens=not first)["input_ids"]
        got = llm.tokenize((lead + text).encode(), add_bos=want[:1] == [tok.bos_token_id] and not first, special=True)
        assert got == want, (text, tok.convert_ids_to_tokens(want), [llm.detokenize([t]) for t in got])
        rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == \
            tok(rendered, add_special_tokens=False)["input_ids"]
    odd = tok(ODD[0], add_special_tokens=False)["input_ids"]
    if TINY[arch].tokenizer == "spm":  # byte fallback really happened
        assert any(t.startswith("<0x") for t in tok.convert_ids_to_tokens(odd))


@pytest.mark.parametrize("arch", FAMILIES)
def test_embedded_chat_template_sends_the_training_prompt(arch, engines, f32):
    """llama-cpp-python's chat completion renders the GGUF's tokenizer.chat_template (the family's official one);
    the tokens it evaluates are the ones training and predict use."""
    engine, tok = engines[arch], engines[arch].tokenizer
    # The GGUF's own template, as `llama-server --jinja` renders it: llama-cpp-python would otherwise swap an
    # official template it recognises (Mistral's) for its built-in formatter, which drops the space after </s>.
    llm = llama(f32[arch], chat_format="chat_template.default")
    assert llm.metadata["tokenizer.chat_template"] == engine.template.chat_template_for(tok)
    for messages in (SINGLE, MULTI):
        llm.reset()
        llm.create_chat_completion(messages=messages, max_tokens=1, temperature=0.0)
        sent = llm.input_ids[: llm.n_tokens].tolist()
        # The GGUF's part: llama.cpp sends the official template's rendering, tokenized as the HF tokenizer does.
        official = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"]
        assert sent == official
        assert sent == engine.encode_messages(messages)  # training's and predict's prompt


@pytest.mark.parametrize("arch", FAMILIES)
def test_metadata(arch, engines, f32):
    from gguf import GGUFReader, TokenType

    engine = engines[arch]
    fields = {k: f.contents() for k, f in GGUFReader(f32[arch]).fields.items()}
    assert fields["general.architecture"] == family_of(engine.model.config.model_type).gguf
    spm = TINY[arch].tokenizer == "spm"
    assert fields["tokenizer.ggml.model"] == ("llama" if spm else "gpt2")
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == engine.model.config.vocab_size
    assert fields["tokenizer.ggml.eos_token_id"] == engine.tokenizer.eos_token_id
    if spm:
        assert [tokens[i] for i, t in enumerate(types) if t == TokenType.BYTE] == [f"<0x{b:02X}>" for b in range(256)]
        assert len(fields["tokenizer.ggml.scores"]) == len(tokens)
        # Gemma puts no "▁" before text; the Mistral and Phi-3 tokenizers ("first") with templates that start
        # with a special token need none either (gguf_spm.py)
        assert fields["tokenizer.ggml.add_space_prefix"] is False
    else:
        assert "tokenizer.ggml.merges" in fields and "tokenizer.ggml.scores" not in fields


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3_5"])
def test_q8_0_of_experts_and_linear_attention(arch, runs, f32, engines, tmp_path):
    """q8_0 quantises the stacked 3-D experts along their rows and keeps the router and the Gated DeltaNet
    convolution in F32 (as llama.cpp's converter); the file loads and stays close to f32 (measured: logits within
    0.03, the same top-1 token at every position)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader

    path = run_export_gguf(runs[arch], tmp_path / "q8", quant="q8_0")
    types = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
    if arch == "qwen3_moe":
        assert types["blk.0.ffn_gate_exps.weight"] == types["blk.0.ffn_down_exps.weight"] == Q.Q8_0
        assert types["blk.0.ffn_gate_inp.weight"] == Q.F32
    else:
        assert types["blk.0.ssm_conv1d.weight"] == types["blk.0.ssm_a"] == Q.F32
        assert types["blk.0.attn_qkv.weight"] == Q.Q8_0
    seq = engines[arch].encode_messages([{"role": "user", "content": PROMPTS[1]}])
    logits = []
    for p in (path, f32[arch]):
        logits.append(llama_logits(llama(p, logits_all=True), seq))
    assert np.abs(logits[0] - logits[1]).max() < 0.1
    assert (logits[0].argmax(1) == logits[1].argmax(1)).mean() >= 0.9


# ------------------------------------------------------------------ refusals
def config_of(arch: str, tiny_model_dir, **changes) -> dict:
    conf = json.loads((tiny_model_dir(arch) / "config.json").read_text(encoding="utf-8"))
    return {**conf, **changes}


def test_gemma3_layout_llama_cpp_cannot_express_is_refused(tiny_model_dir, tmp_path, capsys):
    """llama.cpp's Gemma 3 makes every 6th layer full attention; other layouts would compute other answers past
    the sliding window (measured: logits off by 0.5 on the tiny model with a full second layer), so they are
    refused before any weights load, in one line on stderr."""
    model = with_layers(tiny_model_dir("gemma3"), tmp_path / "model", ["sliding_attention", "full_attention"])
    code = main(["export", str(model), "--out", str(tmp_path / "out"), "--format", "gguf"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "error: --format gguf: its full-attention layers are [1], where llama.cpp's Gemma 3 makes every 6th layer "
        "full attention ([]), so llama.cpp's gemma3 would compute other answers than this model; export safetensors "
        "(--format safetensors) and convert that with llama.cpp's convert_hf_to_gguf.py, then check its answers "
        "against `domaintune predict`")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("arch", "changes", "reason"), [
    ("qwen3", {"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"]},
     "qwen2_moe has no tested GGUF conversion here"),
    ("qwen3", {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]},
     r"GPTNeoXForCausalLM \(model type 'gpt_neox'\) has no GGUF conversion here"),
    ("gemma3", {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]},
     "Gemma3ForConditionalGeneration is not converted .*text models only"),
    ("gemma3", {"query_pre_attn_scalar": 32},
     "query_pre_attn_scalar is 32, where llama.cpp's Gemma 3 of 2 layers scales queries by 16"),
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 5e4}}},
     "sliding layers' rope_theta is 50000.0"),
    ("qwen3_moe", {"norm_topk_prob": False}, "norm_topk_prob is false"),
    ("qwen3_moe", {"mlp_only_layers": [0]}, "some of its layers are dense"),
    ("qwen3_5", {"layer_types": ["full_attention", "linear_attention"]}, "are not linear attention with full"),
    ("qwen3_5", {"layer_types": ["full_attention", "full_attention"]}, "it has no linear-attention layer"),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "long_factor": [1.0] * 8,
                                  "short_factor": [1.0] * 8}}, "rope scaling 'longrope' is not supported for phi3"),
])
def test_unsupported_configs_are_refused_with_the_reason(arch, changes, reason, tiny_model_dir):
    with pytest.raises(UserError, match=reason) as e:
        gguf_arch.check(config_of(arch, tiny_model_dir, **changes))
    assert "export safetensors" in str(e.value)  # the way out


def test_supported_configs_pass(tiny_model_dir):
    for arch in FAMILIES:
        conf = config_of(arch, tiny_model_dir)
        assert gguf_arch.check(conf) == family_of(conf["model_type"]).gguf


def spm_json(vocab: list[str], merges: list[tuple[str, str]], **parts) -> dict:
    specials = ["<unk>", "<s>", "</s>"]
    ids = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + vocab)}
    return {"model": {"type": "BPE", "byte_fallback": True, "vocab": ids, "merges": [list(m) for m in merges]},
            "added_tokens": [{"id": i, "content": t, "special": True} for i, t in enumerate(specials)],
            "normalizer": None, "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always",
                                                  "split": False}, **parts}


def test_sentencepiece_vocabularies_llama_cpp_would_split_differently_are_refused():
    """llama.cpp joins any adjacent pair whose text is a token; a merge list without (a, bc) leaves "a" "bc"
    apart where llama.cpp makes "abc"."""
    ok = spm_json(["a", "b", "c", "ab", "bc", "abc"], [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")])
    assert gguf_spm.check_spm(ok)["ab"] == 0.0 and gguf_spm.check_spm(ok)["abc"] == -2.0
    bad = spm_json(["a", "b", "c", "ab", "bc", "abc"], [("b", "c"), ("a", "b"), ("ab", "c")])
    with pytest.raises(UserError, match=r"the text of the token 'abc' is \['a', 'bc'\] for the tokenizer and "
                                        r"\['abc'\] for llama.cpp"):
        gguf_spm.check_spm(bad)
    no_bytes = spm_json(["a"], [])
    no_bytes["model"]["vocab"].pop("<0x41>")
    with pytest.raises(UserError, match="lacks the byte tokens <0x41>"):
        gguf_spm.check_spm(no_bytes)
    with pytest.raises(UserError, match="normalizer / pre-tokenizer is not one llama.cpp's tokenizer reproduces"):
        gguf_spm.check_spm(spm_json(["a"], [], normalizer={"type": "NFKC"}))


def test_phi3_name_rule_follows_the_tokenizer(tiny_model_dir):
    """llama.cpp strips whitespace after special tokens when general.name contains "phi3": the name says so only
    for a tokenizer that strips (Phi-3's), and added tokens that strip otherwise are refused."""
    from transformers import AutoTokenizer

    from domaintune.inference.gguf_vocab import general_name

    tok = AutoTokenizer.from_pretrained(tiny_model_dir("phi3"))
    assert general_name(tok, "Phi3-mini-run") == "phi 3-mini-run"  # this tokenizer keeps its whitespace
    tok.add_special_tokens({"additional_special_tokens": [llama_cpp_token("<|x|>", lstrip=True)]})
    with pytest.raises(UserError, match=r"added tokens <\|x\|> strip the whitespace around them"):
        general_name(tok, "run")


def llama_cpp_token(content: str, **kw):
    from tokenizers import AddedToken

    return AddedToken(content, special=True, normalized=False, **kw)
