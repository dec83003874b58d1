"""Opening a file a user named as input: a regular file of bounded size, never a FIFO or device.

Every reader of user input (checkpoints, shard indexes, maps, spec files) goes through
:func:`open_input`, so ``--map /dev/zero`` cannot read forever and a FIFO cannot block: the path
is checked with ``stat`` before it is opened, opened without blocking, and checked again on the
open descriptor. Text documents (maps, specs, indexes) are read whole, up to
:data:`MAX_TEXT_BYTES`; a safetensors header may be up to :data:`MAX_HEADER_BYTES`.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import BinaryIO

from clafuse.errors import ClafuseError

MAX_TEXT_BYTES = 64 * 2**20
"""Largest map, spec or shard index read (64 MiB); real ones are kilobytes to a few megabytes."""

MAX_HEADER_BYTES = 100_000_000
"""Largest safetensors header read (the safetensors library's own limit)."""

_CHUNK = 1 << 20
_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def _refuse_irregular(p: Path, mode: int, what: str, error: type[ClafuseError]) -> None:
    if stat.S_ISDIR(mode):
        raise error(f"{p}: is a directory, expected a {what}")
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise error(f"{p}: is {kind}, not a regular file; a {what} must be a file")


def _size_mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB" if size >= 2**20 else f"{size} bytes"


def open_input(path: str | os.PathLike[str], what: str, error: type[ClafuseError] = ClafuseError,
               limit: int | None = None) -> BinaryIO:
    """Open ``path`` for binary reading after checking that it is a regular file (of at most
    ``limit`` bytes); raise ``error`` with a one-line message naming the ``what`` otherwise.

    Never blocks: a FIFO, device or socket is refused from its ``stat`` before any ``open``,
    and the open itself is non-blocking, so a file swapped for a FIFO in between is refused too.
    """
    p = Path(path)
    try:
        _refuse_irregular(p, os.stat(p).st_mode, what, error)
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
                     | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise error(f"{p}: no such {what}") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise error(f"{p}: cannot read {what}: {reason}") from None
    try:
        info = os.fstat(fd)
        _refuse_irregular(p, info.st_mode, what, error)
        if limit is not None and info.st_size > limit:
            raise error(f"{p}: {what} is {_size_mib(info.st_size)}, over the {_size_mib(limit)} clafuse reads")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_input(path: str | os.PathLike[str], what: str, error: type[ClafuseError] = ClafuseError) -> Path:
    """``path`` as a Path once :func:`open_input` accepts it, for readers that open it themselves."""
    open_input(path, what, error).close()
    return Path(path)


def read_input(path: str | os.PathLike[str], what: str, error: type[ClafuseError] = ClafuseError,
               limit: int = MAX_TEXT_BYTES) -> bytes:
    """The whole content of a regular file of at most ``limit`` bytes (also if it grows meanwhile)."""
    with open_input(path, what, error, limit) as fh:
        try:
            data = fh.read(limit + 1)
        except OSError as exc:
            raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise error(f"{path}: {what} is over the {_size_mib(limit)} clafuse reads")
    return data


def read_input_text(path: str | os.PathLike[str], what: str, error: type[ClafuseError] = ClafuseError,
                    limit: int = MAX_TEXT_BYTES) -> str:
    """:func:`read_input` decoded as UTF-8; invalid UTF-8 is a one-line ``error``."""
    data = read_input(path, what, error, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not a text file (not valid UTF-8 at byte {exc.start})") from None


def sha256_input(path: str | os.PathLike[str], what: str, error: type[ClafuseError] = ClafuseError) -> str:
    """Hex SHA-256 of a regular file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open_input(path, what, error) as fh:
        try:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
        except OSError as exc:
            raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    return digest.hexdigest()
