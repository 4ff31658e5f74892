"""studio/forms.py: the new-run form. Its error for a field is the text `domaintune train` prints after "error: "
for the same value (each test runs the CLI's main() and compares); paths are confined to ROOT and saved
absolute; a saved config is one the CLI reads back as the form built it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from domaintune.cli import main
from domaintune.config import explain, load_config
from domaintune.errors import UserError
from domaintune.families import TINY
from domaintune.studio.forms import config_from_form, form_fields, model_choices, save_config

ROW = {"instruction": "孩子不爱吃饭怎么办？", "output": "规律进餐，少吃零食。"}


class Forbidden(UserError):
    pass


class StandInProject:
    """studio/project.py's Project as STUDIO.md describes it (.root, confine, local_models), for these tests
    until the real one is merged."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def confine(self, rel: str) -> Path:
        if "\0" in rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise Forbidden(f"'{rel}' is outside the project folder")
        return self.root / rel

    def local_models(self) -> list[str]:
        return sorted(p.parent.relative_to(self.root).as_posix() for p in self.root.glob("models/*/config.json"))


@pytest.fixture
def project(tmp_path) -> StandInProject:
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "data" / "train.jsonl").write_text(json.dumps(ROW, ensure_ascii=False) + "\n", encoding="utf-8")
    model = root / "models" / "fake"  # what the checks before loading read: config.json and a tokenizer file
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64}), encoding="utf-8")
    (model / "tokenizer.json").write_text("{}", encoding="utf-8")
    return StandInProject(root)


def good(**over: str) -> dict[str, str]:
    return {"name": "first", "model.name_or_path": "models/fake", "data.path": "data/train.jsonl",
            "train.learning_rate": "1e-4", "lora.r": "", **over}


