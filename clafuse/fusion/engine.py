"""The fusion engine: balanced networks transported into the target's units and mixed, on their
descriptions (:mod:`clafuse.arch.network`) alone.

Each source has been balanced to the target (:mod:`clafuse.fusion.balance`), so its blocks pair
with the target's one to one. Spaces pair through their blocks (inner spaces) or by name (shared
ones: streams, inputs, classes). For every pair of spaces one transport plan is solved, when first
needed, from the units' signature rows (weights, their inputs already moved) and, with the
activation signal, from the units' recorded activations. Every tensor then moves axis by axis
through the plans of the spaces its axes live in, and the target's tensors are mixed key by key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

import numpy as np
import torch

from clafuse.arch.network import Block, Network, Param, Space
from clafuse.errors import ClafuseError
from clafuse.fusion.corrections import correct, record_model, reset_norms
from clafuse.fusion.neurons import activation_ground_cost, move_axis, row_distances, with_tie_break
from clafuse.fusion.transport import sparse_plan, transport_plan
from clafuse.memory import release_memory

if TYPE_CHECKING:
    from clafuse.fusion.otfusion import FusionSettings


@dataclass
class Model:
    """A network taking part in a fusion: its description, tensors and (with calibration data) its
    recorded space activations, site pre-activations (by (block index, site)) and logits."""

    net: Network
    state: Mapping[str, torch.Tensor]
    acts: dict[str, torch.Tensor] | None = None
    pre: dict[tuple[int, str], torch.Tensor] | None = None
    cache: dict[str, torch.Tensor] = field(default_factory=dict)
    mutable: bool = False
    """The tensors were read for this fusion alone: the target's may be mixed in place."""
    consumable: bool = False
    """``state`` is this fusion's own dict: a source's entries are dropped once moved, so that a
    source and its moved copy are not both held in full."""
    context: Network | None = None
    """For a source balanced by merging: the network before its unmatched blocks were dropped or
    folded, recorded in its place (see :func:`record_model`)."""

    def tensor(self, key: str) -> torch.Tensor:
        """A tensor by key, read once per block step (a lazily opened checkpoint reads from disk)."""
        if key not in self.cache:
            self.cache[key] = self.net.tensor(key, self.state)
        return self.cache[key]


def _canon(net: Network, spaces: Mapping[str, Space], name: str) -> str:
    while spaces[name].same_as is not None:
        name = spaces[name].same_as
    return name


def _parts(axes: str | tuple[str, ...]) -> tuple[str, ...]:
    return axes if isinstance(axes, tuple) else (axes,)


def _find_param(net: Network, key: str) -> Param | None:
    for block in (*net.blocks, *net.detached):
        for p in block.params.values():
            if p.key == key:
                return p
    return None


