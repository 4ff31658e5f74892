"""Benchmark: LoRA training throughput and peak memory, seed-style recipe vs `domaintune train`'s default path.

Both arms train one epoch on the same rows of the reference data with the same random-init model, LoRA
(r 8, alpha 16, dropout 0.1, same targets), cutoff 512, per-device batch = global batch, learning rate 2e-4.
Each arm runs in its own subprocess (clean peak memory); only the Trainer's `train()` is timed.

- baseline ("seed-style recipe", written here): HF Trainer + PEFT, prompt `用户:{instruction}{input}\\n\\n助手:`
  masked out of the loss, output + EOS, truncated at 512; DataCollatorForSeq2Seq(pad_to_multiple_of=8),
  train_sampling_strategy="group_by_length", no warm-up, no saving; fp32 on CPU, fp16 autocast over fp32
  weights on GPU; the installed transformers' other defaults (optimizer, scheduler, grad clipping).
- domaintune: `TrainingRun(cfg)` of the package as it is now, every dtype/speed setting at its default
  (template domain_zh, val_size 0, save_steps beyond the run), timing `run.trainer.train()`.

    .venv/bin/python bench/train_throughput.py [--device cpu|cuda] [--shape S] [--rows N] [--repeat N (>= 3)]

The model (`--shape`, random weights) and a byte-level BPE tokenizer trained offline on the reference data
(vocabulary tuned to ~0.7 tokens per Chinese character, as real BLOOM/Qwen tokenizers give) are cached under
--cache-dir. Results are appended to bench/results/train_throughput-<device>-<shape>.json.

Per arm: non-padding tokens/s (the Trainer's num_input_tokens_seen / seconds of train()), seconds, peak memory
(CPU: the arm process's VmHWM; GPU: max_memory_allocated), mean training loss, MFU on GPU (4 x all parameters
x tokens/s / --peak-flops), and "steps-only" tokens/s: up to the end of the last optimizer step, i.e. without
what train() does after it (a final checkpoint, for instance). Each arm runs --repeat times (at least 3 for a
saved result), interleaved A B B A A B; every figure is reported as its median with min and max, and the last line
gives domaintune / baseline of the medians. The saved record says what produced it (provenance.py: git revision
and dirty flag, CPU, cores, versions, load average, date).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import check_repeat, git_revision, interleaved, load_average, provenance, spread

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "data" / "family_edu_zh.train.jsonl"
RESULTS = ROOT / "bench" / "results"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "domaintune-bench" / "train_throughput"
ARMS = ("baseline", "domaintune")
PROMPT = "用户:{instruction}{input}\n\n助手:"
LORA = {"r": 8, "alpha": 16, "dropout": 0.1}
TARGETS = {"bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
           "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
BLOOM_VOCAB, QWEN_VOCAB = 250_880, 151_936
SHAPES = {  # name -> (arch, config kwargs)
    "bloom-tiny": ("bloom", {"hidden_size": 256, "n_layer": 4, "n_head": 8, "vocab_size": BLOOM_VOCAB}),
    "bloom-560m": ("bloom", {"hidden_size": 1024, "n_layer": 24, "n_head": 16, "vocab_size": BLOOM_VOCAB}),
    "bloom-3b": ("bloom", {"hidden_size": 2560, "n_layer": 30, "n_head": 32, "vocab_size": BLOOM_VOCAB}),
    "qwen2.5-0.5b": ("qwen2", {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                               "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": QWEN_VOCAB,
                               "tie_word_embeddings": True, "max_position_embeddings": 32768,
                               "rope_theta": 1e6}),
}
DEVICE_DEFAULTS = {"cpu": {"shape": "bloom-tiny", "rows": 48, "batch": 4},
                   "cuda": {"shape": "bloom-560m", "rows": 500, "batch": 5}}
CUTOFF, LR, SEED = 512, 2e-4, 42
TOKENIZER_VOCAB = 1536  # tuned: 0.70 tokens/char on the reference data (1500 -> 0.71, 1700 -> 0.68)


# ------------------------------------------------------------------ preparation (parent process)
def select_rows(path: Path, n: int) -> list[dict]:
    """`n` rows chosen by a seeded shuffle (seed 0), kept in file order."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    keep = sorted(random.Random(0).sample(range(len(rows)), min(n, len(rows))))
    return [rows[i] for i in keep]


