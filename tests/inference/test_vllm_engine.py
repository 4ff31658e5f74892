"""inference.vllm_engine / vllm_plan on a CPU: the guard (no vLLM, no CUDA), what is loaded for each kind of
directory, the vLLM arguments built from domaintune's settings, and domaintune's side of the bridge.

vLLM itself never runs here (it needs a CUDA GPU; bench/vllm_check.py runs it where one is lent). The bridge tests
replay the default engine's own greedy tokens through `VLLMEngine`'s streaming and batching code, through a
stand-in with vLLM's output shape, to check that domaintune cuts, counts and cancels as `Engine` does.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from domaintune.data.templates import Template
from domaintune.errors import UserError
from domaintune.families import ARCHS, TINY, family_of
from domaintune.inference.engine import Engine, StreamState
from domaintune.inference.loading import inspect_run
from domaintune.inference.params import PRESETS, GenerationParams, RequestParams
from domaintune.inference.vllm_engine import (
    ENGINES,
    LoopThread,
    VLLMEngine,
    _Cutter,
    check_engine,
    load_engine,
    require_vllm,
)
from domaintune.inference.vllm_plan import (
    VLLMPlan,
    engine_args,
    loss_summary,
    max_lora_rank,
    model_type_of,
    plan_load,
    sampling_kwargs,
    target_nll,
    vllm_dtype,
)

# ---------------------------------------------------------------- the guard

def test_missing_vllm_names_the_extra_and_the_default_engine(monkeypatch, tiny_run):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now fails as if it were not installed
    with pytest.raises(UserError) as e:
        require_vllm()
    assert "--engine vllm` needs vLLM: pip install 'domaintune[vllm]'" in str(e.value)
    assert "CUDA GPU is required" in str(e.value) and "`--engine hf`" in str(e.value)
    for call in (lambda: VLLMEngine.from_run(tiny_run), lambda: load_engine("vllm", tiny_run)):
        with pytest.raises(UserError, match=r"pip install 'domaintune\[vllm\]'"):  # a run vLLM could serve
            call()


def test_what_vllm_cannot_serve_is_refused_before_asking_to_install_it(monkeypatch, tiny_run_copy):
    """Regression (issue 27): without vLLM, a DoRA run got "pip install 'domaintune[vllm]'"; after that install it
    would have been refused anyway. The plan's refusal, with `domaintune export` as the way out, comes first."""
    monkeypatch.setitem(sys.modules, "vllm", None)
    adapter = tiny_run_copy / "adapter_config.json"
    adapter.write_text(json.dumps({**json.loads(adapter.read_text(encoding="utf-8")), "use_dora": True}),
                       encoding="utf-8")
    with pytest.raises(UserError, match="DoRA adapter") as e:
        VLLMEngine.from_run(tiny_run_copy)
    assert "domaintune export" in str(e.value) and "pip install" not in str(e.value)
    for base_only, said in ((False, "DoRA adapter"), (True, r"pip install 'domaintune\[vllm\]'")):
        with pytest.raises(UserError, match=said):  # predict's and serve's first check; the base alone is servable
            check_engine("vllm", tiny_run_copy, base_only)


def test_vllm_without_a_cuda_gpu_is_refused(monkeypatch, tiny_run):
    import torch

    fake = types.ModuleType("vllm")
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError) as e:
        require_vllm()
    assert "vLLM needs a CUDA GPU; none is visible" in str(e.value) and "`--engine hf`" in str(e.value)
    with pytest.raises(UserError, match="none is visible"):
        VLLMEngine.from_run(tiny_run)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert require_vllm() is fake


