"""train.py end to end on micro models: the run-directory contract, step counts, loss going down, exact resume
after a kill, and the errors that must stop a run early (bad model, bad data, QLoRA on CPU, bad LoRA targets)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chat_templates import STRICT_CHATML
from domaintune.config import build_config, load_config
from domaintune.errors import UserError
from domaintune.rundir import RunDir, latest_checkpoint, list_checkpoints
from domaintune.training.arguments import grad_accumulation
from domaintune.training.trainer import run_train

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "data" / "train.jsonl"
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
TRAIN_KEYS = {"step", "epoch", "loss", "learning_rate", "grad_norm", "tokens", "time"}


def sample_rows(n: int) -> list[str]:
    return SAMPLE.read_text(encoding="utf-8").splitlines()[:n]


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """Micro models (conftest; read-only). Requesting them also pins torch to one thread in this process."""
    return {arch: tiny_model_dir(arch) for arch in ("bloom", "qwen2", "llama")}


@pytest.fixture(scope="module")
def data12(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "rows12.jsonl"
    p.write_text("\n".join(sample_rows(12)) + "\n", encoding="utf-8")
    return p


def make_cfg(model_dir, data_path, out, full=False, **sections):
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"enabled": not full},
        "data": {"path": str(data_path), "cutoff_len": 48, "val_size": 2},
        "train": {"output_dir": str(out), "batch_size": 4, "per_device_batch_size": 2, "num_epochs": 2,
                  "learning_rate": 5e-3, "logging_steps": 1, "eval_steps": 1000, "save_steps": 1000},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return build_config(raw, "test")


def train_records(run: Path) -> list[dict]:
    return [r for r in RunDir(run).read_log() if "loss" in r]


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(models, data12, tmp_path_factory):
    """Train each (arch, method) at most once per module; returns (cfg, run_dir, base_hash_before)."""
    root = tmp_path_factory.mktemp("runs")
    cache: dict = {}

    def get(arch: str, method: str):
        if (arch, method) not in cache:
            base_hash = sha256(models[arch] / "model.safetensors")
            cfg = make_cfg(models[arch], data12, root / f"{arch}-{method}", full=method == "full")
            cache[arch, method] = (cfg, run_train(cfg), base_hash)
        return cache[arch, method]

    return get


# ---------------------------------------------------------------- the run-directory contract

@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("arch", ["bloom", "qwen2", "llama"])
def test_run_directory_contract(trained, models, arch, method):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from domaintune.data.prepare import build_datasets
    from domaintune.data.templates import Template, get_template
    from domaintune.training.model import load_tokenizer

    cfg, run, base_hash = trained(arch, method)
    train_rows, epochs = 12 - 2, 2
    expected_steps = math.ceil(train_rows / cfg.train.batch_size) * epochs  # 3 per epoch

    # Weights: the adapter (LoRA) or a full model, safetensors only; no pickles at the top level.
    if method == "lora":
        assert (run / "adapter_model.safetensors").is_file() and (run / "adapter_config.json").is_file()
        assert not (run / "model.safetensors").exists()
        adapter = load_file(run / "adapter_model.safetensors")
        assert adapter and all("lora_" in k for k in adapter)  # no base weights in the adapter file
        lora_b = [v for k, v in adapter.items() if "lora_B" in k]
        assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # B starts at zero: non-zero means trained
        assert sha256(models[arch] / "model.safetensors") == base_hash  # the base is untouched
        assert json.loads((run / "adapter_config.json").read_text())["r"] == cfg.lora.r
    else:
        assert (run / "model.safetensors").is_file() and (run / "config.json").is_file()
        assert not (run / "adapter_model.safetensors").exists()
        before, after = load_file(models[arch] / "model.safetensors"), load_file(run / "model.safetensors")
        assert any(k in after and not (before[k] == after[k]).all() for k in before)
        assert json.loads((run / "config.json").read_text())["model_type"] == arch
    top = [p.name for p in run.iterdir() if p.is_file()]
    assert not [n for n in top if Path(n).suffix in PICKLE_SUFFIXES], top

    # Tokenizer files load back, with the pad token used in training.
    tok = load_tokenizer(str(models[arch]))
    saved = AutoTokenizer.from_pretrained(run)
    assert saved.pad_token_id == tok.pad_token_id is not None
    assert saved.eos_token_id == tok.eos_token_id

    # template.json, config.yaml, generation_config.json
    assert Template.load(run / "template.json") == get_template("domain_zh", tok)
    assert load_config(run / "config.yaml") == cfg
    gen = json.loads((run / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id
    assert gen["pad_token_id"] == tok.pad_token_id

    # log.jsonl: one record per optimizer step, with every field.
    records = train_records(run)
    assert [r["step"] for r in records] == list(range(1, expected_steps + 1))
    assert all(TRAIN_KEYS <= set(r) for r in records)
    assert all(math.isfinite(r["loss"]) for r in records)
    tokens = [r["tokens"] for r in records]
    assert tokens == sorted(set(tokens))  # strictly increasing
    times = [r["time"] for r in records]
    assert times == sorted(times)
    assert records[-1]["epoch"] == pytest.approx(2.0)
    evals = [r for r in RunDir(run).read_log() if "eval_loss" in r]
    assert evals and evals[-1]["step"] == expected_steps

    # run_info.json
    info = RunDir(run).run_info()
    assert info["base_model"] == str(models[arch])
    assert info["license"] == "apache-2.0"
    assert info["method"] == method
    assert info["template"] == "domain_zh"
    assert info["world_size"] == 1
    assert info["data"]["train_rows"] == train_rows and info["data"]["eval_rows"] == 2
    assert info["data"]["overlength"]["policy"] == "truncate"
    assert info["train"]["global_steps"] == expected_steps
    assert info["train"]["final_loss"] == records[-1]["loss"]
    assert info["train"]["best_eval_loss"] == min(r["eval_loss"] for r in evals)
    # Every non-padding input token of every epoch is counted.
    data = build_datasets(cfg.data, tok, get_template("domain_zh", tok), cfg.train.seed)
    assert len(data.train) == train_rows
    assert info["train"]["tokens"] == tokens[-1] == epochs * sum(len(s["input_ids"]) for s in data.train)


def _pads_with_eos(models, dest: Path) -> Path:
    """The micro qwen2 model whose tokenizer pads with EOS, as Qwen2.5's base models and many others do."""
    import shutil

    out = Path(shutil.copytree(models["qwen2"], dest))
    for name, key, value in (("tokenizer_config.json", "pad_token", "</s>"), ("config.json", "pad_token_id", 2),
                             ("generation_config.json", "pad_token_id", 2)):
        conf = json.loads((out / name).read_text(encoding="utf-8"))
        conf[key] = value
        (out / name).write_text(json.dumps(conf), encoding="utf-8")
    return out


