"""`domaintune predict`: generate an answer for every row of a test file, then score it.

    domaintune predict RUN --data test.jsonl        # -> RUN/predictions.jsonl, RUN/metrics.json

Each row's prompt is everything before its last assistant turn (an instruction row: its instruction and
input), rendered by the run's template exactly as in training (`Engine.encode_messages`, plus the run's
`data.system`); its target is that last turn (or "" when the row has none).

predictions.jsonl is written as it goes, one line per example as soon as its batch finishes, flushed and
fsynced per batch, so a run that is killed keeps what it made. Running the same command again resumes:
an incomplete last line (a kill mid-write) is cut off, rows already done are skipped, and the rest is
appended; when complete, the file is rewritten in id order (atomically). A sidecar
`predictions.jsonl.meta.json` records the test file's content hash and the generation settings; a rerun
with a different test file or different settings is refused (pass --overwrite to start afresh). The batch
size and --limit are not settings in that sense: a later run with a larger --limit (or none) adds the
rest, and greedy results do not depend on the batch size.

Where things go (defaults):
- RUN/predictions.jsonl; with --base-only RUN/predictions.base.jsonl (the base model without the adapter).
- --format json-array also writes `[{"input", "predict", "target"}, ...]` next to the JSON-lines file with
  the suffix .json (predictions.json); when --out itself ends in .json, the array goes there and the
  JSON lines to the same name with .jsonl.
- metrics.json and metrics_per_sample.jsonl next to the predictions file, except for base-only predictions
  inside the run directory: those go to RUN/base/ so they never replace the fine-tuned model's metrics.
  Scores include "loss" and "perplexity": the teacher-forced loss of the model on the targets.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from .errors import UserError
from .jsonl import JsonlAppender, read_jsonl, repair_tail, write_atomic, write_jsonl_atomic
from .rundir import PREDICTIONS, RunDir

BASE_PREDICTIONS = "predictions.base.jsonl"
META_SUFFIX = ".meta.json"
FORMATS = ("jsonl", "json-array")


# ---------------------------------------------------------------- prompts, targets, loss

def target_loss(engine, examples) -> dict:
    """Teacher-forced loss and perplexity of `engine`'s model on the examples' targets.

    The target of a row is its last assistant turn (what predict generates); earlier assistant turns of a
    multi-turn row are context, not scored. Samples are built like training builds them
    (`data.encode_example` with the run's data.system, prompt masked, cut at the run's data.cutoff_len).
    Rows without a target, or whose target lies wholly beyond the cutoff, are skipped. Returns
    {"loss", "perplexity", "target_tokens"}, or {} when no row has a target.
    """
    from .data import IGNORE_INDEX, encode_example

    samples = []
    for ex in examples:
        prompt, target = ex.prompt_and_target()
        if not target:
            continue
        sample, _ = encode_example(ex, engine.tokenizer, engine.template, engine.cutoff_len, train_on_inputs=False,
                                   system=engine.default_system)
        if sample is None:
            continue
        prompt_ids = engine.encode_messages(prompt)  # adds the run's system, as encode_example did
        ids = sample["input_ids"]
        if ids[: len(prompt_ids)] == prompt_ids[: len(ids)]:  # mask earlier turns: score the last one only
            sample["labels"] = [IGNORE_INDEX] * min(len(prompt_ids), len(ids)) + sample["labels"][len(prompt_ids):]
        if all(x == IGNORE_INDEX for x in sample["labels"]):
            continue
        samples.append(sample)
    if not samples:
        return {}
    return engine.target_loss(samples)


def run_test_loss(run_dir: str | Path, data: str | Path, base_only: bool = False, template: str | None = None) -> dict:
    """Load RUN's model and return {"loss", "perplexity", "target_tokens"} on the test file's targets
    (used by `domaintune eval --run RUN --data TEST`)."""
    from .data import load_examples
    from .generation import Engine
    from .rundir import resolve_template

    run = RunDir(run_dir)
    examples = load_examples(data, require_answer=False, template=resolve_template(run.path, None, template))
    if not any(ex.prompt_and_target()[1] for ex in examples):
        raise UserError(f"{data}: no row has a target (output / last assistant turn): there is nothing to compute a loss on")
    engine = Engine.from_run(run.path, base_only=base_only, template=template)
    examples = load_examples(data, require_answer=False, template=engine.template)
    loss = target_loss(engine, examples)
    if not loss:
        raise UserError(f"{data}: every target lies beyond the run's data.cutoff_len={engine.cutoff_len}: "
                        "nothing to compute a loss on")
    return loss


# ---------------------------------------------------------------- the predictions file

def _file_fingerprint(path: Path) -> dict:
    data = path.read_bytes()
    return {"path": str(path.resolve()), "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _differences(old: dict, new: dict) -> list[str]:
    diffs = []
    if old.get("data", {}).get("sha256") != new["data"]["sha256"]:
        diffs.append(f"test file {old.get('data', {}).get('path')} -> {new['data']['path']} (content differs)")
    for key in ("base_only", "template"):
        if old.get(key) != new[key]:
            diffs.append(f"{key} {old.get(key)!r} -> {new[key]!r}")
    old_gen = old.get("generation", {})
    for key, value in new["generation"].items():
        if old_gen.get(key) != value:
            diffs.append(f"{key} {old_gen.get(key)!r} -> {value!r}")
    return diffs


def _read_rows(path: Path) -> list[dict]:
    """Rows already written, in file order. A torn last line (the writer was killed mid-line) is cut off the file."""
    if repair_tail(path):
        print(f"{path}: removed an incomplete last line left by an interrupted run")
    hint = "delete the line or pass --overwrite to start afresh"
    rows = read_jsonl(path, fix_hint=hint)
    for n, obj in enumerate(rows, 1):
        if not isinstance(obj.get("id"), int):
            raise UserError(f'{path} row {n}: not a predictions row (no integer "id"); pass --overwrite to start afresh')
    return rows


def _prepare_output(out: Path, meta: dict, overwrite: bool) -> set[int]:
    """Check the sidecar against this run's settings; return the ids already done (resume)."""
    meta_path = out.with_name(out.name + META_SUFFIX)
    if overwrite:
        out.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
    done: set[int] = set()
    if out.is_file() and out.stat().st_size > 0:
        if not meta_path.is_file():
            raise UserError(f"'{out}' already exists but has no {meta_path.name}, so it cannot be resumed safely. "
                            "Pass --overwrite to replace it, or --out to write elsewhere")
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            old = {}
        diffs = _differences(old, meta)
        if diffs:
            raise UserError(f"'{out}' was made with different settings ({'; '.join(diffs)}). Pass --overwrite to "
                            "start afresh with the new settings, or --out to write elsewhere")
        done = {r["id"] for r in _read_rows(out)}
    return done