def test_importing_the_module_imports_neither_vllm_nor_torch():
    code = ("import sys, domaintune.inference.vllm_engine, domaintune.inference.vllm_plan; "
            "print(sorted(m for m in ('vllm', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_load_engine_kinds(tiny_model_dir):
    assert ENGINES == ("hf", "vllm")
    with pytest.raises(UserError, match="--engine 'tgi': choose hf or vllm"):
        load_engine("tgi", tiny_model_dir())
    engine = load_engine("hf", tiny_model_dir(), template="domain_zh", device="cpu", max_batch_size=3)
    assert isinstance(engine, Engine) and engine.max_batch_size == 3 and str(engine.device) == "cpu"
    with pytest.raises(UserError, match="gpu_memory_utilization apply to --engine vllm only"):
        load_engine("hf", tiny_model_dir(), template="domain_zh", gpu_memory_utilization=0.5)


# ---------------------------------------------------------------- what is loaded

def _run_dir(tmp_path: Path, tiny_train_config, *overrides: str, adapter: dict | None = None, full: bool = False,
             config: bool = True, arch: str = "qwen2", model_config: dict | None = None) -> Path:
    """A run directory with only the files the planning reads: config.yaml, adapter_config.json and (empty) weights;
    a full run's config.json is `model_config` ({} by default)."""
    run = tmp_path / "run"
    run.mkdir(parents=True)
    cfg = tiny_train_config(run, arch, *overrides)
    if config:
        (run / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    if full:
        (run / "config.json").write_text(json.dumps(model_config or {}), encoding="utf-8")
        (run / "model.safetensors").write_bytes(b"")
    else:
        base = {"base_model_name_or_path": cfg.model.name_or_path, "r": 8}
        (run / "adapter_config.json").write_text(json.dumps({**base, **(adapter or {})}), encoding="utf-8")
        (run / "adapter_model.safetensors").write_bytes(b"")
    return run


def test_plan_for_a_lora_run_and_its_base(tmp_path, tiny_train_config, tiny_model_dir):
    run = _run_dir(tmp_path, tiny_train_config)
    base = str(tiny_model_dir().resolve())
    plan = plan_load(inspect_run(run))
    assert plan == VLLMPlan(base, str(run), str(run.resolve()), 8, None, False, None, False)
    only_base = plan_load(inspect_run(run, base_only=True), base_only=True)
    assert (only_base.model, only_base.lora_path, only_base.max_lora_rank) == (base, None, None)
    assert only_base.tokenizer == str(run)  # the run's tokenizer, as load_run uses it


def test_plan_for_full_runs_exports_and_plain_model_directories(tmp_path, tiny_train_config, tiny_model_dir):
    run = _run_dir(tmp_path, tiny_train_config, "lora.enabled=false", full=True)
    plan = plan_load(inspect_run(run))
    assert (plan.model, plan.tokenizer, plan.lora_path, plan.quantization) == (str(run), str(run), None, None)
    plain = tiny_model_dir()
    assert plan_load(inspect_run(plain)) == VLLMPlan(str(plain), str(plain), None, None, None, False, None, False)
    trusted = _run_dir(tmp_path / "t", tiny_train_config, "model.trust_remote_code=true")
    assert plan_load(inspect_run(trusted)).trust_remote_code  # from the run's config, and only from there


def test_adapter_without_config_yaml_uses_adapter_configs_base(tmp_path, tiny_train_config, tiny_model_dir):
    run = _run_dir(tmp_path, tiny_train_config, config=False)
    assert plan_load(inspect_run(run)).model == str(tiny_model_dir().resolve())


@pytest.mark.parametrize(("adapter", "want"), [({"r": 1}, 8), ({"r": 8}, 8), ({"r": 12}, 16), ({"r": 256}, 256),
                                               ({"r": 8, "rank_pattern": {"q_proj": 40}}, 64)])
def test_max_lora_rank_rounds_up_to_a_rank_vllm_accepts(tmp_path, adapter, want):
    (tmp_path / "adapter_config.json").write_text(json.dumps(adapter), encoding="utf-8")
    assert max_lora_rank(tmp_path) == want


@pytest.mark.parametrize(("adapter", "match"), [({"r": 1024}, "above vLLM's largest max_lora_rank"),
                                                ({"r": 8, "use_dora": True}, "DoRA adapter"),
                                                ({}, "cannot read the adapter's rank")])
def test_adapters_vllm_cannot_apply_are_refused_with_what_to_do(tmp_path, adapter, match):
    (tmp_path / "adapter_config.json").write_text(json.dumps(adapter), encoding="utf-8")
    with pytest.raises(UserError, match=match) as e:
        max_lora_rank(tmp_path)
    assert "domaintune export" in str(e.value) or "complete" in str(e.value)


def test_qlora_runs(tmp_path, tiny_train_config):
    four = plan_load(inspect_run(_run_dir(tmp_path / "4", tiny_train_config, "model.quantization=4bit")))
    assert (four.quantization, four.max_lora_rank) == ("bitsandbytes", 8) and four.lora_path
    assert "load_format" not in engine_args(four, 16, "bfloat16")  # vLLM picks its bitsandbytes loader
    eight = _run_dir(tmp_path / "8", tiny_train_config, "model.quantization=8bit")
    with pytest.raises(UserError, match="8-bit base.*domaintune export"):
        plan_load(inspect_run(eight))


def test_pickle_only_base_is_refused_unless_allowed(tmp_path, tiny_train_config):
    base = tmp_path / "pickled-base"
    base.mkdir()
    (base / "config.json").write_text("{}", encoding="utf-8")
    (base / "pytorch_model.bin").write_bytes(b"")
    run = _run_dir(tmp_path, tiny_train_config, f"model.name_or_path={base}")
    with pytest.raises(UserError, match="pickle"):
        plan_load(inspect_run(run))
    plan = plan_load(inspect_run(run), allow_pickle=True)
    assert plan.allow_pickle and "load_format" not in engine_args(plan, 16, "bfloat16")


# ---------------------------------------------------------------- what vLLM serves, per family

@pytest.mark.parametrize("arch", ARCHS)
def test_the_plan_for_every_tiny_family(tmp_path, tiny_train_config, tiny_model_dir, arch):
    """Every tiny family is one vLLM serves: its model directory and its full runs as they are; its LoRA runs with
    the adapter, except where vLLM has no LoRA for the family (BLOOM), which is refused before anything loads."""
    model = tiny_model_dir(arch)
    kind = model_type_of(str(model))
    family = family_of(kind)
    assert kind == json.loads((model / "config.json").read_text(encoding="utf-8"))["model_type"]
    assert family.name == TINY[arch].family and family.vllm
    assert plan_load(inspect_run(model)).model == str(model)
    full = _run_dir(tmp_path / "full", tiny_train_config, "lora.enabled=false", full=True, arch=arch,
                    model_config={"model_type": kind})
    assert plan_load(inspect_run(full)).model == str(full)
    run = _run_dir(tmp_path / "lora", tiny_train_config, arch=arch)
    base = plan_load(inspect_run(run, base_only=True), base_only=True)
    assert (base.model, base.lora_path) == (str(model.resolve()), None)  # the base alone: served as any model
    if not family.vllm_lora:
        with pytest.raises(UserError) as e:
            plan_load(inspect_run(run))
        assert str(e.value) == (f"'{run}' is a LoRA adapter on a bloom model, and vLLM has no LoRA support for bloom "
                                f"(its supported-models list): merge it (`domaintune export {run}`) and serve the "
                                "exported folder with --engine vllm, or use `--engine hf`")
    else:
        plan = plan_load(inspect_run(run))
        assert (plan.model, plan.lora_path, plan.max_lora_rank) == (str(model.resolve()), str(run.resolve()), 8)
        assert engine_args(plan, 16, "float32")["enable_lora"] is True


def test_a_family_vllm_does_not_serve_is_refused_before_anything_loads(tmp_path, tiny_train_config, monkeypatch):
    """A full run or model directory of such a family, and a LoRA run on one: refused by the plan, with the way out
    (`--engine hf`); `VLLMEngine.from_run` plans before vLLM starts. A model_type no family lists is left to vLLM."""
    full = _run_dir(tmp_path / "full", tiny_train_config, "lora.enabled=false", full=True,
                    model_config={"model_type": "yi"})
    assert not family_of("yi").vllm
    with pytest.raises(UserError) as e:
        plan_load(inspect_run(full))
    assert str(e.value) == (f"'{full}' is a yi model (model_type yi), which vLLM does not serve: use `--engine hf` "
                            "(the default engine)")
    base = tmp_path / "yi-base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "yi"}), encoding="utf-8")
    (base / "model.safetensors").write_bytes(b"")
    run = _run_dir(tmp_path / "lora", tiny_train_config, f"model.name_or_path={base}")
    with pytest.raises(UserError, match="is a yi model .*which vLLM does not serve: use `--engine hf`"):
        plan_load(inspect_run(run))
    other = _run_dir(tmp_path / "other", tiny_train_config, "lora.enabled=false", full=True,
                     model_config={"model_type": "falcon"})  # not in families.py: vLLM decides
    assert plan_load(inspect_run(other)).model == str(other)

    import torch

    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))  # a vLLM and a GPU that must not be reached
    monkeypatch.setitem(sys.modules, "vllm.engine.arg_utils", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(UserError, match="which vLLM does not serve"):
        VLLMEngine.from_run(full)


def test_model_type_of_reads_config_json_only(tmp_path):
    assert model_type_of(str(tmp_path)) is None  # no config.json
    (tmp_path / "config.json").write_text("not json", encoding="utf-8")
    assert model_type_of(str(tmp_path)) is None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}), encoding="utf-8")
    assert model_type_of(str(tmp_path)) == "gemma3_text" and family_of("gemma3_text").name == "gemma3"
    assert model_type_of("no-such-org/no-such-model") is None  # a hub id not in the local cache: nothing known


