"""model.py, the one loader: sources fail fast and clearly, pad tokens, dtypes, LoRA wrapping, licenses."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from domaintune.config import LoraConfig, ModelConfig
from domaintune.errors import UserError
from domaintune.training import model as loader

# LoRA parameters of a micro model (hidden 64, 2 layers, 4 heads, 2 kv heads -> kv width 32, MLP 128), worked out
# by hand: a rank-r adapter on an (in -> out) linear layer adds r * (in + out) parameters.
QWEN_LLAMA_ALL_LINEAR_R8 = 2 * 8 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64)  # q k v o
                                    + 3 * (64 + 128))  # gate up down
BLOOM_ALL_LINEAR_R8 = 2 * 8 * ((64 + 192) + (64 + 64)  # query_key_value dense
                               + (64 + 256) + (256 + 64))  # h_to_4h 4h_to_h
QWEN_QV_R4 = 2 * 4 * ((64 + 64) + (64 + 32))


@pytest.fixture(scope="module")
def micro(tiny_model_dir):
    return {arch: tiny_model_dir(arch) for arch in ("bloom", "qwen2", "llama")}


def test_dtype_resolution_on_cpu():
    import torch

    assert loader.resolve_dtype("auto", "cpu") is torch.float32
    assert loader.resolve_dtype("auto", "mps") is torch.float32
    assert loader.resolve_dtype("bf16", "cpu") is torch.bfloat16
    assert loader.resolve_dtype("fp16", "cpu") is torch.float16
    assert loader.resolve_dtype("fp32", "cuda") is torch.float32


@pytest.mark.parametrize("name,local", [
    ("bigscience/bloomz-560m", False),
    ("Qwen/Qwen2.5-0.5B-Instruct", False),
    ("runs/tiny/model", True),       # two slashes: a path
    ("./model", True),
    ("/abs/model", True),
    ("~/models/x", True),
    ("tiny-model", True),           # no slash: a folder name
    ("C:\\models\\x", True),
])
def test_local_paths_and_hub_ids_are_told_apart(name, local):
    assert loader._looks_local(name) is local


def test_missing_local_path_fails_fast_naming_it(tmp_path):
    missing = tmp_path / "no-such-model"
    t0 = time.time()
    with pytest.raises(UserError) as e:
        loader.check_model_source(str(missing))
    assert time.time() - t0 < 1
    assert f"model.name_or_path '{missing}' does not exist" in str(e.value)


def test_hint_for_a_missing_tiny_model(tmp_path):
    with pytest.raises(UserError, match="domaintune make-tiny-model runs/tiny-model"):
        loader.check_model_source(str(tmp_path / "tiny-model"))


def test_directory_without_model_files_is_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match="is a directory without config.json: not a Hugging Face model directory"):
        loader.check_model_source(str(tmp_path))


def test_uncached_unreachable_hub_id_fails_fast(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)  # no folder named like the org here
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    t0 = time.time()
    with pytest.raises(UserError) as e:
        loader.check_model_source("nonexistent-org/nonexistent-model")
    assert time.time() - t0 < 6
    msg = str(e.value)
    assert "'nonexistent-org/nonexistent-model': no folder 'nonexistent-org/nonexistent-model' exists under " in msg
    assert "as a hub id it is not in the Hugging Face cache" in msg
    assert "127.0.0.1 cannot be reached" in msg


def test_cached_hub_id_passes_without_network(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: "/cache/config.json")
    assert loader.check_model_source("some-org/some-model") == "some-org/some-model"


def test_local_model_source_is_recorded_as_an_absolute_path(micro, tmp_path, monkeypatch):
    """Regression: a relative model path (runs/tiny-model) ended up in adapter_config.json's
    base_model_name_or_path, which then failed from any other working directory."""
    import os

    base = micro["qwen2"].resolve()
    monkeypatch.chdir(tmp_path)
    rel = os.path.relpath(base, tmp_path)
    assert not Path(rel).is_absolute()
    assert loader.check_model_source(rel) == str(base)
    assert loader.check_model_source(str(base)) == str(base)
    model = loader.prepare_for_training(loader.load_base_model(ModelConfig(name_or_path=rel), device="cpu"),
                                        LoraConfig(r=4, target_modules=["q_proj"]))
    assert model.peft_config["default"].base_model_name_or_path == str(base)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    assert saved["base_model_name_or_path"] == str(base)
    assert loader.load_tokenizer(rel).name_or_path == str(base)


def test_llama_tokenizer_gets_unk_as_pad_not_eos(micro):
    tok = loader.load_tokenizer(str(micro["llama"]))
    assert tok.pad_token == "<unk>"
    assert tok.pad_token_id == tok.unk_token_id == 0
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.eos_token == "</s>"


def test_existing_pad_token_is_kept(micro):
    tok = loader.load_tokenizer(str(micro["qwen2"]))
    assert tok.pad_token == "<pad>" and tok.pad_token_id == 3


class _Tok:
    def __init__(self, unk=None, eos=None):
        self.pad_token = None
        self.unk_token, self.eos_token = unk, eos
        self.unk_token_id = 0 if unk else None
        self.eos_token_id = 2 if eos else None

    @property
    def pad_token_id(self):
        return {self.unk_token: self.unk_token_id, self.eos_token: self.eos_token_id}.get(self.pad_token) \
            if self.pad_token else None


def test_pad_falls_back_to_eos_only_without_unk():
    t = _Tok(unk=None, eos="</s>")
    loader.ensure_pad_token(t)
    assert t.pad_token == "</s>"
    t = _Tok(unk="<unk>", eos="</s>")
    loader.ensure_pad_token(t)
    assert t.pad_token == "<unk>"
    with pytest.raises(UserError, match="neither pad, unk nor eos"):
        loader.ensure_pad_token(_Tok())


def test_load_base_model_float32_on_cpu(micro):
    import torch

    m = loader.load_base_model(ModelConfig(name_or_path=str(micro["bloom"])), device="cpu")
    assert m.config.model_type == "bloom"
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    m16 = loader.load_base_model(ModelConfig(name_or_path=str(micro["bloom"]), dtype="bf16"), device="cpu")
    assert {p.dtype for p in m16.parameters()} == {torch.bfloat16}


def test_directory_without_weights_is_a_user_error(micro, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(micro["qwen2"] / "config.json", broken / "config.json")
    with pytest.raises(UserError, match=f"could not load model '{broken}'.*\n.*download it first"):
        loader.load_base_model(ModelConfig(name_or_path=str(broken)), device="cpu")


@pytest.mark.parametrize("arch,expected", [("qwen2", QWEN_LLAMA_ALL_LINEAR_R8), ("llama", QWEN_LLAMA_ALL_LINEAR_R8),
                                           ("bloom", BLOOM_ALL_LINEAR_R8)])
def test_lora_all_linear_trainable_parameter_count(micro, arch, expected):
    base = loader.load_base_model(ModelConfig(name_or_path=str(micro[arch])), device="cpu")
    total_base = sum(p.numel() for p in base.parameters())
    model = loader.prepare_for_training(base, LoraConfig(r=8, target_modules="all-linear"))
    trainable, total = loader.count_parameters(model)
    assert trainable == expected
    assert total == total_base + expected
    # The base weights are frozen; only the adapter trains, and lm_head is not adapted.
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert not any("lm_head" in n and "lora_" in n for n, _ in model.named_parameters())


def test_lora_named_targets(micro):
    base = loader.load_base_model(ModelConfig(name_or_path=str(micro["qwen2"])), device="cpu")
    model = loader.prepare_for_training(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert loader.count_parameters(model)[0] == QWEN_QV_R4


def test_full_fine_tuning_trains_everything(micro):
    base = loader.load_base_model(ModelConfig(name_or_path=str(micro["llama"])), device="cpu")
    n = sum(p.numel() for p in base.parameters())
    model = loader.prepare_for_training(base, LoraConfig(enabled=False))
    assert model is base
    assert loader.count_parameters(model) == (n, n)


@pytest.mark.parametrize("arch,names", [
    ("qwen2", ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"]),
    ("bloom", ["dense", "dense_4h_to_h", "dense_h_to_4h", "lm_head", "query_key_value"]),
])
def test_unknown_lora_target_lists_the_linear_modules(micro, arch, names):
    base = loader.load_base_model(ModelConfig(name_or_path=str(micro[arch])), device="cpu")
    with pytest.raises(UserError) as e:
        loader.prepare_for_training(base, LoraConfig(target_modules=["c_attn"]))
    msg = str(e.value)
    assert msg.startswith("lora.target_modules ['c_attn']: ")
    assert msg.endswith(f"Linear modules of this model: {names}")


@pytest.mark.skipif("__import__('torch').cuda.is_available()", reason="checks the CPU message")
def test_qlora_on_cpu_is_a_user_error(micro):
    with pytest.raises(UserError,
                       match="model.quantization: 4bit \\(QLoRA\\) needs a CUDA GPU.*set model.quantization: none"):
        loader.load_base_model(ModelConfig(name_or_path=str(micro["qwen2"]), quantization="4bit"), device="cpu")


@pytest.mark.parametrize("card,expected", [
    ("---\nlicense: mit\ntags: [x]\n---\n# m\n", "mit"),
    ("---\nlicense: other\nlicense_name: qwen\n---\n", "other"),
    ("---\ntags: [x]\n---\n", None),
    ("# no front matter\nlicense: mit\n", None),
    ("---\nlicense: [unclosed\n---\n", None),
])
def test_model_license_from_card(tmp_path, card, expected):
    (tmp_path / "README.md").write_text(card, encoding="utf-8")
    assert loader.model_license(str(tmp_path)) == expected


def test_model_license_without_card(tmp_path):
    assert loader.model_license(str(tmp_path)) is None
    assert loader.model_license("some-org/some-model") is None


def _fake_hub_cache(root: Path, repo_id: str, files: dict[str, str], revision: str = "0123abcd") -> Path:
    """The Hugging Face cache layout: models--ORG--NAME/refs/main holds the commit, snapshots/COMMIT/ the files."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision, encoding="utf-8")
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    for name, text in files.items():
        (snap / name).write_text(text, encoding="utf-8")
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in tmp_path (what HF_HUB_CACHE points at); any network use fails."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.chdir(tmp_path)  # no folder named like an org here
    return cache


