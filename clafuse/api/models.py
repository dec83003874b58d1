"""Loading checkpoints with their architecture, and ``inspect``."""

from __future__ import annotations

import json
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
from clafuse.arch.registry import parse_spec
from clafuse.errors import ClafuseError, DataError, SpecError
from clafuse.io.atomic import sha256_file
from clafuse.io.checkpoint import load_checkpoint, open_checkpoint, read_metadata
from clafuse.io.keys import KeyMap, KeyPlan
from clafuse.io.hf_folder import HFFolder, is_hf_folder, read_hf_folder
from clafuse.io.lazy import LazyStateDict


@dataclass
class LoadedModel:
    """A checkpoint with its family and spec; ``state_dict`` holds the names the family knows and
    ``plan`` (None: names as read) how they came from the checkpoint's own."""

    path: Path
    state_dict: Mapping[str, torch.Tensor]
    family: Family
    spec: BaseModel
    plan: KeyPlan | None = field(default=None)
    folder: HFFolder | None = None
    """The Hugging Face model folder the checkpoint was read from, if it was one."""

    @property
    def keys(self) -> KeyMap:
        """The key handling applied to the checkpoint's names (identity when none)."""
        return self.plan.keys if self.plan is not None else KeyMap()

    @property
    def ignored(self) -> list[str]:
        """Names (as read) of the tensors the key handling left out."""
        return list(self.plan.ignored) if self.plan is not None else []

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


SPEC_METADATA = "spec"
"""The safetensors metadata entry where ``fuse`` and ``finetune`` record their output's spec."""


def spec_metadata(spec: BaseModel) -> dict[str, str]:
    """Metadata recording ``spec`` in a written checkpoint, so that it is read back without a spec
    file: some of a spec shows in no shape (a ViT's or BERT's head count)."""
    return {SPEC_METADATA: spec.model_dump_json()}


def recorded_spec(path: str | os.PathLike) -> tuple[Family, BaseModel] | None:
    """The family and spec a checkpoint's metadata records (see :func:`spec_metadata`), or None
    when it records none or one that does not parse."""
    text = read_metadata(path).get(SPEC_METADATA)
    if not text:
        return None
    try:
        return parse_spec(json.loads(text), f"{path} metadata")
    except (ValueError, SpecError):
        return None


def load_model(path: str | os.PathLike, arch: str | os.PathLike | None = None,
               allow_nonfinite: bool = True, lazy: bool = False, keys: KeyMap | None = None) -> LoadedModel:
    """Read a checkpoint (a file, or a Hugging Face model folder whose ``config.json`` helps tell
    its architecture), apply the key handling ``keys`` and find its architecture (from ``arch`` if
    given, else detected; a prefix all names share is stripped when the rest then fits, see
    :func:`~clafuse.api.detection.resolve_keys`). With ``lazy``, a safetensors checkpoint is only
    opened: tensors are read when used. Without ``arch``, a spec the file's metadata records is used
    when it fits (the outputs of ``fuse`` and ``finetune`` record theirs)."""
    raw, folder = read_weights(path, lazy)
    recorded = recorded_spec(path) if arch is None and folder is None else None
    resolved = resolve_keys(raw, keys, arch, str(path), folder.config if folder is not None else None, recorded)
    state_dict, family, spec = resolved.state_dict, resolved.family, resolved.spec
    if not allow_nonfinite:
        bad = nonfinite_keys(state_dict)
        if bad:
            raise ClafuseError(f"{path}: {bad[0]} has NaN or Inf values"
                               + (f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""))
    return LoadedModel(Path(path), state_dict, family, spec, resolved.plan, folder)


def nonfinite_keys(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of floating-point tensors holding NaN or Inf: exactly those whose float64 sum is not
    finite (it cannot overflow), which is cheaper than an element-wise test."""
    return [k for k, v in state_dict.items()
            if v.is_floating_point() and not bool(torch.isfinite(v.sum(dtype=torch.float64)))]


def refuse_nonfinite(state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise ClafuseError when ``state_dict`` holds NaN or Inf values: an output about to be written
    (a checkpoint of garbage must not appear with exit code 0) or an input about to be trained."""
    bad = nonfinite_keys(state_dict)
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise ClafuseError(f"{what} hold NaN or Inf values ({bad[0]}{more}); pass --allow-nonfinite to "
                           "use them anyway")


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
        "activation": activation_of(model.spec),
        "keys": model.keys.model_dump(mode="json"),
        "ignored_keys": model.ignored,
    }


def activation_of(spec: Any) -> dict[str, Any] | None:
    """The activation a spec names and whether it was assumed: a state dict cannot tell ReLU from
    Tanh, so a detected spec (or a spec file without the field) assumes ReLU. None for families
    whose architecture fixes it (ResNet)."""
    if "activation" not in type(spec).model_fields:
        return None
    return {"name": spec.activation, "assumed": "activation" not in spec.model_fields_set}


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
    from clafuse.errors import MapError

    path = base / entry.path
    if not path.exists():
        raise MapError(f"{path}: checkpoint named in the map does not exist")
    family, spec = parse_spec(entry.spec, f"map entry {entry.path}")
    raw, folder = read_weights(path, lazy)
    plan = (entry.keys or KeyMap()).apply(raw, str(path))
    state_dict = plan.view(raw)
    family.check(spec, skeleton(state_dict))
    model = LoadedModel(path, state_dict, family, spec, plan, folder)
    if model.sha256 != entry.sha256:
        raise MapError(f"{path} changed since align (sha256 {model.sha256[:12]}…, the map has {entry.sha256[:12]}…); "
                       f"run align again")
    return model
