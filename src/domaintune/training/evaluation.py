"""The validation loss of a causal-LM run: the mean over all validation target tokens, the same with 1 or N processes.

Why not transformers' `Trainer.evaluation_loop` (it logged 7.916 with 2 processes for 7.642 with one, 6 rows):

- accelerate's sharding evens out the processes by repeating rows: 6 rows in batches of 8 gave process 0 rows
  0-5, 0, 1 and process 1 rows 2-5, 0-3;
- `compute_loss` divided each process's loss sum by the target tokens of *all* processes' batches (repeats
  included) and multiplied it by the process count: the scaling meant for training's gradient all-reduce;
- the loop repeated each batch's loss once per row, gathered them and cut the list back to the row count
  (`gather_for_metrics`): here process 0's values only, so the mean was 2 x its sum / both processes' tokens;
- even with one process, batches of unequal target-token counts were weighted by rows, not tokens.

How (`eval_dataloader`, `EvalShard`, `token_mean_loss`, `evaluation_output`, called by hf_trainer.py's subclass):
the rows are ordered by length (longest first; padded batches pad little) and dealt to the processes in turn,
each row to exactly one process; a process with one row fewer gets a filler (the shortest row with no targets),
so every process runs as many forward passes (FSDP gathers parameters in each) and the filler counts nothing.
Each process sums its batches' loss x target tokens and counts the target tokens; one all-reduce of (sum, count)
gives the mean.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..data.encode import IGNORE_INDEX

if TYPE_CHECKING:
    import torch


def shard_rows(lengths: Sequence[int], world_size: int, rank: int) -> list[int]:
    """The row indices process `rank` evaluates, longest first: every row is on exactly one process; each process
    gets ceil(n / world_size) entries, and -1 - i stands for row i as a filler that counts no tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    mine = order[rank::world_size]
    per_process = -(-len(order) // world_size)
    if len(mine) < per_process and order:
        mine.append(-1 - order[-1])  # the shortest row, as a filler
    return mine


class EvalShard:
    """Process `rank`'s validation rows (`shard_rows`) as a map-style dataset for a DataLoader: a filler row is
    returned with every label IGNORE_INDEX."""

    def __init__(self, rows: Sequence[dict], world_size: int, rank: int) -> None:
        lengths = getattr(rows, "lengths", None)  # arrow.Samples: read from a column, no row decoded
        if lengths is None:
            lengths = [len(rows[i]["input_ids"]) for i in range(len(rows))]
        self.rows, self.index = rows, shard_rows(list(lengths), world_size, rank)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict:
        i = self.index[k]
        if i >= 0:
            return self.rows[i]
        row = dict(self.rows[-1 - i])
        row["labels"] = [IGNORE_INDEX] * len(row["input_ids"])
        return row


def target_tokens(labels: torch.Tensor) -> int:
    """Target tokens of a causal-LM batch: position t predicts label t + 1, so the first label never counts."""
    return int(labels[..., 1:].ne(IGNORE_INDEX).sum())


def token_mean_loss(trainer: Any, model: Any, dataloader: Any) -> tuple[float, int]:
    """(mean loss over every target token of every process's batches, their count). `trainer.compute_loss`
    without `num_items_in_batch` returns one batch's mean over its own target tokens; a batch without targets
    (a filler) still runs its forward pass (FSDP's collectives) but adds nothing."""
    import torch

    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for inputs in dataloader:
        inputs = trainer._prepare_inputs(inputs)
        n = target_tokens(inputs["labels"])
        if trainer.args.use_liger_kernel:
            inputs = {**inputs, "skip_logits": True}
        with torch.no_grad(), trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, inputs)
        if n:
            total += loss.detach().double().cpu() * n
            count += n
        trainer.control = trainer.callback_handler.on_prediction_step(trainer.args, trainer.state, trainer.control)
    both = torch.tensor([float(total), float(count)], dtype=torch.float64, device=trainer.args.device)
    if trainer.args.world_size > 1:
        both = trainer.accelerator.reduce(both, reduction="sum")
    total_sum, total_count = (float(x) for x in both.cpu())
    return (total_sum / total_count if total_count else float("nan")), int(total_count)


def eval_dataloader(trainer: Any, eval_dataset: Any = None) -> Any:
    """The Trainer's `get_eval_dataloader`: this process's `EvalShard` of the validation rows (`eval_dataset`, a
    key of `trainer.eval_dataset`, or None for `trainer.eval_dataset`) in batches of `eval_batch_size` rows."""
    from torch.utils.data import DataLoader

    rows = trainer.eval_dataset if eval_dataset is None else eval_dataset
    if isinstance(rows, str):
        rows = trainer.eval_dataset[rows]
    args = trainer.args
    return DataLoader(EvalShard(rows, args.world_size, args.process_index),  # type: ignore[arg-type]
                      batch_size=args.eval_batch_size, shuffle=False, collate_fn=trainer.data_collator,
                      num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory)


def evaluation_output(trainer: Any, dataloader: Any, prefix: str) -> Any:
    """The Trainer's `evaluation_loop` for a loss-only evaluation of `eval_dataloader`'s batches: an EvalLoopOutput
    whose metrics are `{prefix}_loss`, `token_mean_loss`'s mean, identical on every process."""
    from transformers.trainer_utils import EvalLoopOutput

    model = trainer._wrap_model(trainer.model, training=False)  # under DDP the module itself (FSDP's: sharded)
    model.eval()
    if callable(getattr(trainer.optimizer, "eval", None)):  # schedule-free optimizers evaluate other weights
        trainer.optimizer.eval()
    trainer.callback_handler.eval_dataloader = dataloader
    loss, _ = token_mean_loss(trainer, model, dataloader)
    return EvalLoopOutput(predictions=None, label_ids=None, metrics={f"{prefix}_loss": loss},  # type: ignore[arg-type]
                          num_samples=len(dataloader.dataset.rows))
