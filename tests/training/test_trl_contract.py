"""trl_contract: the private TRL internals the preference stage relies on are present in the installed TRL, with the
parameters and output positions preference.py was written against; a TRL that changed one fails these tests
(and a preference run, before its model loads) with one line naming what changed and which code relies on it."""
from __future__ import annotations

import inspect
import re
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from packaging.requirements import Requirement

from domaintune.errors import UserError
from domaintune.training.preference import _trl_classes, preference_trainer_class
from domaintune.training.trl_contract import (
    INTERNALS,
    KTO_CALCULATE_KL,
    ORPO_CHOSEN_LOGITS,
    ORPO_NLL,
    SAVE,
    TESTED_TRL,
    Internal,
    check_internal,
    check_orpo_output,
    check_trl_internals,
)

ROOT = Path(__file__).resolve().parents[2]


def test_the_trl_requirement_is_bounded_to_the_tested_minor():
    # the one dependency line starting with "trl" (tomllib is 3.11+; the package supports 3.10)
    (line,) = re.findall(r'^\s*"(trl\b[^"]*)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M)
    trl = Requirement(line)
    assert str(trl.specifier) in (f">={TESTED_TRL},<1.17", f"<1.17,>={TESTED_TRL}"), (
        f"pyproject.toml's trl requirement '{trl.specifier}' is not the tested range of trl_contract.TESTED_TRL")
    assert version("trl") in trl.specifier, f"the installed TRL {version('trl')} is outside {trl.specifier}"


@pytest.mark.parametrize("stage", sorted(INTERNALS))
def test_the_installed_trl_has_every_internal(stage):
    base = _trl_classes(stage)[0]
    for internal in (*INTERNALS[stage], SAVE):
        check_internal(internal)  # from its import path: trl.DPOTrainer, trl.experimental.orpo.ORPOTrainer ...
    check_trl_internals(stage, base)  # and on the class the stage actually extends


def test_kto_still_sets_calculate_kl_before_preparing_the_dataset():
    """preference.py's _prepare_dataset reads self.calculate_KL, which KTOTrainer.__init__ sets (TRL 1.16) before
    it calls _prepare_dataset; the KL rows would be left out without it. A run checks it on the built trainer."""
    from trl import KTOTrainer

    src = inspect.getsource(KTOTrainer.__init__)
    assert f"self.{KTO_CALCULATE_KL} =" in src, (
        f"trl.KTOTrainer.__init__ no longer sets self.{KTO_CALCULATE_KL}: PreferenceTrainer._prepare_dataset "
        "(domaintune/training/preference.py) relies on it to add KL_completion_ids")
    assert src.index(f"self.{KTO_CALCULATE_KL} =") < src.index("self._prepare_dataset("), (
        f"trl.KTOTrainer.__init__ now prepares the dataset before setting self.{KTO_CALCULATE_KL}")


def test_orpo_concatenated_forward_returns_what_preference_py_reads():
    """Run TRL's own ORPOTrainer.concatenated_forward on a two-pair batch (a stand-in model returning fixed logits):
    output[2] must be the chosen rows' logits without the last position (completion_nll's input) and output[4]
    TRL's NLL term (the one replaced)."""
    from trl.experimental.orpo import ORPOTrainer

    torch.manual_seed(0)
    chosen = torch.tensor([[5, 6, 7, 8], [5, 9, 2, 0]])
    rejected = torch.tensor([[5, 6, 3, 0], [5, 9, 4, 4]])
    batch = {"chosen_input_ids": chosen, "chosen_attention_mask": (chosen != 0).long(),
             "chosen_labels": torch.tensor([[-100, 6, 7, 8], [-100, 9, 2, -100]]),
             "rejected_input_ids": rejected, "rejected_attention_mask": (rejected != 0).long(),
             "rejected_labels": torch.tensor([[-100, 6, 3, -100], [-100, 9, 4, 4]])}
    logits = torch.randn(4, 4, 11)

    def model(input_ids, attention_mask=None, use_cache=None):
        assert input_ids.shape == (4, 4)  # chosen rows first, then rejected
        return SimpleNamespace(logits=logits)

    trainer = SimpleNamespace(concatenated_inputs=ORPOTrainer.concatenated_inputs,
                              get_batch_logps=ORPOTrainer.get_batch_logps, is_encoder_decoder=False,
                              padding_value=0, aux_loss_enabled=False, accelerator=SimpleNamespace(device="cpu"))
    out = ORPOTrainer.concatenated_forward(trainer, model, batch)
    check_orpo_output(out, batch)
    assert torch.equal(out[ORPO_CHOSEN_LOGITS], logits[:2, :-1]), "output[2] is no longer the chosen logits"
    labels = torch.where(batch["chosen_attention_mask"] == 1, chosen, -100)[:, 1:]
    want = torch.nn.functional.cross_entropy(logits[:2, :-1].reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(out[ORPO_NLL], want), "output[4] is no longer ORPO's NLL term"


# ---------------------------------------------------------------- what a changed TRL gets told

class _OldBase:
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name): ...
    def _save(self, output_dir=None, state_dict=None): ...


_OldBase.__module__ = "trl.trainer.dpo_trainer"  # stands in for a TRL class


def test_a_renamed_or_reshaped_internal_is_named_with_its_user():
    dpo = INTERNALS["dpo"][0]
    renamed = type("DPOTrainer", (), {"_prepare_dataset_v2": lambda self: None, "__module__": "trl.x"})
    with pytest.raises(UserError) as e:
        check_internal(dpo, renamed)
    msg = str(e.value)
    assert re.fullmatch(r"TRL \S+ changed an internal the preference stage relies on: "
                        r"trl\.DPOTrainer\._prepare_dataset is gone "
                        r"\(used by PreferenceTrainer\._prepare_dataset .*preference\.py; tested with TRL "
                        + re.escape(TESTED_TRL) + r"\.x\): pip install 'trl>=1\.16,<1\.17'", msg), msg

    class Reshaped(_OldBase):
        __module__ = "trl.trainer.dpo_trainer"

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name, num_proc=None): ...

    with pytest.raises(UserError, match=re.escape("trl.DPOTrainer._prepare_dataset takes (dataset, processing_class, "
                                                  "args, dataset_name, num_proc), not (dataset, processing_class, "
                                                  "args, dataset_name)")):
        check_trl_internals("dpo", Reshaped)
    check_trl_internals("dpo", _OldBase)  # the shape it was written against passes


