"""cli: every verb listed, --version, a stated default for every option, UserError -> exit 2 without a
traceback, and a --help that imports neither torch nor transformers."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest

from domaintune import __version__, cli


def _verb_parsers() -> dict[str, argparse.ArgumentParser]:
    """The verbs registered by the modules of cli.VERB_MODULES."""
    sub = argparse.ArgumentParser(prog="domaintune").add_subparsers()
    for module in cli.VERB_MODULES:
        module.register(sub)
    return dict(sub.choices)


VERBS = _verb_parsers()


def _run_main(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_core_verbs_exist():
    assert {"config", "data-check", "make-tiny-model"} <= set(VERBS)


def test_help_lists_every_verb(capsys):
    code, out, _ = _run_main(["--help"], capsys)
    assert code == 0
    listed = set(re.findall(r"^    (\S+)", out, flags=re.M))
    assert listed == set(VERBS)


def test_version(capsys):
    code, out, _ = _run_main(["--version"], capsys)
    assert code == 0 and out == f"domaintune {__version__}\n"


def _option_entries(help_text: str) -> list[str]:
    """The entries of the `options:` section, continuation lines joined to their option."""
    section = help_text.split("\noptions:\n", 1)[1]
    entries: list[str] = []
    for line in section.splitlines():
        if not line.strip():
            break
        if re.match(r"^  -", line):
            entries.append(line.strip())
        else:
            entries[-1] += " " + line.strip()
    return entries


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_option_states_its_default(verb, capsys):
    """Every option's help says its default; a required option (which has none) must say that it is required."""
    code, out, _ = _run_main([verb, "--help"], capsys)
    assert code == 0
    required = {s for a in VERBS[verb]._actions if a.required for s in a.option_strings}
    entries = [e for e in _option_entries(out) if not e.startswith("-h, --help")]
    assert entries or not [a for a in VERBS[verb]._actions if a.option_strings and a.dest != "help"]
    lacking = [e for e in entries
               if "default" not in e.lower() and not (e.split()[0].rstrip(",") in required and "required" in e.lower())]
    assert lacking == [], f"{verb}: options without a stated default"


def test_option_entry_parser_joins_wrapped_help():
    text = ("usage: x\n\noptions:\n  -h, --help  show\n  --lora-json LORA_JSON\n"
            "                        flat JSON LoRA config\n"
            "                        (default: none)\n\nmore:\n  -z  no\n")
    assert _option_entries(text) == ["-h, --help  show", "--lora-json LORA_JSON flat JSON LoRA config (default: none)"]


def test_no_verb_prints_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert capsys.readouterr().out.startswith("usage: domaintune")


def test_unknown_argument_is_a_usage_error(capsys):
    code, _, err = _run_main(["config", "--nope"], capsys)
    assert code == 2 and "unrecognized arguments: --nope" in err


def test_overrides_after_options_are_collected(tmp_path, capsys):
    out = tmp_path / "x.yaml"
    assert cli.main(["config", "--out", str(out), "lora.r=3", "train.seed=5"]) == 0
    text = out.read_text(encoding="utf-8")
    assert "  r: 3\n" in text and "  seed: 5\n" in text
    capsys.readouterr()


def test_config_overrides_without_a_file(capsys):
    assert cli.main(["config", "lora.r=3"]) == 0
    assert "  r: 3\n" in capsys.readouterr().out
    assert cli.main(["config", "cfg.yaml", "--from-json", "run.json"]) == 2
    assert capsys.readouterr().err == "error: give either a config file ('cfg.yaml') or --from-json, not both\n"


def test_user_error_exit_2_in_process(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert cli.main(["config", str(missing)]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == (f"error: config file '{missing}' not found; `domaintune init --list` shows the shipped example "
                       "configs, `domaintune init NAME` writes one here\n")
    assert cli.main(["judge", str(tmp_path / "configs" / "judge.yaml"), "--run", str(tmp_path)]) == 2
    assert capsys.readouterr().err.rstrip().endswith(
        "it is a shipped example: `domaintune init judge` writes it (and the sample data it names) here")


def test_user_error_exit_2_without_traceback(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train:\n  learnig_rate: 0.1\n", encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "domaintune", "config", str(cfg)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.startswith(f"error: {cfg}: invalid config:\n  unknown key 'train.learnig_rate'. "
                               "Did you mean 'train.learning_rate'?")
    assert "Traceback" not in r.stderr


def test_help_imports_no_heavy_libraries():
    code = ("import domaintune.cli, sys; domaintune.cli.build_parser(); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "False False\n"


def test_a_reader_that_goes_away_is_not_a_traceback():
    """`domaintune config --explain | head -1` closed the pipe early and printed a BrokenPipeError traceback."""
    import fcntl

    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, 1031, 4096)  # F_SETPIPE_SZ: a one-page pipe, smaller than the ~8 KB it prints
    proc = subprocess.Popen([sys.executable, "-m", "domaintune", "config", "--explain"], stdout=write_end,
                            stderr=subprocess.PIPE)
    os.close(write_end)
    os.read(read_end, 10)
    os.close(read_end)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in (0, 1) and "Traceback" not in err and "BrokenPipe" not in err
