"""Tiny offline models for the quickstart and the tests: no network, ever.

`make_tiny_model(out, arch)` trains a tokenizer on the bundled sample data and builds a small, randomly
initialised model of the family `arch` (one of `families.ARCHS`, built as its `families.TinyRecipe` says), both
saved in Hugging Face format, so that `AutoModelForCausalLM.from_pretrained(out)` and
`AutoTokenizer.from_pretrained(out)` load them like any downloaded checkpoint.

The tokenizers mimic their families: byte-level BPE (Qwen, Llama 3, GLM, BLOOM) or SentencePiece-style BPE with
byte fallback (Mistral, Gemma, Phi-3); the family's special tokens; BOS added or not as the family does; the
family's official chat template, read from the installed package that ships it (trl's chat_templates, or
llama-cpp-python for Mistral's), never typed here. The original three (qwen2, llama, bloom) carry ChatML tokens
and domaintune's ChatML template; the llama one is LLaMA-2-style (adds BOS, no pad token).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..families import ARCHS, SPLITS, TINY, TinyRecipe
from ..rundir import MODEL_CARD

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

SIZES = {  # hidden, layers, heads, kv heads, intermediate
    "micro": (64, 2, 4, 2, 128),
    "small": (256, 4, 4, 2, 688),
}
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHATML_JINJA = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CARD = """---
license: apache-2.0
library_name: transformers
tags: [domaintune, tiny, random-weights]
---
# Tiny {arch} model (random weights)