def test_model_license_of_a_cached_hub_model(hub_cache):
    """Regression: model_license read local directories only, so run_info.license was null for every hub id."""
    _fake_hub_cache(hub_cache, "some-org/licensed", {"README.md": "---\nlicense: apache-2.0\n---\n# card\n"})
    _fake_hub_cache(hub_cache, "some-org/no-card", {"config.json": "{}"})
    assert loader.model_license("some-org/licensed") == "apache-2.0"
    assert loader.model_license("some-org/no-card") is None
    assert loader.model_license("some-org/not-cached") is None  # never downloaded
    assert loader.model_license("some-org/licensed", revision="other-branch") is None  # not that revision


def test_base_config_dict_local_and_cached(hub_cache, micro):
    assert loader.base_config_dict(str(micro["bloom"])) == json.loads((micro["bloom"] / "config.json").read_text())
    assert loader.base_config_dict(str(micro["bloom"]))["model_type"] == "bloom"
    _fake_hub_cache(hub_cache, "some-org/m", {"config.json": '{"model_type": "qwen2", "torch_dtype": "bfloat16"}'})
    _fake_hub_cache(hub_cache, "some-org/broken", {"config.json": '{"model_type": '})
    _fake_hub_cache(hub_cache, "some-org/list", {"config.json": "[1, 2]"})
    assert loader.base_config_dict("some-org/m") == {"model_type": "qwen2", "torch_dtype": "bfloat16"}
    assert loader.base_config_dict("some-org/broken") is None
    assert loader.base_config_dict("some-org/list") is None
    assert loader.base_config_dict("some-org/not-cached") is None
    assert loader.base_config_dict(str(hub_cache / "no-such-dir")) is None
    assert loader.base_config_dict(str(hub_cache)) is None  # a folder without config.json


