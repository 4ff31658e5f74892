"""report: a hand-built run directory gives a report with the right numbers, plot and examples."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import yaml

from domaintune.cli import evaluate
from domaintune.errors import UserError
from domaintune.evaluation import report

CONFIG_YAML = """\
model:
  name_or_path: Qwen/Qwen2.5-0.5B-Instruct
lora:
  r: 8
  alpha: 16
  dropout: 0.05
  target_modules: [q_proj, v_proj]
data:
  path: examples/data/train.jsonl
  template: qwen
  cutoff_len: 1024
train:
  learning_rate: 0.0002
  num_epochs: 3
  batch_size: 8
  per_device_batch_size: 4
  gradient_accumulation_steps: 2
"""

RUN_INFO = {
    "base_model": "Qwen/Qwen2.5-0.5B-Instruct", "license": "apache-2.0", "method": "lora", "template": "qwen",
    "domaintune_version": "0.1.0",
    "data": {"path": "examples/data/train.jsonl", "train_rows": 180, "eval_rows": 20,
             "overlength": {"policy": "truncate", "count": 3},
             "token_lengths": {"min": 12, "mean": 87.5, "median": 80, "p95": 190, "max": 412}},
    "train": {"runtime_s": 3723.4, "global_steps": 68, "tokens": 4596519, "tokens_per_second": 1234.5,
              "final_loss": 0.8123, "best_eval_loss": 0.9456},
}

# id -> (rouge-l, bleu-4); predictions.jsonl is written in another order so the join by id matters.
SCORES = {0: (12.5, 5.0), 1: (95.0, 90.0), 2: (40.0, 30.0), 3: (0.0, 0.0), 4: (77.7, 60.0), 5: (60.0, 50.0),
          6: (3.25, 1.0), 7: (50.0, 45.0)}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _log():
    recs = [{"step": s, "epoch": s / 68 * 3, "loss": 2.0 - s * 0.02, "learning_rate": 2e-4, "grad_norm": 1.0,
             "tokens": 67596 * s, "time": 54.76 * s} for s in range(1, 69)]
    recs.insert(40, {"step": 40, "epoch": 1.76, "eval_loss": 0.9456, "time": 2200.0})
    return recs


def _full_run(tmp_path):
    run = tmp_path / "qwen-医疗-lora"
    run.mkdir()
    (run / "config.yaml").write_text(CONFIG_YAML, encoding="utf-8")
    (run / "run_info.json").write_text(json.dumps(RUN_INFO), encoding="utf-8")
    _write_jsonl(run / "log.jsonl", _log())
    preds = [{"id": i, "input": f"问题 {i}：高血压要注意什么？", "target": f"标准答案{i}", "predict": f"模型回答{i}",
              "num_tokens": 10 + i, "time": 0.5} for i in sorted(SCORES, reverse=True)]
    _write_jsonl(run / "predictions.jsonl", preds)
    _write_jsonl(run / "metrics_per_sample.jsonl",
                 [{"id": i, "bleu-4": b, "rouge-1": r, "rouge-2": r, "rouge-l": r, "exact_match": 0.0}
                  for i, (r, b) in SCORES.items()])
    metrics = {"num_samples": 8, "bleu-4": 35.125, "corpus_bleu": 28.4, "rouge-1": 42.3, "rouge-2": 30.1,
               "rouge-l": 42.3063, "exact_match": 0.0, "avg_predict_len": 5.0, "perplexity": 2.5742}
    (run / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    return run


def _example_ids(md, heading):
    return [int(m) for m in re.findall(rf"^### {heading} \d: id (\d+) ", md, flags=re.MULTILINE)]


def test_full_report(tmp_path):
    run = _full_run(tmp_path)
    out = report.run_report(run)
    assert out == run / "report.md"
    md = out.read_text(encoding="utf-8")
    assert md.startswith("# Run report: qwen-医疗-lora\n")
    for row in ("| base model | Qwen/Qwen2.5-0.5B-Instruct |", "| method | lora |", "| LoRA r | 8 |",
                "| LoRA alpha | 16 |", "| LoRA target modules | q_proj, v_proj |", "| learning rate | 0.0002 |",
                "| epochs | 3 |", "| batch size per device | 4 |", "| gradient accumulation | 2 |",
                "| cutoff_len | 1,024 |", "| template | qwen |"):
        assert row in md, row
    assert "license: apache-2.0" in md
    # data statistics
    assert "| train_rows | 180 |" in md and "| eval_rows | 20 |" in md
    assert "| over cutoff_len | 3 rows (truncate) |" in md
    assert "| tokens per row (min / mean / median / p95 / max) | 12 / 87.5 / 80 / 190 / 412 |" in md
    # training time and throughput
    assert "| runtime | 1h 02m 03s (3723.4 s) |" in md
    assert "| throughput (tokens/s) | 1,234.5 |" in md
    assert "| tokens seen | 4,596,519 |" in md
    assert "| final train loss | 0.8123 |" in md and "| best eval loss | 0.9456 |" in md
    # plot made from log.jsonl and referenced
    assert "![loss](loss.png)" in md
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # metrics
    assert "| rouge-l | 42.3063 |" in md and "| corpus_bleu | 28.4 |" in md and "| perplexity | 2.5742 |" in md
    assert md.index("| num_samples |") < md.index("| bleu-4 |") < md.index("| perplexity |")
    # best/worst by rouge-l, joined with predictions by id
    assert _example_ids(md, "Best") == [1, 4, 5]
    assert _example_ids(md, "Worst") == [3, 6, 0]
    best1 = md[md.index("### Best 1"):md.index("### Best 2")]
    assert "问题 1：高血压要注意什么？" in best1 and "标准答案1" in best1 and "模型回答1" in best1
    assert "rouge-l 95, bleu-4 90" in best1
    assert "no predictions yet" not in md and "no metrics yet" not in md


def test_few_rows_do_not_repeat_examples(tmp_path):
    run = _full_run(tmp_path)
    _write_jsonl(run / "metrics_per_sample.jsonl", [{"id": 2, "rouge-l": 40.0, "bleu-4": 1.0},
                                                    {"id": 5, "rouge-l": 60.0, "bleu-4": 1.0},
                                                    {"id": 7, "rouge-l": 50.0, "bleu-4": 1.0},
                                                    {"id": 0, "rouge-l": 10.0, "bleu-4": 1.0}])
    md = report.run_report(run).read_text(encoding="utf-8")
    assert _example_ids(md, "Best") == [5, 7, 2]
    assert _example_ids(md, "Worst") == [0]


def test_missing_inputs_say_what_to_run(tmp_path):
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "config.yaml").write_text(CONFIG_YAML.replace("lora:\n", "lora:\n  enabled: false\n"), encoding="utf-8")
    md = report.run_report(run).read_text(encoding="utf-8")
    assert f"no predictions yet: run `domaintune predict {run} --data test.jsonl`" in md
    assert "no data statistics" in md and "no training summary yet" in md
    assert "no log.jsonl yet" in md and "![loss]" not in md
    assert "| LoRA r |" not in md and "| method | full |" in md  # full fine-tuning: no LoRA rows
    # predictions but no eval yet
    _write_jsonl(run / "predictions.jsonl", [{"id": 0, "input": "q", "target": "a", "predict": "a"}])
    md = report.run_report(run).read_text(encoding="utf-8")
    assert f"no metrics yet: run `domaintune eval {run / 'predictions.jsonl'}`" in md
    assert "no per-sample scores yet" in md
    # without config.yaml either
    (run / "config.yaml").unlink()
    assert "no config.yaml" in report.run_report(run).read_text(encoding="utf-8")
    with pytest.raises(UserError, match="not found"):
        report.run_report(tmp_path / "nope")


def test_unfinished_run_uses_log_and_out_elsewhere(tmp_path):
    run = _full_run(tmp_path)
    info = dict(RUN_INFO)
    del info["train"]
    (run / "run_info.json").write_text(json.dumps(info), encoding="utf-8")
    out = report.run_report(run, out=tmp_path / "reports" / "r.md")
    md = out.read_text(encoding="utf-8")
    assert "run may not have finished" in md
    assert "| last logged step | 68 |" in md
    assert "| throughput (tokens/s) | 1,234.4 |" in md  # 67596 tokens / 54.76 s per step
    assert "| best eval loss | 0.9456 |" in md
    assert "![loss](../qwen-医疗-lora/loss.png)" in md and (run / "loss.png").is_file()
    assert not (run / "report.md").exists()


def test_cli_report(tmp_path, capsys):
    run = _full_run(tmp_path)
    parser = argparse.ArgumentParser()
    evaluate.register(parser.add_subparsers())
    args = parser.parse_args(["report", str(run)])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run / 'report.md'}"


def test_a_bad_log_line_is_named_and_the_report_still_written(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\nbad\n{"step": 2, "loss": 1.0}\n', encoding="utf-8")
    md = report.run_report(run).read_text(encoding="utf-8")
    assert f"no plot: {run / 'log.jsonl'} line 2: not valid JSON (Expecting value); fix or delete that line" in md


def test_the_data_section_names_the_rows_training_changed(tmp_path):
    run = _full_run(tmp_path)
    info = json.loads((run / "run_info.json").read_text(encoding="utf-8"))
    info["data"].update({"dropped_no_target": 1, "overlength_rows": ["d.jsonl line 7: 900 tokens"],
                         "dropped_no_target_rows": ["d.jsonl line 9"],
                         "notes": ["validation split: 2 rows, not the 8 asked for by data.val_size=8"]})
    (run / "run_info.json").write_text(json.dumps(info), encoding="utf-8")
    md = report.run_report(run).read_text(encoding="utf-8")
    data = md.split("## Data", 1)[1].split("\n## ", 1)[0]
    assert "| dropped with nothing to train on | 1 |" in data
    assert "Rows over cutoff_len:\n\n- d.jsonl line 7: 900 tokens" in data
    assert "Rows dropped with nothing to train on:\n\n- d.jsonl line 9" in data
    assert "Notes:\n\n- validation split: 2 rows, not the 8 asked for by data.val_size=8" in data


def test_the_config_dump_leaves_out_sections_of_other_verbs_at_their_defaults(tmp_path):
    from domaintune.config import Config

    run = _full_run(tmp_path)
    defaults = yaml.safe_dump({"selfinstruct": Config().to_dict()["selfinstruct"]}, allow_unicode=True)
    with_defaults = CONFIG_YAML.rstrip("\n") + "\n" + defaults
    (run / "config.yaml").write_text(with_defaults, encoding="utf-8")
    md = report.run_report(run).read_text(encoding="utf-8")
    assert "selfinstruct" not in md and "learning_rate" in md
    (run / "config.yaml").write_text(CONFIG_YAML + "selfinstruct:\n  domain: 医疗\n", encoding="utf-8")
    assert "selfinstruct:\n  domain: 医疗" in report.run_report(run).read_text(encoding="utf-8")  # set: shown


# ---------------------------------------------------------------- kept up to date by the verbs (issue 22, 27)

def _section(md: str, title: str) -> str:
    return md.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_eval_of_a_runs_predictions_refreshes_the_report_and_base_scores_go_beside(tmp_path, capsys):
    """`eval RUN/predictions.jsonl` and `eval RUN/predictions.base.jsonl` rewrite RUN/report.md; the base model's
    scores go to RUN/base/metrics.json (never over the fine-tuned ones) and the report shows both side by side."""
    from domaintune import cli

    run = _full_run(tmp_path)
    report.run_report(run)
    preds = [json.loads(line) for line in (run / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    _write_jsonl(run / "predictions.jsonl", [dict(p, predict=p["target"]) for p in preds])  # every answer right
    _write_jsonl(run / "predictions.base.jsonl", preds)
    assert cli.main(["eval", str(run / "predictions.jsonl")]) == 0
    assert f"updated {run / 'report.md'}" in capsys.readouterr().err
    tuned = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    md = (run / "report.md").read_text(encoding="utf-8")
    assert tuned["exact_match"] == 100.0 and "| exact_match | 100 |" in _section(md, "Metrics")
    assert "No base-model scores to compare with yet" in md

    assert cli.main(["eval", str(run / "predictions.base.jsonl")]) == 0
    base = json.loads((run / "base" / "metrics.json").read_text(encoding="utf-8"))
    assert json.loads((run / "metrics.json").read_text(encoding="utf-8")) == tuned  # not replaced by the base's
    metrics = _section((run / "report.md").read_text(encoding="utf-8"), "Metrics")
    assert "| metric | base | fine-tuned | change |" in metrics
    for key in ("bleu-4", "rouge-1", "rouge-l", "exact_match"):
        change = f"{round(tuned[key] - base[key], 4):+,.6g}"
        assert f"| {key} | {report._fmt(base[key])} | {report._fmt(tuned[key])} | {change} |" in metrics, key
    assert "| exact_match | 0 | 100 | +100 |" in metrics


def test_predictions_written_outside_the_run_leave_its_report_alone(tiny_run_copy, tmp_path):
    """predict --out elsewhere changes nothing in the run directory (it wrote a report.md into the shared test run,
    found when the suite ran in another order)."""
    from domaintune.inference.params import GenerationParams
    from domaintune.inference.predict import run_predict

    run, test = tiny_run_copy, Path(__file__).parents[2] / "examples" / "data" / "test.jsonl"
    before = sorted(p.name for p in run.iterdir())
    assert "report.md" not in before
    run_predict(run, test, out=tmp_path / "elsewhere" / "p.jsonl", params=GenerationParams(max_new_tokens=4), limit=2)
    assert sorted(p.name for p in run.iterdir()) == before
    run_predict(run, test, params=GenerationParams(max_new_tokens=4), limit=2)  # into the run: the report follows
    assert (run / "report.md").is_file()


def test_predict_and_judge_refresh_the_report(tiny_run_copy, monkeypatch, capsys):
    """After predict --base-only, predict and judge, report.md shows both models' scores and the verdicts
    without `domaintune report` being run."""
    from domaintune.config import JudgeConfig
    from domaintune.evaluation.judge import run_judge
    from domaintune.inference.params import GenerationParams
    from domaintune.inference.predict import run_predict
    from fake_llm_server import FakeLLM

    run, test = tiny_run_copy, Path(__file__).parents[2] / "examples" / "data" / "test.jsonl"
    assert (run / "run_info.json").is_file() and not (run / "report.md").exists()
    params = GenerationParams(max_new_tokens=8)
    run_predict(run, test, base_only=True, limit=3, params=params)
    md = (run / "report.md").read_text(encoding="utf-8")
    assert "no predictions yet" in _section(md, "Metrics")  # the base model's answers alone are not the run's
    run_predict(run, test, limit=3, params=params)
    md = (run / "report.md").read_text(encoding="utf-8")
    base = json.loads((run / "base" / "metrics.json").read_text(encoding="utf-8"))
    tuned = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert f"| perplexity | {report._fmt(base['perplexity'])} | {report._fmt(tuned['perplexity'])} |" in md
    assert "not judged yet" in md

    monkeypatch.setenv("DT_REPORT_TEST_KEY", "k")
    with FakeLLM(reply_fn=lambda prompt: "B is better.\nVERDICT: B") as srv:
        cfg = JudgeConfig(base_url=srv.base_url, model="m", api_key_env="DT_REPORT_TEST_KEY", language="en",
                          max_retries=0, retry_base_delay=0.0, bootstrap_samples=50)
        run_judge(cfg, run / "predictions.base.jsonl", run / "predictions.jsonl")
    judged = _section((run / "report.md").read_text(encoding="utf-8"), "Base vs fine-tuned")
    assert "not judged yet" not in judged
    assert "| fine-tuned wins / ties / losses | 0 / 3 / 0 |" in judged  # "B" in both orders: a tie each row
    assert f"updated {run / 'report.md'}" in capsys.readouterr().err


def test_a_folder_that_is_not_a_run_gets_no_report(tmp_path):
    (tmp_path / "model").mkdir()
    assert report.refresh_report(tmp_path / "model") is None
    assert not (tmp_path / "model" / "report.md").exists()
    run = _full_run(tmp_path)
    (run / "base").mkdir()
    assert report.refresh_report(run / "base") == run / "report.md"  # base/ scores belong to the run


def test_the_data_section_lists_each_source(tmp_path):
    run = _full_run(tmp_path)
    info = json.loads((run / "run_info.json").read_text(encoding="utf-8"))
    info["data"].update({"prepared": "from the cache, nothing read or tokenised: /c/1f", "sources": [
        {"name": "a.jsonl", "amount": "weight 2", "read": 100, "dropped": {"duplicate": 3}, "kept": 97,
         "sampled": 97, "validation": 9, "train_samples": 88, "tokens": 12345},
        {"name": "b.parquet", "amount": "500 rows", "read": 40, "dropped": {}, "kept": 40, "sampled": 500,
         "validation": 0, "train_samples": None, "tokens": None}]})
    (run / "run_info.json").write_text(json.dumps(info), encoding="utf-8")
    md = report.run_report(run).read_text(encoding="utf-8")
    data = md.split("## Data", 1)[1].split("\n## ", 1)[0]
    assert "| prepared | from the cache, nothing read or tokenised: /c/1f |" in data
    assert ("| source | amount | read | dropped | sampled | validation | training samples | tokens |\n"
            "|---|---|---|---|---|---|---|---|\n"
            "| a.jsonl | weight 2 | 100 | 3 duplicate | 97 | 9 | 88 | 12,345 |\n"
            "| b.parquet | 500 rows | 40 | - | 500 | 0 | - | - |") in data
