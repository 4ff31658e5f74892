"""Verbs around the config and the data: `init`, `config` and `data-check`.

`init` is a verb of its own rather than `config --example NAME`: it writes files (several: a config and the sample
data it names), while `config` prints one resolved config; and `domaintune init` is the first command a user
who installed the wheel runs, before there is any config to give `config`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import console
from .options import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="write the shipped example configs and sample data into a folder",
                       description="Write the example configs that ship with domaintune (configs/*.yaml, "
                                   "configs/distributed/*.json) and the sample data they name (examples/data/) into "
                                   "a folder, at the paths the configs use, so their commands run as written. "
                                   "Never overwrites a file: one that exists is left as it is and reported.")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="configs to write, e.g. quickstart judge (with the sample files each names) "
                        "(default: all of them)")
    p.add_argument("--dir", default=".", help="folder to write into (default: the current folder)")
    p.add_argument("--list", action="store_true",
                   help="list the shipped configs and what each runs; write nothing (default: off)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("config", help="print the resolved config (every default filled in), explain fields, "
                                      "convert flat JSON",
                       description="Print the resolved config as YAML. With --explain, list every field with its "
                                   "default and description. With --from-json, convert a flat BLOOM-LoRA-style JSON "
                                   "run config (plus --lora-json) into the equivalent domaintune YAML.")
    p.add_argument("config", nargs="?", default=None, help="YAML config file (default: none, i.e. all defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.learning_rate=2e-4 (default: none)")
    p.add_argument("--explain", action="store_true",
                   help="list every field with default and description (default: off)")
    p.add_argument("--from-json", metavar="RUN_JSON", default=None,
                   help="flat JSON run config (model_name_or_path, data_path, batch_size, ...) to convert "
                        "(default: none)")
    p.add_argument("--lora-json", metavar="LORA_JSON", default=None,
                   help="flat JSON LoRA config (lora_r, lora_alpha, lora_dropout, lora_target_modules) "
                        "(default: none)")
    p.add_argument("--out", default=None, help="write the YAML here instead of standard output (default: stdout)")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("data-check", help="validate and tokenize the training data; print counts, lengths and one "
                                          "masked example",
                       description="Read, validate and tokenize the data exactly as training would (no model is "
                                   "loaded). Prints row counts, token-length statistics, over-length counts, and one "
                                   "rendered example with the trained (loss) part marked «like this».")
    add_config_args(p, example="data.cutoff_len=1024")
    p.add_argument("--example", type=int, default=0,
                   help="index of the training sample to show (default: %(default)s)")
    p.set_defaults(func=cmd_data_check)


def cmd_config(a: argparse.Namespace) -> int:
    from ..config import apply_overrides, build_config, config_from_flat, explain, load_config, read_json_file
    from ..errors import UserError

    if a.config and "=" in a.config and not Path(a.config).is_file():
        # `config lora.r=4` or `config --out x.yaml lora.r=4`: argparse gives the optional positional the
        # first override
        a.overrides, a.config = [a.config, *(a.overrides or [])], None
    if a.explain:
        print("\n".join(explain()))
        return 0
    if a.from_json:
        if a.config:
            raise UserError(f"give either a config file ('{a.config}') or --from-json, not both")
        run = read_json_file(a.from_json)
        lora = read_json_file(a.lora_json) if a.lora_json else None
        raw = config_from_flat(run, lora, source=a.from_json)
        cfg = build_config(apply_overrides(raw, a.overrides), a.from_json, a.overrides)
        text = "# converted from " + a.from_json + (f" + {a.lora_json}" if a.lora_json else "") + "\n"
        # The training sections fully resolved; sections of other verbs only when the overrides set them.
        text += cfg.to_yaml(omit_default_sections=True)
    else:
        text = load_config(a.config, a.overrides).to_yaml()
    if a.out:
        Path(a.out).write_text(text, encoding="utf-8")
        print(f"wrote {a.out}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_data_check(a: argparse.Namespace) -> int:
    from ..config import load_config
    from ..training.data_check import run_data_check

    run_data_check(load_config(a.config, a.overrides), a.example, color=sys.stdout.isatty())
    return 0


def cmd_init(a: argparse.Namespace) -> int:
    from ..bundled import list_examples, write_examples

    if a.list:
        print("\n".join(list_examples()))
        return 0
    done = write_examples(a.names, a.dir)
    label = {"written": "wrote", "unchanged": "exists (identical, left as it is)",
             "kept": "exists (differs from the shipped one, left as it is)"}
    for w in done:
        print(f"{label[w.status]}: {Path(a.dir) / w.path}")
    if any(w.path == "configs/quickstart.yaml" for w in done):
        where = "" if Path(a.dir) == Path(".") else f"cd {a.dir} && "
        console.note(f"next: {where}domaintune quickstart configs/quickstart.yaml")
    return 0
