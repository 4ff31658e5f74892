"""Evaluation: how good a run is.

| module | what |
|---|---|
| `metrics.py` | BLEU / ROUGE that handle Chinese, exact match; predictions files read, scored, compared |
| `loss.py` | teacher-forced loss and perplexity on target tokens, lean on memory |
| `plot.py` | loss and learning-rate curves as PNG |
| `report.py` | report.md of a run directory |
"""
