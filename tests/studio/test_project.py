"""The project folder: path confinement, uploads, file lists and local model folders."""
from __future__ import annotations

import os

import pytest

from domaintune.errors import UserError
from domaintune.studio.project import Forbidden, Project, TooLarge, upload_name


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    return Project(root)


def test_root_must_be_a_folder_and_nothing_is_created_up_front(tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        Project(tmp_path / "missing")
    p = Project(tmp_path)
    assert p.root == tmp_path.resolve()
    assert list(tmp_path.iterdir()) == []
    assert p.folder("data") == tmp_path.resolve() / "data" and (tmp_path / "data").is_dir()
    assert p.jobs_dir == tmp_path.resolve() / ".studio" / "jobs" and p.jobs_dir.is_dir()
    with pytest.raises(Forbidden, match="not a project folder"):
        p.folder("..")


def test_confine_resolves_inside_and_refuses_escapes(project, tmp_path):
    root = project.root
    assert project.confine("data/a.jsonl") == root / "data" / "a.jsonl"
    assert project.confine("data/./x") == root / "data" / "x"
    assert project.confine("") == root
    for bad, words in [("../etc/passwd", "'..' is not allowed"), ("data/../../x", "'..' is not allowed"),
                       ("/etc/passwd", "not an absolute one"), ("\\x", "not an absolute one"),
                       ("C:/x", "not an absolute one"), ("data/a\0b", "NUL byte")]:
        with pytest.raises(Forbidden, match=words) as e:
            project.confine(bad)
        assert isinstance(e.value, UserError)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "data").mkdir()
    os.symlink(outside, root / "data" / "link")
    with pytest.raises(Forbidden, match="leads outside the project folder") as e:
        project.confine("data/link/secret.txt")
    assert "data/link/secret.txt" in str(e.value)
    os.symlink(root / "data", root / "inner")  # a symlink that stays inside is fine
    assert project.confine("inner/x.jsonl") == root / "data" / "x.jsonl"


def test_save_upload_writes_the_basename_and_replaces(project):
    path = project.save_upload("data", "C:\\Users\\me\\train.jsonl", [b'{"a": 1}\n', b'{"a": 2}\n'], limit=100)
    assert path == project.root / "data" / "train.jsonl"
    assert path.read_bytes() == b'{"a": 1}\n{"a": 2}\n'
    project.save_upload("data", "../../train.jsonl", [b"new\n"], limit=100)
    assert path.read_bytes() == b"new\n"
    assert sorted(p.name for p in (project.root / "data").iterdir()) == ["train.jsonl"]
    doc = project.save_upload("documents", "manual.pdf", iter([b"%PDF"]), limit=4)  # exactly the limit is fine
    assert doc.read_bytes() == b"%PDF"


def test_save_upload_over_the_limit_leaves_nothing(project):
    (project.root / "data").mkdir()
    (project.root / "data" / "big.jsonl").write_bytes(b"old")
    with pytest.raises(TooLarge, match="over the limit of 10 bytes"):
        project.save_upload("data", "big.jsonl", [b"12345", b"67890", b"1"], limit=10)
    assert [p.name for p in (project.root / "data").iterdir()] == ["big.jsonl"]
    assert (project.root / "data" / "big.jsonl").read_bytes() == b"old"  # the old file is kept

    def broken():
        yield b"abc"
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        project.save_upload("data", "c.jsonl", broken(), limit=100)
    assert [p.name for p in (project.root / "data").iterdir()] == ["big.jsonl"]


@pytest.mark.parametrize("name", ["", ".", "..", ".env", "a/.hidden", "x\0y", "dir/"])
def test_upload_names_refused(project, name):
    with pytest.raises(Forbidden):
        upload_name(name)
    with pytest.raises(Forbidden):
        project.save_upload("data", name, [b"x"], limit=10)


def test_upload_folder_must_be_data_or_documents(project):
    with pytest.raises(Forbidden, match="data or documents"):
        project.save_upload("configs", "a.yaml", [b"x"], limit=10)
    with pytest.raises(Forbidden):
        project.save_upload("..", "a.yaml", [b"x"], limit=10)


def test_list_files(project, tmp_path):
    data = project.folder("data")
    (data / "b.jsonl").write_bytes(b"12345")
    (data / "sub").mkdir()
    (data / "sub" / "a.csv").write_bytes(b"1")
    (data / ".upload-x.part").write_bytes(b"partial")
    (data / ".hidden").mkdir()
    (data / ".hidden" / "h.jsonl").write_bytes(b"h")
    secret = tmp_path / "secret.txt"
    secret.write_text("s")
    os.symlink(secret, data / "leak.txt")
    os.symlink(data / "b.jsonl", data / "alias.jsonl")
    files = project.list_files("data")
    assert [f["relpath"] for f in files] == ["data/alias.jsonl", "data/b.jsonl", "data/sub/a.csv"]
    b = files[1]
    assert b["name"] == "b.jsonl" and b["size"] == 5 and b["mtime"] == pytest.approx((data / "b.jsonl").stat().st_mtime)
    assert project.list_files("documents") == []


def test_local_models(project):
    root = project.root
    for rel in ["models/tiny", "models/org/name", "models/org/name/sub", "mine", "runs/r1", ".studio/m",
                "a/b/c/too-deep", "models/x/checkpoint-5", "models/.cache/m"]:
        (root / rel).mkdir(parents=True)
        (root / rel / "config.json").write_text("{}")
    (root / "models" / "empty").mkdir()
    assert project.local_models() == ["mine", "models/org/name", "models/tiny"]