# ---------------------------------------------------------------- vLLM's arguments

def test_engine_args():
    plan = VLLMPlan("/base", "/run", "/run", 16, None, False, "main", False)
    kw = engine_args(plan, 32, "bfloat16", {"gpu_memory_utilization": 0.5})
    assert kw == {"model": "/base", "tokenizer": "/run", "trust_remote_code": False, "dtype": "bfloat16",
                  "max_num_seqs": 32, "revision": "main", "enable_lora": True, "max_lora_rank": 16, "max_loras": 1,
                  "load_format": "safetensors", "disable_log_stats": True, "gpu_memory_utilization": 0.5}
    assert engine_args(plan, 8, "float16", {"disable_log_stats": False})["disable_log_stats"] is False
    plain = engine_args(VLLMPlan("/m", "/m", None, None, None, True, None, False), 8, "float16")
    assert "enable_lora" not in plain and plain["trust_remote_code"] is True
    for clash in ({"dtype": "float32"}, {"trust_remote_code": True}, {"max_num_seqs": 4}, {"enable_lora": False}):
        with pytest.raises(UserError, match="decided by the run directory"):
            engine_args(plan, 8, "float16", clash)


def test_vllm_dtype():
    assert [vllm_dtype(n) for n in ("auto", "bf16", "fp16", "fp32")] == ["auto", "bfloat16", "float16", "float32"]
    with pytest.raises(UserError, match="--dtype 'int8'"):
        vllm_dtype("int8")


