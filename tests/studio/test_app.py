"""The studio's JSON API, pages and event stream, with a real uvicorn on 127.0.0.1 over hand-built run
directories (the files as train, predict, eval, judge and report write them; no model is loaded)."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import httpx
import pytest

from domaintune import rundir
from domaintune.errors import UserError
from domaintune.studio.markdown_html import to_html
from studio_runs import jsonl, make_run, read_events, serving


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    make_run(root)
    make_run(root, "beta", state="stopped")
    return root


def test_runs_table_api_lists_every_run_with_its_figures(root):
    with serving(root) as (url, _):
        runs = {r["id"]: r for r in httpx.get(f"{url}/api/runs").json()["runs"]}
    assert set(runs) == {"runs/alpha", "runs/beta"}
    alpha = runs["runs/alpha"]
    assert (alpha["status"], alpha["step"], alpha["max_steps"]) == ("finished", 2, 10)
    assert alpha["loss"] == pytest.approx(1.8) and alpha["eval_loss"] == 1.95
    assert alpha["model"] == "/models/tiny-qwen2"
    assert alpha["judge"]["win_rate"] == 0.7 and (alpha["judge"]["low"], alpha["judge"]["high"]) == (0.4, 0.9)
    assert runs["runs/beta"]["status"] == "stopped"


def test_run_detail_config_data_report_log_and_exports(root):
    export = root / "exports" / "runs__alpha"
    export.mkdir(parents=True)
    (export / "alpha-f16.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 64)
    with serving(root) as (url, _):
        detail = httpx.get(f"{url}/api/runs/runs/alpha").json()
        log = httpx.get(f"{url}/api/runs/runs/alpha/log").json()["records"]
        download = httpx.get(f"{url}/api/download", params={"path": "exports/runs__alpha/alpha-f16.gguf"})
        in_run = httpx.get(f"{url}/api/runs/runs/alpha/download", params={"path": "config.yaml"})
        missing = httpx.get(f"{url}/api/runs/runs/nope")
    assert detail["config"] == (root / "runs/alpha/config.yaml").read_text()
    assert detail["data_report"] == {"rows": 40, "overlength": {"count": 3, "dropped": 1}}
    assert detail["has_report"] and detail["has_predictions"]
    assert [e["path"] for e in detail["exports"]] == ["exports/runs__alpha/alpha-f16.gguf"]
    assert [r["step"] for r in log] == [1, 2, 2]
    assert download.status_code == 200 and download.content == (export / "alpha-f16.gguf").read_bytes()
    assert 'filename="alpha-f16.gguf"' in download.headers["content-disposition"]
    assert download.headers["content-disposition"].startswith("attachment")
    assert in_run.content == (root / "runs/alpha/config.yaml").read_bytes()
    assert missing.status_code == 404 and "no run 'runs/nope'" in missing.json()["error"]["message"]


def test_predictions_browser_searches_and_pages_server_side(root):
    with serving(root) as (url, _):
        get = lambda **q: httpx.get(f"{url}/api/runs/runs/alpha/predictions", params=q).json()  # noqa: E731
        first, second = get(limit=2), get(limit=2, offset=2)
        found = get(q="CHILD")
        by_answer = get(q="base answer 4")
        nothing = get(q="zebra")
    assert (first["total"], first["matched"], [r["id"] for r in first["rows"]]) == (5, 5, [0, 1])
    assert [r["id"] for r in second["rows"]] == [2, 3]
    row = first["rows"][0]
    assert (row["base"], row["tuned"], row["reference"]) == ("base answer 0", "tuned answer 0", "ref 0")
    assert row["input"] == "用户:What is a fever?\n\n助手:"
    assert row["scores"] == {"bleu-4": 10.0, "rouge-l": 20.0} and row["base_scores"] is None
    assert row["judge"]["outcome"] == "win" and row["judge"]["why"] == "both orders"
    assert [c["reason"] for c in row["judge"]["calls"]] == ["answer 0 in order AB is more precise",
                                                             "answer 0 in order BA is more precise"]
    assert [r["id"] for r in found["rows"]] == [2] and found["matched"] == 1 and found["total"] == 5
    assert [r["id"] for r in by_answer["rows"]] == [4]
    assert nothing["rows"] == [] and nothing["matched"] == 0


def test_report_is_rendered_with_every_text_escaped(root):
    with serving(root) as (url, _):
        html = httpx.get(f"{url}/api/runs/runs/alpha/report").json()["html"]
    assert "<h1>Report &lt;script&gt;alert(1)&lt;/script&gt;</h1>" in html
    assert "<script>" not in html
    assert "<th>metric</th><th>value</th>" in html and "<td><strong>12.5</strong></td>" in html
    assert "<code>predictions.jsonl</code>" in html


def test_markdown_converter_blocks():
    html = to_html("## Data\n\n- one <b>\n- two\n\n1. first\n\n```\nx < y\n```\nplain & text\nnext line")
    assert html.split("\n") == ["<h2>Data</h2>", "<ul><li>one &lt;b&gt;</li><li>two</li></ul>",
                                "<ol><li>first</li></ol>", "<pre><code>x &lt; y</code></pre>",
                                "<p>plain &amp; text<br>next line</p>"]


def test_event_stream_sends_the_log_then_records_appended_after_it_opened(root):
    log = root / "runs/alpha" / rundir.LOG
    with serving(root) as (url, _), httpx.stream("GET", f"{url}/api/runs/runs/alpha/events", timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        first = read_events(lines, lambda ev: {"log", "status"} <= {e for e, _ in ev})
        with open(log, "a") as f:  # training appends a record, then a torn half of the next one
            f.write(json.dumps({"step": 3, "loss": 1.5, "learning_rate": 7e-5}) + "\n" + '{"step": 4, "lo')
        later = read_events(lines, lambda ev: any(e == "log" for e, _ in ev))
    logged = [d for e, d in first if e == "log"][0]
    assert [r["step"] for r in logged] == [1, 2, 2]
    status = [d for e, d in first if e == "status"][0]
    assert status["id"] == "runs/alpha" and status["status"] == "finished"
    assert [d for e, d in later if e == "log"] == [[{"step": 3, "loss": 1.5, "learning_rate": 7e-5}]]


def test_pages_and_static_files_carry_the_ids_and_headers(root):
    with serving(root) as (url, _):
        index, run, new = (httpx.get(f"{url}{p}") for p in ("/", "/run/runs/alpha", "/new"))
        chart = httpx.get(f"{url}/static/chart.js")
        missing = httpx.get(f"{url}/static/nope.js")
    assert 'id="runs-table"' in index.text and "/static/runs.js" in index.text
    for tag in ('id="loss-chart"', 'id="btn-stop"', 'id="btn-resume"', 'id="btn-predict"', 'id="btn-export"',
                'id="btn-chat"', 'id="predictions"', 'id="pred-search"'):
        assert tag in run.text
    assert 'id="new-form"' in new.text and 'id="btn-launch"' in new.text
    csp = index.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and index.headers["x-frame-options"] == "DENY"
    assert chart.headers["content-type"].startswith("text/javascript") and "data-points" in chart.text
    assert missing.status_code == 404


def test_actions_run_the_cli_as_jobs(root):
    with serving(root) as (url, studio):
        export = httpx.post(f"{url}/api/runs/runs/alpha/export", json={"format": "gguf", "quant": "q8_0"})
        bad_data = httpx.post(f"{url}/api/runs/runs/alpha/predict", json={"data": "data/none.jsonl"})
        bad_format = httpx.post(f"{url}/api/runs/runs/alpha/export", json={"format": "zip"})
        not_training = httpx.post(f"{url}/api/runs/runs/beta/stop")
        no_chat = httpx.get(f"{url}/api/runs/runs/alpha/chat")
        chat_first = httpx.post(f"{url}/api/runs/runs/alpha/chat/completions", json={"messages": []})
        job = export.json()["job"]
        deadline = time.time() + 120
        while (seen := httpx.get(f"{url}/api/jobs/{job['id']}").json())["job"]["state"] == "running":
            assert time.time() < deadline
            time.sleep(0.3)
        listed = httpx.get(f"{url}/api/runs/runs/alpha").json()["jobs"]
    assert export.status_code == 201
    assert job["kind"] == "export" and job["run"] == "runs/alpha"
    assert job["argv"] == ["export", str(root.resolve() / "runs/alpha"), "--format", "gguf", "--out",
                           str(root.resolve() / "exports/runs__alpha"), "--overwrite", "--quant", "q8_0"]
    # the hand-built run has no weights: the CLI refuses it, and the job says so
    assert seen["job"]["state"] == "failed" and seen["log"].strip()
    assert [j["id"] for j in listed] == [job["id"]]
    assert bad_data.status_code == 400 and "data/none.jsonl" in bad_data.json()["error"]["message"]
    assert bad_format.status_code == 400
    assert not_training.status_code == 409 and "not training" in not_training.json()["error"]["message"]
    assert no_chat.json() == {"job": None, "state": None, "ready": False, "model": None}
    assert chat_first.status_code == 409 and "press Chat" in chat_first.json()["error"]["message"]


def test_upload_lands_in_data_and_is_listed(root):
    body = b'{"instruction": "q", "output": "a"}\n' * 100
    with serving(root) as (url, _):
        up = httpx.post(f"{url}/api/upload/data", params={"filename": "C:\\Users\\me\\train.jsonl"}, content=body)
        files = httpx.get(f"{url}/api/files", params={"folder": "data"}).json()["files"]
        wrong = httpx.post(f"{url}/api/upload/runs", params={"filename": "x.jsonl"}, content=b"x")
    assert up.status_code == 201 and up.json() == {"name": "train.jsonl", "path": "data/train.jsonl",
                                                   "size": len(body)}
    assert (root / "data/train.jsonl").read_bytes() == body
    assert [f["relpath"] for f in files] == ["data/train.jsonl"]
    assert wrong.status_code == 400


def form_project(root: Path) -> dict[str, str]:
    """A data file and a model folder as far as the checks before loading read it; the form's values for them."""
    (root / "data").mkdir()
    (root / "data/train.jsonl").write_text(json.dumps({"instruction": "孩子发烧怎么办？", "output": "多喝水。"},
                                                      ensure_ascii=False) + "\n", encoding="utf-8")
    model = root / "models/fake"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64}))
    (model / "tokenizer.json").write_text("{}")
    return {"model.name_or_path": "models/fake", "data.path": "data/train.jsonl", "train.learning_rate": "1e-4"}