class Pairing:
    """How one balanced source's spaces pair with the target's, and the plans between them."""

    def __init__(self, target: Model, source: Model, solver: str, reg: float, ground: str,
                 use_acts: bool) -> None:
        self.target, self.source = target, source
        self.solver, self.reg, self.ground, self.use_acts = solver, reg, ground, use_acts
        t_net, s_net = target.net, source.net
        if len(t_net.blocks) != len(s_net.blocks) or any(
                a.alignable != b.alignable or (not a.alignable and a.pairing != b.pairing)
                for a, b in zip(t_net.blocks, s_net.blocks)):
            raise ClafuseError("the networks' blocks do not pair up after balancing: "
                               f"{[b.pairing for b in t_net.blocks]} vs {[b.pairing for b in s_net.blocks]}")
        self.t_spaces, self.s_spaces = t_net.all_spaces(), s_net.all_spaces()
        index = {b.name: i for i, b in enumerate(t_net.blocks)}
        self.names: dict[str, str] = {}
        for name, space in self.t_spaces.items():
            if space.owner is not None:
                other = s_net.blocks[index[space.owner]].spaces.get(space.local)
                if other is not None:
                    self.names[name] = other.name
            elif name in self.s_spaces:
                self.names[name] = name
        self.designated: dict[tuple[str, str], str] = {}
        for name in self.names:
            self.designated[self._pair(name)] = name
        self.plans: dict[tuple[str, str], object] = {}
        self.inputs_moved: dict[str, torch.Tensor] = {}

    def _pair(self, t_name: str) -> tuple[str, str]:
        return (_canon(self.target.net, self.t_spaces, t_name),
                _canon(self.source.net, self.s_spaces, self.names[t_name]))

    def plan(self, t_name: str):
        """The plan from the source's units to the target's units of space ``t_name`` (None for
        fixed spaces: inputs and classes)."""
        if self.t_spaces[t_name].fixed:
            return None
        if t_name not in self.names:
            raise ClafuseError(f"the other network has no counterpart for the units of {t_name}")
        pair = self._pair(t_name)
        if pair not in self.plans:
            self.plans[pair] = self._solve(self.designated[pair])
        return self.plans[pair]

    def _solve(self, t_name: str):
        t_space, s_space = self.t_spaces[t_name], self.s_spaces[self.names[t_name]]
        if t_space.heads > 1 or s_space.heads > 1:
            return self._solve_heads(t_name)
        return transport_plan(self._unit_cost(t_name), self.solver, self.reg, sparse=True)

    def _unit_cost(self, t_name: str) -> torch.Tensor:
        """(n_src, n_tgt) ground cost between the units of ``t_name`` and its source counterpart:
        weight signature distances, or activation distances with those as tie-break."""
        t_space, s_name = self.t_spaces[t_name], self.names[t_name]
        rows_t, rows_s = self._signature(t_space, self.s_spaces[s_name])
        cost = row_distances(rows_s, rows_t)
        del rows_t, rows_s
        acts_t = self.target.acts.get(t_name) if self.use_acts and self.target.acts else None
        acts_s = self.source.acts.get(s_name) if self.use_acts and self.source.acts else None
        if acts_t is not None and acts_s is not None:
            cost = with_tie_break(activation_ground_cost(acts_s, acts_t, self.ground), cost)
        return cost

    def _solve_heads(self, t_name: str):
        """Plans of every head space of ``t_name``'s block at once: per pair of heads and space,
        the plan between their units and its cost; heads assigned by the summed cost (each space's
        cost scaled to mean 1), so that a head's spaces follow one head permutation; each space's
        plan is the matched heads' inner plans placed block-diagonally (units never cross heads)."""
        t_space = self.t_spaces[t_name]
        names = [n for n, s in self.t_spaces.items()
                 if n in self.names and s.heads > 1 and s.owner is not None and s.owner == t_space.owner] or [t_name]
        heads = t_space.heads
        inner: dict[str, dict[tuple[int, int], np.ndarray]] = {}
        head_cost = np.zeros((heads, heads))
        for name in names:
            t, s = self.t_spaces[name], self.s_spaces[self.names[name]]
            if t.heads != s.heads or t.heads != heads:
                raise ClafuseError(f"{name}: attention with {s.heads} heads cannot be fused into {t.heads} heads "
                                   "(fusing different head counts is not supported)")
            if t.size % heads or s.size % heads:
                raise ClafuseError(f"{name}: {t.size} and {s.size} units do not split into {heads} heads")
            cost = self._unit_cost(name).double().numpy()
            cost = cost / max(float(cost.mean()), 1e-12)
            ds, dt = s.size // heads, t.size // heads
            inner[name] = {}
            for a in range(heads):
                for b in range(heads):
                    part = cost[a * ds:(a + 1) * ds, b * dt:(b + 1) * dt]
                    plan = transport_plan(part, self.solver, self.reg)
                    inner[name][(a, b)] = plan
                    head_cost[a, b] += float((plan * part).sum())
        rows, cols = transport_plan(head_cost, "emd").nonzero()
        out = None
        for name in names:
            t, s = self.t_spaces[name], self.s_spaces[self.names[name]]
            ds, dt = s.size // heads, t.size // heads
            full = np.zeros((s.size, t.size))
            for a, b in zip(rows, cols):
                full[a * ds:(a + 1) * ds, b * dt:(b + 1) * dt] = inner[name][(a, b)] / heads
            if self.solver == "emd":
                r, c = np.nonzero(full)
                full = sparse_plan(full[r, c], r, c, full.shape)
            self.plans[self._pair(name)] = full
            if name == t_name:
                out = full
        return out

    def _signature(self, t_space: Space, s_space: Space) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Row blocks telling the units apart: the first candidate group whose first key both
        networks really have; a key only one side has counts as zeros on the other."""
        t_net, s_net = self.target.net, self.source.net
        for cand_t, cand_s in zip(t_space.signature, s_space.signature):
            if not (t_net.has(cand_t[0], self.target.state) and s_net.has(cand_s[0], self.source.state)):
                continue
            rows_t, rows_s = [], []
            for key_t, key_s in zip(cand_t, cand_s):
                rt = self._rows(self.target, key_t, t_space, None)
                rs = self._rows(self.source, key_s, s_space, _find_param(t_net, key_t))
                if rt is None and rs is None:
                    continue
                rows_t.append(rt if rt is not None else torch.zeros(t_space.size, rs.shape[1]))
                rows_s.append(rs if rs is not None else torch.zeros(s_space.size, rt.shape[1]))
            return rows_t, rows_s
        raise ClafuseError(f"cannot compare the units of {t_space.name}: no weights describe them in both networks")

    def _rows(self, model: Model, key: str, space: Space, target_param: Param | None) -> torch.Tensor | None:
        """The tensor ``key`` as one row per unit of ``space``; for the source, its other axes
        first moved into the target's units (through the target's parameter of the same place),
        kept for :meth:`moved`."""
        net = model.net
        if not net.has(key, model.state):
            return None
        param = _find_param(net, key)
        value = model.tensor(key).float()
        if param is None:
            return value.reshape(value.shape[0], -1)
        spaces = self.t_spaces if target_param is None else self.s_spaces
        canon = _canon(net, spaces, space.name)
        axis = next(i for i, a in enumerate(param.axes) if a is not None
                    and any(_canon(net, spaces, part) == canon for part in _parts(a)))
        if target_param is not None:
            for i, a in enumerate(target_param.axes):
                if i != axis:
                    value = self._move(value, a, i, reads=i in param.read_axes())
            if axis not in param.read_axes():
                self.inputs_moved[key] = value
        if isinstance(param.axes[axis], tuple):  # a stacked axis: the chunks that hold this space's units
            chunks = value.split([spaces[part].size for part in param.axes[axis]], dim=axis)
            picked = [c.movedim(axis, 0).reshape(c.shape[axis], -1) for c, part in zip(chunks, param.axes[axis])
                      if _canon(net, spaces, part) == canon]
            return torch.cat(picked, 1)
        return value.movedim(axis, 0).reshape(value.shape[axis], -1)

    def _move(self, value: torch.Tensor, axes: str | tuple[str, ...] | None, dim: int, reads: bool) -> torch.Tensor:
        """``value``'s axis ``dim`` (in the source's units of ``axes``) in the target's units; a
        stacked axis (a tuple of spaces, e.g. a fused query/key/value projection) moves chunk by
        chunk, each through its space's plan."""
        if axes is None:
            return value
        if isinstance(axes, str):
            plan = self.plan(axes)
            return value if plan is None else move_axis(value, plan, dim, reads=reads)
        plans = [self.plan(name) for name in axes]
        sizes = [self.s_spaces[self.names[name]].size for name in axes]
        chunks = value.split(sizes, dim=dim)
        return torch.cat([c if p is None else move_axis(c, p, dim, reads=reads) for c, p in zip(chunks, plans)], dim)

    def moved(self, block: int, local: str, target_param: Param) -> torch.Tensor | None:
        """The source's tensor at this place, in the target's units (None if it has none)."""
        s_block = self.source.net.blocks[block]
        param = s_block.params.get(local)
        if param is None:
            return None
        reads = target_param.read_axes()
        if param.key in self.inputs_moved:
            value = self.inputs_moved.pop(param.key)
            order = [i for i in range(len(target_param.axes)) if i not in reads]
        else:
            value = self.source.tensor(param.key).float()
            order = sorted(range(len(target_param.axes)), key=lambda i: i not in reads)
        for i in order:
            value = self._move(value, target_param.axes[i], i, reads=i in reads)
        if self.source.consumable and isinstance(self.source.state, dict):
            self.source.state.pop(param.key, None)
        return value


