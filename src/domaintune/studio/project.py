"""The project folder the studio serves (ROOT) and the one gate every path of a request goes through.

```
ROOT/configs/NAME.yaml   configs the form saves
ROOT/data/               data files; uploads land here
ROOT/documents/          documents for gen-data; uploads land here
ROOT/models/             local model folders
ROOT/runs/NAME/          run directories
ROOT/.studio/jobs/       one record (ID.json) and one log (ID.log) per job the studio started
```

Folders are created on demand, never at construction, so pointing the studio at a folder changes nothing until
something is saved there. A path from a request is only used after `Project.confine` resolved it inside ROOT.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from ..errors import UserError
from ..rundir import CHECKPOINT_PREFIX, MODEL_CONFIG

FOLDERS = ("configs", "data", "documents", "models", "runs")
UPLOAD_FOLDERS = ("data", "documents")
STUDIO_DIR = ".studio"
JOBS_DIR = "jobs"
MODEL_SEARCH_DEPTH = 3  # ROOT/models/org/name: deep enough for hub-style org/name folders, shallow enough to be quick
_UPLOAD_PREFIX = ".upload-"  # partial uploads: hidden, so list_files never shows half a file


class Forbidden(UserError):
    """A path from a request that would leave the project folder (or is not a plain name where one is needed)."""


class TooLarge(UserError):
    """An upload over the size limit; the partial file is already deleted."""


class Project:
    """A project folder: its standard folders and the path checks of the studio."""

    def __init__(self, root: str | os.PathLike):
        path = Path(root).expanduser()
        if not path.is_dir():
            raise UserError(f"studio: {path} is not a folder: create it, or pass the project folder to serve")
        self.root = path.resolve()

    def __repr__(self) -> str:
        return f"Project({str(self.root)!r})"

    def folder(self, name: str) -> Path:
        """ROOT/NAME for one of FOLDERS, created when missing."""
        if name not in FOLDERS:
            raise Forbidden(f"'{name}' is not a project folder (one of {', '.join(FOLDERS)})")
        path = self.root / name
        path.mkdir(exist_ok=True)
        return path

    @property
    def jobs_dir(self) -> Path:
        """ROOT/.studio/jobs, created when missing."""
        path = self.root / STUDIO_DIR / JOBS_DIR
        path.mkdir(parents=True, exist_ok=True)
        return path

    def relpath(self, path: Path) -> str:
        """`path` (inside ROOT) relative to ROOT, "/"-separated; "." for ROOT itself."""
        return Path(path).resolve().relative_to(self.root).as_posix()

    def confine(self, rel: str) -> Path:
        """The resolved path of `rel` (relative to ROOT). Refuses, with Forbidden naming it: a NUL byte, an absolute
        path, a `..` part, and any path whose resolution (symlinks followed) lies outside ROOT. The path need not
        exist."""
        if not isinstance(rel, str) or "\0" in rel:
            raise Forbidden(f"path {rel!r}: a NUL byte is not allowed in a path")
        if rel.startswith(("/", "\\")) or os.path.isabs(rel) or (len(rel) > 1 and rel[1] == ":"):
            raise Forbidden(f"path '{rel}': give a path relative to the project folder, not an absolute one")
        if ".." in rel.replace("\\", "/").split("/"):
            raise Forbidden(f"path '{rel}': '..' is not allowed; give a path inside the project folder")
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root):
            raise Forbidden(f"path '{rel}' leads outside the project folder {self.root} (a symlink?)")
        return path

    def save_upload(self, folder: str, filename: str, chunks: Iterable[bytes], limit: int) -> Path:
        """Write an uploaded file into ROOT/FOLDER (one of UPLOAD_FOLDERS) under the basename of `filename`,
        replacing a file of that name. The bytes go to a hidden temp file that is renamed into place when complete,
        so a reader never sees half an upload; past `limit` bytes the temp file is deleted and TooLarge raised."""
        if folder not in UPLOAD_FOLDERS:
            raise Forbidden(f"uploads go into {' or '.join(UPLOAD_FOLDERS)}, not '{folder}'")
        name = upload_name(filename)
        target = self.confine(f"{folder}/{name}")
        if target.is_dir():
            raise Forbidden(f"upload '{name}': {folder}/{name} is a folder; rename the file")
        fd, tmp_name = tempfile.mkstemp(prefix=_UPLOAD_PREFIX, suffix=".part", dir=self.folder(folder))
        tmp = Path(tmp_name)
        try:
            size = 0
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise TooLarge(f"upload '{name}' is over the limit of {limit} bytes: nothing was saved "
                                       "(raise the studio's upload limit, or copy the file into the folder yourself)")
                    f.write(chunk)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return target

    def list_files(self, folder: str) -> list[dict]:
        """The files under ROOT/FOLDER (any depth; hidden files, partial uploads and symlinks leaving ROOT left
        out), sorted by relpath: {name, relpath (from ROOT), size (bytes), mtime (seconds since the epoch)}."""
        base = self.folder(folder)
        out = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if name.startswith("."):
                    continue
                path = Path(dirpath) / name
                try:
                    real = path.resolve()
                    st = real.stat()
                except OSError:  # a dangling symlink, or a file deleted while listing
                    continue
                if not real.is_relative_to(self.root) or not real.is_file() or \
                        any(part.startswith(".") for part in real.relative_to(self.root).parts):
                    continue  # outside ROOT, or a link to a hidden file (.studio/ holds a chat server's key)
                out.append({"name": name, "relpath": path.relative_to(self.root).as_posix(), "size": st.st_size,
                            "mtime": st.st_mtime})
        return sorted(out, key=lambda f: f["relpath"])

    def local_models(self) -> list[str]:
        """Relpaths (from ROOT) of the model folders (holding config.json) under models/ and ROOT, at most
        MODEL_SEARCH_DEPTH below ROOT; runs/, .studio/, hidden folders and checkpoints are not searched, nor is
        the inside of a model folder."""
        found: list[str] = []

        def walk(path: Path, depth: int) -> None:
            try:
                children = sorted(p for p in path.iterdir() if p.is_dir() and not p.is_symlink())
            except OSError:
                return
            for child in children:
                name = child.name
                if name.startswith(".") or name.startswith(CHECKPOINT_PREFIX) or (depth == 0 and name == "runs"):
                    continue
                if (child / MODEL_CONFIG).is_file():
                    found.append(child.relative_to(self.root).as_posix())
                elif depth + 1 < MODEL_SEARCH_DEPTH:
                    walk(child, depth + 1)

        walk(self.root, 0)
        return sorted(found)


def upload_name(filename: str) -> str:
    """The basename of an uploaded file's name (browsers may send a Windows path), refused with Forbidden when it
    is empty, hidden, `.`/`..` or holds a NUL byte."""
    name = str(filename).replace("\\", "/").rsplit("/", 1)[-1].strip()
    if not name or "\0" in name or name.startswith("."):
        raise Forbidden(f"upload name {filename!r}: give a plain file name (not empty, not starting with '.')")
    return name
