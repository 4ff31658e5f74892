"""Run a docs page as written: its marked commands, in order, from an empty folder, with the checks it states.

Markers are HTML comments (the site does not show them), each on the line right before a fenced block, or alone:

| marker | meaning |
|---|---|
| `<!-- run -->` | the next ```bash block runs with `bash -e -o pipefail` from the page's scratch folder |
| `<!-- run: fails -->` | the same, and it must exit non-zero (an error the page documents) |
| `<!-- file: PATH -->` | the next fenced block's text is written to PATH under the scratch folder |
| `<!-- output -->` | the next fenced block is what the previous run block printed (see below) |
| `<!-- check: PATH ... -->` | these paths exist after the blocks above (a file non-empty) |

An output block passes when each of its non-blank lines appears in the run block's stdout and stderr together; runs
of whitespace count as one space, and `...` in a line elides text (its pieces must appear in order).

The environment (`page_env`) makes the pages' hub ids load tiny stand-ins and gives a stand-in teacher:
PATH starts with this interpreter's bin folder; HF_HUB_OFFLINE=1 and HF_HUB_CACHE hold, for each hub id a page
names in `STAND_INS`, a micro random model of that family; TEACHER_URL, TEACHER_MODEL and OPENAI_API_KEY point
at tests/stand_in_teacher.py. Every process a page starts (servers in the background included) is killed when
the page ends.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# the hub ids the docs use, and the family of the stand-in each gets (the studio's model picker names the same)
STAND_INS = {
    "Qwen/Qwen3-0.6B": "qwen3", "Qwen/Qwen2.5-0.5B-Instruct": "qwen2", "meta-llama/Llama-3.2-1B-Instruct": "llama3",
    "google/gemma-3-1b-it": "gemma3", "mistralai/Mistral-7B-Instruct-v0.3": "mistral",
    "microsoft/Phi-3-mini-4k-instruct": "phi3", "THUDM/GLM-4-9B-0414": "glm4", "bigscience/bloomz-560m": "bloom",
    "Qwen/Qwen3-30B-A3B": "qwen3_moe", "meta-llama/Llama-2-7b-chat-hf": "llama",
}
_MARKER = re.compile(r"^<!--\s*(run|file|output|check)(?::\s*(.*?))?\s*-->\s*$")
_FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)")
SNAPSHOT = "0" * 40


@dataclass
class Step:
    kind: str  # run | file | output | check
    line: int  # 1-based line of the marker in the page
    arg: str = ""
    text: str = ""
    lang: str = ""


@dataclass
class PageRun:
    steps: list[Step] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)  # one per run step, in order


def parse(md: str, name: str = "page") -> list[Step]:
    """The marked steps of a page, in order. A marker not followed by the block it needs is an error."""
    lines = md.splitlines()
    steps: list[Step] = []
    i = 0
    while i < len(lines):
        m = _MARKER.match(lines[i].strip())
        if not m:
            i += 1
            continue
        step = Step(m[1], i + 1, (m[2] or "").strip())
        if step.kind == "check":
            if not step.arg:
                raise ValueError(f"{name}:{step.line}: check marker without a path")
            steps.append(step)
            i += 1
            continue
        fence = _FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        if fence is None:
            raise ValueError(f"{name}:{step.line}: <!-- {step.kind} --> must stand right before a fenced block")
        end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == fence[1]), None)
        if end is None:
            raise ValueError(f"{name}:{step.line}: the fenced block after the marker is never closed")
        step.lang, step.text = fence[2], "\n".join(lines[i + 2:end]) + "\n"
        if step.kind == "run" and step.lang not in ("bash", "sh", "shell"):
            raise ValueError(f"{name}:{step.line}: a run marker needs a ```bash block, not ```{step.lang}")
        if step.kind == "run" and step.arg not in ("", "fails"):
            raise ValueError(f"{name}:{step.line}: unknown run option {step.arg!r} (only 'fails')")
        if step.kind == "file" and (not step.arg or Path(step.arg).is_absolute() or ".." in Path(step.arg).parts):
            raise ValueError(f"{name}:{step.line}: file marker needs a relative path inside the folder")
        steps.append(step)
        i = end + 1
    if steps and steps[0].kind == "output":
        raise ValueError(f"{name}:{steps[0].line}: an output block before any run block")
    return steps


def hub_ids(md: str) -> list[str]:
    return [hub_id for hub_id in STAND_INS if hub_id in md]


def seed_hub_cache(cache: Path, models: dict[str, Path]) -> None:
    """Lay out Hugging Face's cache so that each hub id resolves, offline, to the files of a local model folder."""
    for hub_id, folder in models.items():
        repo = cache / ("models--" + hub_id.replace("/", "--"))
        snapshot = repo / "snapshots" / SNAPSHOT
        if snapshot.is_dir():
            continue
        shutil.copytree(folder, snapshot)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(SNAPSHOT, encoding="utf-8")


