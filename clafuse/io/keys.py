"""Key handling between reading a checkpoint and detecting its architecture.

Checkpoints from other tools name their tensors in their own way: a Lightning module's
``model.``/``net.`` prefix, a ``backbone.`` or ``encoder.`` wrapper module, custom layer names,
extra tensors such as a loss's ``criterion.weight`` or a normalisation buffer. A :class:`KeyMap`
says how to turn such names into the ones a family knows, in this order:

1. ``ignore``: tensors whose name (as read) matches any of these regular expressions are left out;
2. ``strip_prefix``: only tensors under this prefix are kept, without it (the rest is left out,
   as when picking a sub-module out of a bigger one);
3. ``rename``: ``(OLD, NEW)`` regular-expression substitutions (:func:`re.sub`), in order.

Applying a key map to a checkpoint's names gives a :class:`KeyPlan`: the new name of every kept
tensor and the names left out. The plan inverts exactly (new name -> name as read), which is how
outputs are written back under the input's own names. A key map is recorded per model in the map
file, so ``fuse`` reads each checkpoint exactly as ``align`` did.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from clafuse.errors import ClafuseError


def _compiled(option: str, pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ClafuseError(f"{option}: {pattern!r} is not a valid regular expression ({exc})") from None


class KeyMap(BaseModel):
    """How a checkpoint's tensor names become the names its architecture family knows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strip_prefix: str = Field("", description="keep only tensors under this prefix, without it")
    rename: list[tuple[str, str]] = Field(default_factory=list,
                                          description="(regex, replacement) substitutions applied in order")
    ignore: list[str] = Field(default_factory=list, description="regexes of tensor names (as read) left out")

    @field_validator("rename")
    @classmethod
    def _renames_compile(cls, value: list[tuple[str, str]]) -> list[tuple[str, str]]:
        for old, new in value:
            try:
                re.compile(old).sub(new, "")
            except (re.error, IndexError) as exc:
                raise ValueError(f"rename {old!r}={new!r}: {exc}") from None
        return value

    @field_validator("ignore")
    @classmethod
    def _ignores_compile(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"ignore {pattern!r}: {exc}") from None
        return value

    @classmethod
    def from_options(cls, strip_prefix: str | None = None, rename: Sequence[str] | Sequence[tuple[str, str]] = (),
                     ignore: Sequence[str] = ()) -> "KeyMap":
        """A key map from command-line style options: ``rename`` items are ``OLD=NEW`` (split at the
        first ``=``) or pairs; every regular expression is checked here."""
        pairs = []
        for item in rename or ():
            if isinstance(item, str):
                if "=" not in item:
                    raise ClafuseError(f"--rename: {item!r} is not OLD=NEW (a regular expression and its replacement)")
                old, new = item.split("=", 1)
            else:
                old, new = item
            if not old:
                raise ClafuseError(f"--rename: {item!r} has an empty pattern")
            pattern = _compiled("--rename", old)
            try:
                pattern.sub(new, "")
            except (re.error, IndexError) as exc:
                raise ClafuseError(f"--rename: replacement {new!r} is not valid for {old!r} ({exc})") from None
            pairs.append((old, new))
        for pattern in ignore or ():
            _compiled("--ignore-keys", pattern)
        return cls(strip_prefix=strip_prefix or "", rename=pairs, ignore=list(ignore or ()))

    @property
    def is_identity(self) -> bool:
        return not (self.strip_prefix or self.rename or self.ignore)

    def with_prefix(self, prefix: str) -> "KeyMap":
        return self.model_copy(update={"strip_prefix": prefix})

    def kept(self, names: Iterable[str]) -> list[str]:
        """The names (as read) that no ``ignore`` pattern matches."""
        patterns = [re.compile(p) for p in self.ignore]
        return [n for n in names if not any(p.search(n) for p in patterns)]

    def apply(self, names: Iterable[str], source: str = "checkpoint") -> "KeyPlan":
        """The plan for a checkpoint holding ``names``: new name of every kept tensor, names left out.
        Raise ClafuseError when two tensors would get the same name or none is left."""
        names = list(names)
        kept = set(self.kept(names))
        renames = [(re.compile(old), new) for old, new in self.rename]
        mapping: dict[str, str] = {}
        ignored: list[str] = []
        for name in names:
            if name not in kept or not name.startswith(self.strip_prefix):
                ignored.append(name)
                continue
            new = name[len(self.strip_prefix):]
            for pattern, repl in renames:
                new = pattern.sub(repl, new)
            if not new:
                raise ClafuseError(f"{source}: key handling turns {name!r} into an empty name")
            if new in mapping:
                raise ClafuseError(f"{source}: key handling gives {mapping[new]!r} and {name!r} the same name {new!r}")
            mapping[new] = name
        if not mapping:
            what = f"no tensor name starts with {self.strip_prefix!r}" if self.strip_prefix and kept else \
                "every tensor is ignored"
            raise ClafuseError(f"{source}: {what} ({len(names)} tensors, e.g. {names[0]!r})")
        return KeyPlan(self, mapping, ignored)

    def describe(self) -> str:
        """The key handling in words, for tables and messages."""
        parts = []
        if self.strip_prefix:
            parts.append(f"prefix '{self.strip_prefix}' stripped")
        parts += [f"'{old}' renamed to '{new}'" for old, new in self.rename]
        if self.ignore:
            parts.append("ignoring " + ", ".join(f"'{p}'" for p in self.ignore))
        return "; ".join(parts) or "names as read"


@dataclass(frozen=True)
class KeyPlan:
    """A key map applied to one checkpoint: ``names`` maps each new name to the name as read (in
    the checkpoint's order); ``ignored`` lists the names as read that were left out."""

    keys: KeyMap
    names: dict[str, str]
    ignored: list[str]

    def view(self, state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """``state_dict`` under the new names, without the ignored tensors; a lazy state dict stays
        lazy (nothing is read)."""
        if self.keys.is_identity:
            return state_dict
        renamed = getattr(state_dict, "renamed", None)
        if renamed is not None:
            return renamed(self.names)
        return {new: state_dict[old] for new, old in self.names.items()}

    def original(self, name: str) -> str:
        """The name as read of the tensor now called ``name``."""
        try:
            return self.names[name]
        except KeyError:
            raise ClafuseError(f"tensor {name!r} is not in the checkpoint the key map was applied to") from None


def common_prefixes(names: Sequence[str]) -> list[str]:
    """Every dotted prefix all ``names`` share (``model.``, ``model.backbone.``, ...), shortest
    first; a name is never emptied."""
    if not names:
        return []
    split = [n.split(".") for n in names]
    out = []
    for depth in range(1, min(len(s) for s in split)):
        head = split[0][:depth]
        if any(s[:depth] != head for s in split):
            break
        out.append(".".join(head) + ".")
    return out


def module_groups(names: Iterable[str]) -> dict[str, list[str]]:
    """Names grouped by their module (everything before the last dot), in first-seen order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.rpartition(".")[0], []).append(name)
    return groups


def top_level_counts(names: Iterable[str]) -> str:
    """``model (12), criterion (1)``: how many names start with each first component."""
    counts: dict[str, int] = {}
    for name in names:
        head = name.split(".", 1)[0]
        counts[head] = counts.get(head, 0) + 1
    shown = [f"{head} ({n})" for head, n in list(counts.items())[:8]]
    return ", ".join(shown) + (f" and {len(counts) - 8} more" if len(counts) > 8 else "")
