"""The one step between reading a checkpoint and using it: key handling, then the architecture.

:func:`resolve_keys` applies the user's :class:`~clafuse.io.keys.KeyMap` to the names as read and
finds the family and spec. When nothing fits and no prefix was given, it strips a prefix that all
names share (``model.``, ``net.``, ``backbone.``, ...) if the rest then fits, and records it in the
key map it returns. When still nothing fits, it looks for the culprit: the module whose tensors,
left out, let the rest fit; the error names them and the ``--ignore-keys`` pattern that leaves
them out, rather than the first few tensors.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel

from clafuse.arch.base import Family
from clafuse.arch.registry import FAMILIES, load_spec
from clafuse.errors import SpecError
from clafuse.io.keys import KeyMap, KeyPlan, common_prefixes, module_groups, top_level_counts

_MAX_CULPRIT_GROUPS = 2000  # leave-one-module-out tries at most this many modules


@dataclass
class Resolved:
    """A checkpoint's tensors under the names its family knows, with how they were obtained."""

    state_dict: Mapping[str, torch.Tensor]
    plan: KeyPlan
    family: Family
    spec: BaseModel

    @property
    def keys(self) -> KeyMap:
        return self.plan.keys


def _shapes(state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    skeleton = getattr(state_dict, "skeleton", None)
    return skeleton() if skeleton is not None else state_dict


def _detect(shapes: Mapping[str, torch.Tensor], spec_file: tuple[Family, BaseModel] | None,
            config: Mapping[str, Any] | None = None,
            recorded: tuple[Family, BaseModel] | None = None) -> tuple[Family, BaseModel] | SpecError | None:
    """The family and spec that fit ``shapes``: the spec file's, else the ``recorded`` spec if it
    fits, else detected (with a model folder's ``config.json``, if any); else the first specific
    complaint, else None."""
    if spec_file is not None:
        family, spec = spec_file
        try:
            family.check(spec, shapes)
        except SpecError as exc:
            return exc
        return family, spec
    if recorded is not None:
        try:
            recorded[0].check(recorded[1], shapes)
            return recorded
        except SpecError:
            pass
    complaint = None
    for family in FAMILIES.values():
        try:
            spec = family.detect_config(shapes, config)
        except SpecError as exc:
            complaint = complaint or exc
            continue
        if spec is not None:
            return family, spec
    return complaint


def resolve_keys(raw: Mapping[str, torch.Tensor], keys: KeyMap | None = None,
                 arch: str | os.PathLike | None = None, source: str = "checkpoint",
                 config: Mapping[str, Any] | None = None,
                 recorded: tuple[Family, BaseModel] | None = None) -> Resolved:
    """Apply ``keys`` to ``raw`` (names as read) and find the architecture (from the spec file
    ``arch``, else the spec the checkpoint ``recorded`` when it fits, else detected), stripping a
    shared prefix automatically when that makes it fit."""
    keys = keys or KeyMap()
    spec_file = load_spec(arch) if arch is not None else None
    plans = [keys.apply(raw, source)]
    if not keys.strip_prefix:
        plans += [keys.with_prefix(p).apply(raw, source) for p in common_prefixes(keys.kept(raw))]
    first_complaint = None
    for plan in plans:
        state = plan.view(raw)
        found = _detect(_shapes(state), spec_file, config, recorded)
        if isinstance(found, tuple):
            return Resolved(state, plan, *found)
        first_complaint = first_complaint or found
    hint = _culprit(plans, raw, spec_file)
    if hint is not None:
        raise SpecError(f"{source}: {hint}")
    names = list(plans[0].view(raw))
    advice = ("use --strip-prefix, --rename OLD=NEW or --ignore-keys PATTERN to make the names fit, or pass "
              f"--arch with a spec file (families: {', '.join(sorted(FAMILIES))})")
    if first_complaint is not None:
        what = f"{arch} does not fit the checkpoint" if spec_file is not None else "does not fit"
        raise SpecError(f"{source}: {what}: {first_complaint}; {advice}")
    raise SpecError(f"{source}: cannot tell the architecture of {len(names)} tensors (names under: "
                    f"{top_level_counts(names)}); {advice}")


def _culprit(plans: list[KeyPlan], raw: Mapping[str, torch.Tensor],
             spec_file: tuple[Family, BaseModel] | None) -> str | None:
    """Which module's tensors keep the rest from fitting: try leaving out one module at a time."""
    for plan in plans:
        state = plan.view(raw)
        shapes = _shapes(state)
        groups = module_groups(shapes)
        if len(groups) < 2 or len(groups) > _MAX_CULPRIT_GROUPS:
            continue
        for module, names in groups.items():
            rest = {k: v for k, v in shapes.items() if k not in set(names)}
            found = _detect(rest, spec_file)
            if isinstance(found, tuple):
                originals = [plan.original(n) for n in names]
                shown = ", ".join(f"{n} {tuple(shapes[k].shape)}" for n, k in zip(originals, names))
                pattern = "^" + re.escape(originals[0].rpartition(".")[0] + ".") if module else \
                    "^(" + "|".join(re.escape(n) for n in originals) + ")$"
                prefix = f" after stripping {plan.keys.strip_prefix!r}" if plan.keys.strip_prefix else ""
                many = len(names) > 1
                return (f"{len(names)} tensor{'s' if many else ''} ({shown}) {'do' if many else 'does'} not fit the "
                        f"{found[0].name} layout the other {len(shapes) - len(names)} have{prefix}; "
                        f"pass --ignore-keys '{pattern}' to leave them out")
    return None
