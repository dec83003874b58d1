"""The registry of architecture families and the lookup of a checkpoint's family and spec.

New families (VGG, ResNet, ...) are added by registering a :class:`~clafuse.arch.base.Family`
subclass; alignment and fusion never special-case a family by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from pydantic import BaseModel, ValidationError

from clafuse.arch.base import Family
from clafuse.arch.bert import BertFamily
from clafuse.arch.mlp import MLPFamily
from clafuse.arch.resnet import ResNetFamily
from clafuse.arch.vit import ViTFamily
from clafuse.arch.vgg import VGGFamily
from clafuse.errors import SpecError
from clafuse.io.inputs import MAX_TEXT_BYTES, read_input_text

FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add ``family`` to the registry under its name."""
    FAMILIES[family.name] = family
    return family


register(BertFamily())
register(ViTFamily())
register(ResNetFamily())
register(VGGFamily())
register(MLPFamily())


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise SpecError(f"unknown family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None


def detect(state_dict: Mapping[str, torch.Tensor],
           config: Mapping[str, Any] | None = None) -> tuple[Family, BaseModel]:
    """Find the one family that recognises ``state_dict`` (with its folder's ``config.json``, if
    any); say what was found when none does."""
    for family in FAMILIES.values():
        spec = family.detect_config(state_dict, config)
        if spec is not None:
            return family, spec
    sample = ", ".join(f"{k} {tuple(v.shape)}" for k, v in list(state_dict.items())[:4])
    raise SpecError(f"cannot tell the architecture of {len(state_dict)} tensors ({sample}, ...); "
                    f"pass --arch with a spec file (families: {', '.join(sorted(FAMILIES))})")


def parse_spec(data: object, source: str = "spec") -> tuple[Family, BaseModel]:
    """Validate a spec document (already parsed from JSON/YAML) into its family's spec model."""
    if not isinstance(data, dict) or not isinstance(data.get("family"), str):
        raise SpecError(f"{source}: a spec is a mapping with a 'family' field")
    family = get_family(data["family"])
    try:
        return family, family.spec_model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "spec"
        raise SpecError(f"{source}: {where}: {first['msg']}") from None


def load_spec(path: str | Path) -> tuple[Family, BaseModel]:
    """Read a JSON or YAML spec file."""
    path = Path(path)
    text = read_input_text(path, "spec file", SpecError, MAX_TEXT_BYTES)
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, ValueError, RecursionError) as exc:
        first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise SpecError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({first})") from None
    return parse_spec(data, str(path))


def resolve(state_dict: Mapping[str, torch.Tensor], arch: str | Path | None = None,
            config: Mapping[str, Any] | None = None) -> tuple[Family, BaseModel]:
    """The family and spec of ``state_dict``: from the spec file ``arch``, checked against the
    weights, or detected (with ``config``, a model folder's ``config.json``)."""
    if arch is None:
        return detect(state_dict, config)
    family, spec = load_spec(arch)
    try:
        family.check(spec, state_dict)
    except SpecError as exc:
        raise SpecError(f"{arch} does not fit the checkpoint: {exc}") from None
    return family, spec