def _write_meta(out: Path, meta: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    RunDir(out.parent).write_json(out.name + META_SUFFIX, meta)


def _paths(run: RunDir, out: str | Path | None, base_only: bool, fmt: str) -> tuple[Path, Path | None]:
    """(JSON-lines path, JSON-array path or None)."""
    if out is None:
        jsonl = run.file(BASE_PREDICTIONS if base_only else PREDICTIONS)
    else:
        jsonl = Path(out)
        if jsonl.suffix == ".json":
            if fmt != "json-array":
                raise UserError(f"--out {out}: predictions are written as JSON lines (.jsonl); "
                                "add --format json-array for a JSON array file")
            return jsonl.with_suffix(".jsonl"), jsonl
    if fmt != "json-array":
        return jsonl, None
    return jsonl, jsonl.with_suffix(".json") if jsonl.suffix == ".jsonl" else jsonl.with_name(jsonl.name + ".json")


def _check_args(params, batch_size: int, fmt: str, limit: int | None) -> None:
    params.validate()
    checks = [(batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}"),
              (fmt in FORMATS, f"--format {fmt!r}: choose {' or '.join(FORMATS)}"),
              (limit is None or limit >= 1, f"--limit must be at least 1, got {limit}")]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)


# ---------------------------------------------------------------- the verb

