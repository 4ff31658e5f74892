"""Output conventions of the real CLI (issue 22, defects 7 and 31): stdout carries a verb's result and nothing else,
so it can be piped; notes, progress, warnings and transformers' own output go to stderr; --quiet hides the notes
(not warnings or errors); -v shows more. Each test runs `python -m domaintune` as a user's shell would."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

METRIC_NAMES = {"num_samples", "bleu-4", "corpus_bleu", "rouge-1", "rouge-2", "rouge-l", "exact_match",
                "avg_predict_len", "loss", "perplexity"}


def domaintune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "domaintune", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def metrics_table(stdout: str) -> dict[str, object]:
    """The documented result of eval / predict: one `name value` line per metric, the value a number or JSON (a
    nested summary kept in metrics.json comes as dotted names)."""
    table: dict[str, object] = {}
    for line in stdout.splitlines():
        name, value = line.split(None, 1)
        table[name] = json.loads(value)  # a warning or a note on stdout fails here
    assert {n for n in table if not n.startswith("judge.")} <= METRIC_NAMES, set(table) - METRIC_NAMES
    return table


def _predictions(folder: Path) -> Path:
    folder.mkdir()
    rows = [{"id": 0, "input": "q0", "target": "早睡早起身体好", "predict": "早睡早起"},
            {"id": 1, "input": "q1", "target": "read a book every day", "predict": "read a book every day"}]
    path = folder / "predictions.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_eval_stdout_is_the_metrics_table_and_warnings_go_to_stderr(tmp_path):
    """Before: `warning: .../metrics.json is not a JSON object; it is replaced` and the `kept ...` note were
    printed on stdout, in the middle of the data a pipe reads."""
    preds = _predictions(tmp_path / "run")
    metrics = preds.parent / "metrics.json"
    metrics.write_text("[1, 2]\n", encoding="utf-8")  # not an object: replaced, with a warning
    r = domaintune("eval", str(preds), cwd=tmp_path)
    table = metrics_table(r.stdout)
    assert table["num_samples"] == 2 and table["exact_match"] == 50
    assert f"warning: {metrics} is not a JSON object; it is replaced" in r.stderr.splitlines()

    # a note (metrics.json keeps the loss of an earlier `predict` and judge's summary): stderr, and --quiet hides
    # it; the kept summary is printed as dotted names, one value a line (it was a Python dict's repr)
    judge = {"a": "base run/predictions.base.jsonl", "pairwise": {"win_rate": 0.55, "ci95": [0.4, 0.7]}}
    metrics.write_text(json.dumps({"loss": 1.5, "judge": judge}), encoding="utf-8")
    r = domaintune("eval", str(preds), cwd=tmp_path)
    table = metrics_table(r.stdout)
    assert (table["loss"], table["judge.a"], table["judge.pairwise.ci95"]) == (1.5, judge["a"], [0.4, 0.7])
    assert f"{metrics}: kept loss, judge written there earlier (by predict or eval --run)" in r.stderr
    quiet = domaintune("eval", str(preds), "--quiet", cwd=tmp_path)
    assert quiet.stdout == r.stdout and quiet.stderr == ""


def test_eval_error_is_one_line_on_stderr_even_with_quiet(tmp_path):
    r = subprocess.run([sys.executable, "-m", "domaintune", "-q", "eval", str(tmp_path / "none.jsonl")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.startswith("error: predictions file") and r.stderr.count("\n") == 1


@pytest.fixture
def run_with_bad_metrics(tiny_run_copy) -> Path:
    (tiny_run_copy / "metrics.json").write_text("[]\n", encoding="utf-8")  # replaced by predict, with a warning
    return tiny_run_copy


def test_predict_stdout_is_the_metrics_table_without_transformers_noise(run_with_bad_metrics, sample_data, tmp_path):
    """Before: `wrote PREDICTIONS (N rows)`, `wrote metrics.json` and the warning were on stdout, and stderr had
    transformers' "Loading weights" bar."""
    run = run_with_bad_metrics
    args = ("predict", str(run), "--data", str(sample_data / "test.jsonl"), "--limit", "2", "--max-new-tokens", "4",
            "--overwrite")
    r = domaintune(*args, cwd=tmp_path)
    table = metrics_table(r.stdout)
    assert table["num_samples"] == 2 and table["loss"] > 0
    err = r.stderr
    assert f"warning: {run / 'metrics.json'} is not a JSON object; it is replaced" in err
    assert f"wrote {run / 'predictions.jsonl'} (2 rows)" in err and f"wrote {run / 'metrics.json'}" in err
    # our own progress stays: plain lines, as stderr is not a terminal here (no bar redrawn with carriage returns)
    assert "predict rows: 2/2" in err and "\r" not in err
    assert "Loading weights" not in err and "FutureWarning" not in err and "Traceback" not in err

    # --quiet (after the verb): the same result; the warning alone on stderr, no notes, no progress bar
    (run / "metrics.json").write_text("[]\n", encoding="utf-8")
    quiet = domaintune(*args, "-q", cwd=tmp_path)
    assert metrics_table(quiet.stdout) == table
    assert quiet.stderr == f"warning: {run / 'metrics.json'} is not a JSON object; it is replaced\n"

    # -v (before the verb): more on stderr, transformers' own output included; stdout unchanged
    verbose = domaintune("-v", *args, cwd=tmp_path)
    assert metrics_table(verbose.stdout) == table
    assert "Loading weights" in verbose.stderr
    assert "transformers.modeling_utils: loading weights file" in verbose.stderr
    assert "domaintune " in verbose.stderr.splitlines()[0]  # the debug line naming the version


