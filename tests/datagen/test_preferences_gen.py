"""gen-data --preferences against the scripted server and the SFT run: pairs, near-identical drops, resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from domaintune.cli import main
from domaintune.config.selfinstruct import SelfInstructConfig
from domaintune.data.preferences import load_preferences
from domaintune.data.templates import get_template
from domaintune.datagen.preferences import RECORDS, run_preferences
from domaintune.errors import UserError
from domaintune.inference.engine import Engine
from domaintune.inference.params import GenerationParams
from domaintune.inference.predict import GreedyAnswerer
from fake_llm_server import FakeLLM

KEY_ENV = "DT_PREF_TEST_KEY"
QUESTIONS = [f"How do I help my child with topic {w}?" for w in
             ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "k")
    (tmp_path / "a.txt").write_text("ANSWER: {question}", encoding="utf-8")
    (tmp_path / "w.txt").write_text("WEAK: {question}", encoding="utf-8")
    return tmp_path


def make_cfg(tmp: Path, base_url: str, **kw) -> SelfInstructConfig:
    return SelfInstructConfig(**{**dict(
        domain="parenting", language="en", answer_template=str(tmp / "a.txt"), weak_answer_template=str(tmp / "w.txt"),
        base_url=base_url, model="fake-model", api_key_env=KEY_ENV, max_concurrency=2, request_timeout=5.0,
        max_retries=2, malformed_retries=2, retry_base_delay=0.01, output_dir=str(tmp / "out")), **kw})


def weak_reply(prompt: str) -> str | None:
    if not prompt.startswith("WEAK: "):
        return None
    q = prompt.removeprefix("WEAK: ")
    if "charlie" in q:  # the weak answer happens to be the chosen one: a pair that teaches nothing
        return f"Answer to: {q}"
    return "It depends, every family is different."


def test_teacher_pairs_with_weak_rejected_answers(setup):
    qfile = setup / "q.jsonl"
    # Rows 0-1 bring their own answer (the chosen side as given); the others are answered by the teacher.
    qfile.write_text("".join(json.dumps({"instruction": q, "output": f"Given answer for {q}" if i < 2 else None}
                                        if i < 2 else {"question": q}) + "\n" for i, q in enumerate(QUESTIONS[:5])),
                     encoding="utf-8")
    with FakeLLM(reply_fn=weak_reply) as srv:
        path = run_preferences(make_cfg(setup, srv.base_url), questions=qfile)
        prompts = [e["prompt"] for e in srv.log]
    rows = read_jsonl(path)
    assert [r["instruction"] for r in rows] == [q for q in QUESTIONS[:5] if "charlie" not in q]
    assert rows[0]["chosen"] == f"Given answer for {QUESTIONS[0]}"
    assert rows[2]["chosen"] == f"Answer to: {QUESTIONS[3]}"
    assert {r["rejected"] for r in rows} == {"It depends, every family is different."}
    # The teacher answered exactly the rows without an answer, and gave a weak answer for every row.
    assert sorted(p for p in prompts if p.startswith("ANSWER")) == sorted(f"ANSWER: {q}" for q in QUESTIONS[2:5])
    assert len([p for p in prompts if p.startswith("WEAK")]) == 5
    records = read_jsonl(path.parent / RECORDS)
    dropped = [r for r in records if not r["kept"]]
    assert [(r["question"], r["reason"], r["similarity"]) for r in dropped] == [(QUESTIONS[2], "near_identical", 1.0)]
    m = json.loads((path.parent / "manifest.json").read_text(encoding="utf-8"))["preferences"]
    assert (m["status"], m["kept"], m["dropped"], m["rejected_from"]) == ("complete", 4, {"near_identical": 1},
                                                                          "teacher:weak_answer")
    assert len(load_preferences(path, "dpo", get_template("chatml"))) == 4  # the file trains as it is


def test_rejected_from_the_sft_run_through_the_predict_engine(setup, tiny_run):
    """rejected = the SFT run's own greedy answer (the Engine predict uses, the run's prompt); a row whose given
    answer equals that answer is dropped as near-identical."""
    engine = Engine.from_run(tiny_run, device="cpu")
    params = GenerationParams(max_new_tokens=12)
    own = [g.text.strip() for g in engine.generate(
        [engine.encode_messages([{"role": "user", "content": q}]) for q in QUESTIONS[:4]], params, batch_size=8)]
    qfile = setup / "q.jsonl"
    answers = ["A warm, specific answer.", own[1], "Another careful answer.", "Yet another answer."]
    qfile.write_text("".join(json.dumps({"instruction": q, "input": "", "output": a}) + "\n"
                             for q, a in zip(QUESTIONS[:4], answers, strict=True)), encoding="utf-8")
    with FakeLLM() as srv:
        path = run_preferences(make_cfg(setup, srv.base_url), questions=qfile,
                               answerer=GreedyAnswerer(tiny_run, max_new_tokens=12))
        assert srv.log == []  # every chosen answer was given, every rejected one came from the run
    rows = read_jsonl(path)
    assert [(r["instruction"], r["chosen"], r["rejected"]) for r in rows] == \
        [(QUESTIONS[i], answers[i], own[i]) for i in (0, 2, 3)]
    records = read_jsonl(path.parent / RECORDS)
    assert len({r["rejected_by"] for r in records}) == 1
    assert records[0]["rejected_by"].startswith(f"run:{tiny_run.resolve()} (weights ")
    assert [r["reason"] for r in records if not r["kept"]] == ["near_identical"]


def test_bad_question_rows_and_a_changed_file_are_refused(setup):
    qfile = setup / "q.jsonl"
    qfile.write_text('{"instruction": "ok?"}\n{"output": "no question"}\n{"question": ""}\n{"question": \n',
                     encoding="utf-8")
    with pytest.raises(UserError) as e:
        run_preferences(make_cfg(setup, "http://127.0.0.1:9/v1"), questions=qfile)
    # Every bad line at once, the broken JSON of line 4 with the others (issue 22, 31).
    assert [line.split(":")[0] for line in str(e.value).split("\n  ")[1:]] == [
        f"{qfile} line {n}" for n in (2, 3, 4)]
    with pytest.raises(UserError, match="not found"):
        run_preferences(make_cfg(setup, "http://127.0.0.1:9/v1"))  # no train.jsonl made yet
    qfile.write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS[:2]), encoding="utf-8")
    with FakeLLM(reply_fn=weak_reply) as srv:
        run_preferences(make_cfg(setup, srv.base_url), questions=qfile)
    qfile.write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS[3:5]), encoding="utf-8")
    with pytest.raises(UserError, match="the questions file changed"):
        run_preferences(make_cfg(setup, "http://127.0.0.1:9/v1"), questions=qfile)


def test_sigkill_then_rerun_makes_every_pair_once(setup):
    qfile = setup / "q.jsonl"
    qfile.write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS), encoding="utf-8")
    with FakeLLM(reply_fn=weak_reply, delay=0.15) as srv:
        cfg = make_cfg(setup, srv.base_url, max_concurrency=1)
        config = setup / "gen.yaml"
        config.write_text(yaml.safe_dump({"selfinstruct": cfg.model_dump(mode="json")}), encoding="utf-8")
        cmd = [sys.executable, "-m", "domaintune", "gen-data", str(config), "--preferences", "--questions", str(qfile)]
        proc = subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        records = setup / "out" / RECORDS
        deadline = time.monotonic() + 60
        while (not records.exists() or records.read_text().count("\n") < 2) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        before = records.read_bytes()
        n_before = before.count(b"\n")
        assert 2 <= n_before < len(QUESTIONS) and not (setup / "out" / "preferences.jsonl").exists()
        assert main(["gen-data", str(config), "--preferences", "--questions", str(qfile)]) == 0
    after = read_jsonl(records)
    assert records.read_bytes().startswith(before[: before.rfind(b"\n") + 1])  # nothing written before was lost
    assert sorted(r["index"] for r in after) == list(range(len(QUESTIONS)))  # each question once
    rows = read_jsonl(setup / "out" / "preferences.jsonl")
    assert [r["instruction"] for r in rows] == [q for q in QUESTIONS if "charlie" not in q]
    assert all(r["chosen"] == f"Answer to: {r['instruction']}" for r in rows)


def test_cli_flags_of_preferences(setup, tiny_run, capsys):
    config = setup / "gen.yaml"
    config.write_text(yaml.safe_dump({"selfinstruct": make_cfg(setup, "http://127.0.0.1:9/v1").model_dump(
        mode="json")}), encoding="utf-8")
    assert main(["gen-data", str(config), "--run", str(tiny_run)]) == 2
    assert "--questions and --run belong to --preferences" in capsys.readouterr().err
    qfile = setup / "q.jsonl"
    qfile.write_text(json.dumps({"instruction": QUESTIONS[0], "output": "A careful, specific answer."}) + "\n",
                     encoding="utf-8")
    assert main(["gen-data", str(config), "--preferences", "--run", str(setup / "nope"), "--questions",
                 str(qfile)]) == 2
    assert "is not a directory: give the SFT run" in capsys.readouterr().err
    assert main(["gen-data", str(config), "--preferences", "--questions", str(qfile), "--run", str(tiny_run),
                 "--max-new-tokens", "4"]) == 0
    assert "wrote 1 preference pair to " in capsys.readouterr().out


def test_an_input_field_is_joined_as_the_run_was_trained(setup, tiny_run):
    """A row with "input": the run answers the prompt its template builds from instruction + input (as in SFT),
    and preferences.jsonl keeps the two fields apart, so DPO prompts are the SFT prompts too."""
    from domaintune.data.templates import Template

    qfile = setup / "q.jsonl"
    qfile.write_text(json.dumps({"instruction": "Summarise this note:", "input": "Bedtime is at eight.",
                                 "output": "A careful, specific answer."}) + "\n", encoding="utf-8")
    answerer = GreedyAnswerer(tiny_run, max_new_tokens=6)
    tpl = Template.load(tiny_run / "template.json")
    seen = []
    engine_generate = answerer.engine.generate
    answerer.engine.generate = lambda prompts, *a: seen.extend(prompts) or engine_generate(prompts, *a)
    with FakeLLM() as srv:
        path = run_preferences(make_cfg(setup, srv.base_url), questions=qfile, answerer=answerer)
    joined = tpl.join_instruction("Summarise this note:", "Bedtime is at eight.")
    assert seen == [answerer.engine.encode_messages([{"role": "user", "content": joined}])]
    row = read_jsonl(path)[0]
    assert (row["instruction"], row["input"]) == ("Summarise this note:", "Bedtime is at eight.")


def test_a_failing_teacher_is_recorded_and_the_rerun_resumes(setup):
    qfile = setup / "q.jsonl"
    qfile.write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS[:4]), encoding="utf-8")
    calls = []

    def fail_late(prompt):
        calls.append(prompt)
        return {"fault": "401"} if len(calls) > 4 else weak_reply(prompt)

    with FakeLLM(reply_fn=fail_late) as srv:
        with pytest.raises(UserError, match="401"):
            run_preferences(make_cfg(setup, srv.base_url, max_concurrency=1), questions=qfile)
    out = setup / "out"
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["preferences"]
    assert m["status"] == "failed" and "401" in m["error"] and m["spent"]["calls"] >= 5
    assert not (out / "preferences.jsonl").exists()
    with FakeLLM(reply_fn=weak_reply) as srv:
        path = run_preferences(make_cfg(setup, srv.base_url), questions=qfile)
    assert sorted(r["index"] for r in read_jsonl(out / RECORDS)) == [0, 1, 2, 3]
    assert len(read_jsonl(path)) == 3  # charlie's pair is near-identical
    # A later self-instruct run keeps the preferences section of manifest.json (and the reverse).
    from domaintune.datagen.store import OutputStore

    OutputStore(out).write_manifest({"status": "complete"})
    assert json.loads((out / "manifest.json").read_text(encoding="utf-8"))["preferences"]["status"] == "complete"


def test_cli_run_with_unanswered_questions_asks_the_teacher(setup, tiny_run, capsys):
    """Regression (issue 22, 21): the README's `gen-data --preferences --run RUN --questions FILE` with rows that
    have no answer crashed with AttributeError ('NoneType' object has no attribute 'complete'): the check for a
    missing answer read the "input" field, so no teacher client was opened, and the manifest stayed "running".
    End to end through the CLI: the teacher answers every row (chosen), the run answers every row (rejected)."""
    qfile = setup / "q.jsonl"
    qfile.write_text("".join(json.dumps(row) + "\n" for row in [
        {"question": QUESTIONS[0]}, {"instruction": QUESTIONS[1], "input": ""}, {"instruction": QUESTIONS[2]}]),
        encoding="utf-8")
    config = setup / "gen.yaml"
    with FakeLLM() as srv:
        config.write_text(yaml.safe_dump({"selfinstruct": make_cfg(setup, srv.base_url).model_dump(mode="json")}),
                          encoding="utf-8")
        rc = main(["gen-data", str(config), "--preferences", "--run", str(tiny_run), "--questions", str(qfile),
                   "--max-new-tokens", "12"])
        prompts = sorted(e["prompt"] for e in srv.log)
    assert rc == 0, capsys.readouterr().err
    assert prompts == sorted(f"ANSWER: {q}" for q in QUESTIONS[:3])  # chosen from the teacher, no weak prompt
    own = GreedyAnswerer(tiny_run, max_new_tokens=12)([(q, "") for q in QUESTIONS[:3]])
    records = read_jsonl(setup / "out" / RECORDS)
    assert [(r["chosen"], r["rejected"]) for r in records] == [(f"Answer to: {q}", a.strip())
                                                              for q, a in zip(QUESTIONS[:3], own, strict=True)]
    m = json.loads((setup / "out" / "manifest.json").read_text(encoding="utf-8"))["preferences"]
    assert (m["status"], m["done"], m["spent"]["calls"]) == ("complete", 3, 3)
    assert f"wrote {m['kept']} preference pair" in capsys.readouterr().out


def test_a_missing_questions_file_is_reported_before_the_model_loads(setup, tiny_run, capsys, monkeypatch):
    """Regression (issue 22, 31): --run loaded the model first, and only then said the questions file was missing."""
    from domaintune.inference import engine

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(engine.Engine, "from_run", no_load)
    config = setup / "gen.yaml"
    config.write_text(yaml.safe_dump({"selfinstruct": make_cfg(setup, "http://127.0.0.1:9/v1").model_dump(
        mode="json")}), encoding="utf-8")
    assert main(["gen-data", str(config), "--preferences", "--run", str(tiny_run), "--questions",
                 str(setup / "missing.jsonl")]) == 2
    assert f"--questions '{setup / 'missing.jsonl'}' not found" in capsys.readouterr().err


def test_ctrl_c_and_a_crash_leave_the_manifest_saying_so(setup):
    """Regression (issue 22, 21 and 29): an exception that was not a UserError (the AttributeError of defect 21,
    or Ctrl-C) left manifest.json at "running"."""
    qfile = setup / "q.jsonl"
    qfile.write_text("".join(json.dumps({"instruction": q, "output": f"Given answer for {q}"}) + "\n"
                             for q in QUESTIONS[:4]), encoding="utf-8")

    class Answerer:
        name = "scripted"

        def __init__(self, fail: BaseException):
            self.calls, self.fail = 0, fail

        def __call__(self, questions):
            self.calls += 1
            if self.calls == 2:
                raise self.fail
            return ["It depends." for _ in questions]

    cfg = make_cfg(setup, "http://127.0.0.1:9/v1")
    manifest = setup / "out" / "manifest.json"
    with pytest.raises(KeyboardInterrupt):
        run_preferences(cfg, questions=qfile, answerer=Answerer(KeyboardInterrupt()), batch_size=2)
    m = json.loads(manifest.read_text(encoding="utf-8"))["preferences"]
    assert (m["status"], m["done"]) == ("interrupted", 2)
    assert m["error"] == (f"interrupted with 2 of 4 questions done (kept in {setup / 'out' / RECORDS}); run the same "
                          "command again to continue")
    with pytest.raises(RuntimeError):
        run_preferences(cfg, questions=qfile, answerer=Answerer(RuntimeError("boom")), batch_size=1)
    m = json.loads(manifest.read_text(encoding="utf-8"))["preferences"]
    assert (m["status"], m["error"], m["done"]) == ("failed", "RuntimeError: boom", 3)
