"""The learning-rate schedule of a training run: linear warm-up and decay over the run's optimizer steps, and how it
continues when an elastic run resumes on another number of workers."""

from __future__ import annotations

import torch


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_ratio: float, total_steps: int):
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)


def continue_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, steps: int) -> None:
    """A step covers world x batch_size rows, so after a change of world size the saved step count would put the
    schedule at another point of the run. Set it to the steps this world size takes to the end of the finished
    epochs: the rate then follows the epochs as an uninterrupted run's does."""
    scheduler.last_epoch = steps
    lrs = [base * fn(steps) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports, as LambdaLR.step() leaves it
