"""Settings that used to pass validation and fail only after the model had loaded (issue 22, defect 14: the seed's
range, infinite numbers, a huge LoRA rank), and the keys users bring from other tools (defect 31: `lora.rank`)."""
from __future__ import annotations

import pytest

from domaintune.config import apply_overrides, load_config
from domaintune.errors import UserError


def _error(*overrides: str) -> str:
    with pytest.raises(UserError) as e:
        load_config(None, list(overrides))
    return str(e.value)


@pytest.mark.parametrize("seed, said", [
    ("-1", "'train.seed': Input should be greater than or equal to 0 (got -1)"),
    ("99999999999", "'train.seed': Input should be less than or equal to 4294967295 (got 99999999999)"),
])
def test_the_seed_is_bounded_to_what_numpy_takes(seed, said):
    assert _error(f"train.seed={seed}") == f"invalid command-line override:\n  override 'train.seed={seed}': {said}"
    assert load_config(None, ["train.seed=4294967295"]).train.seed == 2**32 - 1
    assert load_config(None, ["train.seed=0"]).train.seed == 0


@pytest.mark.parametrize("item", ["train.num_epochs=.inf", "train.learning_rate=.nan", "train.max_grad_norm=.inf",
                                  "lora.alpha=.inf", "judge.request_timeout=.inf", "data.val_size=.nan"])
def test_infinite_and_nan_numbers_are_refused(item):
    key = item.partition("=")[0]
    assert f"override '{item}': '{key}': Input should be a finite number" in _error(item)


def test_a_huge_lora_rank_is_refused_by_the_config():
    assert ("override 'lora.r=10000000': 'lora.r': Input should be less than or equal to 16384 (got 10000000)"
            in _error("lora.r=10000000"))
    assert load_config(None, ["lora.r=256"]).lora.r == 256


def test_a_lora_rank_above_the_hidden_size_is_refused():
    lora = load_config(None, ["lora.r=65"]).lora
    lora.check_rank({"hidden_size": 128})
    with pytest.raises(UserError, match=r"lora.r 65 is larger than the hidden size of the model \(64\)"):
        lora.check_rank({"hidden_size": 64})
    with pytest.raises(UserError, match=r"\(64\)"):
        lora.check_rank({"n_embd": 64})  # GPT-2 / BLOOM-style config names
    with pytest.raises(UserError, match=r"\(32\)"):
        lora.check_rank({"text_config": {"hidden_size": 32}})  # multimodal configs
    lora.check_rank({})  # nothing to compare with
    load_config(None, ["lora.r=65", "lora.enabled=false"]).lora.check_rank({"hidden_size": 64})  # no adapter


@pytest.mark.parametrize("key, meant", [
    ("lora.rank", "lora.r"), ("lora.lora_alpha", "lora.alpha"), ("lora.lora_dropout", "lora.dropout"),
    ("train.epochs", "train.num_epochs"), ("train.num_train_epochs", "train.num_epochs"),
    ("train.lr", "train.learning_rate"), ("train.lr_scheduler_type", "train.lr_scheduler"),
    ("train.optimizer", "train.optim"), ("train.per_device_train_batch_size", "train.per_device_batch_size"),
    ("data.max_seq_length", "data.cutoff_len"), ("model.model_name_or_path", "model.name_or_path"),
    ("data.val_set_size", "data.val_size"), ("train.LR", "train.learning_rate"),
])
def test_keys_from_other_tools_suggest_ours(key, meant):
    assert f"unknown key '{key}'. Did you mean '{meant}'?" in _error(f"{key}=1")


def test_an_alias_is_only_suggested_where_it_is_a_key():
    # `rank` under train is not lora.r: the suggestion stays within the section it was written in
    assert "Did you mean 'train.r'" not in _error("train.rank=1")


@pytest.mark.parametrize("item, said", [
    ("model.name_or_path=~nobody-here-at-all/m", "'~nobody-here-at-all' names no home folder on this machine"),
    ("data.path=a\0b.jsonl", "contains a NUL character, which no file name may hold"),
    ("train.output_dir=runs/" + "x" * 300, "has a file or folder name longer than 255 bytes"),
    ("data.eval_path=" + "中" * 90, "has a file or folder name longer than 255 bytes"),  # 270 bytes in UTF-8
])
def test_paths_no_file_system_takes_are_refused_by_the_config(item, said):
    """Found by the config fuzz: pathlib raised RuntimeError for an unknown ~user, and a name over 255 bytes
    reached open() (OSError: File name too long), both as tracebacks."""
    msg = _error(item)
    assert said in msg and msg.count("\n") == 1
    assert load_config(None, ["data.path=~/data/train.jsonl"]).data.path == "~/data/train.jsonl"


def test_control_characters_in_keys_and_overrides_stay_on_one_line(tmp_path):
    """Found by the config fuzz: an unknown key holding a carriage return or a newline broke the message."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text('lora:\n  "r\\r": 4\n', encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_config(cfg)
    assert str(e.value) == (f"{cfg}: invalid config:\n  unknown key 'lora.r\\r'. Did you mean 'lora.r'? Valid keys "
                            "here: enabled, r, alpha, dropout, target_modules, use_dora, use_rslora, init, "
                            "modules_to_save, layers")
    assert "override 'lora.\\x07=4': unknown key 'lora.\\x07'." in _error("lora.\x07=4")
    with pytest.raises(UserError) as e:
        apply_overrides({"train": {"seed": 1}}, ["train.seed.x=\n"])
    assert str(e.value) == "override 'train.seed.x=\\n': 'seed' is not a section"
