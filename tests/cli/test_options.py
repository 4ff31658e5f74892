"""One home for sampling defaults: `--help` of predict, chat and serve, the flags' parsed values, and the server's
defaults for requests that leave a parameter out all come from GenerationParams and its named presets."""
from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from domaintune import cli
from domaintune.cli.inference import CHAT_SAMPLING, PREDICT_SAMPLING, SERVE_SAMPLING
from domaintune.cli.options import sampling_params
from domaintune.errors import UserError
from domaintune.inference.params import PRESETS, GenerationParams

SAMPLING = {"predict": PREDICT_SAMPLING, "chat": CHAT_SAMPLING, "serve": SERVE_SAMPLING}
FLAG = {"serve": {"max_new_tokens": "--max-tokens"}}
SRC = Path(__file__).resolve().parents[2] / "src" / "domaintune"


def _help_entries(verb: str) -> dict[str, str]:
    """flag -> its help text, read from the `options:` section of `domaintune VERB --help`."""
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[verb]
    section = sub.format_help().split("\noptions:\n", 1)[1]
    entries: dict[str, str] = {}
    flag = None
    for line in section.splitlines():
        if re.match(r"^  -", line):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line.strip()
        elif flag and line.strip():
            entries[flag] += " " + line.strip()
    return entries


def _stated_default(entry: str) -> tuple[str, str]:
    m = re.search(r"\(default: ([^,)]+), the '(\w+)' preset\)$", entry)
    assert m, f"no '(default: X, the 'P' preset)' at the end of: {entry}"
    return m.group(1), m.group(2)


def _parse(value: str) -> object:
    return {"on": True, "off": False, "None": None}.get(value, value)


@pytest.mark.parametrize("verb", ["predict", "chat", "serve"])
def test_help_states_the_presets_defaults(verb):
    entries = _help_entries(verb)
    preset = PRESETS[verb]
    for name in SAMPLING[verb]:
        flag = FLAG.get(verb, {}).get(name, "--" + name.replace("_", "-"))
        stated, named = _stated_default(entries[flag])
        assert named == verb
        want = getattr(preset, name)
        got = _parse(stated)
        assert got == want or (isinstance(want, (int, float)) and float(stated) == want), (verb, name, stated, want)


@pytest.mark.parametrize("verb", ["predict", "chat", "serve"])
def test_flags_left_out_give_the_preset(verb):
    args = cli.build_parser().parse_args([verb, "RUN"] + (["--data", "t.jsonl"] if verb == "predict" else []))
    zero_is_greedy = verb != "predict"
    assert sampling_params(args, verb, SAMPLING[verb], zero_is_greedy) == PRESETS[verb]


def test_presets_differ_from_generation_params_only_where_documented():
    assert PRESETS["predict"] == GenerationParams()  # evaluation decodes with the library defaults: greedy
    for verb in ("chat", "serve"):
        changed = {f.name for f in dataclasses.fields(GenerationParams)
                   if getattr(PRESETS[verb], f.name) != getattr(GenerationParams(), f.name)}
        assert changed <= {"max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty"}
    # the differences between chat and serve are the two OpenAI clients never send
    diff = {f.name for f in dataclasses.fields(GenerationParams)
            if getattr(PRESETS["chat"], f.name) != getattr(PRESETS["serve"], f.name)}
    assert diff == {"top_k", "repetition_penalty"}


def test_temperature_zero_means_greedy_everywhere():
    greedy = PRESETS["chat"].with_temperature(0)
    assert (greedy.do_sample, greedy.hf_kwargs().get("temperature")) == (False, None)
    assert PRESETS["predict"].with_temperature(0.5).do_sample is True
    args = cli.build_parser().parse_args(["chat", "RUN", "--temperature", "0"])
    assert sampling_params(args, "chat", CHAT_SAMPLING, True).do_sample is False
    args = cli.build_parser().parse_args(["serve", "RUN", "--temperature", "0"])
    assert sampling_params(args, "serve", SERVE_SAMPLING, True).do_sample is False
    with pytest.raises(UserError, match=r"^temperature must be > 0 when sampling \(0 means greedy\), got -1.0$"):
        sampling_params(cli.build_parser().parse_args(["chat", "RUN", "--temperature", "-1"]), "chat", CHAT_SAMPLING,
                        True)
    # the rule is written once: no other module compares a temperature with 0
    rule = re.compile(r"temperature\s*[!=]=\s*0\b|temperature\s+or\s+1\.0|temperature\s+if\s+temperature")
    elsewhere = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                 if p.name != "params.py" and rule.search(p.read_text(encoding="utf-8"))]
    assert elsewhere == []


class _Engine:
    """What the server's parameter resolution reads of an engine."""

    context_len = 2048


def _request_params(body: dict, defaults: GenerationParams | None = None) -> GenerationParams:
    from domaintune.inference.serve import protocol as P
    from domaintune.inference.serve.app import _params, create_app

    app = create_app(None, defaults=defaults)
    req = P.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "q"}], **body)
    return _params(req, 10, _Engine(), app.state.defaults)


def test_server_request_defaults_are_the_serve_preset():
    from domaintune.inference.serve.app import create_app

    assert create_app(None).state.defaults == PRESETS["serve"]
    assert _request_params({}) == PRESETS["serve"]
    got = _request_params({"temperature": 0, "top_k": 5, "max_tokens": 7, "seed": 3})
    assert got == dataclasses.replace(PRESETS["serve"].with_temperature(0), top_k=5, max_new_tokens=7, seed=3)
    # `serve --temperature 0 --top-k 9`: requests without those fields decode greedily with top_k 9
    args = cli.build_parser().parse_args(["serve", "RUN", "--temperature", "0", "--top-k", "9"])
    defaults = sampling_params(args, "serve", SERVE_SAMPLING, True)
    assert _request_params({}, defaults) == dataclasses.replace(PRESETS["serve"].with_temperature(0), top_k=9)
    assert _request_params({"temperature": 0.5}, defaults).do_sample is True
