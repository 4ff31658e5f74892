"""`domaintune judge`: an OpenAI-compatible model judges two predictions files, A (e.g. the base model) and B
(e.g. the fine-tuned one), row by row.

    domaintune judge configs/judge.yaml --run RUN     # A = RUN/predictions.base.jsonl, B = RUN/predictions.jsonl

- pairwise: each row is asked twice, with the answers shown as (A, B) and as (B, A), so that a judge's
  preference for a position cancels out (see judge_stats for how the two verdicts make one outcome);
- grade: each answer is graded 1-10 against the reference answer (and the rubric), one call per answer.

Files, in the output folder (default: B's folder, so a run directory gets them):
- judge.jsonl: the working file. Its first line is a header naming what the records belong to (sha256 of A and
  B, of the prompts, rubric and questions, and every judge setting that can change a verdict: see
  judge_header.py); then one record per judge call, appended and fsynced as each call finishes. A killed or
  failed run resumes when run again: what is recorded is kept, what is missing is asked. A rerun with other
  inputs or settings in the same folder is refused, naming each key that changed.
- judge.json: the summary (status, win/tie/loss, win-rate and mean grades with 95% bootstrap intervals, per-row
  outcomes, calls, retries, malformed replies, tokens, HTTP statuses). Rewritten as the run goes, so a killed
  run leaves its counts.
- metrics.json: the summary's numbers under the key "judge", merged with what other verbs wrote there.

The HTTP side is gen-data's (`datagen.client.ChatClient`): worker threads only send requests, the main thread
writes. A reply that is not a chat completion or has no VERDICT/GRADE line is asked again up to
`judge.malformed_retries` times with backoff, then recorded as unparseable (a tie in pairwise, left out of grade
means, and counted in the summary).
"""
from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import console, rundir
from ..config.judge import JudgeConfig
from ..datagen.chunking import approx_tokens
from ..datagen.client import ChatClient, MalformedResponse
from ..datagen.manifest import now
from ..errors import UserError
from ..jsonl import JsonlAppender, read_jsonl, repair_tail
from . import judge_stats as S
from .judge_header import header_changes, verdict_settings
from .judge_prompts import Prompts, parse_grade, parse_verdict, sha256_text
from .judge_rows import Row, file_sha256, match_rows
from .metrics import merge_metrics

JUDGE_RECORDS = rundir.JUDGE_RECORDS
JUDGE_SUMMARY = rundir.JUDGE_SUMMARY
METRICS_KEY = "judge"
REASON_CHARS = 2000  # of a judge's reply kept in its record
PROGRESS_EVERY_S = 0.5  # judge.json is rewritten at most this often while the run goes
@dataclass(frozen=True)
class Task:
    """One judge call: a row's pairwise verdict in one order ("AB", "BA") or the grade of one answer ("a", "b")."""

    row: Row
    kind: str  # pairwise | grade
    side: str

    @property
    def key(self) -> str:
        return f"{self.row.id}/{self.kind}/{self.side}"


def tasks_of(rows: list[Row], mode: str) -> list[Task]:
    kinds = [("pairwise", ("AB", "BA"))] if mode in ("pairwise", "both") else []
    kinds += [("grade", ("a", "b"))] if mode in ("grade", "both") else []
    return [Task(r, kind, side) for r in rows for kind, sides in kinds for side in sides]


