"""`domaintune <verb>`: the only place with argparse. Parse the arguments, dispatch to one run_* function.

| module | verbs |
|---|---|
| `configure.py` | init, config, data-check |
| `datagen.py` | gen-data |
| `train.py` | train, make-tiny-model, models, quickstart |
| `inference.py` | predict, chat, serve, export |
| `evaluate.py` | eval, plot, report |
| `judge.py` | judge |
| `studio.py` | studio |
| `options.py` | flags shared by several verbs (config + overrides, sampling, model directory) |

Each verb module has `register(sub)` and one `cmd_<verb>(args) -> int` per verb. Heavy imports happen
inside the handlers, so `--help` is instant. A UserError is printed as `error: ...` with exit code 2
(no traceback).

Output: stdout carries a verb's result and nothing else, so it can be piped; notes, progress bars, warnings
and errors go to stderr, through `domaintune.console` (and Python `logging` records through its handler,
installed here). The result of each verb:

| verb | stdout |
|---|---|
| eval, predict | the metrics table, one `name value` line per metric (nothing with `predict --no-eval`) |
| eval --benchmark, judge | the accuracy table / the verdict summary |
| eval --compare (alone), plot, report, make-tiny-model, export | the file or folder written |
| gen-data | the file written and its row count (--preview: the pairs) |
| config | the YAML (or the field list of --explain; `wrote FILE` with --out) |
| data-check | the data counts and the example |
| models | the supported-models table |
| train | `run directory: PATH` (the Trainer's log lines, progress, go to stderr) |
| quickstart | the closing summary |
| chat | the conversation |
| serve | uvicorn's access log, one line per request (its other logs: stderr) |
| studio | the URL to open (with the token, when one is needed) |

`-q/--quiet` hides notes and progress bars (warnings and errors stay); `-v/--verbose` adds debug notes and
transformers' own output (its info logs, its "Loading weights" bars, its FutureWarnings), which are hidden
otherwise. Both are accepted before or after the verb."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

from .. import __version__, console
from ..errors import UserError
from . import configure, datagen, evaluate, inference, judge, studio, train

# Verb groups, in the order `domaintune --help` lists them.
VERB_MODULES = (configure, datagen, train, inference, evaluate, judge, studio)

# Verbs that load a model or tokenizer through transformers (eval and gen-data only with --run): only they pay the
# seconds of importing it to set its output up.
MODEL_VERBS = {"train", "make-tiny-model", "quickstart", "data-check", "predict", "chat", "serve", "export"}
# Verbs whose libraries print progress on stdout (transformers' Trainer prints its log dicts there): stdout is
# pointed at stderr while they run, and their result goes out through console.result. (quickstart does the same
# itself, around its steps.)
STDOUT_IS_PROGRESS = {"train"}
# FutureWarnings of transformers that the user cannot act on, hidden unless -v: transformers 5 warns on every
# model load that peft still calls is_gradient_checkpointing (deprecated, removal planned for v6).
KNOWN_FUTURE_WARNINGS = (r".*is_gradient_checkpointing.*",)
# peft asks the hub for the base model's config.json at every adapter save to learn whether the vocabulary was
# resized, and warns when it cannot (offline, or a hub id served from the cache). domaintune never resizes the
# vocabulary, so peft's assumption is right and the warning, twice per run, only alarmed users.
KNOWN_USER_WARNINGS = (r"Could not find a config file in .* - will assume that the vocabulary was not modified",)
QUIET_HELP = "only results, warnings and errors: no notes and no progress bars (default: off)"
VERBOSE_HELP = ("more on stderr: debug notes, other libraries' info logs, and transformers' own output (its info "
                "logs, \"Loading weights\" bars and FutureWarnings, hidden otherwise) (default: off)")


def _add_output_flags(p: argparse.ArgumentParser, dest_prefix: str = "") -> None:
    """-q / -v on the main parser and on every verb, so they work before or after the verb. The verbs' copies
    have their own dests: a subparser's defaults would otherwise overwrite what was given before the verb."""
    p.add_argument("-q", "--quiet", dest=f"{dest_prefix}quiet", action="store_true", help=QUIET_HELP)
    p.add_argument("-v", "--verbose", dest=f"{dest_prefix}verbose", action="count", default=0, help=VERBOSE_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="domaintune",
        description="Turn a small open language model into a domain assistant: gen-data -> train -> predict/eval -> "
                    "plot/report -> chat / serve / export. Run `domaintune VERB --help` for each verb's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"domaintune {__version__}")
    _add_output_flags(parser)
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for module in VERB_MODULES:
        module.register(sub)
    for verb_parser in sub.choices.values():
        _add_output_flags(verb_parser, "verb_")
    return parser


def _verbosity(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    quiet = args.quiet or getattr(args, "verb_quiet", False)
    verbose = args.verbose + getattr(args, "verb_verbose", 0)
    if quiet and verbose:
        parser.error("-q/--quiet and -v/--verbose contradict each other: give one")
    return console.QUIET if quiet else console.NORMAL + verbose


@contextlib.contextmanager
def _output(args: argparse.Namespace, level: int) -> Iterator[None]:
    """The output conventions for one command (see the module docstring), undone afterwards so that main() can
    be called again in the same process (tests do)."""
    previous = console.set_verbosity(level)
    root = logging.getLogger()
    handler, root_level = console.LogHandler(), root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO if level >= console.VERBOSE else logging.WARNING)
    logging.captureWarnings(True)  # Python warnings too: `warning: FILE:LINE: FutureWarning: ...` on stderr
    try:
        with warnings.catch_warnings(), contextlib.ExitStack() as stack:
            if level < console.VERBOSE:
                for message in KNOWN_FUTURE_WARNINGS:
                    warnings.filterwarnings("ignore", message=message, category=FutureWarning)
            for message in KNOWN_USER_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=UserWarning)
            if args.verb in MODEL_VERBS or (args.verb in ("eval", "gen-data") and getattr(args, "run", None)):
                stack.enter_context(_transformers_output(level))
            if args.verb in STDOUT_IS_PROGRESS:
                stack.enter_context(console.stdout_to_stderr())
            console.debug(f"domaintune {__version__}, python {sys.version.split()[0]}: {args.verb}")
            yield
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        root.setLevel(root_level)
        console.set_verbosity(previous)


