"""Optimizer with the fast group's learning-rate multiplier, the per-step learning-rate schedule, and the
per-epoch weight decay (constant, or one factor per stage of a 'multistep' schedule)."""
from __future__ import annotations

import bisect
import math

import torch
from torch import nn

from trainers.config import OptimConfig


def build_optimizer(model: nn.Module, config: OptimConfig, fast_lr_mult: float = 1.0) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW; the backbone's fast group (`fast_lr_parameters`, e.g.
    ResNet50-CAM's layer4 and classifier) at `fast_lr_mult` x the rate of the rest."""
    fast = list(model.fast_lr_parameters()) if hasattr(model, "fast_lr_parameters") else []
    fast_ids = {id(p) for p in fast}
    rest = [p for p in model.parameters() if id(p) not in fast_ids]
    groups = [{"params": group, "lr": config.lr * mult, "lr_mult": mult}
              for group, mult in ((rest, 1.0), (fast, fast_lr_mult)) if group]
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                               nesterov=config.nesterov and config.momentum > 0)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.momentum, 0.999), weight_decay=config.weight_decay)


def lr_factor(config: OptimConfig, epoch: float) -> float:
    """The learning rate's multiplier at a fractional epoch: warm-up, then the schedule."""
    warmup = config.warmup_fraction * config.epochs
    if epoch < warmup:  # linear from a tenth of the rate
        return 0.1 + 0.9 * epoch / warmup
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "step":
        step = config.step_epochs or max(1, config.epochs // 3)
        return config.gamma ** int(epoch // step)
    if config.schedule == "multistep":
        stage = _stage(config, epoch)
        return config.lr_factors[stage] if config.lr_factors else config.gamma ** stage
    progress = (epoch - warmup) / (config.epochs - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _stage(config: OptimConfig, epoch: float) -> int:
    """Index of the 'multistep' stage that a fractional epoch is in (a milestone starts its stage)."""
    return bisect.bisect_right(config.milestones, epoch)


def weight_decay_factor(config: OptimConfig, epoch: int) -> float:
    """Weight decay's multiplier during an epoch: its stage's factor under 'multistep', else 1."""
    if config.schedule == "multistep" and config.weight_decay_factors:
        return config.weight_decay_factors[_stage(config, epoch)]
    return 1.0


def set_weight_decay(optimizer: torch.optim.Optimizer, config: OptimConfig, epoch: int) -> None:
    """Every group's weight decay for `epoch` (called as the epoch starts, also after a resume)."""
    for group in optimizer.param_groups:
        group["weight_decay"] = config.weight_decay * weight_decay_factor(config, epoch)


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, steps_per_epoch: int):
    """A per-step LambdaLR following `lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step / steps_per_epoch))