def cli_error(capsys, argv: list[str]) -> str:
    """What `domaintune ARGV` prints after "error: " (it must fail with exit code 2)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1, err
    return err.split("error: ", 1)[1].removesuffix("\n")


def saved(project: StandInProject, name: str = "first") -> Path:
    raw, errors = config_from_form(good(), project)
    assert errors == {} and raw is not None
    return save_config(raw, project, name)


def test_a_valid_form_gives_absolute_paths_and_a_config_the_cli_reads_back(project, capsys):
    raw, errors = config_from_form(good(**{"data.val_size": "0", "train.report_to": "none"}), project)
    root = project.root
    assert errors == {}
    assert raw == {"model": {"name_or_path": str(root / "models" / "fake")},
                   "data": {"path": str(root / "data" / "train.jsonl"), "val_size": 0},
                   "train": {"learning_rate": 0.0001, "report_to": ["none"],
                             "output_dir": str(root / "runs" / "first")}}
    path = save_config(raw, project, "first")
    assert path == root / "configs" / "first.yaml"
    text = path.read_text(encoding="utf-8")
    assert text.splitlines()[0] == f"# domaintune train {path}"
    assert yaml.safe_load(text) == raw
    capsys.readouterr()
    assert main(["config", str(path)]) == 0
    assert capsys.readouterr().out == load_config(path).to_yaml()


def test_negative_learning_rate_is_the_cli_message(project, capsys):
    raw, errors = config_from_form(good(**{"train.learning_rate": "-1"}), project)
    assert raw is None and list(errors) == ["train.learning_rate"]
    path = saved(project)
    assert cli_error(capsys, ["train", str(path), "train.learning_rate=-1"]) == \
        f"invalid command-line override:\n  override 'train.learning_rate=-1': {errors['train.learning_rate']}"
    bad = path.with_name("bad.yaml")  # the same value written in the file
    bad.write_text(path.read_text(encoding="utf-8").replace("learning_rate: 0.0001", "learning_rate: -1"),
                   encoding="utf-8")
    assert cli_error(capsys, ["train", str(bad)]) == f"{bad}: invalid config:\n  {errors['train.learning_rate']}"


def test_a_value_of_the_wrong_type_and_an_unknown_key_are_the_cli_messages(project, capsys):
    _, errors = config_from_form(good(**{"lora.r": "eight", "train.lr": "0.1"}), project)
    assert set(errors) == {"lora.r", "train.lr"}
    assert "Did you mean 'train.learning_rate'?" in errors["train.lr"]
    path = saved(project)
    assert cli_error(capsys, ["train", str(path), "lora.r=eight", "train.lr=0.1"]) == \
        ("invalid command-line override:\n  override 'train.lr=0.1': " + errors["train.lr"]
         + "\n  override 'lora.r=eight': " + errors["lora.r"])


def test_unknown_model_folder_is_the_cli_message(project, capsys):
    raw, errors = config_from_form(good(**{"model.name_or_path": "models/nope"}), project)
    assert raw is None and list(errors) == ["model.name_or_path"]
    assert "does not exist" in errors["model.name_or_path"]
    missing = project.root / "models" / "nope"
    assert cli_error(capsys, ["train", str(saved(project)), f"model.name_or_path={missing}"]) == \
        errors["model.name_or_path"]


def test_a_data_file_with_a_bad_line_is_the_cli_message(project, capsys):
    bad = project.root / "data" / "bad.jsonl"
    bad.write_text(json.dumps(ROW, ensure_ascii=False) + '\n{"instruction": "no answer"}\n', encoding="utf-8")
    raw, errors = config_from_form(good(**{"data.path": "data/bad.jsonl"}), project)
    assert raw is None and list(errors) == ["data.path"]
    assert "line 2" in errors["data.path"] and "bad.jsonl" in errors["data.path"]
    assert cli_error(capsys, ["train", str(saved(project)), f"data.path={bad}"]) == errors["data.path"]


def test_a_lora_rank_above_the_hidden_size_is_the_cli_message(project, capsys):
    _, errors = config_from_form(good(**{"lora.r": "1000"}), project)
    assert list(errors) == ["lora.r"]
    assert cli_error(capsys, ["train", str(saved(project)), "lora.r=1000"]) == errors["lora.r"]


def test_a_run_folder_that_exists_is_the_cli_message(project, capsys):
    out = project.root / "runs" / "first"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    _, errors = config_from_form(good(), project)
    assert list(errors) == ["train.output_dir"]
    path = save_config({"model": {"name_or_path": str(project.root / "models" / "fake")}}, project, "other")
    assert cli_error(capsys, ["train", str(path), f"train.output_dir={out}"]) == errors["train.output_dir"]


def test_paths_stay_inside_root(project):
    for where in ("../outside.jsonl", "/etc/passwd"):
        raw, errors = config_from_form(good(**{"data.path": where}), project)
        assert raw is None and "outside the project folder" in errors["data.path"]
    _, errors = config_from_form(good(**{"train.output_dir": "../runs"}), project)
    assert "outside the project folder" in errors["train.output_dir"]
    # a template file and the data cache are paths too (a built-in template name is not)
    for field, where in (("data.template", "/tmp/elsewhere/tpl.json"), ("data.template", "../tpl.json"),
                         ("data.cache_dir", "/tmp/elsewhere-cache")):
        raw, errors = config_from_form(good(**{field: where}), project)
        assert raw is None and list(errors) == [field] and "outside the project folder" in errors[field]
    raw, errors = config_from_form(good(**{"data.template": "alpaca", "data.cache_dir": "cache"}), project)
    assert errors == {} and raw["data"]["template"] == "alpaca"
    assert raw["data"]["cache_dir"] == str(project.root / "cache")


def test_several_data_files_one_per_line_and_an_absolute_path_inside_root(project):
    second = project.root / "data" / "more.jsonl"
    second.write_text(json.dumps(ROW, ensure_ascii=False) + "\n", encoding="utf-8")
    raw, errors = config_from_form(good(**{"data.path": "data/train.jsonl\n" + str(second)}), project)
    assert errors == {} and raw is not None
    assert raw["data"]["path"] == [str(project.root / "data" / "train.jsonl"), str(second)]


def test_values_are_read_as_the_command_line_reads_them(project):
    raw, errors = config_from_form(good(**{
        "data.num_proc": "auto", "train.per_device_batch_size": "4", "lora.target_modules": "q_proj, v_proj",
        "train.gradient_checkpointing": "true", "data.system": "yes", "model.dtype": "fp32",
        "train.trainer_args": "{adam_beta2: 0.95}", "train.batch_size": "8"}), project)
    assert errors == {} and raw is not None
    assert raw["data"]["num_proc"] == "auto" and raw["train"]["per_device_batch_size"] == 4
    assert raw["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert raw["train"]["gradient_checkpointing"] is True
    assert raw["data"]["system"] == "yes"  # a text field keeps the text (YAML would make it true)
    assert raw["train"]["trainer_args"] == {"adam_beta2": 0.95}


def test_fields_help_is_the_explain_text():
    fields = {f["name"]: f for f in form_fields()}
    lines = explain()
    for name, f in fields.items():
        line = next(x for x in lines if x.startswith(f"{name} = "))
        assert line == f"{name} = {json.dumps(f['default'], ensure_ascii=False)}  # {f['help']}"
    assert {n.split(".")[0] for n in fields} == {"model", "lora", "data", "train"}
    assert 10 <= sum(f["basic"] for f in fields.values()) <= 14
    assert fields["model.quantization"]["type"] == "choice"
    assert fields["model.quantization"]["choices"] == ["none", "4bit", "8bit"]
    assert (fields["lora.r"]["type"], fields["train.learning_rate"]["type"]) == ("int", "float")
    assert (fields["lora.enabled"]["type"], fields["data.path"]["type"]) == ("bool", "list")
    assert fields["train.per_device_batch_size"]["choices"] == ["auto"]


def test_save_config_refuses_a_name_with_a_folder(project):
    raw, _ = config_from_form(good(), project)
    assert raw is not None
    for name in ("../x", "a/b", "", "x.yaml"):
        with pytest.raises(UserError, match="config name"):
            save_config(raw, project, name)


def test_model_choices(project):
    choices = model_choices(project)
    families = [c for c in choices if c["kind"] == "family"]
    assert [c["arch"] for c in families] == list(TINY)
    qwen2 = families[0]
    assert qwen2["real"] == "Qwen/Qwen2.5-0.5B-Instruct" and qwen2["tiny_exists"] is False
    assert qwen2["tiny_argv"] == ["make-tiny-model", str(project.root / "models" / "tiny-qwen2"), "--arch", "qwen2"]
    assert [c for c in choices if c["kind"] == "local"] == \
        [{"kind": "local", "path": "models/fake", "title": "models/fake", "model_type": "qwen2"}]


def test_a_nested_key_is_set_like_a_dotted_override(project):
    raw, errors = config_from_form(good(**{"train.trainer_args.adam_beta2": "0.95"}), project)
    assert errors == {} and raw is not None and raw["train"]["trainer_args"] == {"adam_beta2": 0.95}
