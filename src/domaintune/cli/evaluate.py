"""Verbs that look at a run's results: `eval`, `plot`, `report`."""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import console


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score a predictions file (BLEU-4, ROUGE, exact match) or compare two; "
                                    "--benchmark: multiple-choice accuracy of base vs tuned (lm-eval)",
                       description="Score predictions.jsonl against its targets; writes metrics.json and "
                                   "metrics_per_sample.jsonl. With --compare, write a Markdown comparison. With "
                                   "--benchmark TASK --run RUN, score multiple-choice tasks through lm-eval on RUN's "
                                   "base model and on RUN itself (the forgetting check); writes RUN/benchmark.json "
                                   "and adds a summary to RUN/metrics.json.")
    p.add_argument("predictions", nargs="?", default=None, metavar="PREDICTIONS",
                   help="predictions.jsonl (or a JSON array file) to score (default: %(default)s)")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="where metrics.json / compare.md go (default: %(default)s = next to the predictions)")
    p.add_argument("--compare", nargs=2, default=None, metavar=("A", "B"),
                   help="compare two predictions files, e.g. base vs fine-tuned; writes compare.md "
                        "(default: %(default)s)")
    p.add_argument("--run", default=None, metavar="RUN",
                   help="also compute RUN's loss and perplexity on the targets of --data; with --benchmark, the run "
                        "whose base model and adapter (or full model) are scored (default: %(default)s)")
    p.add_argument("--data", default=None, metavar="TEST",
                   help="the test file the predictions came from, used with --run (default: %(default)s)")
    p.add_argument("--benchmark", nargs="+", default=None, metavar="TASK",
                   help="multiple-choice tasks for --run RUN: zh_general_mc or en_general_mc (shipped), a path to "
                        "an lm-eval task YAML or a folder of them, or an lm-eval task name such as "
                        "ceval-valid_high_school_physics (needs the hub); needs lm-eval: pip install "
                        "'domaintune[bench]' (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="with --benchmark, score only the first N items of each task (default: %(default)s = all)")
    p.add_argument("--benchmark-batch-size", type=int, default=8, metavar="N",
                   help="with --benchmark, lm-eval's batch size (default: %(default)s)")
    p.add_argument("--device", default=None,
                   help="with --benchmark, cuda, mps or cpu (default: %(default)s = the best available)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("plot", help="draw loss / eval loss / learning rate of a run as a PNG",
                       description="Plot log.jsonl of a run directory (or a log.jsonl / trainer_state.json).")
    p.add_argument("source", metavar="RUN_OR_FILE",
                   help="run directory, log.jsonl or Hugging Face trainer_state.json")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="PNG to write (default: %(default)s = loss.png in the run directory)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("report", help="write a Markdown report of a run (config, data, loss curve, metrics, "
                                      "examples)",
                       description="Write report.md from the files in a run directory.")
    p.add_argument("run", metavar="RUN", help="run directory made by `domaintune train`")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="report file to write (default: %(default)s = RUN/report.md)")
    p.set_defaults(func=cmd_report)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from ..evaluation.metrics import eval_dir, format_metrics, read_predictions, run_compare, run_eval
    from ..evaluation.report import refresh_report
    from ..rundir import COMPARE

    if args.benchmark is not None:
        return _cmd_benchmark(args)
    if args.limit is not None or args.device is not None:
        raise UserError("--limit and --device are used with --benchmark TASK --run RUN")
    if args.compare:
        a, b = args.compare
        out = Path(args.out_dir) / COMPARE if args.out_dir else None
        written = f"wrote {run_compare(Path(a), Path(b), out=out)}"
        (console.note if args.predictions else print)(written)  # the metrics table below is the result
        if args.predictions is None:
            return 0
    if args.predictions is None:
        raise UserError("give a predictions file (domaintune eval RUN/predictions.jsonl) or --compare A B")
    extra: dict | None = None
    if args.run:  # the model's teacher-forced loss on the test targets, next to the text scores
        if not args.data:
            raise UserError("--run RUN needs --data TEST: the test file the predictions were made from")
        from ..inference.predict import run_test_loss

        read_predictions(Path(args.predictions))  # a bad predictions file fails before a model is loaded
        loss = run_test_loss(Path(args.run), Path(args.data))
        extra = {"loss": loss["loss"], "perplexity": loss["perplexity"]}
    elif args.data:
        raise UserError("--data is used with --run RUN (loss and perplexity of RUN's model on the test file)")
    metrics = run_eval(Path(args.predictions), out_dir=Path(args.out_dir) if args.out_dir else None, extra=extra)
    print(format_metrics(metrics))
    refresh_report(Path(args.out_dir) if args.out_dir else eval_dir(Path(args.predictions)))
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from ..evaluation.benchmark import format_benchmark
    from ..evaluation.report import refresh_report
    from ..inference.benchmark import run_benchmark
    from ..rundir import BENCHMARK, METRICS

    if not args.run:
        raise UserError("--benchmark needs --run RUN: the run whose base model and tuned model are scored")
    if args.predictions or args.compare or args.data:
        raise UserError("--benchmark runs on its own: leave out PREDICTIONS, --compare and --data "
                        "(score predictions in a separate `domaintune eval` call)")
    result = run_benchmark(Path(args.run), args.benchmark, limit=args.limit, batch_size=args.benchmark_batch_size,
                           device=args.device)
    print(format_benchmark(result))
    run = Path(result["run"])
    refresh_report(run)
    console.note(f"wrote {run / BENCHMARK} and the summary under \"benchmark\" in {run / METRICS}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from ..evaluation.plot import plot_run

    print(f"wrote {plot_run(Path(args.source), Path(args.out) if args.out else None)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..evaluation.report import run_report

    print(f"wrote {run_report(Path(args.run), Path(args.out) if args.out else None)}")
    return 0
