"""Closed-form correction of a fused network's linear head towards the parents' ensemble.

This is not training: no gradient step is taken. The head's inputs are recorded once on the
calibration build part with a forward hook, and the head is replaced by the ridge least-squares
solution whose outputs are closest to the ensemble's logits there, shrunk towards the current
head. Label-free: the ensemble is the teacher. It works on any torch module whose output comes
from an ``nn.Linear`` (named, or found as the last one), whatever the family.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from clafuse.errors import ClafuseError

BATCH = 256
"""Samples per forward pass when outputs are scored or a head's inputs recorded: a Fashion-MNIST
ResNet ran 2,000 images in 1.9 s in batches of 256 and in 5.0 s in one batch (one thread)."""


def last_linear(module: nn.Module) -> str:
    """The name of the last ``nn.Linear`` in ``module``'s registration order (its head in every
    sequential-style network)."""
    names = [name for name, sub in module.named_modules() if isinstance(sub, nn.Linear)]
    if not names:
        raise ClafuseError("the network has no Linear layer whose weights a head refit could change")
    return names[-1]


@torch.no_grad()
def record_inputs(module: nn.Module, layer: str, x: torch.Tensor, batch_size: int = BATCH) -> torch.Tensor:
    """The inputs ``module``'s sub-module ``layer`` receives when ``module`` runs on ``x``
    (recorded by a forward hook), flattened to (N, features)."""
    sub = module.get_submodule(layer)
    seen: list[torch.Tensor] = []
    handle = sub.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach().flatten(1)))
    try:
        module.eval()
        for start in range(0, len(x), batch_size):
            module(x[start:start + batch_size])
    finally:
        handle.remove()
    return torch.cat(seen)


@torch.no_grad()
def outputs(module: nn.Module, x: torch.Tensor, batch_size: int = BATCH) -> torch.Tensor:
    """``module``'s outputs on ``x`` in eval mode, in batches."""
    module.eval()
    return torch.cat([module(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def ensemble_teacher(parents: Sequence[nn.Module], x: torch.Tensor,
                     weights: Sequence[float] | None = None) -> torch.Tensor:
    """The head refit's target: the ensemble of the parents' centred logits on ``x`` (the
    ensemble the search scores against, whatever the fusion's mixing weights): equal weights, or
    ``weights`` (e.g. one-hot on a teacher)."""
    return teacher_logits([outputs(p, x) for p in parents], list(weights or [1.0] * len(parents)))


def teacher_logits(parent_logits: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """The ensemble's logits for a least-squares fit: the weighted average of the parents' logits,
    each centred per sample (softmax ignores a per-sample shift, least squares would not)."""
    total = float(sum(weights))
    return sum((w / total) * (z.double() - z.double().mean(-1, keepdim=True)) for w, z in zip(weights, parent_logits))


@torch.no_grad()
def refit_linear(module: nn.Module, layer: str, inputs: torch.Tensor, target: torch.Tensor,
                 ridge: float = 1e-3) -> nn.Module:
    """A copy of ``module`` whose Linear ``layer`` is the ridge least-squares fit of ``target``
    (N, out) from ``inputs`` (N, in; e.g. from :func:`record_inputs`), the bias included when the
    layer has one. The ridge term, ``ridge`` times the mean diagonal of the Gram matrix, pulls
    towards the current weights, so few samples or collinear features keep them.
    """
    head = module.get_submodule(layer)
    if not isinstance(head, nn.Linear):
        raise ClafuseError(f"{layer} is a {type(head).__name__}, not a Linear layer: it cannot be refit")
    if inputs.shape[1] != head.in_features or target.shape[1] != head.out_features or len(inputs) != len(target):
        raise ClafuseError(f"refit of {layer}: inputs {tuple(inputs.shape)} and target {tuple(target.shape)} do not "
                           f"fit a Linear({head.in_features}, {head.out_features})")
    h = inputs.double()
    start = head.weight.double()
    if head.bias is not None:
        h = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1)
        start = torch.cat([start, head.bias.double()[:, None]], 1)
    gram = h.T @ h
    lam = ridge * torch.trace(gram) / gram.shape[0]
    solved = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype),
                                h.T @ target.double() + lam * start.T).T
    out = copy.deepcopy(module)
    new = out.get_submodule(layer)
    if head.bias is not None:
        new.bias.copy_(solved[:, -1].to(new.bias.dtype))
        solved = solved[:, :-1]
    new.weight.copy_(solved.to(new.weight.dtype))
    return out


def refit_head(module: nn.Module, x: torch.Tensor, target: torch.Tensor, layer: str | None = None,
               ridge: float = 1e-3) -> nn.Module:
    """:func:`refit_linear` of ``module``'s head (``layer``, by default :func:`last_linear`) so
    that its outputs on ``x`` match ``target``; the inputs are recorded by a forward hook."""
    layer = layer or last_linear(module)
    return refit_linear(module, layer, record_inputs(module, layer, x), target, ridge)
