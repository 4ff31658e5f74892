"""The package's shape: imports point one way with no circle, argparse lives in cli/ alone, modules stay short,
and `domaintune --help` stays fast.

Layers, top to bottom (a module may import its own layer or a lower one; cli/ is imported by nothing else):
  1. cli (and __main__)
  2. studio (the web app: it runs the stages' code, and nothing but cli imports it)
  3. the stage packages: training, inference, evaluation, datagen, and quickstart
  4. data, rundir, config
  5. jsonl, errors, bundled, console, families, processes (and the package root, which holds only the version)

Every import counts, including imports inside functions (the lazy ones) and under TYPE_CHECKING.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "domaintune"
LAYERS = {"cli": 1, "__main__": 1, "studio": 2, "training": 3, "inference": 3, "evaluation": 3, "datagen": 3,
          "quickstart": 3, "data": 4, "rundir": 4, "config": 4, "jsonl": 5, "errors": 5, "bundled": 5, "console": 5,
          "families": 5, "processes": 5, "": 5}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (a package is named by its __init__.py)."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> set[str]:
    """The project modules `name` imports, relative imports resolved."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if _is_package(name) else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the module pkg.sub; `from mod import name` imports mod.
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _layer(name: str) -> int:
    parts = name.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else ""]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walker_sees_every_verb_module_and_the_lazy_imports():
    # guards the test itself: a walker that found nothing would pass everything
    assert {"domaintune.cli", "domaintune.cli.options", "domaintune.inference.loading",
            "domaintune.training.trainer", "domaintune.config.sections"} <= set(MODULES)
    assert "domaintune.inference.loading" in GRAPH["domaintune.inference.engine"]  # a lazy import in from_run
    assert "domaintune.training.model" in GRAPH["domaintune.inference.loading"]  # `from ..training import model`
    assert "domaintune.config.sections" in GRAPH["domaintune.config.loading"]  # relative, one level
    assert "domaintune.errors" in GRAPH["domaintune.inference.serve.server"]  # relative, three levels


def test_no_import_circle_between_modules():
    assert _cycles(GRAPH) == []


def test_no_import_circle_between_packages():
    top = {}
    for name, deps in GRAPH.items():
        src = name.split(".")[1] if "." in name else ""
        top.setdefault(src, set()).update(d.split(".")[1] if "." in d else "" for d in deps)
    top = {k: v - {k} for k, v in top.items()}
    assert _cycles(top) == []


def test_the_circle_finder_finds_circles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_imports_point_down_the_layers():
    upward = sorted(f"{name} (layer {_layer(name)}) imports {dep} (layer {_layer(dep)})"
                    for name, deps in GRAPH.items() for dep in deps if _layer(dep) < _layer(name))
    assert upward == []


def test_nothing_outside_cli_imports_cli():
    outside = sorted(f"{name} imports {dep}" for name, deps in GRAPH.items()
                     if _layer(name) != 1 for dep in deps if dep.split(".")[1:2] == ["cli"])
    assert outside == []


def test_argparse_lives_in_cli_only():
    offenders = [str(path.relative_to(SRC)) for name, path in MODULES.items() if _layer(name) != 1
                 and ("add_argument" in path.read_text(encoding="utf-8")
                      or "import argparse" in path.read_text(encoding="utf-8"))]
    assert offenders == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_short(name):
    lines = MODULES[name].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(SRC)} has {lines} lines: split it by concern"


def test_help_answers_fast():
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "domaintune", "--help"], capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - t0
    assert r.returncode == 0 and r.stdout.startswith("usage: domaintune")
    assert seconds < 3, f"domaintune --help took {seconds:.2f} s"


def test_dtype_names_agree():
    import typing

    from domaintune.config import ModelConfig
    from domaintune.training.precision import DTYPES

    assert typing.get_args(ModelConfig.model_fields["dtype"].annotation) == DTYPES


def test_every_package_folder_has_an_init_with_a_docstring():
    """A folder without __init__.py is a namespace package: find_packages() and pkgutil skip it."""
    folders = {p.parent for p in PKG.rglob("*.py")}
    missing = sorted(str(f.relative_to(SRC)) for f in folders if not (f / "__init__.py").is_file())
    assert missing == []
    undocumented = sorted(str(f.relative_to(SRC)) for f in folders if (f / "__init__.py").is_file()
                          and ast.get_docstring(ast.parse((f / "__init__.py").read_text(encoding="utf-8"))) is None)
    assert undocumented == []
