"""Load test of `domaintune serve`: N requests, C at a time, against a server on this machine.

Starts `domaintune serve` on 127.0.0.1 (a free port, a random API key) for a run or model directory, or
attaches to a running server with --url (loopback addresses only: this script never sends load to another
machine). Sends --n chat (or text) completion requests with --concurrency in flight, each asking for
--max-tokens tokens, through the official openai client; then stops the server it started.

    .venv/bin/python bench/serve_load.py [MODEL_DIR] [--n 200] [--concurrency 16] [--max-tokens 32] [--stream]
    .venv/bin/python bench/serve_load.py --compare-serial      # the serial server (--max-batch-size 1) too
    .venv/bin/python bench/serve_load.py --url http://127.0.0.1:8000 --pid 1234 [--api-key KEY]

Default target: a tiny model with random weights, built by `domaintune make-tiny-model OUT --size micro` in
a temporary folder (answers run to max_tokens: the worst case). Prints errors counted by kind, latency
p50/p95 (request sent -> answer complete; time to first token too with --stream), requests/s, generated
tokens/s and the server process's resident memory (VmRSS from /proc/PID/status) after the model loaded and
after the load. Latency includes the wait in the server's queue.

Answers are checked: before the load, each distinct prompt is sent alone (one request at a time); with
greedy decoding (--temperature 0, the default) every answer under load must equal its solo answer, and the
mismatches are counted. In the same run, and before the server under test, --baseline-rev REV serves the
same model with the code of git revision REV (e.g. the last one before continuous batching: the serial
server), and --compare-serial with this code at --max-batch-size 1 (one request decoded at a time); the
ratios to each are printed. With more than one arm, each runs --repeat times (default 3), interleaved (A B B A ...),
and the ratios are of the medians, with min and max. The printout starts with what produced it (provenance.py:
git revision, CPU, cores, versions, load average): paste it with the figures into bench/results/serve_load.md.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import secrets
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from provenance import describe, interleaved, load_average, provenance, spread

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["孩子不爱吃饭怎么办？", "How do I help my child fall asleep?", "怎样培养孩子的阅读习惯？",
           "What is a good bedtime routine for a five-year-old?", "孩子发脾气时家长应该怎么做？",
           "How much screen time is reasonable for a child?", "如何和青春期的孩子沟通？",
           "Tell me about homework help."]


def loopback_url(url: str) -> str:
    """`url` without a trailing slash; SystemExit unless it names this machine (localhost, 127.0.0.0/8, ::1)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if parts.scheme not in ("http", "https") or not ok:
        raise SystemExit(f"--url {url}: give a loopback URL such as http://127.0.0.1:8000 (this script only loads "
                         "servers on this machine)")
    return url.rstrip("/")


