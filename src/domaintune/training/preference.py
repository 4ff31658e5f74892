"""Preference stages (`train.stage: dpo | orpo | kto | simpo`) on TRL's trainers: the same run as SFT (run.py),
with preference rows, a starting point and a reference model (none for orpo and simpo).

**Starting point.** `model.name_or_path` is a base model, or an SFT run directory:

- an SFT LoRA run: the preference stage *continues its adapter*. The base loads as the SFT run loaded it (its
  config.yaml's model section), the SFT adapter goes on top as the trainable adapter, and TRL keeps a frozen
  copy of it as the reference ("ref" adapter): the reference model is the SFT model, with no second copy of the
  base in memory. The result is one adapter on the original base, so predict, chat, serve and export read the
  run exactly like an SFT run. The run's `lora` section is the SFT run's (the adapter's shape is fixed).
- a full fine-tuned run, an export (`domaintune export`) or any model folder: it is the base (an export's or
  run's template.json comes along); LoRA adds new weights (reference = adapters off) or, with
  `lora.enabled: false`, all weights train against a frozen second copy (TRL's default).
- `train.output_dir` may not be, hold or lie in the starting run: `--overwrite` never deletes it.

**Template and prompts.** From an SFT run, the template is its template.json, copied byte for byte, and its
`data.system` applies where this config sets none, so the prompts are the SFT prompts token for token.

**Data.** data/preferences.py: validated before any model loads, encoded with the run's template; the tokens
in the loss are the completion tokens and EOS (ORPO's NLL term included: TRL computes it over the prompt too,
`completion_nll` replaces it). dpo, orpo and simpo take pairs; kto takes pairs or good/bad rows, at least two rows
per micro-batch (its KL estimate pairs rows within one).

**SimPO** is TRL's CPO trainer with `loss_type="simpo"` and `cpo_alpha=0` (pure SimPO, no NLL term): the reward of
a completion is beta times its *mean* token log-prob, and the loss pushes the chosen reward above the rejected one
by `train.simpo_gamma`. No reference model, as ORPO: the SFT adapter continues and nothing is kept frozen.
`train.trainer_args.cpo_alpha` adds CPO's NLL term on the chosen completion (CPO-SimPO); loss_type and simpo_gamma
come from train.stage and train.simpo_gamma only.

**Logs.** TRL's reward metrics (rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies,
logps/chosen, logps/rejected ...) go into log.jsonl with the loss, and `plot` draws margins and accuracy.
Checkpoints, exact resume, the no-pickle rule and the divergence stop are the SFT run's (hf_trainer.py).
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from ..errors import UserError
from ..rundir import TEMPLATE, RunDir, base_model_config, paths_overlap
from .run import TrainingRun
from .trl_contract import INSTALL_HINT, check_kto_trainer, check_trl_internals

if TYPE_CHECKING:
    from transformers import Trainer

    from ..data.preferences import PreferenceData

REF_ADAPTER = "ref"  # the name TRL gives the frozen copy of a pretrained adapter
NO_REFERENCE = ("orpo", "simpo")  # stages whose loss needs no reference model


class PreferenceRun(TrainingRun):
    """A dpo/orpo/kto/simpo run (see the module docstring)."""

    def __init__(self, cfg: Any, resume: bool = False, overwrite: bool = False) -> None:
        super().__init__(cfg, resume=resume, overwrite=overwrite)
        self.stage = cfg.train.stage
        self.sft: Path | None = None  # the SFT run this stage starts from
        self.sft_adapter = False
        self.requested_model = cfg.model.name_or_path
        self._prefs: PreferenceData | None = None  # the preference rows (setup_data), read as `data`
        if cfg.train.per_device_batch_size == "auto":
            raise UserError(f"train.per_device_batch_size: auto is for train.stage sft; give a number for {self.stage}")
        self.per_device = cfg.train.per_device_batch_size  # a number (TRL's trainers have no auto batch)
        if self.stage == "kto" and cfg.train.per_device_batch_size < 2:
            raise UserError("train.stage kto estimates its KL term from the other rows of a micro-batch: set "
                            "train.per_device_batch_size to 2 or more")
        self._resolve_start()

    def _resolve_start(self) -> None:
        """From an SFT run directory: its base model section, lora section, template and data.system. From an
        exported model (template.json, no config.yaml): its template; the model itself is the base."""
        from ..config import load_config

        # required_name: a preference config without a model is told so, here in __init__, before setup_output
        src = Path(self.cfg.model.required_name()).expanduser()
        run = RunDir(src)
        if not (src.is_dir() and run.template_path.is_file()):
            return  # a base model (or a plain model folder)
        self.sft = src.resolve()
        if paths_overlap(self.sft, self.cfg.train.output_dir):
            raise UserError(f"train.output_dir '{self.cfg.train.output_dir}' is (or holds, or lies in) the run this "
                            f"stage starts from, '{src}': choose another folder, the SFT run must stay as it is")
        if not run.config_path.is_file():
            return  # an export: a full model with its template
        sft_cfg = load_config(run.config_path)
        updates: dict[str, Any] = {}
        if run.has_adapter():
            if not self.cfg.lora.enabled:
                raise UserError(f"model.name_or_path '{src}' is a LoRA run: a preference stage continues its adapter, "
                                "so set lora.enabled: true (for full preference tuning, export the SFT run merged "
                                "with `domaintune export` and start from that folder)")
            self.sft_adapter = True
            updates["model"] = base_model_config(src, sft_cfg)
            updates["lora"] = sft_cfg.lora
        if self.cfg.data.system is None and sft_cfg.data.system:
            updates["data"] = self.cfg.data.model_copy(update={"system": sft_cfg.data.system})
        self.cfg = self.cfg.model_copy(update=updates)

    @property
    def data(self) -> PreferenceData:
        if self._prefs is None:
            raise RuntimeError("PreferenceRun.data is set by setup_data(), which has not run")
        return self._prefs

    # ------------------------------------------------------------ stages
    def check_data(self) -> None:
        from ..data.preferences import check_preference_files

        check_preference_files(self.cfg.data, self.stage, self.cfg.train.seed)

    def check_trainer_args(self) -> None:
        from .arguments import check_trainer_args

        check_trainer_args(self.cfg.train.trainer_args, _trl_classes(self.stage)[1])
        if self.stage == "simpo":  # CPOConfig fields that would silently turn the stage into another loss
            owned = {"loss_type": "train.stage (simpo sets TRL's loss_type)", "simpo_gamma": "train.simpo_gamma"}
            if bad := [k for k in owned if k in self.cfg.train.trainer_args]:
                raise UserError("train.trainer_args: " + "; ".join(f"{k!r} is set by domaintune; use {owned[k]}"
                                                                    for k in bad))

    def setup_output(self) -> None:
        super().setup_output()
        # The TRL internals this stage overrides (trl_contract.py), checked before the model loads: a TRL that
        # changed them stops here with one line, not minutes later with an IndexError.
        check_trl_internals(self.stage, _trl_classes(self.stage)[0])
        if self.sft:
            ref = "no reference model" if self.stage in NO_REFERENCE else "the reference model is the SFT model"
            start = f"its adapter continues; {ref}" if self.sft_adapter else "a full model"
            self._say(f"starting point: SFT run {self.sft} ({start}); template: its {TEMPLATE}")

    def setup_data(self) -> None:
        from ..data.preferences import build_preference_data
        from ..data.templates import Template, get_template
        from .model import load_tokenizer

        m = self.cfg.model
        self._tok = load_tokenizer(str(self.sft) if self.sft else m.required_name(), m.trust_remote_code,
                                   None if self.sft else m.revision)
        self._template = (Template.load(self.sft / TEMPLATE) if self.sft else
                          get_template(self.cfg.data.template, self.tok, self.cfg.data.thinking))
        self.tok.chat_template = self.template.chat_template_for(self.tok)
        if self.tok.pad_token is None:  # TRL's collators pad; a LLaMA tokenizer ships without a pad token
            self.tok.pad_token = self.tok.eos_token
        self._prefs = build_preference_data(self.cfg.data, self.tok, self.template, self.stage, self.cfg.train.seed)
        self._say("\n".join(self.data.report.summary_lines()))

    def sized_rows(self) -> list[dict]:
        key = "completion_ids" if self.stage == "kto" else "chosen_ids"
        return [{"input_ids": r["prompt_ids"] + r.get(key, []) + r.get("rejected_ids", [])} for r in self.data.train]

    def wrap_model(self, checkpointing: bool) -> Any:
        if not self.sft_adapter:
            return super().wrap_model(checkpointing)
        assert self.sft is not None, "_resolve_start sets sft_adapter with sft"
        from .model import enable_checkpointing, load_adapter

        if self.cfg.model.quantization != "none":  # as prepare_for_training does for a QLoRA SFT run
            from peft import prepare_model_for_kbit_training

            self._base = prepare_model_for_kbit_training(self.base, use_gradient_checkpointing=checkpointing)
        elif checkpointing:
            enable_checkpointing(self.base)
            self.base.enable_input_require_grads()
        return load_adapter(self.base, self.sft, trainable=True)

    def setup_trainer(self) -> None:
        from datasets import Dataset

        t = self.cfg.train
        self.loss_kind, self.batching = f"{self.stage} (TRL)", "pad"
        base, config_class, extra = _trl_classes(self.stage)
        if self.stage == "simpo":
            extra = {**extra, "simpo_gamma": t.simpo_gamma}
        args, callbacks = self.arguments_and_callbacks(
            group_by_length=False, args_class=config_class,
            extra={"beta": t.beta, "label_names": [], **extra,
                   # TRL's configs turn it on by default; here it is the run's choice (under transformers 5's
                   # name where it has it: the old one warns)
                   _checkpointing_field(config_class): self.checkpointing})
        rows = list(self.data.train)
        if self.stage == "kto":  # sequential batches (see _trl_classes): the order is shuffled here, seeded
            random.Random(t.seed).shuffle(rows)
        train = Dataset.from_list(rows)
        ev = Dataset.from_list(self.data.eval) if self.data.eval else None
        self._trainer = preference_trainer_class(base, self.stage)(
            model=self.model, args=args, train_dataset=train, eval_dataset=ev, processing_class=self.tok,
            callbacks=callbacks)
        if self.stage == "kto":
            check_kto_trainer(self.trainer)

    def save(self, eval_metrics: dict, runtime: float, tokens_at_start: int) -> None:
        super().save(eval_metrics, runtime, tokens_at_start)
        if self.trainer.is_world_process_zero() and self.sft:
            shutil.copyfile(self.sft / TEMPLATE, self.run.template_path)  # byte for byte the SFT run's

    def run_path_info(self) -> dict:
        info = {"stage": self.stage, "beta": self.cfg.train.beta, "started_from": self.requested_model,
                "reference": ("none (ORPO has no reference model)" if self.stage == "orpo" else
                              "none (SimPO has no reference model)" if self.stage == "simpo" else
                              "the SFT adapter (frozen copy)" if self.sft_adapter else
                              "the base with adapters off" if self.cfg.lora.enabled else "a frozen copy of the model")}
        if self.stage == "simpo":
            info["simpo_gamma"] = self.cfg.train.simpo_gamma
        return info


def _trl_classes(stage: str) -> tuple[type, type, dict]:
    """TRL's trainer and config classes for `stage`, and the config fields domaintune sets for it: no
    truncation (the data is cut at data.cutoff_len already), no dataset workers."""
    try:
        if stage == "dpo":
            from trl import DPOConfig, DPOTrainer

            return DPOTrainer, DPOConfig, {"max_length": None}
        if stage == "kto":
            from trl import KTOConfig, KTOTrainer

            # TRL's KL estimate pairs each row with its batch neighbour's completion, so the batches must come
            # in a fixed order; the rows were shuffled (seeded) when the dataset was built instead.
            return KTOTrainer, KTOConfig, {"max_length": None, "train_sampling_strategy": "sequential"}
        # ORPO's and CPO's batches hold chosen_/rejected_input_ids, no input_ids: the Trainer cannot count tokens
        # (it would warn at every step), so run_info.json records none for them.
        no_count = {"max_length": None, "max_completion_length": None, "include_num_input_tokens_seen": "no"}
        if stage == "simpo":
            from trl.experimental.cpo import CPOConfig, CPOTrainer

            # pure SimPO: CPO's NLL term off (setup_trainer adds train.simpo_gamma)
            return CPOTrainer, CPOConfig, {**no_count, "loss_type": "simpo", "cpo_alpha": 0.0}
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer, ORPOConfig, no_count
    except ImportError as e:
        raise UserError(f"train.stage {stage} needs TRL: {INSTALL_HINT} ({e})") from None


def preference_trainer_class(base: type, stage: str) -> type:
    """domaintune's Trainer behaviour (hf_trainer.py) on TRL's `base`, fed with the rows data/preferences.py
    encoded instead of TRL's own tokenization. The overridden methods are TRL's private ones: `_prepare_dataset`
    (dpo, kto), `tokenize_row` (orpo, simpo) and `concatenated_forward` (orpo; simpo's passes through).
    trl_contract.py lists them with their signatures and output positions; pyproject.toml bounds TRL to the tested
    minor, and setup_trainer checks them before the trainer is built, so a TRL that changed them stops with one
    clear line."""
    from .hf_trainer import trainer_class
    from .trl_contract import KTO_CALCULATE_KL, ORPO_CHOSEN_LOGITS, ORPO_NLL, check_orpo_output

    check_trl_internals(stage, base)  # also here, for any caller that builds the class directly

    # TRL's trainer for the stage with hf_trainer.py's behaviour on top, chosen at run time: mypy checks the
    # subclass against transformers' Trainer, which every TRL trainer extends.
    if TYPE_CHECKING:
        parent: TypeAlias = Trainer
    else:
        parent = trainer_class(base)

    class PreferenceTrainer(parent):
        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            if stage == "kto" and getattr(self, KTO_CALCULATE_KL):  # set by KTOTrainer.__init__ before this call
                # TRL's KL term pairs each prompt with another row's completion, rotated within each batch.
                def add_kl(rows: dict) -> dict:
                    rows["KL_completion_ids"] = [rows["completion_ids"][-1]] + rows["completion_ids"][:-1]
                    return rows

                dataset = dataset.map(add_kl, batched=True, batch_size=args.per_device_train_batch_size)
            return dataset

        def tokenize_row(self, feature: dict, model: Any = None) -> dict:  # orpo, simpo (CPO)
            prompt = feature["prompt_ids"]
            out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for side in ("chosen", "rejected"):
                ids = prompt + feature[f"{side}_ids"]
                out[f"{side}_input_ids"] = ids
                out[f"{side}_attention_mask"] = [1] * len(ids)
                out[f"{side}_labels"] = [-100] * len(prompt) + feature[f"{side}_ids"]
            return out

        def concatenated_forward(self, model: Any, batch: dict) -> tuple:
            # ORPOTrainer and CPOTrainer define it (trl_contract.py checks ORPO's; CPO's output is used as TRL
            # returns it: its labels are tokenize_row's, completion only); mypy sees only Trainer.
            out = super().concatenated_forward(model, batch)  # type: ignore[misc]
            if stage != "orpo":
                return out
            # TRL's ORPO puts the prompt tokens into its NLL term too (labels = every attended token); here it is
            # the chosen completion only, as SFT trains and as data/preferences.py promises.
            check_orpo_output(out, batch)
            nll = completion_nll(out[ORPO_CHOSEN_LOGITS], batch["chosen_labels"])
            return (*out[:ORPO_NLL], nll, *out[ORPO_NLL + 1:])

        def create_model_card(self, *args: Any, **kwargs: Any) -> None:
            """TRL writes a README.md into the run and every checkpoint; the run directory has its own report."""

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            super()._save(output_dir, state_dict=state_dict)
            if self.args.should_save:  # the frozen reference adapter is the SFT run's: not saved again
                folder = output_dir or self.args.output_dir
                assert folder is not None, "TrainingArguments sets output_dir (trainer_output by default)"
                shutil.rmtree(Path(folder) / REF_ADAPTER, ignore_errors=True)

    return PreferenceTrainer


def completion_nll(chosen_logits: Any, chosen_labels: Any) -> Any:
    """Mean cross-entropy of the chosen completions: `chosen_logits[:, t]` predicts token t + 1 (TRL's ORPO slices
    off the last position); `chosen_labels` is -100 on the prompt and on padding, and may be shorter than the
    logits (padded to the longer of chosen and rejected)."""
    import torch

    n = chosen_logits.shape[1] + 1
    labels = torch.nn.functional.pad(chosen_labels, (0, n - chosen_labels.shape[1]), value=-100)[:, 1:]
    return torch.nn.functional.cross_entropy(chosen_logits.reshape(-1, chosen_logits.shape[-1]).float(),
                                             labels.reshape(-1).to(chosen_logits.device), ignore_index=-100)


def _checkpointing_field(args_class: type) -> str:
    import dataclasses

    names = {f.name for f in dataclasses.fields(args_class)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
