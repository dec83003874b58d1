"""Lazily loaded checkpoints: safetensors tensors read one at a time, when they are used.

Fusing two large checkpoints should need memory for the output and a few layers, not for both
inputs. A :class:`LazyStateDict` knows every tensor's name, dtype and shape from the file headers
and reads a tensor only when it is looked up; nothing is cached, so a tensor the caller drops is
freed. :meth:`LazyStateDict.skeleton` gives shape-only (meta) stand-ins, on which architecture
detection and chain building run without reading any data, and :func:`materializer` swaps the
stand-ins of one layer for the real tensors when that layer's turn comes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from clafuse.errors import CheckpointError
from clafuse.io.common import DDP_PREFIX as _DDP_PREFIX
from clafuse.io.common import SAFETENSORS_DTYPES
from clafuse.io.common import one_line as _one_line
from clafuse.io.inputs import MAX_HEADER_BYTES, open_input
from clafuse.io.tensors import check_declared


class LazyStateDict(Mapping[str, torch.Tensor]):
    """``{name: tensor}`` over one or more safetensors files, each tensor read on lookup.

    ``sources`` maps each public name to (file, name stored in that file). Files are validated
    with ``safetensors.safe_open``; tensors are then read with plain positioned reads into fresh
    memory (not through a memory map, whose touched pages would stay resident while it is open).
    """

    def __init__(self, path: Path, sources: dict[str, tuple[Path, str]]) -> None:
        self.path = path
        self._entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        headers: dict[Path, tuple[int, dict]] = {}
        for name, (file, stored) in sources.items():
            if file not in headers:
                headers[file] = _read_header(file)
            start, header = headers[file]
            info = header.get(stored)
            if not isinstance(info, dict):
                raise CheckpointError(f"{path}: tensor {stored!r} is not in {file.name}")
            dtype = info["dtype"]
            if dtype not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{file}: tensor {stored!r} has dtype {dtype}, which clafuse does not support")
            shape = tuple(int(d) for d in info["shape"])
            check_declared(file, stored, SAFETENSORS_DTYPES[dtype], shape)
            begin, end = info["data_offsets"]
            self._entries[name] = (file, SAFETENSORS_DTYPES[dtype], shape, start + begin, end - begin)
        self._skeleton: dict[str, torch.Tensor] | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        file, dtype, shape, offset, size = self._entries[name]
        out = torch.empty(shape, dtype=dtype)
        if size:
            buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            try:
                with open(file, "rb") as fh:
                    fh.seek(offset)
                    got = fh.readinto(buffer)
            except OSError as exc:
                raise CheckpointError(f"{file}: cannot read tensor {name!r}: {_one_line(exc)}") from None
            if got != size:
                raise CheckpointError(f"{file}: truncated while reading tensor {name!r}")
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def renamed(self, names: Mapping[str, str]) -> "LazyStateDict":
        """A lazy view holding ``names[new]`` under each new name (and nothing else); nothing is read."""
        view = object.__new__(LazyStateDict)
        view.path = self.path
        view._entries = {new: self._entries[old] for new, old in names.items()}
        view._skeleton = None
        return view

    def skeleton(self) -> dict[str, torch.Tensor]:
        """Meta-device stand-ins with the tensors' shapes; floating-point ones are float32, so that
        ``.float()`` returns the stand-in itself and :func:`materializer` can recognise it."""
        if self._skeleton is None:
            self._skeleton = {
                name: torch.empty(shape, dtype=torch.float32 if dtype.is_floating_point else dtype, device="meta")
                for name, (_, dtype, shape, _, _) in self._entries.items()
            }
        return self._skeleton


def _read_header(file: Path) -> tuple[int, dict]:
    """(start of the data section, header) of a safetensors file, after ``safe_open`` has checked it
    (header syntax, dtypes, offsets within the file and without gaps or overlaps)."""
    try:
        with open_input(file, "file", CheckpointError) as fh:
            with safe_open(str(file), framework="pt", device="cpu"):
                pass
            length = int.from_bytes(fh.read(8), "little")
            if length > MAX_HEADER_BYTES:
                raise CheckpointError(f"{file}: safetensors header of {length} bytes is over the "
                                      f"{MAX_HEADER_BYTES} clafuse reads")
            header = json.loads(fh.read(length))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: not a valid safetensors file: {_one_line(exc)}") from None
    return 8 + length, header


def lazy_safetensors(path: Path, files: dict[str, Path]) -> LazyStateDict:
    """A lazy view of the tensors stored in ``files`` (name -> file), with a DataParallel
    ``module.`` prefix removed as the eager loader does."""
    names = list(files)
    strip = bool(names) and all(n.startswith(_DDP_PREFIX) for n in names)
    return LazyStateDict(path, {(n[len(_DDP_PREFIX):] if strip else n): (files[n], n) for n in names})


def materializer(*state_dicts: Mapping[str, torch.Tensor]):
    """A function replacing the skeleton stand-ins (from these lazy state dicts) inside a value —
    a tensor, or a dict of them — by the real float32 tensors, read now."""
    where: dict[int, tuple[LazyStateDict, str]] = {}
    for sd in state_dicts:
        if isinstance(sd, LazyStateDict):
            for name, stand_in in sd.skeleton().items():
                where[id(stand_in)] = (sd, name)

    def load(value):
        if isinstance(value, dict):
            return {k: load(v) for k, v in value.items()}
        if isinstance(value, torch.Tensor) and value.is_meta:
            sd, name = where[id(value)]
            real = sd[name]
            return real.float() if real.is_floating_point() else real
        return value

    return load
