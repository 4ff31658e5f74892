"""The length-grouped data order (`train.group_by_length`, the default on the padded path), one per epoch.

Why not transformers' `LengthGroupedSampler`: its order depends on two things a run may change, so it broke
two promises on the padded path (BLOOM, which cannot pack rows):

- it draws from torch's *global* generator when the epoch starts, whose state on `--resume` is the one saved
  at the checkpoint, not the one the epoch started with: the resumed run saw another order (rows repeated,
  rows skipped);
- it groups by `per_device_batch_size x gradient_accumulation_steps` of one process, so 1 process x 2 rows x 2
  accumulation steps and 2 processes x 2 rows ordered the same rows differently.

`length_grouped_order` is a function of the row lengths, the seed, the epoch and the *global* batch only.
The order is cut into global batches (`global_batch` rows, one optimizer step); each is made of rows of
similar length, longest first, so any cut into micro-batches (`per_device_batch_size` consecutive rows, as
the DataLoader and accelerate's per-process sharding take them) pads little. Which rows make an optimizer step
is then the same for any process count and accumulation, and a resume that skips the steps already trained
(as the Trainer does) continues with exactly the rows the uninterrupted run would have seen.

How the order is made (the idea of transformers' sampler, made layout-free): a seeded permutation of all rows,
cut into mega-batches of `MEGA` global batches, each sorted by length and cut into global batches; the full
global batches are shuffled (seeded), the one holding the longest row goes first (a too-large batch fails at
step 1, not hours in), and a last, partial global batch stays last (so every earlier step is whole).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

MEGA = 50  # global batches per sorted mega-batch: rows are grouped with their neighbours in length, not globally


def length_grouped_order(lengths: Sequence[int], global_batch: int, seed: int) -> list[int]:
    """Row indices of one epoch: a permutation of range(len(lengths)), grouped by length in global batches
    of `global_batch` rows; the same arguments always give the same order."""
    n = len(lengths)
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1, got {global_batch}")
    g = torch.Generator()
    g.manual_seed(seed)
    perm = torch.randperm(n, generator=g).tolist()
    mega = global_batch * MEGA
    batches: list[list[int]] = []
    for start in range(0, n, mega):
        group = sorted(perm[start:start + mega], key=lambda i: -lengths[i])  # stable: ties keep the seeded order
        batches.extend(group[i:i + global_batch] for i in range(0, len(group), global_batch))
    tail = batches.pop() if batches and len(batches[-1]) < global_batch else None
    order = torch.randperm(len(batches), generator=g).tolist()
    batches = [batches[i] for i in order]
    if batches:
        longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
        batches[0], batches[longest] = batches[longest], batches[0]
    if tail is not None:
        batches.append(tail)
    return [i for batch in batches for i in batch]


class LengthGroupedOrder(torch.utils.data.Sampler[int]):
    """A Sampler over `length_grouped_order(lengths, global_batch, seed + epoch)`; `set_epoch` picks the epoch
    (the Trainer subclass calls it at the start of every epoch, resumed ones included)."""

    def __init__(self, lengths: Sequence[int], global_batch: int, seed: int) -> None:
        self.lengths, self.global_batch, self.seed = list(lengths), global_batch, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(length_grouped_order(self.lengths, self.global_batch, self.seed + self.epoch))
