"""config: unknown keys with suggestions, type errors, dotted overrides, `domaintune config` (print, --explain,
--from-json), and the flat BLOOM-LoRA JSON conversion."""
from __future__ import annotations

import json

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from domaintune import cli
from domaintune.config import (
    Config,
    apply_overrides,
    build_config,
    config_from_flat,
    explain,
    load_config,
    parse_override,
)
from domaintune.data.encode import split_validation
from domaintune.errors import UserError


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def _defaults() -> dict:
    return Config().model_dump(mode="json")


def _leaf_fields(cls=Config, prefix=""):
    """(dotted name, FieldInfo) of every non-section field, recursively."""
    for name, f in cls.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield prefix + name, f
            yield from _leaf_fields(ann, prefix + name + ".")
        else:
            yield prefix + name, f
            if cls.__name__ == "DataConfig" and name == "path":  # the keys of a source mapping (data.path[].*)
                from domaintune.config.sources import SourceConfig

                yield from _leaf_fields(SourceConfig, prefix + "path[].")


# ---------------------------------------------------------------- unknown keys and types

def test_unknown_key_names_key_and_closest_valid_key(tmp_path):
    cfg = _write(tmp_path / "cfg.yaml", "train:\n  learnig_rate: 0.001\n")
    with pytest.raises(UserError) as e:
        load_config(cfg)
    msg = str(e.value)
    assert msg.startswith(f"{cfg}: invalid config:")
    assert "unknown key 'train.learnig_rate'. Did you mean 'train.learning_rate'?" in msg


def test_unknown_section_suggests_section(tmp_path):
    cfg = _write(tmp_path / "cfg.yaml", "trian:\n  learning_rate: 0.001\n")
    with pytest.raises(UserError) as e:
        load_config(cfg)
    assert ("unknown key 'trian'. Did you mean 'train'? Valid keys here: model, lora, freeze, data, train, "
            "selfinstruct, judge"
            in str(e.value))


def test_unknown_key_in_nested_subsection():
    with pytest.raises(UserError) as e:
        build_config({"selfinstruct": {"persona": {"nam": "x"}}}, "c.yaml")
    assert ("unknown key 'selfinstruct.persona.nam'. Did you mean 'selfinstruct.persona.name'? "
            "Valid keys here: name, organisation, year") in str(e.value)


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(UserError) as e:
        build_config({"lora": {"zzzz": 1}}, "c.yaml")
    msg = str(e.value)
    assert "unknown key 'lora.zzzz'. Valid keys here: enabled, r, alpha, dropout, target_modules" in msg
    assert "Did you mean" not in msg


def test_number_for_text_field_is_taken_as_text():
    # a commit hash of digits given as an override must not be rejected as "not a string" (regression)
    assert load_config(None, ["model.revision=12345678"]).model.revision == "12345678"


@pytest.mark.parametrize("raw, line", [
    ({"train": {"learning_rate": "abc"}}, "'train.learning_rate' must be a number, got 'abc'"),
    ({"train": {"batch_size": 2.5}}, "'train.batch_size' must be an integer, got 2.5"),
    ({"lora": {"enabled": "maybe"}}, "'lora.enabled' must be true or false, got 'maybe'"),
    ({"model": {"name_or_path": [1]}}, "'model.name_or_path' must be a string, got [1]"),
    ({"train": 5}, "'train' must be a mapping (section), got 5"),
    # union fields: one line naming the field itself, not pydantic's union-member tags (regression)
    ({"lora": {"target_modules": 5}}, "'lora.target_modules' must be a list or 'all-linear', got 5"),
    ({"data": {"val_size": "x"}}, "'data.val_size' must be an integer or a number, got 'x'"),
    ({"data": {"overlength": "cut"}}, "'data.overlength' must be 'truncate', 'drop' or 'error', got 'cut'"),
    ({"data": {"val_size": 1.5}},
     "'data.val_size': a fraction must lie in (0, 1); use an integer for a row count (got 1.5)"),
    ({"lora": {"r": 0}}, "'lora.r': Input should be greater than 0 (got 0)"),
])
def test_wrong_type_names_field_and_expected_type(raw, line):
    with pytest.raises(UserError) as e:
        build_config(raw, "cfg.yaml")
    assert str(e.value) == "cfg.yaml: invalid config:\n  " + line