def build_model_dir(shape: str, device: str, vocab: int, data: Path, cache: Path) -> Path:
    """A Hugging Face model directory (random weights, safetensors) + tokenizer, built once per shape."""
    out = cache / f"{shape}-tok{vocab}"
    if (out / "READY").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, BloomConfig, Qwen2Config

    from domaintune.training.tiny import train_tokenizer

    arch, kwargs = SHAPES[shape]
    print(f"building {shape} into {out} (once) ...", flush=True)
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    tok = train_tokenizer([r[k] for r in rows for k in ("instruction", "input", "output") if r.get(k)], arch, vocab)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    cfg = (BloomConfig if arch == "bloom" else Qwen2Config)(**kwargs, **ids)
    torch.manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16  # weights' values do not change speed
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "READY").write_text(shape, encoding="utf-8")
    return out


def tokens_per_char(model_dir: Path, rows: list[dict]) -> float:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [PROMPT.format(**r) + r["output"] for r in rows]
    return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts) / sum(len(t) for t in texts)


# ------------------------------------------------------------------ the arms (one subprocess each)
def seed_encode(tok, row: dict) -> dict:
    """The seed recipe: prompt (label -100), output, EOS; truncated at CUTOFF."""
    prompt = tok(PROMPT.format(**row), add_special_tokens=False)["input_ids"]
    answer = tok(row["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = (prompt + answer)[:CUTOFF]
    labels = ([-100] * len(prompt) + answer)[:CUTOFF]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def baseline_trainer(job: dict):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments
    from transformers.trainer_utils import set_seed

    cuda = job["device"] == "cuda"
    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    rows = [json.loads(line) for line in Path(job["data"]).read_text(encoding="utf-8").splitlines() if line]
    data = [seed_encode(tok, r) for r in rows]  # a list is a map-style dataset
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    set_seed(SEED)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=TARGETS[job["arch"]], bias="none", task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=job["out"], per_device_train_batch_size=job["batch"], gradient_accumulation_steps=1,
        learning_rate=LR, warmup_steps=0, num_train_epochs=1, eval_strategy="no", save_strategy="no", seed=SEED,
        fp16=cuda, use_cpu=not cuda, train_sampling_strategy="group_by_length", report_to=[],
        include_num_input_tokens_seen="non_padding", remove_unused_columns=False)
    collator = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True, pad_to_multiple_of=8)
    return Trainer(model=model, args=args, data_collator=collator, train_dataset=data, processing_class=tok)


def domaintune_trainer(job: dict):
    from domaintune.config import build_config
    from domaintune.training.trainer import TrainingRun

    raw = {"model": {"name_or_path": job["model_dir"]},
           "lora": {**LORA, "target_modules": TARGETS[job["arch"]]},
           "data": {"path": job["data"], "template": "domain_zh", "cutoff_len": CUTOFF, "val_size": 0},
           "train": {"output_dir": job["out"], "batch_size": job["batch"], "per_device_batch_size": job["batch"],
                     "num_epochs": 1, "learning_rate": LR, "seed": SEED, "save_steps": 10**9}}
    run = TrainingRun(build_config(raw, source="bench"))
    said = io.StringIO()  # what domaintune says about its choices (loss, batching, precision, ...): notes, on stderr
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        run.setup_output()
        run.setup_data()
        run.setup_model()
        run.setup_trainer()
    print(said.getvalue(), end="", file=sys.stderr, flush=True)
    run.trainer.bench_said = [line for line in said.getvalue().splitlines() if line.strip()]
    return run.trainer


