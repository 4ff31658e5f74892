"""Preference data for the dpo, orpo, simpo and kto stages: rows, validation (file and line), encoding and masks.

Row formats, detected per row (the prompt part is the SFT row without its answer):

- pairwise, prompt form: `{"prompt": str, "system"?: str, "chosen": str, "rejected": str}`
- pairwise, instruction form: `{"instruction", "input"?, "system"?, "history"?, "chosen", "rejected"}`
- pairwise, messages form: `{"messages": [... ending with a user turn], "chosen": A, "rejected": A}`, where an
  answer A is a string, an assistant message `{"role": "assistant", "content": str}`, or a list of one
- unpaired (kto): any prompt form with `"completion": A` and `"label": true | false` (good / bad)

A row gives its prompt one way: a row with two of "prompt", "instruction" and "messages" is refused (which
one was meant cannot be told).

dpo, orpo and simpo need pairwise rows; kto takes unpaired rows and pairwise ones (a pair is a good and a bad
completion of its prompt, as TRL's KTO does with paired data).

Encoding uses the run's template through `Template.encode`, exactly as SFT: the prompt is the conversation up
to the assistant prefix (with `data.system` for rows without a system message), a completion is the
assistant turn's text, its closing tokens and EOS (with a chat_template that rewrites earlier turns, the
sample of the last turn: its prompt is what inference sends). Only completion tokens enter the preference loss (the
`completion_ids`); `encode_preference` checks that the prompt tokens are a prefix of prompt + completion.
Over-length rows (prompt + longer completion > `data.cutoff_len`) follow `data.overlength`: truncate cuts the
completions (a row whose prompt alone fills the cutoff is dropped), drop drops, error stops; all counted.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .encode import DataReport, check_overlength, split_validation, with_system
from .examples import _joined, _not_unicode, _type_name, parse_example, read_valid_rows
from .load import load_sources
from .mix import SourceCount
from .templates import Template, get_template

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..config import DataConfig
    from ..config.sources import SourceConfig

PAIRWISE_STAGES = ("dpo", "orpo", "simpo")


@dataclass
class PreferenceExample:
    where: str  # "file line N"
    prompt: list[dict]  # messages ending with a user turn
    chosen: str | None = None  # pairwise rows
    rejected: str | None = None
    completion: str | None = None  # unpaired rows
    label: bool | None = None

    @property
    def paired(self) -> bool:
        return self.chosen is not None


def _answer(obj: dict, key: str, problems: list[str]) -> str | None:
    """obj[key] as an answer text: a string, an assistant message, or a list holding one."""
    if key not in obj or obj[key] is None:
        problems.append(f'missing "{key}"')
        return None
    v = obj[key]
    if isinstance(v, list) and len(v) == 1:
        v = v[0]
    if isinstance(v, dict):
        if v.get("role") != "assistant":
            problems.append(f'"{key}" must be an assistant message (role "assistant"), got role {v.get("role")!r}')
            return None
        v = v.get("content")
    if not isinstance(v, str):
        problems.append(f'"{key}" must be a string or an assistant message, got {_type_name(v)}')
        return None
    if not v.strip():
        problems.append(f'"{key}" is blank')
        return None
    if bad := _not_unicode(v):
        problems.append(f'"{key}" {bad}')
        return None
    return v


def parse_preference(obj: Any, where: str, stage: str, template: Template | None) -> PreferenceExample:
    """Validate one preference row (see the module docstring); one UserError naming `where` and every problem."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {_type_name(obj)}")
    problems: list[str] = []
    unpaired = "completion" in obj or "label" in obj
    if unpaired and stage in PAIRWISE_STAGES:
        problems.append(f'train.stage {stage} needs pairwise rows ("chosen" and "rejected"); this row has '
                        '"completion"/"label" (an unpaired row, for kto)')
    prompt_obj = {k: v for k, v in obj.items() if k not in ("chosen", "rejected", "completion", "label")}
    given = [k for k in ("prompt", "instruction", "messages") if k in prompt_obj]
    if len(given) > 1:  # which one is the prompt? Taking one would silently train on a prompt the user did not mean
        names = " and ".join(f'"{k}"' for k in given)
        problems.append(f'{names} are {"both" if len(given) == 2 else "all"} given: a row has one prompt; keep only '
                        'one of "prompt", "instruction" (with "input") or "messages"')
        prompt_obj = {k: v for k, v in prompt_obj.items() if k not in given[1:]}
    if "prompt" in prompt_obj:
        p = prompt_obj.pop("prompt")
        if not isinstance(p, str):
            problems.append(f'"prompt" must be a string, got {_type_name(p)}')
            p = "?"
        prompt_obj = {**prompt_obj, "instruction": p}
    if "instruction" not in prompt_obj and "messages" not in prompt_obj:
        problems.append('missing the prompt: "prompt", "instruction" or "messages"')
        prompt = []
    else:
        try:
            prompt = parse_example(prompt_obj, where, require_answer=False, template=template).messages
        except UserError as e:
            problems.append(str(e).removeprefix(f"{where}: "))
            prompt = []
        if prompt and prompt[-1]["role"] != "user":
            problems.append('"messages" must end with a user turn; the answers go in "chosen" and "rejected"')
    ex = PreferenceExample(where, prompt)
    if unpaired:
        ex.completion = _answer(obj, "completion", problems)
        label = obj.get("label")
        if not isinstance(label, bool):
            problems.append(f'"label" must be true (a good completion) or false (a bad one), got {_type_name(label)}')
        ex.label = label if isinstance(label, bool) else None
    else:
        ex.chosen = _answer(obj, "chosen", problems)
        ex.rejected = _answer(obj, "rejected", problems)
        if ex.chosen is not None and ex.rejected is not None and ex.chosen.strip() == ex.rejected.strip():
            problems.append('"chosen" and "rejected" are identical: the pair teaches nothing; fix or remove it')
    if problems:
        raise UserError(f"{where}: {_joined(problems)}")
    return ex


