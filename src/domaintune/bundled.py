"""Files shipped inside the package, so the quickstart and the tiny models work from any folder and from a plain
`pip install`: the sample data (examples/data in the source tree) and the example configs (configs/).

In the source tree both are symbolic links (src/domaintune/sample_data, src/domaintune/configs) to the one copy
at the repository's top level; a built wheel holds real files.
"""
from __future__ import annotations

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
