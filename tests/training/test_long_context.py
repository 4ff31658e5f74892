"""Long context (`model.rope_scaling`): a tiny llama whose native length is 128 tokens, LoRA-trained with linear RoPE
scaling x2 on rows of up to 256 tokens, uses the same scaling in every verb.

- train: rows past the native length train whole (none cut), the loss goes down, and the scaling is in the training
  forward (the first step's loss differs from the unscaled run's); SIGKILL + --resume gives the same steps;
- predict, the batcher (chat, serve): a prompt past the native length gives the greedy tokens of plain transformers
  loaded with the same rope parameters (an independent reference), which differ from the unscaled model's;
- export: the merged model's config.json carries the scaling and gives the unmerged run's greedy tokens;
- GGUF: the file carries llama.cpp's rope-scaling keys and llama.cpp's greedy tokens are predict's (linear); yarn's
  logits are transformers' too; dynamic NTK, which llama.cpp lacks, is refused with the reason;
- vLLM plan: a LoRA run with a scaling is refused with the export as the way out; the export passes.

The micro llama of conftest states max_position_embeddings 2048; a copy states 128, so "twice the native length" is
256 tokens and the test stays fast on CPU (linear scaling divides the frequencies by the factor whatever the stated
length; yarn's original length is that stated length)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import llama_cpp_run
from domaintune.config import build_config
from domaintune.errors import UserError
from domaintune.inference.engine import Engine
from domaintune.inference.export import run_export
from domaintune.inference.gguf_export import run_export_gguf
from domaintune.inference.loading import inspect_run
from domaintune.inference.params import GenerationParams
from domaintune.inference.predict import run_predict
from domaintune.inference.vllm_plan import plan_load
from domaintune.rundir import RunDir, latest_checkpoint
from domaintune.training.trainer import run_train

NATIVE, FACTOR = 128, 2.0
LINEAR = {"rope_type": "linear", "factor": FACTOR}
SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "data" / "train.jsonl"
WRAPPER = Path(__file__).resolve().parent / "kill_wrapper.py"
MAX_NEW = 16


@pytest.fixture(scope="module")
def base(tiny_model_dir, tmp_path_factory) -> Path:
    """The micro llama, stating a native length of 128 tokens."""
    out = tmp_path_factory.mktemp("native128") / "llama"
    shutil.copytree(tiny_model_dir("llama"), out)
    conf = json.loads((out / "config.json").read_text(encoding="utf-8"))
    conf["max_position_embeddings"] = NATIVE
    (out / "config.json").write_text(json.dumps(conf), encoding="utf-8")
    return out


def long_text(tok, start: int, lo: int, hi: int) -> str:
    """Sample answers joined from row `start` on, to at least lo tokens, cut back to at most hi."""
    rows = [json.loads(x)["output"] for x in SAMPLE.read_text(encoding="utf-8").splitlines()]
    text, k = "", start
    while len(tok(text)["input_ids"]) < lo:
        text += rows[k % len(rows)]
        k += 1
    while len(tok(text)["input_ids"]) > hi:
        text = text[:-4]
    return text


@pytest.fixture(scope="module")
def data(base, tmp_path_factory) -> Path:
    """16 rows of about 150 to 230 tokens each (prompt + answer): all past the native length, none past 256."""
    from domaintune.training.model import load_tokenizer

    tok = load_tokenizer(str(base))
    ask = "请详细说说怎样培养孩子的好习惯。"
    rows = [{"instruction": ask, "output": long_text(tok, 3 * i, 140, 200)} for i in range(16)]
    p = tmp_path_factory.mktemp("long") / "long.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return p


def make_cfg(base: Path, data: Path, out: Path, rope=LINEAR, **train):
    return build_config({
        "model": {"name_or_path": str(base), "rope_scaling": rope},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"path": str(data), "template": "domain_zh", "cutoff_len": int(NATIVE * FACTOR), "val_size": 0},
        "train": {"output_dir": str(out), "max_steps": 6, "batch_size": 4, "per_device_batch_size": 2,
                  "learning_rate": 0.02, "warmup_ratio": 0.0, "logging_steps": 1, "save_steps": 2, "seed": 3,
                  **train},
    }, "test")


def step_records(run: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["learning_rate"], r["tokens"]) for r in RunDir(run).read_log() if "loss" in r]


@pytest.fixture(scope="module")
def run(base, data, tmp_path_factory) -> Path:
    torch.set_num_threads(1)  # as the killed and resumed subprocesses (OMP_NUM_THREADS=1): the same float sums
    return Path(run_train(make_cfg(base, data, tmp_path_factory.mktemp("rope-run") / "run")))


@pytest.fixture(scope="module")
def long_prompts(base, run) -> tuple[Engine, list[list[int]], list[list[int]]]:
    """The run's engine, two prompts past the native length, and predict's greedy tokens for them."""
    engine = Engine.from_run(run, device="cpu")
    texts = [long_text(engine.tokenizer, k, 140, 220) + "这些办法怎么结合起来用？" for k in (5, 17)]
    prompts = [engine.encode_messages([{"role": "user", "content": t}]) for t in texts]
    assert all(NATIVE < len(p) <= NATIVE * FACTOR - MAX_NEW for p in prompts)
    return engine, prompts, [g.token_ids for g in engine.generate(prompts, GenerationParams(max_new_tokens=MAX_NEW))]


def test_trains_past_the_native_length_with_the_scaling(run, base, data, tmp_path):
    info = RunDir(run).run_info()
    lengths = info["data"]["token_lengths"]
    assert NATIVE < lengths["min"] and lengths["max"] <= NATIVE * FACTOR  # every row past 128 tokens, whole
    assert not info["data"].get("overlength_rows")
    saved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    assert saved["model"]["rope_scaling"] == LINEAR
    steps = step_records(run)
    assert [s[0] for s in steps] == list(range(1, 7)) and steps[-1][1] < steps[0][1]
    # The scaling is in the training forward: the same first step without it computes another loss. (The random
    # micro model's logits are near uniform, so the two differ in the fifth digit; one config run twice gives the
    # same loss bit for bit, which the resume test below relies on.)
    plain = run_train(make_cfg(base, data, tmp_path / "plain", rope=None, max_steps=1))
    assert step_records(plain)[0][1] != steps[0][1]


def test_sigkill_and_resume_give_the_same_steps(run, base, data, tmp_path):
    cfg = make_cfg(base, data, tmp_path / "run")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(cfg.to_yaml(), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DOMAINTUNE_TEST_KILL_AT": "step:3"}
    r = subprocess.run([sys.executable, str(WRAPPER), "train", str(cfg_path)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-3000:]
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-2"
    env.pop("DOMAINTUNE_TEST_KILL_AT")
    r = subprocess.run([sys.executable, "-m", "domaintune", "train", str(cfg_path), "--resume"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert step_records(tmp_path / "run") == step_records(run)


def reference_model(base: Path, run: Path, rope: dict | None):
    """Plain transformers + peft, not domaintune's loader: the base with `rope` as its rope parameters, the adapter."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base)
    if rope is not None:
        config.rope_parameters = {**rope, "rope_theta": config.rope_parameters["rope_theta"]}
    model = AutoModelForCausalLM.from_pretrained(base, config=config, dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(run)).eval()


