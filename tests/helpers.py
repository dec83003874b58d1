"""Builders several test files share: small MLPs and their safetensors checkpoints."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


def mlp(widths: list[int], *, inputs: int = 64, classes: int = 10, seed: int | None = None) -> nn.Sequential:
    """``Flatten, (Linear, ReLU) per hidden width, Linear`` to ``classes``; seeded first when ``seed`` is given."""
    if seed is not None:
        torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for i, o in zip([inputs, *widths], widths):
        layers += [nn.Linear(i, o), nn.ReLU()]
    layers.append(nn.Linear(widths[-1] if widths else inputs, classes))
    return nn.Sequential(*layers)


def save_safetensors(path: Path, weights: nn.Module | Mapping[str, torch.Tensor]) -> Path:
    """Write a module's state dict (or a state dict) to ``path`` as safetensors; returns ``path``."""
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def save_mlp(path: Path, seed: int, widths: list[int] | int, *, inputs: int = 64, classes: int = 10) -> Path:
    """:func:`mlp` (one hidden layer when ``widths`` is an int) saved to ``path``."""
    hidden = [widths] if isinstance(widths, int) else widths
    return save_safetensors(path, mlp(hidden, inputs=inputs, classes=classes, seed=seed))


def without_progress(stderr: str) -> str:
    """``stderr`` without the ``clafuse: progress: ...`` lines that steps longer than a second show
    (how long a step takes depends on the machine's load, so tests of other output ignore them)."""
    return "".join(line for line in stderr.splitlines(keepends=True) if not line.startswith("clafuse: progress: "))
