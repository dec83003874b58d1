"""Loading checkpoints with their architecture, and ``inspect``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

import torch
from pydantic import BaseModel

from clafuse.arch.base import Family, Group
from clafuse.arch.registry import resolve
from clafuse.errors import ClafuseError, DataError
from clafuse.io.atomic import sha256_file
from clafuse.io.checkpoint import load_checkpoint, open_checkpoint
from clafuse.io.hf_folder import HFFolder, is_hf_folder, read_hf_folder
from clafuse.io.lazy import LazyStateDict


@dataclass
class LoadedModel:
    """A checkpoint with its family and spec."""

    path: Path
    state_dict: Mapping[str, torch.Tensor]
    family: Family
    spec: BaseModel
    folder: HFFolder | None = None
    """The Hugging Face model folder the checkpoint was read from, if it was one."""

    @property
    def weights_path(self) -> Path:
        """The file holding the weights (the folder's weights file for a model folder)."""
        return self.folder.weights if self.folder is not None else self.path

    @cached_property
    def sha256(self) -> str:
        return sha256_file(self.weights_path)

    @cached_property
    def groups(self) -> list[Group]:
        return self.family.groups(self.spec)

    @property
    def depth(self) -> int:
        return sum(len(g.layers) for g in self.groups)

    def layer_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.family.layer_outputs(self.spec, self.state_dict, x)

    def module(self) -> torch.nn.Module:
        """The plain-torch model with the checkpoint loaded strictly."""
        return self.family.instantiate(self.spec, {k: v.clone() for k, v in self.state_dict.items()})


def read_weights(path: str | os.PathLike, lazy: bool = False) -> tuple[Mapping[str, torch.Tensor], HFFolder | None]:
    """The tensors of a checkpoint file or Hugging Face model folder (and the folder, if it is one)."""
    if is_hf_folder(path):
        folder = read_hf_folder(path, lazy=lazy)
        return folder.state_dict, folder
    return (open_checkpoint(path) if lazy else load_checkpoint(path)), None


def skeleton(state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """What detection and checks read of a state dict: shapes and dtypes, no values of a lazy one."""
    return state_dict.skeleton() if isinstance(state_dict, LazyStateDict) else state_dict


def load_model(path: str | os.PathLike, arch: str | os.PathLike | None = None,
               allow_nonfinite: bool = True, lazy: bool = False) -> LoadedModel:
    """Read a checkpoint (a file, or a Hugging Face model folder whose ``config.json`` helps tell
    its architecture) and find its architecture (from ``arch`` if given, else detected). With
    ``lazy``, a safetensors checkpoint is only opened: tensors are read when used."""
    state_dict, folder = read_weights(path, lazy)
    family, spec = resolve(skeleton(state_dict), arch, folder.config if folder is not None else None)
    if not allow_nonfinite:
        bad = nonfinite_keys(state_dict)
        if bad:
            raise ClafuseError(f"{path}: {bad[0]} has NaN or Inf values"
                               + (f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""))
    return LoadedModel(Path(path), state_dict, family, spec, folder)


def nonfinite_keys(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of floating-point tensors holding NaN or Inf: exactly those whose float64 sum is not
    finite (it cannot overflow), which is cheaper than an element-wise test."""
    return [k for k, v in state_dict.items()
            if v.is_floating_point() and not bool(torch.isfinite(v.sum(dtype=torch.float64)))]


def inspect_checkpoint(path: str | os.PathLike, arch: str | os.PathLike | None = None) -> dict[str, Any]:
    """Family, depth, alignable layers, parameter counts and dtypes of a checkpoint."""
    model = load_model(path, arch)
    dtypes: dict[str, int] = {}
    for v in model.state_dict.values():
        name = str(v.dtype).removeprefix("torch.")
        dtypes[name] = dtypes.get(name, 0) + v.numel()
    return {
        "path": str(path),
        "sha256": model.sha256,
        "family": model.family.name,
        "depth": model.depth,
        "groups": [{"name": g.name, "layers": [{"name": l.name, "width": l.width, "params": l.params, "kind": l.kind}
                                               for l in g.layers]} for g in model.groups],
        "total_params": sum(v.numel() for v in model.state_dict.values() if v.is_floating_point()),
        "tensors": len(model.state_dict),
        "dtypes": dtypes,
        "nonfinite": nonfinite_keys(model.state_dict),
        "spec": model.spec.model_dump(mode="json"),
    }


def check_fits(model: LoadedModel, x: torch.Tensor, what: str) -> None:
    """Raise DataError unless ``model`` accepts inputs shaped like ``x``."""
    try:
        with torch.no_grad():
            model.family.forward(model.spec, model.state_dict, x[:2])
    except RuntimeError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{what}: inputs of shape {tuple(x.shape[1:])} per sample do not fit {model.path} "
                        f"({reason})") from None