@pytest.mark.parametrize("batching", ["pack", "pad"])
def test_every_token_of_every_row_is_counted_when_the_pad_token_is_eos(models, data12, tmp_path, batching):
    """Regression (issue 22, defect 6): packed, with pad == EOS, the count left out every EOS (the Trainer counted
    tokens that are not the pad id, and a packed batch has no attention mask), so 414 tokens were counted of 418."""
    from domaintune.data.prepare import build_datasets
    from domaintune.data.templates import get_template
    from domaintune.training.model import load_tokenizer

    base = _pads_with_eos(models, tmp_path / "eos-pad")
    cfg = make_cfg(base, data12, tmp_path / "run", data={"val_size": 0, "cutoff_len": 512},
                   train={"num_epochs": 1, "batching": batching, "per_device_batch_size": 4})
    run = run_train(cfg)
    info = RunDir(run).run_info()
    assert info["train"]["path"]["batching"] == batching
    tok = load_tokenizer(str(base))
    assert tok.pad_token_id == tok.eos_token_id == 2
    rows = build_datasets(cfg.data, tok, get_template(cfg.data.template, tok), cfg.train.seed).train
    real = sum(len(r["input_ids"]) for r in rows)  # every token of every row, counted here from the rows
    eos = sum(r["input_ids"].count(tok.eos_token_id) for r in rows)
    assert len(rows) == 12 and eos >= 12  # each row's answer ends with EOS
    assert info["train"]["tokens"] == train_records(run)[-1]["tokens"] == real


def test_llama_run_pads_with_unk_and_keeps_eos_trainable(trained, models):
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq

    from domaintune.data.prepare import build_datasets
    from domaintune.data.templates import get_template

    cfg, run, _ = trained("llama", "lora")
    tok = AutoTokenizer.from_pretrained(run)
    assert tok.pad_token == "<unk>" and tok.pad_token_id == tok.unk_token_id != tok.eos_token_id
    assert json.loads((run / "generation_config.json").read_text())["pad_token_id"] == tok.unk_token_id
    # Padding never masks EOS: every sample whose answer fits keeps EOS as a label, padding is -100.
    data = build_datasets(cfg.data.model_copy(update={"cutoff_len": 512}), tok, get_template("domain_zh", tok), 0)
    a, b = sorted(data.train, key=lambda s: len(s["input_ids"]))[::len(data.train) - 1]
    n = len(a["input_ids"])
    assert n < len(b["input_ids"])
    batch = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True)([a, b])
    short = 0
    assert batch["input_ids"][short, n:].eq(tok.pad_token_id).all()
    assert batch["labels"][short, n:].eq(-100).all()
    assert batch["labels"][short, n - 1].item() == tok.eos_token_id
    assert batch["attention_mask"][short, n:].eq(0).all()