def load_preferences(path: str | Path, stage: str, template: Template | None) -> list[PreferenceExample]:
    """Read and validate every row; all errors (up to 10 shown) together, before any model loads."""
    rows = read_valid_rows(path, lambda obj, where: parse_preference(obj, where, stage, template),
                           "preference row(s)")
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def load_preference_sources(srcs: list[SourceConfig], stage: str, template: Template | None,
                            seed: int) -> tuple[list[PreferenceExample], list[SourceCount]]:
    """The preference rows of `srcs` (data.path or data.eval_path), validated and mixed (mix.py)."""
    return load_sources(srcs, lambda obj, where: parse_preference(obj, where, stage, template), seed,
                        "preference row(s)")


def check_preference_files(cfg: DataConfig, stage: str, seed: int = 0) -> int:
    """Validate the data files without a tokenizer (before torch loads); the training mix's row count."""
    template = get_template(cfg.template, None)
    n = len(load_preference_sources(cfg.sources, stage, template, seed)[0])
    if cfg.eval_sources:
        load_preference_sources(cfg.eval_sources, stage, template, seed)
    return n


def encode_preference(ex: PreferenceExample, tok: PreTrainedTokenizerBase, template: Template,
                      system: str | None) -> tuple[list[int], list[tuple[list[int], bool]]]:
    """(prompt ids, [(completion ids, good?)]): one completion per unpaired row, chosen then rejected for a
    pair. A completion is what `Template.encode` marks trainable after the prompt: the answer, the template's
    closing tokens and EOS."""
    prompt = with_system(ex.prompt, system)
    prompt_ids, _ = template.encode(tok, prompt, add_generation_prompt=True)
    answers = [(ex.chosen, True), (ex.rejected, False)] if ex.paired else [(ex.completion, bool(ex.label))]
    out = []
    for text, good in answers:
        ids, trainable = template.encode(tok, prompt + [{"role": "assistant", "content": text}])
        if ids[: len(prompt_ids)] != prompt_ids or any(trainable[: len(prompt_ids)]):
            raise UserError(f"{ex.where}: the template renders the prompt differently once an answer follows, so "
                            "the completion cannot be separated; use data.template: chatml (or another format "
                            "template)")
        out.append((ids[len(prompt_ids):], good))
    return prompt_ids, out