@contextlib.contextmanager
def _transformers_output(level: int) -> Iterator[None]:
    """transformers' logging goes through our handler, at error level unless -v; its own progress bars ("Loading
    weights", "Writing model shards") are hidden unless -v, and with --quiet the hub's download bars too."""
    from transformers.utils import logging as tlog

    logger = logging.getLogger("transformers")  # transformers' library root logger
    handlers, propagate = list(logger.handlers), logger.propagate
    verbosity, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    for h in handlers:  # its records reach console.LogHandler on the root logger instead
        logger.removeHandler(h)
    logger.propagate = True
    tlog.set_verbosity(tlog.INFO if level >= console.VERBOSE else tlog.ERROR)
    hook = None
    if level == console.QUIET:
        tlog.disable_progress_bar()
    elif level == console.NORMAL:  # hide transformers' own bars, keep the hub's download bars (a long wait)
        hook = tlog.set_tqdm_hook(lambda factory, a, kw: factory(*a, **{**kw, "disable": True}))
    try:
        yield
    finally:
        if level == console.NORMAL:
            tlog.set_tqdm_hook(hook)
        if bars:
            tlog.enable_progress_bar()
        tlog.set_verbosity(verbosity)
        logger.propagate = propagate
        for h in handlers:
            logger.addHandler(h)


def main(argv: list[str] | None = None) -> int:
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
        with _output(args, _verbosity(args, parser)):
            return int(args.func(args) or 0)
    except UserError as e:
        console.error(str(e))
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`domaintune eval ... | head`): not an error to report. Point stdout at devnull so
        # the interpreter's final flush does not raise again (the recipe of Python's signal documentation).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1

