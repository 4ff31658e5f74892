"""`domaintune studio` as a user types it: --help names every option with its default; a port that is taken, a
blank token and a bad upload limit are errors saying what to do, before anything is served."""
from __future__ import annotations

import socket

import pytest

from domaintune.cli import build_parser, main


def test_help_explains_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["studio", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--host", "--port", "--token", "--max-upload-mib"):
        assert flag in out
    assert "(default: 127.0.0.1)" in out and "(default: 7860)" in out and "(default: 256)" in out
    assert "default: the current folder" in out
    sub = next(a for a in build_parser()._subparsers._group_actions if a.dest == "verb")  # type: ignore[union-attr]
    assert "studio" in sub.choices


def test_a_port_in_use_is_said_with_what_to_do(tmp_path, capsys):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["studio", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot listen on 127.0.0.1:{port}" in err and "give another --port" in err


@pytest.mark.parametrize("argv, said", [(["--token", " "], "--token is only whitespace"),
                                        (["--max-upload-mib", "0"], "--max-upload-mib must be at least 1")])
def test_bad_flags_are_errors_before_anything_is_served(tmp_path, capsys, argv, said):
    assert main(["studio", str(tmp_path), "--port", "0", *argv]) == 2
    assert said in capsys.readouterr().err


def test_a_missing_project_folder_is_created_and_a_file_is_refused(tmp_path, capsys):
    held = socket.socket()  # the port is taken, so the studio stops right after the folder is made
    held.bind(("127.0.0.1", 0))
    held.listen()
    try:
        assert main(["studio", str(tmp_path / "new" / "project"), "--port", str(held.getsockname()[1])]) == 2
    finally:
        held.close()
    assert (tmp_path / "new" / "project").is_dir()
    assert "created the project folder" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["studio", str(tmp_path / "afile"), "--port", "0"]) == 2
    assert "is not a folder" in capsys.readouterr().err
