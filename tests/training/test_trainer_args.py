"""train.trainer_args: more TrainingArguments for power users, each key checked against the real fields; what
domaintune sets on purpose is refused with the key to use instead; a valid key reaches the Trainer."""
from __future__ import annotations

import time

import pytest

from domaintune.errors import UserError
from domaintune.training.arguments import check_trainer_args
from domaintune.training.run import TrainingRun
from domaintune.training.trainer import run_train


def test_an_unknown_key_names_the_closest_field():
    with pytest.raises(UserError, match=r"train.trainer_args: 'adam_epsilom' is not a TrainingArguments field; "
                                        r"did you mean 'adam_epsilon'\?"):
        check_trainer_args({"adam_epsilom": 1e-6})
    with pytest.raises(UserError, match=r"'zzz_qqq' is not a TrainingArguments field$"):
        check_trainer_args({"zzz_qqq": 1})


def test_a_key_domaintune_sets_is_refused_with_the_key_to_use():
    with pytest.raises(UserError) as e:
        check_trainer_args({"learning_rate": 1.0, "output_dir": "x", "per_device_train_batch_size": 4,
                            "remove_unused_columns": True, "adam_beta2": 0.95})
    msg = str(e.value)
    assert "'learning_rate' is set by domaintune; use train.learning_rate" in msg
    assert "'output_dir' is set by domaintune; use train.output_dir" in msg
    assert "'per_device_train_batch_size' is set by domaintune; use train.per_device_batch_size" in msg
    assert "'remove_unused_columns' is set by domaintune; use nothing: the collators need every column" in msg
    assert "adam_beta2" not in msg  # a valid key is not a problem


def test_preference_fields_are_checked_against_trl_config():
    from trl import DPOConfig

    check_trainer_args({"loss_type": ["sigmoid"], "label_smoothing": 0.1}, DPOConfig)  # DPO's own fields
    with pytest.raises(UserError, match="'loss_type' is not a TrainingArguments field"):
        check_trainer_args({"loss_type": ["sigmoid"]})
    with pytest.raises(UserError, match="'beta' is set by domaintune; use train.beta"):
        check_trainer_args({"beta": 0.5}, DPOConfig)


def test_a_bad_key_stops_the_run_before_the_model_loads(tiny_train_config, tmp_path):
    cfg = tiny_train_config(tmp_path / "run", "qwen2", "train.trainer_args={adam_epsilom: 0.000001}")
    t0 = time.time()
    with pytest.raises(UserError, match="did you mean 'adam_epsilon'"):
        run_train(cfg)
    assert time.time() - t0 < 30 and not (tmp_path / "run" / "log.jsonl").exists()


def test_a_valid_key_reaches_the_trainer(tiny_train_config, tmp_path):
    cfg = tiny_train_config(tmp_path / "run", "qwen2",
                            "train.trainer_args={adam_beta2: 0.95, lr_scheduler_kwargs: {num_cycles: 0.25}}")
    run = TrainingRun(cfg)
    run.setup_output()
    run.setup_data()
    run.setup_model()
    run.setup_trainer()
    assert run.trainer.args.adam_beta2 == 0.95
    assert run.trainer.args.lr_scheduler_kwargs == {"num_cycles": 0.25}
    assert run.trainer.args.learning_rate == cfg.train.learning_rate  # the config's own keys are untouched


# ---------------------------------------------------------------- train.distributed
def _train_section(**kw):
    from domaintune.config import build_config

    return build_config({"model": {"name_or_path": "x"}, "train": kw}, "t").train


