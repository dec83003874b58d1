"""Layer-wise OT fusion (OTFusion) of chains of equal depth into the anchor's neuron order.

For each source chain and each hidden layer: re-express the layer's inputs in the anchor's order
with the previous layer's plan, compute a transport plan between the source's and the anchor's
neurons (from activations or weights), and move the layer's rows (bias, BatchNorm) onto the
anchor's neurons. The aligned chains are then averaged with the mixing weights, optionally
followed by a REPAIR-style correction of each fused neuron's activation statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from clafuse.arch.base import BN_KEYS, Chain, ChainLayer
from clafuse.fusion.transport import transport_plan

SIGNALS = ("activations", "weights")
GROUNDS = ("correlation", "euclidean")
INSERTED_MODES = ("keep", "average")
CORRECTIONS = ("repair", "none")


@dataclass(frozen=True)
class FusionSettings:
    """How neurons are matched and layers combined.

    ``ground`` is the neuron-to-neuron cost for the activation signal: ``correlation`` compares
    z-scored post-ReLU activations, ``euclidean`` raw ones. ``inserted="keep"`` takes a layer that
    only some models really have from those models (averaging a real layer with an inserted
    identity would halve it); ``average`` averages over all models with the given weights.
    """

    solver: str = "emd"
    reg: float = 0.01
    signal: str = "activations"
    ground: str = "correlation"
    inserted: str = "keep"
    correction: str = "repair"


@dataclass
class AlignedChain:
    """A source chain re-expressed in the anchor's neuron order, with the plans that did it."""

    chain: Chain
    plans: list[np.ndarray]
    pre_stats: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def neuron_features(h: torch.Tensor) -> torch.Tensor:
    """(width, D) matrix: each neuron's (or channel's) responses over the samples (and positions)."""
    if h.dim() > 2:
        return h.transpose(0, 1).flatten(1)
    return h.T


def _standardise(f: torch.Tensor) -> torch.Tensor:
    f = f - f.mean(1, keepdim=True)
    std = f.pow(2).mean(1, keepdim=True).sqrt()
    return torch.where(std > 1e-12, f / std.clamp_min(1e-12), torch.zeros_like(f))


def activation_ground_cost(h_src: torch.Tensor, h_tgt: torch.Tensor, ground: str = "correlation") -> torch.Tensor:
    """(n_src, n_tgt) distances between the neurons' activation vectors."""
    fs, ft = neuron_features(h_src).double(), neuron_features(h_tgt).double()
    if ground == "correlation":
        fs, ft = _standardise(fs), _standardise(ft)
    return torch.cdist(fs, ft)


def _rows(layer: ChainLayer) -> torch.Tensor:
    rows = layer.weight.flatten(1).double()
    if layer.bias is not None:
        rows = torch.cat([rows, layer.bias.double()[:, None]], 1)
    return rows


def weight_ground_cost(src: ChainLayer, tgt: ChainLayer) -> torch.Tensor:
    """(n_src, n_tgt) distances between the layers' weight rows (bias appended)."""
    return torch.cdist(_rows(src), _rows(tgt))


def align_inputs(weight: torch.Tensor, plan: np.ndarray) -> torch.Tensor:
    """Re-express ``weight``'s input side (dim 1) in the anchor's order through ``plan``.

    Each anchor input receives the sum of the source inputs sent to it (plan scaled by n_src),
    which preserves the layer's output when matched neurons carry the same activation. A
    flattened conv input (channels x positions) is aligned channel-wise.
    """
    p = torch.as_tensor(plan, dtype=torch.float64) * plan.shape[0]
    n_src, n_tgt = p.shape
    w = weight.double()
    if w.shape[1] == n_src:
        out = torch.einsum("oi...,it->ot...", w, p)
    else:
        positions = w.shape[1] // n_src
        out = torch.einsum("ois,it->ots", w.reshape(w.shape[0], n_src, positions), p).reshape(w.shape[0], -1)
    return out.to(weight.dtype)


def align_outputs(t: torch.Tensor, plan: np.ndarray) -> torch.Tensor:
    """Move per-neuron rows (dim 0) onto the anchor's neurons: each anchor neuron gets the
    plan-weighted average of the source neurons sent to it."""
    p = torch.as_tensor(plan, dtype=torch.float64) * plan.shape[1]
    return torch.einsum("it,i...->t...", p, t.double()).to(t.dtype)


def _pre_stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = neuron_features(z).double()
    return f.mean(1), f.std(1, unbiased=False)


