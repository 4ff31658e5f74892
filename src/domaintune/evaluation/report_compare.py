"""The "Base vs fine-tuned" section of report.md: the judged win-rate and grades (judge.json, written by
`domaintune judge`) and the benchmark accuracies (benchmark.json, written by `eval --benchmark`). Each part says
which command makes it when its file is missing; the same numbers are in metrics.json ("judge", "benchmark")."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import rundir


def _read(path: Path) -> tuple[dict | None, str | None]:
    if not path.is_file():
        return None, None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{path} could not be read ({e.__class__.__name__}); run the command that writes it again."
    return (obj, None) if isinstance(obj, dict) else (None, f"{path} is not a JSON object.")


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "n/a"


def _ci(ci: Any, pct: bool = True) -> str:
    if not (isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci)):
        return "n/a"
    return f"[{_pct(ci[0])}, {_pct(ci[1])}]" if pct else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def _num(x: Any) -> str:
    return f"{x:.2f}" if isinstance(x, (int, float)) else "n/a"


def _judge_lines(run: rundir.RunDir) -> list[str]:
    summary, problem = _read(run.file(rundir.JUDGE_SUMMARY))
    if problem:
        return [problem]
    if summary is None:
        return [f"not judged yet: `domaintune predict {run.path} --data test.jsonl --base-only`, then "
                f"`domaintune judge configs/judge.yaml --run {run.path}`"]
    if summary.get("status") != "complete":
        return [f"the judge run is {summary.get('status')!s} ({summary.get('progress', {})}): run "
                f"`domaintune judge configs/judge.yaml --run {run.path}` again to finish it"]
    judge = summary.get("judge", {})
    a_path, b_path = summary.get("a", {}).get("path"), summary.get("b", {}).get("path")
    lines = [f"Judge: `{judge.get('model')}` at temperature {judge.get('temperature')}; A = `{a_path}` (base), "
             f"B = `{b_path}` (fine-tuned), {summary.get('rows')} rows."]
    pw = summary.get("pairwise")
    if isinstance(pw, dict):
        causes = pw.get("ties_by_cause", {})
        rate = ([f"| win-rate of the fine-tuned model | {pw['problem']} |"] if pw.get("problem") else
                [f"| win-rate of the fine-tuned model (wins + ties/2) | {_pct(pw.get('win_rate'))} |",
                 f"| 95% bootstrap interval | {_ci(pw.get('win_rate_ci95'))} |"])
        lines += ["", "| pairwise (asked in both orders) | value |", "|---|---|",
                  f"| fine-tuned wins / ties / losses | {pw.get('wins')} / {pw.get('ties')} / {pw.get('losses')} |",
                  *rate,
                  f"| ties: judge said tie / orders disagreed / unparseable | {causes.get('judge_tie', 0)} / "
                  f"{causes.get('inconsistent', 0)} / {causes.get('unparseable', 0)} |"]
    gr = summary.get("grade")
    if isinstance(gr, dict):
        a, b, d = gr.get("a", {}), gr.get("b", {}), gr.get("diff", {})
        lines += ["", "| grade (1-10, against the reference) | mean | 95% interval | graded | unparseable |",
                  "|---|---|---|---|---|",
                  f"| base | {_num(a.get('mean'))} | {_ci(a.get('ci95'), False)} | {a.get('n')} | "
                  f"{a.get('unparseable')} |",
                  f"| fine-tuned | {_num(b.get('mean'))} | {_ci(b.get('ci95'), False)} | {b.get('n')} | "
                  f"{b.get('unparseable')} |",
                  f"| difference (fine-tuned - base) | {_num(d.get('mean'))} | {_ci(d.get('ci95'), False)} | "
                  f"{d.get('n')} | |"]
        if gr.get("problem"):
            lines += ["", str(gr["problem"])]
    return lines


def _benchmark_lines(run: rundir.RunDir) -> list[str]:
    result, problem = _read(run.file(rundir.BENCHMARK))
    if problem:
        return [problem]
    if result is None:
        return [f"no benchmark yet: `domaintune eval --benchmark zh_general_mc --run {run.path}`"]
    tasks = result.get("tasks", {})
    lines = ["| task | items | metric | base | fine-tuned | delta |", "|---|---|---|---|---|---|"]
    for name, t in tasks.items():
        for metric in ("acc", "acc_norm"):
            base, tuned = t.get("base", {}).get(metric), t.get("tuned", {}).get(metric)
            if base is None and tuned is None:
                continue
            delta = t.get("delta", {}).get(metric)
            sign = f"{100 * delta:+.1f} points" if isinstance(delta, (int, float)) else "n/a"
            lines.append(f"| {name} | {t.get('n', result.get('n', {}).get(name, ''))} | {metric} | {_pct(base)} | "
                         f"{_pct(tuned)} | {sign} |")
    limit = f", --limit {result['limit']}" if result.get("limit") else ""
    return lines + ["", f"lm-eval {result.get('lm_eval_version')}{limit}; a negative delta means the fine-tuned "
                        "model lost general ability on that task."]


def compare_section(run: rundir.RunDir) -> list[str]:
    """The report section as Markdown lines."""
    return (["## Base vs fine-tuned", "", "### Judged comparison", ""] + _judge_lines(run)
            + ["", "### Benchmarks (did it forget?)", ""] + _benchmark_lines(run))