@dataclass
class Mixed:
    """The fused tensors (float32, target keys), the mixing weights each target parameter got
    (one per model, the target's first) and, per source, the plans by target space."""

    state: dict[str, torch.Tensor]
    betas: dict[tuple[int, str], list[float]] = field(default_factory=dict)
    pairings: list[Pairing] = field(default_factory=list)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)


def mixing_weights(present: list[tuple[int, float, bool]], n: int, keep: bool) -> list[float] | None:
    """Per model, the weight of its tensor at one place. ``present``: (model, weight, inserted) for
    the models that have one. With ``keep``, tensors of inserted identities give their weight to
    the models that really have the place (unless all of those weigh zero); None if nothing
    weighs anything."""
    parts = present
    if keep and sum(w for _, w, inserted in present if not inserted) > 0:
        parts = [p for p in present if not p[2]]
    total = sum(w for _, w, _ in parts)
    if total <= 0:
        return None
    out = [0.0] * n
    for i, w, _ in parts:
        out[i] = w / total
    return out


def transport_and_mix(target: Model, sources: list[Model], weights: list[float], keep: bool, solver: str,
                      reg: float, ground: str, use_acts: bool, pairings: list[Pairing] | None = None) -> Mixed:
    """Move every source into the target's units and mix the target's tensors, block by block
    (each source tensor read, moved, added and dropped in turn, so that memory holds the result
    and a block's worth of tensors). An inserted block's placeholders take no part. ``pairings``:
    the sources' pairings from an earlier fusion of the same models, whose plans are reused."""
    if pairings is None:
        pairings = [Pairing(target, s, solver, reg, ground, use_acts) for s in sources]
    out: dict[str, torch.Tensor] = {}
    betas: dict[tuple[int, str], list[float]] = {}
    dtypes: dict[str, torch.dtype] = {}
    n = len(weights)
    for b, block in enumerate(target.net.blocks):
        for local, param in block.params.items():
            if param.implied:
                continue
            value = target.tensor(param.key)
            dtypes[param.key] = value.dtype
            if not value.is_floating_point():
                out[param.key] = value
                continue
            present = [(0, weights[0], False)]
            moved: dict[int, torch.Tensor] = {}
            for i, pairing in enumerate(pairings):
                s_block: Block = pairing.source.net.blocks[b]
                if s_block.inserted and local not in s_block.exact:
                    continue
                m = pairing.moved(b, local, param)
                if m is not None:
                    moved[i + 1] = m
                    present.append((i + 1, weights[i + 1], s_block.inserted))
            beta = mixing_weights(present, n, keep)
            betas[(b, local)] = beta if beta is not None else [float(i == 0) for i in range(n)]
            if beta is None:
                out[param.key] = value.float().clone()
                continue
            mixed = value.float()
            mixed = mixed.mul_(beta[0]) if target.mutable or mixed is not value else mixed.mul(beta[0])
            for i, m in moved.items():
                if beta[i]:
                    mixed.add_(m, alpha=beta[i])
            out[param.key] = mixed
            del moved
        for model in (target, *sources):
            model.cache.clear()
        release_memory()
    return Mixed(out, betas, pairings, dtypes)


