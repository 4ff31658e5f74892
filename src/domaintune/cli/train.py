"""Verbs that make a model: `train`, `make-tiny-model` and `quickstart` (the whole loop on a tiny model)."""
from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from .. import console
from .options import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune a model (LoRA, QLoRA or full) as a config file says",
                       description="Train from a YAML config. Works under torchrun / accelerate launch too.")
    add_config_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in train.output_dir; a finished run is "
                        "left as it is (default: off)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an existing run in train.output_dir and start afresh; refused for a folder that is "
                        "not a run directory or that holds the base model (default: off)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="the same as model.allow_pickle=true: load .bin/.pt (pickle) base weights when the model has "
                        "no safetensors; only for files you trust (default: off)")
    p.set_defaults(func=cmd_train)

    from ..training.tiny import ARCHS, SIZES  # stdlib-only module: cheap

    p = sub.add_parser("make-tiny-model", help="build a tiny random model + tokenizer offline (for tests and the "
                                               "quickstart)",
                       description="Build a small randomly initialised causal LM of one family and a tokenizer "
                                   "of the family's kind (its special tokens and official chat template) trained on "
                                   "the bundled sample data, saved in Hugging Face format. No network access.")
    p.add_argument("out", help="output directory (required)")
    p.add_argument("--arch", choices=ARCHS, default="qwen2", help="model family (default: %(default)s)")
    p.add_argument("--size", choices=list(SIZES), default="small",
                   help="micro (~0.2M parameters, for tests) or small (~4M) (default: %(default)s)")
    p.add_argument("--corpus", nargs="*", type=Path, default=None,
                   help="JSON-lines files to train the tokenizer on (default: the shipped sample data, "
                        "examples/data/*.jsonl)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default: %(default)s)")
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("models", help="the supported model families: what is proven for each, and by which test",
                       description="Print the supported-models table: each family users pick, its tiny-model "
                                   "--arch, its chat template and, per verb, what the test suite proves on it "
                                   "(tests/test_families.py). Any Hugging Face causal LM may still be trained; "
                                   "families outside the table train with padded batches and their own loss.")
    p.add_argument("--markdown", action="store_true",
                   help="print the table as Markdown, as README.md holds it (default: aligned plain text)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("quickstart", help="build a tiny offline model, train, predict, score, plot and report "
                                          "(CPU, minutes)",
                       description="Run the whole loop on the bundled sample data: builds the tiny model if "
                                   "missing, LoRA-trains it, predicts the test split, writes metrics.json, loss.png "
                                   "and report.md. Works from any folder: the tiny model and the run go to runs/ "
                                   "under the current folder.")
    p.add_argument("config", nargs="?", default=None,
                   help="YAML config file (default: the quickstart config shipped with domaintune, "
                        "configs/quickstart.yaml, on the shipped sample data)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", default=[],
                   help="dotted overrides, e.g. train.num_epochs=1 (default: none)")
    p.add_argument("--test", default=None,
                   help="test file to predict (default: the shipped sample test file, examples/data/test.jsonl)")
    p.add_argument("--arch", default="qwen2", choices=ARCHS,
                   help="architecture of the tiny model, when it must be built (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="tokens to generate per test prompt (default: %(default)s)")
    p.set_defaults(func=cmd_quickstart)


def cmd_train(a: argparse.Namespace) -> int:
    from ..config import load_config
    from ..training.run import TrainingInterrupted
    from ..training.trainer import run_train

    overrides = [*a.overrides, *(["model.allow_pickle=true"] if a.allow_pickle else [])]
    try:
        run_train(load_config(a.config, overrides), resume=a.resume, overwrite=a.overwrite)
    except TrainingInterrupted as e:
        if not e.quiet:
            console.error(f"{e.message}. To continue, run:\n  {resume_command(a)}")
        return 130
    return 0


def resume_command(a: argparse.Namespace) -> str:
    """The command that continues this `train` run: the same config and overrides, with --resume (never
    --overwrite, which would delete what was trained). Under torchrun / accelerate launch, the launcher's own
    options are not known here: say to keep them."""
    cmd = shlex.join(["domaintune", "train", a.config, *a.overrides, *(["--allow-pickle"] if a.allow_pickle else []),
                      "--resume"])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        n = os.environ.get("LOCAL_WORLD_SIZE", "N")
        return f"torchrun --nproc_per_node {n} -m {cmd}   (with the launcher and options you used before)"
    return cmd


def cmd_make_tiny_model(a: argparse.Namespace) -> int:
    from ..training.tiny import make_tiny_model

    print(make_tiny_model(a.out, a.arch, a.size, a.corpus, a.seed))
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    from ..families import TABLE_NOTE, render_table

    console.result(render_table(markdown=a.markdown).rstrip("\n"))
    console.note(TABLE_NOTE)
    return 0


def cmd_quickstart(a: argparse.Namespace) -> int:
    from ..quickstart import run_quickstart

    if a.config and "=" in a.config and not Path(a.config).is_file():  # `quickstart train.num_epochs=1`
        a.overrides, a.config = [a.config, *a.overrides], None
    run_quickstart(a.config, a.overrides, a.test, a.arch, a.max_new_tokens)
    return 0
