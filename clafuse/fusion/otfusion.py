"""Layer-wise OT fusion (OTFusion) of chains of equal depth into the anchor's neuron order.

For each source chain and each hidden layer: re-express the layer's inputs in the anchor's order
with the previous layer's plan, compute a transport plan between the source's and the anchor's
neurons (from activations or weights), and move the layer's rows (bias, BatchNorm) onto the
anchor's neurons. The aligned chains are then averaged with the mixing weights, optionally
followed by a REPAIR-style correction of each fused neuron's activation statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from clafuse.arch.base import BN_KEYS, Chain, ChainLayer
from clafuse.errors import ClafuseError
from clafuse.fusion.transport import transport_plan
from clafuse.memory import release_memory
from clafuse.options import (MIN_REG, Correction, Ground, Inserted, Signal, Solver, check_choice, check_number,
                             choices)

SIGNALS = choices(Signal)
GROUNDS = choices(Ground)
INSERTED_MODES = choices(Inserted)
CORRECTIONS = choices(Correction)
MAX_FEATURES = 200_000


@dataclass(frozen=True)
class FusionSettings:
    """How neurons are matched and layers combined.

    ``ground`` is the neuron-to-neuron cost for the activation signal: ``correlation`` compares
    z-scored post-ReLU activations, ``euclidean`` raw ones. ``inserted="keep"`` takes a layer that
    only some models really have from those models (averaging a real layer with an inserted
    identity would halve it); ``average`` averages over all models with the given weights; None
    lets the engine choose (``keep`` for BatchNorm networks and residual blocks, ``average`` for
    MLPs).
    ``correction`` (needs calibration inputs) undoes what averaging does to the activations:
    ``regress`` refits each fused layer by ridge least squares so that, fed the fused network's
    own activations, it reproduces the weighted average of the parents' aligned pre-activations
    (layers with BatchNorm fall back to ``repair``); ``repair`` only restores each neuron's mean
    and std. ``bn_reset`` recomputes BatchNorm running statistics of the fused network on the
    calibration inputs (the averaged parents' statistics do not describe the fused network).
    ``reg`` (Sinkhorn, relative to the largest cost) must exceed ``MIN_REG``; ``ridge`` is positive.
    Bad values raise ClafuseError.
    """

    solver: Solver = "emd"
    reg: float = 0.05
    signal: Signal = "activations"
    ground: Ground = "correlation"
    inserted: Inserted | None = None
    correction: Correction = "regress"
    ridge: float = 1e-3
    bn_reset: bool = True

    def __post_init__(self) -> None:
        check_choice("--solver", self.solver, Solver)
        check_number("--reg", self.reg, above=MIN_REG)
        check_choice("--signal", self.signal, Signal)
        check_choice("--ground", self.ground, Ground)
        if self.inserted is not None:
            check_choice("--inserted", self.inserted, Inserted)
        check_choice("--correction", self.correction, Correction)
        check_number("ridge", self.ridge, above=0.0)
        if not isinstance(self.bn_reset, bool):
            raise ClafuseError(f"bn_reset must be True or False, got {self.bn_reset!r}")


@dataclass
class AlignedChain:
    """A source chain re-expressed in the anchor's neuron order, with the plans that did it."""

    chain: Chain
    plans: list[np.ndarray]
    pre: list[torch.Tensor] = field(default_factory=list)


def neuron_features(h: torch.Tensor) -> torch.Tensor:
    """(width, D) matrix: each neuron's (or channel's) responses over the samples (and positions)."""
    if h.dim() > 2:
        return h.transpose(0, 1).flatten(1)
    return h.T


def _standardise(f: torch.Tensor) -> torch.Tensor:
    """Rows of ``f`` with zero mean and unit variance (constant rows become zero), in one new tensor."""
    f = f - f.mean(1, keepdim=True)
    std = torch.linalg.vector_norm(f, dim=1, keepdim=True) / f.shape[1] ** 0.5
    return f.div_(std.clamp_min(1e-12)).masked_fill_(std <= 1e-12, 0.0)


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of ``a`` and ``b``: sqrt(|a|^2 + |b|^2 - 2 a.b), with no
    copies of the (possibly long) rows."""
    sq_a, sq_b = torch.linalg.vector_norm(a, dim=1) ** 2, torch.linalg.vector_norm(b, dim=1) ** 2
    return (a @ b.T).mul_(-2).add_(sq_a[:, None]).add_(sq_b[None, :]).clamp_(min=0).sqrt_()


def activation_ground_cost(h_src: torch.Tensor, h_tgt: torch.Tensor, ground: str = "correlation") -> torch.Tensor:
    """(n_src, n_tgt) distances between the neurons' activation vectors.

    Conv maps of different spatial size are compared through their per-sample channel means;
    long feature vectors are thinned to at most ``MAX_FEATURES`` evenly spaced entries (the same
    ones on both sides) to bound memory.
    """
    if h_src.dim() > 2 and h_src.shape[2:] != h_tgt.shape[2:]:
        h_src, h_tgt = h_src.float().flatten(2).mean(-1), h_tgt.float().flatten(2).mean(-1)
    fs, ft = neuron_features(h_src), neuron_features(h_tgt)
    if fs.shape[1] > MAX_FEATURES:
        keep = torch.linspace(0, fs.shape[1] - 1, MAX_FEATURES).long()
        fs, ft = fs[:, keep], ft[:, keep]
    fs, ft = fs.double(), ft.double()
    if ground == "correlation":
        fs, ft = _standardise(fs), _standardise(ft)
    return _distances(fs, ft)


def with_tie_break(acts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """An activation cost with a weight cost added at a millionth of its scale: neurons silent on
    every calibration sample look alike, and their weights break the tie."""
    return acts + 1e-6 * acts.max().clamp_min(1e-12) * weights / weights.max().clamp_min(1e-12)


def weight_ground_cost(src: ChainLayer, tgt: ChainLayer, block: int = 1024) -> torch.Tensor:
    """(n_src, n_tgt) Euclidean distances between the layers' weight rows, with the bias appended
    (a missing one is zero), as float64 (what the transport solvers take, without another copy).

    Computed as sqrt(|a|^2 + |b|^2 - 2 a.b): the float32 dot products of ``block`` source rows at a
    time go into the float64 result, so wide layers need no copies of their weights and no second
    full-size matrix.
    """
    a, b = src.weight.flatten(1).float(), tgt.weight.flatten(1).float()
    ba = src.bias.float() if src.bias is not None else None
    bb = tgt.bias.float() if tgt.bias is not None else None
    sq_a, sq_b = a.pow(2).sum(1, dtype=torch.float64), b.pow(2).sum(1, dtype=torch.float64)
    if ba is not None:
        sq_a += ba.double().pow(2)
    if bb is not None:
        sq_b += bb.double().pow(2)
    dist = torch.empty(a.shape[0], b.shape[0], dtype=torch.float64)
    for start in range(0, a.shape[0], block):
        rows = a[start:start + block] @ b.T
        if ba is not None and bb is not None:
            rows.addr_(ba[start:start + block], bb)
        dist[start:start + block] = rows
    return dist.mul_(-2).add_(sq_a[:, None]).add_(sq_b[None, :]).clamp_(min=0).sqrt_()


def _move_along(t: torch.Tensor, plan, factor: int, dim: int) -> torch.Tensor:
    """``t`` with its axis ``dim`` (the plan's source side) replaced by the target side:
    ``out[..., j, ...] = factor * sum_i plan[i, j] * t[..., i, ...]``, computed in ``t``'s dtype.

    A sparse (exact) plan is applied by gathering and scatter-adding its non-zeros, so moving a
    wide layer costs about two copies of it; a dense (entropic) plan by a tensor contraction.
    """
    n_tgt = plan.shape[1]
    if isinstance(plan, np.ndarray):
        p = torch.as_tensor(plan).to(t.dtype, copy=True).mul_(factor)
        return torch.tensordot(t, p, dims=([dim], [0])).movedim(-1, dim).contiguous()
    coo = plan.tocoo()
    rows, cols = torch.from_numpy(coo.row.astype(np.int64)), torch.from_numpy(coo.col.astype(np.int64))
    shape = [1] * t.dim()
    shape[dim] = -1
    scale = torch.from_numpy(coo.data * factor).to(t.dtype).view(shape)
    if len(cols) == n_tgt and bool((torch.bincount(cols, minlength=n_tgt) == 1).all()):
        # Each target gets exactly one source (a permutation, or an injection): one gather.
        order = torch.argsort(cols)
        return t.index_select(dim, rows[order]).mul_(scale.index_select(dim, order))
    picked = t.index_select(dim, rows).mul_(scale)
    out_shape = list(t.shape)
    out_shape[dim] = n_tgt
    return torch.zeros(out_shape, dtype=t.dtype).index_add_(dim, cols, picked)


def align_inputs(weight: torch.Tensor, plan) -> torch.Tensor:
    """Re-express ``weight``'s input side (dim 1) in the anchor's order through ``plan``.

    Each anchor input receives the sum of the source inputs sent to it (plan scaled by n_src),
    which preserves the layer's output when matched neurons carry the same activation. A
    flattened conv input (channels x positions) is aligned channel-wise.
    """
    n_src = plan.shape[0]
    w = weight.to(_compute_dtype(weight))
    if w.shape[1] == n_src:
        return _move_along(w, plan, n_src, 1).to(weight.dtype)
    grouped = w.reshape(w.shape[0], n_src, w.shape[1] // n_src)
    return _move_along(grouped, plan, n_src, 1).reshape(w.shape[0], -1).to(weight.dtype)


def align_outputs(t: torch.Tensor, plan) -> torch.Tensor:
    """Move per-neuron rows (dim 0) onto the anchor's neurons: each anchor neuron gets the
    plan-weighted average of the source neurons sent to it."""
    return _move_along(t.to(_compute_dtype(t)), plan, plan.shape[1], 0).to(t.dtype)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 tensors, else float32: half-precision weights are moved in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _pre_stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = neuron_features(z).double()
    return f.mean(1), f.std(1, unbiased=False)


def transport_activations(z: torch.Tensor, plan: np.ndarray) -> torch.Tensor:
    """A layer's activations (N, n_src, ...) as the anchor's neurons would see them (N, n_tgt, ...)."""
    return align_outputs(z.transpose(0, 1), plan).transpose(0, 1)


def _align_layer(layer: ChainLayer, prev: np.ndarray | None, anchor_layer: ChainLayer | None,
                 settings: FusionSettings, post: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[ChainLayer, np.ndarray | None]:
    """One source layer in the anchor's order: inputs through the previous layer's plan ``prev``;
    for a hidden layer (``anchor_layer`` given) also the outputs, through the plan solved here
    from the weights, and from the (source, anchor) activations ``post`` when given."""
    weight = layer.weight if prev is None else align_inputs(layer.weight, prev)
    moved = layer.with_(weight=weight)
    if anchor_layer is None:
        return moved, None
    cost = weight_ground_cost(moved, anchor_layer)
    if post is not None:
        cost = with_tie_break(activation_ground_cost(post[0], post[1], settings.ground), cost)
    plan = transport_plan(cost, settings.solver, settings.reg, sparse=True)
    del cost
    moved = moved.with_(
        weight=align_outputs(weight, plan),
        bias=align_outputs(moved.bias, plan) if moved.bias is not None else None,
        bn={key: align_outputs(moved.bn[key], plan) for key in BN_KEYS} if moved.bn is not None else None,
    )
    return moved, plan


def align_chain(source: Chain, anchor: Chain, x: torch.Tensor | None, settings: FusionSettings) -> AlignedChain:
    """``source`` transported into ``anchor``'s neuron order, layer by layer."""
    if len(source.hidden) != len(anchor.hidden):
        raise ValueError("chains must have equal depth; balance them first")
    use_acts = settings.signal == "activations"
    if use_acts and x is None:
        raise ValueError("the activation signal needs calibration inputs")
    if x is not None:
        src_pre, src_post, src_logits = source.forward_record(x)
        _, tgt_post, _ = anchor.forward_record(x)
    plans: list[np.ndarray] = []
    pre: list[torch.Tensor] = []
    layers: list[ChainLayer] = []
    prev: np.ndarray | None = None
    for k, layer in enumerate(source.layers):
        hidden = k < len(source.hidden)
        moved, plan = _align_layer(layer, prev, anchor.hidden[k] if hidden else None, settings,
                                   (src_post[k], tgt_post[k]) if hidden and use_acts else None)
        if plan is not None:
            if x is not None:
                pre.append(transport_activations(src_pre[k], plan))
            plans.append(plan)
            prev = plan
        layers.append(moved)
    if x is not None:
        pre.append(src_logits)
    return AlignedChain(Chain(layers[:-1], layers[-1], source.flatten_input), plans, pre)


def default_inserted(chain: Chain) -> str:
    """``keep`` for networks with BatchNorm, ``average`` otherwise: chosen on validation data
    (MNIST MLPs with the regression correction: average +0.2 points; Fashion-MNIST VGG with BN:
    keep +0.6 points)."""
    return "keep" if any(layer.bn is not None for layer in chain.layers) else "average"


def layer_weights(layers: list[ChainLayer], weights: list[float], inserted: str | None) -> list[float]:
    """Mixing weights for one position: with ``keep``, inserted identities give their weight to
    the models that really have the layer, unless those models all have weight zero."""
    if inserted == "keep":
        real = [0.0 if layer.inserted else w for layer, w in zip(layers, weights)]
        if sum(real) > 0:
            return [w / sum(real) for w in real]
    total = sum(weights)
    return [w / total for w in weights]


def _mix(tensors: list[torch.Tensor | None], betas: list[float]) -> torch.Tensor | None:
    present = [(t, b) for t, b in zip(tensors, betas) if t is not None]
    if not present:
        return None
    out = torch.zeros(present[0][0].shape, dtype=torch.float32)
    for t, b in present:
        out.add_(t.float(), alpha=b)
    return out


def average_layers(layers: list[ChainLayer], betas: list[float]) -> ChainLayer:
    """Weighted average of aligned layers of equal shape (the first one gives the structure)."""
    first = layers[0]
    bn = None
    if first.bn is not None:
        bn = {key: _mix([layer.bn[key] if layer.bn else None for layer in layers], betas) for key in BN_KEYS}
    return first.with_(
        weight=_mix([layer.weight for layer in layers], betas),
        bias=_mix([layer.bias for layer in layers], betas),
        bn=bn,
        inserted=all(layer.inserted for layer in layers),
    )


def _rescaled(layer: ChainLayer, scale: torch.Tensor, shift: torch.Tensor) -> ChainLayer:
    """``layer`` with its pre-activation z replaced by scale * z + shift (per neuron); the shift
    needs a bias or BatchNorm to live in and is dropped otherwise."""
    if layer.bn is not None:
        bn = dict(layer.bn)
        bn["weight"] = (bn["weight"].double() * scale).float()
        bn["bias"] = (bn["bias"].double() * scale + shift).float()
        return layer.with_(bn=bn)
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    weight = (layer.weight.double() * scale.view(shape)).float()
    bias = (layer.bias.double() * scale + shift).float() if layer.bias is not None else None
    return layer.with_(weight=weight, bias=bias)


def repair_layer(layer: ChainLayer, z: torch.Tensor, target: torch.Tensor) -> ChainLayer:
    """Rescale (and shift, where possible) each neuron so that its pre-activation ``z`` on the
    calibration inputs gets the mean and std of ``target``: undoes averaging's variance collapse."""
    mean, std = _pre_stats(z)
    t_mean, t_std = _pre_stats(target)
    scale = torch.where(std > 1e-8, t_std / std.clamp_min(1e-8), torch.ones_like(std))
    return _rescaled(layer, scale, t_mean - scale * mean)


def regress_layer(layer: ChainLayer, h: torch.Tensor, target: torch.Tensor, ridge: float) -> ChainLayer:
    """Refit a Linear layer by ridge least squares: the weights (and bias, if it has one) whose
    output on inputs ``h`` is closest to ``target``, shrunk towards the current weights."""
    inputs = h.flatten(1).double()
    if layer.bias is not None:
        inputs = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=inputs.dtype)], 1)
        start = torch.cat([layer.weight.double(), layer.bias.double()[:, None]], 1)
    else:
        start = layer.weight.double()
    gram = inputs.T @ inputs
    lam = ridge * torch.trace(gram) / gram.shape[0]
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    solved = torch.linalg.solve(gram + lam * eye, inputs.T @ target.double() + lam * start.T).T
    if layer.bias is not None:
        return layer.with_(weight=solved[:, :-1].float().contiguous(), bias=solved[:, -1].float().contiguous())
    return layer.with_(weight=solved.float().contiguous())


