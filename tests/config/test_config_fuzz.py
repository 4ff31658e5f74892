"""Config fuzz (issue 22, acceptance): every generated config ends in either a clean run up to the model load or one
error message and exit 2, never a traceback, and no case hangs before the load (CASE_SECONDS bounds each case).

Each case runs the real CLI in this process, `domaintune train CFG [overrides]`, through everything that happens
before the tokenizer and the model load: reading the YAML and the overrides, validation, and TrainingRun.setup_output
(output folder, trackers, the data files, the model folder, trainer_args, the optimizer and schedule probes, the
engine, a writable output). The load itself is replaced by a stop (`setup_data` raises _ReachedTheLoad): this
fuzz is about the config, and the stages after it have their own tests.

Three strategies (hypothesis, derandomized, bounded; 260 cases in all):
- the schema: mutations of a valid tiny config (wrong types, out-of-range and non-finite numbers, unknown keys and
  other tools' key names, odd values in trainer_args, sections replaced by scalars or lists);
- YAML oddities: alias and merge bombs, cycles, dates and timestamps, tags (!!binary, !!set, !!python/..., custom),
  deep nesting, duplicate keys, bytes that are not UTF-8, byte-order marks, tabs, truncation, several documents;
- command-line overrides with random dotted keys and YAML values (deep, aliased, not YAML at all).

"One error message": the CLI prints `error: ...` on one line; only a validation error of several fields lists
them, one indented line each, under its `invalid config:` head line.
"""
from __future__ import annotations

import collections
import contextlib
import io
import itertools
import json
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from domaintune import cli
from domaintune.config import Config
from domaintune.training.preference import PreferenceRun
from domaintune.training.run import TrainingRun

# Seconds a case may take before the model would load (imports are paid once, before the first case): a bound that
# catches a hang or a blow-up (an alias bomb expanded, thousands of worker processes started), not a speed goal. A
# case takes well under a second alone; the bound leaves room for a suite run beside other tests on a busy 2-core
# machine, where 5 s failed once without any fault.
CASE_SECONDS = 30.0
FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SECTIONS = {name: list(f.annotation.model_fields) for name, f in Config.model_fields.items()}
# TrainingArguments fields a user may pass (and some domaintune sets), for train.trainer_args.
TRAINER_KEYS = ["adam_beta1", "adam_beta2", "adam_epsilon", "lr_scheduler_kwargs", "optim_args",
                "label_smoothing_factor", "max_steps", "output_dir", "neftune_noise_alpha", "eval_accumulation_steps",
                "adam_epsilom"]
OTHER_TOOLS_KEYS = ["rank", "lora_alpha", "epochs", "lr", "num_train_epochs", "model_name_or_path", "max_seq_length"]


class _ReachedTheLoad(Exception):
    """Raised where the tokenizer and the model would load: the config got through every check."""


def _stop(self) -> None:
    raise _ReachedTheLoad


@dataclass
class Harness:
    root: Path
    model: Path
    data: Path
    counter: itertools.count
    outcomes: collections.Counter = field(default_factory=collections.Counter)  # ("ran" or "error", tag) -> cases
    tag: str = ""  # the strategy now running

    def base(self) -> dict:
        """A valid tiny config, with an output folder of its own."""
        return {"model": {"name_or_path": str(self.model)},
                "lora": {"r": 4, "target_modules": "all-linear"},
                "data": {"path": str(self.data), "val_size": 2, "cutoff_len": 128},
                "train": {"output_dir": f"out/case{next(self.counter)}", "max_steps": 1, "batch_size": 2,
                          "per_device_batch_size": 2, "seed": 1}}

    def run(self, text: str | bytes, overrides: list[str] | tuple[str, ...] = ()) -> str:
        """Run `domaintune train` on `text` up to the model load; returns "ran" or the error message, after checking
        the outcome and the time."""
        path = self.root / f"case{next(self.counter)}.yaml"
        if isinstance(text, str):
            path.write_text(text, encoding="utf-8")
        else:
            path.write_bytes(text)
        out, err = io.StringIO(), io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli.main(["train", str(path), *overrides])
            except _ReachedTheLoad:
                rc = None
        took = time.perf_counter() - t0
        said = err.getvalue()
        case = f"{text[:300]!r} {list(overrides)[:3]!r}"
        assert took < CASE_SECONDS, f"{took:.1f} s before the model load: {case}"
        assert "Traceback" not in said, case
        if rc is None:
            self.outcomes["ran", self.tag] += 1
            return "ran"
        assert rc == 2, f"exit {rc}: {said} {case}"
        _assert_one_message(said, case)
        self.outcomes["error", self.tag] += 1
        return said


