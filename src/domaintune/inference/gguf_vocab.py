"""The tokenizer part of a GGUF export (`gguf_export.py`): the vocabulary with its token types, the special-token
ids, and the chat template. Two kinds, each written as the llama.cpp tokenizer that reproduces it exactly:

- byte-level BPE (GPT-2, Qwen, Llama 3, GLM, BLOOM): llama.cpp's "gpt2" model, with the merges and the
  pre-tokenizer name. llama.cpp re-implements each pre-tokenizer (the regex that splits text before BPE) and
  picks it by the name in `tokenizer.ggml.pre`; a wrong name silently changes the tokens. So the name is read
  off the tokenizer's own pre-tokenizer and only the ones llama.cpp reproduces exactly are accepted
  (`PRE_TOKENIZERS`); the others are refused with the way out.
- SentencePiece-style BPE (byte fallback, "▁" for spaces: LLaMA-2, Mistral, Gemma, Phi-3): llama.cpp's "llama"
  (SentencePiece) model, in `gguf_spm.py`.
"""
from __future__ import annotations

import json
import re
from typing import Any

from ..errors import UserError
from ..families import SPLITS

# tokenizer.json pre-tokenizer -> llama.cpp's `tokenizer.ggml.pre` name. The key is the Split regex in front of
# a ByteLevel(use_regex=false) step (families.SPLITS), or "" for a bare ByteLevel(use_regex=true) (GPT-2's own).
PRE_TOKENIZERS = {"": "gpt-2", SPLITS["qwen2"]: "qwen2", SPLITS["llama3"]: "llama-bpe", SPLITS["bloom"]: "bloom"}


def _tokenizer_json(tok: Any) -> dict:
    """The tokenizer's pipeline as tokenizer.json holds it (the tokenizers library's own serialisation)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise UserError("--format gguf needs a fast (tokenizer.json) tokenizer; this run's tokenizer has none")
    return json.loads(backend.to_str())


def pre_tokenizer_name(tj: dict) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, or UserError."""
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    key = None
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        key = ""
    elif (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
          and not steps[1].get("use_regex", True)):
        key = (steps[0].get("pattern") or {}).get("Regex")
    if key is None or key not in PRE_TOKENIZERS:
        raise UserError("--format gguf: this tokenizer's pre-tokenizer is not one llama.cpp is known to reproduce "
                        f"here (known: {', '.join(PRE_TOKENIZERS.values())}); a wrong one would silently change "
                        "the tokens. Export safetensors and run llama.cpp's convert_hf_to_gguf.py, which "
                        "recognises more tokenizers")
    return PRE_TOKENIZERS[key]


def check_tokenizer(tok: Any) -> tuple[dict, str | None]:
    """(tokenizer.json, llama.cpp pre-tokenizer name, None for a SentencePiece-style one) of a tokenizer this
    export can write, or UserError. Cheap: called before the model loads and the adapter merges."""
    from .gguf_spm import check_spm

    tj = _tokenizer_json(tok)
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"--format gguf: this tokenizer is a {model.get('type')} model; domaintune writes BPE "
                        "tokenizers (byte-level: Qwen, Llama 3, GLM, BLOOM; SentencePiece-style: Mistral, Gemma, "
                        "Phi-3). Export safetensors and run llama.cpp's convert_hf_to_gguf.py on it")
    if model.get("byte_fallback"):
        check_spm(tj)
        return tj, None
    return tj, pre_tokenizer_name(tj)


def add_tokenizer(gguf: Any, w: Any, tok: Any, tpl: Any, n_vocab: int) -> None:
    from ..data.templates import leading_bos
    from .gguf_spm import add_spm

    tj, pre = check_tokenizer(tok)
    model = tj["model"]
    vocab = tok.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise UserError(f"--format gguf: the tokenizer has ids up to {max(vocab.values())} but the model's "
                        f"embedding has {n_vocab} rows")
    by_id = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:  # embedding rows past the tokenizer (padded to a multiple of 8 or 64)
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
            continue
        tokens.append(by_id[i])
        types.append((T.CONTROL if added[i].get("special") else T.USER_DEFINED) if i in added else T.NORMAL)
    if pre is None:
        add_spm(gguf, w, tj, tok, tpl, tokens, types)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    for kind, tid in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("unk", tok.unk_token_id),
                      ("pad", tok.pad_token_id)):
        if tid is not None:
            getattr(w, f"add_{kind}_token_id")(tid)
    stops = [t for t in tpl.stop_token_ids(tok) if t != tok.eos_token_id]
    if stops:  # e.g. ChatML's <|im_end|>: the turn end the model learnt; llama.cpp ends generation on EOT
        w.add_eot_token_id(stops[0])
    w.add_add_bos_token(leading_bos(tok) is not None)
    w.add_add_eos_token(False)
    w.add_chat_template(tpl.chat_template_for(tok))


# llama.cpp keys one tokenizer rule on `general.name` (llama-vocab.cpp, "set attributes by model/tokenizer/
# architecture name"): a name containing "phi-3" or "phi3" makes every special token strip the whitespace after
# it (rstrip), except these three; </s> strips too, and the four must exist.
_PHI3_NAMES = re.compile(r"phi-?3", re.I)
_PHI3_KEEP = ("<unk>", "<s>", "<|endoftext|>")


def general_name(tok: Any, name: str) -> str:
    """The file's `general.name`: the run's name, changed only where llama.cpp's name rule would make its
    tokenizer strip whitespace other than this tokenizer does. A Phi-3 tokenizer (its chat tokens rstrip) gets
    "phi3" in the name; any other keeps its whitespace, so "phi3" in the name becomes "phi 3"; added tokens that
    strip in any other way are refused."""
    tj = _tokenizer_json(tok)
    added = {a["content"]: a for a in tj.get("added_tokens", [])}
    if not any(a.get("lstrip") or a.get("rstrip") for a in added.values()):
        return _PHI3_NAMES.sub("phi 3", name)
    if (all(t in tok.get_vocab() for t in (*_PHI3_KEEP, "</s>")) and not any(a.get("lstrip") for a in added.values())
            and all(bool(a.get("rstrip")) == (t not in _PHI3_KEEP) for t, a in added.items())):
        return name if _PHI3_NAMES.search(name) else f"{name} (phi3)"
    stripping = sorted(t for t, a in added.items() if a.get("lstrip") or a.get("rstrip"))
    raise UserError(f"--format gguf: the tokenizer's added tokens {', '.join(stripping[:5])} strip the whitespace "
                    "around them (lstrip/rstrip in tokenizer.json), which llama.cpp does only for Phi-3's tokens; "
                    "it would tokenize the prompts differently. Export safetensors and run llama.cpp's "
                    "convert_hf_to_gguf.py on it")
