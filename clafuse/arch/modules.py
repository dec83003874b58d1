"""Plain-torch modules whose parameter names follow a checkpoint's own key names."""

from __future__ import annotations

import torch
from torch import nn

from clafuse.arch.layers import ACTIVATIONS


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
    """Linear layers applied in the given order on flattened inputs, each hidden one followed by
    its BatchNorm1d (where ``norms`` names one) and the activation ``activation``."""

    def __init__(self, layers: list[tuple[str, nn.Linear]], norms: dict[str, tuple[str, nn.Module]] | None = None,
                 activation: str = "relu") -> None:
        super().__init__()
        self._order = [name for name, _ in layers]
        self._norms = {linear: name for linear, (name, _) in (norms or {}).items()}
        self._activation = activation
        for name, layer in layers:
            attach(self, name, layer)
        for name, norm in (norms or {}).values():
            attach(self, name, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        last = len(self._order) - 1
        for k, name in enumerate(self._order):
            h = self.get_submodule(name)(h)
            if name in self._norms:
                h = self.get_submodule(self._norms[name])(h)
            if k < last:
                h = ACTIVATIONS[self._activation](h)
        return h


def activation_module(name: str) -> nn.Module:
    """The torch module of activation ``name`` (one of :data:`~clafuse.arch.layers.ACTIVATIONS`)."""
    return {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
            "identity": nn.Identity}[name]()
