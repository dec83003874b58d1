"""One rule for every file a command writes, checked before any work starts.

An output must not be any input of the run (the same file, also through a symbolic or hard link,
or a shard of an input index), nor another output of the same run, nor an existing folder, device,
FIFO or socket; its folder must exist and its name (and the names derived from it) must fit the
file system. Every command calls :func:`plan_outputs` with all its inputs and outputs, so a run
that would destroy an input or write two outputs over each other stops with one clear line
before it reads a tensor.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from clafuse.errors import ClafuseError
from clafuse.io.atomic import NAME_MAX
from clafuse.io.common import INDEX_SUFFIX
from clafuse.io.writer import index_path, shard_pattern

_INDEX_READ_LIMIT = 64 << 20  # larger "index" files are not looked into for shard names here
PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class Output:
    """A file (or, with ``folder``, a folder of files) a run writes, named by the option that gave it.

    ``siblings`` is a regular expression of further names in the file's folder (or, with
    ``folder``, inside the folder) that the run may write or replace: shards, an index, figures.
    """

    option: str
    path: Path
    siblings: str | None = None
    folder: bool = False

    def names(self) -> str:
        """How messages name this output."""
        return f"{self.option} {self.path}" if self.option else str(self.path)


def checkpoint_output(option: str, path: PathLike, folder: bool = False) -> Output:
    """A checkpoint output: with a ``.safetensors`` name it may also write (or remove stale) shards
    and an index beside it, so those names are claimed too. A model ``folder`` is replaced as a
    whole, so every file in it is claimed."""
    p = Path(path)
    if folder:
        return Output(option, p, siblings=".+", folder=True)
    if not p.name.endswith(".safetensors"):
        return Output(option, p)
    return Output(option, p, siblings=f"{shard_pattern(p)}|{re.escape(index_path(p).name)}")


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


def _folder_key(folder: Path) -> tuple:
    st = _stat(folder)
    return ("inode", st.st_dev, st.st_ino) if st is not None else ("path", os.path.abspath(folder))


def _places(path: Path) -> set[tuple[tuple, str]]:
    """Where ``path`` lives, as (folder, name), under the name given and under its real path."""
    real = Path(os.path.realpath(path))
    return {(_folder_key(path.parent), path.name), (_folder_key(real.parent), real.name)}


def _within(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies anywhere inside it (real paths): a folder output
    replaces all of that."""
    real, top = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return real == top or top in real.parents


def _index_shards(index: Path) -> list[Path]:
    """The shard files a ``.safetensors.index.json`` input names (best effort: the reader reports
    a broken index itself)."""
    st = _stat(index)
    if st is None or not stat.S_ISREG(st.st_mode) or st.st_size > _INDEX_READ_LIMIT:
        return []
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = {v for v in weight_map.values() if isinstance(v, str) and v}
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError):
        return []
    return [index.parent / name for name in sorted(names)]


def input_files(inputs: Iterable[PathLike | None]) -> list[Path]:
    """The existing files among ``inputs``, with the shards of any index among them."""
    files = []
    for item in inputs:
        if item is None:
            continue
        path = Path(item)
        if _stat(path) is None:
            continue
        files.append(path)
        if path.name.lower().endswith(INDEX_SUFFIX):
            files.extend(p for p in _index_shards(path) if _stat(p) is not None)
    return files


def _check_name(output: Output, path: Path) -> None:
    if len(os.fsencode(path.name)) > NAME_MAX:
        raise ClafuseError(f"{output.names()}: file name {path.name[:40]}... is longer than {NAME_MAX} bytes")


def _check_place(output: Output) -> None:
    """The folder exists and is writable; an existing output is a regular file (or folder, for a folder)."""
    path = output.path
    _check_name(output, path)
    if not path.parent.is_dir():
        raise ClafuseError(f"cannot write {output.names()}: directory {path.parent} does not exist")
    st = _stat(path)
    if output.folder:
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise ClafuseError(f"{output.names()} exists and is not a directory")
        writable = path if st is not None else path.parent
    else:
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise ClafuseError(f"cannot write {output.names()}: it is a directory")
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise ClafuseError(f"cannot write {output.names()}: it is not a regular file (a device, FIFO or socket); "
                               "name a regular file")
        writable = path.parent
    if not os.access(writable, os.W_OK | os.X_OK):
        raise ClafuseError(f"cannot write {output.names()}: permission denied in {writable}")


def _claims(output: Output, place: tuple[tuple, str]) -> bool:
    """Whether ``output`` writes (or may replace) the file at ``place``."""
    folder, name = place
    if output.folder:
        return output.siblings is not None and folder == _folder_key(output.path) \
            and re.fullmatch(output.siblings, name) is not None
    if folder != _folder_key(output.path.parent):
        return False
    return name == output.path.name or (output.siblings is not None and re.fullmatch(output.siblings, name) is not None)


def _same_file(a: Path, b: Path) -> bool:
    sa, sb = _stat(a), _stat(b)
    return sa is not None and sb is not None and (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def plan_outputs(inputs: Iterable[PathLike | None], outputs: Iterable[Output | None]) -> None:
    """Refuse the run (ClafuseError) unless every output can be written without harm.

    ``inputs``: every file the run reads (paths that do not exist, such as built-in data names,
    are skipped; the shards of an index input count as inputs). ``outputs``: every file it writes.
    """
    planned = [o for o in outputs if o is not None]
    read = input_files(inputs)
    for output in planned:
        _check_place(output)
    for output in planned:
        for source in read:
            if (not output.folder and _same_file(output.path, source)) or any(_claims(output, place)
                                                                              for place in _places(source)) \
                    or (output.folder and _within(source, output.path)):
                raise ClafuseError(f"{output.names()} would overwrite the input {source}; choose another output name")
    for i, first in enumerate(planned):
        for second in planned[i + 1:]:
            clash = (not first.folder and not second.folder and _same_file(first.path, second.path)) or \
                (not second.folder and any(_claims(first, place) for place in _places(second.path))) or \
                (not first.folder and any(_claims(second, place) for place in _places(first.path)))
            if clash:
                raise ClafuseError(f"{first.names()} and {second.names()} name the same file; give each output its own name")
