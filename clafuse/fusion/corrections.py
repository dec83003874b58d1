"""Recording a described network on calibration inputs, and the corrections after mixing: BatchNorm
statistics recomputed, REPAIR and ridge regression — each written once, on the description.

The corrections run the fused network block by block over batches of calibration inputs, step
after step, so that each normalisation or site sees the corrected earlier ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Collection, Mapping

import torch

from clafuse.arch.network import Network, Site, Tap, run
from clafuse.fusion.neurons import reduce_map

if TYPE_CHECKING:
    from clafuse.fusion.engine import Model

SiteRecord = "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"


class _Recorder(Tap):
    """Collects space activations and site pre-activations: in full at plain linear sites (what a
    regression refits from), as per-unit counts, sums and sums of squares elsewhere (all REPAIR
    needs)."""

    def __init__(self, net: Network, spaces: bool, sites: bool, max_positions: int | None,
                 space_names: Collection[str] | None = None, full_sites: bool = True,
                 site_blocks: Collection[str] | None = None) -> None:
        self.index = {b.name: i for i, b in enumerate(net.blocks)}
        self.space_names, self.full_sites, self.site_blocks = space_names, full_sites, site_blocks
        self.batch: dict[str, torch.Tensor] = {}
        self.pre: dict[tuple[int, str], list[torch.Tensor]] = {}
        self.sums: dict[tuple[int, str], torch.Tensor] = {}
        self.want_spaces, self.want_sites, self.max_positions = spaces, sites, max_positions
        self.samples = 0

    def site(self, name: str, z: torch.Tensor, inputs: torch.Tensor | None = None,
             residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.want_sites and (self.site_blocks is None or self.block.name in self.site_blocks):
            key = (self.index[self.block.name], name)
            site = self.block.sites[name]
            if self.full_sites and _refittable(site, inputs, residual):
                self.pre.setdefault(key, []).append(z)
            elif site.repairable:
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
           full_sites: bool = True, site_blocks: Collection[str] | None = None
           ) -> tuple[dict[str, torch.Tensor], dict[tuple[int, str], SiteRecord], torch.Tensor]:
    """Per space (of ``space_names``, default all), the activations of the last block writing it
    (maps thinned to ``max_positions`` positions, and rows per token, in float16); per correction
    site (block index, name; of the blocks named in ``site_blocks``, default all), its
    pre-activations (plain linear sites, with ``full_sites``: what
    a regression refits to) or their per-unit (mean, std) (the others); and the output; on ``x``
    in batches of ``net.batch`` samples."""
    tensors = {b.name: {local: net.param_value(b, local, state).float() for local in b.params} for b in net.blocks}
    tap = _Recorder(net, spaces, sites, max_positions, space_names, full_sites, site_blocks)
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


def record_model(model: "Model", x: torch.Tensor, spaces: bool, sites: bool, full_sites: bool = True) -> "Model":
    """``model`` with its space activations and site pre-activations recorded on ``x`` (plain
    linear sites in full only with ``full_sites``, which a regression needs; else their moments).

    A merged source is recorded as the whole network it was (``model.context``): each kept
    block's records are what that block computes after the blocks that were dropped, so that the
    correction pulls the fused network towards what the deeper parent really computes there, not
    towards the shortened parent's drifted values (only the kept blocks' sites and spaces are
    kept). Measured on all-MiniLM-L6-v2 compressed into 3 layers (layers 0, 3, 5 kept, LayerNorm
    outputs repaired): teacher cosine 0.654 -> 0.723 on held-out text; a Fashion-MNIST ResNet
    pair merged into the shallower one 66.5 -> 74.4% val; MNIST MLP merges within 0.15 points."""
    net = model.context or model.net
    acts, pre, _ = record(net, model.state, x, spaces=spaces, sites=sites, space_names=set(model.net.all_spaces()),
                          full_sites=full_sites, site_blocks={b.name for b in model.net.blocks})
    if model.context is not None:
        index = {b.name: i for i, b in enumerate(model.net.blocks)}
        pre = {(index[net.blocks[b].name], site): value for (b, site), value in pre.items()
               if site in model.net.blocks[index[net.blocks[b].name]].sites}
    model.acts, model.pre = acts, pre
    return model


def _tensors_of(net: Network, state: dict[str, torch.Tensor]):
    """Local tensors of each block that alias ``state``'s (float32) entries, so that a tap's
    changes land in the fused state."""

    def tensors(block):
        return {local: state[p.key] if p.key in state else net.param_value(block, local, state).float()
                for local, p in block.params.items()}

    return tensors


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


class _Stop(Exception):
    """Ends a block's forward at the correction step whose statistics are being gathered."""