def test_sampling_kwargs_follow_generation_params():
    greedy = sampling_kwargs(GenerationParams(max_new_tokens=7, repetition_penalty=1.2, seed=3), [2, 9], ["<|im_end|>"])
    assert greedy == {"max_tokens": 7, "repetition_penalty": 1.2, "stop_token_ids": [2, 9], "ignore_eos": True,
                      "stop": ["<|im_end|>"], "seed": 3, "skip_special_tokens": True, "temperature": 0.0}
    chat = sampling_kwargs(PRESETS["chat"], [2], [])
    assert (chat["temperature"], chat["top_p"], chat["top_k"], chat["stop"]) == (0.7, 0.9, 50, None)
    assert sampling_kwargs(PRESETS["serve"], [2], [])["top_k"] == -1  # 0 = off: -1 to vLLM, accepted by every version
    assert sampling_kwargs(PRESETS["chat"].with_temperature(0), [2], [])["temperature"] == 0.0  # greedy
    with pytest.raises(UserError, match="not by beam search"):
        sampling_kwargs(GenerationParams(num_beams=4), [2], [])


def test_sampling_kwargs_pass_a_requests_penalties_and_logit_bias():
    """Regression: the server's presence/frequency penalties and logit_bias (RequestParams) were not passed to vLLM,
    so `--engine vllm` refused them; vLLM's SamplingParams takes them under the same names."""
    pen = RequestParams(max_new_tokens=7, presence_penalty=0.5, frequency_penalty=-1.5,
                        logit_bias=((5, 2.0), (9, -100.0)))
    kw = sampling_kwargs(pen, [2], [])
    assert (kw["presence_penalty"], kw["frequency_penalty"], kw["logit_bias"]) == (0.5, -1.5, {5: 2.0, 9: -100.0})
    assert kw["max_tokens"] == 7 and kw["temperature"] == 0.0
    bias = sampling_kwargs(RequestParams(logit_bias=((3, 1.0),)), [2], [])
    assert (bias["presence_penalty"], bias["frequency_penalty"], bias["logit_bias"]) == (0.0, 0.0, {3: 1.0})
    only_penalty = sampling_kwargs(RequestParams(frequency_penalty=1.0), [2], [])
    assert (only_penalty["frequency_penalty"], only_penalty["logit_bias"]) == (1.0, None)
    plain = sampling_kwargs(RequestParams(max_new_tokens=7), [2], [])  # nothing set: the plain arguments
    assert plain == sampling_kwargs(GenerationParams(max_new_tokens=7), [2], [])


