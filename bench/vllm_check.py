"""Check (GPU only): vLLM (`--engine vllm`, inference/vllm_engine.py) against domaintune's default engine
(`--engine hf`) on the same model, adapter and prompts, greedy decoding, both in bf16.

The model has the Qwen2.5-0.5B shape (24 layers, hidden 896, vocabulary 151,936) with random weights, and a
byte-level BPE tokenizer trained offline on the data (its vocabulary filled up to the model's with plain tokens,
so every id decodes); it is built once under --cache-dir. By default the engines serve a LoRA run on it (a random
rank-8 adapter on all linear layers, as `domaintune train` makes them): vLLM loads the base with `enable_lora` and
gets the adapter with every request. `--no-lora` serves the plain model directory instead.

Measured per engine: predict's path (`generate`, --batch-size prompts at a time) and serve's path (`stream`, every
prompt in its own thread at once, --batch-size decoded together), as generated tokens/s and requests/s; vLLM's
start-up time. Checked: greedy texts of the two engines (the fraction identical and the mean agreeing prefix;
bf16 rounding makes them drift apart, so they need not all agree), the vLLM stream deltas add up to the final text,
a stream whose client leaves (its stop event) ends within a second and leaves nothing running, the prompt ids of
both engines are identical, and the teacher-forced loss on the data's targets through vLLM's prompt logprobs
against the default engine's. `--qlora` also starts vLLM on the run as a QLoRA run (its base quantized to 4 bits
in flight with bitsandbytes) and compares its greedy texts with the bf16 ones.

    python bench/vllm_check.py [--data FILE] [--n 128] [--max-new-tokens 96] [--batch-size 32] [--no-lora]
        [--qlora] [--enforce-eager] [--no-save]
    python bench/vllm_check.py --dry     # CPU: the default engine's half on a micro model, vLLM's planning only

Without a CUDA GPU it prints one line ("skipped: no CUDA GPU") and exits 0; without vLLM it measures the default
engine on the GPU and records the vLLM half as skipped (the GPU machines lent here have no vLLM, and its wheel is
larger than what can be carried to them). Results are appended to
bench/results/vllm_check.md and bench/results/vllm_check-cuda.json with the GPU named; exit 1 when a check fails.
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

from provenance import describe, load_average, provenance

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
RESULTS = ROOT / "bench" / "results"
REFERENCE = [ROOT.parent / "shared" / "data" / "family_edu_zh.train.jsonl", ROOT / ".bench-data" /
             "family_edu_zh.train.jsonl", ROOT / "examples" / "data" / "train.jsonl"]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "domaintune-bench" / "vllm_check"
def build_model(cache: Path, data: Path, dry: bool) -> Path:
    """A model directory with random weights and a tokenizer (once per cache directory): the qwen2.5-0.5b shape of
    train_throughput.py, its tokenizer's vocabulary filled up to the model's so that every id the model can
    generate decodes; a micro qwen2 for --dry."""
    if dry:
        out = cache / "micro"
        if not (out / "READY").is_file():
            from domaintune.training.tiny import make_tiny_model

            make_tiny_model(out, "qwen2", size="micro")
            (out / "READY").write_text("ok", encoding="utf-8")
        return out
    from train_throughput import SHAPES, build_model_dir
    from transformers import AutoTokenizer

    out = build_model_dir("qwen2.5-0.5b", "cuda", 1536, data, cache)
    if not (out / "FILLED").is_file():
        size = SHAPES["qwen2.5-0.5b"][1]["vocab_size"]
        spec = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
        vocab, i = spec["model"]["vocab"], 0
        while len(vocab) < size:  # plain filler tokens: no merge makes them, every id decodes
            vocab.setdefault(f"\u0120w{i}", len(vocab))
            i += 1
        (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        assert len(AutoTokenizer.from_pretrained(out)) == size
        (out / "FILLED").write_text("ok", encoding="utf-8")
    return out


def build_adapter(model_dir: Path, out: Path) -> Path:
    """A LoRA run directory (adapter, tokenizer) on `model_dir`, the adapter random so that it changes the answers."""
    if (out / "READY").is_file():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, cfg).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    (out / "READY").write_text("ok", encoding="utf-8")
    return out


def timed_generate(engine, prompts, params, batch_size: int) -> tuple[float, list]:
    t0 = time.perf_counter()
    gens = engine.generate(prompts, params, batch_size=batch_size)
    return time.perf_counter() - t0, gens


def timed_streams(engine, prompts, params) -> tuple[float, list]:
    """Every prompt streamed in its own thread at once, as the server's requests are: (seconds, [(text, state)])."""
    from domaintune.inference.engine import StreamState

    out: list = [None] * len(prompts)

    def one(i: int) -> None:
        state = StreamState()
        out[i] = ("".join(engine.stream(prompts[i], params, state=state)), state)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, out