@torch.no_grad()
def reset_batchnorm(chain: Chain, x: torch.Tensor) -> Chain:
    """``chain`` with every BatchNorm's running mean and variance recomputed, layer by layer, from
    what its conv or linear layer outputs on ``x`` (each seeing the reset earlier layers)."""
    layers = list(chain.layers)
    h = chain.input(x)
    for k, layer in enumerate(layers):
        if layer.bn is not None:
            f = neuron_features(_linear_part(layer, h)).double()
            bn = dict(layer.bn)
            bn["running_mean"] = f.mean(1).float()
            bn["running_var"] = f.var(1, unbiased=True).float()
            layers[k] = layer.with_(bn=bn)
        if k < len(layers) - 1:
            current = Chain(layers[:-1], layers[-1], chain.flatten_input)
            h = current.post_activation(k, current.pre_activation(k, h))
    return Chain(layers[:-1], layers[-1], chain.flatten_input)


def _linear_part(layer: ChainLayer, h: torch.Tensor) -> torch.Tensor:
    """The layer's conv or linear output on its input ``h``, before BatchNorm."""
    return Chain([], layer.with_(bn=None), False).pre_activation(0, h)


@torch.no_grad()
def correct(fused: Chain, targets: list[torch.Tensor], x: torch.Tensor, method: str, ridge: float = 1e-3) -> Chain:
    """Correct every layer of ``fused`` in order, each seeing the corrected earlier ones, towards
    ``targets`` (per layer, incl. the classifier: the mixed pre-activations of the parents)."""
    layers = list(fused.layers)
    h = fused.input(x)
    for k, target in enumerate(targets):
        layer = layers[k]
        if method == "regress" and not layer.is_conv and layer.bn is None:
            layer = regress_layer(layer, layer.layer_input(h), target, ridge)
        elif k < len(fused.hidden):
            chain = Chain(layers[:-1], layers[-1], fused.flatten_input)
            layer = repair_layer(layer, chain.pre_activation(k, h), target)
        layers[k] = layer
        if k < len(fused.hidden):
            chain = Chain(layers[:-1], layers[-1], fused.flatten_input)
            h = chain.post_activation(k, chain.pre_activation(k, h))
    return Chain(layers[:-1], layers[-1], fused.flatten_input)


