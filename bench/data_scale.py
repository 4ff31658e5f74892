"""Benchmark: preparing a 1,000,000-row mixed training set (read, mix, validate, tokenise and mask) as `train`
does, cold and then from the data cache: wall time, rows/s and peak RSS.

    .venv/bin/python bench/data_scale.py [--rows 1000000] [--sources 3] [--keep DIR] [--no-save]

The rows are synthetic, built with a fixed seed from the bundled sample rows (src/domaintune/sample_data/
train.jsonl): each row is a bundled question and answer with a row number and a varied number put in, so no two
rows are equal (data.dedup is off here; the counts are the point). They are written in three formats, as three
sources of one mix: 40% alpaca JSON lines, 30% "messages" Parquet (pyarrow, written in row groups) and 30% alpaca
CSV, each with a weight of its share (--sources 1 writes the JSON lines alone, for a pipeline that reads one
source). The tokenizer is a tiny qwen2 one (`training.tiny.make_tiny_model`, trained on the sample data), and the
template is its chat template (data.template: tokenizer).

Each run is a fresh process (`bench/data_scale.py --child CONFIG`) that loads the config, the tokenizer and the
template and calls `data.prepare.build_datasets` exactly as `train` does (training/run.py setup_data); the parent
times it from start to exit and samples the resident memory of it and its worker processes (num_proc) every
0.05 s: peak RSS is the largest sum seen (the child's own ru_maxrss and that of its largest worker are printed
too). Run 1 starts with an empty data.cache_dir; run 2 has the same inputs and must come from the cache.

Goals (issue 24) on the 2-core CPU machine: run 1 under 10 minutes and under 4 GiB peak RSS; run 2 under 30 s.
A saved result (bench/results/data_scale.md, appended, with provenance.py's record) is only ever a measured one.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from provenance import describe, git_revision, load_average, provenance

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "data_scale.md"
SAMPLE = ROOT / "src" / "domaintune" / "sample_data" / "train.jsonl"
SHARES = {"jsonl": 0.4, "parquet": 0.3, "csv": 0.3}
GOAL_COLD_S, GOAL_RSS_MIB, GOAL_WARM_S = 600.0, 4096.0, 30.0
_NUM = re.compile(r"\d+")


def bundled_rows() -> list[tuple[str, str]]:
    """(question, answer) of every bundled sample row (instruction and input joined)."""
    out = []
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            q = r["instruction"] + (f"\n{r['input']}" if r.get("input") else "")
            out.append((q, r["output"]))
    return out


def synth_row(i: int, base: list[tuple[str, str]], rng: random.Random) -> tuple[str, str]:
    """Row i: a bundled row with its number and a varied figure put in (distinct for every i)."""
    q, a = base[i % len(base)]
    n = rng.randint(3, 17)
    a = _NUM.sub(lambda m: str(int(m.group()) + n % 7), a) if _NUM.search(a) else a
    zh = any("\u4e00" <= c <= "\u9fff" for c in q)
    q = f"{q}（第{i}例，孩子{n}岁）" if zh else f"{q} (case {i}, child aged {n})"
    return q, f"{a}\n{'参考编号' if zh else 'Reference'} {i}-{n}."


def write_sources(folder: Path, rows: int, sources: int, seed: int) -> list[dict]:
    """The data files, and data.path's list of sources (path, weight) for them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base, rng = bundled_rows(), random.Random(seed)
    shares = SHARES if sources == 3 else {"jsonl": 1.0}
    counts = {k: int(rows * s) for k, s in shares.items()}
    counts["jsonl"] += rows - sum(counts.values())
    out, start = [], 0
    for fmt, n in counts.items():
        path = folder / f"mix_{fmt}.{fmt}"
        gen = (synth_row(i, base, rng) for i in range(start, start + n))
        if fmt == "jsonl":
            with path.open("w", encoding="utf-8") as fh:
                for q, a in gen:
                    fh.write(json.dumps({"instruction": q, "input": "", "output": a}, ensure_ascii=False) + "\n")
        elif fmt == "csv":
            with path.open("w", encoding="utf-8", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["instruction", "input", "output"])
                w.writerows([q, "", a] for q, a in gen)
        else:
            writer = None
            while chunk := _take(gen, 50_000):
                msgs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in chunk]
                table = pa.table({"messages": msgs})
                writer = writer or pq.ParquetWriter(path, table.schema)
                writer.write_table(table)
            if writer is not None:
                writer.close()
        start += n
        out.append({"path": str(path), "weight": shares[fmt]} if sources == 3 else str(path))
    return out


