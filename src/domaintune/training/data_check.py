"""`domaintune data-check`: the data exactly as training would see it, without loading a model.

Its pieces serve the studio's preview too (studio/preview.py), so the page and the command show the same thing:
`prepare_check` (validate, tokenizer, template, encoded data), `example_samples` (one row's samples) and
`data.encode.masked_segments` (a sample's decoded text in trained / untrained runs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..data.encode import IGNORE_INDEX, render_masked

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..config import Config
    from ..data.encode import Datasets
    from ..data.examples import Example
    from ..data.templates import Template


@dataclass
class CheckedData:
    """The data of an sft config as training encodes it: its tokenizer, template and prepared data sets."""

    tok: PreTrainedTokenizerBase
    template: Template
    ds: Datasets


def prepare_check(cfg: Config) -> CheckedData:
    """Validate, load the tokenizer (no model) and prepare the data as training does (train.stage sft). Raises the
    UserError training would raise."""
    from ..data.load import check_data_files
    from ..data.prepare import build_datasets
    from ..data.templates import get_template
    from .model import load_tokenizer

    check_data_files(cfg.data, cfg.train.seed)  # bad data is named before the tokenizer (and transformers) loads
    tok = load_tokenizer(cfg.model.required_name(), cfg.model.trust_remote_code, cfg.model.revision)
    template = get_template(cfg.data.template, tok, cfg.data.thinking, cfg.data.train_on_turns)
    return CheckedData(tok, template, build_datasets(cfg.data, tok, template, cfg.train.seed))


Samples = list[tuple["dict | None", int]]  # encode_samples: (sample or None, untruncated length) each


def example_samples(cfg: Config, checked: CheckedData, example: int) -> tuple[Example, Samples] | None:
    """The training row `example` (the last one when past the end) and its encoded samples (`encode_samples`: one,
    or one per assistant turn where the chat_template rewrites earlier turns); None when every row went to
    validation."""
    from ..data.encode import encode_samples

    rows = checked.ds.train_examples
    if not rows:
        return None
    row = rows[min(example, len(rows) - 1)]
    d = cfg.data
    return row, encode_samples(row, checked.tok, checked.template, d.cutoff_len, d.train_on_inputs, d.system)


def trained_count(sample: dict) -> int:
    """Tokens of `sample` in the loss."""
    return sum(1 for x in sample["labels"] if x != IGNORE_INDEX)


def run_data_check(cfg: Config, example: int = 0, color: bool = False) -> dict:
    """Validate + tokenize like training; print a summary and one masked example; return the report dict."""
    if cfg.train.stage != "sft":
        return _preference_check(cfg, example, color)
    if cfg.data.streaming:  # what train would refuse, refused here too
        from ..data.stream import check_streaming

        check_streaming(cfg.data, cfg.train.max_steps)
    checked = prepare_check(cfg)
    template, report = checked.template, checked.ds.report
    print("\n".join(report.summary_lines()))
    marked = "in green" if color else "marked «like this»"
    found = example_samples(cfg, checked, example)
    if found is None:  # every row went to validation
        return report.to_dict()
    row, samples = found
    if len(samples) == 1 and samples[0][0] is not None:
        sample = samples[0][0]
        print(f"\nexample {example} (template {template.name}; {len(sample['input_ids'])} tokens, "
              f"{trained_count(sample)} trained; trained part {marked}):")
        print(render_masked(checked.tok, sample, color=color))
        return report.to_dict()
    # A row the chat_template trains one assistant turn at a time (it rewrites earlier turns): every sample.
    print(f"\nexample {example} ({row.where}; template {template.name}; {len(samples)} sample(s), one per assistant "
          f"turn, each with the prompt inference sends for its history; trained part {marked}):")
    for k, (one, n) in enumerate(samples):
        if one is None:
            print(f"\nsample {k + 1} of {len(samples)} ({n} tokens): nothing to train within data.cutoff_len")
            continue
        print(f"\nsample {k + 1} of {len(samples)} ({len(one['input_ids'])} tokens, {trained_count(one)} trained):")
        print(render_masked(checked.tok, one, color=color))
    return report.to_dict()


def _preference_check(cfg: Config, example: int, color: bool) -> dict:
    """A preference stage: the rows as PreferenceRun encodes them (template and data.system inherited from an
    SFT run), one prompt with both completions' trained tokens marked."""
    from ..data.preferences import check_preference_files, render_preference
    from .preference import PreferenceRun

    check_preference_files(cfg.data, cfg.train.stage, cfg.train.seed)  # before the tokenizer (and transformers) loads
    run = PreferenceRun(cfg)
    run.setup_data()
    row = run.data.train[min(example, len(run.data.train) - 1)]
    print(f"\nexample {example} (template {run.template.name}; train.stage {cfg.train.stage}; the tokens in the "
          f"preference loss {'in green' if color else 'marked «like this»'}):")
    print(render_preference(run.tok, row, color=color))
    return run.data.report.to_dict()
