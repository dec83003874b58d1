"""Resolving a data source (a built-in name, an ``.npz`` file or a data folder) and loading it."""

from __future__ import annotations

import os
from pathlib import Path

from clafuse.data.builtin import BUILTIN_SOURCES, STANDARDISE, load_digits, load_fashion, load_mnist
from clafuse.data.cifar import CIFAR_LAYOUTS, cifar_kind, load_cifar_folder
from clafuse.data.common import Dataset, check_split, to_dataset
from clafuse.data.idx import idx_paths, load_idx_folder
from clafuse.data.images import load_image_folder, visible_subdirs
from clafuse.data.npz import load_npz
from clafuse.errors import DataError

_FOLDER_EXPECTED = (
    "an IDX folder (train-images-idx3-ubyte[.gz], t10k-images-idx3-ubyte[.gz], ...), "
    "a CIFAR-10 folder (data_batch_1..5, test_batch, batches.meta), "
    "a CIFAR-100 folder (train, test, meta) "
    "or an image folder (one sub-folder of images per class, optionally under train/ val/ test/)"
)


def load_source(src: str, split: str | None = None) -> Dataset:
    """Load ``src``: an ``.npz`` path, a data folder (IDX, CIFAR-10/100 or images in class
    sub-folders), or a built-in name such as ``mnist:val``.

    A ``:split`` suffix wins over ``split``; the default split is ``train``. ``.npz`` files hold a
    single set, so the split does not apply to them. Data too large for the memory this process
    may use (under ``ulimit -v``, say) is refused with a DataError rather than a MemoryError.
    """
    kind, path, chosen = _resolve(src, split)
    try:
        return _load(kind, path, chosen, src)
    except MemoryError:
        raise DataError(f"{src}: not enough memory to load this data (the limit of this process was reached)") from None


def _load(kind: str, path: Path | None, chosen: str | None, src: str) -> Dataset:
    if kind == "npz":
        x, y = load_npz(path)
        return to_dataset(x, y, str(src))
    if kind == "idx":
        x, y = load_idx_folder(path, chosen)
        return to_dataset(x, y, f"{path}:{chosen}")
    if kind in CIFAR_LAYOUTS:
        x, y = load_cifar_folder(path, chosen, kind)
        return to_dataset(x, y, f"{path}:{chosen}")
    if kind == "images":
        x, y = load_image_folder(path, chosen)
        return to_dataset(x, y, f"{path}:{chosen}")
    base = kind.removesuffix("-raw")
    loader = {"digits": load_digits, "mnist": load_mnist, "fashion-mnist": load_fashion}[base]
    x, y = loader(chosen, STANDARDISE.get(kind))
    return to_dataset(x, y, f"{kind}:{chosen}")


def describe_source(src: str, split: str | None = None) -> dict:
    """What a map file records about its data: the source as given, the split used, size and input shape."""
    _, _, chosen = _resolve(src, split)
    ds = load_source(src, split)
    return {
        "source": src,
        "split": chosen,
        "num_samples": len(ds),
        "input_shape": list(ds.x.shape[1:]),
    }


def has_val_split(src: str) -> bool:
    """Whether ``src`` provides its own val split: built-in sets and data folders do, ``.npz`` files not."""
    return _resolve(src, None)[0] != "npz"


def _resolve(src: str, split: str | None) -> tuple[str, Path | None, str | None]:
    """Classify ``src`` as ("npz", path, None), (folder kind, dir, split) or (builtin name, None, split).

    Folder kinds are "idx", "cifar10", "cifar100" and "images" (see :func:`_folder_kind`).

    Built-in names win over same-named files in the working directory; write ``./mnist`` for those.
    """
    if not isinstance(src, str) or not src:
        raise DataError("data source must be a non-empty string")
    name, suffix = src.rsplit(":", 1) if ":" in src else (src, None)
    if name.strip().lower() in BUILTIN_SOURCES:
        return name.strip().lower(), None, check_split(suffix if suffix is not None else split)
    path = Path(src).expanduser()
    if path.is_dir():
        return _folder_kind(path), path, check_split(split)
    if path.is_file() or src.lower().endswith(".npz"):
        return "npz", path, None
    if suffix is not None:
        base = Path(name).expanduser()
        if base.is_dir():
            return _folder_kind(base), base, check_split(suffix)
        if base.is_file():
            raise DataError(f"{name}: an .npz file holds a single set and takes no ':{suffix}' split")
    if os.sep in src or src.startswith((".", "~")):
        raise DataError(f"{src}: no such file or directory")
    raise DataError(
        f"unknown data source {src!r}: give an .npz file, a data folder (IDX, CIFAR or images in class "
        f"sub-folders) or one of {', '.join(BUILTIN_SOURCES)}"
    )


def _folder_kind(directory: Path) -> str:
    """Recognise a data folder by its files: IDX files, CIFAR-10 batches (``data_batch_1`` or
    ``test_batch``), CIFAR-100 files (``meta`` with ``train`` or ``test``), else sub-folders of images."""
    if any(p is not None for p in idx_paths(directory).values()):
        return "idx"
    cifar = cifar_kind(directory)
    if cifar is not None:
        return cifar
    subdirs = visible_subdirs(directory)
    nested = next((d for d in subdirs if cifar_kind(d) is not None), None)
    if nested is not None:
        raise DataError(f"{directory}: the CIFAR files are in its sub-folder {nested.name}/: pass {nested}")
    if subdirs:
        return "images"
    raise DataError(f"{directory}: not a data folder; expected {_FOLDER_EXPECTED}")
