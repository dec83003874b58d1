"""Writing safetensors checkpoints tensor by tensor, whole or in shards.

``safetensors.torch.save_file`` first turns every tensor into a bytes object, which briefly
doubles the memory a large checkpoint needs. The format is simple (an 8-byte header length, a JSON
header of names, dtypes, shapes and byte offsets, then the raw little-endian data), so this writer
computes the header from shapes alone and streams each tensor's bytes straight from its storage.
Outputs above a size limit are split into shards with a ``.safetensors.index.json`` index, as
the Hugging Face convention has it; the index is written last, so it only exists once every shard
is complete.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path

import torch

from clafuse.errors import ClafuseError
from clafuse.io.atomic import AtomicGroup, atomic_group
from clafuse.io.common import INDEX_SUFFIX, SAFETENSORS_DTYPES

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int | None) -> int | None:
    """Bytes from ``1000000``, ``"500MB"`` (powers of 10) or ``"2GiB"`` (powers of 2); None stays None."""
    if size is None or isinstance(size, int):
        if isinstance(size, int) and size <= 0:
            raise ClafuseError(f"--max-shard-size must be positive, got {size}")
        return size
    found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(size))
    if not found or found.group(2).upper() not in _UNITS:
        raise ClafuseError(f"--max-shard-size: cannot read {size!r}; write e.g. 500MB, 2GB or 1GiB")
    value = int(float(found.group(1)) * _UNITS[found.group(2).upper()])
    if value <= 0:
        raise ClafuseError(f"--max-shard-size must be positive, got {size!r}")
    return value


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _ordered(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Widest dtypes first, then by name: every tensor's data starts aligned to its element size."""
    return sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> None:
    """Write ``tensors`` to ``path`` (not atomically: callers write to a temp file) as safetensors."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    order = _ordered(tensors)
    for name in order:
        t = tensors[name]
        if t.dtype not in DTYPE_NAMES:
            raise ClafuseError(f"cannot write {name}: dtype {t.dtype} has no safetensors name")
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + _nbytes(t)]}
        offset += _nbytes(t)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        for name in order:
            t = tensors[name].detach().cpu().contiguous()
            if t.numel():
                data = t.reshape(-1).view(torch.uint8).numpy()
                if sys.byteorder != "little" and t.element_size() > 1:
                    data = t.reshape(-1).numpy().byteswap().view("u1")
                fh.write(memoryview(data))


def _stem(path: Path) -> str:
    return path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name


def shard_names(path: Path, count: int) -> list[Path]:
    """``model.safetensors`` -> ``model-00001-of-00003.safetensors``, ... (Hugging Face naming)."""
    return [path.with_name(f"{_stem(path)}-{i:05d}-of-{count:05d}.safetensors") for i in range(1, count + 1)]


def shard_pattern(path: Path) -> str:
    """A regular expression of every shard name :func:`shard_names` can give ``path``."""
    return re.escape(_stem(path)) + r"-[0-9]{5}-of-[0-9]{5}\.safetensors"


def index_path(path: Path) -> Path:
    """Where the index of a sharded ``path`` goes: ``model.safetensors.index.json``."""
    return path.with_name(path.name + ".index.json") if path.name.endswith(".safetensors") else \
        path.with_name(path.name + INDEX_SUFFIX)


def _existing_shards(path: Path) -> list[Path]:
    pattern = re.compile(shard_pattern(path))
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    return [path.parent / name for name in sorted(names) if pattern.fullmatch(name)]


def save_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None,
                     max_shard_size: int | None = None, group: AtomicGroup | None = None) -> list[Path]:
    """Write ``tensors`` atomically to ``path``, or, when they exceed ``max_shard_size`` bytes, to
    shards beside it plus an index (``path`` + ``.index.json``). Returns the files written, the
    index last. The files of the other form (an index and its shards where a plain file is
    written, a plain file where shards are) and shards of an earlier, larger split are removed
    once the new files are in place. With ``group`` the files are renamed when that group commits.
    """
    with (nullcontext(group) if group is not None else atomic_group()) as files_group:
        return _save_into(files_group, path, tensors, metadata, max_shard_size)


def _save_into(group: AtomicGroup, path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None,
               max_shard_size: int | None) -> list[Path]:
    total = sum(_nbytes(t) for t in tensors.values())
    index = index_path(path)
    if max_shard_size is None or total <= max_shard_size:
        write_safetensors(group.temp(path), tensors, metadata)
        group.remove_after([index, *_existing_shards(path)])
        return [path]
    groups: list[list[str]] = [[]]
    size = 0
    for name in _ordered(tensors):
        n = _nbytes(tensors[name])
        if groups[-1] and size + n > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    files = shard_names(path, len(groups))
    weight_map: dict[str, str] = {}
    for file, names in zip(files, groups):
        write_safetensors(group.temp(file), {k: tensors[k] for k in names}, metadata)
        weight_map.update({k: file.name for k in names})
    doc = {"metadata": {"total_size": total, **({k: str(v) for k, v in metadata.items()} if metadata else {})},
           "weight_map": dict(sorted(weight_map.items()))}
    group.temp(index).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    # An old index goes before the shards are renamed and the new one comes last, so no index ever
    # points at a mix of old and new shards; the plain file and surplus old shards go at the end.
    group.remove_first([index])
    group.remove_after([path, *(p for p in _existing_shards(path) if p not in files)])
    return [*files, index]