def test_same_config_trains_the_same_adapter(trained, tmp_path):
    """The seed covers LoRA's initial weights too (they are drawn before the Trainer seeds anything)."""
    from safetensors.torch import load_file

    cfg, run, _ = trained("qwen2", "lora")
    again = run_train(cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"output_dir": str(tmp_path / "again")})}))
    assert [(r["step"], r["loss"]) for r in train_records(again)] == \
        [(r["step"], r["loss"]) for r in train_records(run)]
    a, b = load_file(run / "adapter_model.safetensors"), load_file(again / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_loss_decreases_with_full_fine_tuning(models, tmp_path):
    data = tmp_path / "rows4.jsonl"
    data.write_text("\n".join(sample_rows(4)) + "\n", encoding="utf-8")
    cfg = make_cfg(models["qwen2"], data, tmp_path / "run", full=True,
                   data={"val_size": 0}, train={"batch_size": 4, "per_device_batch_size": 4, "max_steps": 15,
                                                "learning_rate": 5e-3, "lr_scheduler": "constant", "warmup_ratio": 0.0})
    losses = [r["loss"] for r in train_records(run_train(cfg))]
    assert len(losses) == 15
    assert losses[-1] < 0.6 * losses[0]  # memorising 4 rows: from ~7.6 (ln 2048) to well under 5
    assert sum(b < a for a, b in zip(losses, losses[1:], strict=False)) >= 11  # 13 of 14 steps go down here


def test_quickstart_like_lora_run_lowers_the_loss(models, tmp_path):
    """configs/quickstart.yaml in miniature: same LoRA, template, schedule and batch shape; fewer rows and steps."""
    quick = load_config(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml")
    data = tmp_path / "rows16.jsonl"
    data.write_text("\n".join(sample_rows(16)) + "\n", encoding="utf-8")
    cfg = build_config({
        "model": {"name_or_path": str(models["qwen2"])},
        "lora": quick.lora.model_dump(),
        "data": {**quick.data.model_dump(), "path": str(data), "cutoff_len": 64, "val_size": 0},
        "train": {**quick.train.model_dump(), "output_dir": str(tmp_path / "quick"), "num_epochs": 10,
                  "save_steps": 1000, "eval_steps": 1000},
    }, "test")
    assert (cfg.lora.r, cfg.train.learning_rate, cfg.train.logging_steps) == (16, 2e-3, 5)
    records = train_records(run_train(cfg))
    assert [r["step"] for r in records] == [1, 5, 10, 15, 20]  # 16 rows / batch 8 x 10 epochs
    # The micro model learns slowly (7.64 -> 7.51 here); the quickstart's small model drops much further.
    assert records[-1]["loss"] < records[0]["loss"] - 0.05
    assert records[2]["loss"] < records[0]["loss"]


def test_checkpoints_are_usable_run_directories(models, data12, tmp_path, monkeypatch):
    """Regression: checkpoints lacked template.json and config.yaml, so predict/chat/serve on a checkpoint fell
    back to the tokenizer's chat_template, a prompt the model was never trained on. Also: a relative base-model
    path is recorded absolute in adapter_config.json (every checkpoint's too) and run_info.json."""
    from domaintune.data.templates import Template

    monkeypatch.chdir(tmp_path)
    base = models["qwen2"].resolve()
    rel = os.path.relpath(base, tmp_path)
    cfg = make_cfg(rel, data12, "run", data={"template": "alpaca", "cutoff_len": 256},
                   train={"max_steps": 2, "save_steps": 1, "save_total_limit": None})
    run = tmp_path / run_train(cfg)
    cps = list_checkpoints(run)
    assert [c.name for c in cps] == ["checkpoint-1", "checkpoint-2"]
    for c in cps:
        assert (c / "template.json").read_bytes() == (run / "template.json").read_bytes()
        assert (c / "config.yaml").read_bytes() == (run / "config.yaml").read_bytes()
        assert json.loads((c / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    assert Template.load(cps[0] / "template.json").name == "alpaca"
    saved = load_config(run / "config.yaml")
    assert saved.model.name_or_path == str(base) and saved.data == cfg.data and saved.train == cfg.train
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    assert RunDir(run).run_info()["base_model"] == str(base)
    assert RunDir(run).run_info()["license"] == "apache-2.0"


def _strict_model(models, dest: Path) -> Path:
    """The micro qwen2 model with a chat_template that refuses system messages (as Mistral's, LLaMA-2's, Gemma's)."""
    import shutil

    from transformers import AutoTokenizer

    out = Path(shutil.copytree(models["qwen2"], dest))
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = STRICT_CHATML
    tok.save_pretrained(out)
    return out


def test_chat_template_that_rejects_a_row_names_file_and_line(models, tmp_path, capsys):
    """Regression: the template's raise_exception escaped as a jinja2 traceback from train and data-check."""
    from domaintune.cli import main

    strict = _strict_model(models, tmp_path / "strict")
    rows = sample_rows(4)
    rows[2] = json.dumps({"system": "你是助手。", "instruction": "孩子怕黑怎么办？", "output": "陪她。"},
                         ensure_ascii=False)
    data = tmp_path / "sys.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    cfg = make_cfg(strict, data, out, data={"template": "tokenizer", "val_size": 0})
    expected = (f"{data} line 3: the model's chat_template rejects this conversation (System role not supported); "
                "change the data (e.g. drop the system message) "
                "or use data.template: chatml (or another format template)")
    with pytest.raises(UserError) as e:
        run_train(cfg)
    assert str(e.value) == expected
    assert not out.exists()
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(cfg.to_yaml(), encoding="utf-8")
    capsys.readouterr()
    assert main(["data-check", str(cfg_path)]) == 2
    assert capsys.readouterr().err == f"error: {expected}\n"
    data.write_text("\n".join(sample_rows(4)) + "\n", encoding="utf-8")  # without the system row: fine
    assert main(["data-check", str(cfg_path)]) == 0


# ---------------------------------------------------------------- resume

def test_resume_after_kill_continues_exactly(models, tmp_path):
    data = tmp_path / "rows12.jsonl"
    data.write_text("\n".join(sample_rows(12)) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    cfg_path = tmp_path / "cfg.yaml"
    cfg = make_cfg(models["qwen2"], data, out, lora={"dropout": 0.1},  # dropout: the RNG must resume too
                   data={"cutoff_len": 64, "val_size": 0},
                   train={"max_steps": 10, "save_steps": 4, "save_total_limit": 2, "learning_rate": 1e-2})
    cfg_path.write_text(cfg.to_yaml(), encoding="utf-8")
    cmd = [sys.executable, "-m", "domaintune", "train", str(cfg_path)]
    # One thread everywhere (this process is pinned to one by the models fixture): the same float summation
    # order in the killed, the resumed and the reference run, so their losses can match bit for bit.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while latest_checkpoint(out) is None:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    ckpt = latest_checkpoint(out)
    n = int(ckpt.name.split("-")[1])
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == n
    at_ckpt = json.loads((ckpt / "trainer_state.json").read_text())["num_input_tokens_seen"]
    assert n < 10 and not (out / "run_info.json").exists() and not RunDir(out).has_weights()
    before = RunDir(out).read_log()
    assert [r["step"] for r in before][:n] == list(range(1, n + 1))

    r = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    after = RunDir(out).read_log()
    kept = [x for x in before if x["step"] <= n]
    assert after[:len(kept)] == kept  # log.jsonl cut back to the checkpoint ...
    new = after[len(kept):]
    assert new[0]["step"] == n + 1  # ... and the trainer continued from there, not from zero
    assert [x["step"] for x in after] == list(range(1, 11))  # contiguous, no step twice
    assert min(x["time"] for x in new) >= max(x["time"] for x in kept)
    info = RunDir(out).run_info()
    assert info["train"]["global_steps"] == 10
    assert (info["train"]["path"]["loss"], info["train"]["path"]["batching"]) == ("chunked", "pack")  # fast path
    assert RunDir(out).has_adapter()
    # Throughput counts this session's tokens only (regression: the restored ones were divided by this runtime).
    assert at_ckpt == kept[-1]["tokens"] > 0
    assert info["train"]["tokens"] == after[-1]["tokens"] > at_ckpt
    assert info["train"]["tokens_per_second"] == pytest.approx(
        (info["train"]["tokens"] - at_ckpt) / info["train"]["runtime_s"], rel=0.01, abs=0.2)

    # Exact resume: optimizer, scheduler, RNG and data position restored, so the losses match an uninterrupted run.
    import torch

    assert torch.get_num_threads() == 1
    ref = run_train(cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"output_dir": str(tmp_path / "ref")})}))
    ref_log = RunDir(ref).read_log()
    assert [(x["step"], x["loss"], x["learning_rate"]) for x in ref_log] == \
           [(x["step"], x["loss"], x["learning_rate"]) for x in after]


def test_tokens_per_second_counts_this_session_only(tmp_path):
    from domaintune.rundir import checkpoint_tokens as _tokens_at
    from domaintune.training.outputs import tokens_per_second

    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 4, "num_input_tokens_seen": 400}))
    assert _tokens_at(ckpt) == 400
    assert _tokens_at(None) == 0
    assert tokens_per_second(1000, _tokens_at(ckpt), 2.0) == 300.0
    assert tokens_per_second(1000, 0, 4.0) == 250.0
    assert tokens_per_second(1000, 0, 0.0) is None


