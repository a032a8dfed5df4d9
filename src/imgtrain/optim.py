"""Optimizer, parameter groups and the per-step LR schedule (linear warmup, then cosine, step or constant).

The optimizers and schedules are registered under the names the config accepts (registry.py)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from imgtrain.config import OptimizationConfig, TrainingConfig
from imgtrain.registry import LR_SCHEDULES, OPTIMIZERS

log = logging.getLogger(__name__)


def scaled_lr(training: TrainingConfig, global_batch: int) -> float:
    """Linear scaling rule (Goyal et al. 2017): base_lr is quoted for ``lr_reference_batch`` images."""
    return training.base_lr * global_batch / training.lr_reference_batch


def param_groups(model: nn.Module, weight_decay: float, no_decay_norm_bias: bool) -> list[dict]:
    if not no_decay_norm_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
    no_decay_ids: set[int] = set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            # Biases, norm scales and 1-d tensors such as ViT's class token / position embedding scale.
            if isinstance(module, norm_types) or pname.endswith("bias") or p.ndim <= 1:
                no_decay_ids.add(id(p))
    decay = [p for p in model.parameters() if p.requires_grad and id(p) not in no_decay_ids]
    no_decay = [p for p in model.parameters() if p.requires_grad and id(p) in no_decay_ids]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@OPTIMIZERS.register("sgd")
def _sgd(groups: list[dict], lr: float, c: OptimizationConfig, **impl: bool) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=c.momentum, nesterov=c.nesterov, **impl)


@OPTIMIZERS.register("adamw")
def _adamw(groups: list[dict], lr: float, c: OptimizationConfig, **impl: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(c.betas), **impl)


# torch's keyword for each implementation; "auto" leaves torch's choice (foreach where supported).
_IMPLEMENTATIONS: dict[str, dict[str, bool]] = {
    "auto": {},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "for_loop": {"foreach": False},
}


def create_optimizer(model: nn.Module, cfg: OptimizationConfig, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.no_weight_decay_on_norm_bias)
    return OPTIMIZERS[cfg.optimizer](groups, lr, cfg, **_IMPLEMENTATIONS[cfg.optimizer_impl])


@dataclass(frozen=True)
class LRSchedule:
    """LR multiplier as a pure function of training progress in epochs (a float: 2.5 is half-way
    through the third epoch). Being a function of progress rather than of a step counter, it stays
    right when the world size, and with it the number of steps per epoch, changes on an elastic restart,
    and it needs no state of its own in a checkpoint."""

    epochs: float
    warmup_epochs: float
    kind: str = "cosine"
    warmup_start_factor: float = 0.0
    min_factor: float = 0.0
    milestones: tuple[float, ...] = ()  # epochs, for kind="step"
    gamma: float = 0.1

    def __call__(self, progress: float) -> float:
        if progress < self.warmup_epochs:
            return self.warmup_start_factor + (1.0 - self.warmup_start_factor) * progress / self.warmup_epochs
        return LR_SCHEDULES[self.kind](self, progress)


@LR_SCHEDULES.register("cosine")
def _cosine(s: LRSchedule, progress: float) -> float:
    span = max(1e-12, s.epochs - s.warmup_epochs)
    t = min(1.0, (progress - s.warmup_epochs) / span)
    return s.min_factor + (1.0 - s.min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))


@LR_SCHEDULES.register("step")
def _step(s: LRSchedule, progress: float) -> float:
    return s.gamma ** sum(1 for m in s.milestones if progress >= m)


@LR_SCHEDULES.register("constant")
def _constant(s: LRSchedule, progress: float) -> float:
    return 1.0


def create_schedule(training: TrainingConfig) -> LRSchedule:
    warmup = float(training.warmup_epochs)
    if warmup > 0 and warmup >= training.epochs:
        # A recipe's warmup (5 epochs) in a short run (training.epochs=1) would never reach the peak LR:
        # warm up over the first half of the run instead, the schedule's decay over the second.
        warmup = training.epochs / 2
        log.warning(
            "training.warmup_epochs=%g is not shorter than the run (training.epochs=%d): warming up "
            "over the first %g epochs instead",
            training.warmup_epochs,
            training.epochs,
            warmup,
        )
    return LRSchedule(
        epochs=float(training.epochs),
        warmup_epochs=warmup,
        kind=training.lr_schedule,
        warmup_start_factor=training.warmup_start_factor,
        min_factor=training.min_lr_factor,
        milestones=tuple(float(e) for e in training.lr_step_epochs),
        gamma=training.lr_step_gamma,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