def test_loss_from_prompt_logprobs_equals_the_default_engines(tiny_run, sample_data):
    """target_nll reads position p's entry for the token at p, as the teacher-forced loss shifts its logits."""
    import torch

    from domaintune.data.examples import load_examples
    from domaintune.evaluation.loss import last_turn_samples

    engine = Engine.from_run(tiny_run, device="cpu")
    examples = load_examples(sample_data / "test.jsonl", require_answer=False, template=engine.template)[:4]
    want = engine.loss_on_targets(examples)
    samples = last_turn_samples(examples, engine.tokenizer, engine.template, engine.cutoff_len, engine.default_system)
    total, count = 0.0, 0
    for k, s in enumerate(samples):
        with torch.no_grad():
            logprobs = torch.log_softmax(engine.model(input_ids=torch.tensor([s["input_ids"]])).logits[0].float(), -1)
        # vLLM's shape: entry 0 is None, entry p maps token ids (the prompt's own included) to Logprob objects
        entries = [None] + [{t: (SimpleNamespace(logprob=logprobs[p - 1, t].item()) if k % 2 else
                                 logprobs[p - 1, t].item()) for t in {tok, 0}} for p, tok in
                            enumerate(s["input_ids"]) if p > 0]
        t, c = target_nll(s["labels"], entries)
        total, count = total + t, count + c
    got = loss_summary(total, count)
    assert got["target_tokens"] == want["target_tokens"] and got["loss"] == pytest.approx(want["loss"], abs=1e-5)
    assert loss_summary(0.0, 0) == {}
    assert loss_summary(4.0, 2, reduce=lambda v: [v[0] * 2, v[1] * 2]) == {"loss": 2.0, "perplexity": 7.3891,
                                                                        "target_tokens": 4}


# ---------------------------------------------------------------- domaintune's side of the bridge

@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return Engine.from_run(tiny_model_dir(), template="domain_zh", device="cpu")


def _stop_engine(tiny: Engine, prompt: list[int]) -> tuple[Engine, str]:
    """An engine whose template stops at a multi-token string from the middle of `prompt`'s greedy answer."""
    [full] = tiny.generate([prompt], GenerationParams(max_new_tokens=24))
    for k in range(4, len(full.token_ids) - 3):
        s = tiny.decode(full.token_ids[k: k + 2])
        if len(s) >= 2 and "\ufffd" not in s and s.strip() == s and full.text.index(s) > 0:
            tpl = Template.from_dict({**tiny.template.to_dict(), "stop": [s]})
            return Engine(tiny.model, tiny.tokenizer, tpl, "m"), s
    raise AssertionError("no two-token piece in the answer")


