"""SentencePiece-style tokenizers (BPE with byte fallback, "▁" for spaces: LLaMA-2, Mistral, Gemma, Phi-3) as
llama.cpp's "llama" (SentencePiece) tokenizer, token for token.

llama.cpp's "llama" tokenizer is SentencePiece's BPE: from the characters of a text fragment it repeatedly joins
the adjacent pair whose joined text is a vocabulary token with the highest score (the leftmost on a tie), and a
character outside the vocabulary becomes its UTF-8 bytes as <0xXX> tokens. A tokenizer.json BPE model joins the
pairs its merge list names, lowest rank first. The score written for a token is minus the rank of its first merge,
so llama.cpp joins in the merge list's order. The two then agree exactly when the merge list is a SentencePiece
model's, as transformers' converter writes it (`generate_merges`: every split of a token into two tokens is a
merge, a token's merges next to each other). A BPE trainer's own list skips splits, and llama.cpp would join such
a pair where the tokenizer cannot: `check_spm` runs both rules on the text of every vocabulary token and refuses
the tokenizer, naming the token, where they split it differently (a trainer's merges pass: the trainer made each
token from the pieces that merge order produces).

The `gguf` package's `LlamaHfVocab` reads the same tokenizer.json but gives every token the score -1000, with
which llama.cpp joins the leftmost pair first instead of in merge order; so the scores are computed here, and the
token types follow its rules (BYTE for <0xXX>, CONTROL for special tokens, USER_DEFINED for other added ones).

Spaces: llama.cpp turns spaces into "▁" and, with `add_space_prefix`, puts one "▁" before the text and after every
special token (SentencePiece's dummy prefix on each piece of text). The tokenizer's own rule decides the flag:
- normalizer Prepend("▁") + Replace(" ", "▁") (LLaMA-2, Mistral and Phi-3 files), or Metaspace "always": the same
  rule, so True;
- Replace(" ", "▁") alone (Gemma) or Metaspace "never": no prefix, so False;
- Metaspace "first" (transformers 5's LlamaTokenizer with legacy=False): "▁" only before text at the very start
  of the input. llama.cpp cannot say that; the flag is chosen so the chat template's prompt is exact: False when
  the rendered template starts with a special token (Mistral's <s>, Phi-3's <|user|>, Gemma's <bos>), else True.
  A raw prompt (llama-cli -p) then differs by that one "▁": `export` says so.
"""
from __future__ import annotations

import re
from typing import Any

from .. import console
from ..errors import UserError

BYTE = re.compile(r"<0x[0-9A-F]{2}>")
WAY_OUT = ("Export safetensors and run llama.cpp's convert_hf_to_gguf.py on it (with the tokenizer.model it was "
           "converted from), then compare its tokens with the tokenizer's")


def _merges(model: dict) -> list[tuple[str, str]]:
    """The merge list as pairs (tokenizer.json writes "a b" strings or, since tokenizers 0.20, [a, b] lists)."""
    pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
    return [(a, b) for a, b in pairs]


def _steps(part: dict | None, kind: str) -> list[dict]:
    if not part:
        return []
    return part.get(kind, []) if part.get("type") == "Sequence" else [part]


def space_rule(tj: dict) -> str:
    """How the tokenizer puts "▁" before a text: "always", "never" or "first" (see the module docstring)."""
    norm = [(s.get("type"), s.get("prepend"), (s.get("pattern") or {}).get("String"), s.get("content"))
            for s in _steps(tj.get("normalizer"), "normalizers")]
    pre = _steps(tj.get("pre_tokenizer"), "pretokenizers")
    replace = ("Replace", None, " ", "▁")
    if not pre and norm == [("Prepend", "▁", None, None), replace]:
        return "always"
    if not pre and norm == [replace]:
        return "never"
    if not norm and len(pre) == 1 and pre[0].get("type") == "Metaspace" and pre[0].get("replacement") == "▁" \
            and not pre[0].get("split", True):
        scheme = pre[0].get("prepend_scheme") or ("always" if pre[0].get("add_prefix_space", True) else "never")
        if scheme in ("always", "never", "first"):
            return scheme
    raise UserError("--format gguf: this SentencePiece-style tokenizer's normalizer / pre-tokenizer is not one "
                    "llama.cpp's tokenizer reproduces (known: Prepend + Replace as in LLaMA-2 and Mistral, Replace "
                    f"as in Gemma, Metaspace without splitting). {WAY_OUT}")


