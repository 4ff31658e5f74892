"""Jobs outlive the studio: `domaintune studio` (a real process, a real uvicorn) launches training through its API;
SIGKILL of the studio leaves the training process running and its log.jsonl growing; a restarted studio lists
the run as running and streams its new log records live; Stop from the new studio saves a checkpoint of the step
it stopped at (the Ctrl-C path) and the run reads "stopped"."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from domaintune.rundir import RunDir, latest_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_studio(root: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "domaintune", "studio", str(root), "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=log.open("ab"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
        try:
            if httpx.get(url + "/api/runs", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "the studio did not answer within 60 s"
        time.sleep(0.1)


def wait_for(what, timeout: float = 120, every: float = 0.1):
    deadline = time.time() + timeout
    while not (value := what()):
        assert time.time() < deadline, f"timed out waiting for {what.__doc__ or what}"
        time.sleep(every)
    return value


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (our own child after a kill) is not alive
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"


def test_training_survives_a_killed_studio_and_a_new_one_reattaches(tmp_path, tiny_model_dir, sample_data):
    root = tmp_path / "project"
    shutil.copytree(tiny_model_dir("qwen2"), root / "models" / "tiny-qwen2")
    (root / "data").mkdir()
    shutil.copy(sample_data / "train.jsonl", root / "data" / "train.jsonl")
    log = tmp_path / "studio.log"
    studio, url = start_studio(root, log)
    train_pid = None
    try:
        values = {"model.name_or_path": "models/tiny-qwen2", "data.path": "data/train.jsonl",
                  "data.cutoff_len": "256", "train.max_steps": "2000", "train.logging_steps": "1",
                  "train.save_steps": "1000", "train.eval_steps": "1000", "data.val_size": "0"}
        r = httpx.post(url + "/api/config/save", json={"values": values, "name": "survive", "launch": True},
                       timeout=60)
        assert r.status_code == 201, r.text
        run_id = r.json()["run"]
        assert run_id == "runs/survive"
        run = RunDir(root / run_id)

        def logged():
            """two log records"""
            return len(run.read_log()) >= 2 and run.file("status.json").is_file()

        wait_for(logged, timeout=180)
        train_pid = run.read_json("status.json")["pid"]

        studio.send_signal(signal.SIGKILL)
        studio.wait(10)
        n = len(run.read_log())

        def grew():
            """log.jsonl grows after the studio died"""
            return len(run.read_log()) >= n + 3

        wait_for(grew, timeout=60)
        assert alive(train_pid)

        studio, url = start_studio(root, log)  # a new studio over the same folder
        listed = {x["id"]: x for x in httpx.get(url + "/api/runs", timeout=10).json()["runs"]}
        assert listed[run_id]["status"] == "running"

        seen = run.read_log()[-1]["step"]
        with httpx.stream("GET", f"{url}/api/runs/{run_id}/events", timeout=30) as events:
            assert events.status_code == 200
            assert events.headers["content-type"].startswith("text/event-stream")
            newer = None
            kind = None
            for line in events.iter_lines():
                if line.startswith("event: "):
                    kind = line[len("event: "):]
                elif line.startswith("data: ") and kind == "log":
                    steps = [rec["step"] for rec in json.loads(line[len("data: "):])]
                    if max(steps) > seen:
                        newer = max(steps)
                        break
        assert newer is not None and newer > seen  # live records from the reattached run

        r = httpx.post(f"{url}/api/runs/{run_id}/stop", timeout=30)
        assert r.status_code == 200, r.text

        def stopped():
            """status.json says stopped"""
            return run.read_json("status.json")["state"] == "stopped"

        wait_for(stopped, timeout=120)
        status = run.read_json("status.json")
        ckpt = latest_checkpoint(run.path)
        assert ckpt is not None and ckpt.name == f"checkpoint-{status['step']}"  # Stop saved the step it ended
        assert status["step"] > newer - 1
        assert not run.file("run_info.json").exists()
        wait_for(lambda: not alive(train_pid), timeout=30)

        def shown_stopped():
            """the studio shows the run stopped (once the job's own process has recorded the exit code 130)"""
            return httpx.get(f"{url}/api/runs/{run_id}", timeout=10).json()["summary"]["status"] == "stopped"

        wait_for(shown_stopped, timeout=30)
        jobs = httpx.get(f"{url}/api/jobs", timeout=10).json()["jobs"]
        ours = [(j["kind"], j["state"], j["exit_code"]) for j in jobs if j["run"] == run_id]
        assert ours == [("train", "stopped", 130)]
    finally:
        if train_pid and alive(train_pid):
            os.kill(train_pid, signal.SIGKILL)
        if studio.poll() is None:
            studio.kill()
            studio.wait(10)
