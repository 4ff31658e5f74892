"""The runs of a project folder as the studio shows them: where they are, their state, a one-line summary, and
the new records of a growing log.jsonl.

Everything here reads files other processes are writing (training, predict, judge), so nothing raises on a
missing, half-written or odd file: a value that cannot be read is None. The status of a live training run comes
from its status.json (written by `train`, rank 0); a "running" status whose process is gone is reported as failed.
Liveness is checked with os.kill(pid, 0): POSIX only.
"""
from __future__ import annotations

import json
import os
import socket
import threading
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import processes, rundir
from ..rundir import RunDir

FIND_DEPTH = 4  # ROOT/runs/group/name/...: deep enough for grouped runs, shallow enough to scan data folders quickly
STALE_S = 15 * 60  # a "running" status from another host not updated for this long is taken as dead
RATE_WINDOW = 10  # log records the current speed (tokens/s, s/step) is measured over
DIED = "the training process ended without a word (killed?)"


def find_runs(root: str | os.PathLike) -> list[Path]:
    """Run directories under `root` (at most FIND_DEPTH below it), sorted: folders for which
    `RunDir.looks_like_run()`, not searched inside (a run's checkpoints are not runs), nor hidden folders,
    checkpoint-* folders and symlinks."""
    root = Path(root)
    found: list[Path] = []

    def walk(path: Path, depth: int) -> None:
        try:
            children = sorted(p for p in path.iterdir() if p.is_dir() and not p.is_symlink())
        except OSError:
            return
        for child in children:
            if child.name.startswith((".", rundir.CHECKPOINT_PREFIX)):
                continue
            if RunDir(child).looks_like_run():
                found.append(child)
            elif depth < FIND_DEPTH:
                walk(child, depth + 1)

    walk(root, 1)
    return found


def read_status(run_dir: str | os.PathLike) -> dict | None:
    """The run's status.json as written by `train`, or None when missing or unreadable."""
    return _object(_read_json(Path(run_dir) / rundir.STATUS))


def run_status(run_dir: str | os.PathLike) -> dict:
    """{state: running|finished|stopped|failed, message, pid, host, started, updated, step, max_steps} of a run.

    From status.json when there is one, except that "running" with its process gone (on this host: no such pid;
    on another: not updated for STALE_S) is "failed" with the message DIED. Without status.json (runs from
    before it): finished when the final weights and run_info.json are saved, else stopped."""
    status = read_status(run_dir)
    if status is None:
        finished = RunDir(run_dir).is_finished()
        return {"state": "finished" if finished else "stopped", "message": "", "pid": None, "host": None,
                "started": None, "updated": None, "step": None, "max_steps": None}
    out = {"state": status.get("state") if status.get("state") in ("running", "finished", "stopped", "failed")
           else "failed",
           "message": status.get("message") if isinstance(status.get("message"), str) else "",
           "pid": _int(status.get("pid")), "host": _str(status.get("host")), "started": _str(status.get("started")),
           "updated": _str(status.get("updated")), "step": _int(status.get("step")),
           "max_steps": _int(status.get("max_steps")), "pid_start": _int(status.get("pid_start"))}
    if out["state"] == "running" and not _still_running(out):
        out.update(state="failed", message=DIED)
    return out


def _still_running(status: dict) -> bool:
    if status["host"] not in (None, socket.gethostname()):
        updated = _parse_time(status["updated"])
        return updated is not None and (datetime.now(timezone.utc) - updated).total_seconds() < STALE_S
    if status["pid_start"] is not None and processes.start_time(status["pid"]) not in (None, status["pid_start"]):
        return False  # the pid now belongs to a process that started later: the run's own process is gone
    return pid_alive(status["pid"])


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this pid exists (on this host). pid <= 0 is never alive: os.kill would signal a
    whole process group."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OSError:
        return False
    return True


