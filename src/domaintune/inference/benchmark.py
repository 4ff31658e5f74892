"""`run_benchmark()`: the forgetting check (`eval --benchmark`). Multiple-choice accuracy of a run's base model and
of the run itself, through lm-eval, so a user sees whether tuning broke general ability.

The loading half lives here, next to the one loader (`load_run`); everything lm-eval (tasks, scoring, files) is in
evaluation/benchmark.py. An adapter run is loaded once and scored twice on the same object: with the adapter
switched off (peft's `disable_adapter()`: exactly the base model) and on. A full fine-tune is compared with the
base model its config.yaml names, loaded the same way, one model in memory at a time.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError


def run_benchmark(run_dir: Path, tasks: list[str], limit: int | None = None, batch_size: int = 8,
                  device: str | None = None, include_path: list[Path] | None = None) -> dict:
    """Score `tasks` on the base model and on the trained run in `run_dir`; write RUN/benchmark.json and a summary
    under "benchmark" in RUN/metrics.json (its other keys kept); return benchmark.json's content:
    {"tasks": {name: {"base": {"acc", "acc_stderr", "acc_norm", ...}, "tuned": {...}, "delta": {"acc", ...},
    "n": items}}, "limit", "n": {name: items}, "lm_eval_version", "date", "run"}.

    `tasks`: shipped task names (zh_general_mc, en_general_mc), paths to lm-eval task YAMLs or folders of them,
    or lm-eval registry names (these need the hub). `limit`: the first N items of each task (default all).
    `batch_size`: lm-eval's batch size. `device`: default the best available. `include_path`: more folders of
    task YAMLs whose tasks may then be named."""
    from ..evaluation import benchmark as bench
    from .loading import inspect_run, load_run

    bench.check_settings(tasks, limit, batch_size)
    src = inspect_run(run_dir)  # not a run, or no weights: the loader's own error, before lm-eval is imported
    if not src.adapter and src.config is None:
        raise UserError(f"'{src.path}' is a model directory without config.yaml, so there is no base model to "
                        "compare it with: give a training run (a LoRA adapter, or a full fine-tune whose config.yaml "
                        "names its base model)")
    plan = bench.plan_tasks(tasks, include_path)  # unknown tasks fail here, before a model is loaded
    with bench.lm_eval_session(plan.offline):
        if src.adapter:
            loaded = load_run(src, device=device)
            with loaded.model.disable_adapter():
                base = bench.score_model(loaded.model, loaded.tokenizer, plan, limit, batch_size)
            tuned = bench.score_model(loaded.model, loaded.tokenizer, plan, limit, batch_size)
        else:
            loaded = load_run(src, base_only=True, device=device)
            base = bench.score_model(loaded.model, loaded.tokenizer, plan, limit, batch_size)
            del loaded
            _free_memory()
            loaded = load_run(src, device=device)
            tuned = bench.score_model(loaded.model, loaded.tokenizer, plan, limit, batch_size)
    return bench.save_results(src.path, base, tuned, plan, limit)


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
