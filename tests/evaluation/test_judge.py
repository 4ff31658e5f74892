"""`domaintune judge` against the scripted OpenAI-compatible server (tests/fake_llm_server.py): verdicts in both
orders, bootstrap intervals, malformed replies, grades, mismatched files, kill and resume, metrics.json."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from domaintune import cli
from domaintune.config import JudgeConfig
from domaintune.datagen.chunking import approx_tokens
from domaintune.errors import UserError
from domaintune.evaluation import judge_stats
from domaintune.evaluation.judge import JUDGE_RECORDS, JUDGE_SUMMARY, run_judge
from domaintune.evaluation.judge_prompts import parse_grade, parse_verdict
from fake_llm_server import FakeLLM

KEY_ENV = "DT_JUDGE_TEST_KEY"
_SHOWN = re.compile(r"<answer_A>\n(.*?)\n</answer_A>", re.S)
_GRADED = re.compile(r"<answer>\n(.*?)\n</answer>", re.S)
_QID = re.compile(r"question (\d+)\?")


def write_predictions(path: Path, n: int, side: str, **changes: dict) -> Path:
    """n rows as `predict` writes them; side "a" or "b" marks whose answers they are. changes: {id: {field: value}}."""
    rows = []
    for i in range(n):
        row = {"id": i, "input": f"User: question {i}?\n\nAssistant:", "target": f"reference {i}",
               "predict": f"answer of {side.upper()} to question {i}", "num_tokens": 5, "time": 0.1}
        row.update(changes.get(str(i), {}))
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_cfg(base_url: str, **kw) -> JudgeConfig:
    base = dict(base_url=base_url, model="judge-model", api_key_env=KEY_ENV, language="en", max_concurrency=3,
                request_timeout=5.0, max_retries=1, malformed_retries=2, retry_base_delay=0.0,
                bootstrap_samples=300, seed=7)
    base.update(kw)
    return JudgeConfig(**base)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# What the scripted judge prefers, per question id, as (file preferred when A is shown first, when B is first);
# "pos1" = whatever is shown first (position bias), "tie" = says tie, "junk" = a reply without a verdict line.
PLAN = {0: ("b", "b"), 1: ("a", "a"), 2: ("pos1", "pos1"), 3: ("tie", "b"), 4: ("b", "b"), 5: ("junk", "junk")}
EXPECTED = {0: ("win", "consistent"), 1: ("loss", "consistent"), 2: ("tie", "inconsistent"),
            3: ("tie", "judge_tie"), 4: ("win", "consistent"), 5: ("tie", "unparseable")}


def pairwise_reply(prompt: str) -> str:
    qid = int(_QID.search(prompt).group(1))
    first = "a" if _SHOWN.search(prompt).group(1).startswith("answer of A") else "b"
    want = PLAN[qid][0 if first == "a" else 1]
    if want == "junk":
        return "Both answers have merits; hard to say."
    if want == "tie":
        return "They are equally good.\nVERDICT: TIE"
    if want == "pos1":
        return "The first one reads better.\nVERDICT: A"
    position = "A" if want == first else "B"
    return f"Answer {position} matches the reference.\n**VERDICT:** {position}"


def grade_reply(prompt: str) -> str:
    """A gets 4 + id, B gets 6 + id; question 5's B answer gets an out-of-scale grade (malformed)."""
    qid = int(_QID.search(prompt).group(1))
    side = "A" if _GRADED.search(prompt).group(1).startswith("answer of A") else "B"
    if side == "B" and qid == 5:
        return "Excellent.\nGRADE: 12"
    return f"Reasonable.\nGRADE: {(4 if side == 'A' else 6) + qid % 5}/10"


def reply(prompt: str) -> str:
    return pairwise_reply(prompt) if "<answer_A>" in prompt else grade_reply(prompt)


@pytest.fixture
def files(tmp_path):
    """(A, B): the base and fine-tuned predictions of a run folder, 6 rows each."""
    run = tmp_path / "run"
    run.mkdir()
    return (write_predictions(run / "predictions.base.jsonl", 6, "a"),
            write_predictions(run / "predictions.jsonl", 6, "b"))


