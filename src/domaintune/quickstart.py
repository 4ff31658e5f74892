"""`domaintune quickstart`: the whole loop on CPU in a few minutes, offline, from any folder.

1. build the tiny model named by `model.name_or_path` if that folder is missing (make-tiny-model);
2. train as the config says (a fresh run: an earlier quickstart run is replaced);
3. predict the test split, score it (metrics.json), plot the loss (loss.png), write report.md.

Without a config file it uses the quickstart config and the sample data shipped inside the package
(configs/quickstart.yaml and examples/data/ in the source tree), so it works after a plain `pip install`;
the tiny model and the run go to runs/ under the current folder. The run directory then holds everything
the later verbs produce, ready for `chat`, `serve`, `export`.
"""
from __future__ import annotations

from pathlib import Path

from . import console


def run_quickstart(config: str | Path | None = None, overrides: list[str] | None = None,
                   test: str | Path | None = None, arch: str = "qwen2", max_new_tokens: int = 64) -> Path:
    """Build the tiny model if missing, train, predict `test`, plot and report; returns the run directory.

    `config` None: the bundled quickstart config, training on the bundled sample data (unless an override sets
    data.path). `test` None: the bundled sample test file."""
    from dataclasses import replace

    from .bundled import example_config, sample_data_dir
    from .config import load_config
    from .evaluation.plot import plot_run
    from .evaluation.report import run_report
    from .inference.params import PRESETS
    from .inference.predict import run_predict
    from .training.tiny import make_tiny_model
    from .training.trainer import run_train

    overrides = list(overrides or [])
    if config is None:
        config = example_config("quickstart.yaml")
        if not any(o.split("=", 1)[0].strip() == "data.path" for o in overrides):
            overrides.insert(0, f"data.path={sample_data_dir() / 'train.jsonl'}")
    test = Path(test) if test is not None else sample_data_dir() / "test.jsonl"
    # Each step's own result (train's run directory, predict's metrics table) is progress here: stderr. The
    # closing summary below is the quickstart's result.
    with console.stdout_to_stderr(keep_results=False):
        cfg = load_config(config, overrides)
        model_dir = Path(cfg.model.required_name())
        if not model_dir.exists():
            console.note(f"[1/4] building the tiny offline model in {model_dir} ...")
            make_tiny_model(model_dir, arch=arch)
        else:
            console.note(f"[1/4] using the model in {model_dir}")
        console.note("[2/4] training ...")
        run = run_train(cfg, overwrite=True)
        console.note(f"[3/4] predicting {test} and scoring ...")
        run_predict(run, test, params=replace(PRESETS["predict"], max_new_tokens=max_new_tokens), overwrite=True)
        console.note("[4/4] plot and report ...")
        plot_run(run)
        report = run_report(run)
    console.result(f"\ndone. Run directory: {run}\n  report: {report}\n  next: domaintune chat {run}  |  "
                   f"domaintune serve {run}  |  domaintune export {run} --out {run}-merged")
    return run
