"""The LoRA variants (training/lora_methods.py) through every verb, on the micro qwen2 model: DoRA, rsLoRA, PiSSA,
OLoRA, modules_to_save + layers. Each runs the whole loop once: train (loss goes down), predict, serve (the batcher),
export merged (greedy tokens = the unmerged run's, and predict on the export = predict on the run), GGUF (llama.cpp's
greedy tokens = the run's), the vLLM plan.

SIGKILL + --resume (exact per-step losses) runs for DoRA, PiSSA and modules_to_save + layers:
- PiSSA stands for OLoRA: both resume by building the adapter again on the original base (SVD for PiSSA, QR for
  OLoRA; both deterministic) and loading the checkpoint's A and B into it, the one path the residual inits add;
- modules_to_save + layers and DoRA are the ones whose checkpoints hold more than A and B (full copies of modules;
  DoRA's magnitude vectors);
- rsLoRA changes a constant (the scale) and nothing in the checkpoint: the plain LoRA resume path, which
  tests/training/test_resume_paths.py covers on the packed and the padded path.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llama_cpp_run
from domaintune.errors import UserError
from domaintune.inference.engine import Engine
from domaintune.inference.export import run_export
from domaintune.inference.gguf_export import run_export_gguf
from domaintune.inference.params import GenerationParams
from domaintune.inference.predict import run_predict
from domaintune.inference.vllm_plan import max_lora_rank
from domaintune.rundir import RunDir, latest_checkpoint
from domaintune.training.lora_methods import INITIAL_ADAPTER, build_peft_model, check_lora_choices
from domaintune.training.trainer import run_train

WRAPPER = Path(__file__).resolve().parent / "kill_wrapper.py"
TEST_DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "test.jsonl"
PROMPTS = ["宝宝发烧怎么办？", "How should I store breast milk?"]
MAX_NEW = 12
STEPS = ("train.max_steps=6", "train.save_steps=2", "train.eval_steps=6", "train.learning_rate=0.02")
METHODS = {
    "dora": (("lora.use_dora=true",), True),
    "rslora": (("lora.use_rslora=true",), False),
    "pissa": (("lora.init=pissa",), True),
    "olora": (("lora.init=olora",), False),
    "modules_to_save+layers": (("lora.modules_to_save=[lm_head]", "lora.layers=[1]"), True),
}


def step_losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in RunDir(run).read_log() if "loss" in r]


def greedy(engine: Engine, n: int = MAX_NEW) -> list[list[int]]:
    return [g.token_ids for g in engine.generate(prompts(engine), GenerationParams(max_new_tokens=n), batch_size=1)]


def prompts(engine: Engine) -> list[list[int]]:
    return [engine.encode_messages([{"role": "user", "content": p}]) for p in PROMPTS]


def served(engine: Engine, prompt: str) -> str:
    """The answer of `domaintune serve` (the batcher) to one chat request, greedy."""
    from fastapi.testclient import TestClient

    from domaintune.inference.serve.app import create_app

    with TestClient(create_app(engine), base_url="http://127.0.0.1") as c:
        r = c.post("/v1/chat/completions", json={"model": engine.model_id, "temperature": 0, "max_tokens": MAX_NEW,
                                                 "messages": [{"role": "user", "content": prompt}]})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def killed_then_resumed(tmp_path: Path, cfg, kill_at: str) -> Path:
    """The run of `cfg` SIGKILLed at `kill_at` (kill_wrapper.py), then `domaintune train --resume`; its folder."""
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(cfg.to_yaml(), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DOMAINTUNE_TEST_KILL_AT": kill_at}
    r = subprocess.run([sys.executable, str(WRAPPER), "train", str(cfg_path)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-3000:]
    out = Path(cfg.train.output_dir)
    assert latest_checkpoint(out).name == "checkpoint-2"
    env.pop("DOMAINTUNE_TEST_KILL_AT")
    r = subprocess.run([sys.executable, "-m", "domaintune", "train", str(cfg_path), "--resume"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_resumes_predicts_and_exports(method, tiny_train_config, tmp_path):
    overrides, resume = METHODS[method]
    cfg = tiny_train_config(tmp_path / "run", "qwen2", *overrides, *STEPS)
    run = Path(run_train(cfg))
    losses = step_losses(run)
    assert [s for s, _ in losses] == list(range(1, 7))
    assert losses[-1][1] < losses[0][1]  # it learns

    if resume:  # killed after step 3 (checkpoint-2 is the newest), resumed: the same steps, bit for bit
        other = tiny_train_config(tmp_path / "killed", "qwen2", *overrides, *STEPS)
        assert step_losses(killed_then_resumed(tmp_path, other, "step:3")) == losses

    adapter_cfg = json.loads((run / "adapter_config.json").read_text())
    if method in ("pissa", "olora"):  # converted for the original base: plain LoRA of twice the rank
        assert adapter_cfg["r"] == 16 and adapter_cfg["init_lora_weights"] is True
        assert (run / INITIAL_ADAPTER / "adapter_model.safetensors").is_file()

    engine = Engine.from_run(run)
    tokens = greedy(engine)
    assert tokens != greedy(Engine.from_run(run, base_only=True))  # the adapter is not a no-op
    assert served(engine, PROMPTS[0]) == engine.decode(tokens[0])  # serve and chat: the batcher, the same answer
    merged = run_export(run, tmp_path / "merged", dtype="fp32")
    assert not (merged / "adapter_config.json").exists()
    assert greedy(Engine.from_run(merged)) == tokens
    llm = llama_cpp_run.llama(run_export_gguf(run, tmp_path / "gguf", quant="f32"))  # GGUF, merged first
    assert [llama_cpp_run.llama_greedy(llm, p, MAX_NEW) for p in prompts(engine)] == tokens

    preds = [json.loads(line)["predict"] for line in
             run_predict(run, TEST_DATA, limit=2, evaluate=False).read_text(encoding="utf-8").splitlines()]
    merged_preds = [json.loads(line)["predict"] for line in run_predict(
        merged, TEST_DATA, limit=2, evaluate=False).read_text(encoding="utf-8").splitlines()]
    assert len(preds) == 2 and preds == merged_preds

    if method == "dora" or method.startswith("modules_to_save"):
        with pytest.raises(UserError, match="DoRA adapter" if method == "dora" else "modules_to_save"):
            max_lora_rank(run)  # vLLM refuses them; the merged export is the way out
        with pytest.raises(UserError, match="domaintune export"):
            max_lora_rank(run)
    else:
        assert max_lora_rank(run) == (16 if method in ("pissa", "olora") else 8)


def _base(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _lora(cfg, **update):
    return cfg.lora.model_copy(update=update)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_rslora_scale_is_alpha_over_sqrt_r(tiny_model_dir, tiny_train_config, tmp_path):
    from peft.tuners.lora import LoraLayer

    cfg = tiny_train_config(tmp_path / "unused", "qwen2", "lora.r=16", "lora.alpha=8")
    for rs, want in ((True, 8 / math.sqrt(16)), (False, 8 / 16)):
        model = build_peft_model(_base(tiny_model_dir("qwen2")), _lora(cfg, use_rslora=rs))
        scales = [m.scaling["default"] for m in model.modules() if isinstance(m, LoraLayer)]
        assert scales and all(s == pytest.approx(want, rel=1e-12) for s in scales)


@pytest.mark.filterwarnings("ignore:PiSSA changes the base weights")  # the checkpoint is loaded so on purpose
def test_pissa_starts_as_the_base_and_its_converted_adapter_gives_the_trained_model(tiny_model_dir, tiny_train_config,
                                                                                    tmp_path):
    """PiSSA's model before training outputs what the base does; the run's converted adapter on the ORIGINAL base
    outputs what the trained model (residual base + trained adapter, as in training) does; and a checkpoint of the
    run, loaded on the original base, rebuilds the residual (its adapter_config keeps init pissa)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from domaintune.inference.loading import load_run

    src = tiny_model_dir("qwen2")
    cfg = tiny_train_config(tmp_path / "run", "qwen2", "lora.init=pissa", "train.max_steps=4", "train.save_steps=4")
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    base_out = _logits(_base(src), ids)
    pissa = build_peft_model(_base(src), cfg.lora).eval()
    assert torch.allclose(_logits(pissa, ids), base_out, atol=1e-4)
    residual = pissa.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.allclose(residual, _base(src).model.layers[0].self_attn.q_proj.weight, atol=1e-3)

    run = Path(run_train(cfg))
    trained = build_peft_model(_base(src), cfg.lora).eval()  # the training setting: residual base + adapter
    set_peft_model_state_dict(trained, load_file(run / "checkpoint-4" / "adapter_model.safetensors"))
    trained_out = _logits(trained, ids)
    assert not torch.allclose(trained_out, base_out, atol=1e-3)  # training moved it
    converted = load_run(run, dtype="fp32").model  # the original base + the converted adapter
    assert torch.allclose(_logits(converted, ids), trained_out, atol=1e-4)
    from_checkpoint = load_run(run / "checkpoint-4", dtype="fp32").model
    assert torch.allclose(_logits(from_checkpoint, ids), trained_out, atol=1e-4)
    assert max_lora_rank(run) == 16  # vLLM serves the converted adapter as plain LoRA, not the checkpoint's
    with pytest.raises(UserError, match="checkpoint of a lora.init pissa run"):
        max_lora_rank(run / "checkpoint-4")


