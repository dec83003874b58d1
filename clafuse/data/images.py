"""Image folders: one sub-folder of images per class, optionally under train/ val/ test/."""

from __future__ import annotations

import warnings
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import numpy as np

from clafuse.data.cache import cached_split
from clafuse.data.common import MAX_IMAGE_PIXELS, SPLITS, Arrays, check_data_size, decoded_bytes, first_line
from clafuse.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
# Image folders without train/ val/ test/ sub-folders are split like digits: a permutation seeded
# with 0, its first 60% train, the next 20% val, the rest test. A train/ folder without a val/
# beside it gives the last 20% of its own seeded permutation to val.
_IMAGE_TRAIN_FRACTION = 0.6
_IMAGE_VAL_FRACTION = 0.2
_HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def visible_subdirs(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise DataError(f"{directory}: cannot list folder ({first_line(exc)})") from exc


def _image_files(class_dir: Path) -> list[Path]:
    """Image files under ``class_dir`` (sub-folders included, hidden ones skipped), sorted by path."""
    found = []
    for p in class_dir.rglob("*"):
        rel = p.relative_to(class_dir).parts
        if p.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in rel) and p.is_file():
            found.append(p)
    if not found:
        raise DataError(f"{class_dir}: class folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return sorted(found)


def _image_layout(directory: Path) -> dict[str, Path]:
    """The class-folder roots: {"train": .., "val": .., "test": ..} for whichever of ``train/``,
    ``val/``, ``test/`` exist when the sub-folders are only these (``train/`` among them), else
    {"all": directory}."""
    names = {d.name for d in visible_subdirs(directory)}
    if not names <= set(SPLITS):
        return {"all": directory}
    if "train" not in names:
        found = ", ".join(f"{name}/" for name in SPLITS if name in names)
        raise DataError(f"{directory}: split folders need a train/ folder, which gives the classes (found: {found})")
    return {part: directory / part for part in SPLITS if part in names}


def _labelled_images(root: Path, classes: list[str] | None = None) -> list[tuple[Path, int]]:
    """(image, label) pairs of a class-folder root, labels indexing ``classes`` (default: its own
    sorted sub-folder names)."""
    subdirs = visible_subdirs(root)
    if not subdirs:
        raise DataError(f"{root}: no class sub-folders (expected one sub-folder of images per class)")
    names = classes if classes is not None else [d.name for d in subdirs]
    index = {name: i for i, name in enumerate(names)}
    pairs = []
    for d in subdirs:
        if d.name not in index:
            raise DataError(f"{d}: class {d.name!r} is not among the training classes")
        pairs += [(p, index[d.name]) for p in _image_files(d)]
    return pairs


def load_image_folder(directory: Path, split: str) -> Arrays:
    """Splits of an image folder: one sub-folder per class, labels 0..K-1 by sorted folder name.

    With ``train/`` (and optionally ``val/``, ``test/``) as its only sub-folders, each a class folder,
    these are the splits; the classes are those of ``train/``, and without ``val/`` the last 20% of a
    permutation of ``train/`` seeded with 0 is val. Otherwise the whole folder is split like digits:
    a permutation seeded with 0, 60% train, 20% val, 20% test. Images are sorted by class, then path,
    before permuting, so the split depends only on the file names.

    All images must have the same size. They are read as grayscale (N, 1, H, W) if every one is in
    Pillow's "L" or "1" mode, else as RGB (N, 3, H, W); pixels are scaled to [0, 1].
    """
    layout = _image_layout(directory)
    if split == "test" and "all" not in layout and "test" not in layout:
        found = ", ".join(f"{name}/" for name in layout)
        raise DataError(f"{directory}: no test/ folder for the test split (found: {found})")
    if "all" in layout:
        parts = {"all": _labelled_images(directory)}
    else:
        parts = {"train": _labelled_images(layout["train"])}
        classes = [d.name for d in visible_subdirs(layout["train"])]
        for name in ("val", "test"):
            if name in layout:
                parts[name] = _labelled_images(layout[name], classes)

    def build() -> dict[str, Arrays]:
        paths = [p for pairs in parts.values() for p, _ in pairs]
        x = _read_images(paths)
        y = np.array([label for pairs in parts.values() for _, label in pairs], dtype=np.int64)
        out, start = {}, 0
        for name, pairs in parts.items():
            out[name] = (x[start : start + len(pairs)], y[start : start + len(pairs)])
            start += len(pairs)
        if "all" in out:
            x_all, y_all = out.pop("all")
            perm = np.random.default_rng(0).permutation(len(x_all))
            n_train, n_val = int(_IMAGE_TRAIN_FRACTION * len(x_all)), int(_IMAGE_VAL_FRACTION * len(x_all))
            bounds = {"train": perm[:n_train], "val": perm[n_train : n_train + n_val], "test": perm[n_train + n_val :]}
            out.update({name: (x_all[idx], y_all[idx]) for name, idx in bounds.items()})
        elif "val" not in out:
            x_tr, y_tr = out["train"]
            perm = np.random.default_rng(0).permutation(len(x_tr))
            n_train = len(x_tr) - int(_IMAGE_VAL_FRACTION * len(x_tr))
            out["train"] = (x_tr[perm[:n_train]], y_tr[perm[:n_train]])
            out["val"] = (x_tr[perm[n_train:]], y_tr[perm[n_train:]])
        return out

    sources = [p for pairs in parts.values() for p, _ in pairs]
    extra = f"pillow {_pillow_version()}:{_IMAGE_TRAIN_FRACTION}:{_IMAGE_VAL_FRACTION}"
    x, y = cached_split(f"images-{directory.resolve().name}", sources, split, build, extra=extra)
    if len(x) == 0:
        raise DataError(f"{directory}: the {split} split is empty (too few images)")
    return x, y


def _pillow_version() -> str:
    try:
        return distribution("pillow").version
    except PackageNotFoundError:
        raise DataError("image folders need Pillow: pip install pillow") from None


def _read_images(paths: list[Path]) -> np.ndarray:
    """Decode ``paths`` into one float32 (N, C, H, W) array in [0, 1]; C is 1 if all are grayscale.

    A first pass reads only the headers (sizes and modes), so a size mismatch is reported before
    any pixel is decoded.
    """
    try:
        from PIL import Image
    except ImportError:
        raise DataError("image folders need Pillow: pip install pillow") from None

    def open_image(path: Path) -> Image.Image:
        try:
            # Pillow's own bomb check only warns below twice its bound: make every warning an error
            # (the explicit bound below is tighter anyway).
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                return Image.open(path)
        except Exception as exc:
            raise DataError(f"{path}: cannot read image ({first_line(exc)})") from exc

    modes = set()
    first: tuple[Path, tuple[int, int]] | None = None
    for p in paths:
        with open_image(p) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise DataError(f"{p}: image is {im.width}x{im.height} pixels, more than the {MAX_IMAGE_PIXELS} "
                                "pixels clafuse decodes per image")
            if im.mode in _HIGH_BIT_MODES:
                raise DataError(f"{p}: {im.mode} images (16-bit or float pixels) are not supported; use 8-bit images")
            if first is None:
                first = (p, im.size)
            elif im.size != first[1]:
                raise DataError(f"{p}: image is {im.size[0]}x{im.size[1]} pixels but {first[0]} is "
                                f"{first[1][0]}x{first[1][1]}; all images must have the same size")
            modes.add(im.mode)
    grey = modes <= {"L", "1"}
    width, height = first[1]
    check_data_size(decoded_bytes((len(paths), 1 if grey else 3, height, width), 4),
                    f"{len(paths)} images of {width}x{height}")
    out = np.empty((len(paths), 1 if grey else 3, height, width), dtype=np.float32)
    for i, p in enumerate(paths):
        with open_image(p) as im:
            if im.size != first[1]:  # replaced since the first pass
                raise DataError(f"{p}: image changed size while it was read")
            try:
                pixels = np.asarray(im.convert("L" if grey else "RGB"), dtype=np.uint8)
            except Exception as exc:
                raise DataError(f"{p}: cannot read image ({first_line(exc)})") from exc
        out[i] = pixels[None] if grey else pixels.transpose(2, 0, 1)
    out /= 255.0
    return out