def align_chain(source: Chain, anchor: Chain, x: torch.Tensor | None, settings: FusionSettings) -> AlignedChain:
    """``source`` transported into ``anchor``'s neuron order, layer by layer."""
    if len(source.hidden) != len(anchor.hidden):
        raise ValueError("chains must have equal depth; balance them first")
    use_acts = settings.signal == "activations"
    if use_acts and x is None:
        raise ValueError("the activation signal needs calibration inputs")
    if x is not None:
        src_pre, src_post, _ = source.forward_record(x)
        _, tgt_post, _ = anchor.forward_record(x)
    plans: list[np.ndarray] = []
    stats: list[tuple[torch.Tensor, torch.Tensor]] = []
    layers: list[ChainLayer] = []
    prev: np.ndarray | None = None
    for k, layer in enumerate(source.layers):
        weight = layer.weight if prev is None else align_inputs(layer.weight, prev)
        moved = layer.with_(weight=weight)
        if k < len(source.hidden):
            if use_acts:
                cost = activation_ground_cost(src_post[k], tgt_post[k], settings.ground)
            else:
                cost = weight_ground_cost(moved, anchor.hidden[k])
            plan = transport_plan(cost, settings.solver, settings.reg)
            moved = moved.with_(
                weight=align_outputs(weight, plan),
                bias=align_outputs(layer.bias, plan) if layer.bias is not None else None,
                bn={key: align_outputs(layer.bn[key], plan) for key in BN_KEYS} if layer.bn is not None else None,
            )
            if x is not None:
                mean, std = _pre_stats(src_pre[k])
                stats.append((align_outputs(mean, plan), align_outputs(std, plan)))
            plans.append(plan)
            prev = plan
        layers.append(moved)
    return AlignedChain(Chain(layers[:-1], layers[-1], source.flatten_input), plans, stats)


def layer_weights(layers: list[ChainLayer], weights: list[float], inserted: str) -> list[float]:
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
    return sum(b * t.double() for t, b in present).float()


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


@torch.no_grad()
def repair(fused: Chain, targets: list[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor) -> Chain:
    """Rescale (and, where a bias or BatchNorm can absorb it, shift) each fused hidden neuron so
    its pre-activation mean and std on ``x`` match ``targets``: undoes the variance collapse
    that averaging causes. Layers are corrected in order, each seeing the corrected earlier ones."""
    hidden = list(fused.hidden)
    h = fused.input(x)
    for k, (t_mean, t_std) in enumerate(targets):
        chain = Chain(hidden, fused.classifier, fused.flatten_input)
        mean, std = _pre_stats(chain.pre_activation(k, h))
        scale = torch.where(std > 1e-8, t_std / std.clamp_min(1e-8), torch.ones_like(std))
        shift = t_mean - scale * mean
        layer = hidden[k]
        if layer.bn is not None:
            bn = dict(layer.bn)
            bn["weight"] = (bn["weight"].double() * scale).float()
            bn["bias"] = (bn["bias"].double() * scale + shift).float()
            layer = layer.with_(bn=bn)
        else:
            shape = (-1,) + (1,) * (layer.weight.dim() - 1)
            weight = (layer.weight.double() * scale.view(shape)).float()
            bias = (layer.bias.double() * scale + shift).float() if layer.bias is not None else None
            layer = layer.with_(weight=weight, bias=bias)
        hidden[k] = layer
        chain = Chain(hidden, fused.classifier, fused.flatten_input)
        h = chain.post_activation(k, chain.pre_activation(k, h))
    return Chain(hidden, fused.classifier, fused.flatten_input)


@dataclass
class FusionResult:
    chain: Chain
    plans: list[list[np.ndarray]]
    mixing: list[list[float]]


def fuse_chains(anchor: Chain, sources: list[Chain], weights: list[float], x: torch.Tensor | None,
                settings: FusionSettings = FusionSettings()) -> FusionResult:
    """Fuse ``sources`` into ``anchor``'s architecture. ``weights`` has one entry per model,
    the anchor's first; all chains must already have the anchor's depth."""
    if len(weights) != len(sources) + 1:
        raise ValueError("one mixing weight per model is needed")
    aligned = [align_chain(source, anchor, x, settings) for source in sources]
    models = [anchor, *(a.chain for a in aligned)]
    fused_layers: list[ChainLayer] = []
    mixing: list[list[float]] = []
    for k in range(len(anchor.layers)):
        at_k = [m.layers[k] for m in models]
        betas = layer_weights(at_k, weights, settings.inserted)
        mixing.append(betas)
        fused_layers.append(average_layers(at_k, betas))
    fused = Chain(fused_layers[:-1], fused_layers[-1], anchor.flatten_input)
    if settings.correction == "repair" and x is not None and anchor.hidden:
        anchor_pre, _, _ = anchor.forward_record(x)
        anchor_stats = [_pre_stats(z) for z in anchor_pre]
        targets = []
        for k in range(len(anchor.hidden)):
            per_model = [anchor_stats[k], *(a.pre_stats[k] for a in aligned)]
            targets.append((sum(b * s[0] for b, s in zip(mixing[k], per_model)),
                            sum(b * s[1] for b, s in zip(mixing[k], per_model))))
        fused = repair(fused, targets, x)
    return FusionResult(fused, [a.plans for a in aligned], mixing)
