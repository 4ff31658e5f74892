"""gen-data against a scripted OpenAI-compatible server on 127.0.0.1: faults, errors, concurrency, resume."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from domaintune.config.selfinstruct import SelfInstructConfig
from domaintune.datagen.selfinstruct import run_gen_data
from domaintune.errors import UserError
from fake_llm_server import FakeLLM

SEEDS = ["How can parents support alpha bravo charlie?",
         "What helps delta echo foxtrot at home?",
         "Why do golf hotel india matter for kids?"]
KEY_ENV = "DT_SELFINSTRUCT_TEST_KEY"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture
def inputs(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"question": q}) + "\n" for q in SEEDS), encoding="utf-8")
    qt = tmp_path / "q.txt"
    qt.write_text("QUESTIONS n={num_questions} domain={domain} by {name}\n{examples}\n", encoding="utf-8")
    at = tmp_path / "a.txt"
    at.write_text("ANSWER: {question}", encoding="utf-8")
    return tmp_path


def make_cfg(inputs: Path, base_url: str, **kw) -> SelfInstructConfig:
    base = dict(domain="parenting", language="en", seeds_path=str(inputs / "seeds.jsonl"),
                question_template=str(inputs / "q.txt"), answer_template=str(inputs / "a.txt"),
                base_url=base_url, model="fake-model", api_key_env=KEY_ENV, num_questions=6,
                questions_per_call=3, examples_per_prompt=2, max_concurrency=1, request_timeout=2.0,
                max_retries=2, malformed_retries=2, retry_base_delay=0.01, output_dir=str(inputs / "out"))
    base.update(kw)
    return SelfInstructConfig(**base)


def check_pairs(out: Path, target: int) -> list[dict]:
    """train.jsonl has `target` rows, no question twice, each with the answer the server gave for it."""
    rows = read_jsonl(out / "train.jsonl")
    assert len(rows) == target
    qs = [r["instruction"] for r in rows]
    assert len(set(qs)) == target
    assert all(r["output"] == f"Answer to: {r['instruction']}" and r["input"] == "" for r in rows)
    kept = [r["question"] for r in read_jsonl(out / "questions.jsonl")]
    assert len(kept) == len(set(kept))
    answered = [r["question"] for r in read_jsonl(out / "answers.jsonl")]
    assert len(answered) == len(set(answered)) and set(answered) <= set(kept)
    return rows


def test_faults_are_retried_and_counted(inputs, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "secret-123")
    bad = {"questions": [SEEDS[0].upper(),                               # exact duplicate (case-folded)
                         "How can parents support alpha bravo charlie now?",  # near-duplicate of a seed
                         "Hi?",                                          # too short
                         "How to draw a kangaroo for school?",           # blocklist ("draw")
                         "Q900: how to handle zz1 zz2 zz3 zz4?"]}        # kept
    script = ["429", "ok", bad, "500", "ok",                             # question calls
              "slow", "ok", "malformed", "ok", "length", "ok", "no_choices", "ok"]  # answers
    with FakeLLM(script=script, retry_after="1", slow_seconds=3.0) as srv:
        out = run_gen_data(make_cfg(inputs, srv.base_url, request_timeout=1.0))
        log = list(srv.log)

    assert [e["status"] for e in log] == [429, 200, 200, 500] + [200] * 11
    assert len(log) == 15
    # Retry-After: 1 was honoured (the client's own first backoff is at most 0.5 s).
    assert log[1]["time"] - log[0]["time"] >= 1.0
    # The key comes from the environment variable; the body is a plain chat completion request.
    assert {e["auth"] for e in log} == {"Bearer secret-123"}
    assert set(log[0]["body"]) == {"model", "messages", "temperature", "max_tokens"}
    assert log[0]["body"]["model"] == "fake-model"
    assert log[0]["prompt"].startswith("QUESTIONS n=3 domain=parenting by Assistant\n1. ")

    rows = check_pairs(out, 6)
    assert [r["instruction"] for r in rows] == [
        "Q0: how to handle k0x k0y k0z k0w?", "Q1: how to handle k1x k1y k1z k1w?",
        "Q2: how to handle k2x k2y k2z k2w?", "Q900: how to handle zz1 zz2 zz3 zz4?",
        "Q3: how to handle k3x k3y k3z k3w?", "Q4: how to handle k4x k4y k4z k4w?"]
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert m["status"] == "complete" and m["target_reached"] is True and m["train_rows"] == 6
    assert m["model"] == "fake-model" and m["config"]["num_questions"] == 6
    c = m["counts"]
    assert c["questions_kept"] == 6 and c["answers_kept"] == 6
    assert c["questions_rejected"] == {"blocklist": 1, "duplicate": 1, "near_duplicate": 1, "too_short": 1}
    assert c["answers_rejected"] == {}
    assert c["questions_surplus"] == 1          # Q5 arrived after the target was met
    assert c["malformed_replies"] == 2
    assert c["answer_length_retries"] == 1
    assert c["question_calls"] == 3 and c["answer_calls"] == 9
    assert c["http"] == {"attempts": 15, "status": {"200": 12, "429": 1, "500": 1}, "no_response": 1}
    rejected = read_jsonl(out / "rejected.jsonl")
    near = [r for r in rejected if r["reason"] == "near_duplicate"][0]
    assert near["similar_to"] == SEEDS[0] and near["rouge_l"] == round(2 * 7 / (7 + 8), 4)


def test_401_stops_with_clear_message(inputs, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with FakeLLM(script=["401"]) as srv:
        with pytest.raises(UserError, match=rf"401 Unauthorized: check the API key in \${KEY_ENV} \(it is not set\)"):
            run_gen_data(make_cfg(inputs, srv.base_url, max_retries=3))
        assert srv.statuses() == [401]  # not retried
    out = inputs / "out"
    assert not (out / "train.jsonl").exists()
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert m["status"] == "failed" and m["target_reached"] is False and m["train_rows"] is None
    assert "check the API key" in m["message"]
    assert (out / "questions.jsonl").read_text() == ""


def test_400_is_not_retried(inputs, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "k")
    with FakeLLM(script=["400"]) as srv:
        with pytest.raises(UserError, match=r"400 Bad Request \(bad request\); not retried: check selfinstruct.model"):
            run_gen_data(make_cfg(inputs, srv.base_url, max_retries=3))
        assert srv.statuses() == [400]


def test_retries_exhausted_stop_and_resume(inputs, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "k")
    with FakeLLM(script=["500", "500"]) as srv:
        with pytest.raises(UserError, match=r"still answered 500 .* run the same command again to resume"):
            run_gen_data(make_cfg(inputs, srv.base_url, max_retries=1))
        assert srv.statuses() == [500, 500]
        out = run_gen_data(make_cfg(inputs, srv.base_url, max_retries=1))
    check_pairs(out, 6)
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert [r["status"] for r in m["runs"]] == ["failed", "complete"]
    assert m["counts"]["http"]["status"] == {"200": 8, "500": 2}  # summed over both runs


def test_pool_is_bounded_and_concurrent(inputs, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "k")
    with FakeLLM(questions_per_reply=2, delay=0.15) as srv:
        out = run_gen_data(make_cfg(inputs, srv.base_url, num_questions=12, questions_per_call=2,
                                    max_concurrency=3, request_timeout=5))
        assert srv.max_in_flight == 3
    check_pairs(out, 12)


def test_length_drop_policy_replaces_the_question(inputs, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "k")
    script = ["ok", "ok", "length"]  # 2 question calls (6 questions), then the first answer is cut
    with FakeLLM(script=script) as srv:
        out = run_gen_data(make_cfg(inputs, srv.base_url, on_length="drop", write_messages=True))
    rows = check_pairs(out, 6)
    cut = "Q0: how to handle k0x k0y k0z k0w?"
    assert cut not in [r["instruction"] for r in rows]
    assert rows[-1]["instruction"] == "Q6: how to handle k6x k6y k6z k6w?"  # asked for as a replacement
    rej = read_jsonl(out / "rejected.jsonl")
    assert [(r["stage"], r["reason"], r["question"]) for r in rej] == [("answer", "answer_truncated", cut)]
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert m["counts"]["answers_rejected"] == {"answer_truncated": 1} and m["counts"]["questions_kept"] == 7
    msgs = read_jsonl(out / "train.messages.jsonl")
    assert msgs[0] == {"messages": [{"role": "user", "content": rows[0]["instruction"]},
                                    {"role": "assistant", "content": rows[0]["output"]}]}
    assert len(msgs) == 6


def test_endpoint_that_cannot_deliver_is_reported(inputs, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "k")
    # After the first reply the endpoint only repeats itself: every question is a duplicate.
    script = ["ok"] + [{"questions": ["Q0: how to handle k0x k0y k0z k0w?"]}] * 3
    with FakeLLM(script=script, questions_per_reply=2) as srv:
        out = run_gen_data(make_cfg(inputs, srv.base_url, max_stalled_calls=3))
        assert [e["kind"] for e in srv.log] == ["question"] * 4 + ["answer"] * 2
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert m["status"] == "incomplete" and m["target_reached"] is False and m["train_rows"] == 2
    assert m["message"].startswith("target not reached: the last 3 question calls kept no new question")
    # The hint follows the dominant drop of the stall, with its count and what to change (issue 22, 29).
    assert m["message"] == ("target not reached: the last 3 question calls kept no new question (duplicate 3); most "
                            "were dropped as duplicate (3 of 3): the teacher (selfinstruct.model='fake-model' at "
                            f"{srv.base_url}) repeats questions already kept: add seed questions (or documents), or "
                            "raise selfinstruct.temperature (now 0.7); see rejected.jsonl")
    assert m["counts"]["questions_rejected"] == {"duplicate": 3}
    check_pairs(out, 2)


def test_rerun_of_a_complete_run_sends_nothing(inputs, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "k")
    with FakeLLM() as srv:
        cfg = make_cfg(inputs, srv.base_url)
        out = run_gen_data(cfg)
        first = (out / "train.jsonl").read_bytes()
        n = len(srv.log)
        run_gen_data(cfg)
        assert len(srv.log) == n
        assert (out / "train.jsonl").read_bytes() == first
        # A larger target extends the same files; the first rows stay as they were.
        run_gen_data(make_cfg(inputs, srv.base_url, num_questions=9))
    rows = check_pairs(out, 9)
    assert "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:6]).encode() == first


def test_torn_last_line_is_repaired(inputs, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "k")
    with FakeLLM() as srv:
        cfg = make_cfg(inputs, srv.base_url)
        out = run_gen_data(cfg)
        answers = out / "answers.jsonl"
        data = answers.read_bytes()
        last_start = data.rstrip(b"\n").rfind(b"\n") + 1
        answers.write_bytes(data[: last_start + 7])  # the last record is cut mid-line, as by a kill
        n = len(srv.log)
        run_gen_data(cfg)
        assert [e["kind"] for e in srv.log[n:]] == ["answer"]  # only the lost answer is asked again
    check_pairs(out, 6)
    assert len(read_jsonl(answers)) == 6


def count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.parametrize("phase", ["questions", "answers"])
def test_kill_and_rerun(inputs, phase, monkeypatch):
    target = 10
    with FakeLLM(questions_per_reply=2, delay=0.1) as srv:
        cfg = make_cfg(inputs, srv.base_url, num_questions=target, questions_per_call=2, max_concurrency=2,
                       request_timeout=5)
        out = Path(cfg.output_dir)
        config = inputs / "gen.yaml"
        config.write_text(yaml.safe_dump({"selfinstruct": cfg.model_dump(mode="json")}, allow_unicode=True),
                          encoding="utf-8")
        env = dict(os.environ, **{KEY_ENV: "k"})
        proc = subprocess.Popen([sys.executable, "-m", "domaintune", "gen-data", str(config)], env=env)
        watch, at_least = (out / "questions.jsonl", 3) if phase == "questions" else (out / "answers.jsonl", 3)
        deadline = time.monotonic() + 60
        while count_lines(watch) < at_least and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        assert not (out / "train.jsonl").exists()
        before_q = (out / "questions.jsonl").read_bytes()
        before_a = (out / "answers.jsonl").read_bytes() if (out / "answers.jsonl").exists() else b""
        if phase == "questions":
            assert 3 <= count_lines(out / "questions.jsonl") < target and before_a == b""
        else:
            assert 3 <= count_lines(out / "answers.jsonl") < target
        monkeypatch.setenv(KEY_ENV, "k")
        run_gen_data(cfg)
    rows = check_pairs(out, target)
    # Nothing written before the kill was lost: the old files are prefixes of the new ones.
    keep = before_q[: before_q.rfind(b"\n") + 1]
    assert (out / "questions.jsonl").read_bytes().startswith(keep)
    keep = before_a[: before_a.rfind(b"\n") + 1]
    assert (out / "answers.jsonl").read_bytes().startswith(keep)
    assert [r["instruction"] for r in rows] == [r["question"] for r in read_jsonl(out / "questions.jsonl")]
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert m["status"] == "complete" and [r["status"] for r in m["runs"]] == ["running", "complete"]


def test_control_characters_are_dropped_with_their_reason(inputs, monkeypatch):
    """Regression (issue 22, 31): a \u0006 from the teacher went into train.jsonl (judge or not). Questions and
    answers holding control characters are dropped and counted; tabs and line ends stay."""
    monkeypatch.setenv(KEY_ENV, "k")
    qs = ["Q1: how to handle k1x k1y k1z?", "Q2: how to\u0006 handle k2x k2y k2z?", "Q3: how to handle k3x k3y k3z?",
          "Q4: how to handle k4x k4y k4z?"]
    answers = {qs[0]: "Answer to: Q1\u0006\u001b[31m", qs[2]: "Line one\n\tLine two of Q3"}
    with FakeLLM(script=[{"questions": qs}], answer_fn=lambda q: answers.get(q, f"Answer to: {q}")) as srv:
        out = run_gen_data(make_cfg(inputs, srv.base_url, num_questions=2, questions_per_call=4))
    rows = read_jsonl(out / "train.jsonl")
    # Q2 is dropped, Q3 kept with its tab and line end, Q1's answer dropped and replaced by a new question.
    assert (rows[0]["instruction"], rows[0]["output"]) == (qs[2], answers[qs[2]])
    assert len(rows) == 2 and rows[1]["instruction"] not in qs[:2]
    rej = {(r["stage"], r["reason"]): r for r in read_jsonl(out / "rejected.jsonl")}
    assert rej[("question", "control_chars")]["question"] == qs[1]
    assert rej[("question", "control_chars")]["control_chars"] == ["\\u0006"]
    assert rej[("answer", "answer_control_chars")]["control_chars"] == ["\\u0006", "\\u001b"]
    c = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["counts"]
    assert (c["questions_rejected"], c["answers_rejected"]) == ({"control_chars": 1}, {"answer_control_chars": 1})


def test_ctrl_c_records_interrupted_and_says_how_to_continue(inputs, monkeypatch):
    """Regression (issue 22, 29): after Ctrl-C manifest.json stayed at "running" and the CLI said only
    "interrupted". Now the manifest says "interrupted" with what is kept and how to go on, and so does stderr."""
    target = 10
    with FakeLLM(questions_per_reply=2, delay=0.1) as srv:
        cfg = make_cfg(inputs, srv.base_url, num_questions=target, questions_per_call=2, max_concurrency=2)
        out = Path(cfg.output_dir)
        config = inputs / "gen.yaml"
        config.write_text(yaml.safe_dump({"selfinstruct": cfg.model_dump(mode="json")}), encoding="utf-8")
        env = dict(os.environ, **{KEY_ENV: "k"})
        proc = subprocess.Popen([sys.executable, "-m", "domaintune", "gen-data", str(config)], env=env,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while count_lines(out / "answers.jsonl") < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        said = m["message"]
        assert re.fullmatch(rf"interrupted with (\d+) of {target} pairs made \(kept in {re.escape(str(out))}\); run "
                            "the same command again to continue", said), said
        # (the signal may land between an answer's write and its count: the file may hold one more)
        assert 1 <= int(said.split()[2]) <= len(read_jsonl(out / "answers.jsonl"))
        assert (m["status"], m["runs"][-1]["status"]) == ("interrupted", "interrupted")
        assert err.rstrip().endswith(f"gen-data: {said}") and "Traceback" not in err
        assert not (out / "train.jsonl").exists()
        monkeypatch.setenv(KEY_ENV, "k")
        run_gen_data(cfg)
    check_pairs(out, target)
    assert json.loads((out / "manifest.json").read_text(encoding="utf-8"))["status"] == "complete"