def test_pairwise_counts_with_order_swaps(files, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "secret")
    a, b = files
    (b.parent / "metrics.json").write_text(json.dumps({"bleu-4": 12.5, "loss": 2.0}), encoding="utf-8")
    with FakeLLM(reply_fn=reply) as srv:
        summary = run_judge(make_cfg(srv.base_url), a, b)
        log = list(srv.log)
    p = summary["pairwise"]
    assert (p["rows"], p["wins"], p["ties"], p["losses"]) == (6, 2, 3, 1)
    assert p["ties_by_cause"] == {"judge_tie": 1, "inconsistent": 1, "unparseable": 1}
    assert p["unparseable_rows"] == 1
    assert p["win_rate"] == round((2 + 3 * 0.5) / 6, 4)
    assert [(r["id"], r["pairwise"], r["why"]) for r in summary["per_row"]] == [(i, *EXPECTED[i]) for i in range(6)]
    # 9 A/B verdicts (row 3 has a tie, row 5 none); rows 0, 1, 3, 4 pick the first position once, row 2 twice.
    assert p["first_position_rate"] == round(6 / 9, 4)

    records = read_jsonl(b.parent / JUDGE_RECORDS)
    assert records[0]["kind"] == "header" and records[0]["settings"]["mode"] == "pairwise"
    body = records[1:]
    assert sorted(r["key"] for r in body) == sorted(f"{i}/pairwise/{o}" for i in range(6) for o in ("AB", "BA"))
    by_key = {r["key"]: r for r in body}
    assert (by_key["0/pairwise/AB"]["verdict"], by_key["0/pairwise/AB"]["winner"]) == ("B", "b")
    assert (by_key["0/pairwise/BA"]["verdict"], by_key["0/pairwise/BA"]["winner"]) == ("A", "b")  # mapped back
    assert by_key["0/pairwise/AB"]["reason"] == "Answer B matches the reference."
    assert (by_key["2/pairwise/AB"]["winner"], by_key["2/pairwise/BA"]["winner"]) == ("a", "b")
    junk = by_key["5/pairwise/AB"]
    assert (junk["verdict"], junk["winner"], junk["unparseable"], junk["calls"], junk["malformed"]) == \
        ("unparseable", None, True, 3, 3)
    assert junk["reason"] == "Both answers have merits; hard to say."

    # The requests: each order shows the answers the other way round; temperature 0, the configured model.
    prompts = Counter((int(_QID.search(e["prompt"]).group(1)), _SHOWN.search(e["prompt"]).group(1)[10])
                      for e in log)
    assert prompts == Counter({(i, s): 3 if i == 5 else 1 for i in range(6) for s in "AB"})
    assert {e["body"]["temperature"] for e in log} == {0.0} and {e["body"]["model"] for e in log} == {"judge-model"}
    assert {e["auth"] for e in log} == {"Bearer secret"}

    c = summary["counts"]
    assert (c["records"], c["calls"], c["retries"], c["malformed"], c["unparseable"]) == (12, 16, 4, 6, 2)
    assert (c["prompt_tokens"], c["completion_tokens"], c["tokens_estimated"]) == (16, 16, 0)  # the fake's usage
    assert c["http"] == {"attempts": 16, "status": {"200": 16}, "no_response": 0}
    assert summary["status"] == "complete" and summary["questions_from"] == "predictions input"

    on_disk = json.loads((b.parent / JUDGE_SUMMARY).read_text(encoding="utf-8"))
    assert on_disk == summary
    metrics = json.loads((b.parent / "metrics.json").read_text(encoding="utf-8"))
    assert (metrics["bleu-4"], metrics["loss"]) == (12.5, 2.0)  # written earlier by other verbs: kept
    assert metrics["judge"]["pairwise"] == p
    assert (metrics["judge"]["model"], metrics["judge"]["rows"], metrics["judge"]["unparseable"]) == \
        ("judge-model", 6, 2)