def test_predict_and_the_batcher_past_the_native_length_equal_transformers(run, base, long_prompts, tmp_path):
    engine, prompts, want = long_prompts
    assert engine.context_len == NATIVE * FACTOR
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"instruction": engine.tokenizer.decode(p), "output": "x"}, ensure_ascii=False)
                            + "\n" for p in prompts), encoding="utf-8")
    rows = [json.loads(x) for x in run_predict(run, data, out=tmp_path / "pred.jsonl", evaluate=False,
                                               params=GenerationParams(max_new_tokens=MAX_NEW), batch_size=1)
            .read_text(encoding="utf-8").splitlines()]
    assert [r["predict"] for r in rows] == [engine.decode(ids) for ids in want]
    assert sum(map(len, want)) > MAX_NEW  # real answers, not immediate stops

    ref = reference_model(base, run, LINEAR)
    for prompt, ids in zip(prompts, want, strict=True):
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=engine.stop_ids,
                               pad_token_id=engine.tokenizer.pad_token_id)[0, len(prompt):].tolist()
        assert [t for t in out if t not in engine.stop_ids][:len(ids)] == ids
        assert "".join(engine.stream(prompt, GenerationParams(max_new_tokens=MAX_NEW))) == engine.decode(ids)
    # The logits too: the run's model computes the scaled reference's, not the unscaled model's (the random micro
    # model is little moved by the rope, 4e-3 measured, far above float noise).
    plain = reference_model(base, run, None)
    with torch.no_grad():
        ours, scaled, unscaled = (m(torch.tensor([prompts[0]])).logits for m in (engine.model, ref, plain))
    assert (ours - scaled).abs().max() < 1e-5 and (ours - unscaled).abs().max() > 1e-3


def test_export_and_gguf_carry_the_scaling(run, long_prompts, tmp_path):
    from gguf import GGUFReader

    engine, prompts, want = long_prompts
    out = run_export(run, tmp_path / "merged")
    conf = json.loads((out / "config.json").read_text(encoding="utf-8"))
    # The scaled config states the length it holds, as the Hub's linear-scaled models do.
    assert conf["rope_parameters"] == {**LINEAR, "rope_theta": 10000.0}
    assert conf["max_position_embeddings"] == NATIVE * FACTOR
    merged = Engine.from_run(out, device="cpu")
    assert merged.context_len == NATIVE * FACTOR
    assert [g.token_ids for g in merged.generate(prompts, GenerationParams(max_new_tokens=MAX_NEW))] == want

    path = run_export_gguf(run, tmp_path / "gguf", quant="f32")
    fields = {k: f.contents() for k, f in GGUFReader(path).fields.items()}
    assert fields["llama.rope.scaling.type"] == "linear" and fields["llama.rope.scaling.factor"] == FACTOR
    assert fields["llama.context_length"] == NATIVE * FACTOR
    llm = llama_cpp_run.llama(path, n_threads=2, n_ctx=int(NATIVE * FACTOR))
    assert [llama_cpp_run.llama_greedy(llm, p, MAX_NEW) for p in prompts] == want

    # vLLM would load the LoRA run's base unscaled: refused, with the export as the way out; the export passes.
    with pytest.raises(UserError, match=r"model.rope_scaling \(linear x2\).*domaintune export"):
        plan_load(inspect_run(run))
    assert plan_load(inspect_run(out)).model == str(out)


