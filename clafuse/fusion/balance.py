"""Balancing depths: make two chains the same depth according to a layer mapping.

``add`` inserts exact identity layers into the shallow chain (the result has the deep depth);
``merge`` folds the deep chain's unmatched layers into their successors (the shallow depth).
"""

from __future__ import annotations

import torch

from clafuse.arch.base import Chain, ChainLayer
from clafuse.errors import ClafuseError

BALANCE_METHODS = ("add", "merge")


def identity_layer(width: int, template: ChainLayer) -> ChainLayer:
    """A layer computing ReLU(x) = x on non-negative inputs of ``width`` features, shaped like
    ``template`` (Linear or k x k conv, with a zero bias / identity BatchNorm where it has them)."""
    if template.is_conv:
        k = int(template.weight.shape[-1])
        weight = torch.zeros(width, width, k, k)
        weight[torch.arange(width), torch.arange(width), k // 2, k // 2] = 1.0
        padding = k // 2
    else:
        weight = torch.eye(width)
        padding = 0
    bn = None
    if template.bn is not None:
        bn = {
            "weight": torch.ones(width),
            "bias": torch.zeros(width),
            "running_mean": torch.zeros(width),
            "running_var": torch.full((width,), 1.0 - template.bn_eps),
        }
    return ChainLayer(
        weight=weight,
        bias=torch.zeros(width) if template.bias is not None else None,
        bn=bn,
        bn_eps=template.bn_eps,
        relu=True,
        stride=1,
        padding=padding,
        inserted=True,
    )


def insert_identities(shallow: Chain, mapping: list[int], deep: Chain) -> Chain:
    """The shallow chain with an identity layer at every deep position no shallow layer maps to.

    ``mapping[i]`` is the deep position of shallow hidden layer i (strictly increasing). The
    inserted layer has the width of its predecessor, so the result computes exactly the shallow
    chain's function (identity layers see post-ReLU, hence non-negative, inputs; before the first
    real layer they are exact only when the network inputs are non-negative). Max-pools go where
    the deep chain has them, which is exact because identities commute with max-pooling, provided
    every shallow layer keeps the number of pools before it (layers map within their chunk).
    """
    _check_mapping(mapping, len(shallow.hidden), len(deep.hidden))
    by_position = dict(zip(mapping, shallow.hidden))
    hidden: list[ChainLayer] = []
    width = shallow.hidden[0].in_width if shallow.hidden else shallow.classifier.in_width
    for j, deep_layer in enumerate(deep.hidden):
        layer = by_position.get(j)
        if layer is None:
            layer = identity_layer(width, deep_layer)
        if layer.flatten_before != deep_layer.flatten_before:
            raise ClafuseError(f"deep hidden layer {j} {'flattens' if deep_layer.flatten_before else 'does not flatten'} "
                               f"the feature maps but the shallow layer mapped there does not match: the first "
                               f"fully-connected layers of both networks must map to each other")
        hidden.append(layer)
        width = layer.width
    if any(layer.pool_after for layer in (*shallow.hidden, *deep.hidden)):
        hidden = _pools_like(hidden, shallow, mapping, deep)
    return Chain(hidden=hidden, classifier=shallow.classifier, flatten_input=shallow.flatten_input)


def _pools_like(hidden: list[ChainLayer], shallow: Chain, mapping: list[int], deep: Chain) -> list[ChainLayer]:
    """``hidden`` with the max-pools at the deep chain's positions, if that keeps its function."""

    def before(layers: list[ChainLayer]) -> list[int]:
        counts = [0]
        for layer in layers:
            counts.append(counts[-1] + int(layer.pool_after))
        return counts

    s_pools, d_pools = before(shallow.hidden), before(deep.hidden)
    if s_pools[-1] != d_pools[-1]:
        raise ClafuseError(f"the shallow network has {s_pools[-1]} max-pools, the deep one {d_pools[-1]}: "
                           f"they must pool equally often")
    for i, j in enumerate(mapping):
        if s_pools[i] != d_pools[j]:
            raise ClafuseError(f"shallow hidden layer {i} follows {s_pools[i]} max-pools but would follow "
                               f"{d_pools[j]} at deep position {j}: layers must map within their chunk")
    return [layer if layer.pool_after == d.pool_after else layer.with_(pool_after=d.pool_after)
            for layer, d in zip(hidden, deep.hidden)]


@torch.no_grad()
def relu_gates(deep: Chain, x: torch.Tensor) -> list[torch.Tensor]:
    """Per hidden layer of ``deep``, the fraction of calibration samples on which each unit is
    active: the diagonal that best stands in for the ReLU when the layer is folded away."""
    pre, _, _ = deep.forward_record(x)
    return [(z > 0).double().flatten(2).mean(-1).mean(0) if z.dim() > 2 else (z > 0).double().mean(0)
            for z in pre]


def merge_layers(deep: Chain, mapping: list[int], gates: list[torch.Tensor]) -> Chain:
    """The deep chain with each unmatched hidden layer folded into the next kept layer.

    A folded layer's ReLU is replaced by diag(gate), so layers j, ..., k become the single
    Linear W_k D_{k-1} W_{k-1} ... D_j W_j (biases carried through). Layers after the last
    matched one fold into the classifier.
    """
    _check_mapping(mapping, len(mapping), len(deep.hidden))
    kept = set(mapping)
    for j, layer in enumerate(deep.hidden):
        if j not in kept and (layer.is_conv or layer.bn is not None):
            raise ClafuseError(f"merge balancing cannot fold hidden layer {j} of the deeper network: only "
                               "fully-connected layers without BatchNorm fold into their successor; use --balance "
                               "add (the deeper architecture)")
    hidden: list[ChainLayer] = []
    acc_w: torch.Tensor | None = None
    acc_b: torch.Tensor | None = None
    for j, layer in enumerate(deep.layers):
        w = layer.weight.double()
        b = layer.bias.double() if layer.bias is not None else None
        if acc_w is not None:
            w, b = w @ acc_w, _affine_bias(w, acc_b, b)
        if j < len(deep.hidden) and j not in kept:
            gate = gates[j].double()
            acc_w = gate[:, None] * w
            acc_b = gate * b if b is not None else None
            continue
        acc_w = acc_b = None
        merged = layer.with_(weight=w.float(), bias=b.float() if b is not None else None)
        if j < len(deep.hidden):
            hidden.append(merged)
        else:
            classifier = merged
    return Chain(hidden=hidden, classifier=classifier, flatten_input=deep.flatten_input)


def _affine_bias(w: torch.Tensor, carried: torch.Tensor | None, own: torch.Tensor | None) -> torch.Tensor | None:
    """Bias of W (x' + carried) + own: the carried bias of folded layers passes through W."""
    if carried is None:
        return own
    through = w @ carried
    return through if own is None else through + own


def _check_mapping(mapping: list[int], n: int, m: int) -> None:
    if len(mapping) != n or any(not 0 <= j < m for j in mapping) or any(
        a >= b for a, b in zip(mapping, mapping[1:])
    ):
        raise ClafuseError(f"invalid layer mapping {mapping} for {n} shallow and {m} deep layers")