def _independent_ci(values: list[float], samples: int, seed: int) -> list[float]:
    import numpy as np

    rng = np.random.default_rng(seed)
    means = []
    for _ in range(samples):
        idx = rng.integers(0, len(values), size=len(values))
        means.append(sum(values[i] for i in idx) / len(values))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def test_bootstrap_interval_is_seeded_and_matches_an_independent_computation(files, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "k")
    a, b = files
    with FakeLLM(reply_fn=reply) as srv:
        first = run_judge(make_cfg(srv.base_url), a, b)
        calls = len(srv.log)
        again = run_judge(make_cfg(srv.base_url), a, b)  # everything recorded: nothing asked again
        other = run_judge(make_cfg(srv.base_url, seed=8), a, b)  # the seed is not a verdict setting: reused
        assert len(srv.log) == calls
    scores = [judge_stats.ROW_SCORE[EXPECTED[i][0]] for i in range(6)]
    assert first["pairwise"]["win_rate_ci95"] == again["pairwise"]["win_rate_ci95"] == _independent_ci(scores, 300, 7)
    assert other["pairwise"]["win_rate_ci95"] == _independent_ci(scores, 300, 8) != first["pairwise"]["win_rate_ci95"]
    lo, hi = first["pairwise"]["win_rate_ci95"]
    assert 0 <= lo <= first["pairwise"]["win_rate"] <= hi <= 1
    assert judge_stats.bootstrap_ci([], 10, 0) is None
    assert judge_stats.bootstrap_ci([3.0, 3.0], 50, 1) == [3.0, 3.0]


def test_malformed_replies_are_retried_then_recorded_as_unparseable(files, monkeypatch):
    """Row 1 gets a non-JSON body once, then a good verdict; row 2 never gets a chat completion."""
    monkeypatch.setenv(KEY_ENV, "k")
    a, b = files
    seen: Counter = Counter()
    lock = threading.Lock()

    def faulty(prompt: str):
        qid = int(_QID.search(prompt).group(1))
        with lock:
            seen[prompt] += 1
            n = seen[prompt]
        if qid == 2 or (qid == 1 and n == 1):
            return {"fault": "malformed"}
        return "VERDICT: TIE"

    with FakeLLM(reply_fn=faulty) as srv:
        summary = run_judge(make_cfg(srv.base_url, malformed_retries=1, max_rows=3), a, b)
    by_key = {r["key"]: r for r in read_jsonl(b.parent / JUDGE_RECORDS)[1:]}
    assert len(by_key) == 6
    assert [(by_key[f"1/pairwise/{o}"]["verdict"], by_key[f"1/pairwise/{o}"]["calls"]) for o in ("AB", "BA")] == \
        [("tie", 2), ("tie", 2)]
    for o in ("AB", "BA"):
        r = by_key[f"2/pairwise/{o}"]
        assert (r["verdict"], r["unparseable"], r["calls"], r["malformed"]) == ("unparseable", True, 2, 2)
        assert r["reason"].startswith("not a chat completion")
        assert r["prompt_tokens"] == 0 and r["finish_reason"] is None
    p = summary["pairwise"]
    assert (p["rows"], p["wins"], p["ties"], p["losses"], p["unparseable_rows"]) == (3, 0, 3, 0, 1)
    c = summary["counts"]
    assert (c["calls"], c["malformed"], c["unparseable"], c["retries"]) == (10, 6, 2, 4)
    assert summary["rows"] == 3 and summary["progress"] == {"done": 6, "total": 6}


def test_no_usable_verdict_gives_no_win_rate_or_interval(tmp_path, monkeypatch, capsys):
    """16 rows whose replies all lack a VERDICT / GRADE line: judge.json, metrics.json, the terminal and report.md
    say that no verdict was usable, not "win-rate 0.5 [0.5, 0.5]" (issue 22, 30)."""
    from domaintune.evaluation.report import run_report

    monkeypatch.setenv(KEY_ENV, "k")
    run = tmp_path / "run"
    run.mkdir()
    write_predictions(run / "predictions.base.jsonl", 16, "a")
    write_predictions(run / "predictions.jsonl", 16, "b")
    config = tmp_path / "judge.yaml"
    with FakeLLM(reply_fn=lambda prompt: "I cannot decide.") as srv:
        config.write_text(yaml.safe_dump({"judge": make_cfg(srv.base_url, mode="both", malformed_retries=0,
                                                            max_concurrency=4).model_dump(mode="json")}),
                          encoding="utf-8")
        assert cli.main(["judge", str(config), "--run", str(run)]) == 0
    out, err = capsys.readouterr()
    summary = json.loads((run / JUDGE_SUMMARY).read_text(encoding="utf-8"))
    p, g = summary["pairwise"], summary["grade"]
    assert (p["rows"], p["usable_rows"], p["ties"], p["unparseable_rows"]) == (16, 0, 16, 16)
    assert p["win_rate"] is None and p["win_rate_ci95"] is None
    assert p["problem"].startswith("no usable verdict: the judge's replies for all 16 row(s) were unparseable")
    assert g["diff"] == {"mean": None, "ci95": None, "n": 0} and g["problem"].startswith("no usable grade")
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))["judge"]
    assert metrics["pairwise"]["win_rate"] is None and metrics["pairwise"]["problem"] == p["problem"]
    assert "win-rate of B" not in out and not re.search(r"\[\d", out)  # no number, no interval
    assert f"pairwise: B wins 0, ties 16, losses 0; {p['problem']}" in out.splitlines()
    assert f"warning: judge pairwise: {p['problem']}" in err
    section = run_report(run).read_text(encoding="utf-8").split("### Judged comparison", 1)[1]
    assert f"| win-rate of the fine-tuned model | {p['problem']} |" in section
    assert "bootstrap interval" not in section and "50.0%" not in section