@dataclass
class FusionResult:
    chain: Chain
    plans: list[list[np.ndarray]]
    mixing: list[list[float]]


def materialized(chain: Chain, load: Callable[[Any], Any]) -> Chain:
    """``chain`` with ``load`` applied to every layer's tensors (stand-ins become real tensors)."""
    layers = [_load_layer(layer, load) for layer in chain.layers]
    return Chain(layers[:-1], layers[-1], chain.flatten_input)


def _load_layer(layer: ChainLayer, load: Callable[[Any], Any]) -> ChainLayer:
    return layer.with_(weight=load(layer.weight), bias=load(layer.bias),
                       bn=load(layer.bn) if layer.bn is not None else None)


def fuse_chains(anchor: Chain, sources: list[Chain], weights: list[float], x: torch.Tensor | None,
                settings: FusionSettings = FusionSettings(), load: Callable[[Any], Any] | None = None,
                keep_plans: bool = True) -> FusionResult:
    """Fuse ``sources`` into ``anchor``'s architecture. ``weights`` has one entry per model,
    the anchor's first; all chains must already have the anchor's depth.

    ``load`` turns shape-only stand-ins (of lazily opened checkpoints) into real tensors. Without
    calibration data the fusion runs layer by layer, reading each input layer when its turn comes
    and dropping it once averaged, so memory holds the output and a few layers (and, unless
    ``keep_plans`` is off, the transport plans, width x width each).
    """
    if len(weights) != len(sources) + 1:
        raise ValueError("one mixing weight per model is needed")
    load = load or (lambda value: value)
    inserted = settings.inserted or default_inserted(anchor)
    if x is None:
        return _fuse_streaming(anchor, sources, weights, settings, load, inserted, keep_plans)
    anchor = materialized(anchor, load)
    sources = [materialized(source, load) for source in sources]
    aligned = [align_chain(source, anchor, x, settings) for source in sources]
    models = [anchor, *(a.chain for a in aligned)]
    fused_layers: list[ChainLayer] = []
    mixing: list[list[float]] = []
    for k in range(len(anchor.layers)):
        at_k = [m.layers[k] for m in models]
        betas = layer_weights(at_k, weights, inserted)
        mixing.append(betas)
        fused_layers.append(average_layers(at_k, betas))
    fused = Chain(fused_layers[:-1], fused_layers[-1], anchor.flatten_input)
    if settings.bn_reset and any(layer.bn is not None for layer in fused.layers):
        fused = reset_batchnorm(fused, x)
    if settings.correction != "none":
        anchor_pre, _, anchor_logits = anchor.forward_record(x)
        anchor_pre.append(anchor_logits)
        targets = [sum(b * z.double() for b, z in zip(mixing[k], [anchor_pre[k], *(a.pre[k] for a in aligned)]))
                   for k in range(len(anchor.layers))]
        fused = correct(fused, targets, x, settings.correction, settings.ridge)
    return FusionResult(fused, [a.plans for a in aligned], mixing)