def run_predict(run_dir: str | Path, data: str | Path, out: str | Path | None = None, params=None,
                batch_size: int = 8, base_only: bool = False, template: str | None = None, fmt: str = "jsonl",
                evaluate: bool = True, limit: int | None = None, overwrite: bool = False) -> Path:
    """Predict every row of `data` (the first `limit` rows) with RUN's model; returns the predictions.jsonl path.

    Resumable (see the module docstring). With `evaluate`, scores the file (metrics.run_eval) with the
    model's loss and perplexity on the targets added, and prints the metrics.
    """
    from .data import load_examples
    from .generation import Engine, GenerationParams
    from .rundir import resolve_template

    params = params or GenerationParams()
    _check_args(params, batch_size, fmt, limit)
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise UserError(f"'{run.path}' is not a directory: give a run directory or a model directory")
    data = Path(data)
    # Bad data and a mismatching earlier output stop here, before any weights are loaded.
    light = resolve_template(run.path, None, template)  # without the tokenizer: only the instruction joining counts
    examples = load_examples(data, require_answer=False, template=light)[:limit]
    jsonl, array_path = _paths(run, out, base_only, fmt)
    meta = {"data": _file_fingerprint(data), "generation": dataclasses.asdict(params), "base_only": base_only,
            "template": template, "run": str(run.path.resolve())}
    done = _prepare_output(jsonl, meta, overwrite)
    todo = [ex for ex in examples if ex.index not in done]
    has_targets = all(ex.prompt_and_target()[1] for ex in examples)

    engine = None
    if todo or (evaluate and has_targets):
        engine = Engine.from_run(run.path, base_only=base_only, template=template)
        if engine.template.instruction_input_format != light.instruction_input_format:
            examples = load_examples(data, require_answer=False, template=engine.template)[:limit]
            todo = [ex for ex in examples if ex.index not in done]
    if todo:
        _generate_into(engine, todo, jsonl, meta, params, batch_size, total=len(examples),
                       already=len(examples) - len(todo))
    rows = _finish_file(jsonl, examples)
    print(f"wrote {jsonl} ({len(rows)} rows)")
    if array_path is not None:
        array = [{"input": r["input"], "predict": r["predict"], "target": r["target"]} for r in rows]
        write_atomic(array_path, json.dumps(array, ensure_ascii=False, indent=2) + "\n")
        print(f"wrote {array_path}")
    if evaluate:
        _evaluate(engine, run, jsonl, examples, base_only, has_targets)
    return jsonl


def _generate_into(engine, todo, jsonl: Path, meta: dict, params, batch_size: int, total: int, already: int) -> None:
    from tqdm import tqdm

    prompts, targets = [], []
    for ex in todo:
        prompt, target = ex.prompt_and_target()
        ids = engine.encode_messages(prompt)  # with the run's data.system, as in training
        if len(ids) + params.max_new_tokens > engine.context_len:
            raise UserError(f"{ex.where}: the prompt has {len(ids)} tokens; with --max-new-tokens {params.max_new_tokens} "
                            f"it exceeds the model's context of {engine.context_len} tokens. Shorten the row or lower "
                            "--max-new-tokens")
        prompts.append(ids)
        targets.append(target)
    _write_meta(jsonl, meta)
    bar = tqdm(total=total, initial=already, desc="predict", unit="row")
    written = 0
    batch: list[dict] = []
    with JsonlAppender(jsonl) as f:
        for k, gen in engine.generate_iter(prompts, params, batch_size):
            batch.append({"id": todo[k].index, "input": engine.tokenizer.decode(prompts[k]), "target": targets[k],
                          "predict": gen.text, "num_tokens": gen.completion_tokens, "time": round(gen.seconds, 4)})
            written += 1
            bar.update(1)
            if len(batch) == batch_size or written == len(todo):  # the end of a batch: write and fsync it
                f.write_many(batch)
                batch = []
    bar.close()