class JudgeRun:
    """One `domaintune judge` run: rows and prompts, the records of earlier runs, the calls still to make."""

    def __init__(self, cfg: JudgeConfig, a: Path, b: Path, out: Path | None = None, data: Path | None = None):
        self.cfg, self.a, self.b = cfg, Path(a), Path(b)
        self.out = Path(out) if out is not None else self.b.parent
        all_rows, self.questions_from = match_rows(self.a, self.b, data)
        self.rows = all_rows[: cfg.max_rows]
        self.tasks = tasks_of(self.rows, cfg.mode)
        kinds = ("pairwise", "grade") if cfg.mode == "both" else (cfg.mode,)
        self.prompts = Prompts(cfg, kinds)
        fp = self.prompts.fingerprint()
        self.header = {
            "kind": "header", "a": str(self.a), "b": str(self.b), "a_sha256": file_sha256(self.a),
            "b_sha256": file_sha256(self.b), "questions_from": self.questions_from,
            "settings": verdict_settings(cfg),
            "questions_sha256": sha256_text("\n\x00".join(f"{r.id}\x00{r.question}" for r in all_rows)),
            "pairwise_template_sha256": fp.get("pairwise_template_sha256"),
            "grade_template_sha256": fp.get("grade_template_sha256"), "rubric_sha256": fp["rubric_sha256"],
            "created_at": now()}
        self.records: dict[str, dict] = {}  # key -> record (the first one, should a key ever repeat)
        self.client: ChatClient | None = None
        self._prev_http: dict[str, Any] = {"attempts": 0, "status": {}, "no_response": 0}  # judge.json's, on a rerun

    # ------------------------------------------------------------------ files
    @property
    def records_path(self) -> Path:
        return self.out / JUDGE_RECORDS

    @property
    def summary_path(self) -> Path:
        return self.out / JUDGE_SUMMARY

    def _load(self) -> bool:
        """Read the records of earlier runs; returns whether the header still has to be written."""
        path = self.records_path
        if repair_tail(path):
            console.note(f"{path}: removed an incomplete last line left by an interrupted run")
        hint = "delete that line (or the whole file, to judge afresh) and run again"
        found = read_jsonl(path, fix_hint=hint)
        if not found:
            return True
        head = found[0]
        if head.get("kind") != "header":
            raise UserError(f"{path}: its first line is not a judge header, so it cannot be resumed; delete it or "
                            "pass --out DIR to write elsewhere")
        if len(found) == 1:  # a header and no verdict (the first call failed): nothing to mix, start afresh
            path.unlink()
            return True
        changed = header_changes(head, self.header, type(self.cfg))
        if changed:
            raise UserError(f"{path} holds verdicts for other inputs or settings ({'; '.join(changed)}); they cannot "
                            "be mixed with these. Pass --out DIR to judge into another folder, or delete "
                            f"{path} to start afresh")
        for r in found[1:]:
            key = r.get("key")
            if isinstance(key, str) and r.get("kind") in ("pairwise", "grade"):
                self.records.setdefault(key, r)
        counts = _read_json(self.summary_path).get("counts")
        prev = counts.get("http") if isinstance(counts, dict) else None
        if isinstance(prev, dict):
            self._prev_http = prev
        return False

    # ------------------------------------------------------------------ the calls (worker threads)
    def _prompt(self, task: Task) -> str:
        r = task.row
        if task.kind == "grade":
            return self.prompts.grade(r.question, r.reference, r.a if task.side == "a" else r.b)
        first, second = (r.a, r.b) if task.side == "AB" else (r.b, r.a)
        return self.prompts.pairwise(r.question, r.reference, first, second)

    def _ask(self, task: Task) -> dict:
        """One task's record: ask, parse, ask again after a malformed reply (with backoff), give up as unparseable."""
        cfg, client = self.cfg, self.client
        assert client is not None
        prompt = self._prompt(task)
        calls = malformed = prompt_tokens = completion_tokens = 0
        estimated, reason, finish = False, "", None
        value: str | float | None = None  # a verdict ("A", "B", "tie") or a grade; None: unparseable
        for attempt in range(cfg.malformed_retries + 1):
            calls += 1
            try:
                comp = client.complete(prompt)
            except MalformedResponse as e:
                reason = f"not a chat completion: {e}"
            else:
                estimated = estimated or comp.prompt_tokens is None or comp.completion_tokens is None
                prompt_tokens += comp.prompt_tokens if comp.prompt_tokens is not None else approx_tokens(prompt)
                completion_tokens += (comp.completion_tokens if comp.completion_tokens is not None
                                      else approx_tokens(comp.text))
                finish = comp.finish_reason
                value, reason = (parse_verdict if task.kind == "pairwise" else parse_grade)(comp.text)
                if value is not None:
                    break
            malformed += 1
            if attempt < cfg.malformed_retries:
                time.sleep(cfg.retry_base_delay * 2 ** attempt)
        record: dict = {"kind": task.kind, "key": task.key, "id": task.row.id}
        if task.kind == "pairwise":
            verdict = value if isinstance(value, str) else None  # parse_verdict's
            record.update(order=task.side, verdict=verdict if verdict is not None else "unparseable",
                          winner=S.winner_of(task.side, verdict))
        else:
            record.update(answer=task.side, grade=value)
        record.update(unparseable=value is None, reason=reason[:REASON_CHARS], finish_reason=finish, calls=calls,
                      malformed=malformed, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                      tokens_estimated=estimated, model=cfg.model, time=now())
        return record

    # ------------------------------------------------------------------ run
    def execute(self) -> dict:
        """Judge what is missing; write judge.jsonl, judge.json and (when complete) metrics.json. Returns the
        summary."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        need_header = self._load()
        todo = [t for t in self.tasks if t.key not in self.records]
        if todo:
            self.client = ChatClient(cfg, section="judge")
            writer = JsonlAppender(self.records_path)
            if need_header:
                writer.write(self.header)
            bar = console.Progress("calls", len(self.tasks), initial=len(self.tasks) - len(todo), unit="call",
                                   label="judge")
            try:
                self._run_pool(todo, writer, bar)
            except UserError as e:
                self._write_summary("failed", error=str(e))
                raise
            finally:
                bar.close()
                writer.close()
                self.client.close()
        summary = self._write_summary("complete")
        metrics_path = self.out / rundir.METRICS
        metrics, _ = merge_metrics(metrics_path, {METRICS_KEY: metrics_entry(summary)})
        rundir.RunDir(self.out).write_json(rundir.METRICS, metrics)
        return summary

    def _run_pool(self, todo: list[Task], writer: JsonlAppender, bar: console.Progress) -> None:
        """Keep max_concurrency calls in flight; write each record as it comes. After an error, stop asking but
        keep the answers of the calls already in flight, then raise it."""
        pool = ThreadPoolExecutor(max_workers=self.cfg.max_concurrency, thread_name_prefix="judge")
        in_flight: set = set()
        error: UserError | None = None
        last = 0.0
        try:
            while True:
                while todo and error is None and len(in_flight) < self.cfg.max_concurrency:
                    in_flight.add(pool.submit(self._ask, todo.pop(0)))
                if not in_flight:
                    break
                done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                for fut in done:
                    try:
                        record = fut.result()
                    except UserError as e:
                        error = error or e
                        continue
                    writer.write(record)
                    self.records[record["key"]] = record
                    bar.update(1)
                if time.monotonic() - last > PROGRESS_EVERY_S:
                    self._write_summary("running")
                    last = time.monotonic()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if error is not None:
            raise error

    # ------------------------------------------------------------------ summary
    def _counts(self) -> dict:
        recs = list(self.records.values())
        http = self.client.http_counts() if self.client is not None else {"attempts": 0, "status": {},
                                                                            "no_response": 0}
        status = Counter({k: int(v) for k, v in (self._prev_http.get("status") or {}).items()})
        status.update(http["status"])
        calls = sum(int(r.get("calls", 0)) for r in recs)
        return {
            "records": len(recs), "calls": calls, "retries": calls - len(recs),
            "malformed": sum(int(r.get("malformed", 0)) for r in recs),
            "unparseable": sum(1 for r in recs if r.get("unparseable")),
            "prompt_tokens": sum(int(r.get("prompt_tokens", 0)) for r in recs),
            "completion_tokens": sum(int(r.get("completion_tokens", 0)) for r in recs),
            "tokens_estimated": sum(1 for r in recs if r.get("tokens_estimated")),
            "http": {"attempts": int(self._prev_http.get("attempts", 0) or 0) + http["attempts"],
                     "status": dict(sorted(status.items())),
                     "no_response": int(self._prev_http.get("no_response", 0) or 0) + http["no_response"]},
        }

    def summarize(self, status: str, error: str | None = None) -> dict:
        """judge.json's content; the statistics only when the run has ended (status complete or failed)."""
        cfg = self.cfg
        summary: dict = {
            "status": status, "error": error, "mode": cfg.mode,
            "a": {"path": str(self.a), "sha256": self.header["a_sha256"]},
            "b": {"path": str(self.b), "sha256": self.header["b_sha256"]},
            "questions_from": self.questions_from,
            "judge": {"model": cfg.model, "base_url": cfg.base_url, "language": cfg.language,
                      "temperature": cfg.temperature, "max_tokens": cfg.max_tokens, "rubric": bool(self.prompts.rubric),
                      "pairwise_template": cfg.pairwise_template, "grade_template": cfg.grade_template},
            "rows": len(self.rows),
            "progress": {"done": sum(1 for t in self.tasks if t.key in self.records), "total": len(self.tasks)},
        }
        if status != "running":
            summary.update(self._statistics())
        summary["counts"] = self._counts()
        summary["note"] = ("pairwise: B wins a row when both orders prefer B; a tie in either order, disagreeing "
                           "orders and unparseable replies make a tie. win_rate = (wins + ties/2) / rows; null, with a "
                           "\"problem\", when no row has a usable verdict. Intervals: "
                           "95% percentile bootstrap over rows. Tokens as the endpoint reported them, estimated "
                           "where it did not (tokens_estimated calls). http counts every request, the client's "
                           "retries included, added up over the runs of this folder.")
        summary["updated_at"] = now()
        return summary

    def _statistics(self) -> dict:
        cfg, rec = self.cfg, self.records
        out: dict = {"bootstrap": {"samples": cfg.bootstrap_samples, "seed": cfg.seed, "confidence": 0.95,
                                   "method": "percentile"}}
        per_row = []
        outcomes, grades = [], []
        first = decided = 0
        for r in self.rows:
            item: dict = {"id": r.id}
            ab, ba = rec.get(f"{r.id}/pairwise/AB"), rec.get(f"{r.id}/pairwise/BA")
            if ab is not None and ba is not None:
                outcome, why = S.pair_outcome(ab.get("winner"), ba.get("winner"))
                outcomes.append((outcome, why))
                item.update(pairwise=outcome, why=why)
                for v in (ab.get("verdict"), ba.get("verdict")):
                    decided += v in ("A", "B")
                    first += v == "A"
            ga, gb = rec.get(f"{r.id}/grade/a"), rec.get(f"{r.id}/grade/b")
            if ga is not None and gb is not None:
                grades.append((ga.get("grade"), gb.get("grade")))
                item.update(grade_a=ga.get("grade"), grade_b=gb.get("grade"))
            per_row.append(item)
        if cfg.mode in ("pairwise", "both"):
            out["pairwise"] = S.pairwise_stats(outcomes, first, decided, cfg.bootstrap_samples, cfg.seed)
        if cfg.mode in ("grade", "both"):
            out["grade"] = S.grade_stats(grades, cfg.bootstrap_samples, cfg.seed)
        out["per_row"] = per_row
        return out

    def _write_summary(self, status: str, error: str | None = None) -> dict:
        summary = self.summarize(status, error)
        rundir.RunDir(self.out).write_json(JUDGE_SUMMARY, summary)
        return summary


