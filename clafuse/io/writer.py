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
import re
import struct
import sys
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

import torch

from clafuse.errors import ClafuseError
from clafuse.io.atomic import atomic_output, write_text_atomic
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


def shard_names(path: Path, count: int) -> list[Path]:
    """``model.safetensors`` -> ``model-00001-of-00003.safetensors``, ... (Hugging Face naming)."""
    stem = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name
    return [path.with_name(f"{stem}-{i:05d}-of-{count:05d}.safetensors") for i in range(1, count + 1)]


def index_path(path: Path) -> Path:
    """Where the index of a sharded ``path`` goes: ``model.safetensors.index.json``."""
    return path.with_name(path.name + ".index.json") if path.name.endswith(".safetensors") else \
        path.with_name(path.name + INDEX_SUFFIX)


def save_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None,
                     max_shard_size: int | None = None) -> list[Path]:
    """Write ``tensors`` atomically to ``path``, or, when they exceed ``max_shard_size`` bytes, to
    shards beside it plus an index (``path`` + ``.index.json``). Returns the files written, the
    index last."""
    total = sum(_nbytes(t) for t in tensors.values())
    if max_shard_size is None or total <= max_shard_size:
        with atomic_output(path) as tmp:
            write_safetensors(tmp, tensors, metadata)
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
    index = index_path(path)
    # Every shard is written to a temp file first; they are renamed into place together (an old
    # index is removed before), and the index written last: an interrupted run leaves no index
    # pointing at a mix of old and new shards.
    with ExitStack() as stack:
        for file, names in zip(files, groups):
            tmp = stack.enter_context(atomic_output(file))
            write_safetensors(tmp, {k: tensors[k] for k in names}, metadata)
            weight_map.update({k: file.name for k in names})
        index.unlink(missing_ok=True)
    doc = {"metadata": {"total_size": total, **({k: str(v) for k, v in metadata.items()} if metadata else {})},
           "weight_map": dict(sorted(weight_map.items()))}
    write_text_atomic(index, json.dumps(doc, indent=2) + "\n")
    return [*files, index]

