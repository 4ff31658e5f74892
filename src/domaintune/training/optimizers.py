"""LoRA+ (`train.loraplus_lr_ratio`): the adapter's B matrices learn `ratio` times faster than its A matrices.

Built by PEFT's `create_loraplus_optimizer` from the optimizer class and settings the Trainer would use
(`train.optim`, betas, eps ... of `Trainer.get_optimizer_cls_and_kwargs`), with `train.weight_decay` on every
group but the no-decay B group (PEFT's own default is no decay). The param groups are always the same four, in the
same order (A; LoRA embeddings; B with decay; B and 1-d parameters without decay), built from the model alone, so a
resumed run's optimizer has the groups of the checkpoint's `optimizer.pt` and its state loads into them.

The Trainer subclass calls `loraplus_optimizer` from `create_optimizer` (hf_trainer.py).

Only for the sft stage, and not with DeepSpeed or FSDP (`check_loraplus`, before the model loads): DeepSpeed
builds its own optimizer when its config names one and ZeRO-3 empties the parameters that PEFT sorts by shape;
FSDP1 flattens them under new names.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import UserError

if TYPE_CHECKING:
    import torch
    from transformers import TrainingArguments

    from ..config import TrainConfig


def check_loraplus(t: TrainConfig) -> None:
    """A UserError when `train.loraplus_lr_ratio` is combined with what it cannot work with: a sharding engine, or a
    preference stage (whose TRL trainer is built without it)."""
    if t.loraplus_lr_ratio is not None and t.stage != "sft":
        raise UserError(f"train.loraplus_lr_ratio is built for the sft stage; the {t.stage} stage (TRL's trainer) "
                        "does not take it yet: leave it out for this stage")
    if t.loraplus_lr_ratio is not None and t.distributed != "ddp":
        raise UserError(f"train.loraplus_lr_ratio needs train.distributed: ddp (it is {t.distributed}): LoRA+ sorts "
                        "the adapter's parameters by name and shape, which DeepSpeed and FSDP repartition. Use ddp "
                        "(a LoRA adapter fits each GPU), or leave train.loraplus_lr_ratio out")


def loraplus_optimizer(model: Any, args: TrainingArguments, ratio: float) -> torch.optim.Optimizer:
    """The LoRA+ optimizer of `model` (a PeftModel): learning rate `args.learning_rate` for A matrices,
    `ratio` x that for B matrices (and 1-d trained parameters), as PEFT groups them."""
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    if not isinstance(optimizer_cls, type) or "params" in kwargs:
        raise UserError(f"train.loraplus_lr_ratio cannot be combined with train.optim {args.optim}: that optimizer "
                        "chooses its own parameter groups. Use adamw_torch (the default) or leave the ratio out")
    settings: dict[str, Any] = {k: v for k, v in kwargs.items() if k != "lr"}
    return create_loraplus_optimizer(model, optimizer_cls, lr=args.learning_rate,
                                     loraplus_lr_ratio=ratio, loraplus_weight_decay=args.weight_decay, **settings)
