"""Loading checkpoints with their architecture, and ``inspect``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

import torch
from pydantic import BaseModel

from clafuse.align.mapfile import ModelEntry
from clafuse.api.detection import resolve_keys
from clafuse.arch.base import Family, Group
from clafuse.errors import ClafuseError, DataError
from clafuse.io.atomic import sha256_file
from clafuse.io.checkpoint import load_checkpoint, open_checkpoint
from clafuse.io.keys import KeyMap, KeyPlan


@dataclass
class LoadedModel:
    """A checkpoint with its family and spec; ``state_dict`` holds the names the family knows and
    ``plan`` (None: names as read) how they came from the checkpoint's own."""

    path: Path
    state_dict: Mapping[str, torch.Tensor]
    family: Family
    spec: BaseModel
    plan: KeyPlan | None = field(default=None)

    @property
    def keys(self) -> KeyMap:
        """The key handling applied to the checkpoint's names (identity when none)."""
        return self.plan.keys if self.plan is not None else KeyMap()

    @property
    def ignored(self) -> list[str]:
        """Names (as read) of the tensors the key handling left out."""
        return list(self.plan.ignored) if self.plan is not None else []

    @cached_property
    def sha256(self) -> str:
        return sha256_file(self.path)

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


def load_model(path: str | os.PathLike, arch: str | os.PathLike | None = None,
               allow_nonfinite: bool = True, lazy: bool = False, keys: KeyMap | None = None) -> LoadedModel:
    """Read a checkpoint, apply the key handling ``keys`` and find its architecture (from ``arch``
    if given, else detected; a prefix all names share is stripped when the rest then fits, see
    :func:`~clafuse.api.detection.resolve_keys`). With ``lazy``, a safetensors checkpoint is only
    opened: tensors are read when used."""
    raw = open_checkpoint(path) if lazy else load_checkpoint(path)
    resolved = resolve_keys(raw, keys, arch, str(path))
    state_dict, family, spec = resolved.state_dict, resolved.family, resolved.spec
    if not allow_nonfinite:
        bad = nonfinite_keys(state_dict)
        if bad:
            raise ClafuseError(f"{path}: {bad[0]} has NaN or Inf values"
                               + (f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""))
    return LoadedModel(Path(path), state_dict, family, spec, resolved.plan)


def nonfinite_keys(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of floating-point tensors holding NaN or Inf: exactly those whose float64 sum is not
    finite (it cannot overflow), which is cheaper than an element-wise test."""
    return [k for k, v in state_dict.items()
            if v.is_floating_point() and not bool(torch.isfinite(v.sum(dtype=torch.float64)))]


def inspect_checkpoint(path: str | os.PathLike, arch: str | os.PathLike | None = None,
                       keys: KeyMap | None = None) -> dict[str, Any]:
    """Family, depth, alignable layers, parameter counts and dtypes of a checkpoint, and the key
    handling that made its names fit (with the tensors it left out)."""
    from clafuse import progress

    with progress.step(f"reading {path}"):
        model = load_model(path, arch, keys=keys)
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
        "keys": model.keys.model_dump(mode="json"),
        "ignored_keys": model.ignored,
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


def map_model(entry: ModelEntry, base: Path, lazy: bool = True) -> LoadedModel:
    """A model named in a map: its checkpoint read with the key handling and the spec the map
    recorded, refused when it is missing, changed since align (sha256) or no longer fits."""
    from clafuse.arch.registry import parse_spec
    from clafuse.errors import MapError

    path = base / entry.path
    if not path.exists():
        raise MapError(f"{path}: checkpoint named in the map does not exist")
    family, spec = parse_spec(entry.spec, f"map entry {entry.path}")
    raw = open_checkpoint(path) if lazy else load_checkpoint(path)
    plan = (entry.keys or KeyMap()).apply(raw, str(path))
    state_dict = plan.view(raw)
    skeleton = getattr(state_dict, "skeleton", None)
    family.check(spec, skeleton() if skeleton is not None else state_dict)
    model = LoadedModel(path, state_dict, family, spec, plan)
    if model.sha256 != entry.sha256:
        raise MapError(f"{path} changed since align (sha256 {model.sha256[:12]}…, the map has {entry.sha256[:12]}…); "
                       f"run align again")
    return model