def mixing_rows(net: Network, betas: Mapping[tuple[int, str], list[float]]) -> list[list[float]]:
    """One row of mixing weights per reported block: those of its first correction site's
    primary tensor (or of its first tensor)."""
    rows = []
    for b, block in enumerate(net.blocks):
        if not block.in_report:
            continue
        site = next(iter(block.sites.values()), None)
        local = site.primary if site is not None else next(iter(block.params))
        rows.append([round(v, 6) for v in betas[(b, local)]])
    return rows


def site_targets(target: Model, sources: list[Model], mixed: Mixed) -> dict[tuple[int, str], object]:
    """Per correction site of the target, the parents' pre-activations moved into the target's
    units and mixed with the weights of the site's primary tensor: in full where they were
    recorded in full, else their per-unit (mean, std) mixed."""
    out: dict[tuple[int, str], object] = {}
    for (b, name), rec in target.pre.items():
        site = target.net.blocks[b].sites[name]
        beta = mixed.betas.get((b, site.primary))
        if beta is None:
            continue
        parts = [(beta[0], rec)]
        for i, (source, pairing) in enumerate(zip(sources, mixed.pairings)):
            other = source.pre.get((b, name)) if beta[i + 1] else None
            if other is None:
                continue
            plan = pairing.plan(site.space)
            if plan is not None:
                other = (tuple(move_axis(v, plan, 0, reads=False) for v in other) if isinstance(other, tuple)
                         else move_axis(other, plan, 1, reads=False))
            parts.append((beta[i + 1], other))
        if isinstance(rec, tuple):
            out[(b, name)] = tuple(sum(w * r[k].double() for w, r in parts if isinstance(r, tuple)) for k in range(2))
        else:
            total = parts[0][0] * rec.double()
            for w, r in parts[1:]:
                total += w * r.double()
            out[(b, name)] = total.float()  # summed in float64, kept in float32: the largest records
    return out


