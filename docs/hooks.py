"""MkDocs hook (registered in mkdocs.yml): every build regenerates the reference pages from the code of this
checkout (docs/gen_reference.py), so they cannot drift from it. Nothing is written into docs/."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    # this checkout's package, not whichever domaintune the environment has installed
    for path in (str(DOCS.parent / "src"), str(DOCS)):
        if path not in sys.path:
            sys.path.insert(0, path)
    import gen_reference

    for uri, text in gen_reference.pages().items():
        files.append(File.generated(config, uri, content=text))
    return files
