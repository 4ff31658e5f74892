"""tiny.py: offline tiny models load like any downloaded checkpoint, deterministically, with a licensed card."""
from __future__ import annotations

from pathlib import Path

import pytest

from domaintune.errors import UserError
from domaintune.training.model import model_license
from domaintune.training.tiny import ARCHS, SIZES, make_tiny_model

CHATML_PROMPT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def micro(tiny_model_dir):
    """conftest builds them with `make_tiny_model(out, arch, "micro", seed=0)`."""
    return {arch: tiny_model_dir(arch) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_micro_model_loads_with_plain_auto_classes(micro, arch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = micro[arch]
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    hidden, layers, *_ = SIZES["micro"]
    assert model.config.model_type == arch
    assert model.config.hidden_size == hidden
    assert model.config.num_hidden_layers == layers
    assert model.config.vocab_size % 8 == 0 and len(tok) <= model.config.vocab_size < len(tok) + 8
    assert model.config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("</s>")
    # Weights are safetensors only.
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))

    ids = tok("你好 hello", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()

    # The ChatML markers are single special tokens, and the chat_template renders ChatML.
    assert len(tok("<|im_end|>", add_special_tokens=False)["input_ids"]) == 1
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True) == CHATML_PROMPT


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_mimics_its_family(micro, arch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(micro[arch])
    with_special = tok("abc")["input_ids"]
    without = tok("abc", add_special_tokens=False)["input_ids"]
    if arch == "llama":  # adds BOS, ships without a pad token
        assert with_special == [tok.bos_token_id] + without
        assert tok.pad_token is None
    else:  # BLOOM / Qwen2 add no BOS and have a pad token
        assert with_special == without
        assert tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id
    assert tok.decode(without) == "abc"


def test_small_size_has_a_few_million_parameters(tmp_path):
    from transformers import AutoModelForCausalLM

    out = make_tiny_model(tmp_path / "small", "qwen2", size="small")
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(out).parameters())
    assert 2_000_000 < n < 6_000_000, n


def test_same_seed_gives_identical_files_other_seed_other_weights(tmp_path):
    from safetensors.torch import load_file

    a = make_tiny_model(tmp_path / "a", "llama", size="micro", seed=3)
    b = make_tiny_model(tmp_path / "b", "llama", size="micro", seed=3)
    c = make_tiny_model(tmp_path / "c", "llama", size="micro", seed=4)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    wa, wc = load_file(a / "model.safetensors"), load_file(c / "model.safetensors")
    assert wa.keys() == wc.keys()
    assert not all((wa[k] == wc[k]).all() for k in wa)
    # The tokenizer does not depend on the seed: only the weights do.
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_model_card_license_is_read_by_model_license(micro):
    for arch in ARCHS:
        assert model_license(str(micro[arch])) == "apache-2.0"
    text = (micro["qwen2"] / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\nlicense: apache-2.0\n")


def test_unknown_arch_or_size_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--arch 'gpt2': choose one of bloom, qwen2, llama"):
        make_tiny_model(tmp_path / "x", "gpt2")
    with pytest.raises(UserError, match="--size 'huge': choose one of micro, small"):
        make_tiny_model(tmp_path / "x", "qwen2", size="huge")
    assert not (tmp_path / "x").exists()


def test_make_tiny_model_verb(tmp_path, capsys):
    import json

    from domaintune.cli import main

    out = tmp_path / "cli-model"
    assert main(["make-tiny-model", str(out), "--arch", "bloom", "--size", "micro", "--seed", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert cfg["model_type"] == "bloom" and cfg["hidden_size"] == SIZES["micro"][0]
    assert model_license(str(out)) == "apache-2.0"


def test_tokenizer_corpus_defaults_to_the_bundled_sample_data():
    from domaintune.bundled import sample_data_dir
    from domaintune.training.tiny import corpus_texts, default_corpus

    files = default_corpus()
    repo = Path(__file__).resolve().parents[2] / "examples" / "data"
    assert files == sorted(sample_data_dir().glob("*.jsonl")) and [f.name for f in files] == \
        ["chat.jsonl", "preferences.jsonl", "seeds.jsonl", "test.jsonl", "train.jsonl"]
    assert [f.read_bytes() for f in files] == [(repo / f.name).read_bytes() for f in files]
    texts = corpus_texts(files)
    assert len(texts) > 100 and any("孩子" in t for t in texts)


def test_corpus_texts_reads_like_the_training_data(tmp_path):
    """Regression: corpus_texts split lines with str.splitlines(), so a value holding U+2028 (written raw by
    json.dumps(ensure_ascii=False)) crashed with a JSONDecodeError; it now reads through data.reader.read_records."""
    import json

    from domaintune.training.tiny import corpus_texts

    jl = tmp_path / "a.jsonl"
    jl.write_text("\ufeff" + json.dumps({"instruction": "一\u2028二", "output": "三\x85四"}, ensure_ascii=False)
                  + "\r\n\r\n" + json.dumps({"messages": [{"role": "user", "content": "五"}]}) + "\n", encoding="utf-8")
    arr = tmp_path / "b.json"
    arr.write_text(json.dumps([{"instruction": "六", "history": [["七", "八"]]}], ensure_ascii=False), encoding="utf-8")
    assert corpus_texts([jl, arr]) == ["一\u2028二", "三\x85四", "user", "五", "六", "七", "八"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n{"instruction": \n', encoding="utf-8")
    with pytest.raises(UserError, match=f"{bad} line 2: not valid JSON"):
        corpus_texts([bad])