def encode_preferences(examples: list[PreferenceExample], tok: PreTrainedTokenizerBase, template: Template,
                       cfg: DataConfig, kto: bool, report: DataReport) -> list[dict]:
    """Rows for TRL: `{"prompt_ids", "chosen_ids", "rejected_ids"}` (pairwise) or `{"prompt_ids",
    "completion_ids", "label"}` (kto), under the over-length policy, counted into `report`."""
    out: list[dict] = []
    too_long: list[str] = []
    for ex in examples:
        prompt_ids, completions = encode_preference(ex, tok, template, cfg.system)
        report.samples += 1  # a preference row is one sample: its prompt ends with the one turn it trains
        n = len(prompt_ids) + max(len(c) for c, _ in completions)
        if report.count_length(ex.where, n, cfg, too_long):
            continue
        if n > cfg.cutoff_len:
            room = cfg.cutoff_len - len(prompt_ids)
            if room <= 0:  # the prompt alone fills the cutoff: no completion token would be trained
                report.drop_no_target(ex.where)
                continue
            completions = [(c[:room], good) for c, good in completions]
            report.truncated += 1
        if kto:
            out += [{"prompt_ids": prompt_ids, "completion_ids": c, "label": good} for c, good in completions]
        else:
            out.append({"prompt_ids": prompt_ids, "chosen_ids": completions[0][0],
                        "rejected_ids": completions[1][0]})
    check_overlength(too_long, cfg, "row(s)")
    return out


@dataclass
class PreferenceData:
    train: list[dict]
    eval: list[dict]
    report: DataReport


def build_preference_data(cfg: DataConfig, tok: PreTrainedTokenizerBase, template: Template, stage: str,
                          seed: int) -> PreferenceData:
    """Read, validate, split (as SFT data) and encode the preference data of the `data` section."""
    examples, counts = load_preference_sources(cfg.sources, stage, template, seed)
    report = DataReport(path=cfg.path_label, rows=len(examples), overlength_policy=cfg.overlength, sources=counts)
    if cfg.eval_sources:
        train_ex, eval_ex = examples, load_preference_sources(cfg.eval_sources, stage, template, seed)[0]
    else:
        train_ex, eval_ex = split_validation(examples, cfg.val_size, cfg.val_max_rows, seed, report)
    kto = stage == "kto"
    train = encode_preferences(train_ex, tok, template, cfg, kto, report)
    eval_report = DataReport(overlength_policy=cfg.overlength)
    ev = encode_preferences(eval_ex, tok, template, cfg, kto, eval_report) if eval_ex else []
    report.add(eval_report)
    report.train_rows, report.eval_rows = len(train), len(ev)
    if not train:
        raise UserError(f"{cfg.path_label}: no preference row left to train on (see the counts above); "
                        "raise data.cutoff_len")
    if kto and len({r["label"] for r in train}) < 2:
        raise UserError(f"{cfg.path_label}: kto needs good and bad completions (label true and false); "
                        f"all {len(train)} are {'good' if train[0]['label'] else 'bad'}")
    return PreferenceData(train, ev, report)


def render_preference(tok: PreTrainedTokenizerBase, row: dict, color: bool = False) -> str:
    """A preference row as text, each completion's trained tokens marked (data-check)."""
    def mark(ids: list[int]) -> str:
        text = tok.decode(ids, skip_special_tokens=False)
        return f"\033[32m{text}\033[0m" if color else f"«{text}»"

    prompt = tok.decode(row["prompt_ids"], skip_special_tokens=False)
    if "chosen_ids" in row:
        return (f"prompt + chosen:\n{prompt}{mark(row['chosen_ids'])}\n\n"
                f"prompt + rejected:\n{prompt}{mark(row['rejected_ids'])}")
    return f"prompt + {'good' if row['label'] else 'bad'} completion:\n{prompt}{mark(row['completion_ids'])}"
