"""The data-generation verb: `gen-data`.

    domaintune gen-data configs/selfinstruct.yaml [selfinstruct.KEY=VALUE ...]
    domaintune gen-data configs/selfinstruct.yaml --preview 5
    domaintune gen-data configs/selfinstruct.yaml --identity [--identity-language both]
    domaintune gen-data configs/selfinstruct.yaml --preferences [--run runs/my-sft] [--questions FILE]

The first form grows `selfinstruct.num_questions` Q&A pairs from the seed questions (or from the documents in
`selfinstruct.documents`) against any OpenAI-compatible endpoint (resumable: run the same command again after
a kill or an error). `--preview N` makes only N pairs (kept: a later full run goes on from them) and prints
them with their sources, to judge the quality before spending the budget. The last form writes the built-in
"who are you / who made you" data with `selfinstruct.persona` filled in, without any network. `--preferences`
makes chosen/rejected pairs for a preference stage (datagen/preferences.py). Output layout: see
`domaintune.datagen.store`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from .. import console
from .options import add_config_args

if TYPE_CHECKING:
    from ..config.selfinstruct import SelfInstructConfig


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
    p.add_argument("--preview", type=int, default=None, metavar="N",
                   help="make only N question/answer pairs, print them with their sources and stop; no train.jsonl "
                   "is written and a later run without --preview continues from them (default: %(default)s = off)")
    p.add_argument("--identity", action="store_true", default=False,
                   help="instead of calling the API, write the built-in self-cognition Q&A (who are you, who made "
                   "you, ...) with selfinstruct.persona filled in to OUTPUT_DIR/identity.jsonl (default: %(default)s)")
    p.add_argument("--identity-language", choices=["zh", "en", "both"], default=None,
                   help="language of the identity data (default: %(default)s = selfinstruct.language)")
    p.add_argument("--preferences", action="store_true", default=False,
                   help="instead of Q&A pairs, make chosen/rejected pairs for train.stage dpo/orpo/kto/simpo in "
                   "OUTPUT_DIR/preferences.jsonl: chosen = the file's answer (or the teacher's), rejected = --run's "
                   "own answer or the teacher's deliberately weak one; near-identical pairs are dropped; "
                   "resumable (default: %(default)s)")
    p.add_argument("--questions", default=None, metavar="FILE",
                   help="--preferences: rows with \"instruction\" (and \"output\") or \"question\" "
                   "(default: %(default)s = OUTPUT_DIR/train.jsonl, the pairs gen-data made)")
    p.add_argument("--run", default=None, metavar="RUN",
                   help="--preferences: the SFT run whose own greedy answers are the rejected side (default: "
                   "%(default)s = the teacher with the weak-answer prompt)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="--preferences --run: most tokens of the run's answer (default: %(default)s)")
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
    if args.preferences:
        return _preferences(cfg, args)
    if args.questions or args.run:
        console.error("--questions and --run belong to --preferences")
        return 2
    from ..datagen.selfinstruct import run_gen_data

    if args.preview is not None and args.preview < 1:
        console.error("--preview N needs N >= 1")
        return 2
    try:
        out = run_gen_data(cfg, preview=args.preview)
    except KeyboardInterrupt:
        return _interrupted(cfg)
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    if args.preview is not None:
        return _print_preview(out, args.preview, manifest)
    if not manifest.get("target_reached"):
        made = (f"{out / TRAIN} has {manifest.get('train_rows')} of {manifest.get('target')} rows"
                if manifest.get("train_rows") else f"no pair was kept, so no {out / TRAIN} was written")
        console.warn(f"{made}: {manifest.get('message')}")
        return 1
    print(f"wrote {manifest['train_rows']} rows to {out / TRAIN} (details: {out / MANIFEST})")
    return 0


def _preferences(cfg: SelfInstructConfig, args: argparse.Namespace) -> int:
    from ..datagen.preferences import run_preferences, summary

    if args.max_new_tokens < 1:
        console.error("--max-new-tokens needs N >= 1")
        return 2
    make_answerer = None
    if args.run:
        from functools import partial

        from ..inference.predict import GreedyAnswerer

        # Built by run_preferences once the questions file is read: the model loads after every input check.
        make_answerer = partial(GreedyAnswerer, args.run, args.max_new_tokens)
    try:
        path = run_preferences(cfg, args.questions, make_answerer=make_answerer)
    except KeyboardInterrupt:
        return _interrupted(cfg, "preferences")
    s = summary(path)
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(s["dropped"].items())) or "none"
    print(f"wrote {s['kept']} preference pair{'' if s['kept'] == 1 else 's'} to {path} from {s['questions']} "
          f"questions (dropped: {dropped}; "
          f"details: {path.parent / 'manifest.json'} and {path.parent / 'preference_records.jsonl'})")
    return 0 if s["kept"] else 1


def _interrupted(cfg: SelfInstructConfig, section: str | None = None) -> int:
    """Ctrl-C: what the manifest recorded (how much is kept, how to go on), and the shell's 130."""
    from ..datagen.store import OutputStore

    manifest = OutputStore(cfg.output_dir).read_manifest()
    m = manifest.get(section, {}) if section else manifest
    said = m.get("message") or m.get("error") or "interrupted; run the same command again to continue"
    console.error(f"gen-data: {said}")
    return 130


def _print_preview(out: Path, n: int, manifest: dict) -> int:
    from ..datagen.store import ANSWERS, TRAIN, read_working_file

    rows = read_working_file(out / ANSWERS)[:n]
    for i, r in enumerate(rows, 1):
        src = r.get("source")
        where = ""
        if isinstance(src, dict):
            where = f"{src.get('file')}" + (f", page {src['page']}" if src.get("page") else "") + \
                (f", {src['heading']}" if src.get("heading") else "")
        print(f"--- {i}/{len(rows)}" + (f"  [{where}]" if where else ""))
        print(f"Q: {r.get('question')}")
        print(f"A: {r.get('answer')}")
    spent = manifest.get("spent", {})
    counts = manifest["counts"]
    gave_up = manifest.get("message")
    print(f"--- preview: {len(rows)} pairs in {out / ANSWERS}; spent {spent.get('calls')} calls, about "
          f"{spent.get('prompt_tokens', 0) + spent.get('completion_tokens', 0)} tokens; dropped: "
          f"{counts['questions_rejected'] or {}} (questions), {counts['answers_rejected'] or {}} (answers)."
          + ("" if gave_up else f" The run is finished: {out / TRAIN} has {manifest.get('train_rows')} rows."
             if manifest.get("status") in ("complete", "incomplete")
             else " Run again without --preview to continue to selfinstruct.num_questions."))
    if gave_up:  # the preview stopped short: why, and what to change before a full run spends more
        console.warn(f"the preview made {len(rows)} of {n} pairs: {gave_up}")
    return 0 if len(rows) >= min(n, manifest.get("target", n)) else 1
