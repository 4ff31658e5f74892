"""judge end to end over real HTTP: `domaintune serve` (a subprocess on 127.0.0.1, the micro Qwen2 model) is the
judge of `domaintune judge --run RUN` (a subprocess too), after `predict` made RUN's base and fine-tuned
predictions of three test rows.

The micro model's replies are nonsense, so nearly every call is unparseable: what is checked is that the run
completes, says so, and writes judge.jsonl / judge.json / metrics.json whose counts agree with each other. The
served template has stop tokens so that each reply ends after a few tokens (see
tests/served_tiny_model.py for why).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from served_tiny_model import local_env, served_tiny_model

pytest.importorskip("openai")
pytest.importorskip("uvicorn")

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "judge.yaml"
TEST = REPO / "examples" / "data" / "test.jsonl"
KEY = "judge-e2e-key"
KEY_ENV = "DT_JUDGE_E2E_KEY"
MODEL = "tiny-judge"
ROWS = 3


def _env(**extra: str) -> dict:
    return local_env((KEY_ENV,), **extra)


@pytest.fixture(scope="module")
def judge_server(tiny_model_dir, tmp_path_factory):
    """A `domaintune serve` subprocess of the micro Qwen2 model with an API key; yields its base URL (…/v1)."""
    with served_tiny_model(tiny_model_dir("qwen2"), tmp_path_factory.mktemp("judge-serve"), KEY, MODEL) as (url, _):
        yield url


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
    assert head["kind"] == "header" and head["settings"]["mode"] == "both" and head["settings"]["model"] == MODEL
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
    assert r.stderr.splitlines()[-1] == (f"wrote {run / 'judge.json'} and {run / 'metrics.json'}[\"judge\"] "
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
