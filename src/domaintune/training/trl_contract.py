"""The TRL internals the preference stage (preference.py) relies on, written down and checked.

TRL has no public hook for what the preference stage needs: feeding rows that data/preferences.py already
tokenized with the run's template (DPO/KTO `_prepare_dataset`, ORPO/CPO `tokenize_row`), and taking ORPO's NLL term
over the completion only (it reads the chosen logits from position 2 of `concatenated_forward`'s output and
replaces position 4). These are private, so pyproject.toml bounds TRL to the tested minor (`TESTED_TRL`), and
`check_trl_internals` runs when a preference trainer is built: a TRL that renamed a method, changed its
parameters or its output stops the run with one line naming what changed and which code relies on it, not an
IndexError or a silently different loss halfway through. tests/training/test_trl_contract.py runs the same
checks against the installed TRL.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from ..errors import UserError

TESTED_TRL = "1.16"  # pyproject.toml: trl>=1.16,<1.17; move both together after checking these internals
INSTALL_HINT = f"pip install 'trl>={TESTED_TRL},<1.17'"

# The positions preference.py reads in ORPOTrainer.concatenated_forward's output (TRL 1.16): (chosen_logps,
# rejected_logps, chosen_logits, rejected_logits, chosen_nll_loss[, aux_loss]).
ORPO_OUTPUT = ("chosen_logps", "rejected_logps", "chosen_logits", "rejected_logits", "chosen_nll_loss")
ORPO_CHOSEN_LOGITS, ORPO_NLL = ORPO_OUTPUT.index("chosen_logits"), ORPO_OUTPUT.index("chosen_nll_loss")


@dataclass(frozen=True)
class Internal:
    """One private method preference.py overrides or calls: where it lives, its parameters after `self`
    (compared exactly: an added parameter would be dropped by the override), and who relies on it."""
    cls: str  # import path of the class that must define it
    name: str
    params: tuple[str, ...]
    used_by: str


_PREPARE = ("dataset", "processing_class", "args", "dataset_name")
INTERNALS: dict[str, tuple[Internal, ...]] = {
    "dpo": (Internal("trl.DPOTrainer", "_prepare_dataset", _PREPARE,
                     "PreferenceTrainer._prepare_dataset (rows come tokenized by data/preferences.py)"),),
    "kto": (Internal("trl.KTOTrainer", "_prepare_dataset", _PREPARE,
                     "PreferenceTrainer._prepare_dataset (rows come tokenized; KL_completion_ids added there)"),),
    "orpo": (Internal("trl.experimental.orpo.ORPOTrainer", "tokenize_row", ("feature", "model"),
                      "PreferenceTrainer.tokenize_row (rows come tokenized by data/preferences.py)"),
             Internal("trl.experimental.orpo.ORPOTrainer", "concatenated_forward", ("model", "batch"),
                      f"PreferenceTrainer.concatenated_forward (reads output[{ORPO_CHOSEN_LOGITS}] as the chosen "
                      f"logits, replaces output[{ORPO_NLL}] with the completion-only NLL)")),
    # simpo: TRL's CPO trainer (loss_type simpo). Its concatenated_forward is overridden (for ORPO) and passed
    # through unchanged: its labels, hence the tokens of the mean log-prob, are tokenize_row's (completion only).
    "simpo": (Internal("trl.experimental.cpo.CPOTrainer", "tokenize_row", ("feature", "model"),
                       "PreferenceTrainer.tokenize_row (rows come tokenized by data/preferences.py)"),
              Internal("trl.experimental.cpo.CPOTrainer", "concatenated_forward", ("model", "batch"),
                       "PreferenceTrainer.concatenated_forward (calls it unchanged for simpo)")),
}
# Every stage: transformers' Trainer._save, which PreferenceTrainer._save extends to drop the reference adapter.
SAVE = Internal("transformers.Trainer", "_save", ("output_dir", "state_dict"),
                "PreferenceTrainer._save (the frozen reference adapter is not saved again)")
# Attributes TRL's __init__ sets and preference.py reads.
KTO_CALCULATE_KL = "calculate_KL"


def _trl_version() -> str:
    try:
        from importlib.metadata import version

        return version("trl")
    except Exception:  # not installed as a distribution (a source checkout): the message still reads right
        return "unknown"


def contract_error(what: str, used_by: str) -> UserError:
    """The one-line error for a TRL internal that is not what preference.py was written against."""
    return UserError(f"TRL {_trl_version()} changed an internal the preference stage relies on: {what} "
                     f"(used by {used_by}, domaintune/training/preference.py; tested with TRL {TESTED_TRL}.x): "
                     f"{INSTALL_HINT}")


def _import(path: str) -> type:
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def check_internal(internal: Internal, cls: type | None = None) -> None:
    """Raise `contract_error` unless `cls` (default: imported from `internal.cls`) defines `internal.name`
    with exactly `internal.params` after `self`."""
    cls = cls if cls is not None else _import(internal.cls)
    where = f"{internal.cls}.{internal.name}"
    fn = getattr(cls, internal.name, None)
    owner = next((k for k in cls.__mro__ if internal.name in vars(k)), None)
    # A TRL method must still be TRL's: were it gone from TRL, a same-named one further up (transformers')
    # would pass a plain lookup and do something else.
    if not callable(fn) or (internal.cls.startswith("trl.") and not (owner and owner.__module__.startswith("trl"))):
        raise contract_error(f"{where} is gone", internal.used_by)
    params = tuple(p for p in inspect.signature(fn).parameters if p != "self")
    if params != internal.params:
        raise contract_error(f"{where} takes ({', '.join(params)}), not ({', '.join(internal.params)})",
                             internal.used_by)


def check_trl_internals(stage: str, base: type) -> None:
    """Check every internal of `stage` on `base` (the TRL trainer class about to be extended)."""
    for internal in INTERNALS[stage]:
        check_internal(internal, base)
    check_internal(SAVE, base)


def check_kto_trainer(trainer: Any) -> None:
    """KTOTrainer.__init__ sets `calculate_KL` before it prepares the dataset; without it the KL rows would be
    left out silently."""
    if not hasattr(trainer, KTO_CALCULATE_KL):
        raise contract_error(f"trl.KTOTrainer no longer sets self.{KTO_CALCULATE_KL}",
                             "PreferenceTrainer._prepare_dataset (adds KL_completion_ids when it is true)")


def check_orpo_output(out: Any, batch: dict) -> None:
    """`ORPOTrainer.concatenated_forward`'s output is (chosen_logps, rejected_logps, chosen_logits [rows, T, vocab],
    rejected_logits, chosen_nll_loss (a scalar)[, aux_loss])."""
    import torch

    rows = batch["chosen_labels"].shape[0]
    shape = (f"a {type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list)) else type(out).__name__)
    ok = (isinstance(out, tuple) and len(out) in (len(ORPO_OUTPUT), len(ORPO_OUTPUT) + 1)
          and all(isinstance(t, torch.Tensor) for t in out[:len(ORPO_OUTPUT)]))
    if ok:
        logits, nll = out[ORPO_CHOSEN_LOGITS], out[ORPO_NLL]
        ok = logits.dim() == 3 and logits.shape[0] == rows and nll.dim() == 0
        if not ok:
            shape += (f" with output[{ORPO_CHOSEN_LOGITS}] of shape {tuple(logits.shape)} and output[{ORPO_NLL}] of "
                      f"shape {tuple(nll.shape)}")
    if not ok:
        raise contract_error(f"trl.experimental.orpo.ORPOTrainer.concatenated_forward returns {shape}, not "
                             f"({', '.join(ORPO_OUTPUT)}[, aux_loss]) with chosen_logits [{rows}, T, vocab] and a "
                             "scalar chosen_nll_loss", INTERNALS["orpo"][1].used_by)