def _finish_file(jsonl: Path, examples) -> list[dict]:
    """All rows, each id once, rewritten in id order when they are not already."""
    on_disk = _read_rows(jsonl) if jsonl.is_file() else []
    rows = {r["id"]: r for r in on_disk}
    missing = [ex.where for ex in examples if ex.index not in rows]
    if missing:  # cannot happen unless the file was changed while we ran
        raise UserError(f"{jsonl}: rows missing after prediction ({', '.join(missing[:5])}); rerun the command to complete it")
    ordered = [rows[i] for i in sorted(rows)]
    if [r["id"] for r in on_disk] != [r["id"] for r in ordered]:
        write_jsonl_atomic(jsonl, ordered)
    return ordered


def _evaluate(engine, run: RunDir, jsonl: Path, examples, base_only: bool, has_targets: bool) -> None:
    from .metrics import format_metrics, run_eval

    if not has_targets:
        print("not scoring: some rows have no target (output / last assistant turn); predictions only")
        return
    out_dir = jsonl.parent
    if base_only and out_dir.resolve() == run.path.resolve():
        out_dir = run.path / "base"  # keep the fine-tuned model's metrics.json in RUN
    loss = target_loss(engine, examples)
    metrics = run_eval(jsonl, out_dir=out_dir, extra={k: loss[k] for k in ("loss", "perplexity") if k in loss})
    print(format_metrics(metrics))
    print(f"wrote {out_dir / 'metrics.json'}")


# ---------------------------------------------------------------- CLI

def add_parser(sub) -> None:
    """Register the `predict` verb."""
    p = sub.add_parser("predict", help="generate answers for a test file with a trained run, then score them",
                       description="Generate an answer for every row of a test file (JSON lines or a JSON array, alpaca "
                                   "or messages format) with RUN's model and prompt template; write predictions.jsonl "
                                   "(resumable: rerun the same command after an interruption) and metrics.json.")
    p.add_argument("run", metavar="RUN", help="run directory made by `domaintune train` (or a model directory with --template)")
    p.add_argument("--data", required=True, metavar="TEST",
                   help="test file (required); each row's last assistant turn / output is its target")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="predictions file (default: %(default)s = RUN/predictions.jsonl, or RUN/predictions.base.jsonl with --base-only)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens generated per answer (default: %(default)s)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width; 1 = greedy or sampling (default: %(default)s)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding (default: off)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, with --do-sample (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, with --do-sample (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=50, help="top-k sampling, with --do-sample (default: %(default)s)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="penalty on repeated tokens, 1 = none (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: %(default)s)")
    p.add_argument("--base-only", action="store_true",
                   help="use the base model without the run's adapter, for a before/after comparison (default: off)")
    p.add_argument("--template", default=None, metavar="NAME",
                   help="prompt template (domain_zh, alpaca, chatml, tokenizer or a .json) instead of the run's "
                        "template.json (default: %(default)s = the run's)")
    p.add_argument("--format", choices=FORMATS, default="jsonl",
                   help="json-array also writes [{input, predict, target}, ...] as .json next to the predictions "
                        "(default: %(default)s)")
    p.add_argument("--no-eval", action="store_true", help="only predict; do not compute metrics.json (default: off)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard an existing predictions file instead of resuming it (default: off)")
    p.add_argument("--limit", type=int, default=None, help="predict only the first N rows (default: %(default)s = all)")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(a) -> int:
    from .generation import GenerationParams

    params = GenerationParams(max_new_tokens=a.max_new_tokens, num_beams=a.num_beams, do_sample=a.do_sample,
                              temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                              repetition_penalty=a.repetition_penalty, seed=a.seed)
    run_predict(a.run, a.data, out=a.out, params=params, batch_size=a.batch_size, base_only=a.base_only,
                template=a.template, fmt=a.format, evaluate=not a.no_eval, limit=a.limit, overwrite=a.overwrite)
    return 0