def test_cross_field_check_reads_cleanly():
    with pytest.raises(UserError) as e:
        build_config({"model": {"quantization": "4bit"}, "lora": {"enabled": False}}, "c.yaml")
    assert str(e.value) == ("c.yaml: invalid config:\n  model.quantization needs lora.enabled: true "
                            "(QLoRA trains an adapter on a quantized base)")


def test_all_problems_reported_at_once():
    with pytest.raises(UserError) as e:
        build_config({"train": {"learnig_rate": 1, "batch_size": "many"}}, "c.yaml")
    lines = str(e.value).splitlines()
    assert len(lines) == 3
    assert "unknown key 'train.learnig_rate'" in lines[1]
    assert lines[2] == "  'train.batch_size' must be an integer, got 'many'"


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(UserError, match=r"config file '.*nope\.yaml' not found"):
        load_config(tmp_path / "nope.yaml")
    bad = _write(tmp_path / "bad.yaml", "train: [1,\n")
    with pytest.raises(UserError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)
    lst = _write(tmp_path / "list.yaml", "- a\n- b\n")
    with pytest.raises(UserError, match=r"list\.yaml: the top level must be a mapping"):
        load_config(lst)


def test_empty_file_means_all_defaults(tmp_path):
    assert load_config(_write(tmp_path / "e.yaml", "")) == Config()
    assert load_config(None) == Config()


def test_config_is_read_only():
    cfg = Config()
    with pytest.raises(ValidationError):
        cfg.train.learning_rate = 1.0


# ---------------------------------------------------------------- dotted overrides

def test_parse_override_values_are_yaml():
    assert parse_override("lora.r=16") == (["lora", "r"], 16)
    assert parse_override("train.learning_rate=0.001") == (["train", "learning_rate"], 0.001)
    assert parse_override("lora.enabled=false") == (["lora", "enabled"], False)
    assert parse_override("lora.target_modules=[q_proj, v_proj]") == (["lora", "target_modules"], ["q_proj", "v_proj"])
    assert parse_override("data.eval_path=null") == (["data", "eval_path"], None)
    assert parse_override("data.system=") == (["data", "system"], "")
    assert parse_override("data.system=a=b") == (["data", "system"], "a=b")
    assert parse_override("selfinstruct.domain=家庭教育") == (["selfinstruct", "domain"], "家庭教育")


def test_overrides_apply_over_file_values(tmp_path):
    cfg_path = _write(tmp_path / "cfg.yaml", "lora:\n  r: 4\ntrain:\n  learning_rate: 0.1\n  seed: 7\n")
    cfg = load_config(cfg_path, [
        "lora.r=16", "train.learning_rate=2e-4", "lora.enabled=false", "lora.target_modules=[q_proj, v_proj]",
        "data.val_size=0.2", "data.val_max_rows=30", "train.report_to=[tensorboard]",
        "selfinstruct.persona.name=小助手", "selfinstruct.persona.year=2030",
    ])
    assert cfg.lora.r == 16
    assert cfg.train.learning_rate == 2e-4
    assert cfg.train.seed == 7  # untouched file value
    assert cfg.lora.enabled is False
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.val_size == 0.2 and isinstance(cfg.data.val_size, float)
    assert cfg.data.val_max_rows == 30
    assert cfg.train.report_to == ["tensorboard"]
    assert cfg.selfinstruct.persona.name == "小助手"
    assert cfg.selfinstruct.persona.year == 2030
    # everything else stays default
    expected = _defaults()
    got = cfg.to_dict()
    for sec, key in [("lora", "r"), ("train", "learning_rate"), ("train", "seed"), ("lora", "enabled"),
                     ("lora", "target_modules"), ("data", "val_size"), ("data", "val_max_rows"),
                     ("train", "report_to")]:
        expected[sec][key] = got[sec][key]
    expected["selfinstruct"]["persona"] = got["selfinstruct"]["persona"]
    assert got == expected


def test_override_does_not_mutate_input():
    raw = {"lora": {"r": 4}}
    assert apply_overrides(raw, ["lora.r=8", "train.seed=1"]) == {"lora": {"r": 8}, "train": {"seed": 1}}
    assert raw == {"lora": {"r": 4}}


