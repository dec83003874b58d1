"""Finetuning settings, their checks, and the optimizer and precision they ask for."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from clafuse.errors import ClafuseError, DataError

SCHEDULES = ("cosine", "step", "constant")
OPTIMIZERS = ("sgd", "adamw")
AUGMENTATIONS = ("none", "crop", "crop-flip")
PRECISIONS = ("fp32", "bf16", "fp16")
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
    schedule: str = "cosine"
    warmup_steps: int = 0
    seed: int = 0
    optimizer: str = "sgd"
    label_smoothing: float = 0.0
    kd_alpha: float = 0.5
    kd_temperature: float = 4.0
    augment: str = "none"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise DataError(f"epochs must be a positive integer, got {self.epochs}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise DataError(f"learning rate must be positive, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise DataError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            raise DataError("nesterov momentum needs momentum > 0")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise DataError(f"weight decay must be non-negative, got {self.weight_decay}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise DataError(f"batch size must be a positive integer, got {self.batch_size}")
        if self.schedule not in SCHEDULES:
            raise DataError(f"unknown schedule {self.schedule!r} (valid: {', '.join(SCHEDULES)})")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise DataError(f"warmup steps must be a non-negative integer, got {self.warmup_steps}")
        if self.optimizer not in OPTIMIZERS:
            raise DataError(f"unknown optimizer {self.optimizer!r} (valid: {', '.join(OPTIMIZERS)})")
        if self.nesterov and self.optimizer != "sgd":
            raise DataError("nesterov momentum applies to the sgd optimizer only")
        if not (math.isfinite(self.label_smoothing) and 0 <= self.label_smoothing < 1):
            raise DataError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if not (math.isfinite(self.kd_alpha) and 0 <= self.kd_alpha <= 1):
            raise DataError(f"distillation alpha must be in [0, 1], got {self.kd_alpha}")
        if not (math.isfinite(self.kd_temperature) and self.kd_temperature > 0):
            raise DataError(f"distillation temperature must be positive, got {self.kd_temperature}")
        if self.augment not in AUGMENTATIONS:
            raise DataError(f"unknown augmentation {self.augment!r} (valid: {', '.join(AUGMENTATIONS)})")
        if self.precision not in PRECISIONS:
            raise DataError(f"unknown precision {self.precision!r} (valid: {', '.join(PRECISIONS)})")

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
    if precision not in PRECISIONS:
        raise ClafuseError(f"unknown precision {precision!r} (valid: {', '.join(PRECISIONS)})")
    if precision == "fp16" and device.type != "cuda":
        raise ClafuseError(f"precision fp16 needs a CUDA GPU (this run is on {device.type}); use bf16 on the CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ClafuseError("this GPU does not support bf16; use precision fp16")
