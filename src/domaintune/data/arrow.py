"""Prepared data on disk: memory-mapped Arrow samples, the cache key that names them, and the cache folder.

A prepared data set is a folder holding `train/` and `eval/` (datasets' save_to_disk: input_ids, labels,
length), `train_rows/` (the training rows as messages, for data-check) and `report.json` (the DataReport). It is
built in a temporary folder beside its final place and renamed into place when complete, so a killed run
never leaves a half-written cache that a later run would take for whole, and two processes preparing the same
data (torchrun ranks) both end with the same, complete folder.

The cache key covers everything the samples depend on: each source's content (sources.fingerprint), the
`data` settings that change rows or tokens, `train.seed` (mixing, the validation split), the tokenizer (its
serialised vocabulary, merges, normaliser and special tokens), the template, and the code that prepares data
(the bytes of this package's data modules), so an upgrade of domaintune never reuses samples an older version
made. Where the cache lives: data.cache_dir, else $DOMAINTUNE_CACHE, else ~/.cache/domaintune/data. Nothing
evicts old entries: delete the folder to reclaim the space (the start summary names the entry in use).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..config import DataConfig
    from .templates import Template

T = TypeVar("T")
# data settings that change neither rows nor tokens: left out of the cache key
_NOT_IN_KEY = ("cache", "cache_dir", "num_proc")


def cache_root(cfg: DataConfig) -> Path:
    """Where prepared data sets are cached (module docstring)."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    if env := os.environ.get("DOMAINTUNE_CACHE"):
        return Path(env).expanduser()
    return Path.home() / ".cache" / "domaintune" / "data"


def _code_digest() -> str:
    h = hashlib.blake2b(digest_size=16)
    here = Path(__file__).parent
    for p in sorted([*here.glob("*.py"), *here.glob("prompt_templates/*")]):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def tokenizer_digest(tok: PreTrainedTokenizerBase) -> str:
    """A digest of what tokenising depends on: the fast tokenizer's full serialisation (vocabulary, merges,
    normaliser, pre-tokeniser, post-processor, added tokens) or a slow one's vocabulary, plus the special tokens
    and the BOS/EOS switches."""
    h = hashlib.blake2b(digest_size=16)
    backend = getattr(tok, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True).encode())
    extra = {"class": type(tok).__name__, "special": {k: str(v) for k, v in tok.special_tokens_map.items()},
             "add_bos": getattr(tok, "add_bos_token", None), "add_eos": getattr(tok, "add_eos_token", None),
             "padding_side": tok.padding_side}
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(cfg: DataConfig, source_digests: Sequence[str], tok: PreTrainedTokenizerBase, template: Template,
              seed: int) -> str:
    """The name of the prepared data set for these inputs (module docstring)."""
    settings = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _NOT_IN_KEY}
    parts = {"settings": settings, "sources": list(source_digests), "seed": seed, "tokenizer": tokenizer_digest(tok),
             "template": template.to_dict(), "code": _code_digest()}
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def install(built: Path, final: Path) -> Path:
    """Move the complete folder `built` to `final`, unless another process got there first (then `built` goes)."""
    try:
        os.replace(built, final) if not final.exists() else shutil.rmtree(built)
    except OSError:  # the other process renamed its copy between our check and our rename
        shutil.rmtree(built, ignore_errors=True)
    return final


class ArrowRows(Sequence[T]):
    """A data set on disk as a sequence: each row read on demand and made into a `T` by `make` (slices give lists)."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def make(self, row: dict) -> T:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.make(self.ds[int(i)])

    def __iter__(self) -> Iterator[T]:
        for i in range(len(self)):
            yield self[i]


class Samples(ArrowRows[dict]):
    """Encoded samples (input_ids, labels) in a memory-mapped Arrow data set, as the Trainer takes them: each row
    a dict of lists with its attention_mask (all ones: samples are stored unpadded, so it is not stored).
    `lengths` are the token counts (what length grouping and the memory estimate read, without decoding rows)."""

    def __init__(self, ds: Any) -> None:
        super().__init__(ds)
        self.lengths: list[int] = ds.data.column("length").to_pylist() if len(ds) else []

    def make(self, row: dict) -> dict:
        return {"input_ids": row["input_ids"], "attention_mask": [1] * len(row["input_ids"]), "labels": row["labels"]}

    def longest(self, n: int) -> list[dict]:
        """The `n` longest samples, longest first (ties: the earlier one)."""
        order = sorted(range(len(self.lengths)), key=lambda i: -self.lengths[i])[:n]
        return [self[i] for i in order]