def test_grades_are_parsed_and_averaged(files, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "k")
    a, b = files
    with FakeLLM(reply_fn=reply, usage=False) as srv:
        summary = run_judge(make_cfg(srv.base_url, mode="grade", malformed_retries=0), a, b)
        prompts = [e["prompt"] for e in srv.log]
    g = summary["grade"]
    grades_a = [4 + i % 5 for i in range(6)]
    grades_b = [6 + i % 5 for i in range(5)]
    assert g["a"] == {"mean": round(sum(grades_a) / 6, 4), "ci95": _independent_ci(grades_a, 300, 7), "n": 6,
                      "unparseable": 0}
    assert g["b"] == {"mean": round(sum(grades_b) / 5, 4), "ci95": _independent_ci(grades_b, 300, 7), "n": 5,
                      "unparseable": 1}
    assert g["diff"] == {"mean": 2.0, "ci95": [2.0, 2.0], "n": 5}
    assert "pairwise" not in summary
    assert [(r["grade_a"], r["grade_b"]) for r in summary["per_row"]] == \
        [(grades_a[i], grades_b[i] if i < 5 else None) for i in range(6)]
    records = read_jsonl(b.parent / JUDGE_RECORDS)[1:]
    assert sorted(r["key"] for r in records) == sorted(f"{i}/grade/{s}" for i in range(6) for s in "ab")
    assert all(r["reason"] == "Reasonable." for r in records if not r["unparseable"])
    # No usage in the replies: the tokens are estimated from the text, and said so.
    c = summary["counts"]
    assert c["tokens_estimated"] == 12
    assert c["prompt_tokens"] == sum(approx_tokens(p) for p in prompts)
    assert any("<question>\nUser: question 0?\n\nAssistant:\n</question>\n\n<reference_answer>\nreference 0\n"
               "</reference_answer>" in p for p in prompts)  # the predictions' input and target
    assert all("Additional criteria: none" in p for p in prompts)


@pytest.mark.parametrize("text, verdict", [
    ("A is better.\nVERDICT: A", "A"), ("**Verdict**: b", "B"), ("Final verdict: TIE.", "tie"),
    ("最终VERDICT：A", "A"), ("Format: VERDICT: A|B|TIE\nThinking...\nVERDICT: B", "B"),
    ("VERDICT: A\nOn reflection:\nVERDICT: B", "B"), ("VERDICT: A is better", None), ("A", None), ("", None)])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text)[0] == verdict


@pytest.mark.parametrize("text, grade", [
    ("GRADE: 7", 7), ("ok\n**Grade:** 8/10", 8), ("GRADE: 7.5", 7.5), ("GRADE: 10", 10), ("GRADE: 1", 1),
    ("GRADE: 0", None), ("GRADE: 11", None), ("grade: seven", None), ("GRADE: 3\nGRADE: 12", None)])
def test_parse_grade(text, grade):
    assert parse_grade(text)[0] == grade


@pytest.mark.parametrize("changes, side, message", [
    ({"2": {"target": "another reference"}}, "b", r"row id 2: the reference answers differ"),
    ({"3": {"input": "User: another question?"}}, "a", r"row id 3: the questions differ"),
    ({"4": {"id": 9}}, "b", r"row id 9: it is in B but not in A"),
])
def test_mismatched_predictions_files_name_the_row(tmp_path, changes, side, message):
    a = write_predictions(tmp_path / "a.jsonl", 6, "a", **(changes if side == "a" else {}))
    b = write_predictions(tmp_path / "b.jsonl", 6, "b", **(changes if side == "b" else {}))
    with pytest.raises(UserError, match=message) as e:
        run_judge(make_cfg("http://127.0.0.1:9/v1"), a, b)
    assert "same test file" in str(e.value)
    short = write_predictions(tmp_path / "short.jsonl", 5, "a")
    with pytest.raises(UserError, match=r"row id 5: it is in B but not in A"):
        run_judge(make_cfg("http://127.0.0.1:9/v1"), short, write_predictions(tmp_path / "b6.jsonl", 6, "b"))
    assert not (tmp_path / JUDGE_RECORDS).exists()


