"""Preference stages on an SFT run: DPO raises the reward margin and accuracy (read from log.jsonl), ORPO and KTO
run end to end, the template travels byte for byte, predict uses it, bad rows stop the run, exact resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from domaintune.cli import main
from domaintune.data.templates import Template
from domaintune.errors import UserError
from domaintune.inference.engine import Engine
from domaintune.inference.params import GenerationParams
from domaintune.inference.predict import run_predict
from domaintune.rundir import RunDir, latest_checkpoint
from domaintune.training.trainer import run_train

BAD_ANSWERS = ["不知道。", "这个问题没有意义。", "随便你。", "问别人吧。"]


@pytest.fixture(scope="module")
def pref_data(sample_data, tmp_path_factory):
    """Synthetic preferences: the sample answer is chosen, a curt non-answer rejected."""
    rows = [json.loads(line) for line in (sample_data / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    out = tmp_path_factory.mktemp("pref") / "pref.jsonl"
    out.write_text("".join(json.dumps({"instruction": r["instruction"], "chosen": r["output"],
                                       "rejected": BAD_ANSWERS[i % len(BAD_ANSWERS)]}, ensure_ascii=False) + "\n"
                           for i, r in enumerate(rows[:40])), encoding="utf-8")
    return out


def pref_config(tiny_train_config, out, start, data, stage="dpo", *overrides):
    return tiny_train_config(out, "qwen2", f"model.name_or_path={start}", f"data.path={data}",
                             f"train.stage={stage}", "train.learning_rate=0.01", "train.batch_size=8",
                             "train.max_steps=8", "train.eval_steps=8", "train.save_steps=8", *overrides)


@pytest.fixture(scope="module")
def dpo_run(tiny_run, pref_data, tiny_train_config, tmp_path_factory):
    return run_train(pref_config(tiny_train_config, tmp_path_factory.mktemp("dpo") / "run", tiny_run, pref_data))


def test_dpo_moves_the_margins(dpo_run):
    log = [r for r in RunDir(dpo_run).read_log() if "loss" in r]
    first, last = log[0], log[-1]
    assert [r["step"] for r in log] == list(range(1, 9))
    # Step 1: the policy is the SFT adapter and so is the reference, so every reward is exactly 0.
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0
    # Measured: margins 0 -> 0.19 and accuracy 0 -> 0.875 over 8 steps of 8 pairs (each step new pairs).
    assert last["rewards/margins"] > first["rewards/margins"] + 0.1
    assert last["rewards/accuracies"] > max(first["rewards/accuracies"], 0.5)
    margins = [r["rewards/margins"] for r in log]
    assert sum(margins[-3:]) / 3 > sum(margins[:3]) / 3
    assert last["rewards/chosen"] > last["rewards/rejected"]
    assert {"logps/chosen", "logps/rejected"} <= set(last)
    evals = [r for r in RunDir(dpo_run).read_log() if "eval_loss" in r]
    assert evals and evals[-1]["eval_rewards/margins"] > 0


def test_the_dpo_run_is_a_run_directory_like_sft(dpo_run, tiny_run, tiny_model_dir):
    rd = RunDir(dpo_run)
    assert rd.has_adapter() and not (dpo_run / "ref").exists()  # the frozen reference is not saved again
    assert (dpo_run / "template.json").read_bytes() == (tiny_run / "template.json").read_bytes()
    adapter = json.loads((dpo_run / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_model_dir("qwen2").resolve())
    info = rd.run_info()
    assert info["train"]["path"]["stage"] == "dpo"
    assert info["train"]["path"]["reference"] == "the SFT adapter (frozen copy)"
    assert info["method"] == "lora" and info["template"] == Template.load(tiny_run / "template.json").name
    cfg = rd.path / "config.yaml"
    assert "stage: dpo" in cfg.read_text() and str(tiny_model_dir("qwen2").resolve()) in cfg.read_text()


def test_predict_on_the_dpo_run_uses_the_sft_prompt(dpo_run, tiny_run, sample_data, tmp_path):
    preds = run_predict(dpo_run, sample_data / "test.jsonl", out=tmp_path / "p.jsonl", limit=2, evaluate=False,
                        params=GenerationParams(max_new_tokens=8))
    rows = [json.loads(x) for x in preds.read_text(encoding="utf-8").splitlines()]
    sft = Engine.from_run(tiny_run, device="cpu")
    first = json.loads((sample_data / "test.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert rows[0]["input"] == sft.tokenizer.decode(sft.encode_messages([{"role": "user",
                                                                          "content": first["instruction"]}]))
    assert len(rows) == 2
    # The adapter trained on from the SFT adapter: same tensors (names, shapes), other values.
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (tiny_run, dpo_run))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert any(not (a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("stage, metric", [("orpo", "log_odds_ratio"), ("kto", "rewards/chosen")])
def test_orpo_and_kto_run_end_to_end(stage, metric, tiny_run, pref_data, tiny_train_config, sample_data, tmp_path):
    out = run_train(pref_config(tiny_train_config, tmp_path / stage, tiny_run, pref_data, stage,
                                "train.max_steps=3", "train.eval_steps=3", "train.save_steps=3"))
    log = RunDir(out).read_log()
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    assert any(k.startswith(metric) for r in log for k in r)
    assert RunDir(out).run_info()["train"]["path"]["stage"] == stage
    preds = run_predict(out, sample_data / "test.jsonl", out=tmp_path / "p.jsonl", limit=2, evaluate=False,
                        params=GenerationParams(max_new_tokens=4))
    assert len(preds.read_text(encoding="utf-8").splitlines()) == 2


def test_bad_rows_stop_the_run_before_any_model_loads(tiny_run, tiny_train_config, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n',
                    encoding="utf-8")
    cfg = pref_config(tiny_train_config, tmp_path / "run", tiny_run, data)
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg.to_yaml(), encoding="utf-8")
    t0 = time.time()
    assert main(["train", str(path)]) == 2
    assert f'{data} line 2: missing "rejected"' in capsys.readouterr().err
    assert time.time() - t0 < 10 and not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_a_preference_config_without_a_model_is_told_so(tmp_path, capsys):
    """Regression (mypy found it: Path(None) in PreferenceRun._resolve_start): a dpo config with no
    model.name_or_path ended in a TypeError traceback, where an sft config gets one line and exit 2."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data:\n  path: {tmp_path / 'pref.jsonl'}\n"
                   f"train:\n  stage: dpo\n  output_dir: {tmp_path / 'out'}\n", encoding="utf-8")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.name_or_path is not set: give the base model, in the config file")
    assert "Traceback" not in err and err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_a_lora_sft_run_needs_lora(tiny_run, pref_data, tiny_train_config, tmp_path):
    with pytest.raises(UserError, match="is a LoRA run: a preference stage continues its adapter"):
        run_train(pref_config(tiny_train_config, tmp_path / "r", tiny_run, pref_data, "dpo", "lora.enabled=false"))


