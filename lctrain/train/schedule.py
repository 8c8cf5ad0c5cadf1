"""Learning-rate schedule: linear warmup to ``lr``, then a cosine decay to ``min_lr`` at the last step."""
from __future__ import annotations

import math

import torch


def lr_at(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, lr: float, min_lr: float, warmup: int, total: int):
    """A LambdaLR whose factor times ``lr`` (each group's initial lr) follows ``lr_at``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, lr, min_lr, warmup, total) / lr)
