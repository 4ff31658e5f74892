"""Benchmark: batched, length-sorted generation (what `predict` does) against one prompt at a time.

Runs both on the same model and prompts in one process and prints the measured ratio. Greedy decoding,
so both produce identical tokens (checked); only the time differs.

    .venv/bin/python bench/generation_batching.py [--model DIR] [--data FILE] [--n 64] [--batch-size 16]

Defaults: a tiny "small" Qwen2-style model built offline into /tmp (random weights: every answer runs to
--max-new-tokens, the worst case for padding), prompts from the reference data in ../shared/data when
present, else from examples/data. Results are appended to bench/results/generation_batching.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

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
    ap.add_argument("--batch-size", type=int, default=16, help="batch size of the batched run (default: %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="tokens per answer (default: %(default)s)")
    a = ap.parse_args()

    import torch

    from domaintune.inference.engine import Engine
    from domaintune.inference.params import GenerationParams
    from domaintune.training.tiny import make_tiny_model

    model = Path(a.model) if a.model else Path("/tmp/domaintune-bench-tiny")
    if not a.model and not (model / "config.json").is_file():
        make_tiny_model(model, "qwen2", size="small")
    data = Path(a.data) if a.data else (REFERENCE if REFERENCE.is_file() else ROOT / "examples/data/train.jsonl")
    engine = Engine.from_run(model, template=None if (model / "template.json").is_file() else "domain_zh")
    prompts = [engine.encode_messages([{"role": "user", "content": q}]) for q in prompts_from(data, a.n)]
    params = GenerationParams(max_new_tokens=a.max_new_tokens)
    engine.generate(prompts[:2], params, batch_size=2)  # warm-up

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    t_seq, seq = timed(lambda: [engine.generate([p], params, batch_size=1)[0] for p in prompts])
    t_bat, bat = timed(lambda: engine.generate(prompts, params, batch_size=a.batch_size))
    same = all(x.token_ids == y.token_ids for x, y in zip(seq, bat, strict=True))
    tokens = sum(g.completion_tokens for g in bat)
    lens = [len(p) for p in prompts]
    lines = [
        f"## {time.strftime('%Y-%m-%d')} — {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "",
        f"model `{model.name}`, {len(prompts)} prompts from `{data.name}` ({min(lens)}–{max(lens)} tokens), "
        f"greedy, max_new_tokens {a.max_new_tokens}; outputs identical: {same}",
        "",
        "| run | seconds | generated tokens/s |",
        "|---|---|---|",
        f"| one prompt at a time | {t_seq:.2f} | {tokens / t_seq:.1f} |",
        f"| batched ({a.batch_size}), sorted by length | {t_bat:.2f} | {tokens / t_bat:.1f} |",
        "",
        f"**speed-up: {t_seq / t_bat:.2f}x**",
        "",
    ]
    print("\n".join(lines))
    out = ROOT / "bench" / "results" / "generation_batching.md"
    if not out.exists():
        out.write_text("# Batched generation vs one prompt at a time (measured)\n\n", encoding="utf-8")
    with open(out, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