def _assert_one_message(said: str, case: str) -> None:
    lines = said.splitlines()
    assert lines and lines[0].startswith("error: ") and said.endswith("\n"), f"{said!r} {case}"
    if len(lines) > 1:  # a list of problems (fields, rows): one indented line each under a head line ending in ':'
        assert lines[0].endswith(":"), f"{said!r} {case}"
        assert all(line.startswith("  ") and not line[2:].startswith(" ") for line in lines[1:]), f"{said!r} {case}"


@pytest.fixture(scope="module")
def harness(tiny_model_dir, sample_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("config-fuzz")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # relative output folders land here
        # The stop at the load boundary (our own classes, not a library's).
        mp.setattr(TrainingRun, "setup_data", _stop)
        mp.setattr(PreferenceRun, "setup_data", _stop)
        h = Harness(root, tiny_model_dir("qwen2"), sample_data / "train.jsonl", itertools.count())
        # Pay the imports (torch, transformers' Trainer) once, in a valid run, before any case is timed.
        assert h.run(yaml.safe_dump(h.base())) == "ran"
        yield h


def test_the_base_config_reaches_the_load_and_a_bad_one_is_one_line(harness):
    assert harness.run(yaml.safe_dump(harness.base())) == "ran"
    said = harness.run(yaml.safe_dump(harness.base()), ["train.optim=adamw"])
    assert said.startswith("error: train.optim 'adamw' is not a transformers optimizer name. Did you mean "
                           "'adamw_torch'?") and said.count("\n") == 1


# ---------------------------------------------------------------- values
_SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2, 2**31, 2**32, 2**63, 10**12]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 1e308, 0.5, 1.5, -2.5]),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=12),
    st.sampled_from(["auto", "cosine", "cosin", "adamw", "adamw_torch", "sgd", "all-linear", "none", "pack", "dpo",
                     "kto", "fsdp", "deepspeed", "bf16", "4bit", "tensorboard", "wandb", "2024-01-01", "1e400", "-1",
                     "", " ", "\n", "a\x00b", "ü", "中文", "~", "."]),
)
VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=6)
# Values for fields that name files or folders: odd, but kept inside the test's folder and off the network.
PATHS = st.sampled_from(["", ".", "..", "out/x", "missing/file.jsonl", "a\x00b", "x" * 300, "out/" + "ü" * 40,
                         "2024-01-01", "~nobody-here/x", "case0.yaml", "out", "./", "tiny"])
PATH_FIELDS = {("model", "name_or_path"), ("data", "path"), ("data", "eval_path"), ("data", "template"),
               ("train", "output_dir"), ("train", "distributed_config")}


