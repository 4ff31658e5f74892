"""predict: rows, resumption after a kill, settings checks, formats, errors, and the scores it writes."""
from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from domaintune import cli
from domaintune.errors import UserError
from domaintune.evaluation import metrics
from domaintune.inference.engine import Engine
from domaintune.inference.params import GenerationParams
from domaintune.inference.predict import run_predict

ROW_KEYS = {"id", "input", "target", "predict", "num_tokens", "time"}
FAST = GenerationParams(max_new_tokens=6)


def _rows(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def _without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def engine(tiny_run):
    return Engine.from_run(tiny_run, device="cpu")


@pytest.fixture(scope="module")
def test_rows(sample_data) -> list[dict]:
    return [json.loads(line) for line in (sample_data / "test.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def predicted(tiny_run, sample_data, tmp_path_factory):
    """One full predict + eval of the sample test set into a folder outside the shared run."""
    out = tmp_path_factory.mktemp("predicted") / "predictions.jsonl"
    run_predict(tiny_run, sample_data / "test.jsonl", out=out, params=FAST, batch_size=4)
    return out


def test_rows_match_the_engine_and_the_contract(predicted, engine, test_rows):
    rows = _rows(predicted)
    assert [r["id"] for r in rows] == list(range(len(test_rows)))
    assert all(set(r) == ROW_KEYS for r in rows)
    assert rows[0]["input"] == f"用户:{test_rows[0]['instruction']}\n\n助手:"  # domain_zh, exactly as trained
    prompts = [engine.encode_messages([{"role": "user", "content": r["instruction"] + r["input"]}]) for r in test_rows]
    gens = engine.generate(prompts, FAST, batch_size=16)
    for row, src, prompt, gen in zip(rows, test_rows, prompts, gens, strict=True):
        assert row["target"] == src["output"]
        assert row["input"] == engine.tokenizer.decode(prompt)
        assert (row["predict"], row["num_tokens"]) == (gen.text, gen.completion_tokens)
        assert row["time"] > 0
    assert predicted.with_name("predictions.jsonl.meta.json").is_file()


def test_metrics_json_has_text_scores_and_an_independent_loss(predicted, engine, test_rows, tiny_run):
    written = json.loads(predicted.with_name("metrics.json").read_text(encoding="utf-8"))
    assert set(written) == set(metrics.SUMMARY_KEYS) | {"loss", "perplexity"}
    rows = _rows(predicted)
    summary, _ = metrics.compute_metrics([r["predict"] for r in rows], [r["target"] for r in rows])
    assert {k: written[k] for k in summary} == summary
    assert len(_rows(predicted.with_name("metrics_per_sample.jsonl"))) == len(rows)

    conversations = [[{"role": "user", "content": r["instruction"] + r["input"]},
                      {"role": "assistant", "content": r["output"]}]
                     for r in test_rows]
    loss = _independent_loss(engine, conversations, tiny_run)
    assert written["loss"] == pytest.approx(loss, abs=2e-5)
    assert written["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert 5 < written["loss"] < 9  # near ln(2048) = 7.6 for a barely trained random model


def _independent_loss(engine, conversations: list[list[dict]], run: Path) -> float:
    """Token-weighted mean loss on each conversation's last turn, from HF's own loss on one unpadded sample
    at a time: no padding, batching or predict code involved."""
    import torch
    import yaml

    cutoff = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))["data"]["cutoff_len"]
    total, count = 0.0, 0
    for msgs in conversations:
        prompt = engine.encode_messages(msgs[:-1])
        full, _ = engine.template.encode(engine.tokenizer, msgs)
        full = full[:cutoff]
        assert full[: len(prompt)] == prompt and full[-1] == engine.tokenizer.eos_token_id
        labels = [-100] * len(prompt) + full[len(prompt):]
        with torch.no_grad():
            loss = engine.model(input_ids=torch.tensor([full]), labels=torch.tensor([labels])).loss.item()
        n = len(full) - len(prompt)
        total, count = total + loss * n, count + n
    return total / count


def test_eval_run_option_gives_the_same_loss(predicted, tiny_run, sample_data, tmp_path, capsys):
    rc = cli.main(["eval", str(predicted), "--run", str(tiny_run), "--data", str(sample_data / "test.jsonl"),
                   "--out-dir", str(tmp_path)])
    assert rc == 0
    again = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    first = json.loads(predicted.with_name("metrics.json").read_text(encoding="utf-8"))
    assert again == first
    assert cli.main(["eval", str(predicted), "--run", str(tiny_run)]) == 2
    assert "--run RUN needs --data TEST" in capsys.readouterr().err


def test_messages_rows_predict_the_last_assistant_turn(tiny_run, tmp_path, engine):
    system, q1, a1, q2, a2 = ("你是家庭教育助手。", "孩子不爱吃青菜怎么办？", "可以让孩子参与做饭。",
                              "那零食呢？", "零食要定时定量。")
    data = _write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": system}, {"role": "user", "content": q1},
                      {"role": "assistant", "content": a1}, {"role": "user", "content": q2},
                      {"role": "assistant", "content": a2}]},
        {"instruction": "孩子发脾气", "input": "怎么办？", "output": "先冷静。", "history": [[q1, a1]]},
    ])
    out = run_predict(tiny_run, data, out=tmp_path / "p.jsonl", params=FAST)
    r0, r1 = _rows(out)
    eos = engine.tokenizer.eos_token
    assert r0["target"] == a2
    assert r0["input"] == f"{system}\n\n用户:{q1}\n\n助手:{a1}{eos}\n\n用户:{q2}\n\n助手:"
    assert r1["target"] == "先冷静。"
    assert r1["input"] == f"用户:{q1}\n\n助手:{a1}{eos}\n\n用户:孩子发脾气怎么办？\n\n助手:"
    # The loss covers the last turn only: the earlier answer a1 is context, as in the prediction.
    conversations = [
        [{"role": "system", "content": system}, {"role": "user", "content": q1}, {"role": "assistant", "content": a1},
         {"role": "user", "content": q2}, {"role": "assistant", "content": a2}],
        [{"role": "user", "content": q1}, {"role": "assistant", "content": a1},
         {"role": "user", "content": "孩子发脾气怎么办？"}, {"role": "assistant", "content": "先冷静。"}],
    ]
    written = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert written["loss"] == pytest.approx(_independent_loss(engine, conversations, tiny_run), abs=2e-5)


