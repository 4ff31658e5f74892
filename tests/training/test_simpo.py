"""train.stage simpo (TRL's CPO trainer, SimPO loss) on an SFT run: the loss is SimPO's, the held-out preference
margin moves up (computed here from the models, checked against TRL's own eval metric), exact resume after
SIGKILL, and predict, serve, report and the merged export read the run like any LoRA run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from domaintune.errors import UserError
from domaintune.inference.engine import Engine
from domaintune.inference.params import GenerationParams
from domaintune.rundir import RunDir, latest_checkpoint
from domaintune.training.trainer import run_train

WRAPPER = Path(__file__).resolve().parent / "kill_wrapper.py"
BAD_ANSWERS = ["不知道。", "这个问题没有意义。", "随便你。", "问别人吧。"]
BETA, GAMMA = 2.0, 0.5  # the SimPO paper's scale (TRL's CPO default beta 0.1 is DPO's)


def _pairs(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps({"instruction": r["instruction"], "chosen": r["output"],
                                        "rejected": BAD_ANSWERS[i % len(BAD_ANSWERS)]}, ensure_ascii=False) + "\n"
                            for i, r in enumerate(rows)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pairs(sample_data, tmp_path_factory) -> tuple[Path, Path]:
    """(training pairs, held-out pairs): the sample answer chosen, a curt non-answer rejected; no prompt in both."""
    rows = [json.loads(line) for line in (sample_data / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    d = tmp_path_factory.mktemp("simpo-pairs")
    return _pairs(rows[:40], d / "train.jsonl"), _pairs(rows[48:64], d / "heldout.jsonl")


def simpo_config(tiny_train_config, out, start, pairs, *overrides):
    train, heldout = pairs
    return tiny_train_config(out, "qwen2", f"model.name_or_path={start}", f"data.path={train}",
                             f"data.eval_path={heldout}", "data.val_size=0", "train.stage=simpo",
                             f"train.beta={BETA}", f"train.simpo_gamma={GAMMA}", "train.learning_rate=0.01",
                             "train.batch_size=8", "train.max_steps=8", "train.eval_steps=8", "train.save_steps=8",
                             *overrides)


@pytest.fixture(scope="module")
def simpo_run(tiny_run, pairs, tiny_train_config, tmp_path_factory):
    cfg = simpo_config(tiny_train_config, tmp_path_factory.mktemp("simpo") / "run", tiny_run, pairs)
    return cfg, run_train(cfg)


def heldout_margin(model_dir: Path, cfg) -> float:
    """TRL's SimPO reward margin (CPOTrainer.cpo_loss with average_log_prob: beta * (mean token log-prob of the
    chosen completion - that of the rejected one)), averaged over the held-out pairs, computed one row at a time
    from the model that `model_dir` loads (the SFT run before, the simpo run after)."""
    import torch

    from domaintune.training.preference import PreferenceRun

    prep = PreferenceRun(cfg)
    prep.setup_data()  # the held-out pairs, encoded exactly as training encodes them
    model = Engine.from_run(model_dir, device="cpu", dtype="fp32").model.eval()
    margins = []
    with torch.no_grad():
        for row in prep.data.eval:
            prompt = row["prompt_ids"]
            mean_logp = []
            for side in ("chosen_ids", "rejected_ids"):
                ids = torch.tensor([prompt + row[side]])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
                tok = logp.gather(-1, ids[0, 1:, None])[:, 0][len(prompt) - 1:]  # the completion's tokens
                assert len(tok) == len(row[side])
                mean_logp.append(tok.mean())
            margins.append(BETA * float(mean_logp[0] - mean_logp[1]))
    return sum(margins) / len(margins)


def test_cpo_with_these_settings_is_the_simpo_loss():
    """What the stage hands TRL is the SimPO loss: -log sigmoid(beta * (mean logp chosen - mean logp rejected)
    - gamma), with no NLL term (cpo_alpha 0)."""
    from types import SimpleNamespace

    import torch
    import torch.nn.functional as F

    from domaintune.training.preference import _trl_classes

    trainer_cls, config_cls, extra = _trl_classes("simpo")
    assert (extra["loss_type"], extra["cpo_alpha"]) == ("simpo", 0.0)
    chosen, rejected = torch.tensor([-1.0, -2.5, -0.3]), torch.tensor([-1.2, -1.0, -3.0])
    fake = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=GAMMA, beta=BETA, label_smoothing=0.0,
                           accelerator=SimpleNamespace(device="cpu"))
    losses, r_chosen, r_rejected = trainer_cls.cpo_loss(fake, chosen, rejected)
    assert torch.allclose(losses, -F.logsigmoid(BETA * (chosen - rejected) - GAMMA))
    assert torch.allclose(r_chosen - r_rejected, BETA * (chosen - rejected))  # TRL's rewards/margins


def test_simpo_trains_and_moves_the_heldout_margin_up(simpo_run, tiny_run, tiny_train_config, pairs):
    cfg, out = simpo_run
    log = RunDir(out).read_log()
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    # SimPO's own loss: no NLL term (cpo_alpha 0), and it goes down (each step sees new pairs).
    assert all(r["nll_loss"] == 0.0 for r in steps)
    losses = [r["loss"] for r in steps]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses

    before, after = heldout_margin(tiny_run, cfg), heldout_margin(out, cfg)
    # Measured: -0.06 -> +0.54 (beta 2) over 8 steps of 8 pairs; TRL's train margins 0 -> 0.5 (rows seen).
    assert after > before + 0.4 and after > 0.3, (before, after)
    # The margin computed here is TRL's: its eval on the same held-out pairs at the last step agrees.
    (trl_eval,) = [r for r in log if "eval_loss" in r]
    assert trl_eval["eval_rewards/margins"] == pytest.approx(after, abs=1e-4)
    assert trl_eval["eval_rewards/accuracies"] > 0.5


def test_the_simpo_run_is_a_run_directory_like_orpo(simpo_run, tiny_run, tmp_path, capsys):
    from domaintune.cli import main
    from domaintune.evaluation.report import run_report
    from domaintune.studio.runs import summary

    cfg, out = simpo_run
    rd = RunDir(out)
    assert rd.has_adapter() and not (out / "ref").exists()  # no reference model: nothing frozen to drop
    assert (out / "template.json").read_bytes() == (tiny_run / "template.json").read_bytes()
    path = rd.run_info()["train"]["path"]
    assert (path["stage"], path["beta"], path["simpo_gamma"]) == ("simpo", BETA, GAMMA)
    assert path["reference"] == "none (SimPO has no reference model)"
    report = run_report(out, tmp_path / "report.md").read_text(encoding="utf-8")
    assert f"| stage | simpo (beta {BETA}, gamma {GAMMA}) |" in report
    assert "| reference model | none (SimPO has no reference model) |" in report
    assert summary(out)["stage"] == "simpo"  # the studio's label: "lora simpo"

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(cfg.to_yaml(), encoding="utf-8")
    assert main(["data-check", str(cfg_path)]) == 0
    printed = capsys.readouterr().out
    assert "train.stage simpo" in printed and "prompt + chosen:" in printed and "prompt + rejected:" in printed


def test_predict_serve_and_the_merged_export_on_the_simpo_run(simpo_run, sample_data, tmp_path):
    from fastapi.testclient import TestClient

    from domaintune.inference.export import run_export
    from domaintune.inference.predict import run_predict
    from domaintune.inference.serve.app import create_app

    _, out = simpo_run
    preds = run_predict(out, sample_data / "test.jsonl", out=tmp_path / "p.jsonl", limit=2, evaluate=False,
                        params=GenerationParams(max_new_tokens=6))
    tuned = Engine.from_run(out, device="cpu")
    msgs = [{"role": "user", "content": json.loads((sample_data / "test.jsonl").read_text(
        encoding="utf-8").splitlines()[0])["instruction"]}]
    prompt = tuned.encode_messages(msgs)
    p = GenerationParams(max_new_tokens=6)
    want = tuned.generate([prompt], p)[0]
    rows = [json.loads(x) for x in preds.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2 and rows[0]["predict"] == want.text

    with TestClient(create_app(tuned), base_url="http://localhost") as client:
        body = {"model": tuned.model_id, "messages": msgs, "temperature": 0, "max_tokens": 6}
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == want.text

    merged = Engine.from_run(run_export(out, tmp_path / "merged", dtype="fp32"), device="cpu")
    assert merged.generate([prompt], p)[0].token_ids == want.token_ids


def test_simpo_resume_after_sigkill_is_exact(simpo_run, tiny_run, pairs, tiny_train_config, tmp_path):
    ref_cfg, ref = simpo_run
    out = tmp_path / "run"
    cfg = simpo_config(tiny_train_config, out, tiny_run, pairs, "train.save_steps=3")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(cfg.to_yaml(), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DOMAINTUNE_TEST_KILL_AT": "step:5"}  # after checkpoint-3
    r = subprocess.run([sys.executable, str(WRAPPER), "train", str(cfg_path)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-3000:]
    assert latest_checkpoint(out).name == "checkpoint-3" and not (out / "run_info.json").exists()
    env.pop("DOMAINTUNE_TEST_KILL_AT")
    r = subprocess.run([sys.executable, "-m", "domaintune", "train", str(cfg_path), "--resume"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # The uninterrupted run (the module's, in this process on one thread; it saved at step 8 only) logged the same.
    keys = ("step", "loss", "learning_rate", "rewards/margins", "logps/chosen", "logps/rejected")
    got, want = ([tuple(x[k] for k in keys) for x in RunDir(d).read_log() if "loss" in x] for d in (out, ref))
    assert [x[0] for x in got] == list(range(1, 9))
    assert got == want


def test_simpo_owns_loss_type_and_gamma(tiny_run, pairs, tiny_train_config, tmp_path):
    for key, use in (("loss_type", "train.stage"), ("simpo_gamma", "train.simpo_gamma")):
        with pytest.raises(UserError, match=f"'{key}' is set by domaintune; use {use}"):
            run_train(simpo_config(tiny_train_config, tmp_path / key, tiny_run, pairs,
                                   f"train.trainer_args.{key}={'sigmoid' if key == 'loss_type' else 1.0}"))
        assert not (tmp_path / key).exists()
