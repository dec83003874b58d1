"""Builders several test files share: small MLPs and their safetensors checkpoints, hostile data
files (compressed bombs built without compressing every byte) and a memory-limited CLI run."""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import subprocess
import sys
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch
from numpy.lib import format as np_format
from safetensors.torch import save_file
from torch import nn


def mlp(widths: list[int], *, inputs: int = 64, classes: int = 10, seed: int | None = None) -> nn.Sequential:
    """``Flatten, (Linear, ReLU) per hidden width, Linear`` to ``classes``; seeded first when ``seed`` is given."""
    if seed is not None:
        torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for i, o in zip([inputs, *widths], widths):
        layers += [nn.Linear(i, o), nn.ReLU()]
    layers.append(nn.Linear(widths[-1] if widths else inputs, classes))
    return nn.Sequential(*layers)


def save_safetensors(path: Path, weights: nn.Module | Mapping[str, torch.Tensor]) -> Path:
    """Write a module's state dict (or a state dict) to ``path`` as safetensors; returns ``path``."""
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def save_mlp(path: Path, seed: int, widths: list[int] | int, *, inputs: int = 64, classes: int = 10) -> Path:
    """:func:`mlp` (one hidden layer when ``widths`` is an int) saved to ``path``."""
    hidden = [widths] if isinstance(widths, int) else widths
    return save_safetensors(path, mlp(hidden, inputs=inputs, classes=classes, seed=seed))


# --- hostile data files and a memory-limited run ----------------------------------------------------

MEMORY_LIMIT = 3 << 30
"""Address-space cap of :func:`run_capped` (``ulimit -v``): well above what ``import torch`` and a
small command need (about 0.7 GiB), well below what a decompression bomb would allocate."""


def deflated_zeros(head: bytes, zeros: int, chunk: int = 1 << 22) -> tuple[bytes, int]:
    """A raw deflate stream of ``head`` followed by ``zeros`` zero bytes, and the CRC-32 of that content.

    Compressing gigabytes of zeros would take seconds; after a full flush the compressor starts afresh,
    so one compressed block of ``chunk`` zeros is valid repeated, and only the CRC runs over every byte.
    """
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = comp.compress(head) + comp.flush(zlib.Z_FULL_FLUSH)
    block = comp.compress(bytes(chunk)) + comp.flush(zlib.Z_FULL_FLUSH)
    assert comp.compress(bytes(chunk)) + comp.flush(zlib.Z_FULL_FLUSH) == block
    repeats, rest = divmod(zeros, chunk)
    stream = first + block * repeats + comp.compress(bytes(rest)) + comp.flush()
    crc = zlib.crc32(head)
    zero_chunk = bytes(chunk)
    for _ in range(repeats):
        crc = zlib.crc32(zero_chunk, crc)
    return stream, zlib.crc32(bytes(rest), crc)


def npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    """The ``.npy`` magic and header of an array of ``shape`` and ``descr`` (what np.save writes first)."""
    buf = io.BytesIO()
    np_format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def write_zip(path: Path, members: dict[str, tuple[bytes, int, int]]) -> Path:
    """A zip archive of already deflated members ``name: (stream, crc32, uncompressed size)``
    (sizes below 4 GiB); zipfile itself would deflate every byte again."""
    local, central = b"", b""
    for name, (stream, crc, size) in members.items():
        raw = name.encode()
        central += struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, 8, 0, 33, crc, len(stream), size,
                               len(raw), 0, 0, 0, 0, 0, len(local)) + raw
        local += struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 8, 0, 33, crc, len(stream), size, len(raw), 0)
        local += raw + stream
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), len(local), 0)
    path.write_bytes(local + central + end)
    return path


def gzip_zeros(path: Path, head: bytes, zeros: int) -> Path:
    """A gzip file of ``head`` followed by ``zeros`` zero bytes, built from :func:`deflated_zeros`."""
    stream, crc = deflated_zeros(head, zeros)
    trailer = struct.pack("<2I", crc, (len(head) + zeros) & 0xFFFFFFFF)
    path.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + stream + trailer)
    return path


_CAPPED_DRIVER = """
import json, sys
from tests.cli_runner import invoke
cases = json.loads(sys.argv[1])
print(json.dumps([vars(invoke(*args)) for args in cases]))
"""


def run_capped(cases: list[list[str]], limit: int = MEMORY_LIMIT,
               env: Mapping[str, str] | None = None) -> list[dict]:
    """Run each ``clafuse ARGS`` of ``cases`` in one child process whose address space is capped at
    ``limit`` bytes (``ulimit -v``), so an allocation a hostile input provokes fails there, visibly,
    instead of exhausting the test machine; torch is imported once for all cases. Returns each
    case's :class:`tests.cli_runner.Outcome` as a dict."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    root = Path(__file__).resolve().parents[1]
    child_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), **(env or {})}
    child_env.pop("CLAFUSE_DEBUG", None)
    proc = subprocess.run([sys.executable, "-c", _CAPPED_DRIVER, json.dumps(cases)], cwd=root, env=child_env,
                          preexec_fn=cap, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"the capped child died ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.splitlines()[-1])


def without_progress(stderr: str) -> str:
    """``stderr`` without the ``clafuse: progress: ...`` lines that steps longer than a second show
    (how long a step takes depends on the machine's load, so tests of other output ignore them)."""
    return "".join(line for line in stderr.splitlines(keepends=True) if not line.startswith("clafuse: progress: "))


def mlp_member(hidden: list[int], seed: int, *, inputs: int, classes: int, bias: bool = True,
               bias_std: float = 0.1) -> "Member":
    """A random bias-optional MLP checkpoint (He-scaled weights) as a fusion ``Member``, its family
    and spec detected from the keys as ``clafuse`` would."""
    from clafuse.arch.registry import detect
    from clafuse.fusion.engines import Member

    gen = torch.Generator().manual_seed(seed)
    widths = [inputs, *hidden, classes]
    state = {}
    for k, (i, o) in enumerate(zip(widths, widths[1:])):
        state[f"fc{k}.weight"] = torch.randn(o, i, generator=gen) * (2 / i) ** 0.5
        if bias:
            state[f"fc{k}.bias"] = torch.randn(o, generator=gen) * bias_std
    family, spec = detect(state)
    return Member(family, spec, state)