Built offline by `domaintune make-tiny-model` for tests and the quickstart. Its tokenizer was trained on
domaintune's sample data; its chat template is {source}. It produces nonsense: it exists to exercise the full
pipeline quickly.
"""


def _template_source(source: str) -> str:
    if source == "chatml":
        return "domaintune's ChatML"
    package, _, name = source.partition(":")
    where = f"trl/chat_templates/{name}.jinja" if package == "trl" else f"llama_cpp.llama_chat_format.{name}"
    return f"the family's official one, as shipped in {where}"


def default_corpus() -> list[Path]:
    """The sample data shipped with the package (examples/data/*.jsonl in the source tree), whatever the
    current folder: the same tiny tokenizer from any folder and from a pip install."""
    from ..bundled import sample_data_dir

    files = sorted(sample_data_dir().glob("*.jsonl"))
    if not files:
        raise UserError(f"no sample data in {sample_data_dir()} for the tiny tokenizer: pass --corpus FILE")
    return files


def corpus_texts(files: list[Path]) -> list[str]:
    """Every string value of every row of `files` (JSON lines or JSON arrays, read by `data.reader.read_records`)."""
    from ..data.reader import read_records

    return [s for f in files for _, obj in read_records(f) for s in _strings(obj)]


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


# Template markers of the built-in templates go into the corpus so they are short token sequences.
_MARKERS = ["用户:", "助手:", "### Instruction:", "### Response:", "### Input:"] * 20


def _recipe(arch: str) -> TinyRecipe:
    if arch not in TINY:
        raise UserError(f"--arch {arch!r}: choose one of {', '.join(ARCHS)}")
    return TINY[arch]


def _special_tokens(r: TinyRecipe) -> list[str]:
    if r.template == "chatml":  # the original tiny models: one shared list, so their ids never move
        return SPECIALS
    out: list[str] = []
    for t in (r.unk, r.bos, r.eos, r.pad, *r.specials):
        if t and t not in out:
            out.append(t)
    return out


def train_tokenizer(texts: list[str], arch: str, vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """A tokenizer of the family's kind (`TinyRecipe.tokenizer`) trained on `texts`, with its special tokens,
    BOS behaviour and official chat template."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    r = _recipe(arch)
    specials = _special_tokens(r)
    tok = (_byte_level if r.tokenizer == "bytelevel" else _sentencepiece_like)(texts + _MARKERS, r, specials,
                                                                               vocab_size)
    if r.added:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in r.added])
    kwargs: dict[str, Any] = dict(tokenizer_object=tok, eos_token=r.eos, model_max_length=2048,
                                  clean_up_tokenization_spaces=False)
    for name in ("bos", "unk", "pad"):
        if getattr(r, name):
            kwargs[f"{name}_token"] = getattr(r, name)
    named = {r.bos, r.eos, r.unk, r.pad}
    kwargs["additional_special_tokens"] = [t for t in r.specials if t not in named]
    if r.tokenizer == "spm":
        kwargs["add_bos_token"] = r.add_bos
        kwargs["legacy"] = False
    fast = PreTrainedTokenizerFast(**kwargs)
    fast.chat_template = chat_template(r.template)
    return fast


def _byte_level(texts: list[str], r: TinyRecipe, specials: list[str], vocab_size: int) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    if r.pre == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLITS[r.pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = _bos_processor(tok, r) if r.add_bos else processors.ByteLevel(trim_offsets=False)
    return tok


def _bos_processor(tok: Any, r: TinyRecipe) -> Any:
    """The post-processor of a tokenizer that adds BOS by itself (LLaMA, Llama 3, Mistral, Gemma)."""
    from tokenizers import processors

    bos = r.bos or ""
    return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                         special_tokens=[(bos, tok.token_to_id(bos))])


def _sentencepiece_like(texts: list[str], r: TinyRecipe, specials: list[str], vocab_size: int) -> Any:
    """A tokenizer.json shaped like a converted SentencePiece model (LLaMA-2, Mistral, Gemma, Phi-3): BPE over
    "▁"-for-space text, the 256 byte tokens <0x00>..<0xFF> right after the special tokens, byte fallback for
    any character outside the vocabulary."""
    import collections
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    def pipeline(tok: Any) -> None:
        if r.space_prefix:  # LLaMA-2 / Mistral / Phi-3: "▁" before the text and for every space
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        else:  # Gemma: spaces become "▁", nothing is prepended
            tok.normalizer = normalizers.Replace(" ", "▁")

    base = Tokenizer(models.BPE(unk_token=r.unk, byte_fallback=True, fuse_unk=True))
    pipeline(base)
    # The 400 most frequent characters (ties by code point) as the whole alphabet: the trainer's own pick breaks ties
    # in hash order, which made two builds differ. Rarer characters fall back to the byte tokens.
    counts = collections.Counter(ch for t in texts for ch in t.replace(" ", "▁"))
    alphabet = sorted(counts, key=lambda ch: (-counts[ch], ch))[:400]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials, show_progress=False,
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet))
    base.train_from_iterator(texts, trainer)
    trained = json.loads(base.to_str())["model"]
    vocab: dict[str, int] = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=r.unk, byte_fallback=True, fuse_unk=True))
    pipeline(tok)
    tok.add_special_tokens(specials)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if r.space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    if r.add_bos:
        tok.post_processor = _bos_processor(tok, r)
    return tok


def chat_template(source: str) -> str:
    """The chat template a recipe names (`TinyRecipe.template`), read from the installed package that ships it."""
    if source == "chatml":
        return CHATML_JINJA
    package, _, name = source.partition(":")
    if package == "trl":
        from importlib import resources

        return resources.files("trl").joinpath("chat_templates").joinpath(f"{name}.jinja").read_text(encoding="utf-8")
    if package == "llama_cpp":
        try:
            from llama_cpp import llama_chat_format
        except ImportError:
            raise UserError(f"this tiny model's official chat template ({name}) comes from llama-cpp-python: "
                            "pip install llama-cpp-python") from None
        return getattr(llama_chat_format, name)
    raise ValueError(f"unknown chat template source {source!r}")


def tiny_model_config(arch: str, vocab_size: int, size: str, tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    import transformers

    r = _recipe(arch)
    hidden, layers, heads, kv, inter = SIZES[size]
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else None)
    cls = getattr(transformers, r.config)
    if arch == "bloom":
        return cls(vocab_size=vocab_size, hidden_size=hidden, n_layer=layers, n_head=heads, **ids)
    extra = dict(r.config_kwargs)
    if "layer_types" in extra:
        pattern = extra["layer_types"]
        extra["layer_types"] = [pattern[i % len(pattern)] for i in range(layers)]
    if r.template != "chatml":  # the original tiny models keep their configs byte for byte
        extra.setdefault("head_dim", hidden // heads)
        if r.config == "Gemma3TextConfig":
            extra.setdefault("query_pre_attn_scalar", hidden // heads)
    return cls(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048, **ids, **extra)


def make_tiny_model(out: str | Path, arch: str = "qwen2", size: str = "small", corpus: list[Path] | None = None,
                    seed: int = 0, vocab_size: int = 2048) -> Path:
    """Build and save a tiny random model + tokenizer in Hugging Face format. Returns `out`."""
    r = _recipe(arch)
    if size not in SIZES:
        raise UserError(f"--size {size!r}: choose one of {', '.join(SIZES)}")
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out)
    tok = train_tokenizer(corpus_texts(corpus or default_corpus()), arch, vocab_size)
    vocab = len(tok)
    vocab += (-vocab) % 8  # pad the embedding to a multiple of 8, as real checkpoints do
    cfg = tiny_model_config(arch, vocab, size, tok)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    eos = [tok.eos_token_id, *(tok.convert_tokens_to_ids(t) for t in r.extra_eos)]
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id,
                                               eos_token_id=eos if len(eos) > 1 else eos[0],
                                               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None
                                               else tok.eos_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / MODEL_CARD).write_text(CARD.format(arch=r.title, source=_template_source(r.template)), encoding="utf-8")
    return out
