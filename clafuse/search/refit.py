"""Fit of a fused network's linear head to the parents' ensemble predictions.

The head's inputs are recorded once on the calibration build part with a forward hook; the head
alone is then replaced by the multinomial logistic regression onto the ensemble's soft
predictions there (cross-entropy to the weighted average of the parents' softmax outputs, a
ridge term pulling towards the current head), solved to convergence by L-BFGS. The problem is
convex and the rest of the network is untouched: no gradient flows through the body, so this is
a fit of one layer, not training of the network. Label-free: the ensemble is the teacher. It
works on any torch module whose output comes from an ``nn.Linear`` (named, or found as the last
one), whatever the family.

The soft-target fit replaced a least-squares fit to centred logits: on the MNIST MLP pairs the
least-squares head lowered parent B's test accuracy by 0.25 points on average (97.46 -> 97.21%),
the soft-target head raised it (97.50%), as it fits what the search scores (KL to the ensemble).
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
from torch import nn

from clafuse.errors import ClafuseError
from clafuse.search.scoring import ensemble_probs

BATCH = 256
"""Samples per forward pass when outputs are scored or a head's inputs recorded: a Fashion-MNIST
ResNet ran 2,000 images in 1.9 s in batches of 256 and in 5.0 s in one batch (one thread)."""

RIDGE = 1e-2
"""The head fit's pull towards the current head, relative to the mean squared input feature. On
the MNIST MLP pairs (2,000 and 10,000 samples) 1e-4, 1e-3 and 1e-2 gave the same accuracies within
0.1 point; 1e-2 converges in ~50 L-BFGS iterations instead of 200-500."""

MAX_ITERATIONS = 500


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
    """The head refit's target: the parents' ensemble prediction on ``x`` (the ensemble the search
    scores against, whatever the fusion's mixing weights): equal weights, or ``weights`` (e.g.
    one-hot on a teacher)."""
    return ensemble_probs([outputs(p, x) for p in parents], list(weights or [1.0] * len(parents)))


def _soft_target_fit(h: torch.Tensor, target: torch.Tensor, start: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin over W of mean cross-entropy(target, softmax(h W^T)) + lam/2 ||W - start||^2, in
    float64, with lam = ``ridge`` times the mean squared input feature (so the pull does not depend
    on the features' scale). Solved by SciPy's L-BFGS-B with the exact gradient (torch's LBFGS
    would import torch._dynamo on first use: one more second of start-up per command). SciPy's
    optimizers are imported here, not with the module: ``fuse`` imports this module on every run,
    and a fusion of equal widths otherwise never loads them (transport.py keeps them off that path)."""
    from scipy.optimize import minimize

    lam = ridge * float((h * h).mean())
    shape, count = start.shape, len(h)

    def loss_and_grad(flat: np.ndarray) -> tuple[float, np.ndarray]:
        weight = torch.from_numpy(flat).view(shape)
        log_q = torch.log_softmax(h @ weight.T, -1)
        diff = weight - start
        value = -(target * log_q).sum() / count + 0.5 * lam * float((diff * diff).sum())
        grad = (log_q.exp() - target).T @ h / count + lam * diff
        return float(value), grad.reshape(-1).numpy()

    solved = minimize(loss_and_grad, start.reshape(-1).numpy().copy(), jac=True, method="L-BFGS-B",
                      options={"maxiter": MAX_ITERATIONS, "gtol": 1e-10, "ftol": 1e-14, "maxcor": 20})
    return torch.from_numpy(solved.x).view(shape).clone()


@torch.no_grad()
def refit_linear(module: nn.Module, layer: str, inputs: torch.Tensor, target: torch.Tensor,
                 ridge: float = RIDGE) -> nn.Module:
    """A copy of ``module`` whose Linear ``layer`` is the soft-target logistic regression of
    ``target`` (N, out; probabilities, rows summing to 1) from ``inputs`` (N, in; e.g. from
    :func:`record_inputs`), the bias included when the layer has one. The ridge term pulls towards
    the current weights, so few samples or collinear features keep them.
    """
    head = module.get_submodule(layer)
    if not isinstance(head, nn.Linear):
        raise ClafuseError(f"{layer} is a {type(head).__name__}, not a Linear layer: it cannot be refit")
    if inputs.shape[1] != head.in_features or target.shape[1] != head.out_features or len(inputs) != len(target):
        raise ClafuseError(f"refit of {layer}: inputs {tuple(inputs.shape)} and target {tuple(target.shape)} do not "
                           f"fit a Linear({head.in_features}, {head.out_features})")
    target = target.double()
    if bool((target < 0).any()) or not torch.allclose(target.sum(-1), torch.ones(len(target), dtype=target.dtype),
                                                        atol=1e-6):
        raise ClafuseError(f"refit of {layer}: the target must be class probabilities (non-negative rows summing "
                           "to 1), e.g. from ensemble_teacher")
    h = inputs.double()
    start = head.weight.double()
    if head.bias is not None:
        h = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1)
        start = torch.cat([start, head.bias.double()[:, None]], 1)
    solved = _soft_target_fit(h, target, start, ridge)
    out = copy.deepcopy(module)
    new = out.get_submodule(layer)
    if head.bias is not None:
        new.bias.copy_(solved[:, -1].to(new.bias.dtype))
        solved = solved[:, :-1]
    new.weight.copy_(solved.to(new.weight.dtype))
    return out


def refit_head(module: nn.Module, x: torch.Tensor, target: torch.Tensor, layer: str | None = None,
               ridge: float = RIDGE) -> nn.Module:
    """:func:`refit_linear` of ``module``'s head (``layer``, by default :func:`last_linear`) so
    that its predictions on ``x`` match ``target``; the inputs are recorded by a forward hook."""
    layer = layer or last_linear(module)
    return refit_linear(module, layer, record_inputs(module, layer, x), target, ridge)
