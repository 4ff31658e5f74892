"""The studio's actions on runs, against the review's defects: one run never gets two trainers (a lock around
check-and-start, 409 while it trains), Resume continues the run's own config in its own folder, a second Stop is
refused (a second SIGINT would end training without its checkpoint), no request value becomes a CLI flag, and the
chat server's key never reaches a command line. The jobs are real processes; a small script stands in for the
CLI verb where loading a model is beside the point (Jobs.start's `command`), so the argv is still the studio's."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from domaintune import rundir
from domaintune.inference.serve import ENV_KEY
from studio_runs import serving

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="studio jobs read /proc")

SRC = str(Path(__file__).resolve().parents[2] / "src")
CONFIG = "model:\n  name_or_path: /models/tiny-qwen2\ndata:\n  path: /data/train.jsonl\ntrain:\n  output_dir: {out}\n"
# `train` on SIGINT: saves its checkpoint (here: 2 s) and exits 130. A second SIGINT during the save would
# interrupt it (exit 1): the exit code tells whether the studio sent one SIGINT or two.
TRAINER = textwrap.dedent("""\
    import sys, time
    print("training", flush=True)
    try:
        time.sleep(120)
    except KeyboardInterrupt:
        time.sleep(2)
        print("checkpoint saved", flush=True)
        sys.exit(130)
""")
# a chat server as `serve` answers the studio: /health, and /v1/chat/completions only with the key of its env
FAKE_SERVE = textwrap.dedent("""\
    import json, os, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    KEY = os.environ["DOMAINTUNE_API_KEY"]
    class H(BaseHTTPRequestHandler):
        def answer(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        def do_GET(self):
            self.answer(200, {"status": "ok", "model": "fake-model", "auth": True})
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.headers.get("Authorization") != "Bearer " + KEY:
                return self.answer(401, {"error": {"message": "Incorrect API key provided."}})
            text = body["model"] + " heard " + body["messages"][-1]["content"]
            self.answer(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})
    HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def make_run(root: Path, name: str, state: str = "stopped", pid: int | None = None) -> Path:
    run = root / "runs" / name
    run.mkdir(parents=True)
    (run / rundir.CONFIG).write_text(CONFIG.format(out=run))
    (run / rundir.LOG).write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    (run / "status.json").write_text(json.dumps({
        "state": state, "pid": pid or os.getpid(), "host": os.uname().nodename, "started": "2026-12-07T04:00:00+00:00",
        "updated": "2026-12-07T04:01:00+00:00", "step": 1, "max_steps": 10, "message": ""}))
    return run


def fake_verbs(studio, monkeypatch) -> None:
    """Jobs keep the studio's argv but run TRAINER for train, FAKE_SERVE for serve, and `true` for the rest."""
    real = studio.jobs.start

    def start(kind, argv, run=None, extra=None, command=None, env=None):
        if command is None:
            script = [TRAINER] if kind == "train" else [FAKE_SERVE, argv[argv.index("--port") + 1]] \
                if kind == "serve" else ["pass"]
            command = [sys.executable, "-c", *script]
        return real(kind, argv, run=run, extra=extra, command=command, env=env)

    monkeypatch.setattr(studio.jobs, "start", start)


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def message(response: httpx.Response) -> str:
    return response.json()["error"]["message"]


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")])))
    root = tmp_path / "project"
    root.mkdir()
    yield root
    for record in (root / ".studio/jobs").glob("*.json"):  # a failed test leaves no process behind
        with contextlib.suppress(OSError, ValueError, TypeError):
            os.killpg(json.loads(record.read_text())["pid"], signal.SIGKILL)


