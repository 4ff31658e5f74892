"""gen-data from documents (datagen/grounded.py) against the scripted server: sources, the faithfulness judge,
decontamination, citations, preview, resume after SIGKILL, and files that give no text.

Every paragraph of the fixture documents holds a marker word (zqmark...); the scripted server writes questions
that name the first marker of the passage it was shown, so a row's source can be checked against where that
marker really is (file, page, heading)."""
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

from domaintune.cli import main
from domaintune.config.selfinstruct import SelfInstructConfig
from domaintune.datagen.grounded import parse_verdict
from domaintune.datagen.selfinstruct import run_gen_data
from domaintune.errors import UserError
from fake_llm_server import FakeLLM

KEY_ENV = "DT_GROUNDED_TEST_KEY"
MARK = re.compile(r"zqmark[a-z]+")
LEAKED = "How should parents handle a toddler who refuses to sleep at night?"
# marker -> (file, page, heading) where the fixtures put it
WHERE = {
    "zqmarkone": ("guide.md", None, "Sleep"),
    "zqmarktwo": ("guide.md", None, "Sleep > Naps"),
    "zqmarkthree": ("guide.md", None, "Screens"),
    "zqmarkfour": ("manual.pdf", 1, None),
    "zqmarkfive": ("manual.pdf", 2, None),
    "zqmarksix": ("家庭.txt", None, None),
}
GUIDE = """---
title: family guide
---
# Sleep

Toddlers need a calm bedtime routine zqmarkone with a bath, a story and lights out at the same time each night,
so that falling asleep becomes easy and the whole family rests better.

## Naps

A short afternoon nap zqmarktwo of about one hour helps young children stay cheerful and focused, without
spoiling their night sleep or making bedtime a fight.

# Screens

Keep screens out of the bedroom zqmarkthree and stop all devices an hour before bed, so that the brain can
slow down and children fall asleep more quickly.
"""
PAGES = ["Praise the effort your child makes zqmarkfour rather than the result, and name the exact thing they "
         "did well, so that they learn that trying hard is what counts.",
         "Read together every evening zqmarkfive for twenty minutes, let the child choose the book, and talk "
         "about the pictures and the story to build their vocabulary."]
TXT = "孩子发脾气的时候，家长先保持冷静 zqmarksix ，等孩子平静下来以后再和他讲道理，并且说出他的感受。\n"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def make_pdf(path: Path, pages: list[str | None]) -> None:
    """A PDF with one paragraph per page (None: a page with a drawn rectangle and no text)."""
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    c = canvas.Canvas(str(path), pagesize=A4)
    for text in pages:
        if text is None:
            c.rect(100, 400, 300, 200, fill=1)
        else:
            t = c.beginText(60, 760)
            t.setFont("Helvetica", 11)
            words, line = text.split(), ""
            for w in words:
                if len(line) + len(w) > 80:
                    t.textLine(line)
                    line = ""
                line = f"{line} {w}".strip()
            t.textLine(line)
            c.drawText(t)
        c.showPage()
    c.save()


@pytest.fixture
def docs(tmp_path):
    pytest.importorskip("reportlab")
    d = tmp_path / "docs"
    d.mkdir()
    (d / "guide.md").write_text(GUIDE, encoding="utf-8")
    make_pdf(d / "manual.pdf", PAGES)
    (d / "家庭.txt").write_text(TXT, encoding="utf-8")
    (tmp_path / "test.jsonl").write_text(json.dumps({"instruction": LEAKED, "output": "Stay calm."}) + "\n",
                                         encoding="utf-8")
    (tmp_path / "q.txt").write_text("QUESTIONS n={num_questions} from {source}\n{passage}\n{examples}\n",
                                    encoding="utf-8")
    (tmp_path / "a.txt").write_text("ANSWER: {question}\nPASSAGE: {passage}", encoding="utf-8")
    (tmp_path / "j.txt").write_text("JUDGE\nQ: {question}\nA: {answer}\nP: {passage}", encoding="utf-8")
    return tmp_path


