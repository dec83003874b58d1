"""Which tensors a checkpoint may hold: dense CPU floating-point weights, plus integer scalars.

Fusion averages and transports weights, so a weight must be a dense tensor of real values in a
float dtype clafuse can also write (float16, bfloat16, float32, float64). Integer and boolean
tensors are accepted only as scalars, the counters a framework keeps beside the weights (BatchNorm's
``num_batches_tracked``), or as index buffers named in :data:`INDEX_BUFFERS` (BERT checkpoints from
older transformers store ``embeddings.position_ids``, an arange); an int8 or uint16 weight matrix
is refused rather than averaged and cast back. Meta tensors (a shape without values), sparse and
quantized tensors are refused too, each with a message naming the key. A torch file may hold an
expanded view (stride 0) whose declared size dwarfs its stored data; such views are materialised
only while their declared sizes add up to at most :data:`MAX_EXPANDED_BYTES`, checked before any allocation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from clafuse.errors import CheckpointError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
COUNTER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)

INDEX_BUFFERS = ("position_ids",)
"""Last key components of integer buffers that hold indices, not weights: accepted at any shape."""

MAX_EXPANDED_BYTES = 2**30
"""Most bytes the expanded (stride-0 or overlapping) tensors of one checkpoint may take once
materialised (1 GiB, beyond the data the file itself stores)."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_declared(path: Path, key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """Raise ``CheckpointError`` unless a tensor of this dtype and shape may be a checkpoint entry."""
    if dtype in FLOAT_DTYPES:
        return
    if dtype in COUNTER_DTYPES:
        if len(shape) == 0 or key.rpartition(".")[2] in INDEX_BUFFERS:
            return
        raise CheckpointError(
            f"{path}: {key!r} has dtype {_dtype_name(dtype)} and shape {list(shape)}; clafuse fuses floating-point "
            "weights (integer tensors only as scalar counters such as num_batches_tracked)")
    raise CheckpointError(f"{path}: {key!r} has dtype {_dtype_name(dtype)}, which clafuse does not support "
                          "(use float16, bfloat16, float32 or float64)")


def _stored_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()


def admit_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` checked entry by entry (see the module doc), expanded views materialised."""
    budget = MAX_EXPANDED_BYTES
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if t.is_meta:
            raise CheckpointError(f"{path}: {key!r} is a meta tensor (a shape without values); save the real weights")
        if t.layout != torch.strided:
            raise CheckpointError(f"{path}: {key!r} is a sparse tensor ({str(t.layout).removeprefix('torch.')}); "
                                  "save it dense (tensor.to_dense())")
        if t.is_quantized:
            raise CheckpointError(f"{path}: {key!r} is a quantized tensor ({_dtype_name(t.dtype)}); "
                                  "dequantize it first (tensor.dequantize())")
        if t.device.type != "cpu":
            raise CheckpointError(f"{path}: {key!r} is on device {t.device.type}, expected CPU tensors")
        check_declared(path, key, t.dtype, tuple(t.shape))
        declared = t.numel() * t.element_size()
        if declared > _stored_bytes(t):
            if declared > budget:
                raise CheckpointError(
                    f"{path}: {key!r} is an expanded view of shape {list(t.shape)}: materialised it would take "
                    f"{declared / 2**30:.1f} GiB beyond the file's data, more than clafuse allows "
                    f"({MAX_EXPANDED_BYTES // 2**30} GiB for all expanded tensors)")
            budget -= declared
            t = t.contiguous()
        out[key] = t
    return out
