"""Finetuning settings, their checks, and the optimizer and precision they ask for."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from clafuse.errors import ClafuseError, DataError
from clafuse.options import (Augmentation, Optimizer, Precision, Schedule, check_choice, check_integer, check_number,
                             check_seed, choices)

SCHEDULES = choices(Schedule)
OPTIMIZERS = choices(Optimizer)
AUGMENTATIONS = choices(Augmentation)
PRECISIONS = choices(Precision)
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class FinetuneConfig:
    """Finetuning settings. ``cosine`` decays per step to 0 over all steps; ``step`` multiplies the
    rate by 0.1 at half and at three quarters of the epochs; ``warmup_steps`` ramps linearly first.

    ``optimizer`` is ``sgd`` (with ``momentum``/``nesterov``) or ``adamw`` (default betas; momentum
    and nesterov do not apply). ``kd_alpha`` and ``kd_temperature`` only matter when a teacher is
    given: loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, y).
    ``augment``: ``none``, ``crop`` (random crop after zero padding of 2 pixels, 4 for inputs of 28
    pixels or more) or ``crop-flip`` (plus random horizontal flips), for (N, C, H, W) images.
    ``precision``: ``fp32``, or ``bf16``/``fp16`` autocast for forward passes (weights and optimizer
    stay fp32; fp16 needs CUDA and scales the loss with a GradScaler)."""

    epochs: int
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    batch_size: int = 64
    schedule: Schedule = "cosine"
    warmup_steps: int = 0
    seed: int = 0
    optimizer: Optimizer = "sgd"
    label_smoothing: float = 0.0
    kd_alpha: float = 0.5
    kd_temperature: float = 4.0
    augment: Augmentation = "none"
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        check_integer("--epochs", self.epochs, at_least=1, error=DataError)
        check_number("--lr", self.lr, above=0.0, error=DataError)
        check_number("--momentum", self.momentum, at_least=0.0, below=1.0, error=DataError)
        if not isinstance(self.nesterov, bool):
            raise DataError(f"--nesterov must be True or False, got {self.nesterov!r}")
        if self.nesterov and self.momentum == 0:
            raise DataError("nesterov momentum needs momentum > 0")
        check_number("--weight-decay", self.weight_decay, at_least=0.0, error=DataError)
        check_integer("--batch-size", self.batch_size, at_least=1, error=DataError)
        check_choice("--schedule", self.schedule, Schedule, error=DataError)
        check_integer("--warmup-steps", self.warmup_steps, at_least=0, error=DataError)
        check_seed("--seed", self.seed, error=DataError)
        check_choice("--optimizer", self.optimizer, Optimizer, error=DataError)
        if self.nesterov and self.optimizer != "sgd":
            raise DataError("nesterov momentum applies to the sgd optimizer only")
        check_number("--label-smoothing", self.label_smoothing, at_least=0.0, below=1.0, error=DataError)
        check_number("--kd-alpha", self.kd_alpha, at_least=0.0, at_most=1.0, error=DataError)
        check_number("--kd-temperature", self.kd_temperature, above=0.0, error=DataError)
        check_choice("--augment", self.augment, Augmentation, error=DataError)
        check_choice("--precision", self.precision, Precision, error=DataError)

    def lr_at(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        """Learning rate for global step ``step`` (0-based) of ``total_steps``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "cosine":
            span = max(total_steps - self.warmup_steps, 1)
            return 0.5 * self.lr * (1 + math.cos(math.pi * (step - self.warmup_steps) / span))
        if self.schedule == "step":
            epoch = step // steps_per_epoch
            if self.epochs == 1:
                return self.lr
            drops = int(epoch >= self.epochs // 2) + int(epoch >= (3 * self.epochs) // 4)
            return self.lr * 0.1**drops
        return self.lr


@dataclass
class FinetuneResult:
    """``best_state``: CPU copy of the weights at ``best_epoch`` (1-based; best val accuracy, earliest on
    ties; the last epoch without val). ``history``: one dict per epoch."""

    best_state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict] = field(default_factory=list)


def make_optimizer(params: list[torch.Tensor], config: FinetuneConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                           weight_decay=config.weight_decay)


def check_precision(precision: str, device: torch.device) -> None:
    """Raise ClafuseError unless ``precision`` can run on ``device``: fp16 autocast needs CUDA (on the
    CPU it is slow and loses accuracy), bf16 on CUDA a GPU that supports it."""
    check_choice("--precision", precision, Precision)
    if precision == "fp16" and device.type != "cuda":
        raise ClafuseError(f"precision fp16 needs a CUDA GPU (this run is on {device.type}); use bf16 on the CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ClafuseError("this GPU does not support bf16; use precision fp16")
