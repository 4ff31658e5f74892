"""judge end to end over real HTTP: `domaintune serve` (a subprocess on 127.0.0.1, the micro Qwen2 model) is the
judge of `domaintune judge --run RUN` (a subprocess too), after `predict` made RUN's base and fine-tuned
predictions of three test rows.

The micro model's replies are nonsense, so nearly every call is unparseable: what is checked is that the run
completes, says so, and writes judge.jsonl / judge.json / metrics.json whose counts agree with each other. The
served template has stop tokens so that each reply ends after a few tokens (see
tests/datagen/test_selfinstruct_e2e.py for why).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("openai")
pytest.importorskip("uvicorn")

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "judge.yaml"
TEST = REPO / "examples" / "data" / "test.jsonl"
KEY = "judge-e2e-key"
KEY_ENV = "DT_JUDGE_E2E_KEY"
MODEL = "tiny-judge"
ROWS = 3
N_STOP_TOKENS = 128
HEALTH_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env.pop(KEY_ENV, None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"  # local traffic must not go through a proxy
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _health(port: int) -> int | None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:  # not listening yet
        return None


def _stop_template(model_dir: Path, out: Path) -> Path:
    """domain_zh with every 16th ordinary vocabulary token as a stop token: replies of a few tokens."""
    from transformers import AutoTokenizer

    from domaintune.data.templates import get_template

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = sorted(i for i in tok.get_vocab().values() if i not in tok.all_special_ids)
    stops = tok.convert_ids_to_tokens(ids[:: len(ids) // N_STOP_TOKENS][:N_STOP_TOKENS])
    tpl = {**get_template("domain_zh", tok).to_dict(), "name": "domain_zh_judge_stops", "stop": stops}
    out.write_text(json.dumps(tpl, ensure_ascii=False, indent=1), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def judge_server(tiny_model_dir, tmp_path_factory):
    """A `domaintune serve` subprocess with an API key; yields its base URL (…/v1). Always terminated."""
    model_dir = tiny_model_dir("qwen2")
    tmp = tmp_path_factory.mktemp("judge-serve")
    template = _stop_template(model_dir, tmp / "template.json")
    log_path = tmp / "serve.log"
    proc = None
    try:
        for _ in range(3):  # another process may take the free port between our probe and the server's bind
            port = _free_port()
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "domaintune", "serve", str(model_dir), "--port", str(port),
                     "--api-key", KEY, "--model-name", MODEL, "--template", str(template),
                     "--device", "cpu", "--log-level", "warning"],
                    cwd=tmp, env=_env(), stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + HEALTH_TIMEOUT_S
            status = None
            while proc.poll() is None and time.monotonic() < deadline and status != 200:
                status = _health(port)
                time.sleep(0.2)
            if status == 200:
                break
            if proc.poll() is None:
                pytest.fail(f"server not ready within {HEALTH_TIMEOUT_S}s:\n{log_path.read_text(errors='replace')}")
            if "address already in use" not in log_path.read_text(errors="replace").lower():
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        else:
            pytest.fail(f"no free port after 3 tries:\n{log_path.read_text(errors='replace')}")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_judge_base_vs_tuned_with_the_served_tiny_model(judge_server, tiny_run_copy, tmp_path):
    from domaintune.inference.params import GenerationParams
    from domaintune.inference.predict import run_predict

    run = tiny_run_copy
    params = GenerationParams(max_new_tokens=24)
    run_predict(run, TEST, base_only=True, limit=ROWS, params=params)
    run_predict(run, TEST, limit=ROWS, params=params)
    scores = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert "bleu-4" in scores

    command = [sys.executable, "-m", "domaintune", "judge", str(CONFIG), "--run", str(run), "--mode", "both",
               f"judge.base_url={judge_server}", f"judge.model={MODEL}", f"judge.api_key_env={KEY_ENV}",
               "judge.max_tokens=32", "judge.malformed_retries=0", "judge.bootstrap_samples=200"]
    r = subprocess.run(command, cwd=tmp_path, env=_env(**{KEY_ENV: KEY}), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr

    records = _jsonl(run / "judge.jsonl")
    head, body = records[0], records[1:]
    assert head["kind"] == "header" and head["mode"] == "both" and head["model"] == MODEL
    keys = [rec["key"] for rec in body]
    assert len(keys) == len(set(keys)) == 4 * ROWS
    assert set(keys) == {f"{i}/{k}" for i in range(ROWS) for k in ("pairwise/AB", "pairwise/BA", "grade/a", "grade/b")}
    assert all(rec["model"] == MODEL and rec["calls"] == 1 for rec in body)
    assert all(rec["unparseable"] == (rec.get("verdict", rec.get("grade")) in ("unparseable", None)) for rec in body)

    summary = json.loads((run / "judge.json").read_text(encoding="utf-8"))
    assert summary["status"] == "complete" and summary["error"] is None
    assert summary["questions_from"] == str(TEST.resolve())  # from predict's .meta.json sidecar
    assert summary["rows"] == ROWS and summary["progress"] == {"done": 4 * ROWS, "total": 4 * ROWS}
    c = summary["counts"]
    unparseable = sum(rec["unparseable"] for rec in body)
    assert (c["records"], c["calls"], c["retries"], c["unparseable"]) == (4 * ROWS, 4 * ROWS, 0, unparseable)
    assert c["malformed"] == unparseable  # no retries: each bad reply is one unparseable record
    assert c["http"] == {"attempts": 4 * ROWS, "status": {"200": 4 * ROWS}, "no_response": 0}
    assert c["prompt_tokens"] > 0 and c["completion_tokens"] > 0 and c["tokens_estimated"] == 0  # serve's usage
    p = summary["pairwise"]
    assert p["wins"] + p["ties"] + p["losses"] == ROWS
    bad_rows = {rec["id"] for rec in body if rec["kind"] == "pairwise" and rec["unparseable"]}
    assert p["unparseable_rows"] == p["ties_by_cause"]["unparseable"] == len(bad_rows)
    g = summary["grade"]
    for side in ("a", "b"):
        bad = sum(1 for rec in body if rec["kind"] == "grade" and rec["answer"] == side and rec["unparseable"])
        assert (g[side]["n"], g[side]["unparseable"]) == (ROWS - bad, bad)
    assert len(summary["per_row"]) == ROWS

    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert {k: v for k, v in metrics.items() if k != "judge"} == scores  # predict's scores kept
    assert metrics["judge"]["pairwise"] == p and metrics["judge"]["grade"] == g
    assert metrics["judge"]["unparseable"] == unparseable
    out = r.stdout.splitlines()
    assert out[0].startswith(f"judge {MODEL}: B = {run / 'predictions.jsonl'} vs A = ") and out[0].endswith("3 rows")
    assert out[1].startswith(f"pairwise: B wins {p['wins']}, ties {p['ties']}, losses {p['losses']}")
    assert out[-1] == (f"wrote {run / 'judge.json'} and {run / 'metrics.json'}[\"judge\"] "
                       f"(records: {run / 'judge.jsonl'})")

    # Everything is recorded: the same command again asks nothing and gives the same numbers.
    before = (run / "judge.jsonl").read_bytes()
    again = subprocess.run(command, cwd=tmp_path, env=_env(**{KEY_ENV: KEY}), capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr
    assert (run / "judge.jsonl").read_bytes() == before
    summary2 = json.loads((run / "judge.json").read_text(encoding="utf-8"))
    assert (summary2["pairwise"], summary2["grade"]) == (p, g)
    assert summary2["counts"]["http"] == c["http"]  # carried over, nothing added
