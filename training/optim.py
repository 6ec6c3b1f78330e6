"""The trainer's optimizer and learning-rate rule (warmup, then constant or cosine)."""
from __future__ import annotations

import math

import torch

from training.config import TrainConfig


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise RuntimeError("optim.name=adamw8bit needs bitsandbytes (pip install bitsandbytes); "
                               "or use optim.name=adamw") from err
        return bnb.optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, **kw)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "cosine":
        span = max(1, cfg.run.max_steps - o.warmup_steps)
        progress = min(1.0, (step - o.warmup_steps) / span)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0
