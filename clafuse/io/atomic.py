"""Atomic file output: write to a temporary file beside the target, then rename it into place.

A crash, an error or Ctrl-C mid-write never leaves a truncated file under the requested name,
and an existing file there stays untouched until the new one is complete.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from clafuse.errors import ClafuseError

_CHUNK = 1 << 20


def _create_temp(target: Path) -> Path:
    """Create an empty, uniquely named temp file next to ``target`` (mode 0666 minus the umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = target.parent / f".{target.name}.tmp-{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        except OSError as exc:
            raise ClafuseError(f"cannot write {target}: {exc.strerror or exc}") from exc
        os.close(fd)
        return tmp


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself; best effort, since not every platform can open a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces ``path``, on any exception it is deleted."""
    target = Path(path)
    parent = target.parent
    if not parent.is_dir():
        raise ClafuseError(f"cannot write {target}: directory {parent} does not exist")
    if target.is_dir():
        raise ClafuseError(f"cannot write {target}: it is a directory")
    tmp = _create_temp(target)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(parent)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks so large checkpoints need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