def test_the_runs_system_prompt_is_used_as_in_training(tiny_run_copy, sample_data, test_rows):
    import yaml

    cfg = yaml.safe_load((tiny_run_copy / "config.yaml").read_text(encoding="utf-8"))
    cfg["data"]["system"] = "你是家庭教育助手。"
    (tiny_run_copy / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    out = run_predict(tiny_run_copy, sample_data / "test.jsonl", params=FAST, limit=1, evaluate=False)
    assert _rows(out)[0]["input"] == f"你是家庭教育助手。\n\n用户:{test_rows[0]['instruction']}\n\n助手:"


def test_rows_without_a_target_are_predicted_but_not_scored(tiny_run, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "q.jsonl", [{"instruction": "孩子发脾气怎么办？"},
                                               {"messages": [{"role": "user", "content": "你好"}]}])
    out = run_predict(tiny_run, data, out=tmp_path / "p.jsonl", params=FAST)
    assert [(r["id"], r["target"]) for r in _rows(out)] == [(0, ""), (1, "")]
    assert "not scoring" in capsys.readouterr().err
    assert not (tmp_path / "metrics.json").exists()


def _killed_subprocess_run(run: Path, data: Path, out: Path, min_rows: int) -> int:
    cmd = [sys.executable, "-m", "domaintune", "predict", str(run), "--data", str(data), "--out", str(out),
           "--batch-size", "1", "--max-new-tokens", "48", "--no-eval"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic as this process (see conftest)
    log = out.with_name("stderr.txt")
    with open(log, "wb") as err:  # a file, not a pipe: a full pipe would stall the child
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                if out.is_file() and out.read_bytes().count(b"\n") >= min_rows:
                    break
                time.sleep(0.005)
            assert proc.poll() is None, f"predict ended before it could be killed: {log.read_text()[-2000:]}"
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait()
    return out.read_bytes().count(b"\n")


def test_sigkill_then_rerun_completes_the_file_exactly_once(tiny_run, test_rows, tmp_path):
    data = _write_jsonl(tmp_path / "test.jsonl", (test_rows * 3)[:40])
    out = tmp_path / "predictions.jsonl"
    written = _killed_subprocess_run(tiny_run, data, out, min_rows=3)
    assert 3 <= written < 40
    before = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()[:written]]
    run_predict(tiny_run, data, out=out, params=GenerationParams(max_new_tokens=48), batch_size=8, evaluate=False)
    resumed = _rows(out)  # every line parses: no torn line survives
    assert [r["id"] for r in resumed] == list(range(40))
    assert [resumed[r["id"]] for r in before] == before  # rows made before the kill were kept, not redone
    reference = run_predict(tiny_run, data, out=tmp_path / "ref.jsonl", params=GenerationParams(max_new_tokens=48),
                            batch_size=8, evaluate=False)
    assert _without_time(resumed) == _without_time(_rows(reference))


def test_torn_last_line_is_cut_and_the_rest_appended(tiny_run, sample_data, tmp_path, capsys):
    data, out = sample_data / "test.jsonl", tmp_path / "p.jsonl"
    run_predict(tiny_run, data, out=out, params=FAST, limit=3, evaluate=False)
    first = _rows(out)
    assert [r["id"] for r in first] == [0, 1, 2]
    with open(out, "ab") as f:
        f.write('{"id": 3, "input": "用户:孩'.encode()[:-1])  # cut inside a multi-byte character
    run_predict(tiny_run, data, out=out, params=FAST, limit=6, evaluate=False)
    assert "removed an incomplete last line" in capsys.readouterr().err
    rows = _rows(out)
    assert [r["id"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert rows[:3] == first  # kept as written (same "time"), not generated again
    ref = run_predict(tiny_run, data, out=tmp_path / "ref.jsonl", params=FAST, limit=6, evaluate=False)
    assert _without_time(rows) == _without_time(_rows(ref))


def test_a_full_disk_is_one_line_and_the_rerun_completes(tiny_run, sample_data, tmp_path, monkeypatch, capsys):
    """Regression: a full disk during predict was a traceback. The disk fills up while the second batch is
    written: half its last line is out, then ENOSPC (an OSError without a file name, as a flush gives)."""
    data, out = sample_data / "test.jsonl", tmp_path / "p.jsonl"
    real_fsync, synced = os.fsync, []

    def fsync(fd):
        if os.fstat(fd).st_ino == (out.stat().st_ino if out.exists() else None):
            synced.append(fd)
            if len(synced) == 2:
                os.ftruncate(fd, os.fstat(fd).st_size - 7)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    args = ["predict", str(tiny_run), "--data", str(data), "--out", str(out), "--max-new-tokens", "6",
            "--batch-size", "2", "--limit", "6", "--no-eval"]
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", fsync)
        assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == f"error: '{out}': No space left on device. Free some space (or fix the folder's " \
                                   "permissions) and run the same command again: predict keeps the rows it wrote " \
                                   "and goes on from there"
    assert out.read_bytes().count(b"\n") == 3  # the first batch, whole; the second's last line torn
    assert cli.main(args) == 0  # space again: the same command completes the file
    rows = _rows(out)
    assert [r["id"] for r in rows] == list(range(6))
    ref = run_predict(tiny_run, data, out=tmp_path / "ref.jsonl", params=FAST, batch_size=2, limit=6, evaluate=False)
    assert _without_time(rows) == _without_time(_rows(ref))


def test_different_settings_or_test_file_are_refused(tiny_run, sample_data, tmp_path, test_rows):
    data, out = _write_jsonl(tmp_path / "t.jsonl", test_rows[:2]), tmp_path / "p.jsonl"
    run_predict(tiny_run, data, out=out, params=FAST, evaluate=False)
    first = out.read_bytes()
    with pytest.raises(UserError, match=r"max_new_tokens 6 -> 7.*--overwrite"):
        run_predict(tiny_run, data, out=out, params=GenerationParams(max_new_tokens=7), evaluate=False)
    _write_jsonl(data, test_rows[1:3])
    with pytest.raises(UserError, match=r"test file .* \(content differs\).*--overwrite"):
        run_predict(tiny_run, data, out=out, params=FAST, evaluate=False)
    assert out.read_bytes() == first  # refused before touching anything
    run_predict(tiny_run, data, out=out, params=FAST, evaluate=False, overwrite=True)
    assert [r["target"] for r in _rows(out)] == [test_rows[1]["output"], test_rows[2]["output"]]
    meta = json.loads((tmp_path / "p.jsonl.meta.json").read_text(encoding="utf-8"))
    assert meta["generation"]["max_new_tokens"] == 6 and meta["data"]["path"] == str(data.resolve())
    (tmp_path / "p.jsonl.meta.json").unlink()
    with pytest.raises(UserError, match=r"has no p.jsonl.meta.json"):
        run_predict(tiny_run, data, out=out, params=FAST, evaluate=False)


def test_json_array_format(tiny_run, sample_data, tmp_path):
    out = run_predict(tiny_run, sample_data / "test.jsonl", out=tmp_path / "gen.json", params=FAST, fmt="json-array",
                      limit=4, evaluate=False)
    assert out == tmp_path / "gen.jsonl"
    arr = json.loads((tmp_path / "gen.json").read_text(encoding="utf-8"))
    assert arr == [{"input": r["input"], "predict": r["predict"], "target": r["target"]} for r in _rows(out)]
    assert len(arr) == 4
    run_predict(tiny_run, sample_data / "test.jsonl", out=tmp_path / "b.jsonl", params=FAST, fmt="json-array",
                limit=2, evaluate=False)
    assert len(json.loads((tmp_path / "b.json").read_text(encoding="utf-8"))) == 2
    with pytest.raises(UserError, match="--format json-array"):
        run_predict(tiny_run, sample_data / "test.jsonl", out=tmp_path / "c.json", params=FAST)


def test_base_only_default_paths_keep_the_run_metrics(tiny_run_copy, sample_data, test_rows):
    run = tiny_run_copy
    base = run_predict(run, sample_data / "test.jsonl", params=FAST, base_only=True, limit=4)
    assert base == run / "predictions.base.jsonl"
    assert (run / "base" / "metrics.json").is_file() and not (run / "metrics.json").exists()
    tuned = run_predict(run, sample_data / "test.jsonl", params=FAST, limit=4)
    assert tuned == run / "predictions.jsonl"
    base_loss = json.loads((run / "base" / "metrics.json").read_text(encoding="utf-8"))["loss"]
    tuned_loss = json.loads((run / "metrics.json").read_text(encoding="utf-8"))["loss"]
    assert base_loss != tuned_loss  # the adapter was really left out
    engine = Engine.from_run(run, base_only=True, device="cpu")
    prompts = [engine.encode_messages([{"role": "user", "content": r["instruction"]}]) for r in test_rows[:4]]
    assert [r["predict"] for r in _rows(base)] == [g.text for g in engine.generate(prompts, FAST)]


def test_malformed_test_line_is_named(tiny_run, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n{"instruction": "e", \n',
                    encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl line 3: not valid JSON"):
        run_predict(tiny_run, data, out=tmp_path / "p.jsonl")
    data.write_text('{"instruction": "a"}\n{"output": "d"}\n', encoding="utf-8")
    rc = cli.main(["predict", str(tiny_run), "--data", str(data), "--out", str(tmp_path / "p.jsonl")])
    assert rc == 2
    assert 'bad.jsonl line 2: missing "instruction"' in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists()


def test_empty_test_file_and_run_without_weights(tiny_run, sample_data, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"empty.jsonl: the file is empty"):
        run_predict(tiny_run, empty, out=tmp_path / "p.jsonl")
    bare = tmp_path / "run"
    bare.mkdir()
    for name in ("config.yaml", "template.json"):
        (bare / name).write_bytes((tiny_run / name).read_bytes())
    with pytest.raises(UserError, match=r"has no final weights .*Did training finish\?"):
        run_predict(bare, sample_data / "test.jsonl")
    assert not list(bare.glob("predictions*"))
    with pytest.raises(UserError, match="is not a directory"):
        run_predict(tmp_path / "nope", sample_data / "test.jsonl")
    with pytest.raises(UserError, match="--batch-size must be at least 1"):
        run_predict(tiny_run, sample_data / "test.jsonl", batch_size=0)
    with pytest.raises(UserError, match=r"^max_new_tokens must be at least 1, got 0$"):  # GenerationParams.validate
        run_predict(tiny_run, sample_data / "test.jsonl", params=GenerationParams(max_new_tokens=0))
    with pytest.raises(UserError, match=r"^top_p must lie in \(0, 1\], got 0$"):
        run_predict(tiny_run, sample_data / "test.jsonl", params=GenerationParams(top_p=0))


def test_cli_options_state_their_defaults():
    import argparse

    parser = argparse.ArgumentParser()
    from domaintune.cli import inference

    inference.register(parser.add_subparsers())
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["predict"]
    opts = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in opts} >= {"data", "out", "batch_size", "max_new_tokens", "num_beams", "do_sample",
                                      "temperature", "top_p", "top_k", "repetition_penalty", "seed", "base_only",
                                      "template", "format", "no_eval", "overwrite", "limit"}
    assert [a.dest for a in opts if "default" not in a.help and a.dest != "data"] == []
    args = parser.parse_args(["predict", "RUN", "--data", "t.jsonl"])
    assert (args.batch_size, args.max_new_tokens, args.format, args.limit) == (8, 256, "jsonl", None)


def test_eval_after_predict_keeps_the_loss_predict_wrote(tiny_run_copy, sample_data, capsys):
    """Regression (issue 9, defect 1): `eval RUN/predictions.jsonl` rewrote metrics.json without the loss and
    perplexity that predict had written, and report.md then lacked them."""
    from domaintune.evaluation.report import run_report

    run = tiny_run_copy
    preds = run_predict(run, sample_data / "test.jsonl", params=FAST, limit=4)
    by_predict = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert {"loss", "perplexity", "rouge-l"} <= set(by_predict)
    capsys.readouterr()
    assert cli.main(["eval", str(preds)]) == 0
    printed = capsys.readouterr()
    assert f"{run / 'metrics.json'}: kept loss, perplexity written there earlier" in printed.err
    assert {"loss", "perplexity"} <= {line.split()[0] for line in printed.out.splitlines()}  # the table shows them
    after = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert after == by_predict  # same predictions: same text scores, and nothing dropped
    report = run_report(run).read_text(encoding="utf-8")
    assert f"| loss | {by_predict['loss']:,.6g} |" in report and "| perplexity |" in report


def test_eval_replaces_a_metrics_file_that_is_not_json(tmp_path, capsys):
    preds = _write_jsonl(tmp_path / "predictions.jsonl", [{"id": 0, "input": "q", "target": "同样", "predict": "同样"}])
    (tmp_path / "metrics.json").write_text("{not json", encoding="utf-8")
    assert cli.main(["eval", str(preds)]) == 0
    assert "could not be read (JSONDecodeError); it is replaced" in capsys.readouterr().err
    assert json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))["exact_match"] == 100.0