def plans_by_space(pairing: Pairing) -> dict[str, np.ndarray]:
    """The plans a source was moved with, by target space name."""
    return {name: pairing.plan(name) for name in pairing.names if not pairing.t_spaces[name].fixed}


def default_inserted(net: Network) -> str:
    """``keep`` for networks with normalisations or residual blocks, ``average`` otherwise: chosen
    on validation data (MNIST MLPs with the regression correction: average +0.2 points;
    Fashion-MNIST VGG with BN: keep +0.6; a Fashion-MNIST ResNet pair: keep +8)."""
    return "keep" if net.has_norms() or any(b.drop for b in net.blocks) else "average"


def full_site_records(net: Network, settings: "FusionSettings") -> bool:
    """Whether fusing into ``net`` with ``settings`` records plain linear sites in full (the
    regression refits to every pre-activation) rather than as per-unit moments (all the other
    corrections need); a search records its candidates the same way, so that each is the same
    fusion bit for bit."""
    return (settings.correction or net.correction) == "regress"


def fuse_models(anchor: Model, models: list[Model], weights: list[float], x: torch.Tensor | None,
                settings: "FusionSettings", pairings: list[Pairing] | None = None) -> Mixed:
    """Fuse balanced ``models`` into ``anchor``: record (with calibration inputs ``x``), transport
    and mix, recompute BatchNorm statistics, correct. ``weights``: the anchor's first.

    ``pairings`` (from an earlier fusion of the same models on the same ``x``, e.g. in a search):
    the models' recordings (space activations and site pre-activations) and the pairings' plans
    are reused and kept for the next fusion instead of being recorded, solved and released."""
    use_acts = settings.signal == "activations"
    if use_acts and x is None:
        raise ClafuseError("the activation signal needs calibration inputs")
    net = anchor.net
    correction = settings.correction or net.correction
    need_sites = x is not None and correction != "none"
    if x is not None and (use_acts or need_sites) and pairings is None:
        for model in (anchor, *models):
            record_model(model, x, use_acts, need_sites, full_sites=full_site_records(net, settings))
    keep = (settings.inserted or default_inserted(net)) == "keep"
    mixed = transport_and_mix(anchor, models, list(weights), keep, settings.solver, settings.reg, settings.ground,
                              use_acts, pairings)
    reset = x is not None and settings.bn_reset and net.has_stats()
    if reset and not need_sites:
        mixed.state = reset_norms(net, mixed.state, x)
    if need_sites:
        targets = site_targets(anchor, models, mixed)
        if pairings is None:
            for model in (anchor, *models):
                model.pre = model.acts = None
        mixed.state = correct(net, mixed.state, x, targets, correction, settings.ridge or net.ridge,
                              reset=reset)
    return mixed
