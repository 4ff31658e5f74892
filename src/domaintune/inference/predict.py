"""`domaintune predict`: generate an answer for every row of a test file, then score it.

    domaintune predict RUN --data test.jsonl        # -> RUN/predictions.jsonl, RUN/metrics.json

Each row's prompt is everything before its last assistant turn (an instruction row: its instruction and
input), rendered by the run's template exactly as in training (`Engine.encode_messages`, plus the run's
`data.system`); its target is that last turn (or "" when the row has none). A model trained with reasoning
writes `<think>…</think>` before its answer: the block goes to the row's "reasoning" field and "predict" holds the
answer alone, which is what gets scored (a block still open when generation stopped: all reasoning, an empty
answer).

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

Under torchrun / accelerate launch the rows are split across processes and merged into one file by rank 0
(sharded.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from .. import console
from ..data.examples import load_examples
from ..data.thinking import split_generated
from ..errors import UserError
from ..jsonl import (
    JsonlAppender,
    disk_errors_as_user_errors,
    read_jsonl,
    repair_tail,
    write_atomic,
    write_jsonl_atomic,
)
from ..rundir import BASE_DIR, BASE_PREDICTIONS, METRICS, PREDICTIONS, PREDICTIONS_META_SUFFIX, RunDir, resolve_template
from .params import PRESETS, GenerationParams

if TYPE_CHECKING:
    from ..data.examples import Example
    from .engine import Engine
    from .vllm_engine import VLLMEngine

FORMATS = ("jsonl", "json-array")


# ---------------------------------------------------------------- loss on a test file

def run_test_loss(run_dir: str | Path, data: str | Path, base_only: bool = False, template: str | None = None,
                  allow_pickle: bool = False) -> dict:
    """Load RUN's model and return {"loss", "perplexity", "target_tokens"} on the test file's targets
    (used by `domaintune eval --run RUN --data TEST`)."""
    from .engine import Engine

    run = RunDir(run_dir)
    examples = load_examples(data, require_answer=False, template=resolve_template(run.path, None, template))
    if not any(ex.prompt_and_target()[1] for ex in examples):
        raise UserError(f"{data}: no row has a target (output / last assistant turn): "
                        "there is nothing to compute a loss on")
    engine = Engine.from_run(run.path, base_only=base_only, template=template, allow_pickle=allow_pickle)
    examples = load_examples(data, require_answer=False, template=engine.template)
    loss = engine.loss_on_targets(examples)
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
    for key in ("base_only", "template", "engine", "thinking"):  # "engine", "thinking" only written when given
        if old.get(key) != new.get(key):
            diffs.append(f"{key} {old.get(key)!r} -> {new.get(key)!r}")
    old_gen = old.get("generation", {})
    for key, value in new["generation"].items():
        if old_gen.get(key) != value:
            diffs.append(f"{key} {old_gen.get(key)!r} -> {value!r}")
    return diffs


def _read_rows(path: Path) -> list[dict]:
    """Rows already written, in file order. A torn last line (the writer was killed mid-line) is cut off the file."""
    if repair_tail(path):
        console.note(f"{path}: removed an incomplete last line left by an interrupted run")
    hint = "delete the line or pass --overwrite to start afresh"
    rows = read_jsonl(path, fix_hint=hint)
    for n, obj in enumerate(rows, 1):
        if not isinstance(obj.get("id"), int):
            raise UserError(f'{path} row {n}: not a predictions row (no integer "id"); '
                            'pass --overwrite to start afresh')
    return rows


def _prepare_output(out: Path, meta: dict, overwrite: bool) -> set[int]:
    """Check the sidecar against this run's settings; return the ids already done (resume): those of the file
    and of any shard an interrupted run under several processes left (sharded.py)."""
    from .sharded import shards

    meta_path = out.with_name(out.name + PREDICTIONS_META_SUFFIX)
    if overwrite:
        out.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
        for part in shards(out):
            part.unlink()
    done: set[int] = set()
    parts = [p for p in shards(out) if p.stat().st_size > 0]
    if (out.is_file() and out.stat().st_size > 0) or parts:
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
        done = {r["id"] for path in ([out] if out.is_file() else []) + parts for r in _read_rows(path)}
    return done


def _write_meta(out: Path, meta: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    RunDir(out.parent).write_json(out.name + PREDICTIONS_META_SUFFIX, meta)


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


def _check_args(params: GenerationParams, batch_size: int, fmt: str, limit: int | None) -> None:
    params.validate()
    checks = [(batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}"),
              (fmt in FORMATS, f"--format {fmt!r}: choose {' or '.join(FORMATS)}"),
              (limit is None or limit >= 1, f"--limit must be at least 1, got {limit}")]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)


# ---------------------------------------------------------------- the verb

@disk_errors_as_user_errors("Free some space (or fix the folder's permissions) and run the same command again: "
                            "predict keeps the rows it wrote and goes on from there")
def run_predict(run_dir: str | Path, data: str | Path, out: str | Path | None = None,
                params: GenerationParams | None = None, batch_size: int = 8, base_only: bool = False,
                template: str | None = None, fmt: str = "jsonl",
                evaluate: bool = True, limit: int | None = None, overwrite: bool = False,
                allow_pickle: bool = False, engine_kind: str = "hf", thinking: bool | None = None) -> Path:
    """Predict every row of `data` (the first `limit` rows) with RUN's model; returns the predictions.jsonl path.

    Resumable (see the module docstring). With `evaluate`, scores the file (metrics.run_eval) with the
    model's loss and perplexity on the targets added, and prints the metrics. `engine_kind`: "hf" (the default
    Engine) or "vllm" (vllm_engine.py, one process on a CUDA GPU; a file started by one engine is not resumed by
    the other). `thinking`: the chat_template's enable_thinking (`Template.with_thinking`); None = as trained.
    """
    from . import sharded
    from .vllm_engine import check_engine, load_engine

    params = params or PRESETS["predict"]
    _check_args(params, batch_size, fmt, limit)
    rank, world_size, local_rank = sharded.world()
    if engine_kind == "vllm" and world_size > 1:
        raise UserError("--engine vllm runs in one process (vLLM spreads a model over GPUs itself): run predict "
                        "without torchrun, or use the default engine --engine hf for sharded predict")
    check_engine(engine_kind, run_dir, base_only, allow_pickle)  # before anything loads: said at once
    if world_size > 1:
        sharded.init()
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
    if engine_kind != "hf":  # files written before --engine existed have no key: the default engine
        meta["engine"] = engine_kind
    if thinking is not None:  # the prompt differs: a file written with another switch is not resumed
        meta["thinking"] = thinking
    # Rank 0 checks (or, with --overwrite, empties) the output and tells every rank what is done.
    done = set(sharded.agree(rank, lambda: sorted(_prepare_output(jsonl, meta, overwrite))))
    todo = [ex for ex in examples if ex.index not in done]
    has_targets = all(ex.prompt_and_target()[1] for ex in examples)

    engine: Engine | VLLMEngine | None = None
    if todo or (evaluate and has_targets):
        # vLLM schedules its own batch: up to 256 sequences (its default) rather than the server's 16
        engine = load_engine(engine_kind, run.path, base_only=base_only, template=template, allow_pickle=allow_pickle,
                             device=sharded.device_for(local_rank) if world_size > 1 else None,
                             max_batch_size=max(batch_size, 256) if engine_kind == "vllm" else None)
        engine.template = engine.template.with_thinking(thinking)
        if engine.template.instruction_input_format != light.instruction_input_format:
            examples = load_examples(data, require_answer=False, template=engine.template)[:limit]
            todo = [ex for ex in examples if ex.index not in done]
    if todo and rank == 0:
        _write_meta(jsonl, meta)
    mine = sharded.my_rows(todo, rank, world_size)
    if mine:
        assert engine is not None, "loaded above: there are rows to do"
        total, already = (len(mine), 0) if world_size > 1 else (len(examples), len(examples) - len(todo))
        _generate_into(engine, mine, sharded.shard_path(jsonl, rank) if world_size > 1 else jsonl, params,
                       batch_size, total=total, already=already, show=rank == 0)
    if world_size > 1:
        sharded.barrier()
    if rank == 0 and sharded.shards(jsonl):
        _merge_shards(jsonl)
    if world_size > 1:
        if evaluate and has_targets:  # every process scores its share; the sums meet on rank 0
            assert engine is not None, "loaded above to score the targets"
            loss = engine.loss_on_targets(sharded.my_rows(examples, rank, world_size),
                                          reduce=lambda v: sharded.sum_across(v, engine.device))
        sharded.barrier()
        if rank != 0:
            return jsonl
    rows = _finish_file(jsonl, examples)
    console.note(f"wrote {jsonl} ({len(rows)} rows)")
    if array_path is not None:
        array = [{"input": r["input"], "predict": r["predict"], "target": r["target"]} for r in rows]
        write_atomic(array_path, json.dumps(array, ensure_ascii=False, indent=2) + "\n")
        console.note(f"wrote {array_path}")
    if evaluate:
        _evaluate(engine, run, jsonl, examples, base_only, has_targets,
                  loss if world_size > 1 and has_targets else None)
    if engine is not None and hasattr(engine, "close"):  # vLLM: its engine process and GPU memory
        engine.close()
    from ..evaluation.report import refresh_report

    # report.md shows the new predictions and scores (not a state before them); predictions written elsewhere
    # (--out outside the run) leave the run directory as it was
    refresh_report(jsonl.parent)
    return jsonl


def _merge_shards(jsonl: Path) -> None:
    """Rank 0, after every process finished: predictions.jsonl and every shard into predictions.jsonl (each id
    once, in id order, written atomically), then the shards deleted. A kill in between only leaves rows twice,
    which the next run's merge keeps once."""
    from . import sharded

    parts = sharded.shards(jsonl)
    rows: dict[int, dict] = {}
    for path in ([jsonl] if jsonl.is_file() else []) + parts:
        for r in read_jsonl(path):
            rows.setdefault(r["id"], r)
    write_jsonl_atomic(jsonl, [rows[i] for i in sorted(rows)])
    for part in parts:
        part.unlink()


