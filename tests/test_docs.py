"""The docs site (mkdocs.yml, docs/): the generated reference pages are complete and exact, every config snippet
in the pages validates, every `domaintune` command in them parses, and `mkdocs build --strict` succeeds.

The reference pages come from docs/gen_reference.py; these tests read what it wrote and compare it with the code
by their own walk of the parser and the schema, so a flag or key added, renamed or removed without the reference
following fails here (and `test_the_checks_catch_a_missing_and_a_stale_entry` proves they would)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from domaintune import cli, rundir
from domaintune.config import Config, build_config, explain

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def _gen():
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _gen()
PAGES = GEN.pages()


def _sections(md: str) -> dict[str, str]:
    """Level-2 headings -> their text."""
    parts = re.split(r"^## (.+)$", md, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _first_cells(text: str) -> list[str]:
    """The first cell of every table row (header and rule rows left out)."""
    rows = re.findall(r"^\| (.*?) \|", text, flags=re.M)
    return [r for r in rows if r not in ("option", "key", "field", "method", "constant") and not r.startswith("---")]


# ---------------------------------------------------------------- CLI

def _documented_flags(md: str) -> dict[str, set[str]]:
    """{verb ("" for the options before it): the option strings and positionals its table lists}."""
    out = {}
    for heading, body in _sections(md).items():
        m = re.fullmatch(r"`domaintune(?: ([a-z-]+))?`.*", heading)
        if m:
            out[m[1] or ""] = {name for cell in _first_cells(body) for name in re.findall(r"`([^`]+)`", cell)}
    return out


def _parser_flags(parser: argparse.ArgumentParser) -> dict[str, set[str]]:
    def names(p: argparse.ArgumentParser) -> set[str]:
        found: set[str] = set()
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction) or a.help == argparse.SUPPRESS:
                continue
            found |= set(a.option_strings) or {a.metavar if isinstance(a.metavar, str) else a.dest}
        return found

    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"": names(parser), **{verb: names(p) for verb, p in subs.choices.items()}}


def _cli_mismatch(md: str, parser: argparse.ArgumentParser) -> dict[str, tuple[set[str], set[str]]]:
    """{verb: (in the CLI but not the reference, in the reference but not the CLI)} where they differ."""
    documented, real = _documented_flags(md), _parser_flags(parser)
    out = {}
    for verb in documented.keys() | real.keys():
        missing, stale = real.get(verb, set()) - documented.get(verb, set()), \
            documented.get(verb, set()) - real.get(verb, set())
        if missing or stale or verb not in documented or verb not in real:
            out[verb] = (missing, stale)
    return out


def test_the_cli_reference_lists_every_verb_and_flag_and_no_other():
    md = PAGES[GEN.CLI]
    assert _cli_mismatch(md, cli.build_parser()) == {}
    train = _sections(md)["`domaintune train`"]
    assert "`--resume`" in train and "usage: domaintune train" in train
    predict = _sections(md)["`domaintune predict`"]
    # a default and a help text, as --help prints them
    row = next(r for r in predict.splitlines() if r.startswith("| `--data`"))
    assert "test" in row.lower()


def test_the_cli_reference_shows_each_default():
    parser = cli.build_parser()
    serve = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    port = next(a for a in serve._actions if "--port" in a.option_strings)
    row = next(r for r in _sections(PAGES[GEN.CLI])["`domaintune serve`"].splitlines() if r.startswith("| `--port`"))
    assert row.split(" | ")[1] == f"`{port.default}`"


# ---------------------------------------------------------------- config

def _documented_keys(md: str) -> dict[str, str]:
    """{dotted key: its default cell} of the config reference."""
    rows = re.findall(r"^\| `([^`]+)` \| .*? \| `(.*?)` \| .*\|$", md, flags=re.M)
    return dict(rows)


def _schema_keys(model: type[BaseModel] = Config, prefix: str = "") -> set[str]:
    """Every leaf key of the schema, walked from the pydantic models (sections nest; data.path's mappings too)."""
    keys: set[str] = set()
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys |= _schema_keys(ann, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def _explained_keys() -> set[str]:
    return {line.split(" = ", 1)[0] for line in explain() if " = " in line.split("  # ", 1)[0]}


def test_the_config_reference_lists_every_key_and_no_other():
    documented = set(_documented_keys(PAGES[GEN.CONFIG]))
    assert documented == _explained_keys()
    assert _schema_keys() <= documented  # and every field of the models, walked apart from explain()
    assert {k for k in documented if "[]" in k} >= {"data.path[].path", "data.path[].weight"}


def test_the_config_reference_shows_each_default_and_description():
    md = PAGES[GEN.CONFIG]
    defaults = _documented_keys(md)
    cfg = Config()
    for key in _schema_keys():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        shown = json.dumps(value.model_dump() if isinstance(value, BaseModel) else value, ensure_ascii=False)
        assert defaults[key].replace("\\|", "|") == " ".join(shown.split()), key
    lr = GEN.config_field("train.learning_rate")
    assert lr.description and lr.description.split()[0] in md.split("`train.learning_rate`", 1)[1].split("\n")[0]


def test_the_checks_catch_a_missing_and_a_stale_entry():
    parser = cli.build_parser()
    md = PAGES[GEN.CLI]
    without_resume = "\n".join(r for r in md.splitlines() if not r.startswith("| `--resume`"))
    assert "train" in _cli_mismatch(without_resume, parser)
    stale = md.replace("| `--resume`", "| `--resume-from-nowhere`", 1)
    assert _cli_mismatch(stale, parser)["train"][1] == {"--resume-from-nowhere"}
    config = PAGES[GEN.CONFIG].replace("`train.learning_rate`", "`train.lr`", 1)
    documented = set(_documented_keys(config))
    assert "train.learning_rate" in _explained_keys() - documented and "train.lr" in documented - _explained_keys()


# ---------------------------------------------------------------- run directory, serve

def test_the_run_directory_reference_holds_rundirs_table_and_every_file_name():
    md = PAGES[GEN.RUNDIR]
    for row in re.findall(r"^\| [^|]+ \| .*$", rundir.__doc__ or "", flags=re.M):
        assert row.strip() in md
    for name, value in vars(rundir).items():
        if name.isupper() and isinstance(value, str):
            assert f"| `{name}` | `{value}` |" in md


def test_the_serve_reference_lists_every_route_and_request_field():
    from fastapi.routing import APIRoute

    from domaintune.inference.serve import protocol
    from domaintune.inference.serve.app import create_app

    md = PAGES[GEN.SERVE]
    listed = set(re.findall(r"^\| (GET|POST|PUT|DELETE|PATCH) \| `([^`]+)` \| (.+) \|$", md, flags=re.M))
    real = {(m, r.path) for r in create_app().routes if isinstance(r, APIRoute) and r.include_in_schema
            for m in r.methods}
    assert {(m, p) for m, p, _ in listed} == real
    assert {("POST", "/v1/chat/completions"), ("GET", "/health")} <= real
    assert all(doc.strip() for _, _, doc in listed)  # each route says what it does
    chat = _sections(md)["POST `/v1/chat/completions`: request body `ChatCompletionRequest`"]
    assert set(re.findall(r"^\| `([^`]+)`", chat, flags=re.M)) == set(protocol.ChatCompletionRequest.model_fields)


# ---------------------------------------------------------------- the hand-written pages

HAND_WRITTEN = sorted(DOCS.glob("**/*.md"))


def test_every_config_snippet_in_the_docs_validates():
    snippets = [(p.name, block) for p in HAND_WRITTEN
                for block in re.findall(r"```ya?ml\n(.*?)```", p.read_text(encoding="utf-8"), flags=re.S)]
    assert snippets, "no config snippet found in docs/*.md"
    for name, block in snippets:
        build_config(yaml.safe_load(block), source=name)


def _docs_commands() -> list[list[str]]:
    """The `domaintune` commands of the pages' shell blocks (continuation lines joined, comments dropped). A line
    whose quote spans lines (a JSON body, a heredoc) is split on spaces: its first words are what is checked."""
    commands = []
    for page in HAND_WRITTEN:
        for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                try:
                    argv = shlex.split(line.split(" #", 1)[0])
                except ValueError:
                    argv = line.split()
                if argv and argv[0].endswith("domaintune"):
                    end = next((i for i, w in enumerate(argv) if w in ("|", "||", "&&", ";", "&")
                                or w.startswith((">", "2>", "<"))), len(argv))  # where the shell takes over
                    commands.append(argv[1:end])
    return commands


def test_every_domaintune_command_in_the_docs_parses():
    parser = cli.build_parser()
    verbs = set(next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices)
    commands = _docs_commands()
    assert len(commands) >= 120
    for argv in commands:
        if "--help" in argv or "-h" in argv:  # argparse would print and exit: the verb must exist
            assert argv[0] in verbs | {"--help", "-h"}, argv
            continue
        args, extra = parser.parse_known_args(argv)
        assert args.verb is not None, argv
        assert all("=" in x and not x.startswith("-") for x in extra), f"unknown arguments {extra} in {argv}"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site as `make docs` builds it (mkdocs build --strict); the build itself is asserted to succeed."""
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("mkdocs-material is not installed: it is in the test extra (pip install -e '.[test]')")
        pytest.skip("mkdocs-material is not installed (pip install -e '.[test]')")
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_mkdocs_build_strict_succeeds(site):
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]

    def pages(entry):
        if isinstance(entry, str):
            yield entry
        elif isinstance(entry, dict):
            for value in entry.values():
                yield from pages(value)
        else:
            for item in entry:
                yield from pages(item)

    listed = list(pages(nav))
    assert len(listed) >= 27
    for page in listed:  # every page of the nav was built
        html = "index.html" if page == "index.md" else page.removesuffix(".md") + "/index.html"
        assert (site / html).is_file(), page
    assert "train.learning_rate" in (site / "reference/config/index.html").read_text(encoding="utf-8")
    assert not list(site.rglob("*.py"))  # the generator and the hook are not published
    assert not [p for p in site.rglob("*.html") if "<p>&lt;!-- " in p.read_text(encoding="utf-8")]  # markers hidden


def _readme_links() -> list[str]:
    text = re.sub(r"```.*?```", "", (REPO / "README.md").read_text(encoding="utf-8"), flags=re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text)


# repository files the site publishes as pages of their own (docs/gen_reference.py)
PUBLISHED = {"RELIABILITY.md": GEN.RELIABILITY, "bench/README.md": GEN.BENCHMARKS}


def test_every_readme_link_resolves_in_the_built_site(site):
    links = _readme_links()
    assert len(links) >= 20
    for link in links:
        assert not link.startswith(("http:", "https:")), link  # the front door points into the docs
        target, _, anchor = link.partition("#")
        page = PUBLISHED.get(target) or target.removeprefix("docs/")
        assert target in PUBLISHED or target.startswith("docs/"), f"README links outside the site: {link}"
        if page.endswith(".md"):
            built = site / ("index.html" if page == "index.md" else page.removesuffix(".md") + "/index.html")
        else:
            built = site / page  # an image
        assert built.is_file(), f"README link {link}: {built.relative_to(site)} is not in the site"
        if anchor:
            assert f'id="{anchor}"' in built.read_text(encoding="utf-8"), f"README link {link}: no #{anchor} there"


def test_the_generated_pages_hold_the_table_and_the_repository_files():
    from domaintune.families import TABLE_NOTE, render_table

    assert render_table() in PAGES[GEN.MODELS] and TABLE_NOTE in PAGES[GEN.MODELS]
    assert PAGES[GEN.RELIABILITY] == (REPO / "RELIABILITY.md").read_text(encoding="utf-8")
    assert PAGES[GEN.BENCHMARKS] == (REPO / "bench" / "README.md").read_text(encoding="utf-8")


def test_five_or_more_tutorials_and_how_to_pages_run_in_ci():
    """The pages tests/docs/ runs (their commands, from an empty folder, on tiny stand-ins)."""
    from docs_harness import marked_pages

    ran = [p for p in marked_pages(DOCS) if p.relative_to(DOCS).parts[0] in ("tutorials", "howto")]
    assert len(ran) >= 5, ran