def test_override_of_nonexistent_key_errors():
    with pytest.raises(UserError) as e:
        load_config(None, ["train.learnig_rate=1e-3"])
    assert "unknown key 'train.learnig_rate'. Did you mean 'train.learning_rate'?" in str(e.value)
    with pytest.raises(UserError, match="unknown key 'nosuch'"):
        load_config(None, ["nosuch.key=1"])


@pytest.mark.parametrize("item, fragment", [
    ("train.learning_rate", "must look like section.key=value"),
    ("train..seed=1", "is not a dotted key"),
    ("=3", "is not a dotted key"),
    ("train.learning_rate.x=1", "'train.learning_rate' must be a number, got {'x': 1}"),
])
def test_malformed_overrides(item, fragment):
    with pytest.raises(UserError) as e:
        load_config(None, [item])
    assert fragment in str(e.value)


def test_override_through_a_value_errors():
    with pytest.raises(UserError, match="override 'train.learning_rate.x=1': 'learning_rate' is not a section"):
        apply_overrides({"train": {"learning_rate": 0.1}}, ["train.learning_rate.x=1"])


def test_override_type_error_names_field():
    with pytest.raises(UserError) as e:
        load_config(None, ["lora.r=big"])
    assert "'lora.r' must be an integer, got 'big'" in str(e.value)


# ---------------------------------------------------------------- `domaintune config`

