"""Load and save checkpoints as plain ``{name: tensor}`` mappings.

Reads safetensors files, sharded safetensors indexes and torch files (``torch.save`` output,
loaded with ``weights_only=True`` so a checkpoint can never run code). Common training wrappers
(``state_dict`` / ``model_state_dict`` / ``model`` keys, a DataParallel ``module.`` prefix) are
unwrapped. Every failure a user can cause is a one-line ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from clafuse.errors import CheckpointError
from clafuse.io.atomic import AtomicGroup, write_through
from clafuse.io.common import DDP_PREFIX as _DDP_PREFIX
from clafuse.io.common import INDEX_SUFFIX, SAFETENSORS_EXTS, TORCH_EXTS
from clafuse.io.common import one_line as _one_line
from clafuse.io.lazy import lazy_safetensors
from clafuse.io.writer import parse_size, save_safetensors
from clafuse.io.inputs import MAX_TEXT_BYTES, check_input, open_input, read_input_text
from clafuse.io.tensors import admit_tensors

_TORCH_OUTPUT_EXTS = (".pt", ".pth", ".bin", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def _existing_file(path: str | os.PathLike[str]) -> Path:
    """``path`` once it is known to be a regular file (not a FIFO or device, which could block)."""
    return check_input(path, "file", CheckpointError)


def _sniff(p: Path) -> str:
    """Tell safetensors from torch by the file's first bytes, for files with an unknown extension."""
    try:
        with open_input(p, "file", CheckpointError) as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(9)
    except OSError as exc:
        raise CheckpointError(f"{p}: cannot read: {_one_line(exc)}") from exc
    if head.startswith(_ZIP_MAGIC) or head[:1] == bytes([_PICKLE_PROTO]):
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    raise CheckpointError(f"{p}: not a checkpoint (neither a safetensors header nor a torch zip/pickle)")


def format_of(path: str | os.PathLike[str]) -> str:
    """Return ``"safetensors"`` or ``"torch"``: by extension, else by sniffing the file's header."""
    p = Path(path)
    name = p.name.lower()
    if name.endswith(SAFETENSORS_EXTS) or name.endswith(INDEX_SUFFIX):
        return "safetensors"
    if name.endswith(TORCH_EXTS):
        return "torch"
    return _sniff(_existing_file(p))


