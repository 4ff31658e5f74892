"""`domaintune export`: merged weights give the adapter's outputs under plain transformers; the chat
template, generation config, template.json and model card are written; sharding, dtypes, refusals."""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from domaintune.cli import main
from domaintune.data.templates import Template
from domaintune.errors import UserError
from domaintune.inference.engine import Engine
from domaintune.inference.export import run_export
from domaintune.inference.params import GenerationParams
from domaintune.training.trainer import run_train

PROMPTS = ["孩子不爱吃饭怎么办", "How do I help my child sleep?", "怎样培养阅读习惯"]
CONVERSATION = [
    {"role": "system", "content": "你是一位温和的家庭教育助手。"},
    {"role": "user", "content": "孩子不睡觉怎么办"},
    {"role": "assistant", "content": "可以先建立固定的睡前流程。"},
    {"role": "user", "content": "What else can I try?"},
]


@pytest.fixture(scope="module")
def lora_run(tiny_train_config, tmp_path_factory):
    """A LoRA run on the micro LLaMA (BOS-adding tokenizer). The conftest config trains 4 steps at a high
    learning rate, so the adapter really changes the answers (asserted below)."""
    return run_train(tiny_train_config(tmp_path_factory.mktemp("lora") / "run", "llama"))


@pytest.fixture(scope="module")
def exported(lora_run, tmp_path_factory):
    return run_export(lora_run, tmp_path_factory.mktemp("export") / "merged", dtype="fp32")


def greedy_ids(engine, n=16):
    prompts = [engine.encode_messages([{"role": "user", "content": p}]) for p in PROMPTS]
    return prompts, [g.token_ids for g in engine.generate(prompts, GenerationParams(max_new_tokens=n), batch_size=1)]


def test_merged_model_matches_adapter_inference(lora_run, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    prompts, adapter_out = greedy_ids(Engine.from_run(lora_run))
    _, base_out = greedy_ids(Engine.from_run(lora_run, base_only=True))
    assert adapter_out != base_out  # the adapter is not a no-op

    tok = AutoTokenizer.from_pretrained(exported)
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert model.dtype == torch.float32
    assert not any("lora" in name for name, _ in model.named_parameters())
    gen_cfg = GenerationConfig.from_pretrained(exported)
    for p, ids, want in zip(PROMPTS, prompts, adapter_out, strict=True):
        enc = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
        enc = enc["input_ids"] if not isinstance(enc, list) else enc
        assert enc == ids  # plain transformers builds the training prompt
        x = torch.tensor([enc])
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False,
                             generation_config=gen_cfg)[0, len(enc):].tolist()
        eos = gen_cfg.eos_token_id if isinstance(gen_cfg.eos_token_id, list) else [gen_cfg.eos_token_id]
        cut = next((k for k, t in enumerate(out) if t in eos), len(out))
        assert out[:cut] == want


def _apply(tok, messages):
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return enc if isinstance(enc, list) else enc["input_ids"]


def test_chat_template_renders_the_training_prompt(lora_run, exported):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported)
    template = Template.load(lora_run / "template.json")
    ours, _ = template.encode(tok, CONVERSATION, add_generation_prompt=True)
    assert _apply(tok, CONVERSATION) == ours
    assert ours[0] == tok.bos_token_id  # LLaMA adds BOS: the exported template starts with {{ bos_token }}
    # the user turn already ends with the assistant prefix: no separate generation prompt
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == tok.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True)
    # a conversation ending with the assistant's answer ends with its EOS, as in training
    ours, _ = template.encode(tok, CONVERSATION[:3])
    assert _apply(tok, CONVERSATION[:3]) == ours and ours[-1] == tok.eos_token_id


def test_data_system_is_the_exported_default_system(tiny_train_config, tmp_path):
    """Regression: a run trained with data.system exported the template's default system prompt (none), so
    the exported model was prompted without the system text it was trained with."""
    from transformers import AutoTokenizer

    run = run_train(tiny_train_config(tmp_path / "run", "llama", "data.system=你是育儿助手。", "train.max_steps=1"))
    out = run_export(run, tmp_path / "merged", dtype="fp32")
    assert Template.load(out / "template.json").default_system == "你是育儿助手。"
    msgs = [{"role": "user", "content": "你好"}]
    assert _apply(AutoTokenizer.from_pretrained(out), msgs) == Engine.from_run(run).encode_messages(msgs)
    assert _apply(AutoTokenizer.from_pretrained(out), CONVERSATION) == Engine.from_run(run).encode_messages(
        CONVERSATION)  # a conversation's own system message still wins


