"""Writing a result in its input's own form (``--keep-wrapper``): the input's tensor names,
prefix and, for torch files, the dictionary around them.

A PyTorch Lightning ``.ckpt`` holds ``{'state_dict': {'model.xxx': ...}, 'epoch': ...,
'hyper_parameters': ..., 'optimizer_states': ..., ...}``; a tutorial-style file holds
``{'model_state_dict': ..., 'optimizer_state_dict': ..., 'epoch': ...}``. The result keeps that
dictionary with the new weights under the input's own names, so the code that wrote the input
loads it back (``LightningModule.load_from_checkpoint``, ``model.load_state_dict(ck['model_state_dict'])``).
Optimizer, scheduler and gradient-scaler states (top-level entries whose name contains
``optim``, ``sched`` or ``scaler``) are dropped: they belong to the input's training run, not to
new weights. Tensors the key handling left out (``--ignore-keys``, outside ``--strip-prefix``) are
written back unchanged from the input. The result's metadata goes under a ``clafuse`` entry.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from clafuse.errors import CheckpointError, ClafuseError
from clafuse.io.atomic import AtomicGroup, write_through
from clafuse.io.checkpoint import format_of, load_checkpoint, open_checkpoint, output_format, save_checkpoint
from clafuse.io.common import DDP_PREFIX, INDEX_SUFFIX, one_line
from clafuse.io.keys import KeyPlan

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")  # the order the checkpoint reader tries
TRAINING_STATE = re.compile(r"optim|sched|scaler", re.IGNORECASE)


@dataclass
class Container:
    """What surrounds a checkpoint's tensors: the whole torch object (None for safetensors), the
    entry holding the tensors (None when they are the top level) and whether the reader removed a
    DataParallel ``module.`` prefix from every name."""

    path: Path
    obj: Mapping[str, Any] | None
    wrapper_key: str | None
    stored: list[str]
    ddp: bool

    def name_as_read(self, stored: str) -> str:
        return stored[len(DDP_PREFIX):] if self.ddp else stored

    def tensor(self, stored: str) -> torch.Tensor:
        """The input's tensor stored under ``stored``."""
        if self.obj is not None:
            return (self.obj[self.wrapper_key] if self.wrapper_key is not None else self.obj)[stored]
        return open_checkpoint(self.path)[self.name_as_read(stored)]


def _all_tensors(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_container(path: str | os.PathLike) -> Container:
    """The container of the checkpoint at ``path`` (torch files loaded with ``weights_only``)."""
    p = Path(path)
    if p.name.lower().endswith(INDEX_SUFFIX) or format_of(p) == "safetensors":
        if p.name.lower().endswith(INDEX_SUFFIX):
            stored = list(load_checkpoint(p))
        else:
            with safe_open(p, framework="pt") as fh:
                stored = list(fh.keys())
        obj, wrapper_key = None, None
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - the reader accepted it; anything else is a changed file
            raise CheckpointError(f"{p}: cannot read it again to keep its wrapper: {one_line(exc)}") from None
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{p}: expected a mapping of names to tensors, got {type(obj).__name__}")
        wrapper_key = None
        if not _all_tensors(obj):
            candidates = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
            wrapper_key = next((k for k in candidates if _all_tensors(obj[k])), candidates[0] if candidates else None)
        stored = list(obj[wrapper_key] if wrapper_key is not None else obj)
    ddp = bool(stored) and all(k.startswith(DDP_PREFIX) for k in stored)
    return Container(p, obj, wrapper_key, stored, ddp)


def check_keep_wrapper(input_path: str | os.PathLike, out: str | os.PathLike) -> Container:
    """Refuse, before any work, an output that cannot hold the input's wrapper."""
    container = read_container(input_path)
    kind, _ = output_format(out)
    if container.wrapper_key is not None and kind != "torch":
        raise ClafuseError(f"--keep-wrapper: {input_path} keeps its tensors under {container.wrapper_key!r}, "
                           f"which only a torch file can hold: name the output .ckpt or .pt")
    return container


def in_input_form(container: Container, plan: KeyPlan, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (under the names the family knows) back under the input's stored names, in the
    input's order; tensors the key handling left out are copied from the input unchanged."""
    as_read = {name: new for new, name in plan.names.items()}
    ignored = set(plan.ignored)
    out: dict[str, torch.Tensor] = {}
    used = set()
    for stored in container.stored:
        name = container.name_as_read(stored)
        if name in ignored:
            out[stored] = container.tensor(stored)
        elif name in as_read and as_read[name] in state:
            out[stored] = state[as_read[name]]
            used.add(as_read[name])
        else:
            raise ClafuseError(f"--keep-wrapper: the result has no tensor for the input's {stored!r}")
    extra = [k for k in state if k not in used]
    if extra:
        raise ClafuseError(f"--keep-wrapper: the result's {extra[0]!r} has no place among the input's names")
    return out


def save_in_input_form(out: str | os.PathLike, container: Container, tensors: dict[str, torch.Tensor],
                       metadata: Mapping[str, str], group: AtomicGroup | None = None) -> list[Path]:
    """Write ``tensors`` (already under the stored names) atomically inside the input's wrapper
    (torch) or as a plain file (safetensors or a torch dict without wrapper); with ``group`` the
    file is renamed into place when that group commits."""
    p = Path(out)
    if container.wrapper_key is None:
        return save_checkpoint(p, tensors, metadata, group=group)
    inner = container.obj[container.wrapper_key]
    fresh: dict[str, torch.Tensor] = OrderedDict() if isinstance(inner, OrderedDict) else {}
    fresh.update({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})
    obj = {k: v for k, v in container.obj.items() if not TRAINING_STATE.search(str(k))}
    obj[container.wrapper_key] = fresh
    obj["clafuse"] = dict(metadata)
    output_format(p)
    write_through(p, lambda tmp: torch.save(obj, tmp), group)
    return [p]


def dropped_entries(container: Container) -> list[str]:
    """The top-level entries of the input's wrapper that the output leaves out."""
    if container.obj is None or container.wrapper_key is None:
        return []
    return [str(k) for k in container.obj if TRAINING_STATE.search(str(k))]
