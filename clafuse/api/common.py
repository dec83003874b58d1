"""Helpers the API commands share: calibration inputs, relative paths and model naming."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import torch

from clafuse import progress
from clafuse.data import BUILTIN_SOURCES, Dataset, calibration_inputs, load_source
from clafuse.data.normalize import Normalization, normalized, raw_pixel_warning
from clafuse.errors import ClafuseError, DataError

DEFAULT_SAMPLES = 2000
log = logging.getLogger("clafuse")


def rel_path(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), base.resolve())
    except ValueError:
        return str(path.resolve())


def load_data(source: str, split: str | None = None, normalize: Normalization | str | None = None) -> Dataset:
    """``source`` loaded (:func:`~clafuse.data.load_source`) and standardised by ``normalize``
    (a :class:`~clafuse.data.normalize.Normalization` or ``--normalize`` text). Files and folders
    read without it are checked for raw pixels fed to a model that likely expects standardised
    inputs (a warning, see :func:`~clafuse.data.normalize.raw_pixel_warning`)."""
    norm = Normalization.parse(normalize) if isinstance(normalize, str) else normalize
    with progress.step(f"reading data {source}"):
        ds = load_source(source, split)
    if norm is not None:
        return normalized(ds, norm)
    if is_path(source) and source.split(":", 1)[0].strip().lower() not in BUILTIN_SOURCES:
        warning = raw_pixel_warning(ds.x, source)
        if warning is not None:
            log.warning(warning)
    return ds


def calibration(source: str, samples: int, seed: int, base: Path | None = None,
                normalize: Normalization | str | None = None) -> torch.Tensor:
    """``samples`` calibration inputs from ``source``'s train split, standardised by ``normalize``;
    a relative file path is taken relative to ``base`` (the map's folder) when given."""
    if base is not None and is_path(source) and not Path(source).is_absolute():
        source = str(base / source)
    return calibration_inputs(load_data(source, None, normalize), samples, seed)


def check_activations(acts: Sequence[torch.Tensor], names: Sequence[str], model: object, what: str) -> None:
    """Refuse layer outputs with NaN or Inf: calibration inputs so large that ``model`` overflows
    would otherwise give undefined costs (and a map that looks valid)."""
    for name, z in zip(names, acts):
        if not bool(torch.isfinite(z).all()):
            raise DataError(f"{what}: layer {name} of {model} gives NaN or infinite activations on the calibration "
                            "inputs (values too large for the model?)")


def is_path(source: str) -> bool:
    return source.endswith(".npz") or os.sep in source or Path(source).exists()


def model_letter(index: int) -> str:
    """Models are named A, B, C, ... in align order (AA, AB, ... past Z)."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("A") + rest) + letters
    return letters


def model_index(choice: str | int, paths: Sequence[str | os.PathLike], depths: Sequence[int], what: str) -> int:
    """A model chosen by letter (A, B, ...), 0-based index, path as given, or ``deep``/``shallow``."""
    if isinstance(choice, int) or (isinstance(choice, str) and choice.isdigit()):
        index = int(choice)
        if 0 <= index < len(paths):
            return index
    else:
        if choice == "deep":
            return max(range(len(depths)), key=lambda i: (depths[i], -i))
        if choice == "shallow":
            return min(range(len(depths)), key=lambda i: (depths[i], i))
        letters = [model_letter(i) for i in range(len(paths))]
        if choice.upper() in letters:
            return letters.index(choice.upper())
        matches = [i for i, p in enumerate(paths) if str(p) == choice]
        if len(matches) == 1:
            return matches[0]
    names = ", ".join(model_letter(i) for i in range(len(paths)))
    raise ClafuseError(f"{what} {choice!r} names no model: use deep, shallow, a letter ({names}) or an index")
