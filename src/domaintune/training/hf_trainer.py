"""What domaintune changes in transformers' `Trainer`, in one subclass (`trainer_class()`):

- **No pickle we rely on.** The Trainer saves the RNG state as `rng_state.pth` (a pickle that needs numpy
  globals allowed to load) and `TrainingArguments` as `training_args.bin` (a pickle that needs
  `weights_only=False`). Here the RNG state goes to `rng_state.safetensors` (tensors, with the Python and
  numpy generator scalars in its metadata) and is restored from there on resume; `training_args.bin` is
  not kept (config.yaml is the run's resolved config). Optimizer and scheduler states stay the Trainer's
  `optimizer.pt` / `scheduler.pt`: plain tensor state dicts, loaded with `weights_only=True`.
- **A layout-free, resumable length-grouped order.** With `train_sampling_strategy="group_by_length"` the
  sampler is `sampler.LengthGroupedOrder` (a function of the seed, the epoch and the global batch), not
  transformers' `LengthGroupedSampler`, whose order changed with the process count and on resume; its epoch
  is set as each epoch starts (`_run_epoch`, also for a resumed epoch, whatever wraps the DataLoader).
- **A diverging run stops.** A non-finite loss, or a non-finite gradient norm (except under fp16, whose
  loss scaler skips such steps by design), raises `NonFiniteTraining` before the optimizer applies the
  step, so no checkpoint written later holds NaN weights; the caller turns it into a message naming the
  step and the last good checkpoint. (transformers' `logging_nan_inf_filter` would otherwise hide NaN
  losses from the log.)
- **The validation loss over all target tokens** (`trainer_class(token_mean_eval=True)`, the SFT stage):
  `get_eval_dataloader` deals each validation row to exactly one process (evaluation.py's `EvalShard`, not
  accelerate's sharding, which repeats rows) and `evaluation_loop` returns `eval_loss` = the sum of the token
  losses of every process / their count (`token_mean_loss`), the same with 1 or N processes.
- **LoRA+.** With `trainer_class(loraplus_lr_ratio=...)` (train.loraplus_lr_ratio), `create_optimizer` builds
  PEFT's LoRA+ optimizer (optimizers.py) instead of the Trainer's two groups; on resume the Trainer loads the
  checkpoint's optimizer state into it as into its own.

The hooks (`_save_rng_state`, `_load_rng_state`, `_save`, `_get_grad_norm`, `_get_train_sampler`, `_run_epoch`,
and evaluation.py's `_wrap_model`, `_prepare_inputs`) are the Trainer's own, but private: checked against
transformers 5.x. If a later version renames them, the exact-resume, layout, no-pickle and eval-loss tests in
tests/training/ fail (test_sampler.py checks the first six names directly).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from .. import console
from ..rundir import TRAINING_ARGS

if TYPE_CHECKING:
    import torch
    from transformers import Trainer

RNG_STATE = "rng_state.safetensors"


class NonFiniteTraining(Exception):
    """The loss or the gradient norm became NaN or infinite at optimizer step `step` (1-based)."""

    def __init__(self, step: int, what: str, value: float) -> None:
        super().__init__(f"{what} is {value} at step {step}")
        self.step, self.what, self.value = step, what, value


def rng_file(output_dir: str | Path, process_index: int, world_size: int) -> Path:
    name = RNG_STATE if world_size <= 1 else f"rng_state_{process_index}.safetensors"
    return Path(output_dir) / name


def save_rng_state(path: Path) -> None:
    """The Python, numpy and torch (CPU and CUDA) generator states as safetensors."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {
        "python": torch.tensor(internal, dtype=torch.int64),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.random.get_rng_state_all()):
            tensors[f"cuda_{i}"] = state
    meta = {"python_version": version, "python_gauss": gauss, "numpy_name": np_name, "numpy_pos": int(np_pos),
            "numpy_has_gauss": int(np_has_gauss), "numpy_gauss": float(np_gauss)}
    save_file(tensors, str(path), metadata={"domaintune": json.dumps(meta)})