def _generate_into(engine: Engine | VLLMEngine, todo: list[Example], jsonl: Path, params: GenerationParams,
                   batch_size: int, total: int, already: int, show: bool = True) -> None:
    prompts, targets = [], []
    for ex in todo:
        prompt, target = ex.prompt_and_target()
        # with the run's data.system, as in training; VLLMEngine borrows Engine's function (vllm_engine.py's note)
        ids = engine.encode_messages(prompt)
        if len(ids) + params.max_new_tokens > engine.context_len:
            raise UserError(f"{ex.where}: the prompt has {len(ids)} tokens; "
                            f"with --max-new-tokens {params.max_new_tokens} "
                            f"it exceeds the model's context of {engine.context_len} tokens. Shorten the row or lower "
                            "--max-new-tokens")
        prompts.append(ids)
        targets.append(target)
    written = 0
    batch: list[dict] = []
    # closed on an error too, so a message (a full disk) starts on a line of its own
    with console.Progress("rows", total, initial=already, unit="row", label="predict", enabled=show) as bar, \
            JsonlAppender(jsonl) as f:
        for k, gen in engine.generate_iter(prompts, params, batch_size):
            reasoning, answer = split_generated(gen.text)  # a <think> block is kept apart: the answer is scored
            batch.append({"id": todo[k].index, "input": engine.tokenizer.decode(prompts[k]), "target": targets[k],
                          "predict": answer, **({"reasoning": reasoning} if reasoning is not None else {}),
                          "num_tokens": gen.completion_tokens, "time": round(gen.seconds, 4)})
            written += 1
            bar.update(1)
            if len(batch) == batch_size or written == len(todo):  # the end of a batch: write and fsync it
                f.write_many(batch)
                batch = []


