"""`domaintune quickstart`: the whole loop on CPU in a few minutes, offline.

1. build the tiny model named by `model.name_or_path` if that folder is missing (make-tiny-model);
2. train as the config says (a fresh run: an earlier quickstart run is replaced);
3. predict the test split, score it (metrics.json), plot the loss (loss.png), write report.md.

The run directory then holds everything the later verbs produce, ready for `chat`, `serve`, `export`.
"""
from __future__ import annotations

from pathlib import Path


def run_quickstart(config: str, overrides: list[str] | None = None, test: str = "examples/data/test.jsonl",
                   arch: str = "qwen2", max_new_tokens: int = 64) -> Path:
    from .config import load_config
    from .generation import GenerationParams
    from .plot import plot_run
    from .predict import run_predict
    from .report import run_report
    from .tiny import make_tiny_model
    from .train import run_train

    cfg = load_config(config, overrides or [])
    model_dir = Path(cfg.model.name_or_path)
    if not model_dir.exists():
        print(f"[1/4] building the tiny offline model in {model_dir} ...", flush=True)
        make_tiny_model(model_dir, arch=arch)
    else:
        print(f"[1/4] using the model in {model_dir}", flush=True)
    print("[2/4] training ...", flush=True)
    run = run_train(cfg, overwrite=True)
    print(f"[3/4] predicting {test} and scoring ...", flush=True)
    run_predict(run, test, params=GenerationParams(max_new_tokens=max_new_tokens), overwrite=True)
    print("[4/4] plot and report ...", flush=True)
    plot_run(run)
    report = run_report(run)
    print(f"\ndone. Run directory: {run}\n  report: {report}\n  next: domaintune chat {run}  |  domaintune serve {run}  "
          f"|  domaintune export {run} --out {run}-merged", flush=True)
    return run


def add_parser(sub) -> None:
    p = sub.add_parser("quickstart", help="build a tiny offline model, train, predict, score, plot and report (CPU, minutes)",
                       description="Run the whole loop on the bundled sample data: builds the tiny model if missing, "
                                   "LoRA-trains it, predicts the test split, writes metrics.json, loss.png and report.md.")
    p.add_argument("config", nargs="?", default="configs/quickstart.yaml", help="config file (default: %(default)s)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.num_epochs=1 (default: none)")
    p.add_argument("--test", default="examples/data/test.jsonl", help="test file to predict (default: %(default)s)")
    p.add_argument("--arch", default="qwen2", choices=("bloom", "qwen2", "llama"),
                   help="architecture of the tiny model, when it must be built (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per test prompt (default: %(default)s)")
    p.set_defaults(func=lambda a: (run_quickstart(a.config, a.overrides, a.test, a.arch, a.max_new_tokens), 0)[1])
