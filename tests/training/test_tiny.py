"""tiny.py: offline tiny models load like any downloaded checkpoint, deterministically, with a licensed card."""
from __future__ import annotations

from pathlib import Path

import pytest

from domaintune.errors import UserError
from domaintune.families import TINY, family_of
from domaintune.training.model import model_license
from domaintune.training.tiny import ARCHS, SIZES, make_tiny_model

CHATML_PROMPT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


ORIGINAL = ("qwen2", "llama", "bloom")  # domaintune's ChatML template, the shared ChatML special tokens


@pytest.fixture(scope="module")
def micro(tiny_model_dir):
    """conftest builds them with `make_tiny_model(out, arch, "micro", seed=0)`."""
    return {arch: tiny_model_dir(arch) for arch in ARCHS}


def official_template(source: str) -> str:
    """The template a recipe names, read here straight from the package's files (not through tiny.py)."""
    import importlib.util

    package, _, name = source.partition(":")
    if package == "trl":
        root = Path(importlib.util.find_spec("trl").origin).parent
        return (root / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")
    from llama_cpp import llama_chat_format

    return getattr(llama_chat_format, name)


@pytest.mark.parametrize("arch", ARCHS)
def test_micro_model_loads_with_plain_auto_classes(micro, arch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = TINY[arch]
    out = micro[arch]
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    hidden, layers, *_ = SIZES["micro"]
    assert family_of(model.config.model_type).name == recipe.family
    assert type(model).__name__ == recipe.config.replace("TextConfig", "ForCausalLM").replace("Config", "ForCausalLM")
    assert model.config.hidden_size == hidden
    assert model.config.num_hidden_layers == layers
    assert model.config.vocab_size % 8 == 0 and len(tok) <= model.config.vocab_size < len(tok) + 8
    assert model.config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids(recipe.eos)
    # Generation stops on every token the family ships in generation_config (e.g. Qwen3's <|endoftext|>).
    stops = model.generation_config.eos_token_id
    stops = stops if isinstance(stops, list) else [stops]
    assert stops == [tok.eos_token_id, *(tok.convert_tokens_to_ids(t) for t in recipe.extra_eos)]
    # Weights are safetensors only.
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))

    ids = tok("你好 hello", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()

    # Chat markers are single special tokens; the chat_template is the official one, byte for byte.
    for t in recipe.specials + recipe.added:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    if arch in ORIGINAL:
        assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                       add_generation_prompt=True) == CHATML_PROMPT
    else:
        assert tok.chat_template == official_template(recipe.template)


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_mimics_its_family(micro, arch):
    from transformers import AutoTokenizer

    recipe = TINY[arch]
    tok = AutoTokenizer.from_pretrained(micro[arch])
    with_special = tok("abc")["input_ids"]
    without = tok("abc", add_special_tokens=False)["input_ids"]
    if recipe.add_bos:  # LLaMA, Llama 3, Mistral, Gemma add BOS
        assert with_special == [tok.convert_tokens_to_ids(recipe.bos)] + without
    else:  # BLOOM, Qwen, Phi-3, GLM add none
        assert with_special == without
    assert tok.pad_token == recipe.pad
    if recipe.pad and arch in ORIGINAL:
        assert tok.pad_token_id != tok.eos_token_id
    assert tok.decode(without) == "abc"
    # Text outside the trained vocabulary (an emoji, a rare character) still round-trips: byte-level BPE covers
    # every byte; SentencePiece-style tokenizers fall back to the byte tokens <0xF0>...
    text = "罕见字 𠀋 and 😀, 123456"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    if recipe.tokenizer == "spm":
        assert tok.convert_tokens_to_ids("<0xF0>") in ids
        assert tok.convert_ids_to_tokens(ids[0]).startswith("▁") == recipe.space_prefix


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
    with pytest.raises(UserError, match="--arch 'gpt2': choose one of qwen2, llama, bloom, qwen3"):
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


@pytest.mark.parametrize("arch", ["mistral", "gemma3", "phi3"])
def test_sentencepiece_like_tokenizers_are_the_same_on_every_build(arch, tmp_path):
    """Regression: the trainer picked the alphabet's rare characters in hash order, so two builds of a
    SentencePiece-style tiny tokenizer differed."""
    a = make_tiny_model(tmp_path / "a", arch, size="micro")
    b = make_tiny_model(tmp_path / "b", arch, size="micro")
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