def test_cutter_cuts_as_the_default_engine(tiny):
    prompt = tiny.encode_messages([{"role": "user", "content": "孩子不爱吃饭怎么办"}])
    engine, stop = _stop_engine(tiny, prompt)
    params = GenerationParams(max_new_tokens=24)
    [want] = engine.generate([prompt], params)
    [full] = tiny.generate([prompt], params)
    assert stop not in want.text and want.finish_reason == "stop"
    for chunk in (1, 3):  # vLLM may deliver several tokens at once
        state = StreamState()
        cut, deltas = _Cutter(engine, state), []
        for n in range(chunk, len(full.token_ids) + chunk, chunk):
            deltas.append(cut.feed(full.token_ids[:n]))
            if cut.done:
                break
        deltas.append(cut.finish(params.max_new_tokens))
        assert "".join(deltas) == want.text == state.text
        assert (state.token_ids, state.finish_reason) == (want.token_ids, "stop")
    # a stop token ends the text; without any stop the reason is "length"
    eos = tiny.tokenizer.eos_token_id
    state = StreamState()
    cut = _Cutter(tiny, state)
    assert "".join([cut.feed(full.token_ids[:5] + [eos, 7, 8]), cut.finish(24)]) == tiny.decode(full.token_ids[:5])
    assert (state.token_ids, state.finish_reason) == (full.token_ids[:5], "stop")
    state = StreamState()
    cut = _Cutter(tiny, state)
    assert "".join([cut.feed(full.token_ids), cut.finish(24)]) == full.text and state.finish_reason == "length"


def test_loop_thread_bridges_an_async_iterator_and_cancels_it():
    loop = LoopThread()
    cancelled = threading.Event()

    async def count(limit=None):
        try:
            n = 0
            while limit is None or n < limit:
                await asyncio.sleep(0.005)
                yield n
                n += 1
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def broken():
        yield 1
        raise ValueError("engine failed")

    try:
        assert list(loop.iterate(lambda: count(4))) == [0, 1, 2, 3] and not cancelled.is_set()
        stop = threading.Event()
        got = []
        for n in loop.iterate(lambda: count(), stop):  # a client leaves after three items
            got.append(n)
            if n == 2:
                stop.set()
        assert got == [0, 1, 2] and cancelled.wait(1)
        cancelled.clear()
        it = loop.iterate(lambda: count())
        assert next(it) == 0
        it.close()  # the consumer went away
        assert cancelled.wait(1)
        with pytest.raises(ValueError, match="engine failed"):
            list(loop.iterate(broken))
    finally:
        loop.close()
    assert not loop.thread.is_alive()


