"""`domaintune data-check`: the data exactly as training would see it, without loading a model."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config


def run_data_check(cfg: Config, example: int = 0, color: bool = False) -> dict:
    """Validate + tokenize like training; print a summary and one masked example; return the report dict."""
    if cfg.train.stage != "sft":
        return _preference_check(cfg, example, color)
    from ..data.encode import build_datasets, render_masked
    from ..data.examples import check_data_files
    from ..data.templates import get_template
    from .model import load_tokenizer

    check_data_files(cfg.data)  # bad data is named before the tokenizer (and transformers) loads
    tok = load_tokenizer(cfg.model.required_name(), cfg.model.trust_remote_code, cfg.model.revision)
    template = get_template(cfg.data.template, tok)
    ds = build_datasets(cfg.data, tok, template, cfg.train.seed)
    print("\n".join(ds.report.summary_lines()))
    sample = ds.train[min(example, len(ds.train) - 1)]
    n_train = sum(1 for x in sample["labels"] if x != -100)
    print(f"\nexample {example} (template {template.name}; {len(sample['input_ids'])} tokens, {n_train} trained; "
          f"trained part {'in green' if color else 'marked «like this»'}):")
    print(render_masked(tok, sample, color=color))
    return ds.report.to_dict()


def _preference_check(cfg: Config, example: int, color: bool) -> dict:
    """A preference stage: the rows as PreferenceRun encodes them (template and data.system inherited from an
    SFT run), one prompt with both completions' trained tokens marked."""
    from ..data.preferences import check_preference_files, render_preference
    from .preference import PreferenceRun

    check_preference_files(cfg.data, cfg.train.stage)  # before the tokenizer (and transformers) loads
    run = PreferenceRun(cfg)
    run.setup_data()
    row = run.data.train[min(example, len(run.data.train) - 1)]
    print(f"\nexample {example} (template {run.template.name}; train.stage {cfg.train.stage}; the tokens in the "
          f"preference loss {'in green' if color else 'marked «like this»'}):")
    print(render_preference(run.tok, row, color=color))
    return run.data.report.to_dict()
