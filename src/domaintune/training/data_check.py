"""`domaintune data-check`: the data exactly as training would see it, without loading a model."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config


def run_data_check(cfg: Config, example: int = 0, color: bool = False) -> dict:
    """Validate + tokenize like training; print a summary and one masked example; return the report dict."""
    if cfg.train.stage != "sft":
        return _preference_check(cfg, example, color)
    from ..data.encode import encode_samples, render_masked
    from ..data.load import check_data_files
    from ..data.prepare import build_datasets
    from ..data.templates import get_template
    from .model import load_tokenizer

    check_data_files(cfg.data, cfg.train.seed)  # bad data is named before the tokenizer (and transformers) loads
    tok = load_tokenizer(cfg.model.required_name(), cfg.model.trust_remote_code, cfg.model.revision)
    template = get_template(cfg.data.template, tok, cfg.data.thinking, cfg.data.train_on_turns)
    ds = build_datasets(cfg.data, tok, template, cfg.train.seed)
    print("\n".join(ds.report.summary_lines()))
    marked = "in green" if color else "marked «like this»"
    rows = ds.train_examples
    if not rows:  # every row went to validation
        return ds.report.to_dict()
    row = rows[min(example, len(rows) - 1)]
    d = cfg.data
    samples = encode_samples(row, tok, template, d.cutoff_len, d.train_on_inputs, d.system)
    if len(samples) == 1 and samples[0][0] is not None:
        sample = samples[0][0]
        n_train = sum(1 for x in sample["labels"] if x != -100)
        print(f"\nexample {example} (template {template.name}; {len(sample['input_ids'])} tokens, {n_train} trained; "
              f"trained part {marked}):")
        print(render_masked(tok, sample, color=color))
        return ds.report.to_dict()
    # A row the chat_template trains one assistant turn at a time (it rewrites earlier turns): every sample.
    print(f"\nexample {example} ({row.where}; template {template.name}; {len(samples)} sample(s), one per assistant "
          f"turn, each with the prompt inference sends for its history; trained part {marked}):")
    for k, (one, n) in enumerate(samples):
        if one is None:
            print(f"\nsample {k + 1} of {len(samples)} ({n} tokens): nothing to train within data.cutoff_len")
            continue
        n_train = sum(1 for x in one["labels"] if x != -100)
        print(f"\nsample {k + 1} of {len(samples)} ({len(one['input_ids'])} tokens, {n_train} trained):")
        print(render_masked(tok, one, color=color))
    return ds.report.to_dict()


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