def rss_mib(pid: int | None) -> float | None:
    """The resident memory of process `pid` in MiB (VmRSS of /proc/PID/status); None when unknown."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, template: str | None, key: str, threads: int | None,
                 max_batch_size: int | None, src: Path | None = None) -> tuple[subprocess.Popen, str]:
    """`domaintune serve` on a free port; with `src`, the package found there (an older revision's src/)."""
    port = free_port()
    cmd = [sys.executable, "-m", "domaintune", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning"] + (["--template", template] if template else [])
    cmd += ["--max-batch-size", str(max_batch_size)] if max_batch_size else []
    env = {**os.environ, "DOMAINTUNE_API_KEY": key}
    if src is not None:
        env["PYTHONPATH"] = str(src) + os.pathsep + env.get("PYTHONPATH", "")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float) -> str:
    """Wait for GET /health to answer 200; the served model id."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}:\n{proc.stdout.read()}")
        try:
            r = httpx.get(url + "/health", timeout=5)
            if r.status_code == 200:
                return r.json()["model"]
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url}/health did not answer 200 within {timeout:.0f} s")


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


async def one(client, model: str, i: int, a: argparse.Namespace) -> tuple[float, float | None, int, str]:
    """Send request i; (seconds to the complete answer, seconds to the first text or None, completion tokens,
    the answer's text)."""
    prompt = PROMPTS[i % len(PROMPTS)]
    t0 = time.perf_counter()
    first = None
    sampling = dict(max_tokens=a.max_tokens, temperature=a.temperature)
    if a.endpoint == "chat":
        kw = dict(model=model, messages=[{"role": "user", "content": prompt}], **sampling)
        if not a.stream:
            r = await client.chat.completions.create(**kw)
            return time.perf_counter() - t0, None, r.usage.completion_tokens, r.choices[0].message.content
        stream = await client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    else:
        kw = dict(model=model, prompt=prompt, **sampling)
        if not a.stream:
            r = await client.completions.create(**kw)
            return time.perf_counter() - t0, None, r.usage.completion_tokens, r.choices[0].text
        stream = await client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    tokens, parts = 0, []
    async for chunk in stream:
        if chunk.choices:
            text = chunk.choices[0].delta.content if a.endpoint == "chat" else chunk.choices[0].text
            if text:
                parts.append(text)
                first = first if first is not None else time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return time.perf_counter() - t0, first, tokens, "".join(parts)


async def load(url: str, key: str, model: str, a: argparse.Namespace) -> tuple[list, Counter, float, int]:
    """(results by request index, errors by kind, wall seconds, answers that differ from their solo answer)."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=key or "none", max_retries=0, timeout=a.timeout)
    gate = asyncio.Semaphore(a.concurrency)
    errors: Counter = Counter()
    results: dict[int, tuple] = {}

    async def task(i: int) -> None:
        async with gate:
            try:
                results[i] = await one(client, model, i, a)
            except openai.APIStatusError as e:
                errors[f"HTTP {e.status_code} {type(e).__name__}"] += 1
            except Exception as e:  # noqa: BLE001 - counted by kind, reported at the end
                errors[type(e).__name__] += 1

    # Warm-up (not counted), and each distinct prompt's answer alone, one request at a time.
    solo = [(await one(client, model, i, a))[3] for i in range(len(PROMPTS))]
    t0 = time.perf_counter()
    await asyncio.gather(*(task(i) for i in range(a.n)))
    wall = time.perf_counter() - t0
    await client.close()
    differ = sum(r[3] != solo[i % len(PROMPTS)] for i, r in results.items()) if a.temperature == 0 else -1
    return list(results.values()), errors, wall, differ


def measure(a: argparse.Namespace, model: Path | None, template: str | None, max_batch_size: int | None,
            src: Path | None = None) -> dict:
    """Start a server (or attach to --url), run the load, stop it; the figures."""
    proc = None
    if a.url:
        url, pid = loopback_url(a.url), a.pid
        key = a.api_key if a.api_key is not None else os.environ.get("DOMAINTUNE_API_KEY", "")
    else:
        key = secrets.token_urlsafe(24)
        proc, url = start_server(model, template, key, a.threads, max_batch_size, src)
        pid = proc.pid
    try:
        model_id = wait_ready(url, proc, timeout=600)
        rss_ready = rss_mib(pid)
        results, errors, wall, differ = asyncio.run(load(url, key, model_id, a))
        rss_after = rss_mib(pid)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return {"url": url, "model": model_id, "results": results, "errors": errors, "wall": wall, "differ": differ,
            "rss": (rss_ready, rss_after), "max_batch_size": max_batch_size}


def report(m: dict, a: argparse.Namespace, label: str) -> None:
    results, errors, wall = m["results"], m["errors"], m["wall"]
    latencies = [r[0] for r in results]
    firsts = [r[1] for r in results if r[1] is not None]
    tokens = sum(r[2] for r in results)
    mem = lambda v: "unknown (give --pid)" if v is None else f"{v:.0f} MiB"  # noqa: E731
    print(f"== {label}")
    print(f"server: {m['url']} model '{m['model']}'; {a.n} requests, {a.concurrency} at a time, max_tokens "
          f"{a.max_tokens}, temperature {a.temperature}, {a.endpoint}{', streamed' if a.stream else ''}")
    print(f"ok: {len(results)}; errors: {sum(errors.values())}"
          + (" (" + ", ".join(f"{k}: {v}" for k, v in errors.most_common()) + ")" if errors else ""))
    if m["differ"] >= 0:
        print(f"answers different from the same prompt's solo answer: {m['differ']} of {len(results)}")
    if latencies:
        print(f"latency: p50 {pct(latencies, 50):.3f} s, p95 {pct(latencies, 95):.3f} s, "
              f"max {max(latencies):.3f} s, mean {statistics.fmean(latencies):.3f} s")
    if firsts:
        print(f"time to first token: p50 {pct(firsts, 50):.3f} s, p95 {pct(firsts, 95):.3f} s")
    print(f"throughput: {len(results) / wall:.2f} requests/s, {tokens / wall:.1f} generated tokens/s "
          f"({tokens} tokens in {wall:.1f} s)")
    print(f"server memory (VmRSS): {mem(m['rss'][0])} when ready, {mem(m['rss'][1])} after the load")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None,
                    help="run or model directory to serve (default: a micro tiny model built in a temporary folder)")
    ap.add_argument("--url", default=None,
                    help="attach to a running server at this loopback URL instead of starting one (default: start one)")
    ap.add_argument("--pid", type=int, default=None,
                    help="with --url: the server's process id, to report its memory (default: none, not reported)")
    ap.add_argument("--api-key", default=None,
                    help="with --url: the server's API key (default: $DOMAINTUNE_API_KEY, or none)")
    ap.add_argument("--n", type=int, default=200, help="requests to send (default: %(default)s)")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight at once (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request (default: %(default)s)")
    ap.add_argument("--stream", action="store_true", help="stream the answers (default: off)")
    ap.add_argument("--endpoint", choices=["chat", "completions"], default="chat",
                    help="/v1/chat/completions or /v1/completions (default: %(default)s)")
    ap.add_argument("--template", default=None,
                    help="--template for the server it starts (default: the directory's own; domain_zh for the "
                         "tiny model)")
    ap.add_argument("--size", choices=["micro", "small"], default="micro",
                    help="size of the default tiny model (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS of the server it starts (default: unset, torch's default)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds allowed per request (default: %(default)s)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="temperature of every request; 0 = greedy, and answers are checked against solo ones "
                         "(default: %(default)s)")
    ap.add_argument("--max-batch-size", type=int, default=None,
                    help="--max-batch-size of the server it starts (default: the server's default)")
    ap.add_argument("--baseline-rev", default=None, metavar="REV",
                    help="first run the load against the server of this git revision (its src/, same model and "
                         "options; the server's --max-batch-size is not passed to it) (default: none)")
    ap.add_argument("--compare-serial", action="store_true",
                    help="also run the load against a server with --max-batch-size 1, first, and print the ratios "
                         "(default: off)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="with --baseline-rev or --compare-serial: runs of each arm, interleaved "
                         "(default: %(default)s)")
    a = ap.parse_args()
    if a.n < 1 or a.concurrency < 1 or a.max_tokens < 1:
        raise SystemExit("--n, --concurrency and --max-tokens must be at least 1")

    if (a.compare_serial or a.baseline_rev) and a.url:
        raise SystemExit("--compare-serial and --baseline-rev start their own servers: leave --url out")
    tmp, template, model = None, a.template, Path(a.model) if a.model else None
    if model is None and not a.url:
        tmp = tempfile.TemporaryDirectory(prefix="domaintune-serve-load-")
        model = Path(tmp.name) / "tiny"
        made = subprocess.run([sys.executable, "-m", "domaintune", "make-tiny-model", str(model), "--size",
                               a.size], cwd=ROOT, capture_output=True, text=True)
        if made.returncode:
            raise SystemExit(f"make-tiny-model failed:\n{made.stdout}{made.stderr}")
        template = template or "domain_zh"
    old = tempfile.TemporaryDirectory(prefix="domaintune-baseline-") if a.baseline_rev else None
    load_start = load_average()
    try:
        arms = {}  # arm -> what measure() gets; the baseline and serial arms first in each round
        if old is not None:
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", a.baseline_rev, "src"], capture_output=True)
            if archive.returncode:
                raise SystemExit(f"--baseline-rev {a.baseline_rev}: {archive.stderr.decode().strip()}")
            subprocess.run(["tar", "-x", "-C", old.name], input=archive.stdout, check=True)
            arms["baseline"] = (None, Path(old.name) / "src")
        if a.compare_serial:
            arms["serial"] = (1, None)
        arms["batched"] = (a.max_batch_size, None)
        runs: dict[str, list[dict]] = {arm: [] for arm in arms}
        for _, arm in interleaved(list(arms), a.repeat if len(arms) > 1 else 1):
            runs[arm].append(measure(a, model, template, arms[arm][0], src=arms[arm][1]))
    finally:
        for t in (tmp, old):
            if t is not None:
                t.cleanup()

    argv = ["***" if i and sys.argv[i - 1] == "--api-key" else v for i, v in enumerate(sys.argv)]
    print(f"command: {shlex.join([sys.executable.rsplit('/', 1)[-1], *argv])}")
    print(f"provenance: {describe(provenance(load_start))}")
    labels = {"serial": "serial: --max-batch-size 1 (one request decoded at a time)",
              "batched": "batched: " + ("attached server" if a.url
                                        else f"--max-batch-size {a.max_batch_size or 'default'}")}
    if "baseline" in runs:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", a.baseline_rev], capture_output=True,
                             text=True).stdout.strip()
        labels["baseline"] = f"baseline: the server of revision {a.baseline_rev} ({rev})"
    for arm, ms in runs.items():
        for i, m in enumerate(ms, 1):
            report(m, a, labels[arm] + (f" (run {i} of {len(ms)})" if len(ms) > 1 else ""))

    def figures(ms: list[dict]) -> dict:
        ok = [m for m in ms if m["results"]]
        return {"wall": spread([m["wall"] for m in ok]),
                "p50": spread([pct([r[0] for r in m["results"]], 50) for m in ok]),
                "p95": spread([pct([r[0] for r in m["results"]], 95) for m in ok])} if ok else {}

    main_fig = figures(runs["batched"])
    for name in ("baseline", "serial"):
        ref = figures(runs.get(name, []))
        if ref and main_fig:
            print(f"== ratio ({name} / batched), of the medians of {len(runs[name])} runs each: " + ", ".join(
                f"{what} {ref[k]['median'] / main_fig[k]['median']:.2f}x ({name} {ref[k]['min']:.2f}-"
                f"{ref[k]['max']:.2f} s, batched {main_fig[k]['min']:.2f}-{main_fig[k]['max']:.2f} s)"
                for k, what in (("wall", "wall time"), ("p50", "p50 latency"), ("p95", "p95 latency"))))

if __name__ == "__main__":
    main()
