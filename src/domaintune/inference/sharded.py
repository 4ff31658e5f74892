"""`predict` under torchrun or accelerate launch: the rows split across processes, one predictions.jsonl.

    torchrun --nproc_per_node 8 -m domaintune predict RUN --data test.jsonl

- Every process loads the model on its own device (GPU `LOCAL_RANK`, or the CPU) and takes every world-th row
  of what is left to do, in input order: rank r gets rows r, r + world, ...
- Each writes its rows, kill-safe as a single process does (fsync per batch), to its own shard file next to
  the output, `predictions.jsonl.rank<r>.part`. Only rank 0 touches predictions.jsonl and its sidecar.
- When all are done, rank 0 merges predictions.jsonl and every shard, each id once, in input order, writes
  predictions.jsonl atomically, then deletes the shards; then it scores the file.
- A kill and a rerun, with the same or another number of processes (one included): what predictions.jsonl and
  any shard hold counts as done (rank 0 checks their settings against the sidecar, cuts torn last lines off, and
  tells every rank), so nothing is lost or made twice; --overwrite removes the shards too.
- The teacher-forced loss on the targets is sharded the same way: each process sums its rows' token losses,
  the sums are added across processes (all_reduce), and the mean is the single-process one.
"""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

SHARD = ".rank{rank}.part"


def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun and accelerate launch set them; (0, 1, 0) alone."""
    from ..training.arguments import world as rank_and_size

    return (*rank_and_size(), int(os.environ.get("LOCAL_RANK", 0)))


def device_for(local_rank: int) -> str:
    """This process's device: its own GPU when there are GPUs, else the CPU."""
    import torch

    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def init() -> None:
    """Join the launcher's process group (NCCL on GPUs, gloo on the CPU) unless already joined."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(world()[2])
        # Ranks that finish their share early wait at the merge barrier: allow long, uneven shares.
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=6))


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def agree(rank: int, make: Any) -> Any:
    """`make()` on rank 0, its result on every rank; a UserError on rank 0 is raised on every rank (so no
    process waits for a rank that has stopped, on any number of nodes)."""
    import torch.distributed as dist

    from ..errors import UserError

    box: list = [None]
    if rank == 0:
        try:
            box = [("ok", make())]
        except UserError as e:
            box = [("error", str(e))]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise UserError(value)
    return value


def shard_path(jsonl: Path, rank: int) -> Path:
    return jsonl.with_name(jsonl.name + SHARD.format(rank=rank))


def shards(jsonl: Path) -> list[Path]:
    """Every shard file of `jsonl`, from this run or an interrupted one with any number of processes."""
    return sorted(jsonl.parent.glob(jsonl.name + SHARD.format(rank="*")))


def my_rows(todo: list, rank: int, world_size: int) -> list:
    return todo[rank::world_size]


def sum_across(values: list[float], device: Any) -> list[float]:
    """Element-wise sum of `values` over all processes (float64)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
