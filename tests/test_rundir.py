"""rundir: the run-directory helpers every verb reads through."""
from __future__ import annotations

import json

from domaintune.rundir import RunDir


def test_write_json_is_atomic_and_round_trips(tmp_path):
    run = RunDir(tmp_path)
    run.write_json("run_info.json", {"license": "apache-2.0", "名": 1})
    assert run.run_info() == {"license": "apache-2.0", "名": 1}
    assert not list(tmp_path.glob("*.tmp"))
    assert json.loads((tmp_path / "run_info.json").read_text(encoding="utf-8"))["名"] == 1


def test_weights_detection(tmp_path):
    run = RunDir(tmp_path)
    assert not run.has_weights()
    (tmp_path / "adapter_config.json").write_text("{}")
    assert not run.has_adapter()  # config alone is not an adapter
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x")
    assert run.has_adapter() and run.has_weights() and not run.has_full_model()
