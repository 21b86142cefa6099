"""The papers' optimisation: SGD with momentum and weight decay, and the learning-rate schedules."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

import models
from pipeline.config import Recipe


def make_optimizer(network: nn.Module, recipe: Recipe) -> torch.optim.SGD:
    # fused: one kernel for all parameters, and with fp16's GradScaler the skip-on-overflow check stays
    # on the device instead of reading found_inf every step.
    return torch.optim.SGD(parameter_groups(network, recipe), lr=recipe.lr, momentum=recipe.momentum, fused=True)


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, criterion: nn.Module,
             images: torch.Tensor, labels: torch.Tensor,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step; (the loss, the logits). The benchmarks time this same step. A disabled scaler
    (CPUs, bf16) passes the loss and the step through unchanged."""
    with autocast():
        # GoogLeNet adds its auxiliary classifiers' losses in training.
        loss, logits = models.training_loss(model(images), labels, criterion)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss, logits


def parameter_groups(network: nn.Module, recipe: Recipe) -> list[dict]:
    """Weight decay on every parameter, or (decay_norm_and_bias false) not on the 1-D ones: batch-norm
    weights and biases, and every layer's bias."""
    if recipe.decay_norm_and_bias:
        return [{"params": list(network.parameters()), "weight_decay": recipe.weight_decay}]
    return [
        {"params": [p for p in network.parameters() if p.ndim > 1], "weight_decay": recipe.weight_decay},
        {"params": [p for p in network.parameters() if p.ndim <= 1], "weight_decay": 0.0},
    ]


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, epochs: int):
    if recipe.schedule == "plateau":
        # mode "min" on validation top-1 error: the papers' "divide by 10 when it stops improving".
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=0.1, patience=recipe.plateau_patience
        )
    if recipe.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=recipe.step_size, gamma=recipe.step_gamma)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)


def step_schedule(scheduler, recipe: Recipe, val_top1_error: float) -> None:
    """Once per epoch, after evaluation: plateau watches the validation error, the others count epochs."""
    if recipe.schedule == "plateau":
        scheduler.step(val_top1_error)
    else:
        scheduler.step()
