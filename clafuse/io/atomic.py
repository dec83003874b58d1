"""Atomic file output: write to a temporary file beside the target, then rename it into place.

A crash, an error or Ctrl-C mid-write never leaves a truncated file under the requested name,
and an existing file there stays untouched until the new one is complete. An
:class:`AtomicGroup` does the same for several files at once (a checkpoint with its metrics and
plot, shards with their index): every file is written to its temp file first, and only when all
are complete are they renamed into place, the stale files of another form removed after.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from clafuse.errors import ClafuseError

_CHUNK = 1 << 20
NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems


def temp_name(name: str) -> str:
    """The hidden temp file name for an output called ``name``: ``.NAME.tmp-XXXXXXXX``, or, where
    that would pass :data:`NAME_MAX`, the name cut short plus a digest of the whole name."""
    tail = f".tmp-{secrets.token_hex(4)}"
    full = f".{name}{tail}"
    if len(os.fsencode(full)) <= NAME_MAX:
        return full
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:12]
    keep = os.fsencode(name)[: NAME_MAX - len(tail) - len(digest) - 2]
    return f".{os.fsdecode(keep)}~{digest}{tail}"


def check_target(target: Path) -> None:
    """Refuse to write ``target`` where the rename would replace a folder or a device, FIFO or socket."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ClafuseError(f"cannot write {target}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ClafuseError(f"cannot write {target}: it is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise ClafuseError(f"cannot write {target}: it is not a regular file (a device, FIFO or socket)")


def _create_temp(target: Path) -> Path:
    """Create an empty, uniquely named temp file next to ``target`` (mode 0666 minus the umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = target.parent / temp_name(target.name)
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


def _remove(path: Path) -> None:
    """Delete ``path`` if it is there; a name too long to exist is not there."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise


class AtomicGroup:
    """Temp files that replace their targets together once every one of them is complete."""

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []
        self._first: list[Path] = []
        self._after: list[Path] = []

    def temp(self, path: str | os.PathLike[str]) -> Path:
        """A new empty temp file beside ``path`` that :meth:`commit` renames to ``path``."""
        target = Path(path)
        if not target.parent.is_dir():
            raise ClafuseError(f"cannot write {target}: directory {target.parent} does not exist")
        check_target(target)
        tmp = _create_temp(target)
        self._pending.append((tmp, target))
        return tmp

    def remove_first(self, paths: Iterable[Path]) -> None:
        """Delete ``paths`` once every temp file is complete, just before the renames."""
        self._first.extend(paths)

    def remove_after(self, paths: Iterable[Path]) -> None:
        """Delete ``paths`` (stale files of another output form) after the renames."""
        self._after.extend(paths)

    def commit(self) -> None:
        """Rename every temp file into place (in the order they were made), then remove stale files."""
        parents = {target.parent for _, target in self._pending} | {p.parent for p in self._after}
        try:
            for tmp, _ in self._pending:
                _fsync(tmp)
            for path in self._first:
                _remove(path)
            while self._pending:
                tmp, target = self._pending[0]
                os.replace(tmp, target)
                self._pending.pop(0)
        finally:
            self.discard()
        for path in self._after:
            _remove(path)
        self._after = []
        for parent in parents:
            _fsync_dir(parent)

    def discard(self) -> None:
        """Delete every temp file not yet renamed; the targets stay as they were."""
        for tmp, _ in self._pending:
            tmp.unlink(missing_ok=True)
        self._pending = []


@contextmanager
def atomic_group() -> Iterator[AtomicGroup]:
    """Yield an :class:`AtomicGroup`; it commits when the block ends, and discards on any exception."""
    group = AtomicGroup()
    try:
        yield group
    except BaseException:
        group.discard()
        raise
    group.commit()


@contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces ``path``, on any exception it is deleted."""
    with atomic_group() as group:
        yield group.temp(path)


def write_through(path: str | os.PathLike[str], write: Callable[[Path], None], group: AtomicGroup | None = None) -> None:
    """Have ``write`` fill a temp file for ``path``: one of ``group``'s (renamed into place when the
    group commits, with the run's other outputs), or, without a group, renamed at once."""
    if group is not None:
        write(group.temp(path))
        return
    with atomic_output(path) as tmp:
        write(tmp)


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
