"""``align``: the optimal order-preserving mapping of every model's layers to an anchor's."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

import clafuse
from clafuse import progress
from clafuse.align.costs import activation_cost, neuron_cost
from clafuse.align.dp import solve_alignment
from clafuse.align.mapfile import (
    Alignment,
    DataEntry,
    GroupAlignment,
    GroupEntry,
    LayerEntry,
    MapFile,
    ModelEntry,
    Settings,
    dump_map,
)
from clafuse.api.common import DEFAULT_SAMPLES, calibration, check_activations, is_path, model_index, rel_path
from clafuse.api.models import LoadedModel, check_fits, load_model
from clafuse.data.common import check_varied
from clafuse.data.normalize import Normalization
from clafuse.errors import ClafuseError
from clafuse.io.atomic import sha256_file, write_text_atomic
from clafuse.io.keys import KeyMap
from clafuse.options import Metric, check_choice, check_integer, check_seed


def _check_pair(models: Sequence[LoadedModel], deep: int, shallow: int) -> None:
    """The shallower model must fit into the deeper one group by group."""
    gd_all, gs_all = models[deep].groups, models[shallow].groups
    if len(gd_all) != len(gs_all):
        raise ClafuseError(f"{models[shallow].path} has {len(gs_all)} alignment groups "
                           f"({', '.join(g.name for g in gs_all)}) but {models[deep].path} has {len(gd_all)}")
    for gd, gs in zip(gd_all, gs_all):
        if len(gs.layers) > len(gd.layers):
            raise ClafuseError(f"group {gd.name!r}: {models[shallow].path} has more layers ({len(gs.layers)}) than "
                               f"{models[deep].path} ({len(gd.layers)}), although it is not deeper overall")
        if not gs.layers:
            raise ClafuseError(f"group {gd.name!r} of {models[shallow].path} has no hidden layer to align")


def _align_pair(models: Sequence[LoadedModel], deep: int, shallow: int, metric: str,
                acts: Sequence[list[torch.Tensor]] | None, pin_first: bool, pin_last: bool) -> Alignment:
    """Layer costs and the optimal order-preserving mapping of ``shallow``'s layers into ``deep``'s."""
    groups = []
    offset_d = offset_s = 0
    for gd, gs in zip(models[deep].groups, models[shallow].groups):
        nd, ns = len(gd.layers), len(gs.layers)
        if metric == "neuron":
            cost = neuron_cost([l.width for l in gs.layers], [l.width for l in gd.layers])
        else:
            cost = activation_cost(acts[shallow][offset_s:offset_s + ns], acts[deep][offset_d:offset_d + nd], metric)
        # A forced first pin (a stage's strided block) wins; otherwise one shallow layer cannot be
        # pinned to both ends and keeps the last pin.
        if gd.pin_first:
            first, last = True, pin_last and ns > 1
        else:
            first, last = pin_first and not (ns == 1 and pin_last and nd > 1), pin_last
        mapping, total = solve_alignment(cost, pin_first=first, pin_last=last)
        groups.append(GroupAlignment(name=gd.name, cost=[[round(float(c), 10) for c in row] for row in cost],
                                     mapping=mapping, total_cost=round(total, 10)))
        offset_d += nd
        offset_s += ns
    return Alignment(shallow=shallow, deep=deep, groups=groups)


def align(paths: Sequence[str | os.PathLike], out: str | os.PathLike | None = None, *,
          archs: Sequence[str | os.PathLike | None] | None = None, data: str | None = None,
          samples: int = DEFAULT_SAMPLES, metric: Metric = "cka", seed: int = 0,
          pin_first: bool = True, pin_last: bool = True, anchor: str | int | None = None,
          keys: KeyMap | None = None, normalize: str | None = None) -> MapFile:
    """Align the layers of every checkpoint to an anchor's and write the map to ``out``.

    The anchor is the deepest model unless ``anchor`` names another (letter, index, path, deep or
    shallow); it is the architecture ``fuse`` targets by default. For each other model, per
    alignment group, the layer cost matrix between it and the anchor (shallower x deeper) is
    computed (``metric``) and the optimal order-preserving mapping solved by DP. ``keys`` is the
    key handling of every checkpoint (a shared prefix is stripped per model where needed); what
    each model needed is recorded in the map, so ``fuse`` reads the checkpoints the same way.
    ``normalize`` (``--normalize`` text) standardises the calibration inputs; it is recorded with
    the data.
    """
    if len(paths) < 2:
        raise ClafuseError(f"align needs at least two checkpoints, got {len(paths)}")
    check_choice("--metric", metric, Metric)
    check_integer("--samples", samples, at_least=2)
    check_seed("--seed", seed)
    norm = Normalization.parse(normalize)
    if norm is not None and metric == "neuron":
        raise ClafuseError("--normalize applies to calibration data, which --metric neuron does not use")
    archs = list(archs) if archs else [None] * len(paths)
    with progress.step(f"reading {len(paths)} checkpoints"):
        models = [load_model(p, a, lazy=True, keys=keys) for p, a in zip(paths, archs)]
    for m in models[1:]:
        if m.family.name != models[0].family.name:
            raise ClafuseError(f"cannot align a {models[0].family.name} with a {m.family.name} ({m.path})")
    depths = [m.depth for m in models]
    center = model_index("deep" if anchor is None else anchor, paths, depths, "--anchor")
    pairs = []
    for i in range(len(models)):
        if i == center:
            continue
        deep, shallow = (center, i) if depths[center] >= depths[i] else (i, center)
        _check_pair(models, deep, shallow)
        pairs.append((deep, shallow))
    base = Path(out).parent if out else Path.cwd()
    data_entry = None
    acts = None
    if metric != "neuron":
        if data is None:
            raise ClafuseError(f"metric {metric!r} needs calibration data: pass --data (or use --metric neuron)")
        x = calibration(data, samples, seed, normalize=norm)
        is_file = is_path(data)
        data_entry = DataEntry(source=rel_path(Path(data), base) if is_file else data, split="train", samples=samples,
                               seed=seed, sha256=sha256_file(data) if Path(data).is_file() else None,
                               normalize=norm.to_list() if norm is not None else None)
        for m in models:
            check_fits(m, x, f"data {data}")
        check_varied(x, f"data {data}")
        with progress.step(f"recording activations of {len(models)} models on {samples} samples"):
            acts = []
            for k, m in enumerate(models):
                acts.append(m.layer_outputs(x))
                progress.advance(k + 1, len(models), str(m.path))
        for m, layer_acts in zip(models, acts):
            check_activations(layer_acts, [l.name for g in m.groups for l in g.layers], m.path, f"data {data}")
    with progress.step("aligning layers"):
        alignments = [_align_pair(models, deep, shallow, metric, acts, pin_first, pin_last) for deep, shallow in pairs]
    if len(models) == 2:
        roles = ["deep" if i == pairs[0][0] else "shallow" for i in range(2)]
    else:
        roles = ["anchor" if i == center else "member" for i in range(len(models))]
    entries = [
        ModelEntry(path=rel_path(m.path, base), sha256=m.sha256, family=m.family.name,
                   spec=m.spec.model_dump(mode="json"),
                   groups=[GroupEntry(name=g.name, layers=[LayerEntry(name=l.name, width=l.width) for l in g.layers])
                           for g in m.groups],
                   role=role, keys=None if m.keys.is_identity else m.keys)
        for m, role in zip(models, roles)
    ]
    doc = MapFile(tool=f"clafuse {clafuse.__version__}", models=entries, anchor=center,
                  settings=Settings(metric=metric, pin_first=pin_first, pin_last=pin_last),
                  data=data_entry, alignments=alignments)
    if out is not None:
        with progress.step(f"writing {out}"):
            write_text_atomic(out, dump_map(doc))
    return doc
