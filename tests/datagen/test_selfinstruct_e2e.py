"""gen-data end to end over real HTTP: `domaintune serve` (a subprocess on 127.0.0.1, micro Qwen2 model)
answers `domaintune gen-data` (a subprocess too), and `run_train` accepts the file it writes.

The micro model's text is nonsense; what is checked is the pipeline: exit codes, the exact row count,
valid rows, no duplicates, a manifest whose counts agree with the files, and training on the result.

The served template has many stop tokens (tests/served_tiny_model.py says why): without them every reply would
end with finish_reason "length", and gen-data rightly drops cut answers and the last (possibly incomplete) item
of a cut question list, so nothing would ever pass. With them replies vary in length, so gen-data's default
length bounds (questions 5..300 characters, answers >= 10) both keep and reject some replies. Nothing in the
model or in gen-data is patched.
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
CONFIG = REPO / "configs" / "selfinstruct.yaml"
SEEDS = REPO / "examples" / "data" / "seeds.jsonl"
KEY = "e2e-secret-key"
KEY_ENV = "DT_E2E_API_KEY"
MODEL = "tiny-e2e"
N = 6


def _env(**extra: str) -> dict:
    return local_env((KEY_ENV,), **extra)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """A `domaintune serve` subprocess of the micro Qwen2 model with an API key; yields its base URL (…/v1)."""
    with served_tiny_model(tiny_model_dir("qwen2"), tmp_path_factory.mktemp("e2e-serve"), KEY, MODEL) as (url, body):
        assert body == {"status": "ok", "model": MODEL, "auth": True}
        yield url


def _gen_data(base_url: str, out: Path, key: str, cwd: Path) -> subprocess.CompletedProcess:
    overrides = [
        f"selfinstruct.base_url={base_url}", f"selfinstruct.model={MODEL}", f"selfinstruct.api_key_env={KEY_ENV}",
        f"selfinstruct.num_questions={N}", f"selfinstruct.seeds_path={SEEDS}", f"selfinstruct.output_dir={out}",
        # Sampling at temperature 1 so every reply differs; short replies keep the run to seconds.
        "selfinstruct.temperature=1.0", "selfinstruct.max_tokens=48", "selfinstruct.request_timeout=60",
        # A rare reply cut at 48 tokens is dropped at once instead of waiting for backoff retries.
        "selfinstruct.on_length=drop", "selfinstruct.retry_base_delay=0",
    ]
    return subprocess.run([sys.executable, "-m", "domaintune", "gen-data", str(CONFIG), *overrides],
                          cwd=cwd, env=_env(**{KEY_ENV: key}), capture_output=True, text=True, timeout=300)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_wrong_api_key_exits_2_without_train_file(server, tmp_path):
    out = tmp_path / "gen"
    r = _gen_data(server, out, "not-the-key", tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    # cli.main prints a UserError as one "error: ..." line: the 401 and the variable to fix.
    assert (f"error: {server} answered 401 Unauthorized: check the API key in ${KEY_ENV}"
            in r.stderr.splitlines()), r.stderr
    assert "Traceback" not in r.stderr
    assert not (out / "train.jsonl").exists()
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["status"] == "failed"
    assert "401" in manifest["message"]
    assert manifest["counts"]["questions_kept"] == 0
    assert manifest["counts"]["http"]["status"] == {"401": manifest["counts"]["http"]["attempts"]}


def test_gen_data_against_served_tiny_model_then_train(server, tmp_path, tiny_train_config):
    from domaintune.data.examples import load_examples
    from domaintune.jsonl import read_jsonl
    from domaintune.training.trainer import run_train

    out = tmp_path / "gen"
    r = _gen_data(server, out, KEY, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == f"wrote {N} rows to {out / 'train.jsonl'} (details: {out / 'manifest.json'})"

    # The training file: exactly N valid instruction/input/output rows, no duplicate instruction.
    train_path = out / "train.jsonl"
    rows = _jsonl(train_path)
    assert len(rows) == N
    assert all(set(row) == {"instruction", "input", "output"} and row["input"] == "" for row in rows)
    assert all(row["instruction"].strip() and len(row["output"].strip()) >= 10 for row in rows)
    assert len({row["instruction"] for row in rows}) == N
    examples = load_examples(str(train_path))
    assert len(examples) == N
    messages = _jsonl(out / "train.messages.jsonl")  # write_messages: true in configs/selfinstruct.yaml
    assert messages == [{"messages": [{"role": "user", "content": row["instruction"]},
                                      {"role": "assistant", "content": row["output"]}]} for row in rows]

    # Every row is an accepted answer of a kept question, from the served model.
    questions = [q["question"] for q in _jsonl(out / "questions.jsonl")]
    answers = _jsonl(out / "answers.jsonl")
    rejected = _jsonl(out / "rejected.jsonl")
    by_question = {a["question"]: a for a in answers}
    for row in rows:
        assert row["instruction"] in questions
        assert by_question[row["instruction"]]["answer"] == row["output"]
    assert {a["model"] for a in answers} == {MODEL}
    assert {a["finish_reason"] for a in answers} == {"stop"}

    # The manifest agrees with itself and with the files.
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    c = manifest["counts"]
    assert (manifest["status"], manifest["target"], manifest["target_reached"], manifest["train_rows"]) == (
        "complete", N, True, N)
    assert manifest["message"] is None
    assert (manifest["model"], manifest["base_url"]) == (MODEL, server)
    assert manifest["runs"][-1]["status"] == "complete" and manifest["runs"][-1]["model"] == MODEL
    assert c["answers_kept"] == len(answers) == N
    assert c["questions_kept"] == len(questions)
    q_rejected = [x for x in rejected if x["stage"] == "question"]
    a_rejected = [x for x in rejected if x["stage"] == "answer"]
    # Questions seen (parsed from the replies and checked) = kept + rejected, each with its own record.
    assert sum(c["questions_rejected"].values()) == len(q_rejected)
    assert c["questions_rejected"] == {k: [x["reason"] for x in q_rejected].count(k) for k in c["questions_rejected"]}
    assert c["answers_rejected"] == {k: [x["reason"] for x in a_rejected].count(k) for k in c["answers_rejected"]}
    assert sum(c["answers_rejected"].values()) == len(a_rejected)
    # A finished run has answered or dropped every kept question.
    assert c["questions_kept"] == c["answers_kept"] + sum(c["answers_rejected"].values())
    # Every request reached the local server once and got 200 (no retries, nothing malformed).
    assert c["malformed_replies"] == 0
    assert c["http"] == {"attempts": c["question_calls"] + c["answer_calls"],
                         "status": {"200": c["question_calls"] + c["answer_calls"]}, "no_response": 0}
    assert c["answer_calls"] == len(answers) + len(a_rejected)

    # `domaintune train` accepts the file: two LoRA steps on the micro model.
    cfg = tiny_train_config(tmp_path / "run", "qwen2", f"data.path={train_path}", "data.val_size=0",
                            "train.max_steps=2", "train.batch_size=2", "train.per_device_batch_size=2",
                            "train.save_steps=2")
    run = Path(run_train(cfg))
    assert (run / "adapter_config.json").is_file()
    assert (run / "adapter_model.safetensors").stat().st_size > 0
    steps = [rec for rec in read_jsonl(run / "log.jsonl") if "loss" in rec]
    assert [rec["step"] for rec in steps] == [1, 2]
    info = json.loads((run / "run_info.json").read_text(encoding="utf-8"))
    assert (info["data"]["train_rows"], info["data"]["eval_rows"]) == (N, 0)


def test_gen_data_from_documents_against_served_tiny_model_then_train(server, tmp_path, tiny_train_config):
    """The documents mode over real HTTP, with configs/documents.yaml and the shipped sample documents. The
    judge is off: a random model cannot say SUPPORTED (the judge is tested against the scripted server)."""
    from domaintune.training.trainer import run_train

    out = tmp_path / "gen-docs"
    overrides = [
        f"selfinstruct.base_url={server}", f"selfinstruct.model={MODEL}", f"selfinstruct.api_key_env={KEY_ENV}",
        f"selfinstruct.num_questions={N}", f"selfinstruct.output_dir={out}", "selfinstruct.judge=false",
        f"selfinstruct.documents=[{REPO / 'examples' / 'docs'}]",
        f"selfinstruct.exclude=[{REPO / 'examples' / 'data' / 'test.jsonl'}]",
        f"selfinstruct.seeds_path={SEEDS}", "selfinstruct.passage_tokens=60",
        "selfinstruct.temperature=1.0", "selfinstruct.max_tokens=48", "selfinstruct.request_timeout=60",
        "selfinstruct.on_length=drop", "selfinstruct.retry_base_delay=0", "selfinstruct.max_concurrency=2",
    ]
    r = subprocess.run([sys.executable, "-m", "domaintune", "gen-data", str(REPO / "configs" / "documents.yaml"),
                        *overrides], cwd=tmp_path, env=_env(**{KEY_ENV: KEY}), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = _jsonl(out / "train.jsonl")
    assert len(rows) == N and len({row["instruction"] for row in rows}) == N
    docs = {p.name for p in (REPO / "examples" / "docs").iterdir()}
    for row in rows:
        assert set(row) == {"instruction", "input", "output", "source"}
        assert Path(row["source"]["file"]).name in docs and row["source"]["heading"]
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["status"] == "complete" and manifest["counts"]["judge_calls"] == 0
    assert sum(f["passages"] for f in manifest["documents"]["files"].values()) == manifest["documents"]["passages"]
    assert manifest["spent"]["calls"] == manifest["counts"]["http"]["attempts"]

    cfg = tiny_train_config(tmp_path / "run", "qwen2", f"data.path={out / 'train.jsonl'}", "data.val_size=0",
                            "train.max_steps=2", "train.batch_size=2", "train.per_device_batch_size=2",
                            "train.save_steps=2")
    run = Path(run_train(cfg))
    assert (run / "adapter_model.safetensors").stat().st_size > 0
    info = json.loads((run / "run_info.json").read_text(encoding="utf-8"))
    assert info["data"]["train_rows"] == N
