"""Self-instruct data generation: the `gen-data` verb.

    domaintune gen-data configs/selfinstruct.yaml [selfinstruct.KEY=VALUE ...]
    domaintune gen-data configs/selfinstruct.yaml --identity [--identity-language both]

The first form grows `selfinstruct.num_questions` Q&A pairs from the seed questions against any
OpenAI-compatible endpoint (resumable: run the same command again after a kill or an error). The
second writes the built-in "who are you / who made you" data with `selfinstruct.persona` filled in,
without any network. Output layout: see `domaintune.selfinstruct.store`.

Only the stdlib is imported here so `domaintune --help` stays instant; `run_gen_data` lives in
`.pipeline`, `run_identity` in `.identity`.
"""
from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    """Register `gen-data` on the CLI's subparsers object."""
    p = sub.add_parser(
        "gen-data",
        help="generate a domain Q&A dataset from seed questions (self-instruct, any OpenAI-compatible API)",
        description="Generate questions from seed questions, filter them, answer them and write train.jsonl "
        "(instruction/input/output) in selfinstruct.output_dir. The API key is read from the environment "
        "variable named by selfinstruct.api_key_env. Killed or failed runs resume when run again.",
    )
    p.add_argument("config", help="YAML config with a selfinstruct section, e.g. configs/selfinstruct.yaml (required)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", default=[],
                   help="dotted overrides, e.g. selfinstruct.base_url=http://127.0.0.1:8000/v1 "
                   "selfinstruct.num_questions=50 (default: %(default)s)")
    p.add_argument("--identity", action="store_true", default=False,
                   help="instead of calling the API, write the built-in self-cognition Q&A (who are you, who made "
                   "you, ...) with selfinstruct.persona filled in to OUTPUT_DIR/identity.jsonl (default: %(default)s)")
    p.add_argument("--identity-language", choices=["zh", "en", "both"], default=None,
                   help="language of the identity data (default: %(default)s = selfinstruct.language)")
    p.set_defaults(func=_handle)


def _handle(args) -> int:
    from domaintune.config import load_config

    cfg = load_config(args.config, args.overrides).selfinstruct
    if args.identity:
        from .identity import run_identity

        path = run_identity(cfg, language=args.identity_language)
        n = sum(1 for _ in open(path, encoding="utf-8"))
        print(f"wrote {n} identity rows to {path}")
        return 0
    from .pipeline import run_gen_data

    out = run_gen_data(cfg)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    if not manifest.get("target_reached"):
        print(f"warning: {out / 'train.jsonl'} has {manifest.get('train_rows')} of {manifest.get('target')} rows: "
              f"{manifest.get('message')}", file=sys.stderr)
        return 1
    print(f"wrote {manifest['train_rows']} rows to {out / 'train.jsonl'} (details: {out / 'manifest.json'})")
    return 0
