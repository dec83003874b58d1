"""Recording a described network on calibration inputs, and the corrections after mixing: BatchNorm
statistics recomputed, REPAIR and ridge regression — each written once, on the description.

The corrections run the fused network once over all calibration inputs, block by block, so that
each normalisation or site sees the corrected earlier ones.
"""

from __future__ import annotations

from typing import Collection, Mapping

import torch

from clafuse.arch.network import Network, Tap, run
from clafuse.fusion.neurons import reduce_map

SiteRecord = "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"


class _Recorder(Tap):
    """Collects space activations and site pre-activations: in full at plain linear sites (what a
    regression refits from), as per-unit counts, sums and sums of squares elsewhere (all REPAIR
    needs)."""

    def __init__(self, net: Network, spaces: bool, sites: bool, max_positions: int | None,
                 space_names: Collection[str] | None = None, full_sites: bool = True) -> None:
        self.index = {b.name: i for i, b in enumerate(net.blocks)}
        self.space_names, self.full_sites = space_names, full_sites
        self.batch: dict[str, torch.Tensor] = {}
        self.pre: dict[tuple[int, str], list[torch.Tensor]] = {}
        self.sums: dict[tuple[int, str], torch.Tensor] = {}
        self.want_spaces, self.want_sites, self.max_positions = spaces, sites, max_positions
        self.samples = 0

    def site(self, name: str, z: torch.Tensor, inputs: torch.Tensor | None = None) -> torch.Tensor:
        if self.want_sites:
            key = (self.index[self.block.name], name)
            if self.full_sites and inputs is not None and self.block.sites[name].norm is None:
                self.pre.setdefault(key, []).append(z)
            else:
                part = _moments(z)
                self.sums[key] = self.sums[key] + part if key in self.sums else part
        return z

    def space(self, name: str, h: torch.Tensor) -> torch.Tensor:
        if self.want_spaces and (self.space_names is None or name in self.space_names):
            if h.dim() == 2 and len(h) != self.samples:  # rows per position (tokens): kept as maps are
                h = h.to(torch.float16)
            self.batch[name] = reduce_map(h, self.max_positions)
        return h


@torch.no_grad()
def record(net: Network, state: Mapping[str, torch.Tensor], x: torch.Tensor, spaces: bool = True,
           sites: bool = False, max_positions: int | None = 64, space_names: Collection[str] | None = None,
           full_sites: bool = True) -> tuple[dict[str, torch.Tensor], dict[tuple[int, str], SiteRecord], torch.Tensor]:
    """Per space (of ``space_names``, default all), the activations of the last block writing it
    (maps thinned to ``max_positions`` positions, and rows per token, in float16); per correction
    site (block index, name), its pre-activations (plain linear sites, with ``full_sites``: what
    a regression refits to) or their per-unit (mean, std) (the others); and the output; on ``x``
    in batches of ``net.batch`` samples."""
    tensors = {b.name: {local: net.param_value(b, local, state).float() for local in b.params} for b in net.blocks}
    tap = _Recorder(net, spaces, sites, max_positions, space_names, full_sites)
    acts: dict[str, list[torch.Tensor]] = {}
    outs = []
    for start in range(0, len(x), net.batch):
        tap.batch = {}
        tap.samples = len(x[start:start + net.batch])
        outs.append(run(net, state, x[start:start + net.batch], tap, tensors=lambda b: tensors[b.name]))
        for name, value in tap.batch.items():
            acts.setdefault(name, []).append(value)
    pre: dict[tuple[int, str], SiteRecord] = {k: torch.cat(v) for k, v in tap.pre.items()}
    for key, (n, total, squares) in tap.sums.items():
        mean = total / n
        pre[key] = (mean, (squares / n - mean.pow(2)).clamp_min(0).sqrt())
    return {k: torch.cat(v) for k, v in acts.items()}, pre, torch.cat(outs)


def _tensors_of(net: Network, state: dict[str, torch.Tensor]):
    """Local tensors of each block that alias ``state``'s (float32) entries, so that a tap's
    changes land in the fused state."""

    def tensors(block):
        return {local: state[p.key] if p.key in state else net.param_value(block, local, state).float()
                for local, p in block.params.items()}

    return tensors


class _Reset(Tap):
    """Recomputes each BatchNorm's running statistics from what it receives, before applying it."""

    state: dict[str, torch.Tensor]

    def norm(self, local: str, z: torch.Tensor, eps: float) -> torch.Tensor:
        n, total, squares = _moments(z)
        mean = total / n
        var = ((squares - n * mean.pow(2)) / (n - 1).clamp_min(1)).clamp_min(0)
        mean, var = mean.float(), var.float()
        for leaf, value in (("running_mean", mean), ("running_var", var)):
            key = self.block.params[f"{local}.{leaf}"].key
            if key in self.state:
                self.state[key] = value
        self.tensors = {**self.tensors, f"{local}.running_mean": mean, f"{local}.running_var": var}
        return super().norm(local, z, eps)