def test_resume_without_a_complete_checkpoint_starts_from_the_beginning(models, data12, tmp_path, capsys):
    """Regression (issue 9, defect 5): after a kill during the first checkpoint, --resume said "no complete
    checkpoint; run without --resume" and the run without it said "already holds a run; pass --resume"."""
    from domaintune.cli import main

    out = tmp_path / "run"
    (out / "checkpoint-4").mkdir(parents=True)  # incomplete: no trainer_state.json (killed while saving)
    (out / "checkpoint-4" / "model.safetensors").write_bytes(b"")
    (out / "log.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n', encoding="utf-8")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(make_cfg(models["qwen2"], data12, out, train={"max_steps": 3}).to_yaml(), encoding="utf-8")
    assert main(["train", str(cfg_path)]) == 2  # without --resume: the message says what to pass
    assert "already holds a run. Pass --resume to continue it" in capsys.readouterr().err
    assert main(["train", str(cfg_path), "--resume"]) == 0
    printed = capsys.readouterr().err  # a note: stderr
    assert (f"--resume: '{out}' has no complete checkpoint (the run was stopped before its first checkpoint was "
            "complete; removed checkpoint-4): starting from the beginning\n") in printed
    assert [r["step"] for r in train_records(out)] == [1, 2, 3]  # the old log is gone, not mixed in
    assert RunDir(out).run_info()["train"]["global_steps"] == 3 and RunDir(out).has_adapter()
    assert not (out / "checkpoint-4").exists()


def test_resume_of_a_new_folder_starts_and_of_a_finished_run_without_checkpoints_is_complete(models, data12,
                                                                                           tmp_path, capsys):
    out = tmp_path / "fresh"
    cfg = make_cfg(models["qwen2"], data12, out, train={"max_steps": 1})
    run_train(cfg, resume=True)
    assert f"--resume: '{out}' has no complete checkpoint (the folder is new): starting" in capsys.readouterr().err
    assert RunDir(out).has_adapter()
    import shutil

    for ckpt in list_checkpoints(out):  # a finished run whose checkpoints were deleted to save space
        shutil.rmtree(ckpt)
    files = sorted(p.name for p in out.iterdir())
    run_train(cfg, resume=True)
    assert f"--resume: '{out}' is already complete (1 steps trained;" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == files
    with pytest.raises(UserError, match="--resume continues the run .* and --overwrite deletes it"):
        run_train(cfg, resume=True, overwrite=True)
    (out / "run_info.json").unlink()  # final weights, but killed before the run was complete, and no checkpoint
    with pytest.raises(UserError, match="holds final weights but no run_info.json and no checkpoint to continue "
                                        "from; pass --overwrite"):
        run_train(cfg, resume=True)


def test_a_folder_holding_other_things_is_refused_before_any_work(models, data12, tmp_path, monkeypatch):
    """Regression (issue 9, defect 4): train.output_dir=runs/ (a folder of five runs) was accepted, and the
    adapter, a checkpoint and the config were written among them."""
    from domaintune.training import model as loader

    runs = tmp_path / "runs"
    for name in ("a", "b", "c", "d", "e"):
        (runs / name).mkdir(parents=True)
        (runs / name / "config.yaml").write_text("x: 1\n")
    (runs / ".DS_Store").write_bytes(b"")
    before = sorted(p.name for p in runs.iterdir())
    monkeypatch.setattr(loader, "load_tokenizer", lambda *a, **k: pytest.fail("loaded the tokenizer"))
    for flags in ({}, {"resume": True}, {"overwrite": True}):
        with pytest.raises(UserError) as e:
            run_train(make_cfg(models["qwen2"], data12, runs, train={"max_steps": 1}), **flags)
        if flags.get("overwrite"):
            assert "does not look like a domaintune run directory" in str(e.value)
        else:
            assert str(e.value) == (f"train.output_dir '{runs}' is not empty and holds no domaintune run (a/, b/, c/, "
                                    "d/, e/): training would write its files among them. Set train.output_dir to a "
                                    f"new or empty folder, e.g. {runs / 'my-run'}")
    assert sorted(p.name for p in runs.iterdir()) == before
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".gitkeep").write_text("")  # hidden files alone do not make a folder "not empty"
    monkeypatch.undo()
    run_train(make_cfg(models["qwen2"], data12, tmp_path / "empty", train={"max_steps": 1}))
    assert RunDir(tmp_path / "empty").has_adapter()


