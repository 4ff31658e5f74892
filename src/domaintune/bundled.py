"""Files shipped inside the package, so the quickstart and the tiny models work from any folder and from a plain
`pip install`: the sample data (examples/data in the source tree), the sample documents that gen-data's documents
config reads (examples/docs), the Slurm script (examples/slurm) and the example configs (configs/).

In the source tree they are symbolic links (src/domaintune/sample_data, sample_docs, sample_slurm, configs) to
the one copy at the repository's top level; a built wheel holds real files.

`domaintune init` (`write_examples`) writes them into a folder at the paths the configs use (configs/...,
examples/data/...), so every command in a config's header comment runs as written after a `pip install`. It
never overwrites a file. Every "config file not found" error ends with `config_not_found_hint`, which names it.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import UserError


def _bundled(name: str) -> Path:
    path = Path(str(resources.files("domaintune").joinpath(name)))
    if not path.is_dir():
        raise UserError(f"this domaintune installation lacks its bundled {name}/ ({path}); reinstall domaintune")
    return path


def sample_data_dir() -> Path:
    """The bundled sample data: train.jsonl, test.jsonl, chat.jsonl, seeds.jsonl."""
    return _bundled("sample_data")


def example_config(name: str) -> Path:
    """A bundled example config by file name, e.g. quickstart.yaml."""
    path = _bundled("configs") / name
    if not path.is_file():
        shipped = ", ".join(sorted(p.name for p in _bundled("configs").glob("*.yaml")))
        raise UserError(f"no bundled config '{name}'; bundled: {shipped}")
    return path


# Where each bundled folder goes in the user's folder: the paths the shipped configs use.
LAYOUT = {"configs": "configs", "sample_data": "examples/data", "sample_docs": "examples/docs",
          "sample_slurm": "examples/slurm"}
_SHIPPED_GLOBS = {"configs": ("*.yaml", "distributed/*.json"), "sample_data": ("*.jsonl", "*.md"),
                  "sample_docs": ("*.md",), "sample_slurm": ("*.sbatch",)}


def shipped_files() -> dict[str, Path]:
    """Every shipped config and sample file: {path in the user's folder (e.g. `configs/judge.yaml`): bundled file}."""
    out = {}
    for folder, target in LAYOUT.items():
        root = _bundled(folder)
        for pattern in _SHIPPED_GLOBS[folder]:
            for path in sorted(root.glob(pattern)):
                out[f"{target}/{path.relative_to(root).as_posix()}"] = path
    return out


def example_names() -> list[str]:
    """The names `domaintune init NAME` takes: the shipped configs' paths under configs/, without `.yaml`."""
    return [rel[len("configs/"):].removesuffix(".yaml") for rel in shipped_files() if rel.startswith("configs/")]


def _what_it_runs(path: Path) -> str:
    """A config's first comment line: the command that runs it."""
    first = path.read_text(encoding="utf-8").split("\n", 1)[0]
    return first.lstrip("# ").strip() if first.startswith("#") else ""


def list_examples() -> list[str]:
    """One line per shipped config: its name and the command that runs it."""
    files = shipped_files()
    names = example_names()
    width = max(map(len, names))
    return [f"{n.ljust(width)}  " + ("train.distributed_config (torchrun / deepspeed engines)" if n.endswith(".json")
                                     else _what_it_runs(files[f"configs/{n}.yaml"])) for n in names]


def _resolve(name: str) -> str:
    """`judge`, `judge.yaml`, `configs/judge.yaml` or `distributed/fsdp.json` -> its path under the user's folder."""
    files = shipped_files()
    key = name.removeprefix("./").removeprefix("configs/")
    for cand in (f"configs/{key}", f"configs/{key}.yaml"):
        if cand in files:
            return cand
    close = difflib.get_close_matches(key.removesuffix(".yaml"), example_names(), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    yamls = [n for n in example_names() if not n.endswith(".json")]
    raise UserError(f"no shipped config '{name}': {hint}`domaintune init --list` shows them ({', '.join(yamls)}, "
                    "distributed/*.json)")


def _references(text: str, files: dict[str, Path]) -> list[str]:
    """The shipped files a config names (its data, seeds, test set, the configs its comments tell to run first),
    and every shipped file in a folder it names (`documents: [examples/docs]`)."""
    def named(path: str) -> bool:
        return re.search(r"(?<![\w/.-])" + re.escape(path) + r"/?(?![\w/.-])", text) is not None

    return [rel for rel in files if named(rel) or (rel.startswith("examples/") and named(rel.rsplit("/", 1)[0]))]


@dataclass(frozen=True)
class Written:
    path: str  # relative to the target folder
    status: str  # "written", "unchanged" (already there, same bytes) or "kept" (already there, different: untouched)


def write_examples(names: list[str] | tuple[str, ...], target: str | Path = ".") -> list[Written]:
    """Write the shipped configs `names` (all of them when empty), the sample files they name, into `target` at
    the paths the configs use. An existing file is never overwritten (reported as "unchanged" or "kept")."""
    files = shipped_files()
    wanted = list(files) if not names else [_resolve(name) for name in names]
    for rel in wanted:  # grows while it is walked: a named config's own references come along too
        if rel.endswith(".yaml"):
            wanted += [r for r in _references(files[rel].read_text(encoding="utf-8"), files) if r not in wanted]
    wanted = list(dict.fromkeys(wanted))
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UserError(f"--dir '{target}' is a file: give a folder")
    out = []
    for rel in wanted:
        dest, data = target / rel, files[rel].read_bytes()
        if dest.exists():
            out.append(Written(rel, "unchanged" if dest.is_file() and dest.read_bytes() == data else "kept"))
            continue
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "xb") as f:  # "x": never replaces a file that appeared meanwhile
                f.write(data)
        except OSError as e:
            raise UserError(f"cannot write '{dest}': {e.strerror or e}") from None
        out.append(Written(rel, "written"))
    return out


def config_not_found_hint(path: str | Path) -> str:
    """The end of a "config file not found" error: the `domaintune init` command that writes a shipped config
    of that name, or how to list them."""
    try:
        names = example_names()
    except UserError:  # an installation without its bundled files: the error itself is what matters
        return ""
    name = Path(path).name.removesuffix(".yaml")
    if name in names:
        return f"; it is a shipped example: `domaintune init {name}` writes it (and the sample data it names) here"
    return "; `domaintune init --list` shows the shipped example configs, `domaintune init NAME` writes one here"
