"""Config YAML that is valid YAML but not plain config data: nested-alias bombs, cycles, deep nesting, duplicate keys,
dates, binary and sets, non-UTF-8 files. Each is read as plain data or refused with one line naming the file (or the
override) and the line, never a traceback or unbounded memory (issue 22, defects 11 and 15)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from domaintune.config import load_config, parse_override
from domaintune.config.yamltext import MAX_DEPTH, MAX_VALUES, load_yaml
from domaintune.errors import UserError


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def _alias_bomb(levels: int = 9, fan: int = 9) -> str:
    """The classic "billion laughs": each level lists the previous one `fan` times, so 9 levels of 9 stand for
    9**9 = 387 million strings in under 500 bytes."""
    lines = ["a0: &a0 [" + ", ".join(["lol"] * fan) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fan) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


# A bounded child process: the old code copied the config through json.dumps, which expands every alias: it grew
# to gigabytes and never finished.
_BOUNDED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from domaintune.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("text", [
    _alias_bomb(),
    # the same through `<<` merge keys, which PyYAML flattens by copying (doubling at each level)
    "m0: &m0 {k: 1}\n" + "".join(f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}], k{i}: 1}}\n" for i in range(1, 40)),
], ids=["nested-aliases", "nested-merges"])
def test_an_alias_bomb_is_refused_in_bounded_memory_and_time(tmp_path, text):
    cfg = _write(tmp_path / "bomb.yaml", text)
    assert len(text.encode()) < 2000
    r = subprocess.run([sys.executable, "-c", _BOUNDED, "config", str(cfg)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: {cfg} line ")
    assert f"with its aliases (*name) expanded the config holds more than {MAX_VALUES} values" in r.stderr
    assert r.stdout == ""


def test_aliases_and_merges_within_the_bound_still_work(tmp_path):
    path = _write(tmp_path / "cfg.yaml", "data:\n  system: &sys hello\nselfinstruct:\n  domain: *sys\n"
                                         "train:\n  learning_rate: &lr 0.001\njudge:\n  retry_base_delay: *lr\n")
    cfg = load_config(path)
    assert cfg.selfinstruct.domain == "hello" and cfg.judge.retry_base_delay == 0.001
    merged = load_yaml("base: &b {learning_rate: 0.1, seed: 1}\ntrain: {<<: *b, seed: 2}\n", "m.yaml")
    assert merged["train"] == {"learning_rate": 0.1, "seed": 2}  # a merge key's value may be replaced: not a duplicate


def test_an_alias_that_holds_itself_is_refused(tmp_path):
    cfg = _write(tmp_path / "cyc.yaml", "train: &t\n  trainer_args:\n    x: *t\n")
    with pytest.raises(UserError, match=r"cyc\.yaml line 1: an alias refers to the value that holds it \(a cycle\)"):
        load_config(cfg)


def test_deep_nesting_is_refused_in_a_file_and_in_an_override(tmp_path):
    deep = "[" * 3000 + "]" * 3000
    cfg = _write(tmp_path / "deep.yaml", f"train:\n  trainer_args:\n    x: {deep}\n")
    with pytest.raises(UserError, match=rf"deep\.yaml line 3: nested more than {MAX_DEPTH} levels deep"):
        load_config(cfg)
    block = "".join("  " * i + f"k{i}:\n" for i in range(3000)) + "  " * 3000 + "v: 1\n"
    with pytest.raises(UserError, match=rf"line {MAX_DEPTH}: nested more than {MAX_DEPTH} levels deep"):
        load_config(_write(tmp_path / "block.yaml", block))
    with pytest.raises(UserError, match=r"override 'train.trainer_args=\[\[\[.*\.\.\.' line 1: nested more than "):
        load_config(None, [f"train.trainer_args={deep}"])
    with pytest.raises(UserError, match=r"the key is 3000 levels deep"):
        load_config(None, [".".join(["a"] * 3000) + "=1"])
    # deep through aliases (each level one line, no text nesting)
    chain = "l0: &l0 [1]\n" + "".join(f"l{i}: &l{i} [*l{i - 1}]\n" for i in range(1, 60))
    with pytest.raises(UserError, match=rf"nested more than {MAX_DEPTH} levels deep \(with aliases expanded\)"):
        load_config(_write(tmp_path / "chain.yaml", chain))
    nested = "train:\n  trainer_args:\n    lr_scheduler_kwargs: {num_cycles: 0.5}\n"
    assert load_config(_write(tmp_path / "ok.yaml", nested)).train.trainer_args == {
        "lr_scheduler_kwargs": {"num_cycles": 0.5}}


def test_a_duplicated_key_is_refused_with_both_lines(tmp_path):
    cfg = _write(tmp_path / "dup.yaml", "train:\n  learning_rate: 0.1\nlora:\n  r: 4\ntrain:\n  seed: 3\n")
    with pytest.raises(UserError) as e:
        load_config(cfg)
    assert str(e.value) == (f"{cfg} line 5: duplicate key 'train' (first at line 1); the second would silently "
                            "replace the first: merge them into one")
    nested = _write(tmp_path / "nested.yaml", "train:\n  seed: 1\n  learning_rate: 0.1\n  seed: 2\n")
    with pytest.raises(UserError, match=r"nested\.yaml line 4: duplicate key 'seed' \(first at line 2\)"):
        load_config(nested)
    with pytest.raises(UserError, match=r"flow\.yaml line 1: duplicate key 'seed' \(first at line 1\)"):
        load_config(_write(tmp_path / "flow.yaml", "train: {seed: 1, seed: 2}\n"))
    with pytest.raises(UserError, match=r"override 'train.trainer_args=\{a: 1, a: 2\}' line 1: duplicate key 'a'"):
        load_config(None, ["train.trainer_args={a: 1, a: 2}"])


def test_dates_are_kept_as_the_text_written(tmp_path):
    cfg = load_config(_write(tmp_path / "d.yaml", "train:\n  output_dir: 2024-01-01\nmodel:\n  revision: 2001-12-14 "
                                                   "21:59:43.10\ndata:\n  system: !!timestamp 2002-12-14\n"))
    assert cfg.train.output_dir == "2024-01-01"
    assert cfg.model.revision == "2001-12-14 21:59:43.10"
    assert cfg.data.system == "2002-12-14"
    assert load_config(None, ["train.output_dir=2024-01-01"]).train.output_dir == "2024-01-01"
    assert parse_override("data.system=2024-01-01") == (["data", "system"], "2024-01-01")


@pytest.mark.parametrize("value, said", [
    ("!!binary aGVsbG8=", "binary data (!!binary) is not a config value; write it as text"),
    ("!!set {a, b}", "a set (!!set) is not a config value; write a list"),
])
def test_binary_and_set_values_are_refused_with_their_line(tmp_path, value, said):
    cfg = _write(tmp_path / "t.yaml", f"train:\n  seed: 1\n  output_dir: {value}\n")
    with pytest.raises(UserError) as e:
        load_config(cfg)
    assert str(e.value) == f"{cfg} line 3: {said}"


def test_keys_that_are_not_names_are_refused(tmp_path):
    with pytest.raises(UserError, match=r"k\.yaml line 2: the key 'on' is not a name; config keys are names"):
        load_config(_write(tmp_path / "k.yaml", "train:\n  on: 1\n"))
    with pytest.raises(UserError, match=r"c\.yaml line 1: a list or mapping as a key is not a name"):
        load_config(_write(tmp_path / "c.yaml", "? [a, b]\n: 1\n"))


def test_a_file_that_is_not_utf8_names_its_line(tmp_path):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("train:\n  seed: 1\n  output_dir: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError) as e:
        load_config(cfg)
    assert str(e.value) == f"{cfg} line 3: not UTF-8 text (byte 0xe9); save the file as UTF-8"
    bom = tmp_path / "bom.yaml"
    bom.write_bytes("\ufefftrain:\n  output_dir: café\n".encode())
    assert load_config(bom).train.output_dir == "café"  # a UTF-8 byte-order mark (Windows editors) is fine


def test_yaml_syntax_errors_are_one_line(tmp_path):
    cfg = _write(tmp_path / "bad.yaml", "train: [1,\n")
    with pytest.raises(UserError) as e:
        load_config(cfg)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"{cfg}: not valid YAML: line 2, column 1: expected the node content, but found "
                                   "'<stream end>'")
    with pytest.raises(UserError, match=r"could not determine a constructor for the tag '!foo'"):
        load_config(_write(tmp_path / "tag.yaml", "train:\n  output_dir: !foo x\n"))


def test_unreadable_config_paths_are_one_line(tmp_path):
    with pytest.raises(UserError, match=r"config file '.{200}\.\.\.' cannot be read: File name too long"):
        load_config("x" * 5000 + ".yaml")
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path)  # a folder
