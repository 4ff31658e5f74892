"""`domaintune init`: the shipped configs and the sample data they name, written into a folder at the paths the
configs use, never over an existing file; and the hint every "config not found" error carries."""
from __future__ import annotations

from pathlib import Path

import pytest

from domaintune.bundled import config_not_found_hint, example_names, shipped_files, write_examples
from domaintune.cli import main
from domaintune.config import load_config

REPO = Path(__file__).resolve().parents[2]


def test_init_without_names_writes_every_shipped_file_byte_for_byte(tmp_path, capsys):
    assert main(["init", "--dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    want = sorted([p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*") if p.is_file()]
                  + [p.relative_to(REPO).as_posix() for p in (REPO / "examples" / "data").iterdir()]
                  + [p.relative_to(REPO).as_posix() for p in (REPO / "examples" / "docs").iterdir()]
                  + [p.relative_to(REPO).as_posix() for p in (REPO / "examples" / "slurm").iterdir()])
    assert written == want
    for rel in written:
        assert (tmp_path / rel).read_bytes() == (REPO / rel).read_bytes()
    assert out.splitlines() == [f"wrote: {tmp_path / rel}" for rel in shipped_files()]
    assert err == f"next: cd {tmp_path} && domaintune quickstart configs/quickstart.yaml\n"


def test_a_named_config_comes_with_the_files_it_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["init", "judge"]) == 0
    assert capsys.readouterr().out.splitlines() == ["wrote: configs/judge.yaml", "wrote: examples/data/test.jsonl"]
    assert main(["init", "qwen2.5-0.5b-dpo.yaml"]) == 0  # its SFT config, that config's data, and so on
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "wrote: configs/qwen2.5-0.5b-dpo.yaml" and "wrote: configs/qwen2.5-0.5b-lora.yaml" in lines
    assert "wrote: examples/data/preferences.jsonl" in lines and "wrote: examples/data/train.jsonl" in lines
    # the DPO config now loads as its header comment says, with the data it names present
    cfg = load_config("configs/qwen2.5-0.5b-dpo.yaml")
    assert Path(cfg.data.path).is_file()


def test_init_never_overwrites_a_file(tmp_path, capsys):
    mine = tmp_path / "configs" / "quickstart.yaml"
    mine.parent.mkdir()
    mine.write_text("# my own edits\n", encoding="utf-8")
    done = {w.path: w.status for w in write_examples(["quickstart"], tmp_path)}
    assert done == {"configs/quickstart.yaml": "kept", "examples/data/train.jsonl": "written"}
    assert mine.read_text(encoding="utf-8") == "# my own edits\n"
    assert main(["init", "quickstart", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"exists (differs from the shipped one, left as it is): {mine}" in out
    assert f"exists (identical, left as it is): {tmp_path / 'examples/data/train.jsonl'}" in out
    assert mine.read_text(encoding="utf-8") == "# my own edits\n"


def test_an_unknown_name_names_the_closest_and_writes_nothing(tmp_path, capsys):
    assert main(["init", "judg", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no shipped config 'judg': did you mean 'judge'? `domaintune init --list` shows them")
    assert err.count("\n") == 1 and list(tmp_path.iterdir()) == []


def test_list_names_each_config_and_the_command_that_runs_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["init", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == example_names()
    assert any(line.split(None, 1)[1] == "domaintune judge configs/judge.yaml --run runs/qwen2.5-0.5b-lora"
               for line in lines if line.startswith("judge "))
    assert list(tmp_path.iterdir()) == []  # --list writes nothing


@pytest.mark.parametrize("path, hint", [
    ("configs/judge.yaml", "; it is a shipped example: `domaintune init judge` writes it (and the sample data it "
                           "names) here"),
    ("my.yaml", "; `domaintune init --list` shows the shipped example configs, `domaintune init NAME` writes one here"),
])
def test_the_config_not_found_hint_names_init(path, hint):
    assert config_not_found_hint(path) == hint
