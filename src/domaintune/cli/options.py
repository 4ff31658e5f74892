"""Flags shared by several verbs, built from the library's own definitions.

- `add_config_args`: a YAML config plus dotted overrides (train, data-check, gen-data).
- `add_sampling_options` / `sampling_params`: the sampling flags of predict, chat and serve, generated from
  `GenerationParams` (field, type, help) with the defaults of the verb's named preset (`PRESETS`), so
  `--help` shows exactly the defaults the code uses.
- `add_model_dir_options`: how a run or model directory is loaded (--base-only, --template, --device,
  --dtype).
- `add_thinking_option` / `thinking_flag`: --thinking on|off, the enable_thinking of a Qwen3-style chat_template.

Only light modules are imported here: `domaintune --help` must not pull in torch or transformers.
"""
from __future__ import annotations

import argparse
from dataclasses import fields, replace

from ..inference.params import PRESETS, GenerationParams, field_help
from ..training.precision import DTYPES

_TYPES = {f.name: f.type for f in fields(GenerationParams)}
_PARSERS = {"int": int, "float": float, "int | None": int}


def add_config_args(p: argparse.ArgumentParser, example: str = "train.learning_rate=2e-4 lora.r=16",
                    what: str = "YAML config file") -> None:
    """The config file (required) and dotted overrides."""
    p.add_argument("config", help=f"{what} (required)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", default=[],
                   help=f"dotted overrides, e.g. {example} (default: none)")


def add_sampling_options(p: argparse.ArgumentParser, preset: str, names: tuple[str, ...],
                         zero_is_greedy: bool, flag_names: dict[str, str] | None = None,
                         prefix: str = "") -> None:
    """One flag per GenerationParams field in `names`, defaulting to PRESETS[preset]. With `zero_is_greedy`,
    --temperature 0 means greedy decoding (chat, serve); otherwise sampling is switched on by --do-sample
    (predict). `flag_names` renames a flag (serve's --max-tokens); `prefix` starts every help text (serve:
    what a request that leaves the parameter out gets)."""
    defaults = PRESETS[preset]
    flag_names = flag_names or {}
    for name in names:
        flag = flag_names.get(name, "--" + name.replace("_", "-"))
        text = prefix + field_help(name)
        if name == "temperature" and zero_is_greedy:
            text += "; 0 = greedy"
        elif name in ("temperature", "top_p", "top_k") and not zero_is_greedy:
            text += ", with --do-sample"
        text += f" (default: %(default)s, the '{preset}' preset)"
        if name == "do_sample":
            p.add_argument(flag, dest=name, action="store_true", default=defaults.do_sample,
                           help=text.replace("%(default)s", "on" if defaults.do_sample else "off"))
        else:
            p.add_argument(flag, dest=name, metavar=flag.lstrip("-").replace("-", "_").upper(),
                           type=_PARSERS[str(_TYPES[name])], default=getattr(defaults, name), help=text)


def sampling_params(args: argparse.Namespace, preset: str, names: tuple[str, ...],
                    zero_is_greedy: bool) -> GenerationParams:
    """The GenerationParams the flags of `add_sampling_options` ask for, validated."""
    given = {name: getattr(args, name) for name in names}
    params = replace(PRESETS[preset], **given)
    if zero_is_greedy:
        params = params.with_temperature(given.get("temperature", params.temperature))
    return params.validate()


def add_model_dir_options(p: argparse.ArgumentParser, base_only: str | None = None, template: str | None = None,
                          device: bool = True) -> None:
    """--base-only (with `base_only` as its help), --template, and --device/--dtype when `device`."""
    if base_only:
        p.add_argument("--base-only", action="store_true", help=f"{base_only} (default: off)")
    p.add_argument("--template", default=None, metavar="NAME",
                   help=template or "prompt template for a directory without template.json: domain_zh, alpaca, "
                                    "chatml, tokenizer or a .json path (default: the run's template.json, else the "
                                    "tokenizer's chat_template)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load .bin/.pt (pickle) weights of a model without safetensors; pickles can run code, so "
                        "only for files you trust (default: off; a run trained with model.allow_pickle keeps it)")
    if device:
        p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
        p.add_argument("--dtype", choices=DTYPES, default="auto",
                       help="weight dtype; auto = bf16/fp16 on GPU, fp32 on CPU (default: %(default)s)")


def add_thinking_option(p: argparse.ArgumentParser) -> None:
    """--thinking on|off: the chat_template's enable_thinking (Qwen3, Qwen3.5, GLM-4); default: as trained."""
    p.add_argument("--thinking", choices=("on", "off"), default=None,
                   help="the enable_thinking switch of a Qwen3-style chat_template: off sends its non-thinking "
                        "prompt (an empty think block), on lets the model reason first; a template without the "
                        "switch refuses it (default: as the run was trained, data.thinking)")


def thinking_flag(args: argparse.Namespace) -> bool | None:
    """True / False for --thinking on / off; None when not given."""
    return None if args.thinking is None else args.thinking == "on"