def rates(seconds: float, n_requests: int, tokens: int) -> dict:
    return {"seconds": round(seconds, 3), "requests": n_requests, "generated_tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1), "requests_per_s": round(n_requests / seconds, 2)}


def measure(engine, prompts, params, batch_size: int) -> dict:
    engine.generate(prompts[:2], params, batch_size=2)  # warm-up
    t_gen, gens = timed_generate(engine, prompts, params, batch_size)
    engine.max_batch_size = batch_size  # streams decoded together (vLLM: fixed at its start, the same number)
    t_str, streams = timed_streams(engine, prompts, params)
    return {"generate": rates(t_gen, len(gens), sum(g.completion_tokens for g in gens)),
            "stream": rates(t_str, len(streams), sum(len(s.token_ids) for _, s in streams)),
            "texts": [g.text for g in gens], "ids": [g.token_ids for g in gens],
            "stream_texts": [t for t, _ in streams], "stream_sums_ok": all(t == s.text for t, s in streams)}


def agreement(a_ids: list[list[int]], b_ids: list[list[int]], a_texts: list[str], b_texts: list[str]) -> dict:
    def prefix(x: list[int], y: list[int]) -> int:
        return next((k for k, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))

    return {"identical_texts": same_fraction(a_texts, b_texts),
            "mean_agreeing_prefix_tokens": round(sum(map(prefix, a_ids, b_ids)) / len(a_ids), 1)}


def same_fraction(a: list[str], b: list[str]) -> float:
    return round(sum(x == y for x, y in zip(a, b, strict=True)) / len(a), 3)


def abort_check(engine, prompt: list[int]) -> dict:
    """A stream whose client leaves after the first delta: seconds until it ends and until nothing runs."""
    from domaintune.inference.engine import StreamState
    from domaintune.inference.params import GenerationParams

    stop, state = threading.Event(), StreamState()
    stream = engine.stream(prompt, GenerationParams(max_new_tokens=1024, do_sample=True, seed=0), stop, state)
    first = next(stream, None)  # None: the answer ended at once (a stop token), nothing to abort
    stop.set()
    t0 = time.perf_counter()
    for _ in stream:
        pass
    ended = time.perf_counter() - t0
    while engine.batch_status()["running"] and time.perf_counter() - t0 < 5:
        time.sleep(0.01)
    idle = time.perf_counter() - t0
    return {"seconds_to_end": round(ended, 3), "seconds_to_idle": round(idle, 3), "tokens": len(state.token_ids),
            "ok": first is not None and ended < 1 and idle < 2}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="JSONL rows with instruction/input/output (default: reference data)")
    ap.add_argument("--n", type=int, default=128, help="prompts (default: %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="tokens per answer (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=32, help="prompts decoded together (default: %(default)s)")
    ap.add_argument("--loss-rows", type=int, default=32, help="rows scored for the loss (default: %(default)s)")
    ap.add_argument("--no-lora", action="store_true", help="serve the plain model directory, not a LoRA run")
    ap.add_argument("--qlora", action="store_true", help="also run vLLM on the run as a QLoRA (4-bit) run")
    ap.add_argument("--enforce-eager", action="store_true", help="vLLM without CUDA graphs / compilation")
    ap.add_argument("--cache-dir", default=str(CACHE), help="where the model is built (default: %(default)s)")
    ap.add_argument("--no-save", action="store_true", help="print only; do not append to bench/results/")
    ap.add_argument("--dry", action="store_true", help="CPU plumbing check: no vLLM, a micro model, nothing saved")
    a = ap.parse_args()
    load_start = load_average()
    have_vllm = importlib.util.find_spec("vllm") is not None
    if not a.dry:
        import torch

        if not torch.cuda.is_available():
            print("skipped: no CUDA GPU")
            return 0
        if not have_vllm:  # the default engine is still measured on the GPU; the vLLM half is reported skipped
            print("vllm is not installed: measuring the default engine only (vLLM half skipped)")
    import torch

    from domaintune.data.examples import load_examples
    from domaintune.errors import UserError
    from domaintune.inference.engine import Engine
    from domaintune.inference.loading import inspect_run
    from domaintune.inference.params import GenerationParams
    from domaintune.inference.vllm_engine import VLLMEngine, require_vllm
    from domaintune.inference.vllm_plan import engine_args, plan_load, sampling_kwargs

    if a.dry:
        a.n, a.max_new_tokens, a.batch_size, a.loss_rows = min(a.n, 6), min(a.max_new_tokens, 8), 4, 4
        torch.set_num_threads(2)
    data = Path(a.data) if a.data else next(p for p in REFERENCE if p.is_file())
    cache = Path(a.cache_dir)
    model_dir = build_model(cache, data, a.dry)
    run = model_dir if a.no_lora else build_adapter(model_dir, model_dir.with_name(model_dir.name + "-lora-run"))
    device, dtype = ("cpu", "fp32") if a.dry else ("cuda", "bf16")
    params = GenerationParams(max_new_tokens=a.max_new_tokens)
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    facts: dict = {**provenance(load_start, gpu=gpu, extra_versions=("vllm", "peft")),
                   "command": " ".join(["python", "bench/vllm_check.py", *sys.argv[1:]]), "gpu": gpu,
                   "model": "qwen2.5-0.5b shape, random weights" if not a.dry else "micro qwen2",
                   "served": "plain model" if a.no_lora else "LoRA run (r 8, all-linear)", "data": data.name,
                   "n": a.n, "max_new_tokens": a.max_new_tokens, "batch_size": a.batch_size, "dtype": dtype}

    # ---------------------------------------------------------------- the default engine
    hf = Engine.from_run(run, template="domain_zh", device=device, dtype=dtype)
    examples = load_examples(data, require_answer=False, template=hf.template)
    random.Random(0).shuffle(examples)
    prompts = [hf.encode_messages(ex.prompt_and_target()[0]) for ex in examples[: a.n]]
    scored = examples[: a.loss_rows]
    facts["prompt_tokens"] = [min(map(len, prompts)), max(map(len, prompts))]
    m_hf = measure(hf, prompts, params, a.batch_size)
    loss_hf = hf.loss_on_targets(scored)
    facts["hf"] = {k: m_hf[k] for k in ("generate", "stream", "stream_sums_ok")} | {"loss": loss_hf}
    facts["hf"]["stream_equals_generate"] = same_fraction(m_hf["stream_texts"], m_hf["texts"])
    del hf
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()

    checks = {"hf stream deltas add up": m_hf["stream_sums_ok"]}
    if a.dry:  # no vLLM here: the guard, and what vLLM would be given
        try:
            require_vllm()
            facts["vllm"] = "importable (not used in a dry run)"
        except UserError as e:
            facts["vllm"] = f"guard: {e}"
        plan = plan_load(inspect_run(run))
        facts["vllm_engine_args"] = engine_args(plan, a.batch_size, "bfloat16", {"gpu_memory_utilization": 0.5})
        facts["vllm_sampling"] = sampling_kwargs(params, [2], ["<|im_end|>"])
        checks["plan"] = plan.lora_path == str(Path(run).resolve()) and plan.max_lora_rank == 8
    elif not have_vllm:
        facts["vllm"] = {"skipped": "vllm is not installed"}
    else:
        # ---------------------------------------------------------------- vLLM
        extra = {"gpu_memory_utilization": 0.5, **({"enforce_eager": True} if a.enforce_eager else {})}
        t0 = time.perf_counter()
        vl = VLLMEngine.from_run(run, template="domain_zh", max_batch_size=a.batch_size, dtype=dtype, **extra)
        startup = time.perf_counter() - t0
        same_prompts = [vl.encode_messages(ex.prompt_and_target()[0]) for ex in examples[: a.n]] == prompts
        m_vl = measure(vl, prompts, params, a.batch_size)
        loss_vl = vl.loss_on_targets(scored)
        aborted = abort_check(vl, prompts[0])
        vl.close()
        facts["vllm"] = {"version": importlib.metadata.version("vllm"), "startup_seconds": round(startup, 1),
                         **{k: m_vl[k] for k in ("generate", "stream", "stream_sums_ok")}, "loss": loss_vl,
                         "abort": aborted, "context_len": vl.context_len}
        facts["greedy_agreement_generate"] = agreement(m_hf["ids"], m_vl["ids"], m_hf["texts"], m_vl["texts"])
        facts["vllm"]["stream_equals_generate"] = same_fraction(m_vl["stream_texts"], m_vl["texts"])
        facts["loss_difference"] = (round(abs(loss_vl["loss"] - loss_hf["loss"]), 5)
                                    if loss_vl and loss_hf else None)
        checks.update({"same prompt ids": same_prompts, "vllm stream deltas add up": m_vl["stream_sums_ok"],
                       "abort within 1 s": aborted["ok"], "vllm loss computed": bool(loss_vl)})
        if a.qlora:
            facts["qlora"] = qlora_check(run, prompts, params, a, m_vl)
            checks["qlora"] = facts["qlora"].get("ok", True)
    facts["checks"] = checks
    facts["ok"] = all(checks.values())
    facts["load_average"]["end"] = load_average()  # provenance was taken before the engines ran
    print(json.dumps(facts, ensure_ascii=False, indent=1))
    if not (a.dry or a.no_save):
        save(facts)
    print("vllm_check OK" if facts["ok"] else f"vllm_check FAILED: {[k for k, v in checks.items() if not v]}")
    return 0 if facts["ok"] else 1


def qlora_check(run: Path, prompts: list, params, a: argparse.Namespace, m_vl: dict) -> dict:
    """vLLM on a copy of the run whose config.yaml says model.quantization: 4bit (bitsandbytes in flight)."""
    import shutil

    from domaintune.config import build_config
    from domaintune.inference.vllm_engine import VLLMEngine

    if importlib.util.find_spec("bitsandbytes") is None:
        return {"skipped": "bitsandbytes is not installed"}
    q = run.with_name(run.name + "-qlora")
    shutil.rmtree(q, ignore_errors=True)
    shutil.copytree(run, q)
    base = json.loads((run / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
    cfg = build_config({"model": {"name_or_path": base, "quantization": "4bit"}, "data": {"template": "domain_zh"}})
    (q / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    t0 = time.perf_counter()
    vl = VLLMEngine.from_run(q, template="domain_zh", max_batch_size=a.batch_size, gpu_memory_utilization=0.5)
    startup = time.perf_counter() - t0
    t, gens = timed_generate(vl, prompts, params, a.batch_size)
    vl.close()
    agree = agreement(m_vl["ids"], [g.token_ids for g in gens], m_vl["texts"], [g.text for g in gens])
    return {"startup_seconds": round(startup, 1), "generate": rates(t, len(gens), sum(len(g.token_ids) for g in gens)),
            "agreement_with_bf16_lora": agree, "ok": all(g.token_ids for g in gens)}


def save(facts: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "vllm_check-cuda.json"
    old = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
    path.write_text(json.dumps(old + [facts], indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    md = RESULTS / "vllm_check.md"
    if not md.exists():
        md.write_text("# vLLM engine vs the default engine (measured)\n\n", encoding="utf-8")
    skipped = facts["vllm"].get("skipped")
    rows = [f"| {eng} | {path} | {r['seconds']} | {r['tokens_per_s']} | {r['requests_per_s']} |"
            for eng, key in (("default (hf)", "hf"), ("vLLM", "vllm")) if not (skipped and key == "vllm")
            for path in ("generate", "stream") for r in [facts[key][path]]]
    if skipped:
        lines = [f"## {facts['date'][:10]} — GPU {facts['gpu']}, vLLM skipped ({skipped})", "",
                 describe(facts), "", f"`{facts['command']}`", "",
                 f"{facts['model']}, {facts['served']}, {facts['n']} prompts, greedy, max_new_tokens "
                 f"{facts['max_new_tokens']}, batch {facts['batch_size']}, {facts['dtype']}", "",
                 "| engine | path | seconds | generated tokens/s | requests/s |", "|---|---|---|---|---|", *rows, "",
                 f"loss hf {facts['hf']['loss'].get('loss')}; checks: "
                 f"{'all passed' if facts['ok'] else facts['checks']}", ""]
        with open(md, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        return
    agree = facts["greedy_agreement_generate"]
    lines = [f"## {facts['date'][:10]} — GPU {facts['gpu']}, vLLM {facts['vllm']['version']}", "",
             describe(facts), "", f"`{facts['command']}`", "",
             f"{facts['model']}, {facts['served']}, {facts['n']} prompts from `{facts['data']}` "
             f"({facts['prompt_tokens'][0]}–{facts['prompt_tokens'][1]} tokens), greedy, max_new_tokens "
             f"{facts['max_new_tokens']}, batch {facts['batch_size']}, {facts['dtype']}; vLLM start-up "
             f"{facts['vllm']['startup_seconds']} s", "",
             "| engine | path | seconds | generated tokens/s | requests/s |", "|---|---|---|---|---|", *rows, "",
             f"greedy texts identical: {agree['identical_texts']:.0%} (mean agreeing prefix "
             f"{agree['mean_agreeing_prefix_tokens']} tokens); loss hf {facts['hf']['loss'].get('loss')} vs vLLM "
             f"{(facts['vllm']['loss'] or {}).get('loss')}; abort {facts['vllm']['abort']['seconds_to_end']} s; "
             f"checks: {'all passed' if facts['ok'] else facts['checks']}", ""]
    with open(md, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