def _plausible(annotation) -> st.SearchStrategy:
    """Values of the field's own type, mostly in range: mutations that should often still reach the load."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([_plausible(a) for a in args])
    if origin is list:
        return st.lists(st.sampled_from(["none", "q_proj", "v_proj", "x"]), max_size=2)
    if origin is dict:
        return st.fixed_dictionaries({}, optional={"adam_beta2": st.floats(0.5, 0.999),
                                                   "adam_epsilon": st.sampled_from([1e-8, 1e-6]),
                                                   "lr_scheduler_kwargs": st.just({}),
                                                   "label_smoothing_factor": st.floats(0, 0.2)})
    return {bool: st.booleans(), int: st.integers(1, 64), float: st.floats(0.01, 0.9), type(None): st.none(),
            str: st.sampled_from(["auto", "cosine", "linear", "adamw_torch", "sgd", "x", "", "中文"])}.get(
        annotation, VALUES)


@st.composite
def mutations(draw):
    """(section, key, value) to set, or (section, key, None-delete marker) to delete."""
    kind = draw(st.sampled_from(["plausible"] * 8 + ["field"] * 3 + ["unknown", "other-tool", "trainer_args",
                                                                      "trainer_args", "section", "delete"]))
    section = draw(st.sampled_from(sorted(SECTIONS)))
    if kind in ("field", "plausible"):
        key = draw(st.sampled_from(SECTIONS[section]))
        if (section, key) in PATH_FIELDS:
            value = draw(PATHS)
        else:
            value = draw(_plausible(Config.model_fields[section].annotation.model_fields[key].annotation)
                         if kind == "plausible" else VALUES)
        return ("set", section, key, value)
    if kind == "unknown":
        return ("set", section, draw(st.text(min_size=1, max_size=10)), draw(VALUES))
    if kind == "other-tool":
        return ("set", draw(st.sampled_from(["lora", "train", "data", "model"])), draw(st.sampled_from(
            OTHER_TOOLS_KEYS)), draw(VALUES))
    if kind == "trainer_args":
        args = draw(st.dictionaries(st.sampled_from(TRAINER_KEYS), VALUES, min_size=1, max_size=3))
        return ("set", "train", "trainer_args", args)
    if kind == "section":
        return ("section", section, None, draw(_SCALARS | st.lists(_SCALARS, max_size=2)))
    return ("delete", section, draw(st.sampled_from(SECTIONS[section])), None)


def _apply(raw: dict, mutation: tuple) -> None:
    op, section, key, value = mutation
    if op == "section":
        raw[section] = value
        return
    node = raw.setdefault(section, {})
    if not isinstance(node, dict):
        return
    if op == "delete":
        node.pop(key, None)
    else:
        node[key] = value


@settings(FUZZ, max_examples=110)
@given(st.lists(mutations(), min_size=1, max_size=3))
def test_schema_mutations_reach_the_load_or_say_one_thing(harness, muts):
    harness.tag = "schema"
    raw = harness.base()
    for m in muts:
        _apply(raw, m)
    harness.run(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False))


# ---------------------------------------------------------------- YAML oddities
def _bomb(levels: int, fan: int, merge: bool) -> str:
    if merge:
        return "m0: &m0 {k: 1}\n" + "".join(
            f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * fan)}], k{i}: 1}}\n" for i in range(1, levels))
    return f"a0: &a0 [{', '.join(['lol'] * fan)}]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fan)}]\n" for i in range(1, levels))


def _base_without(h: Harness, *train_keys: str) -> str:
    """The base config as YAML without `train_keys`, ending in the train section (so lines can be added to it)."""
    raw = h.base()
    for key in train_keys:
        raw["train"].pop(key, None)
    return yaml.safe_dump(raw, sort_keys=False)


def _indent(text: str, by: str) -> str:
    return "".join(by + line + "\n" for line in text.splitlines())


@st.composite
def yaml_oddities(draw, h: Harness) -> str | bytes:
    base = yaml.safe_dump(h.base(), sort_keys=False)
    kind = draw(st.sampled_from(["bomb", "bomb-in-trainer-args", "cycle", "date", "tag", "deep-flow", "deep-block",
                                 "duplicate", "not-utf8", "bom", "tabs", "truncated", "documents", "top-level",
                                 "control"]))
    if kind == "bomb":
        return base + _bomb(draw(st.integers(2, 12)), draw(st.integers(2, 12)), draw(st.booleans()))
    if kind == "bomb-in-trainer-args":
        bomb = _bomb(draw(st.integers(2, 10)), draw(st.integers(2, 10)), False)
        return base + "  trainer_args:\n    lr_scheduler_kwargs:\n" + _indent(bomb, "      ")
    if kind == "cycle":
        return base.replace("train:\n", "train: &t\n", 1) + "  trainer_args: {x: *t}\n"
    if kind == "date":
        field = draw(st.sampled_from(["output_dir", "seed", "learning_rate", "lr_scheduler"]))
        when = draw(st.sampled_from(["2024-01-01", "2001-12-14t21:59:43.10-05:00", "2002-12-14 21:59:43.10",
                                     "!!timestamp 2024-01-01", "12:30:00"]))
        return _base_without(h, field) + f"  {field}: {when}\n"
    if kind == "tag":
        tag = draw(st.sampled_from(["!!binary aGVsbG8=", "!!set {a, b}", "!!omap [{a: 1}]", "!!pairs [[a, 1]]",
                                    "!!python/object/apply:os.system [echo hi]", "!foo bar", "!!str 12", "!!int '3'",
                                    "!!float 1", "!!null ''", "!!bool yes", "!!map {a: 1}", "!!seq [1]", "!<tag:x> 1",
                                    "!!binary not-base64"]))
        field = draw(st.sampled_from(["seed", "optim", "report_to", "output_dir", "trainer_args"]))
        value = f"\n    lr_scheduler_kwargs: {tag}" if field == "trainer_args" else tag
        return _base_without(h, field) + f"  {field}: {value}\n"
    if kind in ("deep-flow", "deep-block"):
        depth = draw(st.sampled_from([5, 20, 31, 32, 33, 100, 500, 3000, 4000]))
        if kind == "deep-flow":
            opener, closer = draw(st.sampled_from([("[" * depth, "]" * depth), ("{a: " * depth, "}" * depth)]))
            return base + f"  trainer_args:\n    lr_scheduler_kwargs: {opener}1{closer}\n"
        return base + "  trainer_args:\n" + "".join("  " * (i + 2) + f"k{i}:\n" for i in range(depth)) + \
            "  " * (depth + 2) + "v: 1\n"
    if kind == "duplicate":
        where = draw(st.sampled_from(["section", "key", "flow", "nested"]))
        if where == "section":
            return base + "train:\n  seed: 3\n"
        if where == "key":
            return base + "  seed: 3\n"
        if where == "flow":
            return base + "  trainer_args: {adam_beta2: 0.9, adam_beta2: 0.95}\n"
        return base + "  trainer_args:\n    lr_scheduler_kwargs:\n      a: 1\n      a: 2\n"
    if kind == "not-utf8":
        encoding = draw(st.sampled_from(["latin-1", "utf-16", "cp1252"]))
        text = base + "data:\n  system: café ü\n" if encoding != "utf-16" else base
        raw = bytearray(text.encode(encoding, errors="replace"))
        if encoding == "latin-1" and draw(st.booleans()):
            pos = draw(st.integers(0, len(raw)))
            raw[pos:pos] = draw(st.binary(min_size=1, max_size=4).filter(lambda b: not _is_utf8(b)))
        return bytes(raw)
    if kind == "bom":
        return b"\xef\xbb\xbf" + base.encode()
    if kind == "tabs":
        return base.replace("  ", "\t", draw(st.integers(1, 3)))
    if kind == "truncated":
        return base[: draw(st.integers(0, len(base)))]
    if kind == "documents":
        return base + "---\n" + base
    if kind == "top-level":
        return draw(st.sampled_from(["- a\n- b\n", "just text\n", "42\n", "null\n", "", "~\n", "[]\n", "{}\n",
                                     "? complex\n", "train\n"]))
    char = draw(st.sampled_from(["\x00", "\x07", "\x1b", "\u2028", "\ufeff", "\x85", "\ud7ff"]))
    pos = draw(st.integers(0, len(base)))
    return base[:pos] + char + base[pos:]


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@settings(FUZZ, max_examples=95)
@given(st.data())
def test_yaml_oddities_reach_the_load_or_say_one_thing(harness, data):
    harness.tag = "yaml"
    harness.run(data.draw(yaml_oddities(harness)))


# ---------------------------------------------------------------- command-line overrides
_KEYS = st.one_of(
    st.sampled_from([f"{s}.{k}" for s, keys in SECTIONS.items() for k in keys if (s, k) not in PATH_FIELDS]),
    st.sampled_from(["lora.rank", "train.lr", "train", "lora", "train.trainer_args.adam_beta2",
                     "train.trainer_args.lr_scheduler_kwargs.num_cycles", "train.seed.x", ".".join(["a"] * 40),
                     "a..b", "x", "train.", "judge.retries"]),
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="=\x00"), min_size=1, max_size=12)
    .filter(lambda k: not k.startswith("-")),
)
_OVERRIDE_VALUES = st.one_of(
    VALUES.map(lambda v: json.dumps(v, allow_nan=True)),
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=20),
    st.sampled_from([".inf", "-.nan", "2024-01-01", "!!binary aGk=", "&a [*a]", "{a: &x [1, 2], b: *x}", "[" * 3000,
                     "[" * 3000 + "]" * 3000, "{a: 1, a: 2}", "!!python/name:os.system", "{", "- a", "a: b: c", "''",
                     "99999999999", "-1", "cosin", "adamw", "{adam_beta2: 2}", "10000000", "1", "2", "0.5", "true",
                     "null", "cosine", "auto", "adamw_torch", "[q_proj]"]),
)


@settings(FUZZ, max_examples=55)
@given(st.lists(st.tuples(_KEYS, _OVERRIDE_VALUES), min_size=1, max_size=3))
# Valid overrides, always run: how many random ones reach the load varies with hypothesis' state in the process.
@example([("train.learning_rate", "0.001")])
@example([("lora.r", "16"), ("train.seed", "1"), ("train.lr_scheduler", "cosine")])
def test_overrides_reach_the_load_or_say_one_thing(harness, items):
    harness.tag = "overrides"
    harness.run(yaml.safe_dump(harness.base()), [f"{k}={v}" for k, v in items])



def test_every_strategy_reached_both_outcomes(harness):
    """The fuzz is not all refusals: each strategy also produced configs that reach the load (run after them in
    file order; skipped when they were not all run, e.g. under -k)."""
    tags = {tag for _, tag in harness.outcomes}
    if not {"schema", "yaml", "overrides"} <= tags:
        pytest.skip("run the whole file")
    total = sum(n for (_, tag), n in harness.outcomes.items() if tag)
    assert total >= 240
    for tag in ("schema", "yaml", "overrides"):
        assert harness.outcomes["ran", tag] >= 2 and harness.outcomes["error", tag] >= 20, harness.outcomes


# ---------------------------------------------------------------- the real command line
def _deep_override() -> str:
    return "train.trainer_args=" + "[" * 3000 + "]" * 3000


@pytest.mark.parametrize("text, overrides, said", [
    ("train:\n  seed: 1\nlora:\n  r: 4\ntrain:\n  seed: 2\n", [],
     "line 5: duplicate key 'train' (first at line 1)"),
    ("train:\n  output_dir: caf\xe9\n".encode("latin-1"), [], "line 2: not UTF-8 text (byte 0xe9)"),
    ("", [_deep_override()], "line 1: nested more than 32 levels deep"),
    (None, ["train.lr_scheduler=cosin"], "train.lr_scheduler 'cosin' is not a transformers learning-rate schedule. "
                                         "Did you mean 'cosine'?"),
], ids=["duplicate-key", "not-utf8", "deep-override", "scheduler-typo"])
def test_the_cli_exits_2_with_one_line(tmp_path, tiny_model_dir, sample_data, text, overrides, said):
    import os
    import subprocess
    import sys

    cfg = tmp_path / "cfg.yaml"
    if text is None:  # a valid config: the mistake is in the override, found before the model loads
        text = yaml.safe_dump({"model": {"name_or_path": str(tiny_model_dir("qwen2"))},
                               "data": {"path": str(sample_data / "train.jsonl")},
                               "train": {"output_dir": str(tmp_path / "run")}})
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    r = subprocess.run([sys.executable, "-m", "domaintune", "train", str(cfg), *overrides], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and said in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "run").exists()
