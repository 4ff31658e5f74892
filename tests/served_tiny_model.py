"""A real `domaintune serve` of a tiny model as an OpenAI-compatible endpoint, for end-to-end tests of the verbs
that call one (gen-data as the teacher, judge as the judge).

Why the served template has many stop tokens: a randomly initialised model almost never samples EOS (about 1 in
2048 tokens), so every reply would run to max_tokens and end with finish_reason "length". The template therefore
lists 128 ordinary vocabulary tokens as stop tokens (the public `serve --template FILE.json` feature): each reply
stops after ~16 tokens on average, with finish_reason "stop", and its length varies."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

N_STOP_TOKENS = 128
HEALTH_TIMEOUT_S = 120


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def local_env(drop: tuple[str, ...] = (), **extra: str) -> dict:
    """The environment for a subprocess talking to 127.0.0.1: no proxy, one thread, unbuffered output, without
    DOMAINTUNE_API_KEY and the variables in `drop`, plus `extra`."""
    env = dict(os.environ)
    for name in ("DOMAINTUNE_API_KEY", *drop):
        env.pop(name, None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"  # local traffic must not go through a proxy
    env["OMP_NUM_THREADS"] = "1"  # micro matrices gain nothing from threads on a 2-core machine
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def health(port: int) -> tuple[int | None, dict]:
    """(status, body) of GET /health; status None while nothing listens."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {}
    except OSError:
        return None, {}


def stop_template(model_dir: Path, out: Path) -> Path:
    """domain_zh with every 16th ordinary vocabulary token as a stop token (see the module docstring)."""
    from transformers import AutoTokenizer

    from domaintune.data.templates import get_template

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = sorted(i for i in tok.get_vocab().values() if i not in tok.all_special_ids)
    stops = tok.convert_ids_to_tokens(ids[:: len(ids) // N_STOP_TOKENS][:N_STOP_TOKENS])
    tpl = {**get_template("domain_zh", tok).to_dict(), "name": "domain_zh_e2e_stops", "stop": stops}
    out.write_text(json.dumps(tpl, ensure_ascii=False, indent=1), encoding="utf-8")
    return out


@contextlib.contextmanager
def running_app(app) -> Iterator[str]:
    """Run an ASGI `app` with uvicorn on 127.0.0.1 (a free port) in a background thread; yield its base URL."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def served_tiny_model(model_dir: Path, tmp: Path, key: str, model_name: str) -> Iterator[tuple[str, dict]]:
    """A `domaintune serve` subprocess with an API key: yields (base URL ending in /v1, its /health body). Always
    terminated."""
    template = stop_template(model_dir, tmp / "template.json")
    log_path = tmp / "serve.log"
    proc = None
    try:
        for _ in range(3):  # another process may take the free port between our probe and the server's bind
            port = free_port()
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "domaintune", "serve", str(model_dir), "--port", str(port),
                     "--api-key", key, "--model-name", model_name, "--template", str(template),
                     "--device", "cpu", "--log-level", "warning"],
                    cwd=tmp, env=local_env(), stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + HEALTH_TIMEOUT_S
            status, body = None, {}
            while proc.poll() is None and time.monotonic() < deadline and status != 200:
                status, body = health(port)
                time.sleep(0.2)
            if status == 200:
                break
            if proc.poll() is None:
                pytest.fail(f"server not ready within {HEALTH_TIMEOUT_S}s:\n{log_path.read_text(errors='replace')}")
            if "address already in use" not in log_path.read_text(errors="replace").lower():
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        else:
            pytest.fail(f"no free port after 3 tries:\n{log_path.read_text(errors='replace')}")
        yield f"http://127.0.0.1:{port}/v1", body
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
