"""What happens to one training batch: shuffled index batches, augmentation, distillation loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clafuse.errors import DataError
from clafuse.training.config import AUGMENTATIONS


def num_batches(n: int, batch_size: int) -> int:
    count = -(-n // batch_size)
    return count - 1 if count > 1 and n % batch_size == 1 else count


def shuffled_batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Shuffled index batches; a trailing batch of one sample is dropped (batch norm cannot train on it)."""
    perm = torch.randperm(n, generator=gen)
    return list(perm.split(batch_size))[: num_batches(n, batch_size)]


def augment_batch(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Randomly crop (after zero padding) and, for ``crop-flip``, horizontally flip each image of an
    (N, C, H, W) batch. Random numbers come from the CPU generator ``gen``; ``none`` draws nothing."""
    return augment_part(x, mode, gen, len(x) if x.ndim else 0, slice(None))


def augment_part(x: torch.Tensor, mode: str, gen: torch.Generator, total: int, rows: slice) -> torch.Tensor:
    """Augment ``x``, the ``rows`` of a batch of ``total`` images: the random numbers are drawn for the
    whole batch, so every rank of a data-parallel run draws the same and each image gets what it
    would get in one process."""
    if mode == "none":
        return x
    if mode not in AUGMENTATIONS:
        raise DataError(f"unknown augmentation {mode!r} (valid: {', '.join(AUGMENTATIONS)})")
    if x.ndim != 4:
        raise DataError(f"augmentation needs image batches shaped (N, C, H, W), got {list(x.shape)}")
    n, _, h, w = x.shape
    pad = 4 if min(h, w) >= 28 else 2
    off_y = torch.randint(0, 2 * pad + 1, (total,), generator=gen)[rows].to(x.device)
    off_x = torch.randint(0, 2 * pad + 1, (total,), generator=gen)[rows].to(x.device)
    flip = (torch.rand(total, generator=gen)[rows] < 0.5).to(x.device) if mode == "crop-flip" else None
    padded = F.pad(x, (pad, pad, pad, pad))
    rows_idx = off_y[:, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = off_x[:, None] + torch.arange(w, device=x.device)  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows_idx[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip is not None:
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out.contiguous()


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, alpha: float,
                      temperature: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, y)``."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1), log_target=True,
                  reduction="batchmean")
    return alpha * t * t * kl + (1 - alpha) * F.cross_entropy(student, y, label_smoothing=label_smoothing)