def make_cfg(root: Path, base_url: str, **kw) -> SelfInstructConfig:
    base = dict(domain="parenting", language="en", documents=[str(root / "docs")], exclude=[str(root / "test.jsonl")],
                doc_question_template=str(root / "q.txt"), doc_answer_template=str(root / "a.txt"),
                judge_template=str(root / "j.txt"), base_url=base_url, model="fake-model", api_key_env=KEY_ENV,
                num_questions=8, questions_per_passage=2, passage_tokens=50, passage_overlap=0,
                max_concurrency=1, request_timeout=5.0, max_retries=1, retry_base_delay=0.01,
                output_dir=str(root / "out"))
    base.update(kw)
    return SelfInstructConfig(**base)


class Teacher:
    """question_fn / answer_fn / judge_fn for FakeLLM: questions name the passage's first marker."""

    def __init__(self, leak: bool = True, unsupported: str = "zqmarkfive"):
        self.i, self.leak, self.unsupported = 0, leak, unsupported

    def questions(self, prompt: str, n: int) -> list[str]:
        passage = prompt.split("\n", 1)[1]
        mark = MARK.search(passage).group(0)
        out = []
        if self.leak:  # the first reply copies a test question
            self.leak = False
            out.append(LEAKED)
        for _ in range(n):
            self.i += 1
            out.append(f"Q{self.i}: how to handle k{self.i}x k{self.i}y k{self.i}z about {mark}?")
        return out

    @staticmethod
    def answer(text: str) -> str:
        question, passage = text.split("\nPASSAGE: ", 1)
        return f"Answer to: {question} (passage {MARK.search(passage).group(0)})"

    def judge(self, prompt: str) -> str:
        q = prompt.split("\nQ: ", 1)[1].split("\n", 1)[0]
        return "UNSUPPORTED: the passage says nothing about that" if self.unsupported in q else "SUPPORTED: fine"


def fake(teacher: Teacher, **kw) -> FakeLLM:
    return FakeLLM(question_fn=teacher.questions, answer_fn=teacher.answer, judge_fn=teacher.judge, **kw)


def check_rows(out: Path, target: int) -> list[dict]:
    rows = read_jsonl(out / "train.jsonl")
    assert len(rows) == target and len({r["instruction"] for r in rows}) == target
    for r in rows:
        mark = MARK.search(r["instruction"]).group(0)
        file, page, heading = WHERE[mark]
        src = r["source"]
        assert (Path(src["file"]).name, src["page"], src["heading"]) == (file, page, heading), r
        assert r["output"].startswith(f"Answer to: {r['instruction']} (passage {mark})")  # answered from its passage
        assert src["passage"].startswith("p-")
    return rows


def test_documents_to_grounded_pairs_with_judge_and_decontamination(docs, monkeypatch, tiny_model_dir, capsys):
    monkeypatch.setenv(KEY_ENV, "k")
    teacher = Teacher()
    with fake(teacher) as srv:
        out = run_gen_data(make_cfg(docs, srv.base_url, num_questions=12))  # every passage is asked
        log = list(srv.log)
    rows = check_rows(out, 12)
    assert not any("zqmarkfive" in r["instruction"] for r in rows)  # judged unsupported
    rejected = read_jsonl(out / "rejected.jsonl")
    leaked = [r for r in rejected if r["question"] == LEAKED]
    assert len(leaked) == 1 and leaked[0]["reason"] == "contaminated" and leaked[0]["stage"] == "question"
    assert leaked[0]["excluded"].endswith("test.jsonl:1")
    unsupported = [r for r in rejected if r["reason"] == "unsupported"]
    assert unsupported and all("zqmarkfive" in r["question"] for r in unsupported)
    assert all(r["judge"] == "the passage says nothing about that" for r in unsupported)
    assert {Path(r["source"]["file"]).name for r in unsupported} == {"manual.pdf"}

    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    c = m["counts"]
    assert m["status"] == "complete" and m["target_reached"] and m["train_rows"] == 12
    assert c["questions_kept"] == len(read_jsonl(out / "questions.jsonl"))
    assert c["answers_kept"] == len(read_jsonl(out / "answers.jsonl"))
    assert c["questions_rejected"] == {"contaminated": 1}
    assert c["answers_rejected"] == {"unsupported": len(unsupported)}
    kinds = [e["kind"] for e in log]
    assert (c["question_calls"], c["answer_calls"], c["judge_calls"]) == \
        (kinds.count("question"), kinds.count("answer"), kinds.count("judge"))
    assert m["spent"]["calls"] == len(log)
    assert m["spent"]["prompt_tokens"] == len(log)  # the fake reports usage 1 + 1 per call
    files = m["documents"]["files"]
    assert {Path(f).name for f in files} == {"guide.md", "manual.pdf", "家庭.txt"}
    assert sum(f["passages"] for f in files.values()) == m["documents"]["passages"] == 6
    assert sum(f.get("questions_kept", 0) for f in files.values()) == c["questions_kept"]
    assert sum(f.get("answers_kept", 0) for f in files.values()) == c["answers_kept"]
    assert sum(f.get("answers_dropped", 0) for f in files.values()) == len(unsupported)
    assert m["documents"]["problems"] == []
    # Every passage was asked before any was asked twice (least-asked first).
    marks = [MARK.search(e["prompt"].split("\n", 1)[1]).group(0) for e in log if e["kind"] == "question"]
    assert len(set(marks[:6])) == min(6, len(marks))
    # data-check accepts the file as it is (the "source" object is ignored by training).
    cfg_yaml = docs / "train.yaml"
    cfg_yaml.write_text(yaml.safe_dump({"model": {"name_or_path": str(tiny_model_dir("qwen2"))},
                                        "data": {"path": str(out / "train.jsonl"), "val_size": 0}}), encoding="utf-8")
    capsys.readouterr()
    assert main(["data-check", str(cfg_yaml)]) == 0
    assert "12 rows" in capsys.readouterr().out