@torch.no_grad()
def reset_norms(net: Network, state: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``state`` with every BatchNorm's running mean and variance recomputed from what it receives
    on ``x``, each seeing the reset earlier ones."""
    state = dict(state)
    tap = _Reset()
    tap.state = state
    run(net, state, x, tap, tensors=_tensors_of(net, state))
    return state


def _moments(z: torch.Tensor) -> torch.Tensor:
    """(3, units): per unit (axis 1) the count, sum and sum of squares of ``z``, in float64.

    A feature map is summed within each sample's map in float32 (a few hundred values; the squares
    through a norm, so that no squared copy of the map is made), and across samples in float64."""
    if z.dim() > 2:
        f = z.flatten(2)
        total = f.sum(2).sum(0, dtype=torch.float64)
        squares = torch.linalg.vector_norm(f, dim=2).double().pow(2).sum(0)
    else:
        total, squares = z.sum(0, dtype=torch.float64), torch.linalg.vector_norm(z.double(), dim=0).pow(2)
    count = torch.full((z.shape[1],), float(z.numel() // z.shape[1]), dtype=torch.float64)
    return torch.stack([count, total, squares])


def _pre_stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per unit (axis 1) of ``z``, its mean and (population) standard deviation, in float64."""
    if z.dim() > 2:
        n, total, squares = _moments(z)
        mean = total / n
        return mean, (squares / n - mean.pow(2)).clamp_min(0).sqrt()
    f = z.double()
    return f.mean(0), f.std(0, unbiased=False)


def ridge_fit(inputs: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              ridge: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Linear weights (and bias, if there is one) whose output on ``inputs`` is closest to
    ``target`` by ridge least squares, shrunk towards the current ones."""
    h = inputs.flatten(1).double()
    start = weight.double()
    if bias is not None:
        h = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1)
        start = torch.cat([start, bias.double()[:, None]], 1)
    gram = h.T @ h
    lam = ridge * torch.trace(gram) / gram.shape[0]
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    solved = torch.linalg.solve(gram + lam * eye, h.T @ target.double() + lam * start.T).T
    if bias is not None:
        return solved[:, :-1].float().contiguous(), solved[:, -1].float().contiguous()
    return solved.float().contiguous(), None


class _Correct(_Reset):
    def __init__(self, net: Network, state: dict[str, torch.Tensor], targets: Mapping[tuple[int, str], torch.Tensor],
                 method: str, ridge: float, reset: bool) -> None:
        self.net, self.state, self.targets, self.method, self.ridge = net, state, targets, method, ridge
        self.reset = reset
        self.index = {b.name: i for i, b in enumerate(net.blocks)}

    def norm(self, local: str, z: torch.Tensor, eps: float) -> torch.Tensor:
        return super().norm(local, z, eps) if self.reset else Tap.norm(self, local, z, eps)

    def _set(self, local: str, value: torch.Tensor) -> None:
        key = self.block.params[local].key
        if key in self.state:
            self.state[key] = value

    def site(self, name: str, z: torch.Tensor, inputs: torch.Tensor | None = None) -> torch.Tensor:
        target = self.targets.get((self.index[self.block.name], name))
        if target is None:
            return z
        site, t = self.block.sites[name], self.tensors
        if self.method == "regress" and inputs is not None and site.norm is None and not isinstance(target, tuple):
            weight, bias = ridge_fit(inputs, target, t[site.weight], t.get(site.bias) if site.bias else None,
                                     self.ridge)
            self._set(site.weight, weight)
            if bias is not None:
                self._set(site.bias, bias)
            return torch.nn.functional.linear(inputs, weight, bias)
        if self.net.all_spaces()[site.space].fixed:
            return z
        mean, std = _pre_stats(z)
        t_mean, t_std = target if isinstance(target, tuple) else _pre_stats(target)
        scale = torch.where(std > 1e-8, t_std / std.clamp_min(1e-8), torch.ones_like(std))
        shift = t_mean - scale * mean
        if site.norm is not None:
            self._set(f"{site.norm}.weight", (t[f"{site.norm}.weight"].double() * scale).float())
            self._set(f"{site.norm}.bias", (t[f"{site.norm}.bias"].double() * scale + shift).float())
        else:
            shape = (-1,) + (1,) * (t[site.weight].dim() - 1)
            self._set(site.weight, (t[site.weight].double() * scale.view(shape)).float())
            if site.bias is not None:
                self._set(site.bias, (t[site.bias].double() * scale + shift).float())
            else:
                shift = torch.zeros_like(shift)
        view = (1, -1) + (1,) * (z.dim() - 2)
        return torch.addcmul(shift.to(z.dtype).view(view), z, scale.to(z.dtype).view(view))


@torch.no_grad()
def correct(net: Network, state: dict[str, torch.Tensor], x: torch.Tensor,
            targets: Mapping[tuple[int, str], torch.Tensor], method: str, ridge: float = 1e-3,
            reset: bool = False) -> dict[str, torch.Tensor]:
    """``state`` corrected site by site towards ``targets`` (per site: the mixed pre-activations of
    the parents), each site seeing the corrected earlier ones. ``regress`` refits plain linear
    sites by ridge least squares and repairs the others; ``repair`` restores each unit's mean and
    std (the shift needs a bias or a norm to live in). Sites in fixed spaces (the classes) are only
    regressed. With ``reset``, each BatchNorm's running statistics are first recomputed from what
    it receives in the same pass (as :func:`reset_norms` would, after the earlier corrections), so
    the fused network runs once instead of twice."""
    state = dict(state)
    run(net, state, x, _Correct(net, state, targets, method, ridge, reset), tensors=_tensors_of(net, state))
    return state