def test_cli_config_prints_resolved_config_with_defaults(tmp_path, capsys):
    cfg_path = _write(tmp_path / "cfg.yaml", "model:\n  name_or_path: /models/bloomz\nlora:\n  r: 4\n"
                                              "data:\n  template: chatml\n  cutoff_len: 1024\n")
    assert cli.main(["config", str(cfg_path), "train.num_epochs=1"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = _defaults()
    expected["model"]["name_or_path"] = "/models/bloomz"
    expected["lora"]["r"] = 4
    expected["data"]["template"] = "chatml"
    expected["data"]["cutoff_len"] = 1024
    expected["train"]["num_epochs"] = 1.0
    assert printed == expected
    assert list(printed) == ["model", "lora", "freeze", "data", "train", "selfinstruct", "judge"]
    assert Config.model_validate(printed) == load_config(cfg_path, ["train.num_epochs=1"])


def test_cli_config_without_file_prints_defaults(capsys):
    assert cli.main(["config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == _defaults()


def test_cli_config_out_file_loads_back(tmp_path, capsys):
    cfg_path = _write(tmp_path / "cfg.yaml", "train:\n  learning_rate: 3.0e-5\n")
    out = tmp_path / "resolved.yaml"
    assert cli.main(["config", str(cfg_path), "--out", str(out), "lora.r=2"]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert load_config(out) == load_config(cfg_path, ["lora.r=2"])
    assert load_config(out).train.learning_rate == 3e-5


def test_every_field_has_a_description():
    missing = [name for name, f in _leaf_fields() if not (f.description or "").strip()]
    assert missing == []


def test_cli_config_explain_lists_every_field(capsys):
    assert cli.main(["config", "--explain"]) == 0
    lines = capsys.readouterr().out.splitlines()
    by_name = {}
    for line in lines:
        head, sep, desc = line.partition("  # ")
        assert sep, line
        name = head.split(" = ")[0].rstrip(":")
        by_name[name] = (head, desc)
    fields = dict(_leaf_fields())
    assert set(by_name) == set(fields)
    assert len(lines) == len(fields)
    for name, f in fields.items():
        head, desc = by_name[name]
        assert desc == f.description and desc.strip(), name
        ann = f.annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            default = f.get_default(call_default_factory=True)
            assert json.loads(head.split(" = ", 1)[1]) == default, name
    assert by_name["train.learning_rate"][0] == "train.learning_rate = 0.0002"
    assert by_name["data.template"][0] == 'data.template = "domain_zh"'
    assert explain(Config) == lines


# ---------------------------------------------------------------- flat JSON (BLOOM LoRA projects)

RUN = {
    "model_name_or_path": "bigscience/bloomz-560m", "data_path": "data/train.json", "output_dir": "runs/bloom",
    "batch_size": 8, "per_device_train_batch_size": 2, "num_epochs": 2, "learning_rate": 3e-4, "cutoff_len": 256,
    "val_set_size": 50, "val_set_rate": 0.1, "save_steps": 100, "eval_steps": 100, "warmup_steps": 10,
    "logging_steps": 5,
}
LORA = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.1, "lora_target_modules": ["query_key_value"]}


def test_config_from_flat_maps_every_key():
    assert config_from_flat(RUN, LORA) == {
        "model": {"name_or_path": "bigscience/bloomz-560m"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.1, "target_modules": ["query_key_value"], "enabled": True},
        "data": {"path": "data/train.json", "cutoff_len": 256, "val_size": 0.1, "val_max_rows": 50},
        "train": {"output_dir": "runs/bloom", "batch_size": 8, "per_device_batch_size": 2, "num_epochs": 2,
                  "learning_rate": 3e-4, "save_steps": 100, "eval_steps": 100, "logging_steps": 5,
                  "warmup_steps": 10},
    }


def test_flat_gradient_accumulation():
    """batch_size stays the global batch: accumulation is derived at train time, per number of processes
    (regression: it was pinned to batch_size / per_device, so torchrun with 2 processes doubled the batch)."""
    from domaintune.training.arguments import grad_accumulation

    cfg = build_config(config_from_flat({"batch_size": 8, "per_device_train_batch_size": 2}))
    assert cfg.train.gradient_accumulation_steps is None
    assert (cfg.train.batch_size, cfg.train.per_device_batch_size) == (8, 2)
    assert grad_accumulation(cfg.train, 1) == 8 // 2
    assert grad_accumulation(cfg.train, 2) == 8 // (2 * 2)
    cfg = build_config(config_from_flat({"batch_size": 32, "per_device_train_batch_size": 4,
                                         "gradient_accumulation_steps": 2}))
    assert cfg.train.gradient_accumulation_steps == 2  # given explicitly: kept
    assert grad_accumulation(cfg.train, 1, quiet=True) == 2
    with pytest.raises(UserError, match="batch_size 10 is not a multiple of per_device_train_batch_size 4"):
        config_from_flat({"batch_size": 10, "per_device_train_batch_size": 4})


@pytest.mark.parametrize("rate, size, expected", [(0.1, 50, 50), (0.01, 50, 10), (None, 50, 50), (0.05, None, 50)])
def test_flat_validation_size_is_min_of_size_and_rate(rate, size, expected):
    run = {k: v for k, v in (("val_set_rate", rate), ("val_set_size", size)) if v is not None}
    cfg = build_config(config_from_flat(run))
    rows = list(range(1000))
    train, val = split_validation(rows, cfg.data.val_size, cfg.data.val_max_rows, cfg.train.seed)
    assert len(val) == expected
    assert len(train) == 1000 - expected
    assert sorted(train + val) == rows


def test_flat_unknown_keys_error():
    with pytest.raises(UserError) as e:
        config_from_flat({"batch_size": 8, "lr": 1e-4}, source="run.json")
    assert str(e.value).startswith("run.json: unknown key(s) ['lr']; known: ")
    with pytest.raises(UserError, match=r"LoRA file: unknown key\(s\) \['r'\]"):
        config_from_flat({}, {"r": 8})


def test_cli_from_json_writes_yaml_that_loads_back(tmp_path, capsys):
    from domaintune.training.arguments import grad_accumulation

    run_json = _write(tmp_path / "run.json", json.dumps(RUN))
    lora_json = _write(tmp_path / "lora.json", json.dumps(LORA))
    out = tmp_path / "x.yaml"
    assert cli.main(["config", "--from-json", str(run_json), "--lora-json", str(lora_json), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    text = out.read_text(encoding="utf-8")
    assert text.startswith(f"# converted from {run_json} + {lora_json}\n")
    loaded = load_config(out)
    assert loaded == build_config(config_from_flat(RUN, LORA))
    assert loaded.train.gradient_accumulation_steps is None
    assert grad_accumulation(loaded.train, 1) == 4 and grad_accumulation(loaded.train, 2) == 2
    assert loaded.lora.target_modules == ["query_key_value"]
    assert (loaded.data.val_size, loaded.data.val_max_rows) == (0.1, 50)


def test_cli_from_json_bad_json_names_file_and_line(tmp_path, capsys):
    run_json = _write(tmp_path / "run.json", '{\n  "batch_size": 8,\n  "num_epochs": \n}\n')
    assert cli.main(["config", "--from-json", str(run_json)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run_json} line 4: not valid JSON")


# ---------------------------------------------------------------- issue 9: first-contact problems

def test_an_override_error_names_the_override_not_the_file(tmp_path):
    cfg = _write(tmp_path / "cfg.yaml", "train:\n  learning_rate: 1e-4\n")
    with pytest.raises(UserError) as e:
        load_config(cfg, ["train.learning_rate=abc"])
    assert str(e.value) == ("invalid command-line override:\n  override 'train.learning_rate=abc': "
                            "'train.learning_rate' must be a number, got 'abc'")
    with pytest.raises(UserError) as e:  # one mistake in the file, one on the command line: each named
        load_config(_write(tmp_path / "bad.yaml", "lora:\n  r: many\n"), ["train.seed=x", "lora.alpha=2"])
    assert str(e.value) == (f"{tmp_path / 'bad.yaml'}: invalid config:\n  'lora.r' must be an integer, got 'many'\n"
                            "  override 'train.seed=x': 'train.seed' must be an integer, got 'x'")
    with pytest.raises(UserError) as e:
        load_config(cfg, ["train.learnig_rate=1"])
    assert str(e.value).startswith("invalid command-line override:\n  override 'train.learnig_rate=1': unknown key "
                                   "'train.learnig_rate'. Did you mean 'train.learning_rate'?")


def test_the_model_is_required_and_cannot_be_empty(tmp_path, capsys):
    assert Config().model.name_or_path is None  # no silent fallback to a tiny test model
    with pytest.raises(UserError, match=r"^model.name_or_path is not set: give the base model"):
        Config().model.required_name()
    with pytest.raises(UserError) as e:
        load_config(None, ["model.name_or_path="])
    assert str(e.value) == ("invalid command-line override:\n  override 'model.name_or_path=': 'model.name_or_path': "
                            "is empty: set it to a local model folder or a hub id such as Qwen/Qwen2.5-0.5B-Instruct "
                            "(got '')")
    cfg = _write(tmp_path / "cfg.yaml", "data:\n  path: x.jsonl\ntrain:\n  output_dir: out\n")
    assert cli.main(["train", str(cfg)]) == 2
    assert capsys.readouterr().err.startswith("error: model.name_or_path is not set: give the base model, in the "
                                              "config file")
    assert not (tmp_path / "out").exists()


def test_sections_of_other_verbs_are_left_out_while_at_defaults(tmp_path, capsys):
    cfg = load_config(None, ["model.name_or_path=m"])
    assert list(cfg.to_dict(omit_default_sections=True)) == ["model", "lora", "freeze", "data", "train"]
    # `domaintune config` shows all
    assert list(cfg.to_dict()) == ["model", "lora", "freeze", "data", "train", "selfinstruct", "judge"]
    cfg = load_config(None, ["selfinstruct.domain=家庭教育"])
    assert cfg.to_dict(omit_default_sections=True)["selfinstruct"]["domain"] == "家庭教育"  # set by the user: kept
    run_json = _write(tmp_path / "run.json", json.dumps(RUN))
    assert cli.main(["config", "--from-json", str(run_json)]) == 0
    assert "selfinstruct" not in yaml.safe_load(capsys.readouterr().out.split("\n", 1)[1])


def test_loftq_is_a_qlora_initialisation_the_config_accepts():
    """lora.init loftq goes with model.quantization 4bit (the adapter is fitted to the 4-bit base); the machine's
    CUDA and bitsandbytes are checked later, before the model loads (training/lora_methods.py)."""
    cfg = build_config({"model": {"name_or_path": "m", "quantization": "4bit"}, "lora": {"init": "loftq"}})
    assert (cfg.lora.init, cfg.model.quantization) == ("loftq", "4bit")


@pytest.mark.parametrize("section", ["selfinstruct", "judge"])
@pytest.mark.parametrize("url", ["", "  ", "api.openai.com/v1", "ftp://host/v1"])
def test_an_endpoint_that_is_not_a_url_is_refused_when_the_config_loads(section, url):
    """Regression (issue 27): `selfinstruct.base_url=$TEACHER_URL` with the variable unset was accepted, and
    gen-data tried six times to reach '' before it said why."""
    with pytest.raises(UserError, match=rf"'{section}.base_url': not an endpoint: give an http:// or https:// URL"):
        load_config(None, [f"{section}.base_url={url}"])
    cfg = load_config(None, [f"{section}.base_url=http://127.0.0.1:8000/v1"])
    assert getattr(cfg, section).base_url == "http://127.0.0.1:8000/v1"
