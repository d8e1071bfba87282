"""Optimizer with the new-layer learning-rate multiplier, and the per-step learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from trainers.config import OptimConfig


def build_optimizer(model: nn.Module, config: OptimConfig, new_layer_lr_mult: float = 1.0) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW; new layers at `new_layer_lr_mult` x the trunk's rate."""
    new = list(model.new_parameters()) if hasattr(model, "new_parameters") else list(model.parameters())
    new_ids = {id(p) for p in new}
    trunk = [p for p in model.parameters() if id(p) not in new_ids]
    groups = [{"params": group, "lr": config.lr * mult, "lr_mult": mult}
              for group, mult in ((trunk, 1.0), (new, new_layer_lr_mult)) if group]
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
    progress = (epoch - warmup) / (config.epochs - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, steps_per_epoch: int):
    """A per-step LambdaLR following `lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step / steps_per_epoch))