def _finish_file(jsonl: Path, examples: list[Example]) -> list[dict]:
    """All rows, each id once, rewritten in id order when they are not already."""
    on_disk = _read_rows(jsonl) if jsonl.is_file() else []
    rows = {r["id"]: r for r in on_disk}
    missing = [ex.where for ex in examples if ex.index not in rows]
    if missing:  # cannot happen unless the file was changed while we ran
        raise UserError(f"{jsonl}: rows missing after prediction ({', '.join(missing[:5])}); "
                        "rerun the command to complete it")
    ordered = [rows[i] for i in sorted(rows)]
    if [r["id"] for r in on_disk] != [r["id"] for r in ordered]:
        write_jsonl_atomic(jsonl, ordered)
    return ordered


def _evaluate(engine: Engine | VLLMEngine | None, run: RunDir, jsonl: Path, examples: list[Example], base_only: bool,
              has_targets: bool, loss: dict | None = None) -> None:
    from ..evaluation.metrics import format_metrics, run_eval

    if not has_targets:
        console.note("not scoring: some rows have no target (output / last assistant turn); predictions only")
        return
    out_dir = jsonl.parent
    if base_only and out_dir.resolve() == run.path.resolve():
        out_dir = run.path / BASE_DIR  # keep the fine-tuned model's metrics.json in RUN
    if loss is None:
        assert engine is not None, "run_predict loads the engine when it scores rows with targets"
        loss = engine.loss_on_targets(examples)
    metrics = run_eval(jsonl, out_dir=out_dir, extra={k: loss[k] for k in ("loss", "perplexity") if k in loss})
    print(format_metrics(metrics))
    console.note(f"wrote {out_dir / METRICS}")


class GreedyAnswerer:
    """A run's own answers to single-turn questions, as `predict` makes them (the run's prompt and data.system,
    greedy decoding, batched): the rejected side of `gen-data --preferences --run`."""

    def __init__(self, run_dir: str | Path, max_new_tokens: int = 256, batch_size: int = 8) -> None:
        from .engine import Engine

        if not Path(run_dir).is_dir():
            raise UserError(f"--run '{run_dir}' is not a directory: give the SFT run whose answers are rejected")
        self.engine = Engine.from_run(run_dir)
        self.name = f"{Path(run_dir).resolve()} (weights {weights_fingerprint(run_dir)})"
        self.params = dataclasses.replace(PRESETS["predict"], max_new_tokens=max_new_tokens).validate()
        self.batch_size = batch_size

    def __call__(self, questions: list[tuple[str, str]]) -> list[str]:
        """Answers to (instruction, input) questions, joined as the run's template joins them in training."""
        join = self.engine.template.join_instruction
        prompts = [self.engine.encode_messages([{"role": "user", "content": join(q, extra)}]) for q, extra in questions]
        return [g.text for g in self.engine.generate(prompts, self.params, self.batch_size)]


def weights_fingerprint(run_dir: str | Path) -> str:
    """A short hash of a run's final weight files (names, sizes, first and last MiB): changes when the run is
    trained again, without reading a multi-GB model whole."""
    digest = hashlib.sha256()
    for f in sorted(RunDir(run_dir).weight_files()):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(1 << 20)
            fh.seek(max(0, size - (1 << 20)))
            digest.update(f"{f.name}:{size}".encode() + head + fh.read())
    return digest.hexdigest()[:12]