def test_chat_template_with_an_empty_system_message(lora_run, exported):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported)
    msgs = [{"role": "system", "content": ""}, {"role": "user", "content": "你好"}]
    ours, _ = Template.load(lora_run / "template.json").encode(tok, msgs, add_generation_prompt=True)
    assert _apply(tok, msgs) == ours


def test_export_files_and_model_card(lora_run, exported):
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "template.json", "README.md",
            "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
    assert not (exported / "adapter_config.json").exists()
    assert json.loads((exported / "generation_config.json").read_text())["eos_token_id"] == \
        json.loads((lora_run / "generation_config.json").read_text())["eos_token_id"]
    assert json.loads((exported / "template.json").read_text()) == json.loads((lora_run / "template.json").read_text())
    card = (exported / "README.md").read_text(encoding="utf-8")
    front = yaml.safe_load(card.split("---\n")[1])
    info = json.loads((lora_run / "run_info.json").read_text())
    # A local base model: no base_model in the front matter (not a hub id) and no path of this machine anywhere.
    assert front == {"license": "apache-2.0", "library_name": "transformers",
                     "pipeline_tag": "text-generation", "tags": ["domaintune", "lora", "domain_zh"]}
    assert info["base_model"] not in card and f"folder `{Path(info['base_model']).name}`" in card
    assert f"rows: {info['data']['train_rows']} train, {info['data']['eval_rows']} validation" in card
    assert f"steps: 4; tokens: {info['train']['tokens']}" in card
    assert f"best validation loss: {info['train']['best_eval_loss']}" in card
    assert "AutoModelForCausalLM.from_pretrained" in card and "## Evaluation" not in card  # no metrics.json yet
    # domaintune's own loader reuses template.json from the export
    eng = Engine.from_run(exported)
    assert eng.template == Template.load(lora_run / "template.json")