def dataset_tokens(trainer) -> int | None:
    """Real tokens per epoch as the training dataset holds them (a cross-check of the Trainer's count)."""
    try:
        ds = trainer.train_dataset
        return sum(len(ds[i]["input_ids"]) for i in range(len(ds)))
    except (TypeError, KeyError, IndexError):
        return None


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def run_arm_job(job: dict) -> dict:
    """Build the arm's Trainer, time `trainer.train()` (optionally under the profiler), report the figures."""
    import torch
    from transformers import TrainerCallback

    cuda = job["device"] == "cuda"
    trainer = (baseline_trainer if job["arm"] == "baseline" else domaintune_trainer)(job)
    marks: dict[str, float] = {}

    class LastStep(TrainerCallback):  # when the last optimizer step ended (before any end-of-training save)
        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= state.max_steps:
                if cuda:
                    torch.cuda.synchronize()
                marks["last_step"] = time.perf_counter()

    trainer.add_callback(LastStep())
    collate, padded = trainer.data_collator, [0]

    def counting_collator(features):  # counts the tokens of every batch, padding included
        batch = collate(features)
        padded[0] += batch["input_ids"].numel()
        return batch

    trainer.data_collator = counting_collator
    prof = None
    if job["profile"]:
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        prof = torch.profiler.profile(activities=acts)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = status_kib("VmRSS") / 1024
    with prof if prof else contextlib.nullcontext():
        t0 = time.perf_counter()
        result = trainer.train()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    tokens = int(trainer.state.num_input_tokens_seen)
    params = sum(p.numel() for p in trainer.model.parameters())
    out = {"arm": job["arm"], "seconds": seconds, "steps_seconds": marks.get("last_step", t0 + seconds) - t0,
           "steps": trainer.state.global_step, "tokens": tokens, "dataset_tokens": dataset_tokens(trainer),
           "batch_tokens_with_padding": padded[0], "said": getattr(trainer, "bench_said", []),
           "tokens_per_s": tokens / seconds, "train_loss": result.training_loss, "parameters": params,
           "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
           "rss_before_train_mib": rss_before, "peak_rss_mib": status_kib("VmHWM") / 1024,
           "optim": str(getattr(trainer.args.optim, "value", trainer.args.optim)),
           "sampling": trainer.args.train_sampling_strategy, "fp16": trainer.args.fp16, "bf16": trainer.args.bf16,
           "weights_dtype": str(next(trainer.model.parameters()).dtype).replace("torch.", ""),
           "checkpoints_written": sorted(p.name for p in Path(job["out"]).glob("checkpoint-*"))}
    out["steps_tokens_per_s"] = tokens / out["steps_seconds"]
    if cuda:
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["gpu"] = torch.cuda.get_device_name()
        out["mfu"] = 4 * params * out["tokens_per_s"] / job["peak_flops"]
    if prof:
        tables = [prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)]
        tables += [prof.key_averages().table(sort_by="self_device_time_total", row_limit=10)] if cuda else []
        out["profile"] = "\n".join(tables)
    return out


