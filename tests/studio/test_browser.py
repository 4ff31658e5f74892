"""The studio end to end in headless Chromium (CDP), from an empty project folder, as a new user goes:

1. open the studio on an empty ROOT: the runs table says there are none;
2. the new-run form: build the tiny offline model with its button, upload the training and test data, preview
   the trained spans, launch;
3. the loss chart gains points while the run trains (at least 3, by the event stream, no reload);
4. Stop (the run saves a checkpoint of its step and reads "stopped"); Resume; it finishes;
5. its row in the runs table, finished;
6. Predict; the predictions browser shows the rows, with search;
7. Export GGUF through the button and download the file (it is a GGUF file, with an Ollama Modelfile beside it);
8. chat with the run (a `serve` job the studio proxies): the answer streams into the page.

Screenshots of the new-run form, the runs table, the live run and the predictions browser are taken on the way; with
DOMAINTUNE_SCREENSHOTS=DIR they are also written there (README's come from `DOMAINTUNE_SCREENSHOTS=docs/images
.venv/bin/python -m pytest tests/studio/test_browser.py`)."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from cdp import browser, require_chromium
from domaintune.rundir import RunDir, latest_checkpoint
from studio_runs import serving

require_chromium()

SHOTS = os.environ.get("DOMAINTUNE_SCREENSHOTS")


@pytest.fixture
def studio(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the jobs' processes: the machine has few cores
    root = tmp_path / "project"
    root.mkdir()
    with serving(root) as (url, _):
        yield root, url
    for record in (root / ".studio" / "jobs").glob("*.json"):  # no job outlives the test
        pid = json.loads(record.read_text()).get("pid")
        if pid:
            try:
                os.killpg(pid, 9)
            except (ProcessLookupError, PermissionError):
                pass


def shot(page, tmp_path: Path, name: str) -> Path:
    path = page.screenshot(tmp_path / name)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(SHOTS) / name)
    return path


def go(page, url: str) -> None:
    page.call("Page.navigate", url=url)
    page.wait_for("document.readyState === 'complete' && document.body.dataset.ready === '1'", timeout=60)


def click(page, element_id: str) -> None:
    page.wait_for(f"!document.getElementById({json.dumps(element_id)}).disabled", timeout=120)
    page.js(f"document.getElementById({json.dumps(element_id)}).click()")


def set_value(page, element_id: str, value: str) -> None:
    page.js(f"(() => {{ const n = document.getElementById({json.dumps(element_id)}); n.value = {json.dumps(value)};"
            " n.dispatchEvent(new Event('input')); n.dispatchEvent(new Event('change')); })()")


def upload(page, path: Path) -> None:
    doc = page.call("DOM.getDocument")
    node = page.call("DOM.querySelector", nodeId=doc["root"]["nodeId"], selector="#upload-file")
    page.call("DOM.setFileInputFiles", nodeId=node["nodeId"], files=[str(path)])
    click(page, "upload-button")
    page.wait_for(f"document.getElementById('data-picker').value === 'data/{path.name}'", timeout=60)


def state(page) -> str:
    return page.js("document.getElementById('run-status').dataset.state")


def test_a_new_user_goes_from_an_empty_folder_to_a_chat(studio, tmp_path, sample_data):
    root, url = studio
    with browser(url + "/", tmp_path / "chromium", ready="document.body.dataset.ready === '1'",
                 size=(1280, 900)) as page:
        page.call("Page.enable")
        page.call("DOM.enable")
        # 1. empty folder
        page.wait_for("!document.getElementById('runs-empty').hidden")
        assert page.js("document.querySelectorAll('tr.run-row').length") == 0

        # 2. the form
        go(page, url + "/new")
        option = page.js("[...document.getElementById('model-picker').options]"
                         ".find((o) => o.text.includes('tiny-qwen2')).value")
        set_value(page, "model-picker", option)
        assert page.js("document.getElementById('f-model.name_or_path').value") == "models/tiny-qwen2"
        click(page, "btn-make-tiny")
        page.wait_for("document.getElementById('btn-make-tiny').hidden", timeout=180)
        assert (root / "models" / "tiny-qwen2" / "config.json").is_file()
        upload(page, sample_data / "test.jsonl")
        upload(page, sample_data / "train.jsonl")
        assert page.js("document.getElementById('f-data.path').value") == "data/train.jsonl"
        set_value(page, "run-name", "first")
        for name, value in {"train.max_steps": "100", "train.logging_steps": "1", "train.save_steps": "1000",
                            "train.eval_steps": "40", "data.cutoff_len": "256", "data.val_size": "4"}.items():
            set_value(page, "f-" + name, value)
        click(page, "btn-preview")
        page.wait_for("document.querySelectorAll('#preview .seg.trained').length > 0", timeout=120)
        trained = page.js("[...document.querySelectorAll('#preview .seg.trained')].map((s) => s.textContent).join('')")
        first = json.loads((sample_data / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])
        assert trained.strip() and trained.strip()[:8] in first["output"]  # the answer is what trains
        page.js("document.getElementById('preview').scrollIntoView({block: 'center'})")
        shot(page, tmp_path, "studio-new.png")
        click(page, "btn-launch")
        page.wait_for("location.pathname === '/run/runs/first' && document.body.dataset.ready === '1'", timeout=60)

        # 3. live curve while it trains
        page.wait_for("document.getElementById('run-status').dataset.state === 'running' &&"
                      " +document.getElementById('loss-chart').querySelector('svg').dataset.points > 0", timeout=180)
        start = int(page.js("document.getElementById('loss-chart').querySelector('svg').dataset.points"))
        page.wait_for(f"+document.getElementById('loss-chart').querySelector('svg').dataset.points >= {start + 3}",
                      timeout=120)
        assert state(page) == "running"  # the points came while it trained
        shot(page, tmp_path, "studio-run.png")

        # 4. stop, resume, finish
        click(page, "btn-stop")
        page.wait_for("document.getElementById('run-status').dataset.state === 'stopped'", timeout=120)
        run = RunDir(root / "runs" / "first")
        stopped_at = run.read_json("status.json")["step"]
        assert latest_checkpoint(run.path).name == f"checkpoint-{stopped_at}" and 0 < stopped_at < 100
        click(page, "btn-resume")
        page.wait_for("document.getElementById('run-status').dataset.state === 'finished'", timeout=300)
        steps = [r["step"] for r in run.read_log() if "loss" in r]
        assert steps == list(range(1, 101))  # each step once: nothing lost or repeated by the stop

        # 5. the runs table
        go(page, url + "/")
        page.wait_for("document.querySelector('tr.run-row[data-run-id=\"runs/first\"]') !== null")
        assert page.js("document.querySelector('tr.run-row[data-run-id=\"runs/first\"]').dataset.status") == "finished"

        # 6. predict, then the predictions browser
        go(page, url + "/run/runs/first")
        rows = (sample_data / "test.jsonl").read_text(encoding="utf-8").splitlines()
        set_value(page, "predict-data", "data/test.jsonl")
        click(page, "btn-predict")
        page.wait_for("document.querySelectorAll('#predictions tr.pred-row').length > 0", timeout=300)
        page.wait_for("document.querySelector('tr.job-row[data-kind=\"predict\"]') !== null &&"
                      " document.querySelector('tr.job-row[data-kind=\"predict\"]').dataset.state === 'finished'",
                      timeout=300)
        page.wait_for(f"document.querySelectorAll('#predictions tr.pred-row').length === {min(20, len(rows))}",
                      timeout=30)
        predicted = [json.loads(x) for x in run.file("predictions.jsonl").read_text(encoding="utf-8").splitlines()]
        assert len(predicted) == len(rows)
        shown = page.js("document.querySelectorAll('#predictions tr.pred-row').length")
        assert shown == min(20, len(rows))
        word = json.loads(rows[-1])["instruction"][:6]
        set_value(page, "pred-search", word)
        page.wait_for(f"[...document.querySelectorAll('#predictions tr.pred-row .question')]"
                      f".every((q) => q.textContent.includes({json.dumps(word)})) &&"
                      " document.querySelectorAll('#predictions tr.pred-row').length >= 1", timeout=30)
        set_value(page, "pred-search", "")
        page.wait_for("document.querySelectorAll('#predictions tr.pred-row').length > 1", timeout=30)
        page.js("document.getElementById('predictions-card').scrollIntoView()")
        shot(page, tmp_path, "studio-predictions.png")

        # 7. export GGUF and download it
        set_value(page, "export-format", "gguf")
        downloads = tmp_path / "downloads"
        downloads.mkdir()
        page.call("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(downloads))
        click(page, "btn-export")
        page.wait_for("document.getElementById('download-link') !== null", timeout=300)
        name = page.js("document.getElementById('download-link').getAttribute('download')")
        assert name.endswith(".gguf")
        page.js("document.getElementById('download-link').click()")
        deadline = time.time() + 60
        while not (downloads / name).is_file():
            assert time.time() < deadline, list(downloads.iterdir())
            time.sleep(0.1)
        time.sleep(0.5)
        data = (downloads / name).read_bytes()
        assert data[:4] == b"GGUF"
        exported = next(root.rglob(name))
        assert exported.read_bytes() == data and (exported.parent / "Modelfile").is_file()

        # 8. chat
        click(page, "btn-chat")
        page.wait_for("document.getElementById('chat-status').dataset.ready === '1'", timeout=180)
        set_value(page, "chat-input", "孩子不爱吃饭怎么办")
        page.js("document.getElementById('chat-form').requestSubmit()")
        page.wait_for("(() => { const b = document.querySelector('#chat-messages .msg.assistant');"
                      " return b && b.dataset.done === '1'; })()", timeout=120)
        answer = page.js("document.querySelector('#chat-messages .msg.assistant').textContent")
        assert answer.strip()

        # the runs table again, now with the run's scores
        go(page, url + "/")
        page.wait_for("document.querySelector('tr.run-row[data-run-id=\"runs/first\"] .metrics')"
                      ".textContent.includes('rouge')")
        shot(page, tmp_path, "studio-runs.png")


def cli_error(capsys, argv: list[str]) -> str:
    """What `domaintune ARGV` prints after "error: " (it must fail with exit code 2)."""
    from domaintune.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err.split("error: ", 1)[1].removesuffix("\n")


def test_the_form_shows_the_clis_message_at_each_bad_field(studio, tmp_path, capsys):
    """A negative learning rate, a model folder that does not exist and a data file with a bad line: each is
    shown at its field, in the words `domaintune train` prints for the same value."""
    root, url = studio
    row = {"instruction": "孩子挑食怎么办？", "input": "", "output": "少量多次，不强迫。"}
    (root / "data").mkdir()
    (root / "data" / "good.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    (root / "data" / "bad.jsonl").write_text(json.dumps(row, ensure_ascii=False) + '\n{"instruction": "no answer"}\n',
                                             encoding="utf-8")
    model = root / "models" / "fake"  # what the checks before loading read: config.json and a tokenizer file
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64}), encoding="utf-8")
    (model / "tokenizer.json").write_text("{}", encoding="utf-8")
    good = {"model.name_or_path": "models/fake", "data.path": "data/good.jsonl", "train.learning_rate": "1e-4"}
    cfg = root / "configs" / "good.yaml"
    cfg.parent.mkdir()
    cfg.write_text(f"model: {{name_or_path: {model}}}\ndata: {{path: {root / 'data' / 'good.jsonl'}}}\n"
                   f"train: {{output_dir: {root / 'runs' / 'x'}}}\n", encoding="utf-8")
    cases = [("train.learning_rate", "-1", None), ("model.name_or_path", "models/nope", root / "models" / "nope"),
             ("data.path", "data/bad.jsonl", root / "data" / "bad.jsonl")]
    with browser(url + "/new", tmp_path / "chromium", ready="document.body.dataset.ready === '1'") as page:
        set_value(page, "run-name", "first")
        for field, value, absolute in cases:
            for name, v in {**good, field: value}.items():
                set_value(page, "f-" + name, v)
            page.js("document.getElementById('err-' + %s).textContent = ''" % json.dumps(field))
            click(page, "btn-check")
            shown = page.wait_for("document.getElementById('err-' + %s).textContent" % json.dumps(field), timeout=120)
            others = page.js("[...document.querySelectorAll('.field-error')].filter((e) => e.textContent)"
                             ".map((e) => e.dataset.for)")
            assert others == [field]
            if absolute is None:  # a value the config schema refuses: the CLI names the override, then the problem
                said = cli_error(capsys, ["train", str(cfg), f"{field}={value}"])
                assert said == f"invalid command-line override:\n  override '{field}={value}': {shown}"
            else:  # a check of the files, before any model loads
                assert cli_error(capsys, ["train", str(cfg), f"{field}={absolute}"]) == shown