def test_form_fields_errors_at_the_field_and_save(root):
    from domaintune.studio.forms import config_from_form, form_fields
    from domaintune.studio.project import Project

    good = form_project(root)
    bad = {**good, "train.learning_rate": "-0.001"}
    no_model = {**good, "model.name_or_path": "models/missing"}
    # the first check imports what training's pre-flight checks use (transformers): seconds on a busy machine
    with serving(root) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        form = client.get("/api/form").json()
        ok = client.post("/api/config/check", json={"values": {**good, "name": "first"}}).json()
        refused = client.post("/api/config/check", json={"values": bad}).json()
        missing = client.post("/api/config/check", json={"values": no_model}).json()
        not_saved = client.post("/api/config/save", json={"values": bad, "name": "first", "launch": True})
        bad_name = client.post("/api/config/save", json={"values": good, "name": "../x", "launch": False})
        saved = client.post("/api/config/save", json={"values": good, "name": "first", "launch": False})
    assert form["fields"] == json.loads(json.dumps(form_fields()))
    assert any(m["kind"] == "local" and m["path"] == "models/fake" for m in form["models"])
    assert ok == {"ok": True, "errors": {}}
    expected = config_from_form(bad, Project(root))[1]
    assert refused["ok"] is False and refused["errors"] == expected
    assert expected == {"train.learning_rate": "'train.learning_rate': Input should be greater than 0 (got -0.001)"}
    assert list(missing["errors"]) == ["model.name_or_path"]
    assert missing["errors"] == config_from_form(no_model, Project(root))[1]
    assert not_saved.status_code == 400 and not_saved.json()["errors"] == expected
    assert bad_name.status_code == 400 and "name" in bad_name.json()["errors"]
    assert saved.status_code == 201
    assert saved.json() == {"config": "configs/first.yaml", "run": "runs/first", "job": None}
    text = (root / "configs/first.yaml").read_text()
    assert text.startswith("# domaintune train ") and f"output_dir: {root.resolve()}/runs/first" in text
    assert not (root / ".studio").exists()  # nothing launched