# ------------------------------------------------------------------ orchestration (parent process)
def spawn(job: dict, work: Path) -> dict:
    """Run one arm in a fresh Python process; its output goes to a log file, its figures come back as JSON."""
    name = f"{job['arm']}-{job['tag']}"
    job = {**job, "out": str(work / name), "result": str(work / f"{name}.json")}
    (work / f"{name}.job.json").write_text(json.dumps(job), encoding="utf-8")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    if job["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # domaintune picks cuda whenever it sees one
    log = work / f"{name}.log"
    with open(log, "w", encoding="utf-8") as f:
        rc = subprocess.run([sys.executable, __file__, "--_job", str(work / f"{name}.job.json")], cwd=work,
                            env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
        sys.exit(f"{name} failed (exit {rc}); log {log}:\n" + "\n".join(tail))
    return json.loads(Path(job["result"]).read_text(encoding="utf-8"))


def summary(runs: dict[str, list[dict]], cuda: bool) -> tuple[dict, list[str]]:
    """Per-run table lines, median / min / max per arm and the ratios domaintune / baseline (of the medians)."""
    mem, mem_name = ("peak_gpu_gib", "peak GPU GiB") if cuda else ("peak_rss_mib", "peak RSS MiB")
    keys = ["tokens_per_s", "steps_tokens_per_s", "seconds", mem] + (["mfu"] if cuda else [])
    stats = {arm: {k: spread([r[k] for r in rs]) for k in keys} for arm, rs in runs.items()}
    med = {arm: {k: v["median"] for k, v in st.items()} for arm, st in stats.items()}
    cols = ["arm", "run", "tokens/s", "seconds", "steps-only tok/s", "steps", "tokens", "padding", mem_name,
            "train loss"] + (["MFU"] if cuda else [])
    rows = []
    for arm, rs in runs.items():
        for i, r in enumerate(rs, 1):
            pad = 1 - r["tokens"] / r["batch_tokens_with_padding"] if r["batch_tokens_with_padding"] else 0.0
            rows.append([arm, str(i), f"{r['tokens_per_s']:.1f}", f"{r['seconds']:.2f}",
                         f"{r['steps_tokens_per_s']:.1f}", str(r["steps"]), str(r["tokens"]), f"{pad:.1%}",
                         f"{r[mem]:.2f}" if cuda else f"{r[mem]:.0f}", f"{r['train_loss']:.4f}"]
                        + ([f"{r['mfu']:.1%}"] if cuda else []))
        for what in ("median", "min", "max"):
            m = {k: v[what] for k, v in stats[arm].items()}
            rows.append([arm, what, f"{m['tokens_per_s']:.1f}", f"{m['seconds']:.2f}",
                         f"{m['steps_tokens_per_s']:.1f}", "", "", "", f"{m[mem]:.2f}" if cuda else f"{m[mem]:.0f}",
                         ""] + ([f"{m['mfu']:.1%}"] if cuda else []))
    widths = [max(len(x) for x in col) for col in zip(cols, *rows, strict=True)]
    lines = ["  ".join(x.rjust(w) if j else x.ljust(w) for j, (x, w) in enumerate(zip(row, widths, strict=True)))
             for row in [cols, *rows]]
    b, d = med["baseline"], med["domaintune"]
    ratios = {"tokens_per_s": d["tokens_per_s"] / b["tokens_per_s"], "peak_memory": d[mem] / b[mem],
              "steps_tokens_per_s": d["steps_tokens_per_s"] / b["steps_tokens_per_s"]}
    return {"median": med, "spread": stats, "ratios": ratios}, lines


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both arms train (default: cpu)")
    ap.add_argument("--shape", choices=list(SHAPES), default=None,
                    help="model shape (default: bloom-tiny on cpu = BLOOM hidden 256, 4 layers, 8 heads, vocab "
                         "250,880; bloom-560m on cuda)")
    ap.add_argument("--rows", type=int, default=None, help="rows of the reference data (default: 48 cpu, 500 cuda)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="per-device = global batch, no accumulation (default: 4 cpu, 5 cuda)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="run both arms N times, interleaved (A B B A ...), and report median, min and max; a saved "
                         "result needs N >= 3 (default: %(default)s)")
    ap.add_argument("--peak-flops", type=float, default=989e12,
                    help="accelerator peak FLOP/s for MFU (default: 989e12, H100/H200 bf16 dense)")
    ap.add_argument("--profile", nargs="?", const="domaintune", choices=ARMS, default=None,
                    help="after the timed runs, one extra (untimed) run of ARM (default ARM: domaintune) under "
                         "torch.profiler; prints the top 10 ops by self CPU time (and by GPU time on cuda)")
    ap.add_argument("--data", type=Path, default=REFERENCE, help="reference JSONL (default: %(default)s)")
    ap.add_argument("--tokenizer-vocab", type=int, default=TOKENIZER_VOCAB,
                    help="BPE vocabulary of the offline tokenizer (default: %(default)s, ~0.70 tokens/char)")
    ap.add_argument("--cache-dir", type=Path, default=CACHE, help="built model + tokenizer (default: %(default)s)")
    ap.add_argument("--no-save", action="store_true", help="print only; do not append to bench/results/")
    ap.add_argument("--note", default=None, help="a sentence kept with the result, e.g. why the run was short")
    ap.add_argument("--_job", help=argparse.SUPPRESS)  # internal: run one arm (the subprocess)
    return ap.parse_args()


def print_details(runs: dict[str, list[dict]], lines: list[str], cuda: bool, peak_flops: float) -> None:
    print("\n" + "\n".join(lines))
    print("tokens: non-padding tokens trained on (the Trainer's num_input_tokens_seen); padding: share of the batch "
          "tokens that were padding; steps-only: until the last optimizer step ended (without what train() does "
          "after it); train loss: mean over the epoch")
    if cuda:
        print(f"GPU: {runs['baseline'][0]['gpu']}; MFU = 4 x parameters x tokens/s / {peak_flops:.4g} FLOP/s")
    for arm in ARMS:
        r = runs[arm][0]
        print(f"{arm}: weights {r['weights_dtype']}, fp16 {r['fp16']}, bf16 {r['bf16']}, {r['optim']}, sampling "
              f"{r['sampling']}, dataset tokens {r['dataset_tokens']}, {r['trainable_parameters']:,} trainable of "
              f"{r['parameters']:,} parameters, checkpoints written in train(): "
              f"{', '.join(r['checkpoints_written']) or 'none'}")
        for line in r["said"]:
            print(f"  {arm} said: {line}")


def main() -> None:
    a = parse_args()
    if a._job:  # an arm's subprocess
        job = json.loads(Path(a._job).read_text(encoding="utf-8"))
        Path(job["result"]).write_text(json.dumps(run_arm_job(job)), encoding="utf-8")
        return
    check_repeat(a.repeat, not a.no_save)
    started, load_start, code = time.perf_counter(), load_average(), git_revision()
    dflt, cuda = DEVICE_DEFAULTS[a.device], a.device == "cuda"
    shape, n_rows, batch = a.shape or dflt["shape"], a.rows or dflt["rows"], a.batch_size or dflt["batch"]
    if not a.data.is_file():
        sys.exit(f"no reference data at {a.data} (see ../shared/data/README.md); pass --data FILE")
    if cuda:
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device visible")
    arch = SHAPES[shape][0]
    model_dir = build_model_dir(shape, a.device, a.tokenizer_vocab, a.data, a.cache_dir)
    rows = select_rows(a.data, n_rows)
    tpc = tokens_per_char(model_dir, rows)
    print(f"shape {shape} ({arch}: {SHAPES[shape][1]}), {len(rows)} rows, per-device = global batch {batch}, "
          f"device {a.device}; tokenizer vocab {a.tokenizer_vocab}: {tpc:.3f} tokens/char on these rows", flush=True)

    work = Path(tempfile.mkdtemp(prefix="dt-train-bench-"))
    data = work / "rows.jsonl"  # the selected rows, for both arms (a temporary file, removed at the end)
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    base_job = {"device": a.device, "model_dir": str(model_dir), "data": str(data), "arch": arch, "batch": batch,
                "peak_flops": a.peak_flops, "profile": False}
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for i, arm in interleaved(ARMS, a.repeat):
        r = spawn({**base_job, "arm": arm, "tag": f"run{i + 1}"}, work)
        runs[arm].append(r)
        print(f"  {arm} run {i + 1}: {r['tokens_per_s']:.1f} tokens/s, {r['seconds']:.2f} s", flush=True)
    stats, lines = summary(runs, cuda)
    print_details(runs, lines, cuda, a.peak_flops)
    prof = None
    if a.profile:
        prof = spawn({**base_job, "arm": a.profile, "tag": "profile", "profile": True}, work)
        print(f"\nprofile of {a.profile} (an extra, untimed run: {prof['seconds']:.2f} s under the profiler):\n"
              + prof["profile"])
    shutil.rmtree(work, ignore_errors=True)
    wall, rt = time.perf_counter() - started, stats["ratios"]
    prov = provenance(load_start, gpu=runs["baseline"][0].get("gpu"), extra_versions=("peft",), git=code)
    load = prov["load_average"]
    print(f"\nsteps-only tokens/s ratio {rt['steps_tokens_per_s']:.2f}; wall time {wall:.0f} s; load average "
          f"(1, 5, 15 min) at start {load['start']}, at end {load['end']}, on {os.cpu_count()} cores")
    if not a.no_save:
        record = {**prov, "command": " ".join([os.path.relpath(sys.executable, ROOT), *sys.argv]),
                  "repeat": a.repeat, "order": "interleaved (A B B A ...)", **({"note": a.note} if a.note else {}),
                  "shape": {"name": shape, "arch": arch, **SHAPES[shape][1]}, "rows": len(rows), "batch": batch,
                  "tokenizer_vocab": a.tokenizer_vocab, "tokens_per_char": round(tpc, 4), "peak_flops": a.peak_flops,
                  "wall_seconds": round(wall), "runs": runs, **stats,
                  **({"profile": {"arm": a.profile, "table": prof["profile"]}} if prof else {})}
        out = RESULTS / f"train_throughput-{a.device}-{shape}.json"
        previous = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else []
        out.write_text(json.dumps(previous + [record], indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"result appended to {out.relative_to(ROOT)}")
    tps = {arm: stats["spread"][arm]["tokens_per_s"] for arm in ARMS}
    print(f"tokens/s ratio {rt['tokens_per_s']:.2f} (medians of {a.repeat} runs each; domaintune "
          f"{tps['domaintune']['min']:.1f}-{tps['domaintune']['max']:.1f}, baseline {tps['baseline']['min']:.1f}-"
          f"{tps['baseline']['max']:.1f} tokens/s), peak memory ratio {rt['peak_memory']:.2f}")


if __name__ == "__main__":
    main()
