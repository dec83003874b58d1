"""Evaluating classifiers: logits, accuracy and loss of one model or of a prediction ensemble."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clafuse import distributed as ddp
from clafuse.data import Dataset
from clafuse.errors import DataError


def device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def checked_forward(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Run ``model`` on one batch, turning a shape mismatch into a one-line DataError."""
    try:
        out = model(batch)
    except RuntimeError as exc:
        if ddp.is_peer_failure(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"the model cannot take inputs of shape {list(batch.shape[1:])}: {first}") from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != batch.shape[0]:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(f"the model must return (batch, classes) logits, got {shape}")
    return out


def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits of ``model`` on ``x`` in eval mode without gradients, batched; returned on the CPU.

    The model's train/eval mode is restored afterwards.
    """
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    device = device_of(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if len(x) == 0:
                return checked_forward(model, x.to(device)).cpu()
            outs = [checked_forward(model, x[i : i + batch_size].to(device)).float().cpu()
                    for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outs)


def checked_labels(ds: Dataset, num_outputs: int) -> torch.Tensor:
    if ds.y is None:
        raise DataError(f"{ds.name} has no labels, so accuracy cannot be measured")
    classes = ds.num_classes or 0
    if classes > num_outputs:
        raise DataError(f"{ds.name} has labels up to {classes - 1} but the model has only {num_outputs} outputs")
    return ds.y


def _metrics(log_probs: torch.Tensor, y: torch.Tensor) -> dict:
    return {
        "accuracy": float((log_probs.argmax(dim=1) == y).double().mean()),
        "loss": float(F.nll_loss(log_probs.double(), y)),
        "num_samples": int(len(y)),
    }


def evaluate(model: nn.Module, ds: Dataset, batch_size: int = 1024) -> dict:
    """Accuracy (fraction correct), mean cross-entropy ``loss`` and ``num_samples`` of ``model`` on ``ds``."""
    logits = predict_logits(model, ds.x, batch_size)
    y = checked_labels(ds, logits.shape[1])
    return _metrics(F.log_softmax(logits.double(), dim=1), y)


def evaluate_ensemble(models: Sequence[nn.Module], ds: Dataset, batch_size: int = 1024) -> dict:
    """Metrics of the prediction ensemble that averages the models' softmax probabilities.

    ``loss`` is the negative log-likelihood of the averaged probabilities.
    """
    if len(models) == 0:
        raise DataError("an ensemble needs at least one model")
    log_probs = []
    for model in models:
        logits = predict_logits(model, ds.x, batch_size)
        if log_probs and logits.shape[1] != log_probs[0].shape[1]:
            raise DataError(
                f"ensemble members disagree on the number of classes ({log_probs[0].shape[1]} vs {logits.shape[1]})"
            )
        log_probs.append(F.log_softmax(logits.double(), dim=1))
    y = checked_labels(ds, log_probs[0].shape[1])
    mean_log_prob = torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(log_probs))
    return _metrics(mean_log_prob, y)


def evaluate_sharded(model: nn.Module, ds: Dataset, rank: int, world: int) -> dict:
    """:func:`evaluate` in a data-parallel run: each rank predicts its part of ``ds`` and the loss and
    correct counts are summed over the ranks, so every rank gets the same metrics."""
    rows = ddp.part(len(ds), rank, world)
    logits = predict_logits(model, ds.x[rows])
    y = checked_labels(ds, logits.shape[1])[rows]
    log_probs = F.log_softmax(logits.double(), dim=1)
    nll, correct = ddp.all_reduce_sum([float(F.nll_loss(log_probs, y, reduction="sum")),
                                       int((log_probs.argmax(dim=1) == y).sum())])
    return {"accuracy": correct / len(ds), "loss": nll / len(ds), "num_samples": len(ds)}
