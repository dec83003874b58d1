"""Plain weight layers as blocks: a Linear or conv with optional BatchNorm and an activation
(:class:`LayerOp`), max-pools, and the exact identity layers balancing inserts. The MLP, VGG and
plain-CNN families build their :class:`~clafuse.arch.network.Network` from these; the activations
a spec can name, and whether each allows an identity layer or a fold, are stated here once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Literal, Mapping

import torch
import torch.nn.functional as F

from clafuse.arch.network import Block, Forward, Param, Site, Space, Tap

Activation = Literal["relu", "gelu", "tanh", "sigmoid", "identity"]
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu, "gelu": F.gelu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "identity": lambda z: z}
"""The activations a spec can name, as functions (GELU: torch's exact erf form)."""


def no_identity_reason(act: str) -> str | None:
    """Why an identity layer cannot be inserted before activation ``act`` (None: it can). A layer
    computing the identity on its inputs needs act(x) = x on them: ReLU on the non-negative
    outputs of an earlier ReLU, or no activation at all."""
    if act in ("relu", "identity"):
        return None
    return (f"the network uses {act}, for which no layer is an exact identity (only ReLU, on non-negative inputs, "
            f"or no activation)")


def no_fold_reason(act: str) -> str | None:
    """Why a layer with activation ``act`` cannot be folded into its successor (None: it can)."""
    if act == "relu":
        return None
    return (f"the network uses {act}: merge folds a layer by replacing its ReLU with the ReLU's gate, which "
            f"is meaningless for {act}")


@dataclass(frozen=True)
class LayerOp:
    """What one weight layer computes besides its tensors: a Linear or a k x k conv (stride,
    padding), an optional BatchNorm (eps), an activation, and an adaptive average pool and/or flatten
    before it (a conv feature map turned into a vector). Max-pools are blocks of their own."""

    conv: bool = False
    stride: int = 1
    padding: int = 0
    norm: bool = False
    eps: float = 1e-5
    relu: bool = True
    flatten_before: bool = False
    avgpool_before: tuple[int, int] | None = None
    act: str = "relu"
    """The activation applied where ``relu`` is set (the name is historical: any of ACTIVATIONS)."""
    min_size: int | None = None
    """Feature maps smaller than this are first average-pooled up to it (timm's ConvMlp)."""


def layer_forward(op: LayerOp, out_space: str) -> Forward:
    """The forward of a weight layer with local tensors ``weight``, ``bias`` and ``bn.*``."""

    def forward(t: Mapping[str, torch.Tensor], h: torch.Tensor, tap: Tap) -> torch.Tensor:
        if op.avgpool_before is not None:
            h = F.adaptive_avg_pool2d(h, op.avgpool_before)
        if op.flatten_before:
            h = h.flatten(1)
        if op.min_size is not None and min(h.shape[-2:]) < op.min_size:
            h = F.adaptive_avg_pool2d(h, (max(op.min_size, h.shape[-2]), max(op.min_size, h.shape[-1])))
        if op.conv:
            z = F.conv2d(h, t["weight"], t.get("bias"), stride=op.stride, padding=op.padding)
        else:
            z = F.linear(h, t["weight"], t.get("bias"))
        if op.norm:
            z = tap.norm("bn", z, op.eps)
        z = tap.site("out", z, None if op.conv or op.norm else h)
        if op.relu:
            z = ACTIVATIONS[op.act](z)
        return tap.space(out_space, z)

    return forward


def pool_block(name: str, space: str, slot: str | None = None) -> Block:
    """A 2x2 max-pool: a fixed block without tensors. Its output is recorded as the activations of
    the layer it pools (max-pooling commutes with permutations and identity layers): the block
    that really precedes it when it runs (an identity inserted by balancing), else ``space``; so
    both networks record each space at the same point, before or after the pool."""

    def forward(t: Mapping[str, torch.Tensor], h: torch.Tensor, tap: Tap) -> torch.Tensor:
        return tap.space(tap.current or space, F.max_pool2d(h, 2))

    return Block(name, {}, forward, slot=slot)


def layer_block(name: str, keys: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]], op: LayerOp,
                in_space: str, group: int | None, out_space: str | None = None, slot: str | None = None) -> Block:
    """A weight layer as a block. ``keys``/``shapes``: local name (``weight``, ``bias``,
    ``bn.<leaf>``) -> checkpoint key / shape. Its outputs form the inner space ``<name>:out``, or
    the fixed space ``out_space`` (the classes). A hidden layer with a ReLU has an exact identity
    (:func:`identity_layer_block`) and, as a plain Linear, folds into its successor; with another
    activation the block says why not (``attrs["no_identity"]``, ``attrs["no_fold"]``)."""
    out = out_space or f"{name}:out"
    width = int(shapes["weight"][0])
    params = {}
    for local, key in keys.items():
        shape = tuple(shapes[local])
        if local == "weight":
            params[local] = Param(key, (out, in_space) + (None,) * (len(shape) - 2), shape)
        else:
            leaf = local.split(".")[-1]
            kind = "bias" if local == "bias" else ("norm" if leaf in ("weight", "bias") else "stat")
            params[local] = Param(key, (out,), shape, kind)
    spaces = {}
    if out_space is None:
        signature = (tuple(keys[k] for k in ("weight", "bias") if k in keys),)
        spaces["out"] = Space(out, width, signature, owner=name, local="out")
    sites = {"out": Site(out, "weight", "bias" if "bias" in keys else None, "bn" if op.norm else None)}
    hidden = out_space is None
    act = op.act if op.relu else "identity"
    attrs: dict[str, Any] = {"op": op, "in_space": in_space, "out_space": out_space}
    if no_identity_reason(act):
        attrs["no_identity"] = no_identity_reason(act)
    if no_fold_reason(act):
        attrs["no_fold"] = no_fold_reason(act)
    return Block(name, params, layer_forward(op, out), spaces, sites, group, slot, out,
                 identity=identity_layer_block if hidden and no_identity_reason(act) is None else None,
                 fold=hidden and act == "relu" and not op.conv and not op.norm, reported=True,
                 attrs=attrs)