def test_citations_inline_end_the_answer_with_the_source(docs, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "k")
    with fake(Teacher(leak=False, unsupported="none")) as srv:
        out = run_gen_data(make_cfg(docs, srv.base_url, citations="inline", num_questions=6, exclude=[]))
    rows = read_jsonl(out / "train.jsonl")
    for r in rows:
        file, page, heading = WHERE[MARK.search(r["instruction"]).group(0)]
        where = ", ".join([file] + ([f"page {page}"] if page else []) + ([heading] if heading else []))
        assert r["output"].endswith(f"\n\nSource: {where}")


def test_judge_replies_without_a_verdict_are_dropped_and_counted(docs, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "k")
    teacher = Teacher(leak=False)
    teacher.judge = lambda prompt: "Looks fine to me." if "zqmarktwo" in prompt.split("\nQ: ", 1)[1] else "SUPPORTED"
    with fake(teacher) as srv:
        out = run_gen_data(make_cfg(docs, srv.base_url, num_questions=6, exclude=[]))
    rej = [r for r in read_jsonl(out / "rejected.jsonl") if r["stage"] == "answer"]
    assert rej and {r["reason"] for r in rej} <= {"judge_unclear", "unsupported"}
    assert all(r["judge"] == "Looks fine to me." for r in rej if r["reason"] == "judge_unclear")
    assert not any("zqmarktwo" in r["instruction"] for r in read_jsonl(out / "train.jsonl"))


def test_parse_verdict():
    assert parse_verdict("SUPPORTED: all there") == (True, "all there")
    assert parse_verdict("UNSUPPORTED：资料没有提到午睡时长") == (False, "资料没有提到午睡时长")
    assert parse_verdict("verdict: unsupported - the age is invented") == (False, "the age is invented")
    assert parse_verdict("结论：支持")[0] is None


def test_preview_makes_n_pairs_writes_no_train_file_and_a_full_run_goes_on(docs, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, "k")
    with fake(Teacher(leak=False, unsupported="none")) as srv:
        cfg = make_cfg(docs, srv.base_url, exclude=[])
        config = docs / "gen.yaml"
        config.write_text(yaml.safe_dump({"selfinstruct": cfg.model_dump(mode="json")}, allow_unicode=True),
                          encoding="utf-8")
        assert main(["gen-data", str(config), "--preview", "3"]) == 0
        printed = capsys.readouterr().out
        out = Path(cfg.output_dir)
        assert not (out / "train.jsonl").exists()
        m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        assert m["status"] == "preview" and m["train_rows"] is None and not m["target_reached"]
        first = read_jsonl(out / "answers.jsonl")
        assert len(first) == 3
        for r in first:
            assert f"Q: {r['question']}" in printed and f"A: {r['answer']}" in printed
            assert Path(r["source"]["file"]).name in printed
        assert "--- preview: 3 pairs" in printed
        run_gen_data(cfg)
        rows = check_rows(out, 8)
        assert [r["instruction"] for r in rows[:3]] == [r["question"] for r in first]  # the preview's pairs kept
        # Regression (issue 27): a preview after the finished run deleted train.jsonl until a full rerun
        finished = {p.name: p.read_bytes() for p in out.iterdir()}
        calls = len(srv.log)
        assert main(["gen-data", str(config), "--preview", "2"]) == 0
        assert f"The run is finished: {out / 'train.jsonl'} has 8 rows." in capsys.readouterr().out
        assert {p.name: p.read_bytes() for p in out.iterdir()} == finished and len(srv.log) == calls