def summary(run_dir: str | os.PathLike, root: str | os.PathLike | None = None) -> dict:
    """One run as the studio lists it (see STUDIO.md): id (path from `root`, "/"-separated; the folder name
    when `root` is None), name, status, message, model, data, method, stage, step, max_steps, loss, eval_loss,
    tokens_per_s, memory_mib, eta_s, started, metrics, judge, benchmark. A value whose file is missing or
    unreadable is None."""
    path = Path(run_dir)
    run = RunDir(path)
    status = run_status(path)
    cfg = _read_config(run.config_path)
    model, lora, data, train = (_object(cfg.get(k)) or {} for k in ("model", "lora", "data", "train"))
    log = _read_log(run.log_path)
    info = _object(_read_json(run.run_info_path)) or {}
    step = status["step"] if status["step"] is not None else _last(log, "step")
    max_steps = status["max_steps"] or _max_steps(path, train)
    per_step, tokens_per_s = _rates(log)
    eta = None
    if status["state"] == "running" and per_step is not None and step is not None and max_steps:
        eta = round(max(max_steps - step, 0) * per_step, 1)
    memory = [r["memory_mib"] for r in log if isinstance(r.get("memory_mib"), (int, float))]
    return {
        "id": _relid(path, root), "name": path.name, "path": str(path),
        "status": status["state"], "message": status["message"],
        "model": _str(model.get("name_or_path")) or _str(info.get("base_model")),
        "data": data_label(data.get("path")),
        "method": _method(cfg, lora, model) or _str(info.get("method")),
        "stage": _str(train.get("stage")) or ("sft" if cfg else None),
        "step": step, "max_steps": max_steps,
        "loss": _last(log, "loss"), "eval_loss": _last(log, "eval_loss"),
        "tokens_per_s": tokens_per_s, "memory_mib": max(memory) if memory else None, "eta_s": eta,
        "started": status["started"],
        "metrics": _metrics(run), "judge": _judge(run), "benchmark": _benchmark(run),
    }


def data_label(path: Any) -> str | None:
    """A short label of config.yaml's data.path: a path, a source's name/path/hub id, or several joined by ", "."""
    items = path if isinstance(path, list) else [path]
    labels = []
    for item in items:
        if isinstance(item, str):
            labels.append(item)
        elif isinstance(item, dict):
            label = item.get("name") or item.get("path") or item.get("hub")
            if isinstance(label, str):
                labels.append(label)
    return ", ".join(labels) or None


class LogTail:
    """Reads the records appended to a JSONL file (log.jsonl) since the last call, for live updates.

    Keeps a byte offset; a torn last line (a writer mid-line) is left for a later call, once its newline is
    there. A file that shrank or was replaced (training resumed from a checkpoint rewrites log.jsonl with the
    records up to it) is read again from its start, and `restarted` is True after that call, so a chart can
    start over. Complete lines that are not JSON objects are skipped."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.offset = 0
        self.restarted = False
        self._inode: int | None = None

    def read_new(self) -> list[dict]:
        self.restarted = False
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                if (self._inode is not None and st.st_ino != self._inode) or st.st_size < self.offset:
                    self.offset, self.restarted = 0, True
                self._inode = st.st_ino
                f.seek(self.offset)
                data = f.read()
        except OSError:  # not written yet, or replaced between open and read: the next call sees it
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        out = []
        for line in data[:end].split(b"\n"):
            try:
                rec = json.loads(line)
            except ValueError:  # blank, or a line cut by a crash and written over: the reader goes on
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out


# ---------------------------------------------------------------- readers that never raise

def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_config(path: Path) -> dict:
    import yaml

    try:
        return _object(yaml.safe_load(path.read_text(encoding="utf-8"))) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return {}


class _LogDigest:
    """What the summary reads of a log, kept up to date from a LogTail: the last record with each of step, loss and
    eval_loss, the last RATE_WINDOW timed records and the record of peak memory, in file order. The runs table and
    every open run page ask for summaries every few seconds: a long run's log is read once, then only its new
    lines."""

    def __init__(self, path: Path) -> None:
        self.tail = LogTail(path)
        self.n = 0
        self.last: dict[str, tuple[int, dict]] = {}
        self.window: deque[tuple[int, dict]] = deque(maxlen=RATE_WINDOW)
        self.peak: tuple[int, dict] | None = None

    def records(self) -> list[dict]:
        new = self.tail.read_new()
        if self.tail.restarted:  # rewritten (a resume): start over from what the tail read again
            self.n, self.last, self.peak = 0, {}, None
            self.window.clear()
        for rec in new:
            i, self.n = self.n, self.n + 1
            for key in ("step", "loss", "eval_loss"):
                if _num(rec.get(key)) is not None:
                    self.last[key] = (i, rec)
            if _num(rec.get("time")) is not None and _num(rec.get("step")) is not None:
                self.window.append((i, rec))
            memory = _num(rec.get("memory_mib"))
            if memory is not None and (self.peak is None or memory > self.peak[1]["memory_mib"]):
                self.peak = (i, rec)
        kept = dict([*self.last.values(), *self.window, *([self.peak] if self.peak else [])])
        return [kept[i] for i in sorted(kept)]


_DIGESTS: dict[Path, _LogDigest] = {}
_DIGESTS_LOCK = threading.Lock()  # routes run in a thread pool: one reader per log at a time


def _read_log(path: Path) -> list[dict]:
    key = path.resolve()
    with _DIGESTS_LOCK:
        digest = _DIGESTS.setdefault(key, _LogDigest(key))
        return digest.records()


def _object(value: Any) -> dict | None:
    return value if isinstance(value, dict) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _num(value: Any) -> float | int | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _parse_time(text: str | None) -> datetime | None:
    try:
        t = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _relid(path: Path, root: str | os.PathLike | None) -> str:
    if root is None:
        return path.name
    try:
        return path.resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return path.name


def _last(log: list[dict], key: str) -> Any:
    for rec in reversed(log):
        if (value := _num(rec.get(key))) is not None:
            return value
    return None


def _rates(log: list[dict]) -> tuple[float | None, float | None]:
    """(seconds per step, tokens per second) over the last RATE_WINDOW records with a time: the current speed,
    not the average since a start that included warm-up."""
    timed = [r for r in log if _num(r.get("time")) is not None and _num(r.get("step")) is not None]
    window = timed[-RATE_WINDOW:]
    per_step = tokens_per_s = None
    if len(window) >= 2:
        first, last = window[0], window[-1]
        dt = last["time"] - first["time"]
        if dt > 0 and last["step"] > first["step"]:
            per_step = dt / (last["step"] - first["step"])
        toks = [r for r in window if _num(r.get("tokens")) is not None]
        if len(toks) >= 2 and toks[-1]["time"] > toks[0]["time"]:
            tokens_per_s = round((toks[-1]["tokens"] - toks[0]["tokens"]) / (toks[-1]["time"] - toks[0]["time"]), 1)
    return per_step, tokens_per_s


def _max_steps(path: Path, train: dict) -> int | None:
    ckpt = rundir.latest_checkpoint(path)
    if ckpt is not None and (planned := rundir.checkpoint_progress(ckpt)[1]):
        return planned
    steps = _int(train.get("max_steps"))
    return steps if steps and steps > 0 else None


def _method(cfg: dict, lora: dict, model: dict) -> str | None:
    """lora / qlora / freeze / full, as training/outputs.py's run_method names it in run_info.json."""
    if not cfg:
        return None
    if lora.get("enabled", True) is False:
        freeze = _object(cfg.get("freeze")) or {}
        return "freeze" if freeze.get("enabled") is True else "full"
    return "qlora" if model.get("quantization", "none") != "none" else "lora"