def identity_weight(width: int, template: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """eye(width), or for a k x k conv template a centred delta kernel per channel."""
    if len(template) == 4:
        k = int(template[-1])
        weight = torch.zeros(width, width, k, k)
        weight[torch.arange(width), torch.arange(width), k // 2, k // 2] = 1.0
        return weight
    return torch.eye(width)


def identity_layer_block(template: Block, width: int, in_space: str) -> Block | None:
    """A layer computing ReLU(x) = x on non-negative inputs of ``width`` features, shaped like
    ``template`` (Linear or k x k conv, a zero bias and identity BatchNorm where it has them),
    stride 1, reading ``in_space`` (with no activation: the identity on any input). None where the
    template turns feature maps into vectors or resizes them."""
    op: LayerOp = template.attrs["op"]
    if op.flatten_before or op.avgpool_before is not None or op.min_size is not None:
        return None
    shape = (width, width, *template.params["weight"].shape[2:])
    values = {"weight": identity_weight(width, shape)}
    if "bias" in template.params:
        values["bias"] = torch.zeros(width)
    if op.norm:
        values.update({"bn.weight": torch.ones(width), "bn.bias": torch.zeros(width),
                       "bn.running_mean": torch.zeros(width), "bn.running_var": torch.full((width,), 1.0 - op.eps)})
    name = f"{template.name}+identity"
    padding = int(shape[-1]) // 2 if op.conv else 0
    new_op = replace(op, stride=1, padding=padding, flatten_before=False, avgpool_before=None)
    keys = {local: f"{name}.{local}" for local in values}
    block = layer_block(name, keys, {k: tuple(v.shape) for k, v in values.items()}, new_op, in_space, template.group)
    return block.with_(inserted=True, exact=frozenset(values), values={keys[k]: v for k, v in values.items()})
