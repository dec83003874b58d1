"""Plain-torch modules whose parameter names follow a checkpoint's own key names."""

from __future__ import annotations

import torch
from torch import nn


def attach(root: nn.Module, dotted: str, module: nn.Module) -> None:
    """Place ``module`` at ``dotted`` (e.g. ``layers.0``) under ``root``, creating plain containers."""
    parts = dotted.split(".")
    parent = root
    for part in parts[:-1]:
        child = getattr(parent, part, None) if part in parent._modules else None
        if child is None:
            child = nn.Module()
            parent.add_module(part, child)
        parent = child
    parent.add_module(parts[-1], module)


class LinearChain(nn.Module):
    """Linear layers applied in the given order with ReLU between them, on flattened inputs."""

    def __init__(self, layers: list[tuple[str, nn.Linear]]) -> None:
        super().__init__()
        self._order = [name for name, _ in layers]
        for name, layer in layers:
            attach(self, name, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        last = len(self._order) - 1
        for k, name in enumerate(self._order):
            h = self.get_submodule(name)(h)
            if k < last:
                h = torch.relu(h)
        return h