def metrics_entry(summary: dict) -> dict:
    """What metrics.json holds under "judge": the summary without per-row details."""
    entry = {"model": summary["judge"]["model"], "mode": summary["mode"], "rows": summary["rows"],
             "a": summary["a"]["path"], "b": summary["b"]["path"],
             "a_sha256": summary["a"].get("sha256"), "b_sha256": summary["b"].get("sha256")}
    for block in ("pairwise", "grade"):
        if block in summary:
            entry[block] = summary[block]
    entry["calls"] = summary["counts"]["calls"]
    entry["unparseable"] = summary["counts"]["unparseable"]
    entry["details"] = JUDGE_SUMMARY
    return entry


def _read_json(path: Path) -> dict:
    import json

    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def run_judge(cfg: JudgeConfig, a: str | Path, b: str | Path, out: str | Path | None = None,
              data: str | Path | None = None) -> dict:
    """Judge predictions file B against A with `cfg` (the `judge` config section); returns judge.json's summary.
    `out`: the output folder (default: B's folder); `data`: the test file to take the questions from (default:
    the one named in B's .meta.json sidecar, else the predictions' input). Resumable: see the module docstring."""
    from .report import refresh_report

    judge = JudgeRun(cfg, Path(a), Path(b), Path(out) if out is not None else None,
                     Path(data) if data is not None else None)
    summary = judge.execute()
    refresh_report(judge.out)  # a run directory's report.md shows the verdicts
    return summary
