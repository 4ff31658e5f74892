"""Tiny offline models for the quickstart and the tests: no network, ever.

`make_tiny_model(out, arch)` trains a byte-level BPE tokenizer on the bundled sample data and builds a
small, randomly initialised BLOOM, Qwen2 or LLaMA model, both saved in Hugging Face format, so that
`AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)` load them like any
downloaded checkpoint. The tokenizers mimic their families: the LLaMA one adds BOS and has no pad
token; BLOOM and Qwen2 add no BOS. All carry the ChatML tokens and a ChatML chat_template.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..rundir import MODEL_CARD

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

ARCHS = ("bloom", "qwen2", "llama")
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
domaintune's sample data. It produces nonsense: it exists to exercise the full pipeline quickly.
"""


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


def train_tokenizer(texts: list[str], arch: str, vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Template markers of the built-in templates go into the corpus so they are short token sequences.
    extra = ["用户:", "助手:", "### Instruction:", "### Response:", "### Input:"] * 20
    tok.train_from_iterator(texts + extra, trainer)
    bos_id = tok.token_to_id("<s>")
    if arch == "llama":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    kwargs = dict(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                  additional_special_tokens=["<|im_start|>", "<|im_end|>"], model_max_length=2048,
                  clean_up_tokenization_spaces=False)
    if arch != "llama":  # LLaMA tokenizers ship without a pad token; the loader must cope
        kwargs["pad_token"] = "<pad>"
    fast = PreTrainedTokenizerFast(**kwargs)
    fast.chat_template = CHATML_JINJA
    return fast


def tiny_model_config(arch: str, vocab_size: int, size: str, tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    from transformers import BloomConfig, LlamaConfig, Qwen2Config

    hidden, layers, heads, kv, inter = SIZES[size]
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else None)
    if arch == "bloom":
        return BloomConfig(vocab_size=vocab_size, hidden_size=hidden, n_layer=layers, n_head=heads, **ids)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048, **ids)
    if arch == "qwen2":
        return Qwen2Config(tie_word_embeddings=True, **common)
    return LlamaConfig(tie_word_embeddings=False, **common)


def make_tiny_model(out: str | Path, arch: str = "qwen2", size: str = "small", corpus: list[Path] | None = None,
                    seed: int = 0, vocab_size: int = 2048) -> Path:
    """Build and save a tiny random model + tokenizer in Hugging Face format. Returns `out`."""
    if arch not in ARCHS:
        raise UserError(f"--arch {arch!r}: choose one of {', '.join(ARCHS)}")
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
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None
                                               else tok.eos_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / MODEL_CARD).write_text(CARD.format(arch=arch), encoding="utf-8")
    return out
