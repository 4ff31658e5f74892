"""Metrics: values checked against the libraries called directly, plus files and error messages."""
from __future__ import annotations

import argparse
import json
import logging

import pytest

from domaintune.cli import evaluate
from domaintune.errors import UserError
from domaintune.evaluation import metrics

ZH_TARGET = "低秩适配在冻结的权重旁加入两个小矩阵，只训练这两个矩阵。"
ZH_PREDICT = "低秩适配冻结原始权重，只训练新加入的两个小矩阵。"
EN_TARGET = "LoRA freezes the base weights and trains two small matrices."
EN_PREDICT = "LoRA trains two small matrices while the base weights stay frozen."


def _nltk_bleu(predict: str, target: str) -> float:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    return sentence_bleu([list(target)], list(predict), smoothing_function=SmoothingFunction().method3) * 100


def test_detect_lang():
    assert metrics.detect_lang(ZH_TARGET) == "zh"
    assert metrics.detect_lang(EN_TARGET) == "en"
    assert metrics.detect_lang("用 LoRA 微调模型") == "zh"  # mixed text: CJK characters dominate
    assert metrics.detect_lang("Use LoRA to fine-tune the model, 好") == "en"
    assert metrics.detect_lang("") == "en"
    assert metrics.detect_lang("12345") == "en"


def test_score_pair_zh_matches_libraries():
    import jieba
    from rouge_chinese import Rouge

    jieba.setLogLevel(logging.WARNING)
    expected = Rouge().get_scores(" ".join(jieba.cut(ZH_PREDICT)), " ".join(jieba.cut(ZH_TARGET)))[0]
    got = metrics.score_pair(ZH_PREDICT, ZH_TARGET)
    assert got["bleu-4"] == pytest.approx(_nltk_bleu(ZH_PREDICT, ZH_TARGET), abs=1e-4)
    assert got["rouge-1"] == pytest.approx(expected["rouge-1"]["f"] * 100, abs=1e-4)
    assert got["rouge-2"] == pytest.approx(expected["rouge-2"]["f"] * 100, abs=1e-4)
    assert got["rouge-l"] == pytest.approx(expected["rouge-l"]["f"] * 100, abs=1e-4)
    assert got["exact_match"] == 0.0
    assert 0 < got["rouge-2"] < got["rouge-1"] < 100  # a real partial overlap, not a degenerate pair


def test_score_pair_en_matches_rouge_score():
    from rouge_score import rouge_scorer

    expected = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False).score(EN_TARGET, EN_PREDICT)
    got = metrics.score_pair(EN_PREDICT, EN_TARGET)
    assert got["bleu-4"] == pytest.approx(_nltk_bleu(EN_PREDICT, EN_TARGET), abs=1e-4)
    assert got["rouge-1"] == pytest.approx(expected["rouge1"].fmeasure * 100, abs=1e-4)
    assert got["rouge-2"] == pytest.approx(expected["rouge2"].fmeasure * 100, abs=1e-4)
    assert got["rouge-l"] == pytest.approx(expected["rougeL"].fmeasure * 100, abs=1e-4)
    # Same words in the same order except two: rouge-1 is high, rouge-l lower (order changed).
    assert got["rouge-1"] > got["rouge-l"] > 0