def _fuse_streaming(anchor: Chain, sources: list[Chain], weights: list[float], settings: FusionSettings,
                    load: Callable[[Any], Any], inserted: str, keep_plans: bool) -> FusionResult:
    """Weight-based fusion, one layer position at a time across all models."""
    if settings.signal == "activations":
        raise ValueError("the activation signal needs calibration inputs")
    for source in sources:
        if len(source.hidden) != len(anchor.hidden):
            raise ValueError("chains must have equal depth; balance them first")
    prevs: list[np.ndarray | None] = [None] * len(sources)
    plans: list[list[np.ndarray]] = [[] for _ in sources]
    fused_layers: list[ChainLayer] = []
    mixing: list[list[float]] = []
    for k, anchor_layer in enumerate(anchor.layers):
        hidden = k < len(anchor.hidden)
        target = _load_layer(anchor_layer, load)
        at_k = [target]
        for i, source in enumerate(sources):
            layer = _load_layer(source.layers[k], load)
            if prevs[i] is not None:  # rebinding frees the unaligned weight before the next step
                layer = layer.with_(weight=align_inputs(layer.weight, prevs[i]))
            moved, plan = _align_layer(layer, None, target if hidden else None, settings)
            del layer
            if plan is not None:
                if keep_plans:
                    plans[i].append(plan)
                prevs[i] = plan
            at_k.append(moved)
        betas = layer_weights(at_k, weights, inserted)
        mixing.append(betas)
        fused_layers.append(average_layers(at_k, betas))
        del at_k, target
        release_memory()
    return FusionResult(Chain(fused_layers[:-1], fused_layers[-1], anchor.flatten_input), plans, mixing)