def _normal(text: str) -> str:
    return " ".join(text.split())


def output_misses(expected: str, printed: str) -> list[str]:
    """The lines of an output block that the printed text does not contain."""
    printed = _normal(printed)
    misses = []
    for line in expected.splitlines():
        if not line.strip():
            continue
        at = 0
        for piece in (_normal(p) for p in line.split("...")):
            if not piece:
                continue
            found = printed.find(piece, at)
            if found < 0:
                misses.append(line)
                break
            at = found + len(piece)
    return misses


def run_page(page: Path, scratch: Path, env: dict[str, str], timeout: float = 300.0) -> PageRun:
    """Run `page`'s steps from the (empty) folder `scratch`; AssertionError names the page line that failed."""
    steps = parse(page.read_text(encoding="utf-8"), page.name)
    scratch.mkdir(parents=True, exist_ok=True)
    result = PageRun(steps)
    groups: list[int] = []
    try:
        for step in steps:
            where = f"{page.name}:{step.line}"
            if step.kind == "file":
                target = scratch / step.arg
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(step.text, encoding="utf-8")
            elif step.kind == "check":
                for rel in step.arg.split():
                    path = scratch / rel
                    assert path.exists(), f"{where}: {rel} does not exist\n{_last(result)}"
                    assert path.is_dir() or path.stat().st_size > 0, f"{where}: {rel} is empty"
            elif step.kind == "output":
                assert result.outputs, f"{where}: output block before any run block"
                misses = output_misses(step.text, result.outputs[-1])
                assert not misses, f"{where}: not printed by the block above: {misses}\n{_last(result)}"
            else:
                log = scratch.parent / f".{scratch.name}-{step.line}.log"  # a file, not a pipe: a server
                with log.open("w+", encoding="utf-8") as sink:                # left running keeps a pipe open
                    proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", step.text], cwd=scratch, env=env,
                                            stdout=sink, stderr=subprocess.STDOUT, text=True, start_new_session=True)
                    groups.append(proc.pid)
                    try:
                        proc.wait(timeout=timeout)
                    except subprocess.TimeoutExpired:
                        _kill(proc.pid)
                        raise AssertionError(f"{where}: still running after {timeout:.0f} s\n"
                                             f"{log.read_text(encoding='utf-8')[-3000:]}") from None
                    out = log.read_text(encoding="utf-8")
                result.outputs.append(out.replace(f"{scratch}/", "").replace(str(scratch), "."))
                if step.arg == "fails":
                    assert proc.returncode != 0, f"{where}: should have failed, exit 0\n{out[-3000:]}"
                else:
                    assert proc.returncode == 0, f"{where}: exit {proc.returncode}\n{step.text}\n{out[-4000:]}"
    finally:
        for pgid in groups:
            _kill(pgid)
    return result


def _last(result: PageRun) -> str:
    return f"last output:\n{result.outputs[-1][-3000:]}" if result.outputs else ""


def _kill(pgid: int) -> None:
    """End a block's whole process group (a server it left in the background included)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        if sig == signal.SIGTERM:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    os.killpg(pgid, 0)
                except (ProcessLookupError, PermissionError):
                    return
                time.sleep(0.1)


def page_env(cache: Path, teacher_url: str) -> dict[str, str]:
    """The environment the pages run in (see the module docstring)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "TEACHER_URL": teacher_url, "TEACHER_MODEL": "stand-in-teacher", "OPENAI_API_KEY": "sk-stand-in",
        "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "NO_COLOR": "1",
    })
    return env


def marked_pages(docs: Path) -> list[Path]:
    return sorted(p for p in docs.rglob("*.md") if any(_MARKER.match(x.strip())
                                                        for x in p.read_text(encoding="utf-8").splitlines()))