def check_spm(tj: dict) -> dict[str, float]:
    """The llama.cpp score of every plain token, or UserError when llama.cpp's tokenizer would split text
    differently from this one (see the module docstring)."""
    model = tj["model"]
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise UserError("--format gguf: this BPE tokenizer uses dropout or word prefixes/suffixes, which "
                        f"llama.cpp's SentencePiece tokenizer does not. {WAY_OUT}")
    space_rule(tj)
    vocab: dict[str, int] = model["vocab"]
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if missing:
        raise UserError(f"--format gguf: this byte-fallback tokenizer lacks the byte tokens {', '.join(missing[:4])}"
                        f"{' ...' if len(missing) > 4 else ''}, which llama.cpp's tokenizer needs. {WAY_OUT}")
    added = {a["content"] for a in tj.get("added_tokens", [])}
    plain = {t for t in vocab if t not in added and not BYTE.fullmatch(t)}
    merges = _merges(model)
    ranks: dict[tuple[str, str], int] = {}
    scores: dict[str, float] = {}
    for rank, pair in enumerate(merges):
        ranks.setdefault(pair, rank)
        scores.setdefault(pair[0] + pair[1], -float(rank))
    never = -float(len(merges) + 1)  # a token no merge makes: llama.cpp may still join it, last
    scores = {t: scores.get(t, never) for t in plain}
    if all((t[:i], t[i:]) in ranks for t in plain for i in range(1, len(t)) if t[:i] in plain and t[i:] in plain):
        return scores  # a SentencePiece model's merge list: the same splits by construction
    for tok in sorted(plain, key=vocab.__getitem__):
        ours, theirs = _bpe(tok, ranks), _sentencepiece(tok, scores)
        if ours != theirs:
            raise _split_differently(f"the text of the token {tok!r} is {ours} for the tokenizer and {theirs} for "
                                     "llama.cpp")
    return scores


def _bpe(text: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """tokenizers' BPE on one word: join the adjacent pair of lowest merge rank, the leftmost on a tie."""
    syms = list(text)
    while len(syms) > 1:
        best = min(((ranks[p], i) for i, p in enumerate(zip(syms, syms[1:], strict=False)) if p in ranks), default=None)
        if best is None:
            break
        i = best[1]
        syms[i:i + 2] = [syms[i] + syms[i + 1]]
    return syms


def _sentencepiece(text: str, scores: dict[str, float]) -> list[str]:
    """llama.cpp's llm_tokenizer_spm: join the adjacent pair whose text is a token of the highest score, the
    leftmost on a tie."""
    syms = list(text)
    while len(syms) > 1:
        best = max(((scores[a + b], -i) for i, (a, b) in enumerate(zip(syms, syms[1:], strict=False))
                    if a + b in scores),
                   default=None)
        if best is None:
            break
        i = -best[1]
        syms[i:i + 2] = [syms[i] + syms[i + 1]]
    return syms


def _split_differently(why: str) -> UserError:
    return UserError(f"--format gguf: llama.cpp's SentencePiece tokenizer would split some text differently from "
                     f"this tokenizer: {why} (its merges are not a SentencePiece model's, e.g. a BPE trainer's own "
                     f"list). {WAY_OUT}")


def add_spm(gguf: Any, w: Any, tj: dict, tok: Any, tpl: Any, tokens: list[str], types: list[Any]) -> None:
    """Write the "llama" tokenizer: tokens, scores, types (BYTE, UNKNOWN added) and the space rule."""
    scores = check_spm(tj)
    T = gguf.TokenType
    for i, t in enumerate(tokens):
        if types[i] == T.NORMAL and BYTE.fullmatch(t):
            types[i] = T.BYTE
        elif i == tok.unk_token_id:
            types[i] = T.UNKNOWN
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")  # as llama.cpp's converter writes for SentencePiece vocabularies
    w.add_token_list(tokens)
    w.add_token_scores([scores.get(t, 0.0) if types[i] == T.NORMAL else 0.0 for i, t in enumerate(tokens)])
    w.add_token_types(types)
    w.add_add_space_prefix(_space_prefix(tj, tok, tpl))


def _space_prefix(tj: dict, tok: Any, tpl: Any) -> bool:
    from ..data.chat_template import render

    rule = space_rule(tj)
    if rule != "first":
        return rule == "always"
    probe = [{"role": "user", "content": "hi"}]
    text = render(tok, tpl.chat_template_for(tok), probe, True)
    starts_special = any(text.startswith(a["content"]) for a in tj.get("added_tokens", []) if a.get("special"))
    console.note("the tokenizer puts \"▁\" only before text at the very start of the input, which llama.cpp cannot "
                 "express: the GGUF tokenizes the chat template's prompts exactly"
                 + (", and a raw prompt without the template gets no leading \"▁\"" if starts_special else
                    ", and text right after a special token gets an extra \"▁\""))
    return not starts_special