def test_model_card_lists_metrics_and_shards_split(lora_run, exported, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    (run / "metrics.json").write_text(json.dumps({
        "num_samples": 3, "bleu-4": 12.5, "rouge-l": 30.25,
        "judge": {"pairwise": {"win_rate": 0.625, "win_rate_ci95": [0.5, 0.75], "wins": 2, "ties": 1, "losses": 1}},
        "benchmark": {"tasks": {"zh_general_mc": {"base": {"acc": 0.25}, "tuned": {"acc": 0.3}}}}}))
    out = run_export(run, tmp_path / "sharded", dtype="fp32", max_shard_size="300KB")
    card = (out / "README.md").read_text(encoding="utf-8")
    assert ("| metric | value |\n|---|---|\n| num_samples | 3 |\n| bleu-4 | 12.5 |\n| rouge-l | 30.25 |\n"
            "| judged win-rate vs the base model | 0.625 (95% interval 0.5 to 0.75; 2 wins, 1 ties, 1 losses) |\n"
            "| zh_general_mc accuracy (base -> tuned) | 0.25 -> 0.3 |") in card
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    from transformers import AutoModelForCausalLM

    x = torch.tensor([[1, 5, 9, 30]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(out)(x).logits
        b = AutoModelForCausalLM.from_pretrained(exported)(x).logits  # the single-file export
    assert torch.equal(a, b)


def test_full_run_exports_in_the_requested_dtype(tiny_train_config, tmp_path):
    run = run_train(tiny_train_config(tmp_path / "full", "llama", "lora.enabled=false", "train.max_steps=1",
                                      "train.eval_steps=1", "train.save_steps=1"))
    out = run_export(run, tmp_path / "bf16", dtype="bf16")
    assert _saved_dtype(out) == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as f, safe_open(run / "model.safetensors", "pt") as g:
        assert set(f.keys()) == set(g.keys())
        for k in f.keys():
            assert f.get_tensor(k).dtype == torch.bfloat16
            assert torch.equal(f.get_tensor(k), g.get_tensor(k).to(torch.bfloat16)), k
    assert yaml.safe_load((out / "README.md").read_text().split("---\n")[1])["tags"] == \
        ["domaintune", "full", "domain_zh"]


def test_refusals(lora_run, exported, tmp_path, capsys):
    with pytest.raises(UserError, match="is not empty: choose a new folder or pass --overwrite"):
        run_export(lora_run, exported)
    with pytest.raises(UserError, match="must be outside the run directory"):
        run_export(lora_run, lora_run / "export", overwrite=True)
    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "todo.txt").write_text("keep me")
    with pytest.raises(UserError, match="does not look like a model export"):
        run_export(lora_run, stranger, overwrite=True)
    assert (stranger / "todo.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="has no final weights"):
        run_export(tmp_path, tmp_path / "x")
    assert main(["export", str(lora_run), "--out", str(exported)]) == 2
    assert "error: --out" in capsys.readouterr().err


def test_overwrite_replaces_a_previous_export(lora_run, tmp_path):
    out = tmp_path / "again"
    run_export(lora_run, out, dtype="fp32")
    (out / "stale.txt").write_text("old")
    run_export(lora_run, out, dtype="fp16", overwrite=True)
    assert not (out / "stale.txt").exists()
    assert _saved_dtype(out) == "float16"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _full_disk_in_weights(monkeypatch):
    """safetensors on a full disk: part of the shard written, then its SafetensorError (seen on a 2 MB tmpfs)."""
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)


def _full_disk_after_weights(monkeypatch):
    """The weights fit, the next file does not: an OSError without a file name, as a full disk gives on flush."""
    from transformers import GenerationConfig

    def save_pretrained(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(GenerationConfig, "save_pretrained", save_pretrained)


@pytest.mark.parametrize("fail", [_full_disk_in_weights, _full_disk_after_weights])
def test_a_full_disk_keeps_the_previous_export_and_a_rerun_completes(fail, lora_run, tmp_path, monkeypatch,
                                                                    capsys):
    """Regression: --overwrite deleted the previous export before writing (a full disk left config.json and
    generation_config.json), the failure was a traceback, and a failed export left a folder that blocked a
    rerun."""
    out = tmp_path / "merged"
    run_export(lora_run, out, dtype="fp32")
    before = _files(out)
    with monkeypatch.context() as m:
        fail(m)
        with pytest.raises(UserError, match=rf"No space left on device\. The export needs about \d+ MB for its "
                                            rf"weights; '{out}' is unchanged\. Free some space"):
            run_export(lora_run, out, dtype="fp16", overwrite=True)
        assert _files(out) == before  # the previous export, whole
        assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no partial folder left
        capsys.readouterr()
        assert main(["export", str(lora_run), "--out", str(tmp_path / "new"), "--dtype", "fp16"]) == 2
        err = capsys.readouterr().err
        last = err.splitlines()[-1]  # (the lines before: transformers' loading bar)
        assert "Traceback" not in err and last.startswith("error: ") and "No space left on device" in last
        assert "nothing was written" in last
        assert not (tmp_path / "new").exists() and not (tmp_path / "new.partial").exists()
    # space again: the same commands complete, nothing of the failed attempts is in the way
    assert main(["export", str(lora_run), "--out", str(tmp_path / "new"), "--dtype", "fp16"]) == 0
    run_export(lora_run, out, dtype="fp16", overwrite=True)
    assert _saved_dtype(out) == _saved_dtype(tmp_path / "new") == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "new"]


def test_a_failed_swap_puts_the_previous_export_back(lora_run, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    run_export(lora_run, out, dtype="fp32")
    before = _files(out)
    real_replace = os.replace

    def replace(src, dst):
        if str(src).endswith(".partial"):  # the new export into place: fails after the old one moved aside
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace)
        with pytest.raises(UserError, match=rf"'{out}': Permission denied\..*'{out}' is unchanged"):
            run_export(lora_run, out, dtype="fp16", overwrite=True)
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_rerun_cleans_up_after_an_export_killed_during_the_swap(lora_run, exported, tmp_path, capsys):
    """A kill between the swap's two renames leaves OUT.replaced (the previous export) and OUT.partial (the
    new one): the rerun puts the previous export back, removes the unfinished one, then exports as asked."""
    out = tmp_path / "merged"
    shutil.copytree(exported, out.with_name("merged.replaced"))
    shutil.copytree(exported, out.with_name("merged.partial"))
    (out.with_name("merged.partial") / "model.safetensors").write_bytes(b"torn")
    with pytest.raises(UserError, match="is not empty: choose a new folder or pass --overwrite"):
        run_export(lora_run, out, dtype="fp32")  # the previous export is back, so this needs --overwrite
    assert _files(out) == _files(exported)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    err = capsys.readouterr().err
    assert "put back the previous export" in err and "merged.partial', left by an interrupted export" in err
    stranger = out.with_name("merged.partial")
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="is not one an interrupted export left: move it away"):
        run_export(lora_run, out, dtype="fp32", overwrite=True)
    assert (stranger / "notes.txt").read_text() == "keep me"


def test_exported_files_honour_the_umask(lora_run, tmp_path):
    """Regression: safetensors wrote model.safetensors with mode 0600 whatever the umask."""
    old = os.umask(0o027)
    try:
        out = run_export(lora_run, tmp_path / "m", dtype="fp32")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o640}, modes


