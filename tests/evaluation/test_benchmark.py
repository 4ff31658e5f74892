"""eval --benchmark: lm-eval's multiple-choice accuracy of a run's base model and of the run, offline.

The numbers are checked against lm-eval called directly on models loaded independently (the base alone, and base +
adapter), and against choices scored by hand (sum of the log-probabilities of each choice's tokens after the
prompt), so a wrong wiring (adapter not switched off, base and tuned swapped, the wrong text scored) fails."""
from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from domaintune import cli
from domaintune.errors import UserError
from domaintune.evaluation import benchmark
from domaintune.inference.benchmark import run_benchmark

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "examples" / "benchmarks"


@pytest.fixture
def offline(monkeypatch):
    """Any hub access fails: the offline switches are on and no socket may connect."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _rows(task: str) -> list[dict]:
    path = SHIPPED / task / f"{task}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _lm_eval_directly(model, tok, task: str, monkeypatch, limit: int | None = None) -> dict:
    """lm-eval's own scores for a shipped task, loaded the way lm-eval loads a task folder (its relative data_files
    read from the current folder, so the test runs there)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(SHIPPED / task)
    tm = TaskManager(include_path=[str(SHIPPED / task)], include_defaults=False)
    out = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=8), tasks=[task], task_manager=tm,
                          limit=limit)
    return out["results"][task]


def _by_hand(model, tok, rows: list[dict]) -> tuple[float, float, list[list[float]]]:
    """(acc, acc_norm, log-likelihood of every choice): each choice scored as the sum of the log-probabilities of its
    tokens after the prompt `问题：{question}\\n答案：` (the shipped YAML's doc_to_text, no delimiter)."""
    import torch

    hits = hits_norm = 0
    all_ll = []
    for row in rows:
        prompt = f"问题：{row['question']}\n答案："
        ctx = tok.encode(prompt)
        lls = []
        for choice in row["choices"]:
            whole = tok.encode(prompt + choice)
            assert whole[:len(ctx)] == ctx  # the prompt's tokens do not merge with the choice's
            with torch.no_grad():
                logits = model(torch.tensor([whole[:-1]])).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            lls.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
        norm = [ll / len(c) for ll, c in zip(lls, row["choices"], strict=True)]  # lm-eval: length in characters
        hits += max(range(4), key=lambda i: lls[i]) == row["answer"]
        hits_norm += max(range(4), key=lambda i: norm[i]) == row["answer"]
        all_ll.append(lls)
    return hits / len(rows), hits_norm / len(rows), all_ll