class _Corrector(Tap):
    """Corrects one block at a time over the calibration batches. The block's steps (correction
    sites with a target and, with ``reset``, BatchNorms) run in forward order: solved ones are
    already in the block's tensors; the first unsolved one adds the batch's statistics (moments,
    or the Gram matrices of a regression) and stops the forward; once every batch has added its
    part, the step is solved into the block's tensors (and ``state``), and the block runs again up
    to the next step."""

    def __init__(self, net: Network, state: dict[str, torch.Tensor], targets: Mapping[tuple[int, str], object],
                 method: str, ridge: float, reset: bool) -> None:
        self.state, self.targets, self.method, self.ridge, self.reset = state, targets, method, ridge, reset
        self.index = {b.name: i for i, b in enumerate(net.blocks)}
        self.spaces = net.all_spaces()
        self.solved: set[tuple[int, str]] = set()
        self.overrides: dict[str, torch.Tensor] = {}
        self.pending: tuple[tuple[int, str], str, object] | None = None
        self.stats: list[torch.Tensor] | None = None
        self.rows = 0

    def _gather(self, key: tuple[int, str], kind: str, info: object, parts: list[torch.Tensor]) -> None:
        if self.pending is None:
            self.pending = (key, kind, info)
        self.stats = parts if self.stats is None else [a + b for a, b in zip(self.stats, parts)]
        raise _Stop

    def _set(self, local: str, value: torch.Tensor) -> None:
        self.overrides[local] = value
        key = self.block.params[local].key if local in self.block.params else None
        if key in self.state:
            self.state[key] = value

    def norm(self, local: str, z: torch.Tensor, eps: float) -> torch.Tensor:
        key = (self.index[self.block.name], f"norm:{local}")
        if self.reset and key not in self.solved:
            self._gather(key, "norm", local, [_moments(z)])
        return super().norm(local, z, eps)

    def site(self, name: str, z: torch.Tensor, inputs: torch.Tensor | None = None,
             residual: torch.Tensor | None = None) -> torch.Tensor:
        key = (self.index[self.block.name], name)
        target = self.targets.get(key)
        if target is None:
            return z
        site = self.block.sites[name]
        regress = self.method == "regress" and _refittable(site, inputs, residual) and not isinstance(target, tuple)
        if regress and key not in self.solved:
            h = _with_ones(inputs.flatten(1).double(), site.bias is not None)
            rows = target[self.rows:self.rows + len(h)].double()
            self.rows += len(h)
            if site.residual:
                rows = self._writer_target(site, inputs.double(), residual.double(), rows)
            self._gather(key, "regress", site, [h.T @ h, h.T @ rows])
        moments = (key[0], f"{name}:moments")
        done = moments in self.solved or (regress and site.norm is None)  # a plain refit needs no repair
        if done or self.spaces[site.space].fixed or not site.repairable:
            return z
        self._gather(moments, "repair", site, [_moments(z)])
        return z

    def _writer_target(self, site: Site, inputs: torch.Tensor, residual: torch.Tensor,
                       target: torch.Tensor) -> torch.Tensor:
        """What a writer's linear map should output so that the stream (after its LayerNorm, for a
        post-LN writer) is ``target``: the norm's affine map inverted, each token keeping the mean
        and spread of the sum it has now (the normalisation itself cannot be inverted), less the
        residual. Units whose gain is about 0 carry no information about the map and keep their
        current output."""
        if site.norm is None:
            return target - residual
        t = self.tensors
        weight, bias = t[site.weight].double(), t[site.bias].double() if site.bias else None
        current = torch.nn.functional.linear(inputs, weight, bias)
        total = residual + current
        mean = total.mean(-1, keepdim=True)
        spread = (total.var(-1, unbiased=False, keepdim=True) + site.eps).sqrt()
        gain, shift = t[f"{site.norm}.weight"].double(), t[f"{site.norm}.bias"].double()
        live = gain.abs() > 1e-6
        wanted = mean + spread * (target - shift) / torch.where(live, gain, torch.ones_like(gain)) - residual
        return torch.where(live, wanted, current)

    def solve(self) -> None:
        """Solves the step whose statistics every batch has added."""
        (key, kind, info), stats = self.pending, self.stats
        self.pending, self.stats, self.rows = None, None, 0
        self.solved.add(key)
        t = self.tensors
        if kind == "norm":
            n, total, squares = stats[0]
            mean = total / n
            var = ((squares - n * mean.pow(2)) / (n - 1).clamp_min(1)).clamp_min(0)
            self._set(f"{info}.running_mean", mean.float())
            self._set(f"{info}.running_var", var.float())
            return
        site = info
        if kind == "regress":
            weight, bias = _ridge_solve(stats[0], stats[1], t[site.weight], t.get(site.bias) if site.bias else None,
                                        self.ridge)
            self._set(site.weight, weight)
            if bias is not None:
                self._set(site.bias, bias)
            return
        n, total, squares = stats[0]
        mean = total / n
        std = (squares / n - mean.pow(2)).clamp_min(0).sqrt()
        target = self.targets[(key[0], key[1].removesuffix(":moments"))]
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


