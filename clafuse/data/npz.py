"""``.npz`` files: one set of inputs ``x`` with optional labels ``y``.

Members are read without numpy's ``np.load``: each member's ``.npy`` header is parsed first and its
declared shape checked against the bytes the archive really holds and against the size limit
(:func:`clafuse.data.common.check_data_size`) before any array is allocated, so a member whose
header lies, or a compressed bomb, is refused for the price of reading a few hundred bytes.
Object (pickled) arrays are never loaded.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from clafuse.data.common import check_data_size, check_inputs, check_labels, decoded_bytes, first_line, human_bytes
from clafuse.errors import DataError

_NPY_MAGIC = b"\x93NUMPY"
# What reading a damaged or unusual archive member can raise (encrypted members raise RuntimeError,
# unknown compression methods NotImplementedError).
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError)


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read and validate ``x`` (numeric, at least 2-D, finite) and optional ``y`` (integer labels)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        if _starts_with(path, _NPY_MAGIC):
            raise DataError(f"{path}: not an .npz archive (an .npy file holds one array; use np.savez)") from None
        raise DataError(f"{path}: cannot read .npz file ({first_line(exc)})") from exc
    with archive:
        members = {_array_name(info.filename): info for info in archive.infolist() if not info.is_dir()}
        if "x" not in members:
            found = ", ".join(ascii(name)[1:-1] for name in sorted(members))[:300]
            raise DataError(f"{path}: no array named 'x' (found: {found or 'none'})")
        x = _read_member(archive, members["x"], path, "x", "must be numeric")
        y = _read_member(archive, members["y"], path, "y", "must hold integer class labels") if "y" in members else None
    x = check_inputs(x, f"{path}: 'x'")
    if y is not None:
        y = check_labels(y, len(x), f"{path}: 'y'")
    return x, y


def _array_name(member: str) -> str:
    """The key numpy gives a member: its name without the ``.npy`` suffix ``np.savez`` adds."""
    return member.removesuffix(".npy")


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(magic)) == magic
    except OSError:
        return False


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, name: str, need: str) -> np.ndarray:
    """One ``.npy`` member, after checking its header against the member's size and the size limit."""
    what = f"{path}: '{name}'"
    try:
        with archive.open(info) as fh:
            version = npy_format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = npy_format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = npy_format.read_array_header_2_0(fh)
            else:
                raise DataError(f"{what}: unsupported .npy format version {version[0]}.{version[1]}")
            header_size = fh.tell()
    except DataError:
        raise
    except _READ_ERRORS as exc:
        raise DataError(f"{what}: cannot read .npz member ({first_line(exc)})") from exc
    if dtype.hasobject:
        raise DataError(f"{what} holds Python objects (a pickled array), which clafuse never loads; "
                        "save numeric arrays")
    if dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
        raise DataError(f"{what} {need}, not {dtype}")
    declared = math.prod(shape) * dtype.itemsize
    held = info.file_size - header_size
    if declared != held:
        raise DataError(f"{what}: its header declares shape {shape} of {dtype} ({human_bytes(declared)}) but the "
                        f"archive member holds {human_bytes(max(held, 0))} of data")
    check_data_size(decoded_bytes(shape, dtype.itemsize), f"{what} (shape {shape}, {dtype})")
    try:
        with archive.open(info) as fh:
            array = npy_format.read_array(fh, allow_pickle=False)
    except _READ_ERRORS as exc:
        raise DataError(f"{what}: cannot read .npz member ({first_line(exc)})") from exc
    return array