def load_rng_state(path: Path) -> None:
    """Restore what `save_rng_state` wrote (CUDA states only where this machine has those devices)."""
    import numpy as np
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["domaintune"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    random.setstate((meta["python_version"], tuple(int(x) for x in tensors["python"].tolist()),
                     meta["python_gauss"]))
    np.random.set_state((meta["numpy_name"], tensors["numpy_keys"].numpy().astype(np.uint32), meta["numpy_pos"],
                         meta["numpy_has_gauss"], meta["numpy_gauss"]))
    torch.random.set_rng_state(tensors["cpu"])
    cuda = [tensors[f"cuda_{i}"] for i in range(sum(k.startswith("cuda_") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.random.set_rng_state_all(cuda[: torch.cuda.device_count()])


def trainer_class(base: type[Trainer] | None = None, loraplus_lr_ratio: float | None = None,
                  token_mean_eval: bool = False) -> type[Trainer]:
    """The Trainer subclass (built on first use, so transformers is imported only when training starts), on
    transformers' Trainer or on `base`, a Trainer subclass such as TRL's DPOTrainer; `loraplus_lr_ratio`: LoRA+
    (train.loraplus_lr_ratio), None for the Trainer's own optimizer; `token_mean_eval`: the causal-LM validation
    loss of evaluation.py (the SFT stage; the preference trainers keep their own evaluation)."""
    import torch
    from transformers import Trainer

    # The base is chosen at run time; mypy checks the subclass against transformers' Trainer, which every
    # allowed base (TRL's trainers included) extends.
    if TYPE_CHECKING:
        parent: TypeAlias = Trainer
    else:
        parent = base or Trainer

    class DomaintuneTrainer(parent):
        _length_order: Any = None  # the LengthGroupedOrder in use, if any

        def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
            if loraplus_lr_ratio is None or self.optimizer is not None:
                return super().create_optimizer(model)
            from .optimizers import loraplus_optimizer

            self.optimizer = loraplus_optimizer(self.model if model is None else model, self.args, loraplus_lr_ratio)
            return self.optimizer

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            if self.args.train_sampling_strategy != "group_by_length":
                return super()._get_train_sampler(train_dataset)
            from .arguments import global_batch
            from .sampler import LengthGroupedOrder

            # A list of rows or a datasets.Dataset: sized and indexable by row (torch's Dataset type promises neither).
            dataset: Any = train_dataset if train_dataset is not None else self.train_dataset
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            lengths = getattr(dataset, "lengths", None)  # arrow.Samples: read from a column, no row decoded
            if lengths is None:
                lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
            self._length_order = LengthGroupedOrder(lengths, global_batch(self.args), seed)
            return self._length_order

        def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
            if self._length_order is not None:  # before the epoch's iterator is made
                self._length_order.set_epoch(kwargs["epoch"])
            return super()._run_epoch(*args, **kwargs)

        def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                          num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
            loss = super().training_step(model, inputs, num_items_in_batch)
            if not bool(torch.isfinite(loss).all()):
                raise NonFiniteTraining(self.state.global_step + 1, "the loss", float(loss.detach().float().mean()))
            return loss

        def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
            grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
            value = float(grad_norm) if grad_norm is not None else 0.0
            if not self.args.fp16 and not torch.isfinite(torch.tensor(value)):
                raise NonFiniteTraining(self.state.global_step + 1, "the gradient norm", value)
            return grad_norm

        def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
            if not token_mean_eval:
                return super().get_eval_dataloader(eval_dataset)
            from .evaluation import eval_dataloader

            return eval_dataloader(self, eval_dataset)

        def evaluation_loop(self, dataloader: Any, description: str, prediction_loss_only: bool | None = None,
                            ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> Any:
            if not token_mean_eval or description != "Evaluation" or self.compute_metrics is not None:
                return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                               metric_key_prefix)
            from .evaluation import evaluation_output

            return evaluation_output(self, dataloader, metric_key_prefix)

        def _save_rng_state(self, output_dir: str) -> None:
            # Another rank can get here before rank 0 has created the checkpoint folder (as the Trainer notes).
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            save_rng_state(rng_file(output_dir, self.args.process_index, self.args.world_size))

        def _load_rng_state(self, checkpoint: str | None) -> None:
            if checkpoint is None:
                return
            path = rng_file(checkpoint, self.args.process_index, self.args.world_size)
            if not path.is_file():
                console.warn(f"{path} is missing: the random state is not restored, so dropout draws after "
                             "resuming differ from an uninterrupted run")
                return
            load_rng_state(path)

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            super()._save(output_dir, state_dict=state_dict)
            if self.args.should_save:
                folder = output_dir or self.args.output_dir
                assert folder is not None, "TrainingArguments sets output_dir ('trainer_output' when not given)"
                Path(folder, TRAINING_ARGS).unlink(missing_ok=True)

    return DomaintuneTrainer