def _metrics(run: RunDir) -> dict | None:
    """metrics.json's numbers (bleu-4, rouge-l, ... as evaluation/metrics.py's run_eval writes them; predict adds
    loss/perplexity); its nested blocks (judge, benchmark) are summarised from their own files instead."""
    metrics = _object(_read_json(run.file(rundir.METRICS)))
    if metrics is None:
        return None
    return {k: v for k, v in metrics.items() if _num(v) is not None}


def _judge(run: RunDir) -> dict | None:
    """From judge.json as evaluation/judge.py's Judge.summarize writes it: status, mode, and the "pairwise" block
    of judge_stats.pairwise_stats (win_rate, win_rate_ci95 [low, high], rows, usable_rows, problem), present
    once the judge has ended."""
    data = _object(_read_json(run.file(rundir.JUDGE_SUMMARY)))
    if data is None:
        return None
    pair = _object(data.get("pairwise")) or {}
    ci = pair.get("win_rate_ci95")
    low, high = (ci if isinstance(ci, list) and len(ci) == 2 else (None, None))
    progress = _object(data.get("progress")) or {}
    return {"status": _str(data.get("status")), "mode": _str(data.get("mode")),
            "win_rate": _num(pair.get("win_rate")), "low": _num(low), "high": _num(high),
            "n": _int(pair.get("rows")), "usable": _int(pair.get("usable_rows")),
            "problem": _str(pair.get("problem")) or _str(data.get("error")),
            "done": _int(progress.get("done")), "total": _int(progress.get("total"))}


def _benchmark(run: RunDir) -> dict | None:
    """From benchmark.json as evaluation/benchmark.py's save_results writes it: per task, the delta of each
    metric (tuned - base) and the item count."""
    data = _object(_read_json(run.file(rundir.BENCHMARK)))
    tasks = _object(data.get("tasks")) if data else None
    if tasks is None:
        return None
    out = {}
    for task, scored in tasks.items():
        scored = _object(scored) or {}
        delta = _object(scored.get("delta")) or {}
        out[task] = {"delta": {k: v for k, v in delta.items() if _num(v) is not None}, "n": _int(scored.get("n"))}
    return out