def test_a_changed_input_or_mode_is_refused(files, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "k")
    a, b = files
    with FakeLLM(reply_fn=reply) as srv:
        run_judge(make_cfg(srv.base_url, max_rows=2), a, b)
        before = (b.parent / JUDGE_RECORDS).read_bytes()
        with pytest.raises(UserError, match=r"mode 'pairwise' -> 'both'.*--out DIR.*delete"):
            run_judge(make_cfg(srv.base_url, mode="both", max_rows=2), a, b)
        write_predictions(b, 6, "b", **{"0": {"predict": "a new answer"}})
        with pytest.raises(UserError, match=r"B .*predictions.jsonl -> .*: not the same content"):
            run_judge(make_cfg(srv.base_url, max_rows=2), a, b)
        assert (b.parent / JUDGE_RECORDS).read_bytes() == before
        # Elsewhere it runs.
        assert run_judge(make_cfg(srv.base_url, max_rows=2), a, b, out=b.parent / "judge2")["status"] == "complete"


# A changed value for every judge key that can change a verdict (issue 22, 25). The test below checks that this
# table covers every key not in NOT_VERDICT_KEYS, so a key added to JudgeConfig is fingerprinted by default and
# must get a row here.
VERDICT_CHANGES = {"base_url": None, "model": "another-judge", "temperature": 0.7, "max_tokens": 200,
                   "malformed_retries": 5, "language": "zh", "mode": "pairwise", "rubric": "Be strict.",
                   "pairwise_template": "pairwise.txt", "grade_template": "grade.txt"}