def _read(run: Path) -> dict:
    return json.loads((run / "benchmark.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- the shipped task files

@pytest.mark.parametrize("task", ["zh_general_mc", "en_general_mc"])
def test_shipped_task_files_are_well_formed(task):
    import yaml

    rows = _rows(task)
    assert len(rows) >= 30
    for row in rows:
        assert set(row) == {"id", "category", "question", "choices", "answer"}, row
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4, row
        assert all(isinstance(c, str) and c.strip() for c in row["choices"]), row
        assert isinstance(row["answer"], int) and 0 <= row["answer"] < 4, row
    assert len({r["question"] for r in rows}) == len(rows), "duplicate questions"
    assert len({r["id"] for r in rows}) == len(rows), "duplicate ids"
    assert len({r["category"] for r in rows}) == 5
    # Every answer position is used, so a model that always picks one position cannot score well.
    assert {r["answer"] for r in rows} == {0, 1, 2, 3}
    cfg = yaml.safe_load((SHIPPED / task / f"{task}.yaml").read_text(encoding="utf-8"))
    assert cfg["task"] == task and cfg["dataset_path"] == "json" and cfg["test_split"] == "test"
    assert (SHIPPED / task / cfg["dataset_kwargs"]["data_files"]["test"]).is_file()  # relative to the YAML
    assert [m["metric"] for m in cfg["metric_list"]] == ["acc", "acc_norm"]


def test_shipped_tasks_are_found_through_the_package():
    found = benchmark.shipped_tasks()
    assert set(found) == {"zh_general_mc", "en_general_mc"}
    assert found["zh_general_mc"].resolve() == (SHIPPED / "zh_general_mc" / "zh_general_mc.yaml").resolve()


# ---------------------------------------------------------------- scores

def test_benchmark_matches_lm_eval_called_directly(tiny_run_copy, offline, monkeypatch, capsys):
    from domaintune.inference.loading import load_run

    run = tiny_run_copy
    monkeypatch.chdir(run.parent)  # not the task's folder: its data file is found relative to the YAML
    assert cli.main(["eval", "--benchmark", "zh_general_mc", "--run", str(run), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    got = _read(run)
    assert got["n"] == {"zh_general_mc": 40} and got["limit"] is None and got["lm_eval_version"]
    scores = got["tasks"]["zh_general_mc"]
    assert scores["n"] == 40

    base = load_run(run, base_only=True, device="cpu")  # the base alone, not the adapter switched off
    expected_base = _lm_eval_directly(base.model, base.tokenizer, "zh_general_mc", monkeypatch)
    tuned = load_run(run, device="cpu")
    expected_tuned = _lm_eval_directly(tuned.model, tuned.tokenizer, "zh_general_mc", monkeypatch)
    for side, expected in (("base", expected_base), ("tuned", expected_tuned)):
        for metric in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
            assert scores[side][metric] == expected[f"{metric},none"], (side, metric)
        assert 0 <= scores[side]["acc"] <= 1
        assert scores[side]["acc"] * 40 == pytest.approx(round(scores[side]["acc"] * 40))  # a count of items
    assert scores["delta"] == {"acc": scores["tuned"]["acc"] - scores["base"]["acc"],
                               "acc_norm": scores["tuned"]["acc_norm"] - scores["base"]["acc_norm"]}
    table = [line.split() for line in out.splitlines()]
    assert ["task", "n", "metric", "base", "tuned", "delta"] in table
    assert ["zh_general_mc", "40", "acc", f"{scores['base']['acc']:.4f}", f"{scores['tuned']['acc']:.4f}",
            f"{scores['delta']['acc']:+.4f}"] in table
    # The run's report.md is rewritten with the table (issue 22, 27), without `domaintune report`.
    md = (run / "report.md").read_text(encoding="utf-8")
    assert "no benchmark yet" not in md
    base_pct, tuned_pct = 100 * scores["base"]["acc"], 100 * scores["tuned"]["acc"]
    assert f"| zh_general_mc | 40 | acc | {base_pct:.1f}% | {tuned_pct:.1f}% |" in md


def test_limit_scores_the_first_items_as_scored_by_hand_and_metrics_json_keeps_other_keys(tiny_run_copy, offline):
    from domaintune.inference.loading import load_run

    run = tiny_run_copy
    (run / "metrics.json").write_text(json.dumps({"bleu-4": 12.5, "loss": 3.25}), encoding="utf-8")
    got = run_benchmark(run, ["zh_general_mc"], limit=8, batch_size=3, device="cpu")
    assert got == _read(run)
    scores = got["tasks"]["zh_general_mc"]
    assert got["limit"] == 8 and scores["n"] == 8 and got["n"] == {"zh_general_mc": 8}

    rows = _rows("zh_general_mc")[:8]
    base = load_run(run, base_only=True, device="cpu")
    acc, acc_norm, base_ll = _by_hand(base.model, base.tokenizer, rows)
    assert (scores["base"]["acc"], scores["base"]["acc_norm"]) == (acc, acc_norm)
    tuned = load_run(run, device="cpu")
    acc, acc_norm, tuned_ll = _by_hand(tuned.model, tuned.tokenizer, rows)
    assert (scores["tuned"]["acc"], scores["tuned"]["acc_norm"]) == (acc, acc_norm)
    # The adapter changes what is scored (else comparing base and tuned would prove nothing).
    assert max(abs(b - t) for bs, ts in zip(base_ll, tuned_ll, strict=True) for b, t in zip(bs, ts, strict=True)) > 0.1

    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["bleu-4"] == 12.5 and metrics["loss"] == 3.25
    summary = metrics["benchmark"]["tasks"]["zh_general_mc"]
    assert summary == {"base": {"acc": scores["base"]["acc"], "acc_norm": scores["base"]["acc_norm"]},
                       "tuned": {"acc": scores["tuned"]["acc"], "acc_norm": scores["tuned"]["acc_norm"]},
                       "delta": scores["delta"], "n": 8}
    assert metrics["benchmark"]["limit"] == 8

    # report.md shows base, tuned and the delta of each metric (the "Base vs fine-tuned" section).
    from domaintune.evaluation.report import run_report

    section = run_report(run).read_text(encoding="utf-8").split("### Benchmarks (did it forget?)", 1)[1]
    for metric in ("acc", "acc_norm"):
        b, t, d = scores["base"][metric], scores["tuned"][metric], scores["delta"][metric]
        assert f"| zh_general_mc | 8 | {metric} | {100 * b:.1f}% | {100 * t:.1f}% | {100 * d:+.1f} points |" in section
    assert ", --limit 8;" in section


def test_full_finetune_is_compared_with_its_base_on_a_task_folder_of_ones_own(tiny_train_config, tiny_run,
                                                                                  tmp_path, offline, monkeypatch):
    """A full fine-tune (no adapter) against the base model its config names; a task given as a folder path, its
    data file relative to its YAML, run from another folder."""
    from domaintune.training.trainer import run_train

    full = Path(run_train(tiny_train_config(tmp_path / "full", "qwen2", "lora.enabled=false", "train.max_steps=2",
                                            "train.eval_steps=2", "train.save_steps=2")))
    task_dir = tmp_path / "tasks" / "mine"
    task_dir.mkdir(parents=True)
    rows = _rows("zh_general_mc")[:5]
    (task_dir / "mine.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                         encoding="utf-8")
    yaml_text = (SHIPPED / "zh_general_mc" / "zh_general_mc.yaml").read_text(encoding="utf-8")
    (task_dir / "mine.yaml").write_text(yaml_text.replace("zh_general_mc", "mine"), encoding="utf-8")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")

    got = run_benchmark(full, [str(task_dir)], device="cpu")
    assert got["n"] == {"mine": 5}
    # The base model of the full run is the tiny model the LoRA run was trained on: the same base scores.
    adapter_run = run_benchmark(shutil.copytree(tiny_run, tmp_path / "lora"),
                                          [str(task_dir / "mine.yaml")], device="cpu")
    assert got["tasks"]["mine"]["base"] == adapter_run["tasks"]["mine"]["base"]
    from domaintune.inference.loading import load_run

    tuned = load_run(full, device="cpu")
    acc, acc_norm, _ = _by_hand(tuned.model, tuned.tokenizer, rows)
    assert (got["tasks"]["mine"]["tuned"]["acc"], got["tasks"]["mine"]["tuned"]["acc_norm"]) == (acc, acc_norm)


# ---------------------------------------------------------------- errors

def test_unknown_task_names_the_shipped_tasks(tiny_run_copy, offline, capsys):
    assert cli.main(["eval", "--benchmark", "zh_general_mcq", "--run", str(tiny_run_copy)]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark task 'zh_general_mcq'" in err
    assert "zh_general_mc, en_general_mc" in err or "en_general_mc, zh_general_mc" in err
    assert "path of its YAML" in err
    assert not (tiny_run_copy / "benchmark.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--limit", "0"], "--limit 0: give a positive number"),
    (["--limit", "-3"], "--limit -3: give a positive number"),
    (["--benchmark-batch-size", "0"], "give a positive batch size"),
])
def test_bad_numbers_are_refused(tiny_run_copy, argv, message, capsys):
    assert cli.main(["eval", "--benchmark", "zh_general_mc", "--run", str(tiny_run_copy), *argv]) == 2
    assert message in capsys.readouterr().err


def test_benchmark_needs_a_run_and_runs_alone(tiny_run_copy, tmp_path, capsys):
    assert cli.main(["eval", "--benchmark", "zh_general_mc"]) == 2
    assert "--benchmark needs --run RUN" in capsys.readouterr().err
    assert cli.main(["eval", str(tmp_path / "p.jsonl"), "--benchmark", "zh_general_mc", "--run",
                     str(tiny_run_copy)]) == 2
    assert "--benchmark runs on its own" in capsys.readouterr().err
    assert cli.main(["eval", str(tmp_path / "p.jsonl"), "--limit", "3"]) == 2
    assert "used with --benchmark" in capsys.readouterr().err


def test_not_a_run_or_a_model_without_base_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="has no final weights"):
        run_benchmark(tmp_path, ["zh_general_mc"])
    with pytest.raises(UserError, match="no base model to compare it with"):
        run_benchmark(tiny_model_dir("qwen2"), ["zh_general_mc"])


def test_a_file_that_is_not_a_task_yaml_is_refused(tiny_run_copy, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello", encoding="utf-8")
    with pytest.raises(UserError, match="not a task YAML"):
        run_benchmark(tiny_run_copy, [str(bad)])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds no task YAML"):
        run_benchmark(tiny_run_copy, [str(empty)])


def test_a_task_whose_data_is_missing_fails_before_a_model_is_loaded(tiny_run_copy, tmp_path, offline, monkeypatch):
    import domaintune.inference.loading as loading

    text = (SHIPPED / "zh_general_mc" / "zh_general_mc.yaml").read_text(encoding="utf-8")
    (tmp_path / "broken.yaml").write_text(text.replace("test: zh_general_mc.jsonl", "test: gone.jsonl")
                                          .replace("task: zh_general_mc", "task: broken"), encoding="utf-8")

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded for a task that cannot run")

    monkeypatch.setattr(loading, "load_run", no_load)
    with pytest.raises(UserError, match="lm-eval could not load them"):
        run_benchmark(tiny_run_copy, [str(tmp_path / "broken.yaml")])


def test_without_lm_eval_the_error_names_the_extra(tiny_run_copy, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'domaintune\[bench\]'"):
        run_benchmark(tiny_run_copy, ["zh_general_mc"])
