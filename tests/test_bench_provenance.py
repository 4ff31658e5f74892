"""bench/provenance.py: every result a benchmark keeps says what produced it (code revision and dirty flag, CPU
model, cores, versions, load average, date); arms run interleaved; figures come with their min and max; and every
bench script that writes bench/results/ records it."""
from __future__ import annotations

import datetime
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


@pytest.fixture(scope="module")
def provenance():
    spec = importlib.util.spec_from_file_location("bench_provenance", BENCH / "provenance.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_record_has_every_field(provenance):
    rec = provenance.provenance(load_start=[1.5, 1.0, 0.5], extra_versions=("peft",))
    assert set(rec) == {"date", "git", "machine", "versions", "load_average"}
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert rec["git"]["revision"] == head and re.fullmatch(r"[0-9a-f]{40}", head)
    assert isinstance(rec["git"]["dirty"], bool)
    m = rec["machine"]
    assert m["cpu"] and isinstance(m["cpu"], str) and m["cores"] >= 1 and m["python"].count(".") == 2
    import peft
    import torch
    import transformers

    assert rec["versions"] == {"torch": torch.__version__, "transformers": transformers.__version__,
                               "peft": peft.__version__}
    assert rec["load_average"]["start"] == [1.5, 1.0, 0.5] and len(rec["load_average"]["end"]) == 3
    when = datetime.datetime.fromisoformat(rec["date"])
    assert when.tzinfo is not None and abs(datetime.datetime.now(datetime.timezone.utc) - when).total_seconds() < 60
    json.dumps(rec)  # it goes into a JSON result file as it is
    line = provenance.describe(rec)
    assert head[:12] in line and m["cpu"] in line and f"torch {torch.__version__}" in line


def test_the_dirty_flag_follows_the_work_tree(provenance, tmp_path):
    repo = tmp_path / "r"
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "f").write_text("a", encoding="utf-8")
    subprocess.run([*git, "add", "f"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    assert provenance.git_revision(repo)["dirty"] is False
    (repo / "f").write_text("b", encoding="utf-8")
    assert provenance.git_revision(repo)["dirty"] is True
    assert provenance.git_revision(tmp_path / "not-a-repo") == {"revision": None, "dirty": None}


def test_arms_are_interleaved_and_figures_have_min_and_max(provenance):
    assert list(provenance.interleaved(("a", "b"), 3)) == [(0, "a"), (0, "b"), (1, "b"), (1, "a"), (2, "a"),
                                                           (2, "b")]
    assert provenance.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    with pytest.raises(SystemExit, match="at least 3 runs per arm"):
        provenance.check_repeat(2, saving=True)
    provenance.check_repeat(1, saving=False)


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py") if p.name != "provenance.py"))
def test_every_bench_script_that_writes_results_records_provenance(script):
    src = (BENCH / script).read_text(encoding="utf-8")
    if "results" not in src:
        return
    assert re.search(r"^from provenance import .*\bprovenance\b", src, re.M), f"bench/{script} does not use it"
    assert "provenance(" in src


def test_the_train_throughput_result_shows_the_new_fields():
    """The last record of the committed result was made with provenance and 3 interleaved runs per arm."""
    records = json.loads((BENCH / "results" / "train_throughput-cpu-bloom-tiny.json").read_text(encoding="utf-8"))
    last = records[-1]
    assert last["git"]["revision"] and last["git"]["dirty"] is not None
    assert {"cpu", "cores"} <= set(last["machine"]) and {"torch", "transformers"} <= set(last["versions"])
    assert set(last["load_average"]) == {"start", "end"}
    assert last["repeat"] >= 3 and all(len(runs) == last["repeat"] for runs in last["runs"].values())
    for arm in ("baseline", "domaintune"):
        tps = last["spread"][arm]["tokens_per_s"]
        assert tps["min"] <= tps["median"] <= tps["max"] and tps["n"] == last["repeat"]


def test_the_help_of_the_bench_scripts_still_parses():
    """The scripts import provenance from their own folder, as `python bench/X.py` runs them."""
    done = subprocess.run([sys.executable, str(BENCH / "train_throughput.py"), "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and "--repeat" in done.stdout, done.stderr