@pytest.mark.parametrize("overrides, says", [
    (("lora.init=loftq",), "bitsandbytes on a CUDA GPU"),
    (("lora.init=pissa", "lora.use_dora=true"), "DoRA's magnitudes"),
    (("lora.init=olora", "train.stage=dpo", f"data.path={TEST_DATA.parent / 'preferences.jsonl'}"),
     "reference model"),
    (("lora.init=pissa", "train.distributed=fsdp"), "converted for the original base at the end in one process"),
])
def test_refused_choices_say_why(overrides, says, tiny_train_config, tmp_path):
    if "loftq" in overrides[0] and torch.cuda.is_available():
        pytest.skip("the CPU refusal of LoftQ; a CUDA machine may have bitsandbytes")
    cfg = tiny_train_config(tmp_path / "run", "qwen2", *overrides)
    with pytest.raises(UserError, match=says):
        check_lora_choices(cfg)
    with pytest.raises(UserError, match=says):  # the run stops before any model loads
        run_train(cfg)
    assert not (tmp_path / "run").exists()


def test_unknown_modules_to_save_and_layers_are_named(tiny_model_dir, tiny_train_config, tmp_path):
    cfg = tiny_train_config(tmp_path / "unused", "qwen2")
    with pytest.raises(UserError, match=r"modules_to_save \['lm_hed'\]: no module of that name"):
        build_peft_model(_base(tiny_model_dir("qwen2")), _lora(cfg, modules_to_save=["lm_hed"]))
    with pytest.raises(UserError, match=r"lora.layers \[7\]: this model has layers 0 to"):
        build_peft_model(_base(tiny_model_dir("qwen2")), _lora(cfg, layers=[0, 7]))


def test_layers_adapt_only_those_layers(tiny_model_dir, tiny_train_config, tmp_path):
    cfg = tiny_train_config(tmp_path / "unused", "qwen2")
    model = build_peft_model(_base(tiny_model_dir("qwen2")), _lora(cfg, layers=[1], modules_to_save=["model.norm"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if "lora_" in n]
    assert lora and all(".layers.1." in n for n in lora)
    assert {n.split(".layers.1.")[1].split(".lora_")[0] for n in lora} == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"}  # all-linear inside the layer
    assert [n for n in trainable if "lora_" not in n] == ["base_model.model.model.norm.modules_to_save.default.weight"]
