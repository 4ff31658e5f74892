"""What produced a benchmark result, and how its arms were timed: shared by every script that writes bench/results/.

A figure is only worth keeping with the code and machine that made it. `provenance()` records the git revision
(and whether the work tree had uncommitted changes), the CPU model and core count, the GPU when one was used, the
Python/torch/transformers versions, the load average at the start and at the end (other work on a shared machine
slows every arm), and the date. Comparisons run each arm at least `MIN_REPEAT` times, interleaved
(`interleaved()`: A B B A A B ...), so a slow minute of the machine does not land on one arm only; `spread()`
gives the median with the min and max that belong next to it.

    from provenance import provenance, load_average, interleaved, spread   # bench/ is on sys.path for its scripts
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIN_REPEAT = 3  # runs per arm for a figure that is kept
VERSIONED = ("torch", "transformers")  # always recorded; scripts add the libraries their figure depends on


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def git_revision(root: Path = ROOT) -> dict:
    """{"revision": full hash, "dirty": uncommitted changes to tracked files}; both None outside a git checkout."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    rev = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if rev else None
    return {"revision": rev, "dirty": None if status is None else bool(status)}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(("model name", "Hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        line = next(li for li in Path("/proc/meminfo").read_text().splitlines() if li.startswith("MemTotal:"))
        return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        return None


def versions(*extra: str) -> dict:
    """Installed versions (None where not installed) of torch, transformers and `extra`, read from the package
    metadata: nothing is imported."""
    out = {}
    for name in (*VERSIONED, *extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance(load_start: Sequence[float] | None = None, gpu: str | None = None, extra_versions: Sequence[str] = (),
               root: Path = ROOT, git: dict | None = None) -> dict:
    """The record to store with a result (call it when the figures are in; pass `load_start=load_average()` and
    `git=git_revision()` taken before the first arm ran: the code that ran, not the code at the end)."""
    now = load_average()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git if git is not None else git_revision(root),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "ram_gib": _ram_gib(), "gpu": gpu,
                    "platform": platform.platform(), "python": platform.python_version()},
        "versions": versions(*extra_versions),
        "load_average": {"start": list(load_start) if load_start is not None else now, "end": now},
    }


def describe(p: dict) -> str:
    """One line for a Markdown result file or a printout."""
    g, m, v = p["git"], p["machine"], p["versions"]
    rev = "no git revision" if not g["revision"] else g["revision"][:12] + (" (dirty)" if g["dirty"] else "")
    la = p["load_average"]
    return (f"{p['date']}; code {rev}; {m['cpu']}, {m['cores']} cores" + (f", GPU {m['gpu']}" if m["gpu"] else "")
            + f"; python {m['python']}, " + ", ".join(f"{k} {val}" for k, val in v.items())
            + f"; load average (1, 5, 15 min) {la['start']} at the start, {la['end']} at the end")


def check_repeat(repeat: int, saving: bool) -> None:
    """A kept figure rests on MIN_REPEAT runs per arm at least; fewer are for a look (with --no-save)."""
    if saving and repeat < MIN_REPEAT:
        raise SystemExit(f"--repeat {repeat}: a saved result needs at least {MIN_REPEAT} runs per arm "
                         "(or add --no-save for a quick look)")


def interleaved(arms: Sequence[str], repeat: int) -> Iterator[tuple[int, str]]:
    """(run index, arm) for `repeat` rounds, the arm order reversed every other round: A B, B A, A B, ..."""
    for i in range(repeat):
        for arm in (arms if i % 2 == 0 else arms[::-1]):
            yield i, arm


def spread(values: Sequence[float]) -> dict:
    """{"median", "min", "max", "n"} of one figure over the runs of one arm."""
    import statistics

    vals = list(values)
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


if __name__ == "__main__":  # one line for logs of shell steps (gpu_check.sh)
    print(describe(provenance()))