def _pickle_only_copy(src: Path, dest: Path) -> Path:
    """The model of `src` with its weights as a pickle (pytorch_model.bin) and no safetensors."""
    import shutil

    import torch
    from safetensors.torch import load_file

    shutil.copytree(src, dest)
    torch.save(load_file(str(dest / "model.safetensors")), dest / "pytorch_model.bin")
    (dest / "model.safetensors").unlink()
    return dest


def test_pickle_weights_are_refused_unless_allowed(micro, tmp_path):
    """Issue 9: a model or adapter whose weights are only .bin/.pt pickles loads only with --allow-pickle."""
    import torch

    folder = _pickle_only_copy(micro["qwen2"], tmp_path / "pickled")
    with pytest.raises(UserError) as e:
        loader.load_base_model(ModelConfig(name_or_path=str(folder)), device="cpu")
    assert str(e.value) == (f"'{folder}' holds its weights only as pickle files (pytorch_model.bin), which can run "
                            "code when loaded. Convert them to safetensors (save_pretrained(..., "
                            "safe_serialization=True) where you trust them), or pass --allow-pickle "
                            "(model.allow_pickle: true) if you trust them")
    with pytest.raises(UserError, match="holds its weights only as pickle files"):
        loader.load_plain_model(folder, device="cpu")
    allowed = loader.load_base_model(ModelConfig(name_or_path=str(folder), allow_pickle=True), device="cpu")
    plain = loader.load_base_model(ModelConfig(name_or_path=str(micro["qwen2"])), device="cpu")
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(allowed(ids).logits, plain(ids).logits)  # the same weights, read from the pickle
    assert torch.equal(loader.load_plain_model(folder, device="cpu", allow_pickle=True)(ids).logits,
                       plain(ids).logits)


def test_cli_refuses_pickle_weights_without_the_flag(micro, tmp_path, sample_data, capsys):
    from domaintune.cli import main

    folder = _pickle_only_copy(micro["qwen2"], tmp_path / "pickled")
    argv = ["predict", str(folder), "--template", "domain_zh", "--data", str(sample_data / "test.jsonl"),
            "--limit", "1", "--max-new-tokens", "2", "--no-eval", "--out", str(tmp_path / "p.jsonl")]
    assert main(argv) == 2
    assert "holds its weights only as pickle files (pytorch_model.bin)" in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists()
    assert main([*argv, "--allow-pickle"]) == 0
    assert len((tmp_path / "p.jsonl").read_text(encoding="utf-8").splitlines()) == 1