def _take(gen, k: int) -> list:
    """The next k items of `gen` (fewer at its end)."""
    out: list = []
    for x in gen:
        out.append(x)
        if len(out) == k:
            break
    return out


def make_config(folder: Path, sources: list, cutoff: int) -> Path:
    """A training config for the tiny model (built once into `folder`) and the sources."""
    import yaml

    from domaintune.training.tiny import make_tiny_model

    model = folder / "tiny-qwen2"
    if not model.exists():
        make_tiny_model(model, "qwen2", "micro", corpus=[SAMPLE], seed=0)
    cfg = {"model": {"name_or_path": str(model)},
           "data": {"path": sources if len(sources) > 1 else sources[0], "template": "tokenizer", "cutoff_len": cutoff,
                    "cache_dir": str(folder / "cache")}}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


def child(config: str) -> None:
    """One preparation, as training/run.py setup_data does it; prints one JSON line of counts and times."""
    t0 = time.perf_counter()
    from domaintune.config import load_config
    from domaintune.data.prepare import build_datasets
    from domaintune.data.templates import get_template
    from domaintune.training.model import load_tokenizer

    cfg = load_config(config)
    m = cfg.model
    tok = load_tokenizer(m.required_name(), m.trust_remote_code, m.revision)
    template = get_template(cfg.data.template, tok, cfg.data.thinking, cfg.data.train_on_turns)
    t1 = time.perf_counter()
    ds = build_datasets(cfg.data, tok, template, cfg.train.seed)
    t2 = time.perf_counter()
    tokens = sum(ds.train.lengths)  # the lengths column: reading every row back would time the reading, not the build
    trained = sum(sum(1 for x in s["labels"] if x != -100) for s in ds.train[:1000])
    print(json.dumps({"rows": ds.report.rows, "train": len(ds.train), "eval": len(ds.eval), "tokens": tokens,
                      "trained_tokens_first_1000": trained, "setup_s": t1 - t0, "build_s": t2 - t1,
                      "maxrss_self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "maxrss_workers_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def _tree_rss(proc) -> int:
    """Resident bytes of `proc` (psutil.Process) and all its descendants; 0 once it has gone."""
    import psutil

    total = 0
    try:
        for p in [proc, *proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
    except psutil.Error:
        return 0
    return total


def measured_run(config: Path) -> dict:
    """Run one preparation in a fresh process: its JSON line, plus wall_s and the sampled peak tree RSS."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    peak = [0]
    ps = psutil.Process(proc.pid)

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(ps))
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    th.join()
    if proc.returncode != 0:
        sys.stderr.write(err[-4000:])
        raise SystemExit(f"the preparation failed (exit {proc.returncode}); its stderr is above")
    got = json.loads(out.strip().splitlines()[-1])
    got.update(wall_s=wall, peak_rss_mib=max(peak[0] / 2**20, got["maxrss_self_mib"]))
    return got


def _median_run(runs: list[dict]) -> dict:
    """The run of median wall time (of an odd count; the lower middle of an even one)."""
    return sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2]


def verdict(value: float, goal: float, unit: str) -> str:
    if value < goal:
        return f"met ({value:,.1f} {unit} against {goal:,.0f}: {goal / value:.1f}x under)"
    return f"missed ({value:,.1f} {unit} against {goal:,.0f}: {value / goal:.2f}x over)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows in all (default: %(default)s)")
    ap.add_argument("--sources", type=int, choices=(1, 3), default=3,
                    help="3: JSON lines + Parquet + CSV, weighted; 1: the JSON lines alone (default: %(default)s)")
    ap.add_argument("--cutoff", type=int, default=512, help="data.cutoff_len (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", help="build in this folder and keep it (default: a temporary folder, removed)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="cold + cached pairs, interleaved; each cold run starts from an empty cache; medians are "
                         "reported (default: %(default)s)")
    ap.add_argument("--no-save", action="store_true", help="print only; do not append to bench/results/")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child)
        return
    git, load_start = git_revision(), load_average()
    with tempfile.TemporaryDirectory(prefix="data_scale-") as tmp:
        folder = Path(a.keep) if a.keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        sources = write_sources(folder, a.rows, a.sources, a.seed)
        write_s = time.perf_counter() - t0
        config = make_config(folder, sources, a.cutoff)
        sizes = {Path(s if isinstance(s, str) else s["path"]).suffix[1:]: Path(s if isinstance(s, str) else s["path"])
                 .stat().st_size / 2**20 for s in sources}
        print(f"wrote {a.rows:,} rows in {write_s:.1f} s: " + ", ".join(f"{k} {v:,.0f} MiB" for k, v in sizes.items()),
              file=sys.stderr)
        colds, warms = [], []
        for k in range(a.repeat):
            shutil.rmtree(folder / "cache", ignore_errors=True)
            for arm, runs in (("cold", colds), ("cached", warms)):
                r = measured_run(config)
                runs.append(r)
                if arm == "cold":  # what the cold run left for the cached one to start from
                    cache_mib = sum(f.stat().st_size for f in (folder / "cache").rglob("*") if f.is_file()) / 2**20
                print(f"pair {k + 1}, {arm}: {r['rows']:,} rows in {r['wall_s']:.1f} s ({r['rows'] / r['wall_s']:,.0f} "
                      f"rows/s), peak RSS {r['peak_rss_mib']:,.0f} MiB", file=sys.stderr)
    for r in colds + warms:
        if (r["train"], r["eval"], r["tokens"]) != (colds[0]["train"], colds[0]["eval"], colds[0]["tokens"]):
            raise SystemExit(f"a run prepared different data: {colds[0]} vs {r}")
    cold, warm = _median_run(colds), _median_run(warms)
    prov = provenance(load_start, git=git, extra_versions=("datasets", "pyarrow"))
    fmts = "JSON lines + Parquet + CSV, weights 0.4/0.3/0.3" if a.sources == 3 else "JSON lines alone"
    lines = [f"## {prov['date'][:10]}: {a.rows:,} rows, {fmts}", "",
             f"`.venv/bin/python bench/data_scale.py --rows {a.rows} --sources {a.sources} --cutoff {a.cutoff} "
             f"--seed {a.seed} --repeat {a.repeat}`", "", describe(prov), "",
             f"- data: {a.rows:,} synthetic rows written in {write_s:.1f} s (" +
             ", ".join(f"{k} {v:,.0f} MiB" for k, v in sizes.items()) + f"); prepared: {cold['train']:,} training "
             f"and {cold['eval']:,} validation samples, {cold['tokens']:,} training tokens (cutoff_len {a.cutoff})"]
    for name, r, runs in (("cold (empty cache)", cold, colds), ("cached (the same inputs)", warm, warms)):
        lines.append(f"- {name}, median of {len(runs)}: **{r['wall_s']:.1f} s** wall, process start to exit "
                     f"({r['setup_s']:.1f} s imports, config and tokenizer; {r['build_s']:.1f} s build_datasets), "
                     f"{r['rows'] / r['wall_s']:,.0f} rows/s; runs: "
                     + ", ".join(f"{x['wall_s']:.1f}" for x in runs) + " s; peak RSS, the largest of the runs: "
                     f"**{max(x['peak_rss_mib'] for x in runs):,.0f} MiB** (process and workers sampled together, "
                     "forked workers' shared pages counted in each; ru_maxrss "
                     f"{max(x['maxrss_self_mib'] for x in runs):,.0f} MiB, largest worker "
                     f"{max(x['maxrss_workers_mib'] for x in runs):,.0f} MiB)")
    lines.append(f"- data.cache_dir after a cold run: {cache_mib:,.0f} MiB" + (
        "" if cache_mib else " (empty: this pipeline keeps no cache, so the second run prepared everything again)"))
    rss = max(x["peak_rss_mib"] for x in colds + warms)
    lines += [f"- goals: cold under {GOAL_COLD_S / 60:.0f} min: " + verdict(cold["wall_s"], GOAL_COLD_S, "s")
              + f"; peak RSS under {GOAL_RSS_MIB / 1024:.0f} GiB: " + verdict(rss, GOAL_RSS_MIB, "MiB")
              + f"; cached under {GOAL_WARM_S:.0f} s: " + verdict(warm["wall_s"], GOAL_WARM_S, "s"), ""]
    print("\n".join(lines))
    if not a.no_save:
        if not RESULT.exists():
            RESULT.write_text("# Training data preparation at scale (measured)\n\nEach section is one run of "
                              "`bench/data_scale.py`, appended by the script.\n\n", encoding="utf-8")
        with RESULT.open("a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