def _load_safetensors(p: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(p, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{p}: not a valid safetensors file: {_one_line(exc)}") from exc


def _read_weight_map(p: Path) -> dict[str, str]:
    text = read_input_text(p, "safetensors index", CheckpointError, MAX_TEXT_BYTES)
    try:
        weight_map = json.loads(text)["weight_map"]
    except (ValueError, RecursionError, KeyError, TypeError) as exc:  # ValueError: bad JSON
        raise CheckpointError(f"{p}: not a valid safetensors index (needs a \"weight_map\" object)") from exc
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{p}: \"weight_map\" must map tensor names to shard file names")
    for key, shard_name in weight_map.items():
        if key == "__metadata__":
            raise CheckpointError(f"{p}: \"weight_map\" lists \"__metadata__\", which is not a tensor name "
                                  "(an index keeps metadata in its \"metadata\" object)")
        if not isinstance(shard_name, str):
            raise CheckpointError(f"{p}: \"weight_map\" entry {key!r} is a {type(shard_name).__name__}, "
                                  "expected a shard file name")
    for shard_name in dict.fromkeys(weight_map.values()):  # every name is confined before any shard is opened
        _shard_path(p, shard_name)
    return weight_map


def _within(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _shard_path(p: Path, shard_name: str) -> Path:
    """Where the shard ``shard_name`` of index ``p`` is: a file in the index's folder or below.

    Names that are absolute or climb with ``..`` are refused from the name alone, and so are
    names that resolve (through symlinks) outside both the folder the index is named in and the
    folder its file really is in (which is where a Hugging Face cache keeps the shards). The
    refusal never depends on whether the named file exists, so it reveals nothing about files
    outside the folder."""
    parts = shard_name.replace("\\", "/").split("/")
    refused = CheckpointError(f"{p}: shard name {shard_name!r} leaves the index's folder; an index may only "
                              "name shards beside it")
    if not shard_name or "\x00" in shard_name or os.path.isabs(shard_name) or shard_name.startswith(("/", "\\")) \
            or ".." in parts or Path(shard_name).drive:
        raise refused
    shard = p.parent / shard_name
    real = os.path.realpath(shard)
    if not any(_within(real, home) for home in (os.path.realpath(p.parent), os.path.dirname(os.path.realpath(p)))):
        raise refused
    return shard


def _shard_file(p: Path, shard_name: str) -> Path:
    """The confined shard path, checked to be a regular file."""
    shard = _shard_path(p, shard_name)
    try:
        return check_input(shard, "file", CheckpointError)
    except CheckpointError:
        if not shard.exists():
            raise CheckpointError(f"{p}: shard {shard_name!r} listed in the index does not exist") from None
        raise


def _load_index(p: Path) -> dict[str, torch.Tensor]:
    shards: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, shard_name in _read_weight_map(p).items():
        if shard_name not in shards:
            shards[shard_name] = _load_safetensors(_shard_file(p, shard_name))
        if key not in shards[shard_name]:
            raise CheckpointError(f"{p}: tensor {key!r} is not in its shard {shard_name}")
        out[key] = shards[shard_name][key]
    return out


def _load_torch(p: Path) -> Any:
    try:
        with open_input(p, "file", CheckpointError) as fh:
            head = fh.read(4)
    except OSError as exc:
        raise CheckpointError(f"{p}: cannot read: {_one_line(exc)}") from exc
    if not (head.startswith(_ZIP_MAGIC) or head[:1] == bytes([_PICKLE_PROTO])):
        raise CheckpointError(f"{p}: not a torch checkpoint (neither a zip archive nor a pickle)")
    try:
        with warnings.catch_warnings():
            # torch warns about what it unpickles (old protocols, sparse or quantized storages); the
            # tensors themselves are checked after loading and refused with a clear message if unfit.
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _UNSAFE_GLOBAL.search(str(exc))
        if found is None and "Weights only load failed" not in str(exc):
            raise CheckpointError(f"{p}: corrupt torch checkpoint: {_one_line(exc)}") from exc
        what = found.group(1) if found else "torch weights_only load failed"
        raise CheckpointError(
            f"{p}: refusing to load: the pickle contains objects other than tensors ({what}); "
            "clafuse never executes pickled code. If it is a whole model saved with torch.save(model), "
            "re-save its weights where the model's class is importable: torch.save(model.state_dict(), path)"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - torch's unpickler lets IndexError, KeyError, ... escape on bad bytes
        wanted = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", str(exc))
        if isinstance(exc, MemoryError) or wanted:
            size = f" ({int(wanted.group(1)) / 2**30:.1f} GiB for one storage)" if wanted else ""
            raise CheckpointError(f"{p}: cannot allocate the memory its tensors declare{size}; the file is corrupt, "
                                  "or larger than this machine can load") from None
        raise CheckpointError(f"{p}: corrupt or truncated torch checkpoint: {_one_line(exc)}") from exc


def _all_tensors(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(p: Path, obj: Any) -> dict[str, torch.Tensor]:
    """Reduce a loaded object to a flat, non-empty ``{str: Tensor}`` mapping, or refuse."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{p}: expected a mapping of names to tensors, got {type(obj).__name__}")
    prefix = ""
    if not _all_tensors(obj):
        candidates = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        chosen = next((k for k in candidates if _all_tensors(obj[k])), candidates[0] if candidates else None)
        if chosen is not None:
            obj, prefix = obj[chosen], f"{chosen}."
    if not obj:
        raise CheckpointError(f"{p}: checkpoint contains no tensors")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{p}: key {prefix}{key!r} is a {type(key).__name__}, expected a string")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{p}: entry {prefix}{key!r} is a {type(value).__name__}, not a tensor; "
                "expected a plain mapping of names to tensors"
            )
    tensors = admit_tensors(p, {f"{prefix}{k}": v for k, v in obj.items()})
    tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    if all(k.startswith(_DDP_PREFIX) for k in tensors):
        return {k[len(_DDP_PREFIX):]: v for k, v in tensors.items()}
    return tensors


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a checkpoint as ``{name: CPU tensor}``; raise ``CheckpointError`` on anything unusable."""
    p = _existing_file(path)
    if p.name.lower().endswith(INDEX_SUFFIX):
        return _unwrap(p, _load_index(p))
    if format_of(p) == "safetensors":
        return _unwrap(p, _load_safetensors(p))
    return _unwrap(p, _load_torch(p))


def open_checkpoint(path: str | os.PathLike[str]) -> Mapping[str, torch.Tensor]:
    """Like :func:`load_checkpoint`, but a safetensors file or sharded index is opened lazily: a
    :class:`~clafuse.io.lazy.LazyStateDict` that reads each tensor when it is looked up. Torch
    files are loaded eagerly (their pickles cannot be read in part safely)."""
    p = _existing_file(path)
    if p.name.lower().endswith(INDEX_SUFFIX):
        files = {}
        checked: dict[str, Path] = {}
        for key, shard_name in _read_weight_map(p).items():
            if shard_name not in checked:
                checked[shard_name] = _shard_file(p, shard_name)
            files[key] = checked[shard_name]
    elif format_of(p) == "safetensors":
        try:
            with safe_open(p, framework="pt") as fh:
                files = {key: p for key in fh.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{p}: not a valid safetensors file: {_one_line(exc)}") from exc
    else:
        return load_checkpoint(p)
    if not files:
        raise CheckpointError(f"{p}: checkpoint contains no tensors")
    return lazy_safetensors(p, files)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (of the first shard for an index); ``{}`` for torch."""
    p = _existing_file(path)
    if p.name.lower().endswith(INDEX_SUFFIX):
        shards = list(_read_weight_map(p).values())
        if not shards:
            return {}
        p = _shard_file(p, shards[0])
    elif format_of(p) != "safetensors":
        return {}
    try:
        with safe_open(p, framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{p}: not a valid safetensors file: {_one_line(exc)}") from exc


def _checked(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU tensors under string keys; raise on anything else."""
    if not state_dict:
        raise ValueError("refusing to save an empty state dict")
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state dict key {key!r} is a {type(key).__name__}, expected a string")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key] = value.detach().cpu()
    return out


def _prepare(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each owning its whole storage (so that no shared storage is saved)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, value in _checked(state_dict).items():
        t = value.contiguous()
        storage = t.untyped_storage()
        whole = t.storage_offset() == 0 and t.numel() * t.element_size() == storage.nbytes()
        if storage.data_ptr() in seen or not whole:
            t = t.clone()
            storage = t.untyped_storage()
        seen.add(storage.data_ptr())
        out[key] = t
    return out


def output_format(path: str | os.PathLike[str], max_shard_size: str | int | None = None) -> tuple[str, int | None]:
    """The format an output name asks for (``"safetensors"`` or ``"torch"``) and the shard size in
    bytes; raise ``CheckpointError`` for an unsupported extension or shards of a torch file."""
    name = Path(path).name.lower()
    limit = parse_size(max_shard_size)
    if name.endswith(SAFETENSORS_EXTS):
        return "safetensors", limit
    if not name.endswith(_TORCH_OUTPUT_EXTS):
        raise CheckpointError(f"{path}: unsupported output extension, use .safetensors, .pt or .ckpt")
    if limit is not None:
        raise CheckpointError(f"{path}: sharded output (--max-shard-size) needs a .safetensors file name")
    return "torch", None


def save_checkpoint(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    max_shard_size: str | int | None = None,
    group: AtomicGroup | None = None,
) -> list[Path]:
    """Write ``state_dict`` atomically as safetensors (with ``metadata``) or a plain torch dict;
    return the files written.

    Safetensors outputs are streamed tensor by tensor (no second copy in memory) and, above
    ``max_shard_size`` (bytes, or text such as ``"2GB"``), split into shards with an index. The
    torch format (``.pt``/``.pth``/``.bin``) has no header, so ``metadata`` is not stored there;
    the file holds exactly the given keys so ``load_state_dict(strict=True)`` works on it.
    With ``group`` the files are renamed into place when that group commits (together with the
    other outputs of a run).
    """
    p = Path(path)
    kind, limit = output_format(p, max_shard_size)
    if kind == "safetensors":
        return save_safetensors(p, _checked(state_dict), metadata, limit, group=group)
    tensors = _prepare(state_dict)
    write_through(p, lambda tmp: torch.save(tensors, tmp), group)
    return [p]