def _refittable(site: Site, inputs: torch.Tensor | None, residual: torch.Tensor | None) -> bool:
    """Whether a regression can refit ``site``: a plain linear site given its inputs, or a
    writer given its inputs and residual."""
    return inputs is not None and (residual is not None if site.residual else site.norm is None)


def _with_ones(h: torch.Tensor, bias: bool) -> torch.Tensor:
    return torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1) if bias else h


def _ridge_solve(gram: torch.Tensor, cross: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 ridge: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Linear weights (and bias, if there is one) minimising ||h W^T - target||^2 plus a ridge
    penalty towards the current ones, from ``gram`` = h^T h and ``cross`` = h^T target (h with a
    column of ones for the bias), in float64."""
    start = weight.double()
    if bias is not None:
        start = torch.cat([start, bias.double()[:, None]], 1)
    lam = ridge * torch.trace(gram) / gram.shape[0]
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    solved = torch.linalg.solve(gram + lam * eye, cross + lam * start.T).T
    if bias is not None:
        return solved[:, :-1].float().contiguous(), solved[:, -1].float().contiguous()
    return solved.float().contiguous(), None


@torch.no_grad()
def correct(net: Network, state: dict[str, torch.Tensor], x: torch.Tensor,
            targets: Mapping[tuple[int, str], object], method: str, ridge: float = 1e-3,
            reset: bool = False) -> dict[str, torch.Tensor]:
    """``state`` corrected site by site towards ``targets`` (per site: the mixed pre-activations of
    the parents, in full or as per-unit (mean, std)), each site seeing the corrected earlier ones.
    ``regress`` refits plain linear sites by ridge least squares, refits post-LN writers through
    their LayerNorm the same way and then repairs them, and repairs the others; ``repair``
    restores each unit's mean and std (the shift needs a bias or a norm to live in). Sites in fixed
    spaces (the classes) are only regressed. With ``reset``, each BatchNorm's running statistics
    are first recomputed from what it receives (after the earlier corrections).

    The network runs block by block over batches of ``net.batch`` samples (see
    :class:`_Corrector`): memory holds the block inputs of all samples and one batch's
    intermediate tensors, and the result does not depend on the batch size."""
    state = dict(state)
    tap = _Corrector(net, state, targets, method, ridge, reset)
    batches = [x[start:start + net.batch] for start in range(0, len(x), net.batch)]
    hs = [net.pre(xb.float() if xb.is_floating_point() else xb) for xb in batches]
    tensors = _tensors_of(net, state)
    tap.current = None
    for block in net.blocks:
        tap.block, tap.overrides = block, {}
        while True:
            tap.tensors = {**tensors(block), **tap.overrides}
            outs = []
            for h, xb in zip(hs, batches):
                tap.x = xb
                try:
                    outs.append(block.forward(tap.tensors, h, tap))
                except _Stop:
                    pass
            if tap.pending is None:
                break
            tap.solve()
        hs = outs
        tap.current = block.output or tap.current
    return state


def reset_norms(net: Network, state: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``state`` with every BatchNorm's running mean and variance recomputed from what it receives
    on ``x``, each seeing the reset earlier ones."""
    return correct(net, state, x, {}, "none", reset=True)
