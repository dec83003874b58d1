"""Training states: what ``finetune`` saves after every epoch so an interrupted run can resume."""

from __future__ import annotations

import os

import torch
from torch import nn

from clafuse.errors import ClafuseError
from clafuse.io.atomic import atomic_output

STATE_VERSION = 1


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model``'s weights and buffers."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def save_train_state(path: str | os.PathLike, state: dict) -> None:
    """Write a training state (from ``finetune``'s ``on_state``) atomically with ``torch.save``."""
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def load_train_state(path: str | os.PathLike) -> dict:
    """Read a training state written by :func:`save_train_state` (plain tensors and containers only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ClafuseError(f"no training state to resume at {path}") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user-facing error
        raise ClafuseError(f"cannot read training state {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ClafuseError(f"{path} is not a clafuse training state (version {STATE_VERSION})")
    return state
