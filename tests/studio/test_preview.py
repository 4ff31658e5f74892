"""studio/preview.py: the trained part of a training example (data-check's own encoding, on a tiny tokenizer),
gen-data's preview pairs and its drops (against the scripted OpenAI-compatible server)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from domaintune.cli import main
from domaintune.config import build_config
from domaintune.data.encode import IGNORE_INDEX, decode_text, encode_samples
from domaintune.data.examples import parse_example
from domaintune.data.templates import get_template
from domaintune.errors import UserError
from domaintune.studio.preview import documents_preview, preview_pairs, rejected, trained_spans
from domaintune.training.data_check import run_data_check
from fake_llm_server import FakeLLM

KEY_ENV = "DT_STUDIO_PREVIEW_KEY"
SINGLE = {"instruction": "怎样提升孩子的自信？", "input": "他八岁。", "output": "多表扬努力，而不是聪明。"}
MULTI = {"messages": [{"role": "system", "content": "你是育儿顾问。"},
                      {"role": "user", "content": "孩子怕黑"}, {"role": "assistant", "content": "陪她检查床底。"},
                      {"role": "user", "content": "还是怕呢？"}, {"role": "assistant", "content": "留一盏小夜灯。"}]}


def config(tmp_path: Path, model: Path, row: dict, **data: object) -> dict:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"model": {"name_or_path": str(model)},
            "data": {"path": str(path), "val_size": 0, "template": "domain_zh", **data},
            "train": {"output_dir": str(tmp_path / "run")}}


def expected_sample(raw: dict, row: dict) -> tuple[dict, object]:
    """The row encoded the way training encodes it, without the code under test."""
    from transformers import AutoTokenizer

    cfg = build_config(raw)
    tok = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    template = get_template(cfg.data.template, tok, cfg.data.thinking, cfg.data.train_on_turns)
    ex = parse_example(row, "row", True, template)
    samples = encode_samples(ex, tok, template, cfg.data.cutoff_len, cfg.data.train_on_inputs, cfg.data.system)
    sample = samples[-1][0]
    assert sample is not None
    return sample, tok


@pytest.mark.parametrize("row", [SINGLE, MULTI], ids=["single-turn", "multi-turn"])
def test_trained_spans_are_the_tokens_in_the_loss(tmp_path, tiny_model_dir, row, capsys):
    raw = config(tmp_path, tiny_model_dir("qwen2"), row)
    got = trained_spans(raw)
    sample, tok = expected_sample(raw, row)
    pairs = list(zip(sample["input_ids"], sample["labels"], strict=True))
    trained = "".join(s["text"] for s in got["segments"] if s["trained"])
    untrained = "".join(s["text"] for s in got["segments"] if not s["trained"])
    assert trained == decode_text(tok, [t for t, lab in pairs if lab != IGNORE_INDEX])
    assert untrained == decode_text(tok, [t for t, lab in pairs if lab == IGNORE_INDEX])
    assert got["tokens"] == len(sample["input_ids"])
    assert got["trained"] == sum(lab != IGNORE_INDEX for _, lab in pairs) > 0
    assert [s["trained"] for s in got["segments"]] == \
        [i % 2 == 1 for i in range(len(got["segments"]))]  # runs alternate, the prompt first
    assert len(got["segments"]) == (2 if row is SINGLE else 4)
    assert (got["example"], got["rows"], got["samples"], got["note"]) == (0, 1, 1, None)
    assert got["report"]["rows"] == 1 and got["report"]["train_rows"] == 1
    # data-check prints the same example, the trained runs marked «like this»
    capsys.readouterr()
    run_data_check(build_config(raw))
    marked = "".join(f"«{s['text']}»" if s["trained"] else s["text"] for s in got["segments"])
    printed = capsys.readouterr().out
    assert f"\n{marked}\n" in printed
    # the page's summary is data-check's own (but for the cache line: data-check found the preview's cache)
    shown = [line for line in got["summary"] if not line.startswith("prepared data:")]
    assert printed.startswith("\n".join(shown) + "\n") and len(shown) >= 3


def test_train_on_inputs_trains_everything(tmp_path, tiny_model_dir):
    got = trained_spans(config(tmp_path, tiny_model_dir("qwen2"), SINGLE, train_on_inputs=True))
    assert [s["trained"] for s in got["segments"]] == [True] and got["trained"] == got["tokens"]


def test_trained_spans_raise_the_data_check_error(tmp_path, tiny_model_dir):
    raw = config(tmp_path, tiny_model_dir("qwen2"), {"instruction": "no answer"})
    with pytest.raises(UserError, match="line 1"):
        trained_spans(raw)
    raw = config(tmp_path, tiny_model_dir("qwen2"), SINGLE)
    raw["train"]["stage"] = "dpo"
    with pytest.raises(UserError, match="data-check"):
        trained_spans(raw)
    raw = config(tmp_path, tiny_model_dir("qwen2"), SINGLE, cutoff_len=3)  # the answer is past the cutoff
    with pytest.raises(UserError, match="no trainable sample left"):
        trained_spans(raw)


# ------------------------------------------------------------------ gen-data
TEXT = ("# Sleep\n\nToddlers need a calm bedtime routine with a bath, a story and lights out at the same time each "
        "night, so that falling asleep becomes easy and the whole family rests better.\n")


@pytest.fixture
def gen_raw(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "k")
    docs = tmp_path / "documents"
    docs.mkdir()
    (docs / "guide.md").write_text(TEXT, encoding="utf-8")
    (docs / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "q.txt").write_text("QUESTIONS n={num_questions} from {source}\n{passage}\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("ANSWER: {question}\nPASSAGE: {passage}", encoding="utf-8")
    (tmp_path / "j.txt").write_text("JUDGE\nQ: {question}\nA: {answer}\nP: {passage}", encoding="utf-8")

    def make(base_url: str, out: str, **kw: object) -> dict:
        return {"selfinstruct": {
            "domain": "parenting", "language": "en", "documents": [str(docs)], "base_url": base_url,
            "model": "fake-model", "api_key_env": KEY_ENV, "doc_question_template": str(tmp_path / "q.txt"),
            "doc_answer_template": str(tmp_path / "a.txt"), "judge_template": str(tmp_path / "j.txt"),
            "num_questions": 6, "questions_per_passage": 2, "passage_tokens": 50, "passage_overlap": 0,
            "max_concurrency": 1, "request_timeout": 5.0, "max_retries": 1, "retry_base_delay": 0.01,
            "output_dir": str(tmp_path / out), **kw}}

    return make


def answer(text: str) -> str:
    return f"Answer to: {text.split(chr(10))[0]}, with a calm routine every night."


def test_preview_pairs_are_what_gen_data_preview_prints(gen_raw, tmp_path, capsys):
    with FakeLLM(answer_fn=answer) as srv:
        raw = gen_raw(srv.base_url, "cli-out")
        cfg = tmp_path / "gen.yaml"
        cfg.write_text(yaml.safe_dump(raw), encoding="utf-8")
        capsys.readouterr()
        assert main(["gen-data", str(cfg), "--preview", "2"]) == 0
        printed = capsys.readouterr().out
        got = preview_pairs(tmp_path / "cli-out", 2)
        assert len(got["pairs"]) == 2 and got["status"] == "preview"
        for i, p in enumerate(got["pairs"], 1):
            assert f"--- {i}/2  [{p['source']['file']}, Sleep]\nQ: {p['question']}\nA: {p['answer']}\n" in printed
            assert p["where"] == "guide.md, Sleep" and Path(p["source"]["file"]).name == "guide.md"
        assert got["spent"]["calls"] == len(srv.log)

        result = documents_preview(gen_raw(srv.base_url, "lib-out"), 2)
    answers = [json.loads(line) for line in (tmp_path / "lib-out" / "answers.jsonl").read_text().splitlines()]
    assert [(p["question"], p["answer"]) for p in result["pairs"]] == [(a["question"], a["answer"]) for a in answers]
    assert len(result["pairs"]) == 2 and not (tmp_path / "lib-out" / "train.jsonl").exists()


def test_rejected_rows_say_why_with_gen_data_hint(gen_raw, tmp_path):
    def judge(prompt: str) -> str:
        return "UNSUPPORTED: not in the passage" if "Q1:" in prompt else "SUPPORTED: fine"

    script = [{"questions": ["Hi?", "Q1: how to handle a1x a1y a1z at bedtime?", "Q2: why b2x b2y b2z at night?"]}]
    with FakeLLM(script, answer_fn=answer, judge_fn=judge) as srv:
        documents_preview(gen_raw(srv.base_url, "out", min_question_chars=5), 1)
    got = rejected(tmp_path / "out")
    by_reason = {r["reason"]: r for r in got["rows"]}
    assert by_reason["too_short"]["question"] == "Hi?" and by_reason["too_short"]["stage"] == "question"
    assert by_reason["too_short"]["hint"] == \
        "questions are shorter than selfinstruct.min_question_chars (now 5): lower it"
    assert by_reason["unsupported"]["detail"]["judge"] == "not in the passage"
    assert by_reason["unsupported"]["question"].startswith("Q1:")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text(encoding="utf-8"))
    assert got["counts"] == {**manifest["counts"]["questions_rejected"], **manifest["counts"]["answers_rejected"]}
    assert got["total"] == len(got["rows"]) == sum(got["counts"].values())
    assert [(Path(p["file"]).name, p["reason"]) for p in got["problems"]] == [("empty.txt", "empty")]
    assert rejected(tmp_path / "out", limit=1)["rows"] == got["rows"][-1:]
    with pytest.raises(UserError, match="not a gen-data output folder"):
        rejected(tmp_path / "nothing-here")
