"""Every command the README shows exists: each `domaintune ...` line (in code blocks, and the verbs named in
tables and text) parses with the real CLI, every `make` target is in the Makefile, and `hf download` (README or
docs pages) is the installed huggingface_hub's command. Regression (issue 9, defect 8): the README told users to
run `huggingface-cli download`, which the installed huggingface_hub no longer has. The README is a front door:
under 12 KB (its links into the built docs site are checked by tests/test_docs.py)."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from domaintune import cli

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
DOC_PAGES = {p.relative_to(REPO).as_posix(): p.read_text(encoding="utf-8")
             for p in sorted((REPO / "docs").rglob("*.md"))}


def _shell_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S)


def _commands(text: str) -> list[list[str]]:
    """The commands of the README's shell blocks, continuation lines joined, comments dropped."""
    out = []
    for block in _shell_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                out.append(shlex.split(line))
    return out


def _domaintune_argv(argv: list[str]) -> list[str] | None:
    """The arguments after `domaintune` (also as .venv/bin/domaintune or `-m domaintune` under a launcher)."""
    for i, word in enumerate(argv):
        if word.endswith("domaintune") and (i == 0 or argv[i - 1] == "-m"):
            return argv[i + 1:]
    return None


COMMANDS = _commands(README)
DOMAINTUNE = [a for a in (_domaintune_argv(c) for c in COMMANDS) if a is not None]


def test_the_extractor_finds_the_readmes_commands():
    assert len(DOMAINTUNE) >= 10
    assert ["train", "configs/qwen2.5-0.5b-lora.yaml", "data.path=runs/gen-data-docs/train.jsonl"] in DOMAINTUNE
    assert any(c[:2] == ["make", "test"] for c in COMMANDS)
    continued = _commands("```bash\ndomaintune train a.yaml \\\n    data.path=x.jsonl  # a comment\n```\n")
    assert continued == [["domaintune", "train", "a.yaml", "data.path=x.jsonl"]]


def test_the_readme_is_a_front_door_under_12_kb():
    assert len(README.encode("utf-8")) < 12 * 1024
    for heading in ("## The two commands", "## Supported models", "## A taste of the loop"):
        assert heading in README


@pytest.mark.parametrize("argv", DOMAINTUNE, ids=[" ".join(a)[:60] for a in DOMAINTUNE])
def test_every_domaintune_command_parses(argv):
    parser = cli.build_parser()
    args, extra = parser.parse_known_args(argv)
    assert args.verb is not None
    assert all("=" in x and not x.startswith("-") for x in extra), f"unknown arguments {extra}"  # dotted overrides


def test_every_verb_the_readme_names_exists():
    verbs = set(next(a for a in cli.build_parser()._actions if a.dest == "verb").choices)
    named = set(re.findall(r"`(?:\.venv/bin/)?domaintune ([a-z][a-z-]*)", README))
    assert named and named <= verbs, named - verbs
    table = set(re.findall(r"^\| `domaintune ([a-z-]+)", README, flags=re.M))
    assert table == verbs  # the verb table lists every verb


def test_every_make_target_exists():
    targets = set(re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(encoding="utf-8"), flags=re.M))
    used = {c[1] for c in COMMANDS if c[0] == "make"}
    assert used and used <= targets, used - targets


def test_hugging_face_commands_exist_in_the_installed_cli():
    hf_lines = [c for text in (README, *DOC_PAGES.values()) for c in _commands(text)
                if c[0] in ("hf", "huggingface-cli")]
    assert hf_lines and all(c[0] == "hf" for c in hf_lines)
    hf = shutil.which("hf") or str(Path(sys.executable).with_name("hf"))
    for c in hf_lines:
        r = subprocess.run([hf, c[1], "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        for flag in (w.split("=")[0] for w in c[2:] if w.startswith("--")):
            assert flag in r.stdout, f"hf {c[1]} has no {flag}"
    assert "huggingface-cli" not in README and not any("huggingface-cli" in t for t in DOC_PAGES.values())
    for cfg in (REPO / "configs").glob("*.yaml"):
        assert "huggingface-cli" not in cfg.read_text(encoding="utf-8"), cfg.name


def _reliability_refs() -> list[tuple[str, str | None]]:
    """(test file, test name or None) for every `path.py::name`, `::name` (same file) and `path.py` in the
    "proved by" column of RELIABILITY.md."""
    refs = []
    for line in (REPO / "RELIABILITY.md").read_text(encoding="utf-8").splitlines():
        if not line.startswith("|") or line.count("|") < 3:
            continue
        current = None
        for ref in re.findall(r"`([^`]+)`", line.rstrip(" |").rsplit("|", 1)[-1]):
            path, _, name = ref.partition("::")
            if path.endswith(".py"):
                current = path
            if current:
                refs.append((current, name or None))
    return refs


def test_every_test_reliability_md_cites_exists():
    refs = _reliability_refs()
    assert len(refs) > 40
    for path, name in refs:
        file = REPO / "tests" / path
        assert file.is_file(), f"RELIABILITY.md cites {path}, which does not exist"
        if name:
            assert re.search(rf"^(async )?def {re.escape(name)}\(", file.read_text(encoding="utf-8"), re.M), \
                f"RELIABILITY.md cites {path}::{name}, which does not exist"
