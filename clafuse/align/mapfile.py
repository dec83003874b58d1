"""The map file: what ``align`` found and ``fuse`` consumes, as a versioned JSON document.

Its JSON Schema ships as ``clafuse/schemas/map.schema.json`` (regenerate with
``clafuse schema map``). Paths are stored relative to the map's own folder so that a map moved
together with its checkpoints keeps working; each input's sha256 lets ``fuse`` refuse inputs that
changed since ``align``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from clafuse.errors import MapError
from clafuse.io.inputs import MAX_TEXT_BYTES, read_input_text, sha256_input
from clafuse.io.keys import KeyMap

MAP_FORMAT = "clafuse-map"
MAP_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LayerEntry(_Strict):
    name: str
    width: int = Field(gt=0)


class GroupEntry(_Strict):
    """Layers of one alignment group, in network order."""

    name: str
    layers: list[LayerEntry]


class ModelEntry(_Strict):
    """One input checkpoint: where it is, what it hashed to, and its architecture."""

    path: str = Field(description="checkpoint path, relative to the map file's folder when possible")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    family: str
    spec: dict[str, Any] = Field(description="the architecture spec, as a spec file would hold it")
    groups: list[GroupEntry]
    role: Literal["deep", "shallow", "anchor", "member"]
    keys: KeyMap | None = Field(None, description="how the checkpoint's tensor names were made to fit its family "
                                                  "(absent: used as read); fuse applies the same")

    @model_serializer(mode="wrap")
    def _without_plain_keys(self, handler: Any) -> dict[str, Any]:
        """Maps of checkpoints used as read stay as they were before key handling existed."""
        out = handler(self)
        if out.get("keys") is None:
            out.pop("keys", None)
        return out


class GroupAlignment(_Strict):
    """One group's layer costs and the optimal order-preserving mapping."""

    name: str
    cost: list[list[float]] = Field(description="shallow x deep layer costs")
    mapping: list[int] = Field(description="for each shallow layer, the 0-based index of its deep layer")
    total_cost: float

    @model_validator(mode="after")
    def _consistent(self) -> "GroupAlignment":
        n = len(self.cost)
        m = len(self.cost[0]) if n else 0
        if any(len(row) != m for row in self.cost):
            raise ValueError("cost rows differ in length")
        if len(self.mapping) != n:
            raise ValueError(f"mapping has {len(self.mapping)} entries for {n} shallow layers")
        if any(not 0 <= j < m for j in self.mapping) or any(a >= b for a, b in zip(self.mapping, self.mapping[1:])):
            raise ValueError("mapping must be strictly increasing indices into the deep layers")
        return self


class Alignment(_Strict):
    """How the shallow model's layers map into the deep model's, group by group."""

    shallow: int = Field(ge=0, description="index into models")
    deep: int = Field(ge=0, description="index into models")
    groups: list[GroupAlignment]


class DataEntry(_Strict):
    """The calibration data align used (fuse reuses it unless told otherwise)."""

    source: str
    split: str
    samples: int = Field(gt=1)
    seed: int
    sha256: str | None = None
    normalize: list[list[float]] | None = Field(None, description="[means, stds] per channel the inputs were "
                                                                  "standardised with (absent: used as read)")

    @model_serializer(mode="wrap")
    def _without_plain_normalize(self, handler: Any) -> dict[str, Any]:
        """Maps of data used as read stay as they were before --normalize existed."""
        out = handler(self)
        if out.get("normalize") is None:
            out.pop("normalize", None)
        return out


class Settings(_Strict):
    metric: Literal["cka", "euclidean", "wd", "neuron"]
    pin_first: bool
    pin_last: bool


class MapFile(_Strict):
    """A clafuse alignment map."""

    format: Literal["clafuse-map"] = MAP_FORMAT
    version: Literal[1] = MAP_VERSION
    tool: str
    models: list[ModelEntry] = Field(min_length=2)
    anchor: int = Field(ge=0, description="index of the model whose architecture fusion targets by default")
    settings: Settings
    data: DataEntry | None
    alignments: list[Alignment] = Field(min_length=1)

    @model_validator(mode="after")
    def _indices(self) -> "MapFile":
        count = len(self.models)
        if self.anchor >= count:
            raise ValueError(f"anchor {self.anchor} is not a model index")
        pairs: dict[frozenset[int], int] = {}
        for k, a in enumerate(self.alignments):
            pair = frozenset((a.shallow, a.deep))
            if pair in pairs:
                raise ValueError(f"alignments {pairs[pair]} and {k} both align models {a.shallow} and {a.deep}; "
                                 "a map holds one alignment per pair")
            pairs[pair] = k
            if a.shallow >= count or a.deep >= count or a.shallow == a.deep:
                raise ValueError("alignment indices must name two different models")
            deep_groups, shallow_groups = self.models[a.deep].groups, self.models[a.shallow].groups
            if len(a.groups) != len(deep_groups) or len(a.groups) != len(shallow_groups):
                raise ValueError("alignment groups do not match the models' groups")
            for g, dg, sg in zip(a.groups, deep_groups, shallow_groups):
                if len(g.cost) != len(sg.layers) or (g.cost and len(g.cost[0]) != len(dg.layers)):
                    raise ValueError(f"group {g.name!r}: cost matrix shape does not match the layers")
        if self.settings.metric != "neuron" and self.data is None:
            raise ValueError(f"metric {self.settings.metric!r} needs a data entry")
        return self


def map_schema() -> dict[str, Any]:
    """The JSON Schema of the map format."""
    schema = MapFile.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://clafuse.dev/schemas/map.schema.json"
    return schema


def dump_map(doc: MapFile) -> str:
    """Deterministic JSON text (same inputs and seed give the same bytes)."""
    return json.dumps(doc.model_dump(mode="json"), indent=2) + "\n"


def read_map(path: str | Path) -> MapFile:
    """Parse and validate a map file; every defect is a one-line MapError."""
    path = Path(path)
    text = read_input_text(path, "map file", MapError, MAX_TEXT_BYTES)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MapError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (ValueError, RecursionError) as exc:  # a number too long to convert, nesting too deep
        raise MapError(f"{path}: not valid JSON ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    if not isinstance(data, dict) or data.get("format") != MAP_FORMAT:
        raise MapError(f"{path}: not a clafuse map file (missing \"format\": \"{MAP_FORMAT}\")")
    if data.get("version") != MAP_VERSION:
        raise MapError(f"{path}: map version {data.get('version')!r} is not supported (this clafuse reads {MAP_VERSION})")
    try:
        return MapFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "map"
        raise MapError(f"{path}: invalid map: {where}: {first['msg']}") from None


def map_digest(path: str | Path) -> str:
    """sha256 of the map file's bytes, recorded in fused checkpoints."""
    return sha256_input(path, "map file", MapError)


def check_data_digest(doc: MapFile, base: str | Path) -> None:
    """Raise ``MapError`` if the calibration data file the map records (its path taken relative to
    ``base``, the map's folder) is gone or changed since align; as for the checkpoints, a map
    only describes the inputs it was computed from. Named data sets and folders, which the map
    records without a digest, are not checked."""
    entry = doc.data
    if entry is None or entry.sha256 is None:
        return
    path = Path(entry.source)
    if not path.is_absolute():
        path = Path(base) / path
    digest = sha256_input(path, "calibration data file (named in the map)", MapError)
    if digest != entry.sha256:
        raise MapError(f"{path} changed since align (sha256 {digest[:12]}…, the map has {entry.sha256[:12]}…); "
                       "run align again, or pass --data to calibrate on other data")