def test_only_complete_checkpoints_count(tmp_path):
    for step, state in [(2, "ok"), (10, "ok"), (12, None), (3, "ok"), (14, ""), (16, '{"global_step": 16, "lo')]:
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if state is not None:  # None: not written yet; "" or torn: killed while the Trainer was writing it
            (d / "trainer_state.json").write_text(json.dumps({"global_step": step}) if state == "ok" else state)
    (tmp_path / "checkpoint-x").mkdir()
    (tmp_path / "checkpoint-99").write_text("a file, not a checkpoint")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3", "checkpoint-10"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_existing_run_needs_resume_or_overwrite(trained, models, data12, tmp_path):
    cfg, run, _ = trained("qwen2", "lora")
    log_before = (run / "log.jsonl").read_bytes()
    with pytest.raises(UserError,
                       match="already holds a run. Pass --resume to continue it, --overwrite to start afresh"):
        run_train(cfg)
    assert (run / "log.jsonl").read_bytes() == log_before

    # --overwrite replaces the old run: nothing of it is left.
    out = tmp_path / "run"
    (out / "checkpoint-7").mkdir(parents=True)
    (out / "stale.txt").write_text("old")
    cfg2 = make_cfg(models["qwen2"], data12, out, train={"max_steps": 1})
    with pytest.raises(UserError, match="already holds a run"):
        run_train(cfg2)
    run_train(cfg2, overwrite=True)
    assert not (out / "stale.txt").exists() and not (out / "checkpoint-7").exists()
    assert RunDir(out).run_info()["train"]["global_steps"] == 1


def _model_copy(models, dest: Path) -> Path:
    import shutil

    return Path(shutil.copytree(models["qwen2"], dest))