def test_a_trl_method_inherited_from_transformers_does_not_count():
    """Were `_prepare_dataset` gone from TRL but defined further up (transformers), a plain lookup would pass."""
    Upstream = type("Trainer", (), {"_prepare_dataset": _OldBase._prepare_dataset, "__module__": "transformers.x"})
    Trl = type("DPOTrainer", (Upstream,), {"__module__": "trl.x"})
    with pytest.raises(UserError, match=r"_prepare_dataset is gone"):
        check_internal(INTERNALS["dpo"][0], Trl)


def test_building_the_trainer_class_on_a_changed_trl_fails_clearly():
    class NoTokenizeRow:
        __module__ = "trl.experimental.orpo.orpo_trainer"

        def concatenated_forward(self, model, batch): ...

    with pytest.raises(UserError, match=r"ORPOTrainer\.tokenize_row is gone \(used by PreferenceTrainer\.tokenize_row"):
        preference_trainer_class(NoTokenizeRow, "orpo")


def test_a_changed_orpo_output_is_an_error_not_an_index_error():
    batch = {"chosen_labels": torch.zeros(2, 4, dtype=torch.long)}
    t = torch.zeros(2)
    with pytest.raises(UserError, match=re.escape("concatenated_forward returns a tuple of 4, not (chosen_logps, "
                                                  "rejected_logps, chosen_logits, rejected_logits, chosen_nll_loss"
                                                  "[, aux_loss])")) as e:
        check_orpo_output((t, t, torch.zeros(2, 3, 5), t), batch)
    assert "replaces output[4]" in str(e.value)
    with pytest.raises(UserError, match=re.escape("with output[2] of shape (2,) and output[4] of shape (2,)")):
        check_orpo_output((t, t, t, t, t), batch)
    check_orpo_output((t, t, torch.zeros(2, 3, 5), t, torch.tensor(1.0)), batch)


def test_every_listed_internal_names_its_user():
    for internal in (*[i for group in INTERNALS.values() for i in group], SAVE):
        assert isinstance(internal, Internal) and internal.used_by.startswith("PreferenceTrainer.")
