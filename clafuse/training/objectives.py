"""What a finetuning run optimises and selects on: the loss of one batch and the validation metric.

The training loop (:mod:`clafuse.training.loop`) owns the optimizer, schedule, shuffling, data
parallelism, checkpoints of the run and best-epoch selection; an :class:`Objective` owns the data
and says, for a batch of training indices, what the loss is, and, for the model as it stands, how
good it is on validation data. :class:`Classification` is labelled data with cross-entropy or
distillation from a teacher's logits; :mod:`clafuse.training.sentences` distils sentence encoders.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clafuse import distributed as ddp
from clafuse.data import Dataset
from clafuse.errors import DataError
from clafuse.training.batches import augment_part, distillation_loss
from clafuse.training.config import FinetuneConfig
from clafuse.training.evaluation import checked_forward, checked_labels, device_of, evaluate, evaluate_sharded


class Ensemble(nn.Module):
    """Several classifiers as one teacher: the log of their mean softmax prediction (what
    ``clafuse eval`` ensembles), so that distillation follows the ensemble of, e.g., a fused
    model's parents."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.softmax(m(x).float(), dim=-1) for m in self.members]).mean(0)
        return torch.log(probs.clamp_min(1e-30))


class Objective:
    """Training data, loss and validation metric of one finetuning run.

    ``metric`` names the number reported per epoch as ``train_<metric>`` and ``val_<metric>``; the
    epoch with the highest ``val_<metric>`` is kept (the earliest on ties)."""

    metric: str = "accuracy"
    name: str = "training data"
    distill: bool = False
    """Whether a teacher takes part (recorded in saved training states)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def has_val(self) -> bool:
        raise NotImplementedError

    def check(self, config: FinetuneConfig) -> None:
        """Raise DataError when the data cannot train with ``config``."""
        if len(self) < 2:
            raise DataError(f"{self.name} needs at least 2 samples for training")

    def batch_loss(self, net: nn.Module, local: torch.Tensor, rows: slice, total: int,
                   gen: torch.Generator, autocast: torch.autocast) -> tuple[torch.Tensor, float]:
        """Mean loss of this rank's part ``local`` (the ``rows`` of a global batch of ``total``
        indices) and the sum of the per-sample metric over that part. Random numbers for the batch
        come from ``gen``, drawn for the whole global batch so all ranks draw alike."""
        raise NotImplementedError

    def validate(self, model: nn.Module, rank: int, world: int) -> dict[str, float]:
        """``{"loss": ..., "<metric>": ...}`` of ``model`` on the validation data."""
        raise NotImplementedError


class Classification(Objective):
    """Labelled inputs: cross-entropy, or :func:`distillation_loss` from a ``teacher``'s logits;
    the metric is accuracy."""

    def __init__(self, train: Dataset, val: Dataset | None, config: FinetuneConfig,
                 teacher: nn.Module | None = None) -> None:
        self.train, self.val, self.config, self.teacher = train, val, config, teacher
        self.name, self.distill = train.name, teacher is not None
        self.labels_checked = False

    def __len__(self) -> int:
        return len(self.train)

    def has_val(self) -> bool:
        return self.val is not None

    def check(self, config: FinetuneConfig) -> None:
        if self.train.y is None:
            raise DataError(f"{self.train.name} has no labels, so it cannot be used for training")
        super().check(config)
        if config.augment != "none" and self.train.x.ndim != 4:
            raise DataError(f"augmentation needs images shaped (N, C, H, W), {self.train.name} has "
                            f"{list(self.train.x.shape[1:])}")

    def batch_loss(self, net: nn.Module, local: torch.Tensor, rows: slice, total: int,
                   gen: torch.Generator, autocast: torch.autocast) -> tuple[torch.Tensor, float]:
        config, teacher, device = self.config, self.teacher, device_of(net)
        xb, yb = self.train.x[local].to(device), self.train.y[local].to(device)
        xb = augment_part(xb, config.augment, gen, total, rows)
        with ddp.same_on_every_rank():
            with autocast:
                logits = checked_forward(net, xb)
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = checked_forward(teacher, xb.to(device_of(teacher))).to(logits.device)
            logits = logits.float()
            if not self.labels_checked:
                checked_labels(self.train, logits.shape[1])
                if self.val is not None:
                    checked_labels(self.val, logits.shape[1])
                self.labels_checked = True
            if teacher is not None and t_logits.shape[1] != logits.shape[1]:
                raise DataError(f"the teacher has {t_logits.shape[1]} classes but the student "
                                f"has {logits.shape[1]}")
        if len(local) == 0:
            return logits.sum() * 0.0, 0.0  # an empty part still takes part in the gradient all-reduce
        if teacher is not None:
            loss = distillation_loss(logits, t_logits.float(), yb, config.kd_alpha,
                                     config.kd_temperature, config.label_smoothing)
        else:
            loss = F.cross_entropy(logits, yb, label_smoothing=config.label_smoothing)
        return loss, float((logits.detach().argmax(dim=1) == yb).sum())

    def validate(self, model: nn.Module, rank: int, world: int) -> dict[str, float]:
        assert self.val is not None
        if world == 1:
            return evaluate(model, self.val)
        return evaluate_sharded(model, self.val, rank, world)
