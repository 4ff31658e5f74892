"""`domaintune <verb>`: the only place with argparse. Parse the arguments, dispatch to one run_* function.

| module | verbs |
|---|---|
| `configure.py` | init, config, data-check |
| `datagen.py` | gen-data |
| `train.py` | train, make-tiny-model, quickstart |
| `inference.py` | predict, chat, serve, export |
| `evaluate.py` | eval, plot, report |
| `judge.py` | judge |
| `options.py` | flags shared by several verbs (config + overrides, sampling, model directory) |

Each verb module has `register(sub)` and one `cmd_<verb>(args) -> int` per verb. Heavy imports happen
inside the handlers, so `--help` is instant. A UserError is printed as `error: ...` with exit code 2
(no traceback)."""
from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..errors import UserError
from . import configure, datagen, evaluate, inference, judge, train

# Verb groups, in the order `domaintune --help` lists them.
VERB_MODULES = (configure, datagen, train, inference, evaluate, judge)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="domaintune",
        description="Turn a small open language model into a domain assistant: gen-data -> train -> predict/eval -> "
                    "plot/report -> chat / serve / export. Run `domaintune VERB --help` for each verb's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"domaintune {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for module in VERB_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    # transformers 5 warns on every model load that peft still calls is_gradient_checkpointing
    # (deprecated, removal planned for v6); it is noise for our users, not something they can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    parser = build_parser()
    # Dotted overrides may come after options (`train cfg.yaml --resume lora.r=16`): argparse leaves them
    # unparsed once an option has followed the positionals, so collect them here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`domaintune eval ... | head`): not an error to report. Point stdout at devnull so
        # the interpreter's final flush does not raise again (the recipe of Python's signal documentation).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1

