"""The judge verb: `judge`.

    domaintune judge configs/judge.yaml --run RUN                       # base (A) vs fine-tuned (B) of a run
    domaintune judge configs/judge.yaml --a base.jsonl --b tuned.jsonl --out DIR --mode both

An OpenAI-compatible model compares two predictions files row by row (pairwise, both orders) and/or grades each
answer 1-10 against the reference. `--run RUN` is short for `--a RUN/predictions.base.jsonl --b
RUN/predictions.jsonl` (made by `predict RUN --data TEST --base-only` and `predict RUN --data TEST`). The
endpoint, model, prompts and statistics are the `judge` config section (`domaintune config --explain`); --mode
and --max-rows are shortcuts for judge.mode and judge.max_rows. Files: see `domaintune.evaluation.judge`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import console
from .options import add_config_args

# judge.mode's values (config/judge.py; a test keeps the two equal): not imported from there, because the config
# package pulls in pydantic and `domaintune --help` must stay instant.
MODES = ("pairwise", "grade", "both")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "judge", help="compare two predictions files (base vs fine-tuned) with an LLM judge: win-rate, grades",
        description="Judge predictions file B against A with an OpenAI-compatible model: pairwise (each row asked "
        "in both orders, so position bias cancels) and/or graded 1-10 against the reference. Writes judge.jsonl "
        "(one record per call, resumable: run the same command again after a kill or an error), judge.json (the "
        "summary, with 95% bootstrap intervals) and metrics.json[\"judge\"] into --out. The API key is read from "
        "the environment variable named by judge.api_key_env.")
    add_config_args(p, example="judge.base_url=http://127.0.0.1:8000/v1 judge.model=qwen2.5-72b-instruct",
                    what="YAML config with a judge section, e.g. configs/judge.yaml")
    p.add_argument("--run", default=None, metavar="RUN",
                   help="run directory: A = RUN/predictions.base.jsonl, B = RUN/predictions.jsonl unless --a/--b "
                   "say otherwise (default: %(default)s)")
    p.add_argument("--a", default=None, metavar="A.jsonl",
                   help="predictions of the reference side, e.g. the base model (default: %(default)s)")
    p.add_argument("--b", default=None, metavar="B.jsonl",
                   help="predictions of the side under test, e.g. the fine-tuned model; win-rates are B's "
                   "(default: %(default)s)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="folder for judge.jsonl, judge.json and metrics.json (default: %(default)s = B's folder)")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="pairwise, grade or both (default: %(default)s = judge.mode of the config, itself "
                   "pairwise by default)")
    p.add_argument("--data", default=None, metavar="TEST",
                   help="the test file the predictions were made from, to show the judge the plain questions "
                   "(default: %(default)s = the file named in B's .meta.json when it is unchanged, else the "
                   "predictions' input)")
    p.add_argument("--max-rows", type=int, default=None, metavar="N",
                   help="judge only the first N rows; a later run with more continues (default: %(default)s = "
                   "judge.max_rows of the config, itself every row)")
    p.set_defaults(func=cmd_judge)


def cmd_judge(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..errors import UserError
    from ..evaluation.judge import JUDGE_RECORDS, JUDGE_SUMMARY, METRICS_KEY, run_judge
    from ..evaluation.judge_stats import format_summary
    from ..rundir import BASE_PREDICTIONS, METRICS, PREDICTIONS

    run = Path(args.run) if args.run else None
    a = Path(args.a) if args.a else (run / BASE_PREDICTIONS if run else None)
    b = Path(args.b) if args.b else (run / PREDICTIONS if run else None)
    if a is None or b is None:
        raise UserError("give the two predictions files, --a A.jsonl --b B.jsonl, or --run RUN for RUN's base "
                        "(predictions.base.jsonl) and fine-tuned (predictions.jsonl) predictions")
    overrides = list(args.overrides)
    if args.mode is not None:
        overrides.append(f"judge.mode={args.mode}")
    if args.max_rows is not None:
        overrides.append(f"judge.max_rows={args.max_rows}")
    cfg = load_config(args.config, overrides).judge
    if a.name == BASE_PREDICTIONS and not a.is_file():
        raise UserError(f"predictions file '{a}' not found: {base_predict_hint(a.parent)}")
    summary = run_judge(cfg, a, b, out=args.out, data=args.data)
    out = Path(args.out) if args.out else b.parent
    print(format_summary(summary))
    for block in ("pairwise", "grade"):
        problem = (summary.get(block) or {}).get("problem")
        if problem:
            console.warn(f"judge {block}: {problem}")
    console.note(f"wrote {out / JUDGE_SUMMARY} and {out / METRICS}[\"{METRICS_KEY}\"] (records: {out / JUDGE_RECORDS})")
    return 0


def base_predict_hint(run: Path) -> str:
    """How to make RUN's base-model predictions comparable with its predictions.jsonl: the predict command with
    the same test file and the generation settings that differ from predict's defaults (from its .meta.json,
    e.g. the quickstart's --max-new-tokens 64); a generic command when there is no such file."""
    import json
    from dataclasses import asdict

    from ..inference.params import PRESETS
    from ..rundir import PREDICTIONS, PREDICTIONS_META_SUFFIX

    try:
        meta = json.loads((run / (PREDICTIONS + PREDICTIONS_META_SUFFIX)).read_text(encoding="utf-8"))
        data, generation = str(meta["data"]["path"]), dict(meta["generation"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"run `domaintune predict {run} --data test.jsonl --base-only` first"
    defaults = asdict(PRESETS["predict"])
    flags = "".join(f" --{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in generation.items()
                    if k in defaults and v != defaults[k] and v is not None and v is not False)
    return (f"run `domaintune predict {run} --data {data} --base-only{flags}` first (the test file and settings "
            f"of {run / PREDICTIONS}, so that both are made alike)")