def test_resume_continues_the_runs_own_config_in_its_own_folder_and_only_once(root, monkeypatch):
    run = make_run(root, "alpha").resolve()
    (root / "configs").mkdir()
    # saved over since alpha started: the same name, another folder
    (root / "configs/alpha.yaml").write_text(CONFIG.format(out=root / "runs/other"))
    (root / "runs/fresh").mkdir()
    (root / "runs/fresh" / rundir.LOG).write_text("")  # a run folder without config.yaml: it never trained
    with serving(root) as (url, studio):
        fake_verbs(studio, monkeypatch)
        earlier = studio.jobs.start("train", ["train", "configs/alpha.yaml"], run="runs/alpha",
                                    extra={"config": "configs/alpha.yaml"}, command=[sys.executable, "-c", "pass"])
        wait_for(lambda: studio.jobs.get(earlier["id"])["state"] != "running")
        with ThreadPoolExecutor(4) as pool:  # four Resume clicks at once
            answers = list(pool.map(lambda _: httpx.post(f"{url}/api/runs/runs/alpha/resume", timeout=30), range(4)))
        never = httpx.post(f"{url}/api/runs/runs/fresh/resume")
    started = [a for a in answers if a.status_code == 201]
    refused = [a for a in answers if a.status_code != 201]
    assert len(started) == 1 and [a.status_code for a in refused] == [409, 409, 409]
    job = started[0].json()["job"]
    assert all("already training" in message(a) and job["id"] in message(a) for a in refused)
    assert job["argv"] == ["train", str(run / rundir.CONFIG), f"train.output_dir={run}", "--resume"]
    assert job["config"] == "runs/alpha/config.yaml"
    assert yaml.safe_load((root / job["config"]).read_text())["train"]["output_dir"] == str(run)
    assert never.status_code == 409 and "never started training" in message(never)


