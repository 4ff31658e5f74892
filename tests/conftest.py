"""Shared fixtures: tiny offline models and a short training run, each built once per test session.

Fixture names are stable; other test files rely on them.

- ``sample_data`` (session): Path of the bundled sample data folder ``examples/data`` (train.jsonl,
  test.jsonl, chat.jsonl, seeds.jsonl).
- ``tiny_model_dir`` (session): a factory, ``tiny_model_dir(arch="qwen2") -> Path``, returning the folder of a
  micro (~0.2M parameters) randomly initialised model + tokenizer of family ``arch`` (one of
  ``domaintune.families.ARCHS``: "qwen2", "llama", "bloom" with ChatML; "qwen3", "qwen3_moe", "qwen3_5", "llama3",
  "gemma3", "mistral", "phi3", "glm4" with their official chat templates), built by
  ``domaintune.training.tiny.make_tiny_model(..., size="micro", seed=0)`` on the first request
  and reused afterwards. Treat it as read-only. Requesting it also sets ``torch.set_num_threads(1)`` for
  the session (tiny matrices gain nothing from threads; a subprocess should get ``OMP_NUM_THREADS=1``).
- ``tiny_train_config`` (session): a factory, ``tiny_train_config(output_dir, arch="qwen2", *overrides) ->
  Config``, the config ``tiny_run`` uses (LoRA r=8, 4 steps of batch 4 on examples/data/train.jsonl,
  cutoff_len 512, 4 validation rows, an eval and a checkpoint at step 4), with dotted overrides applied
  (e.g. ``"train.max_steps=2"``, ``"lora.enabled=false"``). Pass it to ``domaintune.training.trainer.run_train``.
- ``tiny_run`` (session): Path of a finished LoRA run directory on the micro qwen2 model (the config
  above). Read-only, shared by every test: write into a copy (``tiny_run_copy``) or pass ``out=`` paths
  outside it.
- ``tiny_run_copy`` (function): a fresh copy of ``tiny_run`` in the test's tmp_path, free to modify.
- ``qwen_tok``, ``llama_tok``, ``bloom_tok`` (session): the tiny tokenizers alone (trained on the sample data,
  about a second each, no model), for template and data tests; ``family_tok(arch)`` the same for any family.
  Treat them as read-only.

The micro models' outputs are nonsense (random weights): tests compare exact values between code paths,
never quality.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Prepared training data (data/prepare.py) is cached per session, in a folder of its own, not in the user's
# ~/.cache: tests that prepare the same data on the same tiny model share one entry, and nothing outlives the run.
# Subprocesses (the CLI, torchrun ranks) inherit it.
_DATA_CACHE = tempfile.TemporaryDirectory(prefix="domaintune-test-cache-")
os.environ["DOMAINTUNE_CACHE"] = _DATA_CACHE.name
SAMPLE_DATA = REPO / "examples" / "data"

TINY_TRAIN = {
    "lora": {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
    "data": {"path": str(SAMPLE_DATA / "train.jsonl"), "template": "domain_zh", "cutoff_len": 512, "val_size": 4},
    # A high learning rate so 4 steps move the adapter far enough that its outputs differ from the base model's.
    "train": {"max_steps": 4, "batch_size": 4, "per_device_batch_size": 4, "learning_rate": 0.05, "warmup_ratio": 0.0,
              "logging_steps": 1, "eval_steps": 4, "save_steps": 4, "seed": 42},
}


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A verb called in-process (predict, chat, serve: their --threads) sets torch's thread count for the process;
    put it back after each test, so no test's float summation order depends on which tests ran before it in the
    same worker (the exact-resume tests compare losses bit for bit against an in-process run)."""
    import sys

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None and before is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sample_data() -> Path:
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    import torch

    from domaintune.training.tiny import make_tiny_model

    # The micro models' matrices are too small to gain from threads; on a busy 2-core machine the default
    # thread pool made generation about 10x slower.
    torch.set_num_threads(1)
    built: dict[str, Path] = {}

    def get(arch: str = "qwen2") -> Path:
        if arch not in built:
            out = tmp_path_factory.mktemp(f"tiny-{arch}")
            built[arch] = make_tiny_model(out, arch, "micro", corpus=sorted(SAMPLE_DATA.glob("*.jsonl")), seed=0)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tiny_train_config(tiny_model_dir):
    from domaintune.config import apply_overrides, build_config

    def make(output_dir, arch: str = "qwen2", *overrides: str):
        raw = {"model": {"name_or_path": str(tiny_model_dir(arch))}, **TINY_TRAIN,
               "train": {**TINY_TRAIN["train"], "output_dir": str(output_dir)}}
        raw = apply_overrides(raw, list(overrides))
        return build_config(raw, "tiny_train_config")

    return make


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def tiny_run(tiny_train_config, tmp_path_factory):
    from domaintune.training.trainer import run_train

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    run = Path(run_train(tiny_train_config(out)))
    before = _files(run)
    yield run
    # Read-only: a test that wrote into it would make others depend on the order the tests ran in.
    after = _files(run)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a test changed the shared tiny_run (use tiny_run_copy): {changed}"


@pytest.fixture
def tiny_run_copy(tiny_run, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_run, tmp_path / tiny_run.name))


@pytest.fixture(scope="session")
def tiny_corpus() -> list[str]:
    from domaintune.training.tiny import corpus_texts, default_corpus

    return corpus_texts(default_corpus())


@pytest.fixture(scope="session")
def qwen_tok(tiny_corpus):
    from domaintune.training.tiny import train_tokenizer

    return train_tokenizer(tiny_corpus, "qwen2")


@pytest.fixture(scope="session")
def llama_tok(tiny_corpus):
    from domaintune.training.tiny import train_tokenizer

    return train_tokenizer(tiny_corpus, "llama")


@pytest.fixture(scope="session")
def bloom_tok(tiny_corpus):
    from domaintune.training.tiny import train_tokenizer

    return train_tokenizer(tiny_corpus, "bloom")


@pytest.fixture(scope="session")
def family_tok(tiny_corpus):
    """A factory, ``family_tok(arch) -> tokenizer``: the tiny tokenizer of any family of
    ``domaintune.families.ARCHS`` (with its official chat template), trained once per session, no model."""
    from domaintune.training.tiny import train_tokenizer

    built: dict = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = train_tokenizer(tiny_corpus, arch)
        return built[arch]

    return get
