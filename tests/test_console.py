"""console: notes, warnings, errors and debug lines on stderr by level; stdout_to_stderr keeps stray library prints
off stdout while result() still reaches it; the CLI's -q/-v before or after the verb."""
from __future__ import annotations

import ast
import io
import logging
from pathlib import Path

import pytest

from domaintune import cli, console


@pytest.fixture(autouse=True)
def _level():
    previous = console.set_verbosity(console.NORMAL)
    yield
    console.set_verbosity(previous)


def _say_everything() -> None:
    console.note("a note")
    console.warn("a warning")
    console.error("an error")
    console.debug("a debug line")


@pytest.mark.parametrize("level,shown", [
    (console.QUIET, ["warning: a warning", "error: an error"]),
    (console.NORMAL, ["a note", "warning: a warning", "error: an error"]),
    (console.VERBOSE, ["a note", "warning: a warning", "error: an error", "a debug line"]),
])
def test_each_level_shows_its_lines_on_stderr_only(capsys, level, shown):
    console.set_verbosity(level)
    _say_everything()
    printed = capsys.readouterr()
    assert printed.out == ""
    assert printed.err.splitlines() == shown
    assert console.progress_enabled() is (level >= console.NORMAL)


def test_stray_prints_go_to_stderr_and_results_to_stdout(capsys):
    with console.stdout_to_stderr():
        print("{'loss': 7.6}")  # what transformers' Trainer prints on stdout
        console.result("run directory: out")
    console.result("outside")
    printed = capsys.readouterr()
    assert printed.out == "run directory: out\noutside\n"
    assert printed.err == "{'loss': 7.6}\n"


def test_results_inside_can_be_progress_too(capsys):
    with console.stdout_to_stderr(keep_results=False):  # the quickstart's steps: their results are its progress
        console.result("run directory: out")
        with console.stdout_to_stderr():
            console.result("still progress")
    console.result("summary")
    assert capsys.readouterr() == ("summary\n", "run directory: out\nstill progress\n")


def test_quiet_drops_stray_prints(capsys):
    console.set_verbosity(console.QUIET)
    with console.stdout_to_stderr():
        print("{'loss': 7.6}")
        console.result("run directory: out")
    assert capsys.readouterr() == ("run directory: out\n", "")


def test_log_records_follow_the_same_format(capsys):
    logger = logging.getLogger("test_console.lib")
    logger.propagate = False
    logger.addHandler(console.LogHandler())
    logger.setLevel(logging.DEBUG)
    try:
        logger.info("loaded")
        logger.warning("odd value %d", 3)
        logger.error("failed")
        assert capsys.readouterr() == ("", "warning: odd value 3\nerror: failed\n")
        console.set_verbosity(console.VERBOSE)
        logger.info("loaded")
        assert capsys.readouterr().err == "test_console.lib: loaded\n"
    finally:
        logger.handlers.clear()


@pytest.mark.parametrize("argv,level", [
    (["eval", "p.jsonl"], console.NORMAL),
    (["-q", "eval", "p.jsonl"], console.QUIET),
    (["eval", "p.jsonl", "--quiet"], console.QUIET),
    (["-v", "predict", "RUN", "--data", "t.jsonl"], console.VERBOSE),
    (["predict", "RUN", "-v", "--data", "t.jsonl"], console.VERBOSE),
    (["--verbose", "config", "c.yaml"], console.VERBOSE),
])
def test_quiet_and_verbose_work_before_or_after_the_verb(argv, level):
    parser = cli.build_parser()
    args = parser.parse_args(argv)
    assert cli._verbosity(args, parser) == level


def test_quiet_with_verbose_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["-q", "eval", "p.jsonl", "-v"])
    assert e.value.code == 2
    assert "-q/--quiet and -v/--verbose contradict each other" in capsys.readouterr().err


def test_main_restores_the_level_and_logging(tmp_path, capsys):
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    assert cli.main(["-q", "eval", str(tmp_path / "missing.jsonl")]) == 2
    assert "error: " in capsys.readouterr().err
    assert console.verbosity() == console.NORMAL
    assert root.handlers == handlers and root.level == level


def test_discard_is_a_text_stream():
    assert isinstance(console._Discard(), io.TextIOBase)


SRC = Path(console.__file__).parent  # the package these tests import
# print(..., file=...) is left only where a line must show whatever the level: Ctrl-C's last words, and the gen-data
# progress line, which writes to the stream it was given (tests pass their own).
STREAM_PRINTS = {"cli/__init__.py", "cli/datagen.py", "datagen/progress.py"}


def _literal_start(node: ast.expr) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value)
    return ""


def test_warnings_and_notes_go_through_console_not_print_or_module_loggers():
    """Regression (issue 22, defect 7): metrics.py, callbacks.py, arguments.py and others printed `warning: ...` on
    stdout, others on stderr, and plot.py logged through a logger nobody configured."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == "console.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                start = _literal_start(node.args[0]) if node.args else ""
                if start.lstrip("\n").startswith(("warning", "note:", "error:")):
                    found.append(f"{rel}:{node.lineno}: print({start[:30]!r}...): use console.warn/note/error")
                if any(k.arg == "file" for k in node.keywords) and rel not in STREAM_PRINTS:
                    found.append(f"{rel}:{node.lineno}: print(..., file=...): use console.note/warn/error")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "getLogger"
                    and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id == "__name__"):
                found.append(f"{rel}:{node.lineno}: a module logger: use console")
    assert found == []