def test_overwrite_never_deletes_the_base_model(models, data12, tmp_path):
    """Regression: --overwrite ran rmtree on train.output_dir unguarded, even on the base model's folder."""
    base = _model_copy(models, tmp_path / "base")
    files = sorted(p.name for p in base.iterdir())
    cfg = make_cfg(base, data12, base, train={"max_steps": 1})
    with pytest.raises(UserError) as e:
        run_train(cfg, overwrite=True)
    assert str(e.value) == (f"--overwrite: train.output_dir '{base}' is (or contains) the base model '{base}'; "
                            "it will not be deleted. Pick another train.output_dir")
    assert sorted(p.name for p in base.iterdir()) == files

    # A run folder that holds the base model in a subfolder is refused too.
    parent = tmp_path / "runs"
    inner = _model_copy(models, parent / "tiny-model")
    (parent / "checkpoint-2").mkdir()
    (parent / "log.jsonl").write_text("")
    cfg = make_cfg(inner, data12, parent, train={"max_steps": 1})
    with pytest.raises(UserError, match=r"is \(or contains\) the base model"):
        run_train(cfg, overwrite=True)
    assert (inner / "model.safetensors").is_file() and (parent / "checkpoint-2").is_dir()


def test_overwrite_refuses_a_folder_that_is_not_a_run(models, data12, tmp_path):
    other = tmp_path / "exported"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"weights")  # some full model, not a domaintune run
    (other / "config.json").write_text("{}")
    (other / "notes.txt").write_text("mine")
    cfg = make_cfg(models["qwen2"], data12, other, train={"max_steps": 1})
    with pytest.raises(UserError) as e:
        run_train(cfg, overwrite=True)
    assert str(e.value) == (f"--overwrite: '{other}' does not look like a domaintune run directory (no config.yaml, "
                            "log.jsonl, run_info.json or checkpoint-*), so it will not be deleted. Pick another "
                            "train.output_dir, or delete the folder by hand")
    assert sorted(p.name for p in other.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]


@pytest.mark.parametrize("lora, quantization, dtype, device, expected", [
    # LoRA: the frozen base stays in the model dtype; autocast only on CUDA.
    (True, "none", "float32", "cpu", ("float32", False, False)),
    (True, "none", "bfloat16", "cpu", ("bfloat16", False, False)),
    (True, "none", "bfloat16", "cuda", ("bfloat16", True, False)),
    (True, "none", "float16", "cuda", ("float16", False, True)),
    # Full fine-tuning: fp32 master weights always (regression: bf16 on GPUs trained in pure bf16, where AdamW
    # updates round to zero), bf16/fp16 as autocast on CUDA.
    (False, "none", "float32", "cpu", ("float32", False, False)),
    (False, "none", "bfloat16", "cpu", ("float32", False, False)),
    (False, "none", "bfloat16", "cuda", ("float32", True, False)),
    (False, "none", "float16", "cuda", ("float32", False, True)),
    (False, "none", "float32", "cuda", ("float32", False, False)),
    # QLoRA: the dtype is the 4-bit compute dtype.
    (True, "4bit", "bfloat16", "cuda", ("bfloat16", True, False)),
    (True, "4bit", "float16", "cuda", ("float16", False, True)),
    (True, "8bit", "bfloat16", "cuda", ("bfloat16", True, False)),
])
def test_training_precision(lora, quantization, dtype, device, expected):
    import torch

    from domaintune.training.precision import training_precision

    load, bf16, fp16 = training_precision(lora, quantization, getattr(torch, dtype), device)
    assert (str(load).replace("torch.", ""), bf16, fp16) == expected


def test_full_fine_tuning_with_bf16_keeps_fp32_weights(models, tmp_path):
    """model.dtype bf16 + full fine-tuning: the saved weights are fp32 and every step changes them."""
    from safetensors.torch import load_file

    data = tmp_path / "rows4.jsonl"
    data.write_text("\n".join(sample_rows(4)) + "\n", encoding="utf-8")
    cfg = make_cfg(models["qwen2"], data, tmp_path / "run", full=True, model={"dtype": "bf16"},
                   data={"val_size": 0}, train={"batch_size": 4, "per_device_batch_size": 4, "max_steps": 1,
                                                "learning_rate": 2e-5, "warmup_ratio": 0.0})
    run = run_train(cfg)
    before, after = load_file(models["qwen2"] / "model.safetensors"), load_file(run / "model.safetensors")
    assert {v.dtype for v in after.values()} == {__import__("torch").float32}
    changed = sum(int((before[k] != after[k]).sum()) for k in before)
    total = sum(v.numel() for v in before.values())
    assert changed > 0.5 * total  # in pure bf16 almost no weight moves at lr 2e-5


@pytest.mark.parametrize("batch,per_device,world,expected", [(8, 2, 1, 4), (8, 2, 2, 2), (8, 4, 2, 1), (4, 4, 1, 1)])
def test_gradient_accumulation_keeps_the_global_batch(batch, per_device, world, expected):
    t = make_cfg("m", "d", "o", train={"batch_size": batch, "per_device_batch_size": per_device}).train
    assert grad_accumulation(t, world) == expected