def test_files_without_text_are_reported_not_skipped(docs, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, "k")
    make_pdf(docs / "docs" / "scan.pdf", [None])
    with fake(Teacher(leak=False, unsupported="none")) as srv:
        out = run_gen_data(make_cfg(docs, srv.base_url, num_questions=4, exclude=[]))
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    problems = m["documents"]["problems"]
    assert [(Path(p["file"]).name, p["reason"]) for p in problems] == [("scan.pdf", "no_text_layer")]
    assert "scan.pdf" in capsys.readouterr().err
    only_scan = docs / "scans"
    only_scan.mkdir()
    make_pdf(only_scan / "scan.pdf", [None, None])
    with pytest.raises(UserError, match=r"selfinstruct.documents: no text found in 1 file\(s\).*scan.pdf"):
        run_gen_data(make_cfg(docs, "http://127.0.0.1:9/v1", documents=[str(only_scan)]))
    with pytest.raises(UserError, match=r"nothing\.md"):
        run_gen_data(make_cfg(docs, "http://127.0.0.1:9/v1", documents=[str(docs / "nothing.md")]))


def test_exclude_also_applies_to_seed_questions(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "k")
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"question": "How can parents support alpha bravo charlie?"}) + "\n", encoding="utf-8")
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"instruction": LEAKED, "output": "x"}) + "\n", encoding="utf-8")
    (tmp_path / "q.txt").write_text("QUESTIONS {examples}", encoding="utf-8")
    (tmp_path / "a.txt").write_text("ANSWER: {question}", encoding="utf-8")
    script = [{"questions": [LEAKED, "Q1: how to handle k1x k1y k1z?", "Q2: how to handle k2x k2y k2z?"]}]
    with FakeLLM(script) as srv:
        out = run_gen_data(SelfInstructConfig(
            domain="parenting", seeds_path=str(seeds), exclude=[str(test)], question_template=str(tmp_path / "q.txt"),
            answer_template=str(tmp_path / "a.txt"), base_url=srv.base_url, api_key_env=KEY_ENV, num_questions=2,
            max_concurrency=1, output_dir=str(tmp_path / "out")))
    assert [r["instruction"] for r in read_jsonl(out / "train.jsonl")] == ["Q1: how to handle k1x k1y k1z?",
                                                                            "Q2: how to handle k2x k2y k2z?"]
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert m["counts"]["questions_rejected"] == {"contaminated": 1}