def _saved_dtype(model_dir) -> str:
    conf = json.loads((model_dir / "config.json").read_text())
    return conf.get("dtype") or conf.get("torch_dtype")  # transformers 5 / 4 spelling


def _fake_hub_cache(root, repo_id: str, config: dict):
    """A Hugging Face cache holding `repo_id`'s config.json at revision main (as a download leaves it)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(config))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)


def test_auto_dtype_reads_a_hub_id_base_from_the_cache(lora_run, tmp_path, monkeypatch):
    """Regression: `--dtype auto` read the base's config.json from a local directory only, so a run on a hub
    id (bigscience/bloomz-560m) exported in fp32 instead of the checkpoint's dtype."""
    import huggingface_hub.constants

    from domaintune.training import model as loader

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    local_base = yaml.safe_load((run / "config.yaml").read_text())["model"]["name_or_path"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["name_or_path"] = "someorg/tiny-base"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    base_config = json.loads((Path(local_base) / "config.json").read_text())
    assert (base_config.get("dtype") or base_config.get("torch_dtype")) == "float32"
    _fake_hub_cache(tmp_path / "hub", "someorg/tiny-base", {**base_config, "dtype": "bfloat16"})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)

    loaded = []
    real_load = loader.load_base_model

    def load_from_local(model_cfg, device=None, dtype=None):  # the weights: the local copy
        loaded.append((model_cfg.name_or_path, dtype))
        return real_load(model_cfg.model_copy(update={"name_or_path": local_base}), device, dtype)

    monkeypatch.setattr(loader, "load_base_model", load_from_local)
    out = run_export(run, tmp_path / "auto")
    assert loaded == [("someorg/tiny-base", torch.bfloat16)]
    assert _saved_dtype(out) == "bfloat16"
    # a base the cache does not hold: the dtype is unknown, fp32
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    out = run_export(run, tmp_path / "unknown")
    assert loaded[-1] == ("someorg/tiny-base", torch.float32) and _saved_dtype(out) == "float32"


def test_model_card_license_comes_from_run_info(lora_run, tmp_path):
    from domaintune.inference.export import model_card
    from domaintune.rundir import RunDir

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    info = json.loads((run / "run_info.json").read_text())
    (run / "run_info.json").write_text(json.dumps({**info, "base_model": "org/base", "license": "mit"}))
    front = yaml.safe_load(model_card(RunDir(run), tmp_path / "out", "domain_zh", "merged", "float32")
                           .split("---\n")[1])
    assert (front["base_model"], front["license"]) == ("org/base", "mit")
    (run / "run_info.json").write_text(json.dumps({**info, "license": None}))
    card = model_card(RunDir(run), tmp_path / "out", "domain_zh", "merged", "float32")
    assert "license" not in yaml.safe_load(card.split("---\n")[1])
    assert "License: not stated by the base model's card" in card


def test_data_system_reaches_the_export_of_a_tokenizer_template_run(tiny_train_config, tmp_path):
    """Regression (issue 27): with data.template: tokenizer, the export dropped data.system: its chat_template, and
    predict or serve on the exported folder, prompted without the system text every training row had. Now the
    exported chat_template adds it where a conversation has none, and the exported folder's engine does too."""
    from transformers import AutoTokenizer

    run = run_train(tiny_train_config(tmp_path / "run", "qwen3", "data.template=tokenizer",
                                      "data.system=你是育儿助手。", "train.max_steps=1"))
    out = run_export(run, tmp_path / "merged", dtype="fp32")
    msgs = [{"role": "user", "content": "你好"}]
    trained = Engine.from_run(run).encode_messages(msgs)
    assert "你是育儿助手。" in Engine.from_run(run).tokenizer.decode(trained)
    assert _apply(AutoTokenizer.from_pretrained(out), msgs) == trained
    assert Engine.from_run(out).encode_messages(msgs) == trained
    own = [{"role": "system", "content": "简短回答。"}, *msgs]  # a conversation's own system message still wins
    assert _apply(AutoTokenizer.from_pretrained(out), own) == Engine.from_run(run).encode_messages(own)
    from domaintune.inference.modelfile import modelfile_text  # Ollama: its own template, with this SYSTEM

    text = modelfile_text("m.gguf", Template.load(out / "template.json"), AutoTokenizer.from_pretrained(out))
    assert 'SYSTEM "你是育儿助手。"' in text.splitlines()