def test_data_check_shows_both_completions_masked(tiny_run, pref_data, tiny_train_config, tmp_path, capsys):
    cfg = pref_config(tiny_train_config, tmp_path / "run", tiny_run, pref_data)
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg.to_yaml(), encoding="utf-8")
    assert main(["data-check", str(path)]) == 0
    out = capsys.readouterr().out
    first = json.loads(pref_data.read_text(encoding="utf-8").splitlines()[0])
    assert "prompt + chosen:" in out and "prompt + rejected:" in out
    assert f"«{first['chosen']}</s>»" in out and f"«{first['rejected']}</s>»" in out
    assert f"用户:{first['instruction']}\n\n助手:«" in out  # the SFT run's template (domain_zh)


def test_dpo_resume_after_sigkill_is_exact(tiny_run, pref_data, tiny_train_config, tmp_path):
    import torch

    out = tmp_path / "run"
    cfg = pref_config(tiny_train_config, out, tiny_run, pref_data, "dpo", "train.max_steps=8", "train.save_steps=3",
                      "train.eval_steps=100", "data.val_size=0")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(cfg.to_yaml(), encoding="utf-8")
    cmd = [sys.executable, "-m", "domaintune", "train", str(cfg_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one summation order in every run: losses match bit for bit
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while latest_checkpoint(out) is None:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no checkpoint within 180 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "run_info.json").exists()
    n = int(latest_checkpoint(out).name.split("-")[1])
    assert n < 8
    r = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = [r for r in RunDir(out).read_log() if "loss" in r]
    assert [x["step"] for x in resumed] == list(range(1, 9))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = run_train(cfg.model_copy(update={"train": cfg.train.model_copy(
            update={"output_dir": str(tmp_path / "ref")})}))
    finally:
        torch.set_num_threads(threads)
    keys = ("step", "loss", "learning_rate", "rewards/margins", "logps/chosen")
    assert [tuple(x[k] for k in keys) for x in resumed] == \
        [tuple(x[k] for k in keys) for x in RunDir(ref).read_log() if "loss" in x]


def test_report_and_export_work_on_the_dpo_run(dpo_run, tmp_path):
    from domaintune.evaluation.report import run_report
    from domaintune.inference.export import run_export

    report = run_report(dpo_run, tmp_path / "report.md").read_text(encoding="utf-8")
    log = [r for r in RunDir(dpo_run).read_log() if "rewards/margins" in r]
    assert "| stage | dpo (beta 0.1) |" in report
    assert "| reference model | the SFT adapter (frozen copy) |" in report
    assert f"| reward margin, first -> last step | 0 -> {log[-1]['rewards/margins']:,.6g} |" in report
    out = run_export(dpo_run, tmp_path / "merged", dtype="fp32")
    assert (out / "template.json").read_bytes() == (dpo_run / "template.json").read_bytes()
    merged = Engine.from_run(out, device="cpu")
    tuned = Engine.from_run(dpo_run, device="cpu")
    prompt = tuned.encode_messages([{"role": "user", "content": "孩子挑食怎么办"}])
    p = GenerationParams(max_new_tokens=6)
    assert merged.generate([prompt], p)[0].token_ids == tuned.generate([prompt], p)[0].token_ids


def test_the_sft_run_is_never_the_output(tiny_run, pref_data, tiny_train_config):
    """Regression: with output_dir = the SFT run and --overwrite, the overwrite guard compared with the base
    model (the SFT run's), so the SFT run it starts from was deleted."""
    before = sorted(p.name for p in tiny_run.iterdir())
    for out in (tiny_run, tiny_run / "dpo", tiny_run.parent):
        with pytest.raises(UserError, match="the run this stage starts from"):
            run_train(pref_config(tiny_train_config, out, tiny_run, pref_data), overwrite=True)
    assert sorted(p.name for p in tiny_run.iterdir()) == before


def test_kto_needs_two_rows_per_micro_batch(tiny_run, pref_data, tiny_train_config, tmp_path):
    with pytest.raises(UserError, match="set train.per_device_batch_size to 2 or more"):
        run_train(pref_config(tiny_train_config, tmp_path / "r", tiny_run, pref_data, "kto",
                              "train.per_device_batch_size=1"))


def test_orpo_nll_is_on_the_completion_only():
    """TRL's ORPO takes its NLL over prompt and answer; completion_nll (used instead) over the answer alone."""
    import torch

    from domaintune.training.preference import completion_nll

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)  # positions 0..5 predict tokens 1..6 of a 7-token concatenated row
    labels = torch.tensor([[-100, -100, -100, 4, 5, 2], [-100, -100, 7, 8, -100, -100]])  # 6 < 7: padded
    got = completion_nll(logits, labels)
    pairs = [(0, 2, 4), (0, 3, 5), (0, 4, 2), (1, 1, 7), (1, 2, 8)]  # (row, logit position, target token)
    want = torch.stack([-torch.log_softmax(logits[r, t], -1)[y] for r, t, y in pairs]).mean()
    assert torch.allclose(got, want)


def test_an_export_as_starting_point_brings_its_template(tiny_run, pref_data, tiny_train_config, tmp_path):
    from domaintune.inference.export import run_export

    merged = run_export(tiny_run, tmp_path / "merged", dtype="fp32")
    out = run_train(pref_config(tiny_train_config, tmp_path / "dpo", merged, pref_data, "dpo", "train.max_steps=1",
                                "train.save_steps=1", "train.eval_steps=1", "data.template=chatml"))
    assert (out / "template.json").read_bytes() == (merged / "template.json").read_bytes()
    assert RunDir(out).run_info()["train"]["path"]["reference"] == "the base with adapters off"