class _Replay:
    """Stands in for vLLM's async engine on a CPU: replays the default engine's greedy tokens for each prompt in
    vLLM's cumulative output shape, one token per step. It checks domaintune's side of the bridge, not vLLM."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.seen, self.aborted = engine, [], 0

    async def generate(self, prompt, sp, request_id, lora_request=None):
        self.seen.append((prompt, sp, lora_request))
        ids = self.engine.generate([prompt["prompt_token_ids"]], GenerationParams(max_new_tokens=sp["max_tokens"]))
        try:
            for n in range(1, len(ids[0].token_ids) + 1):
                await asyncio.sleep(0.002)
                yield SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids[0].token_ids[:n])])
        except asyncio.CancelledError:
            self.aborted += 1
            raise


@pytest.fixture
def bridged(tiny):
    engine, _ = _stop_engine(tiny, tiny.encode_messages([{"role": "user", "content": "孩子不爱吃饭怎么办"}]))
    replay = _Replay(engine)
    vengine = VLLMEngine(replay, LoopThread(), engine.tokenizer, engine.template, "m", 2048, 2, dict,
                         lora_request="adapter")
    yield engine, vengine, replay
    vengine.loop.close()


def test_stream_and_generate_match_the_default_engine(bridged, sample_data):
    engine, vengine, replay = bridged
    assert (vengine.stop_ids, vengine.stop_strings) == (engine.stop_ids, engine.stop_strings)
    msgs = [[{"role": "user", "content": q}] for q in ("孩子不爱吃饭怎么办", "How do I help my child sleep?", "你好")]
    prompts = [vengine.encode_messages(m) for m in msgs]
    assert prompts == [engine.encode_messages(m) for m in msgs]
    params = GenerationParams(max_new_tokens=16)
    want = engine.generate(prompts, params)
    for p, w in zip(prompts, want, strict=True):
        state = StreamState()
        assert "".join(vengine.stream(p, params, state=state)) == w.text == state.text
        assert (state.token_ids, state.finish_reason, state.prompt_tokens) == (w.token_ids, w.finish_reason, len(p))
    got = vengine.generate(prompts, params, batch_size=1)
    assert [(g.text, g.token_ids, g.finish_reason) for g in got] == [(w.text, w.token_ids, w.finish_reason)
                                                                      for w in want]
    assert all(sp["stop"] == engine.stop_strings and lora == "adapter" for _, sp, lora in replay.seen)
    status = vengine.batch_status()
    assert status["running"] == status["queued"] == 0 and status["completed"] == 6 and status["max_batch_size"] == 2
    with pytest.raises(UserError, match="exceeds the model's context"):
        list(vengine.stream(prompts[0], GenerationParams(max_new_tokens=4096)))


def test_a_client_that_leaves_aborts_its_request(bridged):
    engine, vengine, replay = bridged
    prompt = vengine.encode_messages([{"role": "user", "content": "How do I help my child sleep?"}])
    stop, state = threading.Event(), StreamState()
    params = GenerationParams(max_new_tokens=200)
    stream = vengine.stream(prompt, params, stop_event=stop, state=state)
    first = next(stream)
    stop.set()
    t0 = time.perf_counter()
    rest = "".join(stream)
    assert time.perf_counter() - t0 < 1 and (first + rest) == state.text
    deadline = time.time() + 2
    while vengine.batch_status()["stopped"] < 1 and time.time() < deadline:
        time.sleep(0.01)
    assert replay.aborted == 1 and vengine.batch_status()["running"] == 0


def test_the_server_passes_penalties_and_logit_bias_to_vllm(bridged):
    """Regression: with `--engine vllm` the server refused presence/frequency penalties and logit_bias (400 "not
    supported by this engine"). They reach vLLM's SamplingParams (here the stand-in's dict), and a logit_bias token
    id past vLLM's vocabulary is still a 400 naming it."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from domaintune.inference.serve.app import create_app
    from served_tiny_model import running_app

    _, vengine, replay = bridged
    body = {"model": "m", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4, "temperature": 0,
            "presence_penalty": 0.5, "frequency_penalty": -1, "logit_bias": {"5": 2}}
    with running_app(create_app(vengine)) as url:
        for stream in (False, True):
            r = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": stream}, timeout=60)
            assert r.status_code == 200, r.text
            sp = replay.seen[-1][1]
            assert (sp["presence_penalty"], sp["frequency_penalty"], sp["logit_bias"]) == (0.5, -1.0, {5: 2.0})
        last = vengine.vocab_size
        r = httpx.post(f"{url}/v1/chat/completions", json={**body, "logit_bias": {str(last): 1}}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == f"logit_bias.{last}", r.text


@pytest.mark.parametrize("rope, way_out", [
    ("{rope_type: linear, factor: 2.0}", "merge it (`domaintune export "),
    ("{rope_type: dynamic, factor: 2.0}", "use `--engine hf` (vLLM computes dynamic NTK scaling differently"),
])
def test_a_lora_run_with_rope_scaling_is_refused_with_the_way_out_that_works(tmp_path, tiny_train_config, rope,
                                                                             way_out):
    """A linear or yarn run is served by vLLM once merged; a dynamic one is not (the export's dynamic NTK is refused
    too), so its message names only `--engine hf`."""
    run = _run_dir(tmp_path, tiny_train_config, f"model.rope_scaling={rope}")
    with pytest.raises(UserError, match="would not apply to the base model it loads") as e:
        plan_load(inspect_run(run))
    assert way_out in str(e.value)
    assert ("domaintune export" in str(e.value)) == ("linear" in rope)