def with_rope(run: Path, dest: Path, rope: dict) -> Path:
    """A copy of the run whose config.yaml asks for `rope` (the adapter applies to the base under any scaling)."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoint-*"))
    cfg = yaml.safe_load((dest / "config.yaml").read_text(encoding="utf-8"))
    cfg["model"]["rope_scaling"] = rope
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return dest


def test_yarn_gguf_computes_transformers_logits_and_dynamic_is_refused_with_the_reason(run, long_prompts, tmp_path):
    from gguf import GGUFReader

    _, prompts, _ = long_prompts
    yarn = with_rope(run, tmp_path / "yarn", {"rope_type": "yarn", "factor": FACTOR})
    path = run_export_gguf(yarn, tmp_path / "gguf-yarn", quant="f32")
    fields = {k: f.contents() for k, f in GGUFReader(path).fields.items()}
    assert (fields["llama.rope.scaling.type"], fields["llama.rope.scaling.factor"],
            fields["llama.rope.scaling.original_context_length"],
            fields["llama.context_length"]) == ("yarn", FACTOR, NATIVE, NATIVE * FACTOR)
    engine = Engine.from_run(yarn, device="cpu")
    assert engine.context_len == NATIVE * FACTOR
    llm = llama_cpp_run.llama(path, n_threads=2, n_ctx=int(NATIVE * FACTOR), logits_all=True)
    seq = prompts[0]
    with torch.no_grad():
        theirs = engine.model(torch.tensor([seq])).logits[0].numpy()
    assert np.abs(llama_cpp_run.llama_logits(llm, seq) - theirs).max() < 1e-3

    dynamic = with_rope(run, tmp_path / "dynamic", {"rope_type": "dynamic", "factor": FACTOR})
    # dynamic NTK states the native length, past which transformers stretches the rope base; the engine holds twice it
    assert Engine.from_run(dynamic, device="cpu").context_len == NATIVE * FACTOR
    with pytest.raises(UserError, match="'dynamic' \\(dynamic NTK\\) has no llama.cpp equivalent.*recomputes the "
                                        "rope base.*train with model.rope_scaling rope_type linear or yarn"):
        run_export_gguf(dynamic, tmp_path / "gguf-dynamic", quant="f32")
    assert not (tmp_path / "gguf-dynamic").exists()  # refused before anything loads or is written
    exported = run_export(dynamic, tmp_path / "merged-dynamic")
    with pytest.raises(UserError, match="dynamic NTK RoPE scaling \\(dynamic x2\\).*--engine hf"):
        plan_load(inspect_run(exported))


def test_scaling_over_other_configs():
    """The override keeps the base's own rope settings: a transformers 4 config's top-level rope_theta, Gemma 3's
    sliding layers (only full attention scales); yarn's original length is the native one; the scaled config states
    native x factor; a model without RoPE is refused."""
    from transformers import BloomConfig

    from domaintune.training.rope import apply, context_length, with_scaling

    v4 = {"model_type": "qwen2", "rope_theta": 1e6, "rope_scaling": None, "max_position_embeddings": 32768}
    conf = with_scaling(v4, {"rope_type": "yarn", "factor": 4.0})
    assert conf["rope_parameters"] == {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0,
                                       "original_max_position_embeddings": 32768}
    assert "rope_scaling" not in conf and conf["max_position_embeddings"] == context_length(conf) == 131072
    # Qwen's own yarn configs state the native length beside the original one: the context is still x factor.
    assert context_length({**conf, "max_position_embeddings": 32768}) == 131072
    gemma = {"max_position_embeddings": 1024, "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    conf = with_scaling(gemma, LINEAR)
    assert conf["rope_parameters"] == {"full_attention": {"rope_theta": 1e6, **LINEAR},
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    assert conf["max_position_embeddings"] == context_length(conf) == 2048 and context_length(gemma) == 1024
    with pytest.raises(UserError, match="no rotary position embedding to scale"):
        apply(BloomConfig(), LINEAR, "'bloom'")


def test_full_fine_tuning_saves_the_scaled_config(base, data, tmp_path):
    """A full run saves the model itself: its config.json carries the scaling, and predict's engine holds 256."""
    cfg = make_cfg(base, data, tmp_path / "full", max_steps=1)
    full = run_train(cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"enabled": False})}))
    conf = json.loads((Path(full) / "config.json").read_text(encoding="utf-8"))
    assert conf["rope_parameters"] == {**LINEAR, "rope_theta": 10000.0}
    assert Engine.from_run(full, device="cpu").context_len == NATIVE * FACTOR
