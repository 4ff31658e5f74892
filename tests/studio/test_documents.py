"""Data from documents through the studio, for real: a document uploaded into documents/, `gen-data` run as a job
against a scripted OpenAI-compatible teacher (tests/fake_llm_server.py), then the pairs with their sources and
what was rejected and why, as the documents page reads them from the API."""
from __future__ import annotations

import json
import time

import httpx
import pytest

from domaintune.jsonl import read_jsonl
from fake_llm_server import FakeLLM
from studio_runs import serving

KEY_ENV = "STUDIO_TEST_TEACHER_KEY"
GUIDE = """# Sleep

Children of school age need nine to eleven hours of sleep. A fixed bedtime helps more than a late weekend.
Screens an hour before bed delay sleep; a book or a quiet talk works better.

# Meals

Small portions, offered again later, work better than pressure. Children copy what the adults at the table eat.
"""
CONFIG = """# domaintune gen-data configs/docs.yaml
selfinstruct:
  domain: parenting
  language: en
  documents: [documents]
  doc_question_template: configs/q.txt
  doc_answer_template: configs/a.txt
  judge_template: configs/j.txt
  base_url: {base_url}
  model: fake-model
  api_key_env: {key_env}
  num_questions: 4
  questions_per_passage: 2
  passage_tokens: 60
  passage_overlap: 0
  max_concurrency: 1
  request_timeout: 5.0
  max_retries: 1
  retry_base_delay: 0.01
  output_dir: data/from-docs
"""


@pytest.fixture
def studio(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")  # the job reads the teacher's key from the studio's environment
    root = tmp_path / "project"
    root.mkdir()
    with serving(root) as (url, _):
        yield root, url


def test_documents_to_pairs_with_sources_and_the_rejected_with_reasons(studio):
    root, url = studio
    verdicts: list[str] = []

    def judge(prompt: str) -> str:  # every other answer is judged unsupported by its passage
        verdicts.append("UNSUPPORTED: the passage does not say that" if len(verdicts) % 2 else "SUPPORTED: fine")
        return verdicts[-1]

    with FakeLLM(judge_fn=judge, questions_per_reply=2) as teacher, httpx.Client(base_url=url, timeout=60) as api:
        r = api.post("/api/upload/documents", params={"filename": "guide.md"}, content=GUIDE.encode())
        assert r.status_code == 201, r.text
        assert [f["relpath"] for f in api.get("/api/files", params={"folder": "documents"}).json()["files"]] == \
            ["documents/guide.md"]
        configs = root / "configs"
        configs.mkdir()
        (configs / "q.txt").write_text("QUESTIONS n={num_questions} from {source}\n{passage}\n{examples}\n")
        (configs / "a.txt").write_text("ANSWER: {question}\nPASSAGE: {passage}")
        (configs / "j.txt").write_text("JUDGE\nQ: {question}\nA: {answer}\nP: {passage}")
        (configs / "docs.yaml").write_text(CONFIG.format(base_url=teacher.base_url, key_env=KEY_ENV))

        r = api.post("/api/documents/generate", json={"config": "configs/docs.yaml"})
        assert r.status_code == 201, r.text
        job, out = r.json()["job"], r.json()["out"]
        assert out == "data/from-docs"
        deadline = time.time() + 180
        while (state := api.get(f"/api/jobs/{job['id']}").json()["job"]["state"]) == "running":
            assert time.time() < deadline
            time.sleep(0.3)
        assert state == "finished", api.get(f"/api/jobs/{job['id']}").json()["log"][-2000:]

        pairs = api.get("/api/documents/pairs", params={"path": out}).json()
        rejected = api.get("/api/documents/rejected", params={"path": out}).json()

    written = read_jsonl(root / out / "train.jsonl")
    assert len(written) == 4
    assert [p["question"] for p in pairs["pairs"]] == [w["instruction"] for w in written]
    assert all(p["answer"].startswith("Answer to: ") for p in pairs["pairs"])
    assert {p["source"]["file"].rsplit("/", 1)[-1] for p in pairs["pairs"]} == {"guide.md"}
    assert all(p["source"]["heading"] in ("Sleep", "Meals") for p in pairs["pairs"])
    unsupported = sum(v.startswith("UNSUPPORTED") for v in verdicts)
    assert unsupported >= 1
    judged_out = [row for row in rejected["rows"] if "does not say that" in json.dumps(row["detail"])]
    assert len(judged_out) == unsupported == rejected["counts"][judged_out[0]["reason"]]
    assert rejected["total"] == len(rejected["rows"]) == sum(rejected["counts"].values())
    assert all(row["hint"] for row in judged_out)  # gen-data's own advice for the reason