def test_every_verdict_setting_changed_on_a_rerun_is_refused_naming_its_key(files, monkeypatch, tmp_path):
    from domaintune.evaluation.judge_header import NOT_VERDICT_KEYS
    from domaintune.evaluation.judge_prompts import builtin_template

    monkeypatch.setenv(KEY_ENV, "k")
    assert set(VERDICT_CHANGES) | set(NOT_VERDICT_KEYS) == set(JudgeConfig.model_fields)
    assert not set(VERDICT_CHANGES) & set(NOT_VERDICT_KEYS)
    (tmp_path / "pairwise.txt").write_text(builtin_template("pairwise", "en") + "\nBe brief.", encoding="utf-8")
    (tmp_path / "grade.txt").write_text(builtin_template("grade", "en") + "\nBe brief.", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    a, b = files
    records = b.parent / JUDGE_RECORDS
    with FakeLLM(reply_fn=reply) as srv:
        first = dict(mode="both", max_rows=1)
        run_judge(make_cfg(srv.base_url, **first), a, b)
        before = records.read_bytes()
        for key, value in VERDICT_CHANGES.items():
            kw = {**first, key: value}
            url = srv.base_url.replace("127.0.0.1", "localhost") if kw.pop("base_url", 0) is None else srv.base_url
            with pytest.raises(UserError, match=rf"holds verdicts for other inputs or settings \([^)]*judge\.{key}\b"):
                run_judge(make_cfg(url, **kw), a, b)
            assert records.read_bytes() == before, key
        # A file with a header and no verdict yet (the first calls failed) holds nothing to mix: a changed
        # setting starts afresh.
        elsewhere = b.parent / "fresh"
        elsewhere.mkdir()
        (elsewhere / JUDGE_RECORDS).write_bytes(before.splitlines(keepends=True)[0])
        run_judge(make_cfg(srv.base_url, **{**first, "max_tokens": 200}), a, b, out=elsewhere)
        assert json.loads((elsewhere / JUDGE_RECORDS).read_bytes().splitlines()[0])["settings"]["max_tokens"] == 200
        # The keys that cannot change a verdict may change: the same records are kept and more rows are added.
        calm = dict(max_concurrency=1, request_timeout=9.0, max_retries=0, retry_base_delay=0.5,
                    bootstrap_samples=50, seed=3, api_key_env=KEY_ENV + "_OTHER", max_rows=2)
        assert set(calm) == set(NOT_VERDICT_KEYS)
        summary = run_judge(make_cfg(srv.base_url, **{**first, **calm}), a, b)
    assert summary["status"] == "complete" and summary["rows"] == 2
    assert records.read_bytes().startswith(before)
    header = json.loads(before.splitlines()[0])
    assert header["settings"]["max_tokens"] == 512 and "max_concurrency" not in header["settings"]


def test_a_header_without_settings_is_refused_and_a_missing_key_counts_at_its_default(files, monkeypatch):
    """judge.jsonl written before the settings were recorded (mode, model and temperature at the top level) cannot
    be checked: refused. A key missing from recorded settings (added to JudgeConfig later) counts at its default."""
    monkeypatch.setenv(KEY_ENV, "k")
    a, b = files
    records = b.parent / JUDGE_RECORDS
    with FakeLLM(reply_fn=reply) as srv:
        run_judge(make_cfg(srv.base_url, max_rows=1), a, b)
        lines = records.read_text(encoding="utf-8").splitlines()
        head = json.loads(lines[0])

        def rewrite(header: dict) -> None:
            records.write_text("\n".join([json.dumps(header)] + lines[1:]) + "\n", encoding="utf-8")

        settings = head["settings"]
        del settings["max_tokens"]
        rewrite(head)
        with pytest.raises(UserError, match=r"judge\.max_tokens 512 -> 200"):
            run_judge(make_cfg(srv.base_url, max_rows=1, max_tokens=200), a, b)
        assert run_judge(make_cfg(srv.base_url, max_rows=2), a, b)["rows"] == 2
        lines = records.read_text(encoding="utf-8").splitlines()
        head = {k: v for k, v in head.items() if k != "settings"}
        rewrite({**head, **{k: settings[k] for k in ("mode", "model", "temperature")}})
        with pytest.raises(UserError, match=r"earlier domaintune that did not record every judge setting.*--out DIR"):
            run_judge(make_cfg(srv.base_url, max_rows=2), a, b)


def test_questions_come_from_the_test_file(tmp_path, monkeypatch):
    """With --data the judge sees the test file's question, not the prompt markup of the predictions."""
    monkeypatch.setenv(KEY_ENV, "k")
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"instruction": f"question {i}?", "input": "context" if i == 1 else "",
                                        "output": f"reference {i}"}) + "\n" for i in range(3)), encoding="utf-8")
    a = write_predictions(tmp_path / "a.jsonl", 3, "a")
    b = write_predictions(tmp_path / "b.jsonl", 3, "b", **{"1": {"input": "<|im_start|>user question 1?"}})
    with FakeLLM(reply_fn=reply) as srv:
        summary = run_judge(make_cfg(srv.base_url), a, b, out=tmp_path / "j", data=test)
        prompts = {e["prompt"] for e in srv.log}
    assert summary["questions_from"] == str(test)
    assert all("<question>\nquestion " in p and "Assistant:" not in p for p in prompts)
    assert any("<question>\nquestion 1?\ncontext\n</question>" in p for p in prompts)


def test_endpoint_errors_name_the_judge_section(files, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "k")
    a, b = files
    with FakeLLM(script=["400"], reply_fn=reply) as srv:
        with pytest.raises(UserError, match=r"400 Bad Request .* check judge\.model"):
            run_judge(make_cfg(srv.base_url, max_concurrency=1), a, b)
        summary = json.loads((b.parent / JUDGE_SUMMARY).read_text(encoding="utf-8"))
        assert summary["status"] == "failed" and "400" in summary["error"]
        assert "judge" not in (json.loads((b.parent / "metrics.json").read_text()) if
                               (b.parent / "metrics.json").exists() else {})
        # The same command again resumes and completes.
        assert run_judge(make_cfg(srv.base_url), a, b)["pairwise"]["wins"] == 2


def count_records(path: Path) -> int:
    return path.read_bytes().count(b"\n") - 1 if path.exists() else 0