def test_export_prints_its_result_and_no_loading_bars(tiny_run, tmp_path):
    """Defect 31: "Loading weights" and "Writing model shards" (transformers' bars) leaked into export's stderr."""
    out = tmp_path / "merged"
    r = domaintune("export", str(tiny_run), "--out", str(out), cwd=tmp_path)
    assert r.stdout.startswith(f"exported {tiny_run} -> {out} (") and r.stdout.count("\n") == 1
    assert (out / "config.json").is_file()
    for noise in ("Loading weights", "Writing model shards", "FutureWarning", "%|"):
        assert noise not in r.stderr, r.stderr


def test_train_stdout_is_the_run_directory_line(tiny_train_config, tmp_path, capsys):
    """Before: the Trainer's log dicts ({'loss': ...}) and the data summary were printed on stdout with the result.
    In-process main() (stdout captured by pytest, as the redirection does in the shell)."""
    from domaintune import cli

    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(tiny_train_config(out, "qwen2", "train.max_steps=1", "train.eval_steps=1").to_yaml(),
                   encoding="utf-8")
    capsys.readouterr()  # what building the tiny model printed
    assert cli.main(["train", str(cfg)]) == 0
    printed = capsys.readouterr()
    assert printed.out == f"run directory: {out}\n"
    assert "'loss':" in printed.err and "data: " in printed.err  # the Trainer's log line and our notes: stderr
    assert "Loading weights" not in printed.err and "FutureWarning" not in printed.err
    # stderr is not a terminal here (a log file, CI): no progress bar redrawn with carriage returns, whose line
    # would be unreadable there; the Trainer's log lines are the progress
    assert "\r" not in printed.err and "it/s]" not in printed.err


def test_peft_s_offline_vocabulary_warning_is_not_shown_and_others_are(capsys):
    """Regression (issue 27): training a hub id served from the cache offline printed peft's "Could not find a
    config file in Qwen/Qwen3-0.6B - will assume that the vocabulary was not modified" twice per run. domaintune
    never resizes the vocabulary, so the assumption holds; any other warning still reaches stderr."""
    import warnings

    from domaintune import cli, console

    args = cli.build_parser().parse_args(["models"])
    with cli._output(args, console.NORMAL):
        warnings.warn("Could not find a config file in Qwen/Qwen3-0.6B - will assume that the vocabulary was not "
                      "modified.", UserWarning, stacklevel=1)
        warnings.warn("something else went wrong", UserWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert "something else went wrong" in err and "vocabulary" not in err
