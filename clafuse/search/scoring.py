"""How close a fused network's outputs are to what it should compute, on held-out inputs.

Label-free by default: the reference is the parents' weighted ensemble. For classifiers it is the
weighted average of their softmax predictions (as ``evaluate`` ensembles them) and the score the
mean KL(ensemble || fused) in nats, the distillation direction, at the one temperature of the
fused logits that makes it smallest: averaged probabilities are softer than either parent's, so
at temperature 1 the score favoured fusions leaning on whichever parent predicts more softly,
whatever its accuracy (on MNIST it chose the weaker parent's side); for networks whose output is an
embedding, the weighted mean of their outputs and the mean cosine similarity to it. With labels,
accuracy. Every score is reported so that higher is better (``objective``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from clafuse.errors import ClafuseError, DataError

Scoring = Literal["kl", "accuracy", "cosine"]
SCORINGS: tuple[str, ...] = ("kl", "accuracy", "cosine")


def _normalised(weights: Sequence[float], count: int) -> list[float]:
    if len(weights) != count:
        raise ClafuseError(f"{len(weights)} ensemble weights for {count} models")
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ClafuseError("ensemble weights must be non-negative with a positive sum")
    return [float(w) / total for w in weights]


def ensemble_probs(logits: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted average of the parents' softmax predictions, (N, classes) in float64."""
    w = _normalised(weights, len(logits))
    return sum(b * torch.softmax(z.double(), -1) for b, z in zip(w, logits))


def ensemble_mean(outputs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted average of the parents' outputs (embeddings, or logits), in float64."""
    w = _normalised(weights, len(outputs))
    return sum(b * z.double() for b, z in zip(w, outputs))


def kl_to_reference(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples of KL(reference || softmax(logits)) in nats; 0 exactly when they agree."""
    log_q = torch.log_softmax(logits.double(), -1)
    p = reference.double()
    return float((torch.xlogy(p, p) - p * log_q).sum(-1).mean())


_LOG_RANGE = math.log(1e3)  # temperatures from 1e-3 to 1e3


class TemperedKL(NamedTuple):
    """The KL at the best temperature, that temperature, and the plain KL (temperature 1)."""

    kl: float
    temperature: float
    plain: float


def tempered_kl(logits: torch.Tensor, reference: torch.Tensor, steps: int = 60) -> TemperedKL:
    """The smallest mean KL(reference || softmax(logits / T)) over temperatures T in [1e-3, 1e3],
    that T and the plain KL. KL is convex in b = 1/T: its slope is the softmax's mean logit less the
    reference's, its curvature the softmax's logit variance, so safeguarded Newton steps in b
    (bisection where a step leaves the bracket of the slope's sign change) find the minimum in a
    few softmaxes. Temperature 1 is kept where it is as good, so the result never exceeds the
    plain KL."""
    z, p = logits.double(), reference.double()
    target = (p * z).sum(-1).mean()
    tolerance = 1e-12 * max(1.0, abs(float(target)))

    def slope_curvature(b: float) -> tuple[float, float]:
        q = torch.softmax(z * b, -1)
        mean = (q * z).sum(-1, keepdim=True)
        return float(mean.mean() - target), float((q * (z - mean).square()).sum(-1).mean())

    lo, hi = math.exp(-_LOG_RANGE), math.exp(_LOG_RANGE)
    b = 1.0
    for _ in range(steps):
        slope, curvature = slope_curvature(b)
        if slope > 0:
            hi = b
        else:
            lo = b
        if abs(slope) <= tolerance or hi - lo <= 1e-12 * hi:
            break
        step = b - slope / curvature if curvature > 0 else math.nan
        b = step if lo < step < hi else math.sqrt(lo * hi)
    plain, scaled = kl_to_reference(z, p), kl_to_reference(z * b, p)
    return TemperedKL(scaled, 1 / b, plain) if scaled < plain else TemperedKL(plain, 1.0, plain)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).double().mean())


def top1_agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of samples whose top class is the reference's."""
    return float((logits.argmax(-1) == reference.argmax(-1)).double().mean())


def cosine_agreement(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine similarity of each sample's output to the reference's (outputs flattened per
    sample); 1 exactly when every output points the reference's way."""
    return float(F.cosine_similarity(outputs.flatten(1).double(), reference.flatten(1).double(), dim=1).mean())


@dataclass
class Reference:
    """What fused outputs are scored against: the ensemble's soft predictions (``kl``,
    ``accuracy``) or mean output (``cosine``), and the labels when there are any."""

    scoring: str
    target: torch.Tensor
    labels: torch.Tensor | None = None


def make_reference(parent_outputs: Sequence[torch.Tensor], weights: Sequence[float], scoring: str = "kl",
                   labels: torch.Tensor | None = None) -> Reference:
    """The reference for ``scoring`` from the parents' outputs on the held-out inputs."""
    if scoring not in SCORINGS:
        raise ClafuseError(f"unknown scoring {scoring!r}; choose from {', '.join(SCORINGS)}")
    if scoring == "accuracy" and labels is None:
        raise DataError("accuracy scoring needs labels (array 'y') in the calibration data")
    target = ensemble_mean(parent_outputs, weights) if scoring == "cosine" else ensemble_probs(parent_outputs, weights)
    return Reference(scoring, target, labels)


def score_outputs(outputs: torch.Tensor, reference: Reference) -> dict[str, float]:
    """The metrics of ``outputs`` against ``reference``; ``objective`` is the one to maximise
    (-KL, accuracy with -KL breaking ties, or cosine agreement). ``kl`` is the KL at the best
    temperature (``temperature``), ``kl_at_1`` the plain one."""
    if reference.scoring == "cosine":
        cos = cosine_agreement(outputs, reference.target)
        return {"cosine": cos, "objective": cos}
    kl, temperature, plain = tempered_kl(outputs, reference.target)
    out = {"kl": kl, "temperature": temperature, "kl_at_1": plain, "agreement": top1_agreement(outputs, reference.target)}
    if reference.labels is not None:
        out["accuracy"] = accuracy(outputs, reference.labels)
    # Accuracy moves in steps of 1/N; a tiny multiple of -KL orders candidates of equal accuracy.
    out["objective"] = out["accuracy"] - 1e-6 * kl if reference.scoring == "accuracy" else -kl
    return out