def count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_sigkill_mid_run_then_rerun_reaches_the_target_without_loss_or_duplicates(docs, monkeypatch):
    target = 8
    teacher = Teacher(leak=False, unsupported="none")
    with fake(teacher, delay=0.1) as srv:
        cfg = make_cfg(docs, srv.base_url, num_questions=target, exclude=[], max_concurrency=2)
        out = Path(cfg.output_dir)
        config = docs / "gen.yaml"
        config.write_text(yaml.safe_dump({"selfinstruct": cfg.model_dump(mode="json")}, allow_unicode=True),
                          encoding="utf-8")
        env = dict(os.environ, **{KEY_ENV: "k"})
        proc = subprocess.Popen([sys.executable, "-m", "domaintune", "gen-data", str(config)], env=env,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        while count_lines(out / "answers.jsonl") < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        assert not (out / "train.jsonl").exists()
        before = (out / "answers.jsonl").read_bytes()
        assert 3 <= count_lines(out / "answers.jsonl") < target
        monkeypatch.setenv(KEY_ENV, "k")
        run_gen_data(cfg)
    rows = check_rows(out, target)
    keep = before[: before.rfind(b"\n") + 1]
    assert (out / "answers.jsonl").read_bytes().startswith(keep)  # nothing written before the kill was lost
    answered = [r["question"] for r in read_jsonl(out / "answers.jsonl")]
    assert len(answered) == len(set(answered))  # no question answered twice
    assert [r["instruction"] for r in rows] == [r["question"] for r in read_jsonl(out / "questions.jsonl")][:target]


def test_a_preview_that_gives_up_says_why_and_names_the_judge(docs, monkeypatch, capsys):
    """Regression (issue 22, 29): `--preview 3` ended with rc 1, "0 pairs" and "run again without --preview to
    continue"; the reason (every answer dropped as judge_unclear) was shown nowhere, manifest.json said
    "message": null, and the full run's hint named max_tokens / min_answer_chars / answer_blocklist. A full run
    that kept nothing wrote an empty train.jsonl. Without a terminal nothing showed progress."""
    monkeypatch.setenv(KEY_ENV, "k")
    teacher = Teacher(leak=False, unsupported="none")
    teacher.judge = lambda prompt: "Looks fine to me."  # never a verdict
    with fake(teacher) as srv:
        cfg = make_cfg(docs, srv.base_url, exclude=[], max_stalled_calls=3)
        config = docs / "gen.yaml"
        config.write_text(yaml.safe_dump({"selfinstruct": cfg.model_dump(mode="json")}, allow_unicode=True),
                          encoding="utf-8")
        assert main(["gen-data", str(config), "--preview", "3"]) == 1
        printed = capsys.readouterr()
        out = Path(cfg.output_dir)
        m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        why = ("target not reached: the last 3 answers were all dropped (judge_unclear 3); most were dropped as "
               "judge_unclear (3 of 3): the judge's replies (selfinstruct.judge, asked of the teacher "
               f"(selfinstruct.model='fake-model' at {srv.base_url})) said neither SUPPORTED nor UNSUPPORTED")
        assert m["status"] == "preview" and m["message"].startswith(why)
        assert "max_tokens" not in m["message"] and "min_answer_chars" not in m["message"]
        assert f"warning: the preview made 0 of 3 pairs: {why}" in printed.err
        assert "--- preview: 0 pairs" in printed.out and "Run again without --preview" not in printed.out
        # stderr is no terminal here: plain progress lines instead of a bar
        assert re.search(r"^gen-data answers: 0/3 \(kept 0, dropped 3: judge_unclear 3\) \d+s$", printed.err, re.M)

        assert main(["gen-data", str(config), "selfinstruct.num_questions=4"]) == 1
        err = capsys.readouterr().err
    assert not (out / "train.jsonl").exists()
    assert f"warning: no pair was kept, so no {out / 'train.jsonl'} was written: target not reached" in err
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert (m["status"], m["train_rows"], m["counts"]["answers_kept"]) == ("incomplete", 0, 0)
    assert "most were dropped as judge_unclear" in m["message"]


def test_passages_that_gave_no_question_are_counted_per_file_with_the_reason(docs, monkeypatch, capsys):
    """Regression (issue 22, 31): a PDF whose passages got only unparsable replies showed no sign of it in the
    manifest. Now each file counts its passages without a question and why; stderr names the file."""
    monkeypatch.setenv(KEY_ENV, "k")
    teacher = Teacher(leak=False, unsupported="none")

    def blank_for_the_pdf(prompt: str) -> str | None:  # a reply with no question in it, for manual.pdf's passages
        return " \n" if prompt.startswith("QUESTIONS") and "manual.pdf" in prompt.split("\n", 1)[0] else None

    with fake(teacher, reply_fn=blank_for_the_pdf) as srv:
        out = run_gen_data(make_cfg(docs, srv.base_url, num_questions=8, exclude=[]))
    files = {Path(f).name: c for f, c in json.loads((out / "manifest.json").read_text(encoding="utf-8"))
             ["documents"]["files"].items()}
    pdf = files["manual.pdf"]
    assert pdf["passages_without_questions"] == pdf["passages"] == 2
    assert pdf["passages_without_questions_why"] == {"unparsable_reply": 2}
    assert files["guide.md"]["passages_without_questions"] == 0 and "passages_without_questions_why" not in \
        files["guide.md"]
    replies = [r for r in read_jsonl(out / "rejected.jsonl") if r["stage"] == "reply"]
    assert replies and {(r["reason"], Path(r["source"]["file"]).name) for r in replies} == {
        ("unparsable_reply", "manual.pdf")}
    assert re.search(r"gen-data: .*manual\.pdf: 2 of 2 passages gave no question \(unparsable_reply 2\)",
                     capsys.readouterr().err)
