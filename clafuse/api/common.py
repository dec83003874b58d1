"""Helpers the API commands share: calibration inputs, relative paths and model naming."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from clafuse import progress
from clafuse.data import BUILTIN_SOURCES, Dataset, calibration_inputs, load_source
from clafuse.data.normalize import Normalization, normalized, raw_pixel_warning
from clafuse.errors import ClafuseError, DataError

if TYPE_CHECKING:
    from clafuse.textdata import TokenBatch

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
    return calibration_inputs(load_data(resolved_source(source, base), None, normalize), samples, seed)


def resolved_source(source: str, base: Path | None) -> str:
    """A map's data source as a path from here: a file named relative to the map's folder ``base``
    (a bare file name too, e.g. ``sentences.txt``); built-in names stay as they are."""
    if base is not None and not Path(source).is_absolute() and (is_path(source) or (base / source).exists()):
        return str(base / source)
    return source


def model_calibration(models: Sequence[Any], source: str, samples: int, seed: int,
                      base: Path | None = None, normalize: Normalization | str | None = None) -> torch.Tensor:
    """Calibration inputs for ``models`` (loaded models of one family): as :func:`calibration`, or
    for text models token ids and masks packed as (n, 2, length) (:func:`~clafuse.textdata.pack_tokens`)
    from a sentence file (tokenized with the first model folder's ``tokenizer.json``) or an
    ``.npz`` of ``input_ids`` and ``attention_mask``: ``samples`` rows drawn with ``seed`` (all of
    them, in the seed's order, when there are fewer: the order a search's split uses)."""
    if models[0].family.token_limits(models[0].spec) is None:
        return calibration(source, samples, seed, base, normalize=normalize)
    from clafuse.textdata import pack_tokens

    batch = text_calibration(models, source, base, normalize)
    batch = batch.subset(torch.randperm(len(batch), generator=torch.Generator().manual_seed(int(seed)))[:samples])
    return pack_tokens(batch)


def text_calibration(models: Sequence[Any], source: str, base: Path | None = None,
                     normalize: Normalization | str | None = None) -> "TokenBatch":
    """Every sentence of a text calibration source for ``models`` (text models of one family), as
    token ids and masks: a sentence file tokenized with the first model folder's ``tokenizer.json``,
    or an ``.npz`` of ``input_ids`` and ``attention_mask``; checked against the models' positions
    and vocabulary."""
    if normalize is not None:
        raise DataError("--normalize applies to image and array data, not to text")
    from clafuse.textdata import DEFAULT_MAX_LENGTH, load_text_calibration

    limits = [m.family.token_limits(m.spec) for m in models]
    path = Path(source)
    if base is not None and not path.is_absolute():
        path = base / path
    tokenizer = next((m.folder.tokenizer_json for m in models
                      if m.folder is not None and m.folder.tokenizer_json is not None), None)
    if path.suffix.lower() != ".npz" and tokenizer is None:
        raise DataError(f"data {source}: a sentence file is tokenized with the model's tokenizer.json; give model "
                        "folders that have one, or an .npz of input_ids and attention_mask")
    positions, vocab = min(l[0] for l in limits), min(l[1] for l in limits)
    batch = load_text_calibration(path, tokenizer, max_length=min(DEFAULT_MAX_LENGTH, positions), vocab_size=vocab)
    if batch.input_ids.shape[1] > positions:
        raise DataError(f"data {source}: sequences of {batch.input_ids.shape[1]} tokens exceed the models' "
                        f"{positions} positions")
    return batch


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
