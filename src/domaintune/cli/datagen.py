"""The data-generation verb: `gen-data`.

    domaintune gen-data configs/selfinstruct.yaml [selfinstruct.KEY=VALUE ...]
    domaintune gen-data configs/selfinstruct.yaml --identity [--identity-language both]

The first form grows `selfinstruct.num_questions` Q&A pairs from the seed questions against any
OpenAI-compatible endpoint (resumable: run the same command again after a kill or an error). The
second writes the built-in "who are you / who made you" data with `selfinstruct.persona` filled in,
without any network. Output layout: see `domaintune.datagen.store`.
"""
from __future__ import annotations

import argparse
import json
import sys

from .options import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gen-data",
        help="generate a domain Q&A dataset from seed questions (self-instruct, any OpenAI-compatible API)",
        description="Generate questions from seed questions, filter them, answer them and write train.jsonl "
        "(instruction/input/output) in selfinstruct.output_dir. The API key is read from the environment "
        "variable named by selfinstruct.api_key_env. Killed or failed runs resume when run again.",
    )
    add_config_args(p, example="selfinstruct.base_url=http://127.0.0.1:8000/v1 selfinstruct.num_questions=50",
                    what="YAML config with a selfinstruct section, e.g. configs/selfinstruct.yaml")
    p.add_argument("--identity", action="store_true", default=False,
                   help="instead of calling the API, write the built-in self-cognition Q&A (who are you, who made "
                   "you, ...) with selfinstruct.persona filled in to OUTPUT_DIR/identity.jsonl (default: %(default)s)")
    p.add_argument("--identity-language", choices=["zh", "en", "both"], default=None,
                   help="language of the identity data (default: %(default)s = selfinstruct.language)")
    p.set_defaults(func=cmd_gen_data)


def cmd_gen_data(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..datagen.store import MANIFEST, TRAIN

    cfg = load_config(args.config, args.overrides).selfinstruct
    if args.identity:
        from ..datagen.identity import run_identity

        path = run_identity(cfg, language=args.identity_language)
        with open(path, encoding="utf-8") as f:
            n = sum(1 for _ in f)
        print(f"wrote {n} identity rows to {path}")
        return 0
    from ..datagen.selfinstruct import run_gen_data

    out = run_gen_data(cfg)
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    if not manifest.get("target_reached"):
        print(f"warning: {out / TRAIN} has {manifest.get('train_rows')} of {manifest.get('target')} rows: "
              f"{manifest.get('message')}", file=sys.stderr)
        return 1
    print(f"wrote {manifest['train_rows']} rows to {out / TRAIN} (details: {out / MANIFEST})")
    return 0
