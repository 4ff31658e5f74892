"""Evaluation: how good a run is.

| module | what |
|---|---|
| `metrics.py` | BLEU / ROUGE that handle Chinese, exact match; predictions files read, scored, compared |
| `loss.py` | teacher-forced loss and perplexity on target tokens, lean on memory |
| `plot.py` | loss and learning-rate curves as PNG |
| `report.py` | report.md of a run directory, with the base-vs-tuned section (report_compare.py) |
| `judge.py` | `run_judge`: base vs tuned judged by an OpenAI-compatible model, resumable |
| `judge_prompts.py`, `judge_rows.py`, `judge_stats.py` | judge prompts and reply parsing, matching rows, bootstrap |
| `benchmark.py` | the lm-eval side of `eval --benchmark` (inference/benchmark.py loads the models) |
"""
