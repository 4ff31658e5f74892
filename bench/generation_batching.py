"""Benchmark: batched, length-sorted generation (what `predict` does) against one prompt at a time, for greedy
decoding and for beam search.

Runs every variant on the same model and prompts in one process and prints the measured ratios. Decoding is
deterministic (greedy, and beam search with --num-beams), so batched and one-at-a-time runs must produce
identical tokens, texts and finish reasons; this is checked, and the script exits with status 1 when they
differ (after recording the result). Only the time may differ.

    .venv/bin/python bench/generation_batching.py [--model DIR] [--data FILE] [--n 64] [--batch-size 16]
        [--max-new-tokens 32] [--num-beams 4] [--device cpu|cuda] [--dtype fp32] [--repeat 3]

Defaults: a tiny "small" Qwen2-style model built offline into /tmp (random weights: every answer runs to
--max-new-tokens, the worst case for padding), prompts from the reference data in ../shared/data when
present, else from examples/data, fp32 weights (batched and single runs then agree exactly; in bf16/fp16
padding changes the rounding and outputs may differ). Results are appended to
bench/results/generation_batching.md, with what produced them (provenance.py: git revision, CPU, versions, load
average). Both arms run --repeat times (at least 3 for a saved result), interleaved; times are medians with min
and max, and the speed-ups are ratios of the medians.

The summary line gives the two ratios of issue 10's GPU goal, both against beam search one prompt at a time
(the old `predict --num-beams 4`): greedy batched (goal >= 20x) and beam search batched (goal >= 5x).
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path

from provenance import check_repeat, describe, git_revision, interleaved, load_average, provenance, spread

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "data" / "family_edu_zh.train.jsonl"


def prompts_from(path: Path, n: int, seed: int = 0) -> list[str]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    return [r["instruction"] + r.get("input", "") for r in rows[:n]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model or run directory (default: a tiny model built in /tmp)")
    ap.add_argument("--data", default=None, help="JSONL with instruction fields (default: reference data)")
    ap.add_argument("--n", type=int, default=64, help="number of prompts (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=16, help="batch size of the batched runs (default: %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="tokens per answer (default: %(default)s)")
    ap.add_argument("--num-beams", type=int, default=4,
                    help="beam width of the beam search runs; 1 skips them (default: %(default)s)")
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"],
                    help="device (default: the best available, as predict picks it)")
    ap.add_argument("--no-save", action="store_true", help="print only; do not append to bench/results/")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16", "auto"],
                    help="weights dtype; fp32 keeps batched and single outputs identical (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of each arm, interleaved; a saved result needs >= 3 (default: %(default)s)")
    a = ap.parse_args()
    check_repeat(a.repeat, not a.no_save)

    import torch

    from domaintune.inference.engine import Engine
    from domaintune.inference.params import GenerationParams
    from domaintune.training.precision import resolve_device
    from domaintune.training.tiny import make_tiny_model

    device = a.device or resolve_device()
    model = Path(a.model) if a.model else Path("/tmp/domaintune-bench-tiny")
    if not a.model and not (model / "config.json").is_file():
        make_tiny_model(model, "qwen2", size="small")
    data = Path(a.data) if a.data else (REFERENCE if REFERENCE.is_file() else ROOT / "examples/data/train.jsonl")
    engine = Engine.from_run(model, template=None if (model / "template.json").is_file() else "domain_zh",
                             device=device, dtype=a.dtype)
    prompts = [engine.encode_messages([{"role": "user", "content": q}]) for q in prompts_from(data, a.n)]

    def timed(fn):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    arms = {"seq": lambda params: [engine.generate([p], params, batch_size=1)[0] for p in prompts],
            "bat": lambda params: engine.generate(prompts, params, batch_size=a.batch_size)}

    def compare(params: GenerationParams) -> dict:
        """One prompt at a time and batched (sorted by length), --repeat times each, interleaved: median / min /
        max seconds, tokens, and how many outputs differ (from the first one-at-a-time run, in any run)."""
        engine.generate(prompts[:2], params, batch_size=2)  # warm-up
        times: dict[str, list[float]] = {"seq": [], "bat": []}
        outs: dict[str, list] = {}
        differ = 0
        for _, arm in interleaved(("seq", "bat"), a.repeat):
            t, out = timed(lambda arm=arm: arms[arm](params))
            times[arm].append(t)
            ref = outs.setdefault("ref", out)
            differ = max(differ, sum((x.token_ids, x.text, x.finish_reason) != (y.token_ids, y.text, y.finish_reason)
                                     for x, y in zip(ref, out, strict=True)))
            outs[arm] = out
        return {"seq": spread(times["seq"]), "bat": spread(times["bat"]),
                "tokens_seq": sum(g.completion_tokens for g in outs["seq"]),
                "tokens_bat": sum(g.completion_tokens for g in outs["bat"]), "differ": differ}

    code = git_revision()  # the code that runs, recorded with the result
    load_start = load_average()  # other work on the machine slows both sides; recorded with the result
    runs = {"greedy": compare(GenerationParams(max_new_tokens=a.max_new_tokens))}
    beam = f"beam search ({a.num_beams} beams)"
    if a.num_beams > 1:
        runs[beam] = compare(GenerationParams(max_new_tokens=a.max_new_tokens, num_beams=a.num_beams))

    lens = [len(p) for p in prompts]
    identical = all(r["differ"] == 0 for r in runs.values())
    command = shlex.join([".venv/bin/python", "bench/generation_batching.py", *sys.argv[1:]])
    prov = provenance(load_start, gpu=torch.cuda.get_device_name() if device == "cuda" else None, git=code)
    lines = [
        f"## {time.strftime('%Y-%m-%d')} — {describe(prov)}; {torch.get_num_threads()} threads",
        "",
        f"`{command}`",
        "",
        f"model `{model.name}` ({next(engine.model.parameters()).dtype} on {device}), {len(prompts)} prompts from "
        f"`{data.name}` ({min(lens)}–{max(lens)} tokens), max_new_tokens {a.max_new_tokens}, batch size "
        f"{a.batch_size}; each arm run {a.repeat} times, interleaved: seconds are median (min–max)",
        "",
        "| decoding | run | seconds | generated tokens/s (median) | speed-up (medians) | outputs identical |",
        "|---|---|---|---|---|---|",
    ]

    def secs(t: dict) -> str:
        return f"{t['median']:.2f} ({t['min']:.2f}–{t['max']:.2f})"

    for name, r in runs.items():
        same = "yes" if r["differ"] == 0 else f"**no: {r['differ']} of {len(prompts)} differ**"
        seq, bat = r["seq"]["median"], r["bat"]["median"]
        lines += [f"| {name} | one prompt at a time | {secs(r['seq'])} | {r['tokens_seq'] / seq:.1f} | 1.00x | |",
                  f"| {name} | batched ({a.batch_size}), sorted by length | {secs(r['bat'])} | "
                  f"{r['tokens_bat'] / bat:.1f} | {seq / bat:.2f}x | {same} |"]
    lines.append("")
    g = runs["greedy"]
    lines.append(f"**greedy speed-up: {g['seq']['median'] / g['bat']['median']:.2f}x** (of the medians)")
    if beam in runs:
        b = runs[beam]
        bs, bb, gb = b["seq"]["median"], b["bat"]["median"], g["bat"]["median"]
        lines += [f"**beam search speed-up: {bs / bb:.2f}x**", "",
                  f"Against beam search ({a.num_beams} beams) one prompt at a time: greedy batched "
                  f"**{bs / gb:.2f}x** (GPU goal >= 20x), beam search batched "
                  f"**{bs / bb:.2f}x** (GPU goal >= 5x); outputs identical: {identical}"]
    lines.append("")
    print("\n".join(lines))
    out = ROOT / "bench" / "results" / "generation_batching.md"
    if a.no_save:
        sys.exit(0 if identical else 1)
    if not out.exists():
        out.write_text("# Batched generation vs one prompt at a time (measured)\n\n", encoding="utf-8")
    with open(out, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