@pytest.mark.parametrize("text", [ZH_TARGET, EN_TARGET])
def test_identical_scores_100(text):
    assert metrics.score_pair(text, text) == {
        "bleu-4": 100.0, "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "exact_match": 100.0}
    assert metrics.score_pair("  " + text + "\n", text)["exact_match"] == 100.0


@pytest.mark.parametrize("predict,target", [
    ("", ZH_TARGET), (" \n\t", ZH_TARGET), ("", EN_TARGET), (" \n\t", EN_TARGET),
    ("?!", EN_TARGET),  # rouge_score's tokenizer drops punctuation: nothing left to score
])
def test_empty_prediction_scores_zero(predict, target):
    got = metrics.score_pair(predict, target)
    assert got["rouge-1"] == got["rouge-2"] == got["rouge-l"] == got["exact_match"] == 0.0
    if not predict.strip():
        assert got["bleu-4"] == 0.0


def test_chinese_punctuation_counts_like_llamafactory():
    # jieba keeps punctuation as tokens (as in LLaMA-Factory), so a punctuation-only answer shares "，" and "。".
    assert metrics.score_pair("，。！", ZH_TARGET)["rouge-1"] == 20.0


def test_compute_metrics_summary():
    import sacrebleu

    preds = [ZH_PREDICT, ZH_TARGET, ""]
    refs = [ZH_TARGET, ZH_TARGET, EN_TARGET]
    summary, per = metrics.compute_metrics(preds, refs)
    assert list(summary) == list(metrics.SUMMARY_KEYS)
    assert summary["num_samples"] == 3
    assert per[1]["rouge-l"] == 100.0 and per[2]["rouge-l"] == 0.0
    for key in ("bleu-4", "rouge-1", "rouge-2", "rouge-l"):
        assert summary[key] == pytest.approx(sum(p[key] for p in per) / 3, abs=1e-4)
    assert summary["exact_match"] == pytest.approx(100 / 3, abs=1e-4)
    assert summary["avg_predict_len"] == pytest.approx((len(ZH_PREDICT) + len(ZH_TARGET)) / 3, abs=1e-4)
    # Any Chinese target -> sacrebleu's zh tokenizer.
    assert summary["corpus_bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs], tokenize="zh").score, abs=1e-4)

    en_summary, _ = metrics.compute_metrics([EN_PREDICT], [EN_TARGET])
    assert en_summary["corpus_bleu"] == pytest.approx(
        sacrebleu.corpus_bleu([EN_PREDICT], [[EN_TARGET]], tokenize="13a").score, abs=1e-4)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _rows():
    return [
        {"id": 0, "input": "问：什么是LoRA？", "target": ZH_TARGET, "predict": ZH_PREDICT,
         "num_tokens": 20, "time": 0.5},
        {"id": 1, "input": "Q: what is LoRA?", "target": EN_TARGET, "predict": EN_TARGET,
         "num_tokens": 12, "time": 0.3},
        {"id": 2, "input": "Q: empty", "target": EN_TARGET, "predict": "", "num_tokens": 0, "time": 0.1},
    ]


def test_run_eval_writes_files(tmp_path):
    pred = tmp_path / "predictions.jsonl"
    _write_jsonl(pred, _rows())
    result = metrics.run_eval(pred, extra={"loss": 1.5, "perplexity": 4.4817})
    on_disk = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert on_disk == result
    assert on_disk["loss"] == 1.5 and on_disk["perplexity"] == 4.4817
    assert on_disk["num_samples"] == 3
    assert on_disk["exact_match"] == pytest.approx(100 / 3, abs=1e-4)
    per = [json.loads(line) for line in (tmp_path / "metrics_per_sample.jsonl").read_text().splitlines()]
    assert [p["id"] for p in per] == [0, 1, 2]
    assert per[0] == {"id": 0, **metrics.score_pair(ZH_PREDICT, ZH_TARGET)}
    assert per[1]["rouge-l"] == 100.0 and per[2]["bleu-4"] == 0.0
    assert not list(tmp_path.glob("*.tmp"))


def test_run_eval_json_array_and_out_dir(tmp_path):
    pred = tmp_path / "preds.json"
    pred.write_text(json.dumps([{"input": "x", "predict": EN_TARGET, "target": EN_TARGET}]), encoding="utf-8")
    out = tmp_path / "out"
    result = metrics.run_eval(pred, out_dir=out)
    assert result["exact_match"] == 100.0 and result["num_samples"] == 1
    assert json.loads((out / "metrics_per_sample.jsonl").read_text())["id"] == 0  # row index when no id
    assert not (tmp_path / "metrics.json").exists()


def test_run_eval_errors_name_file_and_line(tmp_path):
    pred = tmp_path / "predictions.jsonl"
    pred.write_text(json.dumps(_rows()[0]) + "\n{not json\n" + json.dumps(_rows()[1]) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"predictions\.jsonl line 2: not valid JSON"):
        metrics.run_eval(pred)
    pred.write_text(json.dumps({"id": 0, "predict": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"line 1: field \"target\" is missing"):
        metrics.run_eval(pred)
    with pytest.raises(UserError, match="not found"):
        metrics.run_eval(tmp_path / "nope.jsonl")
    assert not (tmp_path / "metrics.json").exists()


def test_run_compare(tmp_path):
    base = [dict(r, predict="不知道") for r in _rows()]
    tuned = _rows()
    tuned[0]["predict"] = ZH_TARGET  # fine-tuned gets row 0 exactly right
    (tmp_path / "base").mkdir()
    (tmp_path / "tuned").mkdir()
    _write_jsonl(tmp_path / "base" / "predictions.jsonl", base)
    _write_jsonl(tmp_path / "tuned" / "predictions.jsonl", tuned)
    out = metrics.run_compare(tmp_path / "base" / "predictions.jsonl", tmp_path / "tuned" / "predictions.jsonl",
                              examples=2)
    assert out == tmp_path / "tuned" / "compare.md"
    md = out.read_text(encoding="utf-8")
    sum_a, _ = metrics.compute_metrics([r["predict"] for r in base], [r["target"] for r in base])
    sum_b, _ = metrics.compute_metrics([r["predict"] for r in tuned], [r["target"] for r in tuned])
    em_row = f"| exact_match | {sum_a['exact_match']:g} | {sum_b['exact_match']:g} | " \
             f"{sum_b['exact_match'] - sum_a['exact_match']:+.4g} |"
    assert em_row in md
    assert "| exact_match | 0 | 66.6667 | +66.67 |" in md
    # The two biggest rouge-l changes are ids 0 and 1 (both 0 -> 100); id 2 (empty vs 不知道) is not shown.
    assert md.count("### id ") == 2
    assert "### id 0 (rouge-l A 0, B 100)" in md and "### id 1 " in md and "### id 2 " not in md
    assert "不知道" in md and ZH_TARGET in md


def test_cli_eval_prints_table(tmp_path, capsys):
    pred = tmp_path / "predictions.jsonl"
    _write_jsonl(pred, _rows())
    parser = argparse.ArgumentParser()
    evaluate.register(parser.add_subparsers())
    args = parser.parse_args(["eval", str(pred)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "num_samples      3" in out
    assert (tmp_path / "metrics.json").is_file()
    with pytest.raises(UserError, match="--compare A B"):
        args = parser.parse_args(["eval"])
        args.func(args)


def test_new_predictions_drop_the_judge_results_of_the_old_ones(tmp_path, capsys):
    """Regression (issue 27): `predict --overwrite` after `judge` kept metrics.json["judge"], a verdict on answers
    that no longer existed, and printed it among the new scores. The entry records the sha256 of A and B; scoring a
    changed A or B drops it (a base model's A too, whose scores go to base/), scoring the same files keeps it."""
    import hashlib

    run = tmp_path / "run"
    run.mkdir()
    b, a = run / "predictions.jsonl", run / "predictions.base.jsonl"
    for path, text in ((b, "tuned"), (a, "base")):
        path.write_text(json.dumps({"id": 0, "input": "q", "target": "t", "predict": text}) + "\n")
    judge = {"model": "m", "a": str(a), "b": str(b), "a_sha256": hashlib.sha256(a.read_bytes()).hexdigest(),
             "b_sha256": hashlib.sha256(b.read_bytes()).hexdigest(), "pairwise": {"win_rate": 0.5}}
    (run / "metrics.json").write_text(json.dumps({"judge": judge}))
    metrics.run_eval(b)
    metrics.run_eval(a)
    assert json.loads((run / "metrics.json").read_text())["judge"] == judge  # the same files: kept

    a.write_text(json.dumps({"id": 0, "input": "q", "target": "t", "predict": "base, again"}) + "\n")
    metrics.run_eval(a)
    assert "judge" not in json.loads((run / "metrics.json").read_text())
    assert "removed the judge results: they judged an earlier predictions.base.jsonl" in capsys.readouterr().err

    (run / "metrics.json").write_text(json.dumps({"judge": {**judge, "a_sha256": None}}))
    b.write_text(json.dumps({"id": 0, "input": "q", "target": "t", "predict": "tuned, again"}) + "\n")
    assert "judge" not in metrics.run_eval(b)
