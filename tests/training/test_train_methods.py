"""Issue 26's training-side methods on the micro qwen2 model (packed rows, the chunked loss), each through the whole
loop: freeze tuning (`freeze`), LoRA+ (`train.loraplus_lr_ratio`) and NEFTune (`train.neftune_alpha`).

Per method: the loss goes down at a fixed seed; a SIGKILL mid-run + `--resume` logs the uninterrupted run's
per-step losses, learning rates and tokens bit for bit; predict works. Then what can fail per method: freeze
changes only the named layers (every other tensor byte-identical to the base's) and its merged export greedy-decodes
as the run; LoRA+'s B matrices get ratio x the learning rate in the Trainer's own optimizer (and on resume the
checkpoint's optimizer state fits its groups); NEFTune leaves the eval loss unchanged and noises the embeddings in
training mode only."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import TrainerCallback

import domaintune.training.run as run_module
from domaintune.errors import UserError
from domaintune.inference.engine import Engine
from domaintune.inference.export import run_export
from domaintune.inference.params import GenerationParams
from domaintune.inference.predict import run_predict
from domaintune.rundir import RunDir
from domaintune.training.optimizers import check_loraplus
from domaintune.training.trainer import run_train

from .test_resume_paths import killed_then_resumed, step_records

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "data"
# 6 steps, a checkpoint every 2 (the kill after step 5 resumes from checkpoint-4), evaluations at 0 and 6.
LOOP = ("train.max_steps=6", "train.save_steps=2", "train.eval_steps=6", "train.trainer_args={eval_on_start: true}")
PROMPTS = ["孩子不爱吃饭怎么办", "How do I help my child sleep?"]


def greedy(engine: Engine) -> list[list[int]]:
    prompts = [engine.encode_messages([{"role": "user", "content": p}]) for p in PROMPTS]
    return [g.token_ids for g in engine.generate(prompts, GenerationParams(max_new_tokens=12), batch_size=1)]


def check_whole_loop(tmp_path: Path, cfg, ref: Path) -> list[tuple]:
    """Loss down, exact resume after a SIGKILL at step 5, predict; returns the reference's step records."""
    steps = step_records(ref)
    assert [s[0] for s in steps] == list(range(1, 7))
    evals = {r["step"]: r["eval_loss"] for r in RunDir(ref).read_log() if "eval_loss" in r}
    assert evals[6] < evals[0]  # the loss goes down, on the same validation rows
    path = RunDir(ref).run_info()["train"]["path"]
    assert (path["batching"], path["loss"]) == ("pack", "chunked")  # the paths the hooks must not break
    killed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"output_dir": str(tmp_path / "killed")})})
    out, ckpt = killed_then_resumed(tmp_path, killed, "step:5")
    assert ckpt is not None and ckpt.name == "checkpoint-4"
    assert step_records(out) == steps
    preds = run_predict(ref, SAMPLE / "test.jsonl", out=tmp_path / "p.jsonl", limit=2, evaluate=False,
                        params=GenerationParams(max_new_tokens=6))
    rows = [json.loads(x) for x in preds.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2 and all(isinstance(r["predict"], str) for r in rows)
    return steps


def test_freeze_trains_only_the_named_layers(tiny_model_dir, tiny_train_config, tmp_path):
    torch.set_num_threads(1)
    base = tiny_model_dir("qwen2")
    cfg = tiny_train_config(tmp_path / "ref", "qwen2", *LOOP, "lora.enabled=false", "freeze.enabled=true",
                            "freeze.last_layers=1", "freeze.modules=[norm]", "train.learning_rate=0.01")
    ref = run_train(cfg)
    check_whole_loop(tmp_path, cfg, ref)
    info = RunDir(ref).run_info()
    n = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    assert info["method"] == "freeze" and info["freeze"] == {"layers": [n - 1], "modules": ["norm"]}
    trained = (f"model.layers.{n - 1}.", "model.norm.")
    with safe_open(base / "model.safetensors", "pt") as b, safe_open(ref / "model.safetensors", "pt") as r:
        assert set(b.keys()) == set(r.keys())
        changed = {k for k in b.keys() if not torch.equal(b.get_tensor(k), r.get_tensor(k))}
        for k in b.keys():
            if not k.startswith(trained):  # byte for byte the base's
                assert b.get_tensor(k).numpy().tobytes() == r.get_tensor(k).numpy().tobytes(), k
    assert changed and all(k.startswith(trained) for k in changed)
    assert any(k.startswith(trained[0]) for k in changed) and "model.norm.weight" in changed
    exported = run_export(ref, tmp_path / "merged", dtype="fp32")
    assert greedy(Engine.from_run(exported, device="cpu")) == greedy(Engine.from_run(ref, device="cpu"))


def test_freeze_refuses_what_it_cannot_find(tiny_train_config, tmp_path):
    for override, message in (("freeze.last_layers=99", "is more than the model's"),
                              ("freeze.modules=[nope]", "no module named 'nope'")):
        cfg = tiny_train_config(tmp_path / override, "qwen2", "lora.enabled=false", "freeze.enabled=true", override)
        with pytest.raises(UserError, match=message):
            run_train(cfg)


class Grab(TrainerCallback):
    """The Trainer's optimizer and the input embeddings' behaviour, seen from inside the run."""

    seen: dict = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.seen["groups"] = [(g["lr"], sorted(id(p) for p in g["params"])) for g in optimizer.param_groups]
        self.seen["names"] = {id(p): n for n, p in model.named_parameters()}
        emb = model.get_input_embeddings()
        self.seen["neftune"] = getattr(emb, "neftune_noise_alpha", None)
        rng, mode = torch.random.get_rng_state(), emb.training  # the run's own draws stay as they were
        ids = torch.arange(8).unsqueeze(0)
        plain = torch.nn.functional.embedding(ids, emb.weight)
        with torch.no_grad():
            emb.eval()
            self.seen["eval_equal"] = torch.equal(emb(ids), plain)
            emb.train()
            self.seen["train_equal"] = torch.equal(emb(ids), plain)
        emb.train(mode)
        torch.random.set_rng_state(rng)


@pytest.fixture
def grab(monkeypatch):
    make = run_module.make_callbacks
    monkeypatch.setattr(run_module, "make_callbacks", lambda *a, **kw: [*make(*a, **kw), Grab()])
    Grab.seen = {}
    return Grab.seen


def test_loraplus_gives_b_matrices_ratio_times_the_learning_rate(tiny_train_config, tmp_path, grab):
    torch.set_num_threads(1)
    cfg = tiny_train_config(tmp_path / "ref", "qwen2", *LOOP, "train.loraplus_lr_ratio=16",
                            "train.learning_rate=0.005", "train.warmup_ratio=0.0")
    ref = run_train(cfg)
    # at train begin the schedule has set step 0's rate: constant warm-up 0, linear decay from the base rate
    lr = {grab["names"][i]: g_lr for g_lr, ids in grab["groups"] for i in ids}
    a = [v for k, v in lr.items() if "lora_A" in k]
    b = [v for k, v in lr.items() if "lora_B" in k]
    assert a and b and len(a) == len(b) and len(lr) == len(grab["names"]) - sum(
        "lora" not in k for k in grab["names"].values())  # every trained parameter, only those
    assert all(x == pytest.approx(0.005) for x in a)
    assert all(x == pytest.approx(16 * 0.005) for x in b)
    check_whole_loop(tmp_path, cfg, ref)
    exported = run_export(ref, tmp_path / "merged", dtype="fp32")
    assert greedy(Engine.from_run(exported, device="cpu")) == greedy(Engine.from_run(ref, device="cpu"))
    with pytest.raises(UserError, match="needs train.distributed: ddp"):
        check_loraplus(cfg.train.model_copy(update={"distributed": "fsdp"}))
    with pytest.raises(UserError, match="built for the sft stage"):
        check_loraplus(cfg.train.model_copy(update={"stage": "dpo"}))


def test_neftune_noises_training_embeddings_only(tiny_train_config, tmp_path, grab):
    torch.set_num_threads(1)
    plain = run_train(tiny_train_config(tmp_path / "plain", "qwen2", *LOOP))
    assert grab["neftune"] is None and grab["train_equal"]
    cfg = tiny_train_config(tmp_path / "ref", "qwen2", *LOOP, "train.neftune_alpha=1")
    ref = run_train(cfg)
    assert grab["neftune"] == 1 and grab["eval_equal"] and not grab["train_equal"]
    evals = [[r["eval_loss"] for r in RunDir(d).read_log() if "eval_loss" in r and r["step"] == 0]
             for d in (plain, ref)]
    assert evals[0] and evals[0] == evals[1]  # the same weights at step 0: evaluation has no noise
    assert step_records(plain)[0][1] != step_records(ref)[0][1]  # training does
    check_whole_loop(tmp_path, cfg, ref)