def test_gradient_accumulation_errors_and_override():
    t = make_cfg("m", "d", "o", train={"batch_size": 8, "per_device_batch_size": 3}).train
    with pytest.raises(UserError, match="train.batch_size 8 is not a multiple of per_device_batch_size 3 x 1 process"):
        grad_accumulation(t, 1)
    t = make_cfg("m", "d", "o",
                 train={"batch_size": 8, "per_device_batch_size": 3, "gradient_accumulation_steps": 5}).train
    assert grad_accumulation(t, 2) == 5


def test_explicit_accumulation_that_ignores_batch_size_warns(capsys):
    t = make_cfg("m", "d", "o",
                 train={"batch_size": 8, "per_device_batch_size": 3, "gradient_accumulation_steps": 5}).train
    assert grad_accumulation(t, 2) == 5
    assert capsys.readouterr().err == ("warning: train.gradient_accumulation_steps=5 is set, so train.batch_size 8 is "
                                       "ignored: the global batch is 3 per device x 2 process(es) x 5 = 30\n")
    assert grad_accumulation(t, 2, quiet=True) == 5  # ranks other than 0 stay quiet
    t = make_cfg("m", "d", "o",
                 train={"batch_size": 8, "per_device_batch_size": 2, "gradient_accumulation_steps": 2}).train
    assert grad_accumulation(t, 2) == 2  # 2 x 2 x 2 = 8: consistent, nothing to say
    assert grad_accumulation(t, 1) == 2
    assert capsys.readouterr().err.count("warning:") == 1  # world 1: the global batch is 4, not 8


# ---------------------------------------------------------------- early, clear failures

def run_cli(args, cwd, env=None, timeout=60):
    """`python -m domaintune ARGS`; the hub endpoint points at a closed local port, so nothing leaves this machine."""
    base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    base.update(OMP_NUM_THREADS="1", HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(Path(cwd) / "hf-home"))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "domaintune", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env={**base, **(env or {})})
    return r, time.time() - t0