def test_launch_is_refused_while_the_run_trains_and_saving_alone_is_not(root, monkeypatch):
    (root / "data").mkdir()
    (root / "data/train.jsonl").write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    (root / "models/fake").mkdir(parents=True)
    (root / "models/fake/config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64}))
    (root / "models/fake/tokenizer.json").write_text("{}")
    values = {"model.name_or_path": "models/fake", "data.path": "data/train.jsonl"}
    # the first save imports what training's pre-flight checks use (transformers): seconds on a busy machine
    with serving(root) as (url, studio), httpx.Client(base_url=url, timeout=120) as client:
        fake_verbs(studio, monkeypatch)
        client.post("/api/config/check", json={"values": values})
        body = {"values": values, "name": "first", "launch": True}
        with ThreadPoolExecutor(2) as pool:  # a double click on "Save and train"
            answers = list(pool.map(lambda _: client.post("/api/config/save", json=body), range(2)))
        saved_at_launch = (root / "configs/first.yaml").read_text()
        again = client.post("/api/config/save", json={**body, "values": {**values, "train.learning_rate": "2e-4"}})
        unchanged = (root / "configs/first.yaml").read_text()
        save_only = client.post("/api/config/save", json={**body, "launch": False,
                                                          "values": {**values, "train.learning_rate": "3e-4"}})
        jobs = client.get("/api/jobs").json()["jobs"]
    assert sorted(a.status_code for a in answers) == [201, 409]
    assert [j["kind"] for j in jobs] == ["train"] and jobs[0]["state"] == "running"
    assert again.status_code == 409 and "already training" in message(again) and "stop it first" in message(again)
    assert unchanged == saved_at_launch  # a refused launch writes nothing
    assert save_only.status_code == 201 and save_only.json()["job"] is None
    assert yaml.safe_load((root / "configs/first.yaml").read_text())["train"]["learning_rate"] == 3e-4


def test_a_second_stop_is_refused_while_the_first_saves_its_checkpoint(root, monkeypatch):
    make_run(root, "alpha")
    with serving(root) as (url, studio):
        fake_verbs(studio, monkeypatch)
        job = httpx.post(f"{url}/api/runs/runs/alpha/resume").json()["job"]
        wait_for(lambda: "training" in studio.jobs.log_tail(job["id"]))
        first = httpx.post(f"{url}/api/runs/runs/alpha/stop")
        second = httpx.post(f"{url}/api/runs/runs/alpha/stop")
        by_job = httpx.post(f"{url}/api/jobs/{job['id']}/stop")
        stopping = httpx.get(f"{url}/api/jobs/{job['id']}").json()["job"]
        listed = httpx.get(f"{url}/api/runs/runs/alpha").json()["jobs"]
        ended = wait_for(lambda: (j := httpx.get(f"{url}/api/jobs/{job['id']}").json()["job"])["ended"] and j)
    assert first.json() == {"stopped": "job", "job": job["id"]}
    for refused in (second, by_job):
        assert refused.status_code == 409
        assert message(refused).startswith("already stopping: the run is saving a checkpoint of its current step")
    assert stopping["state"] == "running" and stopping["stopping"] is True and stopping["stop_requested"]
    assert [(j["id"], j["stopping"]) for j in listed] == [(job["id"], True)]
    # one SIGINT: the checkpoint was saved and the exit code (130) written beside stop_requested
    assert (ended["state"], ended["exit_code"], ended["stopping"]) == ("stopped", 130, False)
    assert ended["stop_requested"] == stopping["stop_requested"]
    assert studio.jobs.log_tail(job["id"]).splitlines()[-1] == "checkpoint saved"


def test_a_cli_run_is_sent_one_sigint_per_minute(root, tmp_path):
    signals = tmp_path / "signals.txt"
    counter = ("import signal, time\n"
               f"signal.signal(signal.SIGINT, lambda *a: open({str(signals)!r}, 'a').write('INT\\n'))\n"
               "print('ready', flush=True)\ntime.sleep(60)\n")
    trainer = subprocess.Popen([sys.executable, "-c", counter], stdout=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout.readline().strip() == "ready"
        make_run(root, "cli", state="running", pid=trainer.pid)
        with serving(root) as (url, _):
            first = httpx.post(f"{url}/api/runs/runs/cli/stop")
            second = httpx.post(f"{url}/api/runs/runs/cli/stop")
            wait_for(signals.exists)
            time.sleep(0.5)  # a second SIGINT, had one been sent, would have landed by now
    finally:
        trainer.kill()
        trainer.wait()
    assert first.json() == {"stopped": "pid", "pid": trainer.pid}
    assert second.status_code == 409 and message(second).startswith("already stopping")
    assert signals.read_text() == "INT\n"


def test_no_request_value_becomes_a_command_line_flag(root, monkeypatch):
    make_run(root, "alpha")
    with serving(root) as (url, studio):
        fake_verbs(studio, monkeypatch)
        flag = httpx.post(f"{url}/api/runs/runs/alpha/benchmark", json={"tasks": ["mmlu", "--out-dir", "/tmp/x"]})
        spaced = httpx.post(f"{url}/api/runs/runs/alpha/benchmark", json={"tasks": ["mmlu extra"]})
        good = httpx.post(f"{url}/api/runs/runs/alpha/benchmark", json={"tasks": ["mmlu", "cmmlu:zh", "org/task-1.2"]})
        data = httpx.post(f"{url}/api/runs/runs/alpha/predict", json={"data": "--help"})
        outside = httpx.post(f"{url}/api/runs/runs/alpha/predict", json={"data": "/etc/hostname"})
        judge = httpx.post(f"{url}/api/runs/runs/alpha/judge", json={"config": "-x"})
        quant = httpx.post(f"{url}/api/runs/runs/alpha/export", json={"format": "gguf", "quant": "--out"})
        run = httpx.post(f"{url}/api/runs/--help/report")
        jobs = httpx.get(f"{url}/api/jobs").json()["jobs"]
    assert flag.status_code == 400 and "'--out-dir'" in message(flag)
    assert spaced.status_code == 400 and "'mmlu extra'" in message(spaced)
    assert good.status_code == 201
    assert good.json()["job"]["argv"] == ["eval", "--benchmark", "mmlu", "cmmlu:zh", "org/task-1.2", "--run",
                                          str((root / "runs/alpha").resolve())]
    # a path is read from ROOT: '--help' is ROOT/--help (absent), an absolute path is refused
    assert data.status_code == 400 and "'--help'" in message(data)
    assert outside.status_code == 403
    assert judge.status_code == 400 and quant.status_code == 400 and run.status_code == 404
    assert [j["id"] for j in jobs] == [good.json()["job"]["id"]]


def test_the_chat_key_reaches_the_server_in_its_environment_never_its_command_line(root, monkeypatch):
    make_run(root, "alpha")
    with serving(root) as (url, studio):
        fake_verbs(studio, monkeypatch)
        job = httpx.post(f"{url}/api/runs/runs/alpha/chat/start").json()["job"]
        wait_for(lambda: httpx.get(f"{url}/api/runs/runs/alpha/chat").json()["ready"])
        answer = httpx.post(f"{url}/api/runs/runs/alpha/chat/completions",
                            json={"messages": [{"role": "user", "content": "hello"}]})
        record = json.loads((root / f".studio/jobs/{job['id']}.json").read_text())
        pid = record["pid"]
        pids = [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]  # job.py, server
        cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes() for p in pids]
        studio.jobs.stop(job["id"])
    key = record["key"]
    assert len(key) >= 24 and "--api-key" not in record["argv"] and key not in json.dumps(record["argv"])
    assert record["env"] == [ENV_KEY] and key not in json.dumps(job)
    assert len(cmdlines) == 2 and not any(key.encode() in c for c in cmdlines)
    # the proxy sent the key the server got from its environment: 401 otherwise
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["content"] == "fake-model heard hello"
    assert stat.S_IMODE((root / ".studio/jobs").stat().st_mode) == 0o700  # the record holding the key is private