def test_kill_and_rerun_judges_every_call_once(tmp_path):
    """SIGKILL a `domaintune judge` subprocess mid-way, run the same command again: every call recorded once,
    and the numbers equal those of an uninterrupted run."""
    n = 10
    run = tmp_path / "run"
    run.mkdir()
    write_predictions(run / "predictions.base.jsonl", n, "a")
    write_predictions(run / "predictions.jsonl", n, "b")

    def plan_reply(prompt: str) -> str:  # questions 6.. repeat the plan of 0..5 shifted
        qid = int(_QID.search(prompt).group(1))
        return reply(prompt.replace(f"question {qid}?", f"question {qid % 6}?"))

    env = dict(os.environ, **{KEY_ENV: "k", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"})
    with FakeLLM(reply_fn=plan_reply, delay=0.15) as srv:
        cfg = {"judge": make_cfg(srv.base_url, mode="both", max_concurrency=2).model_dump(mode="json")}
        config = tmp_path / "judge.yaml"
        config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        command = [sys.executable, "-m", "domaintune", "judge", str(config), "--run", str(run)]
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        records = run / JUDGE_RECORDS
        deadline = time.monotonic() + 60
        while count_records(records) < 8 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        time.sleep(0.2)  # a request sent just before the kill reaches the server's log
        before = records.read_bytes()
        kept = before[: before.rfind(b"\n") + 1]
        done_before = len(kept.splitlines()) - 1
        assert 8 <= done_before < 4 * n
        asked = len(srv.log)
        r = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        rerun_calls = len(srv.log) - asked
    with FakeLLM(reply_fn=plan_reply) as srv:  # the same judge without the delay
        clean = run_judge(make_cfg(srv.base_url, mode="both"), run / "predictions.base.jsonl",
                          run / "predictions.jsonl", out=tmp_path / "clean")

    assert records.read_bytes().startswith(kept)  # nothing written before the kill was lost
    body = read_jsonl(records)[1:]
    keys = [rec["key"] for rec in body]
    expected = {f"{i}/pairwise/{o}" for i in range(n) for o in ("AB", "BA")} | \
        {f"{i}/grade/{s}" for i in range(n) for s in "ab"}
    assert len(keys) == len(set(keys)) == 4 * n and set(keys) == expected
    # The rerun asked only what was missing (plus the malformed retries of question 5's calls among them).
    missing = expected - {rec["key"] for rec in read_jsonl_bytes(kept)[1:]}
    assert rerun_calls == sum(3 if k.startswith(("5/pairwise", "5/grade/b")) else 1 for k in missing)
    summary = json.loads((run / JUDGE_SUMMARY).read_text(encoding="utf-8"))
    for block in ("pairwise", "grade", "per_row"):
        assert summary[block] == clean[block]
    assert summary["counts"]["records"] == clean["counts"]["records"] == 4 * n
    assert summary["counts"]["calls"] == clean["counts"]["calls"]
    assert (summary["pairwise"]["wins"], summary["pairwise"]["ties"], summary["pairwise"]["losses"]) == (3, 5, 2)
    assert r.stdout.splitlines()[1].startswith("pairwise: B wins 3, ties 5, losses 2; win-rate of B 0.55 [")
    assert f"wrote {run / JUDGE_SUMMARY}" in r.stderr


def read_jsonl_bytes(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def test_cli_modes_are_the_config_modes():
    import typing

    from domaintune.cli import judge as cli_judge

    assert typing.get_args(JudgeConfig.model_fields["mode"].annotation) == cli_judge.MODES


def test_cli_needs_both_files(tmp_path, capsys):
    config = tmp_path / "judge.yaml"
    config.write_text("judge:\n  language: en\n", encoding="utf-8")
    assert cli.main(["judge", str(config), "--a", str(tmp_path / "a.jsonl")]) == 2
    assert "give the two predictions files, --a A.jsonl --b B.jsonl, or --run RUN" in capsys.readouterr().err
    assert cli.main(["judge", str(config), "--run", str(tmp_path), "judge.mode=pairwize"]) == 2
    assert "judge.mode" in capsys.readouterr().err


@pytest.mark.parametrize("language", ["zh", "en"])
def test_builtin_prompts_carry_every_value_and_the_reply_format(language):
    from domaintune.evaluation.judge_prompts import Prompts

    prompts = Prompts(JudgeConfig(language=language, rubric="Be kind."), ("pairwise", "grade"))
    pair = prompts.pairwise("Q-text", "R-text", "first-answer", "")
    assert all(x in pair for x in ("Q-text", "R-text", "first-answer", "Be kind.", "VERDICT: A", "VERDICT: TIE"))
    assert ("（空回答）" if language == "zh" else "(empty answer)") in pair
    assert pair.index("first-answer") < pair.index("（空回答）" if language == "zh" else "(empty answer)")
    grade = prompts.grade("Q-text", "", "the-answer")
    assert all(x in grade for x in ("Q-text", "the-answer", "Be kind.", "GRADE: N"))
    assert ("（未提供参考答案）" if language == "zh" else "(no reference answer given)") in grade
    assert "{" not in pair + grade


def test_rubric_and_templates_from_files(tmp_path, monkeypatch):
    from domaintune.evaluation.judge_prompts import Prompts

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rubric.md").write_text("Cite the law.\n", encoding="utf-8")
    (tmp_path / "pair.txt").write_text("Q {question} A {answer_a} B {answer_b} {rubric} {other}", encoding="utf-8")
    prompts = Prompts(JudgeConfig(rubric="rubric.md", pairwise_template="pair.txt"), ("pairwise",))
    assert prompts.pairwise("q", "r", "x", "y") == "Q q A x B y Cite the law. {other}"
    with pytest.raises(UserError, match=r"judge.rubric 'missing.txt' looks like a file name"):
        Prompts(JudgeConfig(rubric="missing.txt"), ("pairwise",))
    (tmp_path / "bad.txt").write_text("GRADE {question}", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.txt: the grade template has no \{answer\} placeholder"):
        Prompts(JudgeConfig(grade_template="bad.txt"), ("grade",))


def test_report_shows_the_judged_win_rate_and_grades(files, monkeypatch):
    """report.md's "Base vs fine-tuned" section, from the files `judge` wrote (mode both)."""
    from domaintune.evaluation.report import run_report

    monkeypatch.setenv(KEY_ENV, "secret")
    a, b = files
    with FakeLLM(reply_fn=reply) as srv:
        summary = run_judge(make_cfg(srv.base_url, mode="both"), a, b)
    text = run_report(b.parent).read_text(encoding="utf-8")
    section = text.split("## Base vs fine-tuned", 1)[1].split("\n## ", 1)[0]
    p, g = summary["pairwise"], summary["grade"]
    lo, hi = p["win_rate_ci95"]
    assert "| fine-tuned wins / ties / losses | 2 / 3 / 1 |" in section
    assert f"| win-rate of the fine-tuned model (wins + ties/2) | {100 * p['win_rate']:.1f}% |" in section
    assert f"| 95% bootstrap interval | [{100 * lo:.1f}%, {100 * hi:.1f}%] |" in section
    assert "| ties: judge said tie / orders disagreed / unparseable | 1 / 1 / 1 |" in section
    assert f"| base | {g['a']['mean']:.2f} |" in section and f"| fine-tuned | {g['b']['mean']:.2f} |" in section
    assert f"| difference (fine-tuned - base) | {g['diff']['mean']:.2f} |" in section
    assert "no benchmark yet: `domaintune eval --benchmark zh_general_mc --run" in section
    metrics_table = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    assert "| judge |" not in metrics_table  # the nested result is not dumped into the metrics table


def test_a_missing_base_predictions_file_says_to_predict_with_base_only(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    config = tmp_path / "judge.yaml"
    config.write_text(yaml.safe_dump({"judge": {"model": "m"}}), encoding="utf-8")
    assert cli.main(["judge", str(config), "--run", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    run = tmp_path / "run"
    assert (f"predictions.base.jsonl' not found: run `domaintune predict {run} --data test.jsonl --base-only` "
            "first") in err


def test_the_missing_base_predictions_hint_repeats_the_test_file_and_settings_of_the_tuned_ones(tmp_path, capsys):
    """After the quickstart (predictions.jsonl made with --max-new-tokens 64), the judge names the predict command
    that makes base predictions alike: same test file, same settings (issue 22, 28)."""
    from dataclasses import asdict

    from domaintune.inference.params import PRESETS

    run = tmp_path / "run"
    run.mkdir()
    write_predictions(run / "predictions.jsonl", 3, "b")
    generation = {**asdict(PRESETS["predict"]), "max_new_tokens": 64, "repetition_penalty": 1.1}
    meta = {"data": {"path": "/data/test.jsonl", "sha256": "0" * 64}, "generation": generation, "base_only": False}
    (run / "predictions.jsonl.meta.json").write_text(json.dumps(meta), encoding="utf-8")
    config = tmp_path / "judge.yaml"
    config.write_text(yaml.safe_dump({"judge": {"model": "m"}}), encoding="utf-8")
    assert cli.main(["judge", str(config), "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert (f"run `domaintune predict {run} --data /data/test.jsonl --base-only --max-new-tokens 64 "
            "--repetition-penalty 1.1` first (the test file and settings of") in err