def test_engine_arguments(tmp_path):
    import importlib.util

    from domaintune.training.arguments import FSDP_DEFAULT, engine_arguments

    assert engine_arguments(_train_section()) == {}
    assert engine_arguments(_train_section(distributed="fsdp")) == {"fsdp": True, "fsdp_config": FSDP_DEFAULT}
    conf = tmp_path / "fsdp.json"
    conf.write_text('{"version": 2, "cpu_offload": true}')
    assert engine_arguments(_train_section(distributed="fsdp", distributed_config=str(conf)))["fsdp_config"] == \
        {"version": 2, "cpu_offload": True}
    conf.write_text('{"version": 2,\n "cpu_offload": tru}')
    with pytest.raises(UserError, match=r"fsdp.json line 2: not valid JSON"):
        engine_arguments(_train_section(distributed="fsdp", distributed_config=str(conf)))
    with pytest.raises(UserError, match="not found"):
        engine_arguments(_train_section(distributed="fsdp", distributed_config=str(tmp_path / "nope.json")))
    with pytest.raises(UserError, match="is for train.distributed fsdp or deepspeed; ddp takes none"):
        engine_arguments(_train_section(distributed_config=str(conf)))
    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(UserError, match=r"pip install 'domaintune\[deepspeed\]'"):
            engine_arguments(_train_section(distributed="deepspeed", distributed_config="zero2.json"))
    with pytest.raises(UserError, match="'fsdp' is set by domaintune; use train.distributed: fsdp"):
        check_trainer_args({"fsdp": "full_shard"})


