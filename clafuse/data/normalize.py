"""Standardising inputs from files and folders (``--normalize MEAN,STD``), and the warning when
inputs look like raw pixels although the model most likely expects standardised ones.

Files and folders are used as they are: ``.npz`` arrays as stored, images as pixels in [0, 1].
A model trained on standardised inputs (the built-in ``mnist`` and ``fashion-mnist`` sets are
standardised with their pixel mean and std) then sees inputs it was not trained on and its
accuracy is meaningless. ``--normalize`` gives the per-channel mean and std, in the data's own
units: ``(x - mean) / std`` per channel. :func:`raw_pixel_warning` spots the common mistake: inputs
shaped like a standardised built-in set whose values are 0-255 integers or lie in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from clafuse.data.builtin import STANDARDISE
from clafuse.data.common import Dataset
from clafuse.errors import DataError

PRESETS = {  # name: (mean per channel, std per channel), for pixels in [0, 1]
    "mnist": ((STANDARDISE["mnist"][0],), (STANDARDISE["mnist"][1],)),
    "fashion-mnist": ((STANDARDISE["fashion-mnist"][0],), (STANDARDISE["fashion-mnist"][1],)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# Per-sample shapes of the built-in sets that are standardised, and their names.
_STANDARDISED_SHAPES = {(1, 28, 28): "mnist or fashion-mnist", (784,): "mnist or fashion-mnist"}


@dataclass(frozen=True)
class Normalization:
    """``(x - mean) / std`` per channel (dimension 1); one value applies to every channel."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def parse(cls, text: str | None) -> "Normalization | None":
        """From ``MEAN,STD`` (one channel or all), ``M1,M2,M3,S1,S2,S3`` (means, then stds, one per
        channel) or a preset name (mnist, fashion-mnist, cifar10, imagenet: pixels in [0, 1])."""
        if text is None:
            return None
        name = text.strip().lower()
        if name in PRESETS:
            return cls(*PRESETS[name])
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            values = []
        if len(values) < 2 or len(values) % 2:
            raise DataError(f"--normalize: {text!r} is not MEAN,STD (or the means then the stds, one per channel, "
                            f"or one of {', '.join(PRESETS)})")
        half = len(values) // 2
        mean, std = tuple(values[:half]), tuple(values[half:])
        if not all(math.isfinite(v) for v in values) or any(s <= 0 for s in std):
            raise DataError(f"--normalize: means must be finite and stds positive, got {text!r}")
        return cls(mean, std)

    def to_list(self) -> list[list[float]]:
        return [list(self.mean), list(self.std)]

    @classmethod
    def from_list(cls, value: list[list[float]] | None) -> "Normalization | None":
        return None if value is None else cls(tuple(value[0]), tuple(value[1]))

    def apply(self, x: torch.Tensor, source: str) -> torch.Tensor:
        """``x`` standardised per channel; refuse a channel count that does not match."""
        channels = len(self.mean)
        if channels > 1 and (x.dim() < 2 or x.shape[1] != channels):
            raise DataError(f"--normalize gives {channels} channels but the inputs of {source} have shape "
                            f"{tuple(x.shape[1:])} per sample")
        shape = (1, channels, *([1] * (x.dim() - 2))) if channels > 1 else (1,)
        mean = torch.tensor(self.mean, dtype=x.dtype).reshape(shape)
        std = torch.tensor(self.std, dtype=x.dtype).reshape(shape)
        return (x - mean) / std


def normalized(ds: Dataset, norm: Normalization | None) -> Dataset:
    """``ds`` with its inputs standardised by ``norm`` (unchanged for None)."""
    if norm is None:
        return ds
    return Dataset(x=norm.apply(ds.x, ds.name), y=ds.y, name=ds.name)


def raw_pixel_warning(x: torch.Tensor, source: str) -> str | None:
    """A warning when inputs shaped like a standardised built-in set look like raw pixels (0-255
    integers, or values in [0, 1]); None otherwise. Looks at the first 1000 samples."""
    shape = tuple(x.shape[1:])
    if shape not in _STANDARDISED_SHAPES or x.shape[0] == 0:
        return None
    head = x[:1000]
    low, high = float(head.min()), float(head.max())
    if low < 0:
        return None
    mean, std = STANDARDISE["mnist"]
    if high > 1.5 and high <= 255 and bool(torch.equal(head, head.round())):
        what, units = "raw 0-255 pixels", 255.0
    elif high <= 1.0:
        what, units = "pixels in [0, 1]", 1.0
    else:
        return None
    return (f"data {source}: the inputs look like {what}, but models for {_STANDARDISED_SHAPES[shape]}-shaped "
            f"inputs are usually trained on standardised ones (clafuse's built-in sets are); if this model was, "
            f"pass --normalize {mean * units:.4g},{std * units:.4g} (MNIST; Fashion-MNIST: "
            f"{STANDARDISE['fashion-mnist'][0] * units:.4g},{STANDARDISE['fashion-mnist'][1] * units:.4g})")