@pytest.mark.parametrize("name,says", [
    ("{tmp}/no-such-model", "' does not exist. Point it at a downloaded model directory or a hub id"),
    ("nonexistent-org/nonexistent-model", "': no folder 'nonexistent-org/nonexistent-model' exists under {tmp}, and "
                                          "as a hub id it is not in the Hugging Face cache and 127.0.0.1 cannot be "
                                          "reached"),
])
def test_missing_model_fails_fast_without_traceback(data12, tmp_path, name, says):
    name, says = name.format(tmp=tmp_path), says.format(tmp=tmp_path)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(make_cfg(name, data12, tmp_path / "out").to_yaml(), encoding="utf-8")
    r, seconds = run_cli(["train", str(cfg_path)], cwd=tmp_path)
    assert r.returncode == 2
    assert seconds < 10
    assert r.stderr.startswith(f"error: model.name_or_path '{name}{says}"), r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_missing_model_is_reported_before_torch_is_imported(data12, tmp_path):
    cfg = make_cfg(tmp_path / "no-such-model", data12, tmp_path / "out")
    script = (
        "import sys\n"
        "from domaintune.config import load_config\n"
        "from domaintune.errors import UserError\n"
        "from domaintune.training.trainer import run_train\n"
        "try:\n"
        "    run_train(load_config(sys.argv[1]))\n"
        "except UserError as e:\n"
        "    print('UserError', 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(cfg.to_yaml(), encoding="utf-8")
    r = subprocess.run([sys.executable, "-c", script, str(cfg_path)], capture_output=True, text=True, timeout=60)
    assert r.stdout == "UserError False False\n", r.stderr


def test_uncached_hub_id_offline_fails_fast_without_traceback(data12, tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(make_cfg("nonexistent-org/nonexistent-model", data12, tmp_path / "out").to_yaml(),
                        encoding="utf-8")
    r, seconds = run_cli(["train", str(cfg_path)], cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and seconds < 10
    assert r.stderr.startswith("error: could not load model 'nonexistent-org/nonexistent-model': ")
    assert "Traceback" not in r.stderr


def test_malformed_data_stops_before_the_model_is_loaded(models, tmp_path, monkeypatch):
    from domaintune.training import model as loader

    rows = sample_rows(6)
    rows[2] = '{"instruction": "缺少答案"}'
    rows[4] = '{"instruction": "x", "output": '
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    cfg = make_cfg(models["llama"], data, out)

    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded despite invalid data")

    monkeypatch.setattr(loader, "load_base_model", must_not_load)
    with pytest.raises(UserError) as e:
        run_train(cfg)
    assert str(e.value) == (f'2 invalid row(s); fix them and run again:\n  {data} line 3: missing "output"\n'
                            f"  {data} line 5: not valid JSON (Expecting value at column 32); "
                            "each line must hold one JSON object")  # the broken line and the bad row at once
    assert not out.exists()

    rows[4] = sample_rows(5)[4]
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(cfg.to_yaml(), encoding="utf-8")
    r, seconds = run_cli(["train", str(cfg_path)], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr == f'error: 1 invalid row(s); fix them and run again:\n  {data} line 3: missing "output"\n'
    assert "model:" not in r.stdout + r.stderr  # the model line (a note, on stderr) is printed right after loading
    assert not out.exists()


@pytest.mark.skipif("__import__('torch').cuda.is_available()", reason="checks the CPU message")
def test_qlora_on_cpu_is_a_user_error(models, data12, tmp_path):
    cfg = make_cfg(models["qwen2"], data12, tmp_path / "out", model={"quantization": "4bit"})
    with pytest.raises(UserError, match="needs a CUDA GPU with bitsandbytes; on CPU set model.quantization: none"):
        run_train(cfg)
    assert not RunDir(tmp_path / "out").has_weights()


def test_unknown_lora_target_is_a_user_error(models, data12, tmp_path):
    cfg = make_cfg(models["llama"], data12, tmp_path / "out", lora={"target_modules": ["query_key_value"]})
    with pytest.raises(UserError) as e:
        run_train(cfg)
    assert str(e.value).startswith("lora.target_modules ['query_key_value']: ")
    assert str(e.value).endswith("Linear modules of this model: "
                                 "['down_proj', 'gate_proj', 'k_proj', 'lm_head', "
                                 "'o_proj', 'q_proj', 'up_proj', 'v_proj']")


def test_missing_tracker_is_reported_before_any_work(tmp_path, monkeypatch):
    import importlib.util

    from domaintune.training.arguments import check_trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb",) else real(name, *a))
    with pytest.raises(UserError, match=r"train.report_to: wandb is not installed. Run `pip install 'wandb'`"):
        check_trackers(["wandb"])
    with pytest.raises(UserError, match="unknown tracker 'tensorbord'"):
        check_trackers(["tensorbord"])
    check_trackers(["none"])  # nothing to check


def test_saved_config_records_a_local_base_model_as_absolute(tmp_path, monkeypatch):
    """Later verbs run from other folders must still find the base model (regression: a relative
    runs/tiny-model in config.yaml broke `chat /abs/path/to/run` from elsewhere)."""
    from domaintune.config import load_config
    from domaintune.training.outputs import saved_config

    (tmp_path / "models" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["model.name_or_path=models/base"])
    assert saved_config(cfg).model.name_or_path == str((tmp_path / "models" / "base").resolve())
    assert saved_config(cfg).train == cfg.train
    hub = load_config(None, ["model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct"])
    assert saved_config(hub).model.name_or_path == "Qwen/Qwen2.5-0.5B-Instruct"


def test_run_tokenizer_chat_template_renders_the_training_prompt(tiny_run):
    """Plain transformers users loading the run's tokenizer get the prompt the model was trained on, not the
    base tokenizer's own chat_template (regression: the run dir kept the base model's ChatML template)."""
    from transformers import AutoTokenizer

    from domaintune.data.templates import Template

    tok = AutoTokenizer.from_pretrained(tiny_run)
    template = Template.load(tiny_run / "template.json")
    assert template.name == "domain_zh"
    msgs = [{"role": "user", "content": "孩子不爱吃饭怎么办？"}, {"role": "assistant", "content": "多陪他一起做饭。"},
            {"role": "user", "content": "How much screen time is fine?"}]
    rendered = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert rendered == ("用户:孩子不爱吃饭怎么办？\n\n助手:多陪他一起做饭。</s>\n\n"
                        "用户:How much screen time is fine?\n\n助手:")
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(ids) == template.encode(tok, msgs, add_generation_prompt=True)[0]


@pytest.mark.parametrize("problem", ["missing", "bad-json", "bad-role", "not-utf8"])
def test_bad_data_is_refused_before_torch_or_transformers_is_imported(models, tmp_path, problem):
    """Regression (issue 9, defect 6): bad data was refused only after transformers and the tokenizer had loaded
    (7-14 s on this machine; a missing file 11 s). The file is now checked first, in about a second."""
    data = tmp_path / "d.jsonl"
    if problem == "bad-json":
        data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n', encoding="utf-8")
    elif problem == "bad-role":
        data.write_text('{"messages": [{"role": "robot", "content": "x"}]}\n', encoding="utf-8")
    elif problem == "not-utf8":
        data.write_bytes(b'{"instruction": "a", "output": "\xff"}\n')
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(make_cfg(models["qwen2"], data, tmp_path / "out").to_yaml(), encoding="utf-8")
    script = ("import sys\nfrom domaintune.config import load_config\nfrom domaintune.errors import UserError\n"
              "from domaintune.training.trainer import run_train\n"
              "try:\n    run_train(load_config(sys.argv[1]))\nexcept UserError as e:\n"
              "    print(repr(str(e)), 'torch' in sys.modules, 'transformers' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", script, str(cfg_path)], capture_output=True, text=True, timeout=60)
    said = {"missing": f"data file '{data}' not found", "bad-json": f"{data} line 2: not valid JSON",
            "bad-role": f"{data} line 1: messages[0].role 'robot'", "not-utf8": f"{data} line 1: invalid UTF-8"}
    assert said[problem] in r.stdout, r.stdout + r.stderr
    assert r.stdout.rstrip().endswith("False False"), r.stdout
    assert not (tmp_path / "out").exists()