def test_a_launched_run_is_listed_and_streams_before_its_folder_exists(root):
    import sys

    sleeper = [sys.executable, "-c", "import sys, time; print('loading the model'); sys.stdout.flush(); time.sleep(60)"]
    with serving(root) as (url, studio):
        job = studio.jobs.start("train", ["train", "configs/new.yaml"], run="runs/new", command=sleeper)
        listed = {r["id"]: r for r in httpx.get(f"{url}/api/runs").json()["runs"]}
        with httpx.stream("GET", f"{url}/api/runs/runs/new/events", timeout=30) as r:
            status = read_events(r.iter_lines(), lambda ev: any(e == "status" for e, _ in ev))[-1][1]
        stopped = httpx.post(f"{url}/api/runs/runs/new/stop").json()
        deadline = time.time() + 30
        while (after := httpx.get(f"{url}/api/runs/runs/new").json()["summary"])["status"] == "running":
            assert time.time() < deadline
            time.sleep(0.2)
        never = httpx.get(f"{url}/api/runs/runs/other")
    assert listed["runs/new"]["status"] == "running" and listed["runs/new"]["message"].startswith("starting")
    assert status["id"] == "runs/new" and status["status"] == "running"
    assert stopped == {"stopped": "job", "job": job["id"]}
    assert after["status"] == "stopped" and not (root / "runs/new").exists()  # SIGINT: exit 130
    assert never.status_code == 404


