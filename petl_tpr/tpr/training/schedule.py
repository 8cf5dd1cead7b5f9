"""The reference optimiser and learning-rate schedule (REFERENCE.md section 0).

Adam, betas (0.9, 0.999), eps 1e-3, weight decay 4e-5 on weight matrices and 0 on biases,
1-d parameters and scalars (LayerNorm weights, learnable scales). The learning rate is stepped
once per epoch: during the first `warmup_epochs` it rises linearly from `warmup_factor` x lr to
lr, then it follows a half cosine to 0:

    factor(e) = warmup_factor + (1 - warmup_factor) * e / warmup_epochs        e <  warmup_epochs
    factor(e) = (1 + cos(pi * (e - warmup_epochs) / (epochs - warmup_epochs))) / 2   otherwise

with e the 0-based epoch; epoch e runs at lr * factor(e). With the reference values (60 epochs,
5 warm-up, 0.1) the factors are 0.1, 0.28, 0.46, 0.64, 0.82, 1.0, ..., and about 7e-4 at epoch 59.

`warmup_steps` (0 in the reference: off) adds a per-step linear warm-up on top: optimiser step s
(0-based, counted over the whole run) runs at lr * factor(e) * min(1, (s + 1) / warmup_steps).
The per-epoch warm-up is coarse when an epoch is tens of steps; on the demo's pre-training this
option did not help (docs/demo.md), so nothing uses it by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from ..errors import TaskInputError, check_int


@dataclass(frozen=True)
class OptimConfig:
    """Adam and schedule settings; the defaults are the reference values with lr 1e-3 (UP-Person)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-3
    weight_decay: float = 4e-5
    epochs: int = 60
    warmup_epochs: int = 5
    warmup_factor: float = 0.1
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise TaskInputError(f"OptimConfig.lr must be positive, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise TaskInputError(f"OptimConfig.betas must be two values in [0, 1), got {self.betas!r}")
        if not self.eps > 0 or not self.weight_decay >= 0:
            raise TaskInputError(f"OptimConfig.eps must be > 0 and weight_decay >= 0, got eps={self.eps!r}, "
                                 f"weight_decay={self.weight_decay!r}")
        for name in ("epochs", "warmup_epochs", "warmup_steps"):
            check_int(f"OptimConfig.{name}", getattr(self, name), 0)
        if self.epochs < 1 or self.warmup_epochs >= self.epochs:
            raise TaskInputError(f"OptimConfig needs epochs >= 1 and warmup_epochs < epochs, got "
                                 f"epochs={self.epochs}, warmup_epochs={self.warmup_epochs}")
        if not 0.0 < self.warmup_factor <= 1.0:
            raise TaskInputError(f"OptimConfig.warmup_factor must be in (0, 1], got {self.warmup_factor!r}")


def lr_factor(epoch: int, *, epochs: int, warmup_epochs: int, warmup_factor: float) -> float:
    """The multiplier of the base lr for 0-based `epoch` (see the module docstring)."""
    if epoch < warmup_epochs:
        return warmup_factor + (1.0 - warmup_factor) * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / (epochs - warmup_epochs)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def step_warmup_factor(step: int, warmup_steps: int) -> float:
    """The per-step warm-up multiplier of 0-based optimiser step `step` (1 when warmup_steps is 0)."""
    return 1.0 if step >= warmup_steps else (step + 1) / warmup_steps


def param_groups(modules: Iterable[nn.Module], *, weight_decay: float) -> list[dict]:
    """Two Adam groups over the trainable parameters of `modules`, in a fixed order.

    Parameters with 2 or more dimensions get `weight_decay`; biases, 1-d parameters and scalars
    get 0. A parameter shared by several modules is listed once. Groups that would be empty are
    left out; no trainable parameter at all raises `TaskInputError`.
    """
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for name, param in module.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if param.ndim < 2 or name.endswith("bias") else decay).append(param)
    if not seen:
        raise TaskInputError("no trainable parameters: inject adapters (pt.inject) before training")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(modules: Iterable[nn.Module], config: OptimConfig = OptimConfig()) -> torch.optim.Adam:
    """Adam over `param_groups(modules)` with the config's lr, betas and eps."""
    return torch.optim.Adam(param_groups(modules, weight_decay=config.weight_decay), lr=config.lr,
                            betas=tuple(config.betas), eps=config.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig = OptimConfig()
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-epoch warm-up + cosine `LambdaLR`: call `scheduler.step()` once at the end of each epoch."""
    def factor(epoch: int) -> float:
        return lr_factor(epoch, epochs=config.epochs, warmup_epochs=config.warmup_epochs,
                         warmup_factor=config.warmup_factor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