def test_shipped_distributed_configs_are_valid():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs" / "distributed"
    confs = {p.name: json.loads(p.read_text()) for p in root.glob("*.json")}
    assert set(confs) == {"fsdp.json", "zero2.json", "zero2_offload.json", "zero3.json", "zero3_offload.json"}
    assert [confs[f]["zero_optimization"]["stage"] for f in ("zero2.json", "zero2_offload.json", "zero3.json",
                                                             "zero3_offload.json")] == [2, 2, 3, 3]
    assert "offload_optimizer" in confs["zero2_offload.json"]["zero_optimization"]
    assert "offload_param" in confs["zero3_offload.json"]["zero_optimization"]
    assert confs["zero3.json"]["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert confs["fsdp.json"]["state_dict_type"] == "FULL_STATE_DICT"  # run directories hold full weights


def test_resume_across_process_counts(tmp_path, capsys):
    import json

    from domaintune.training.outputs import check_resume_world

    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    check_resume_world(ckpt, 2, "fsdp")  # a checkpoint from before world.json: nothing to compare
    (ckpt / "world.json").write_text(json.dumps({"world_size": 2, "distributed": "fsdp"}))
    check_resume_world(ckpt, 2, "fsdp")
    with pytest.raises(UserError, match=r"written by 2 process\(es\) with fsdp, whose optimizer state is split per "
                                        r"process; this run has 1. Resume with 2"):
        check_resume_world(ckpt, 1, "fsdp")
    with pytest.raises(UserError, match="was written with train.distributed fsdp, this run uses ddp"):
        check_resume_world(ckpt, 2, "ddp")
    (ckpt / "world.json").write_text(json.dumps({"world_size": 2, "distributed": "ddp"}))
    check_resume_world(ckpt, 1, "ddp")
    assert "the global batch is kept" in capsys.readouterr().err


def test_an_engine_that_cannot_start_stops_the_run_before_the_model_loads(tiny_train_config, tmp_path):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    cfg = tiny_train_config(tmp_path / "run", "qwen2", "train.distributed=deepspeed")
    t0 = time.time()
    with pytest.raises(UserError, match=r"pip install 'domaintune\[deepspeed\]'"):
        run_train(cfg)
    assert time.time() - t0 < 30 and not (tmp_path / "run" / "log.jsonl").exists()
    with pytest.raises(UserError, match="train.distributed_config: .* not found"):
        run_train(tiny_train_config(tmp_path / "run", "qwen2", "train.distributed=fsdp",
                                    f"train.distributed_config={tmp_path / 'none.json'}"))


# ---------------------------------------------------------------- settings checked before the model loads
# Issue 22, defect 14: each of these was found only after the model had loaded, with a traceback.
@pytest.mark.parametrize("override, said", [
    ("train.lr_scheduler=cosin", "train.lr_scheduler 'cosin' is not a transformers learning-rate schedule. Did you "
                                 "mean 'cosine'? Valid: linear, cosine, "),
    ("train.optim=adamw", "train.optim 'adamw' is not a transformers optimizer name. Did you mean 'adamw_torch'?"),
    ("train.optim=SGD", "train.optim 'SGD' is not a transformers optimizer name. Did you mean 'sgd'?"),
    ("train.trainer_args={adam_beta2: 2}", "train.trainer_args: the optimizer adamw_torch refuses its settings: "
                                           "Invalid beta parameter at index 1: 2 (it was given lr=0.05, "
                                           "betas=(0.9, 2), eps=1e-08"),
    ("train.trainer_args={adam_epsilon: -1.0}", "Invalid epsilon value: -1.0"),
    ("train.trainer_args={adam_beta2: '0.95'}", "train.trainer_args: 'adam_beta2' must be float, got '0.95'"),
    ("train.trainer_args={lr_scheduler_kwargs: {num_cycle: 1}}",
     "train.lr_scheduler cosine: get_cosine_schedule_with_warmup() got an unexpected keyword argument 'num_cycle'"),
    ("train.lr_scheduler=cosine_with_min_lr", "train.lr_scheduler cosine_with_min_lr: One of min_lr or min_lr_rate "
                                              "should be set through the `lr_scheduler_kwargs`"),
    ("train.trainer_args={optim_args: betas}", "train.trainer_args.optim_args 'betas' must look like key=value"),
])
def test_bad_settings_stop_the_run_before_the_model_loads(tiny_train_config, tmp_path, override, said):
    run = TrainingRun(tiny_train_config(tmp_path / "run", "qwen2", override))
    with pytest.raises(UserError) as e:
        run.setup_output()  # the stage before the tokenizer and the model
    assert said in str(e.value) and "\n" not in str(e.value)
    for name in ("base", "tok"):  # neither the model nor the tokenizer was loaded
        with pytest.raises(RuntimeError, match=rf"^TrainingRun.{name} is set by setup_\w+\(\), which has not run$"):
            getattr(run, name)


def test_a_misspelt_optimizer_stops_run_train_in_seconds(tiny_train_config, tmp_path):
    t0 = time.time()
    with pytest.raises(UserError, match="Did you mean 'adamw_torch'"):
        run_train(tiny_train_config(tmp_path / "run", "qwen2", "train.optim=adamw"))
    assert time.time() - t0 < 30 and not (tmp_path / "run" / "log.jsonl").exists()


def test_good_settings_pass_the_checks():
    from domaintune.training.arguments import check_train_settings

    for kw in ({}, {"optim": "sgd"}, {"optim": "adafactor", "lr_scheduler": "constant"},
               {"lr_scheduler": "cosine_with_min_lr", "trainer_args": {"lr_scheduler_kwargs": {"min_lr_rate": 0.1}}},
               {"trainer_args": {"adam_beta2": 0.95, "adam_epsilon": 1e-6, "optim_args": "a=1, b=2"}},
               {"optim": "galore_adamw"}):  # needs the model to be built: left to the Trainer
        check_train_settings(_train_section(**kw))
        check_trainer_args(_train_section(**kw).trainer_args)


def test_a_lora_rank_above_the_models_hidden_size_is_refused_before_it_loads(tiny_model_dir):
    import json

    from domaintune.config import load_config
    from domaintune.training.arguments import check_lora_rank

    model = tiny_model_dir("qwen2")
    hidden = json.loads((model / "config.json").read_text())["hidden_size"]
    check_lora_rank(load_config(None, [f"lora.r={hidden}"]).lora, str(model))
    with pytest.raises(UserError, match=rf"lora.r {hidden + 1} is larger than the hidden size of model '{model}' "
                                        rf"\({hidden}\)"):
        check_lora_rank(load_config(None, [f"lora.r={hidden + 1}"]).lora, str(model))
    check_lora_rank(load_config(None, ["lora.r=16384"]).lora, "nobody/not-downloaded")  # nothing to read: no error


def test_run_train_refuses_a_lora_rank_above_the_hidden_size_before_the_model_loads(tiny_model_dir, tiny_train_config,
                                                                                    tmp_path, monkeypatch):
    import json

    from domaintune.training import model as loader
    from domaintune.training.trainer import run_train

    model = tiny_model_dir("qwen2")
    hidden = json.loads((model / "config.json").read_text())["hidden_size"]
    monkeypatch.setattr(loader, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(UserError, match=rf"lora.r {hidden + 1} is larger than the hidden size"):
        run_train(tiny_train_config(tmp_path / "out", "qwen2", f"lora.r={hidden + 1}"))