def test_a_run_is_running_while_its_train_job_lives_whatever_status_json_says(root):
    import sys

    from domaintune.studio.context import Studio
    from domaintune.studio.jobs import Jobs
    from domaintune.studio.project import Project

    project = Project(root)
    st = Studio(project, Jobs(project))
    run = root / "runs/alpha"
    job = st.jobs.start("train", ["train", "x", "--resume"], run="runs/alpha",
                        command=[sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        status = json.loads((run / "status.json").read_text())
        (run / "status.json").write_text(json.dumps({**status, "state": "stopped",
                                                     "started": "2026-01-01T00:00:00+00:00"}))
        starting = st.summary(run)  # a resume whose training has not rewritten the old status yet
        (run / "status.json").write_text(json.dumps({**status, "state": "stopped", "started": "2999-01-01T00:00:00"}))
        ending = st.summary(run)  # training wrote "stopped" and is still exiting
    finally:
        st.jobs.stop(job["id"])
    assert (starting["status"], starting["message"]) == ("running", "starting: loading the model and the data")
    assert ending["status"] == "running" and ending["message"].startswith("ending (stopped)")


def test_documents_pairs_and_rejected_of_a_gen_data_folder(root):
    out = root / "data/generated"
    out.mkdir(parents=True)
    jsonl(out / "answers.jsonl", [{"question": "What is a fever?", "answer": "A raised temperature.",
                                   "source": {"file": "manual.pdf", "page": 3, "heading": "Fever", "passage": "..."}}])
    jsonl(out / "rejected.jsonl", [{"stage": "question", "reason": "duplicate", "question": "What's a fever?",
                                    "similar_to": "What is a fever?"}])
    (root / "configs").mkdir()
    (root / "configs/gen.yaml").write_text("selfinstruct:\n  output_dir: data/generated\n")
    with serving(root) as (url, studio):
        pairs = httpx.get(f"{url}/api/documents/pairs", params={"path": "data/generated"}).json()
        rejected = httpx.get(f"{url}/api/documents/rejected", params={"path": "data/generated"}).json()
        missing = httpx.get(f"{url}/api/documents/rejected", params={"path": "data/none"})
        escape = httpx.get(f"{url}/api/documents/pairs", params={"path": "../.."})
        started = httpx.post(f"{url}/api/documents/preview", json={"config": "configs/gen.yaml", "n": 2}).json()
        with contextlib.suppress(UserError):  # (it fails at once without a teacher API; stop it if not yet)
            studio.jobs.stop(started["job"]["id"])
    assert [(p["question"], p["answer"], p["source"]["file"]) for p in pairs["pairs"]] == \
        [("What is a fever?", "A raised temperature.", "manual.pdf")]
    assert [(r["stage"], r["reason"], r["question"]) for r in rejected["rows"]] == \
        [("question", "duplicate", "What's a fever?")]
    assert rejected["total"] == 1 and rejected["counts"] == {"duplicate": 1}
    assert missing.status_code == 404 and escape.status_code == 403
    assert started["out"] == "data/generated"
    assert started["job"]["argv"] == ["gen-data", str(root.resolve() / "configs/gen.yaml"), "--preview", "2"]


def test_the_event_stream_stops_reading_when_the_client_goes(root, monkeypatch):
    from domaintune.studio import runs

    reads: list[float] = []

    class CountingTail(runs.LogTail):
        def read_new(self) -> list[dict]:
            reads.append(time.monotonic())
            return super().read_new()

    monkeypatch.setattr(runs, "LogTail", CountingTail)
    with serving(root) as (url, _):
        with httpx.stream("GET", f"{url}/api/runs/runs/alpha/events", timeout=30) as r:
            read_events(r.iter_lines(), lambda ev: len(ev) >= 2)
            time.sleep(1.2)
        gone = time.monotonic()
        time.sleep(2.0)
    assert len([t for t in reads if t < gone]) >= 2  # it polled every 0.5 s while the client listened
    assert len([t for t in reads if t > gone + 1.0]) == 0  # and stopped within a second of the disconnect
