"""Fully-connected networks: any chain of Linear layers, whatever the key names, each hidden one
optionally followed by a BatchNorm1d, with one activation between them (ReLU unless the spec
says otherwise: a state dict cannot tell).

A BatchNorm1d (a module with ``running_mean``/``running_var``) belongs to the Linear whose
outputs it normalises: the one of its width, told apart by position where several fit
(``net.0`` Linear then ``net.1`` BatchNorm; ``fc2`` and ``bn2``). The order is Linear,
BatchNorm, activation, as ``nn.Sequential(nn.Linear, nn.BatchNorm1d, nn.ReLU)`` lays it out.
"""

from __future__ import annotations

import re
from typing import Literal, Mapping

import torch
from pydantic import BaseModel, Field, model_validator
from torch import nn

from clafuse.arch.base import BN_KEYS, Chain, ChainLayer, Family, Group, LayerInfo, check_shapes
from clafuse.arch.modules import LinearChain
from clafuse.arch.layers import Activation, LayerOp, layer_block
from clafuse.arch.network import Network, Space
from clafuse.errors import SpecError


class LinearSpec(BaseModel):
    """One Linear layer: its key prefix, shape and whether it has a bias; ``norm``: the key prefix
    of the BatchNorm1d after it, if any (``norm_tracked``: whether it stores
    ``num_batches_tracked``)."""

    name: str = Field(min_length=1)
    in_features: int = Field(gt=0)
    out_features: int = Field(gt=0)
    bias: bool = True
    norm: str | None = Field(None, min_length=1)
    norm_tracked: bool = True


class MLPSpec(BaseModel):
    """A chain of Linear layers; the last one is the classifier. ``activation`` follows every
    hidden layer (after its BatchNorm)."""

    family: Literal["mlp"] = "mlp"
    layers: list[LinearSpec] = Field(min_length=1)
    activation: Activation = "relu"
    bn_eps: float = Field(1e-5, gt=0)

    @model_validator(mode="after")
    def _chained(self) -> "MLPSpec":
        names = [layer.name for layer in self.layers] + [layer.norm for layer in self.layers if layer.norm]
        if len(set(names)) != len(names):
            raise ValueError("layer and norm names must be unique")
        for prev, nxt in zip(self.layers, self.layers[1:]):
            if nxt.in_features != prev.out_features:
                raise ValueError(
                    f"layer {nxt.name!r} takes {nxt.in_features} inputs but {prev.name!r} gives {prev.out_features}"
                )
        return self


def _natural_key(name: str) -> list[object]:
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]


def _chain_orders(layers: list[LinearSpec]) -> list[list[LinearSpec]]:
    """All orderings of ``layers`` in which each layer's input width is the previous one's output."""
    found: list[list[LinearSpec]] = []

    def extend(path: list[LinearSpec], rest: list[LinearSpec]) -> None:
        if len(found) > 1:
            return
        if not rest:
            found.append(path)
            return
        for i, cand in enumerate(rest):
            if cand.in_features == path[-1].out_features:
                extend(path + [cand], rest[:i] + rest[i + 1:])

    for i, first in enumerate(layers):
        extend([first], layers[:i] + layers[i + 1:])
    return found


def _follows(norm: str, linear: str) -> bool:
    """Whether the BatchNorm named ``norm`` sits right after the Linear ``linear`` by its name:
    the next index of one Sequential (``net.0`` -> ``net.1``) or the same number (``fc2`` -> ``bn2``)."""
    n_parent, _, n_leaf = norm.rpartition(".")
    l_parent, _, l_leaf = linear.rpartition(".")
    if n_parent != l_parent:
        return False
    if n_leaf.isdigit() and l_leaf.isdigit():
        return int(n_leaf) == int(l_leaf) + 1
    n_num, l_num = re.search(r"(\d+)$", n_leaf), re.search(r"(\d+)$", l_leaf)
    return bool(n_num and l_num and int(n_num.group(1)) == int(l_num.group(1)))


def _attach_norms(layers: list[LinearSpec], norms: dict[str, dict[str, torch.Tensor]]) -> list[LinearSpec]:
    """``layers`` with each BatchNorm1d given to the Linear it follows; SpecError when one fits none
    or several."""
    taken: dict[str, str] = {}
    for norm in sorted(norms, key=_natural_key):
        width = int(norms[norm]["running_mean"].shape[0])
        fits = [l.name for l in layers if l.out_features == width and l.name not in taken.values()]
        if len(fits) > 1:
            fits = [name for name in fits if _follows(norm, name)]
        if len(fits) != 1:
            why = "no Linear layer of that width" if not fits else f"several Linear layers ({', '.join(fits)})"
            raise SpecError(f"BatchNorm {norm} ({width} features) follows {why}; pass --arch with an mlp spec "
                            f"giving each layer's norm")
        taken[norm] = fits[0]
    by_linear = {linear: norm for norm, linear in taken.items()}
    return [l.model_copy(update={"norm": by_linear[l.name],
                                 "norm_tracked": "num_batches_tracked" in norms[by_linear[l.name]]})
            if l.name in by_linear else l for l in layers]


class MLPFamily(Family):
    name = "mlp"
    spec_model = MLPSpec
    description = ("chain of Linear layers (any key names, biases and BatchNorm1d optional) with one activation "
                   "between them (ReLU unless the spec says otherwise)")

    def detect(self, state_dict: Mapping[str, torch.Tensor]) -> MLPSpec | None:
        prefixes: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state_dict.items():
            prefix, _, leaf = key.rpartition(".")
            if leaf not in (*BN_KEYS, "num_batches_tracked") or not prefix:
                return None
            prefixes.setdefault(prefix, {})[leaf] = value
        norms = {prefix: params for prefix, params in prefixes.items() if "running_mean" in params}
        for prefix, params in norms.items():
            if not set(BN_KEYS) <= set(params) or any(params[leaf].dim() != 1 for leaf in BN_KEYS) or len(
                    {params[leaf].shape for leaf in BN_KEYS}) != 1:
                return None
        layers = []
        for prefix, params in prefixes.items():
            if prefix in norms:
                continue
            if set(params) - {"weight", "bias"}:
                return None
            weight = params.get("weight")
            if weight is None or weight.dim() != 2:
                return None
            bias = params.get("bias")
            if bias is not None and tuple(bias.shape) != (weight.shape[0],):
                return None
            layers.append(LinearSpec(name=prefix, in_features=int(weight.shape[1]),
                                     out_features=int(weight.shape[0]), bias=bias is not None))
        if not layers:
            return None
        natural = sorted(layers, key=lambda layer: _natural_key(layer.name))
        if all(b.in_features == a.out_features for a, b in zip(natural, natural[1:])):
            return MLPSpec(layers=_attach_norms(natural, norms))
        orders = _chain_orders(layers)
        if len(orders) == 1:
            return MLPSpec(layers=_attach_norms(orders[0], norms))
        found = ", ".join(f"{layer.name} ({layer.in_features}->{layer.out_features})" for layer in natural)
        why = "no order chains their shapes" if not orders else "several orders chain their shapes"
        raise SpecError(f"found Linear layers {found} but {why}; pass --arch with a spec listing them in order")

    def check(self, spec: MLPSpec, state_dict: Mapping[str, torch.Tensor]) -> None:
        expected: dict[str, tuple[int, ...]] = {}
        for layer in spec.layers:
            expected[f"{layer.name}.weight"] = (layer.out_features, layer.in_features)
            if layer.bias:
                expected[f"{layer.name}.bias"] = (layer.out_features,)
            if layer.norm:
                expected.update({f"{layer.norm}.{leaf}": (layer.out_features,) for leaf in BN_KEYS})
                if layer.norm_tracked:
                    expected[f"{layer.norm}.num_batches_tracked"] = ()
        check_shapes(expected, state_dict)

    def build(self, spec: MLPSpec) -> nn.Module:
        # A BatchNorm without num_batches_tracked in the checkpoint still loads strictly (torch
        # fills the counter in, as for old checkpoints).
        return LinearChain([(layer.name, nn.Linear(layer.in_features, layer.out_features, bias=layer.bias))
                            for layer in spec.layers],
                           {layer.name: (layer.norm, nn.BatchNorm1d(layer.out_features, eps=spec.bn_eps))
                            for layer in spec.layers if layer.norm}, spec.activation)

    def traits(self, spec: MLPSpec) -> dict[str, object]:
        return {"activation": spec.activation, "inputs": spec.layers[0].in_features,
                "classes": spec.layers[-1].out_features, "BatchNorm1d": any(l.norm for l in spec.layers)}

    def groups(self, spec: MLPSpec) -> list[Group]:
        hidden = tuple(
            LayerInfo(layer.name, layer.out_features,
                      layer.out_features * (layer.in_features + int(layer.bias) + 2 * int(bool(layer.norm))))
            for layer in spec.layers[:-1]
        )
        return [Group("hidden", hidden)]

    def describe(self, spec: MLPSpec) -> Network:
        """One block per Linear layer (with its BatchNorm) on flattened inputs; the hidden ones are
        one alignment group, the last one (the classes) is fixed."""
        spaces = {"input": Space("input", spec.layers[0].in_features, fixed=True),
                  "logits": Space("logits", spec.layers[-1].out_features, fixed=True)}
        blocks, prev = [], "input"
        for i, layer in enumerate(spec.layers):
            last = i == len(spec.layers) - 1
            keys = {"weight": f"{layer.name}.weight", **({"bias": f"{layer.name}.bias"} if layer.bias else {})}
            shapes = {"weight": (layer.out_features, layer.in_features), "bias": (layer.out_features,)}
            if layer.norm:
                keys.update({f"bn.{leaf}": f"{layer.norm}.{leaf}" for leaf in BN_KEYS})
                shapes.update({f"bn.{leaf}": (layer.out_features,) for leaf in BN_KEYS})
            op = LayerOp(relu=not last, act=spec.activation, norm=bool(layer.norm), eps=spec.bn_eps)
            blocks.append(layer_block(layer.name, keys, shapes, op, prev, None if last else 0,
                                      out_space="logits" if last else None, slot="classifier" if last else None))
            prev = f"{layer.name}:out"
        return Network(spaces, blocks, pre=lambda x: x.flatten(1))

    def to_chain(self, spec: MLPSpec, state_dict: Mapping[str, torch.Tensor]) -> Chain:
        layers = [
            ChainLayer(
                weight=state_dict[f"{layer.name}.weight"].float(),
                bias=state_dict[f"{layer.name}.bias"].float() if layer.bias else None,
                bn={leaf: state_dict[f"{layer.norm}.{leaf}"].float() for leaf in BN_KEYS} if layer.norm else None,
                bn_eps=spec.bn_eps, act=spec.activation,
            )
            for layer in spec.layers
        ]
        layers[-1].relu = False
        return Chain(hidden=layers[:-1], classifier=layers[-1], flatten_input=True)

    def from_chain(self, spec: MLPSpec, chain: Chain, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if len(chain.layers) != len(spec.layers):
            raise SpecError(f"fused network has {len(chain.layers)} layers, the target has {len(spec.layers)}")
        out: dict[str, torch.Tensor] = {}
        for layer, cl in zip(spec.layers, chain.layers):
            key = f"{layer.name}.weight"
            if tuple(cl.weight.shape) != (layer.out_features, layer.in_features):
                raise SpecError(f"fused {key} has shape {tuple(cl.weight.shape)}, the target needs "
                                f"{(layer.out_features, layer.in_features)}")
            out[key] = cl.weight.to(like[key].dtype).contiguous()
            if layer.bias:
                bias = cl.bias if cl.bias is not None else torch.zeros(layer.out_features)
                out[f"{layer.name}.bias"] = bias.to(like[f"{layer.name}.bias"].dtype).contiguous()
            if layer.norm:
                if cl.bn is None:
                    raise SpecError(f"fused layer {layer.name} has no BatchNorm, the target has {layer.norm}")
                out.update({f"{layer.norm}.{leaf}": cl.bn[leaf].to(like[f"{layer.norm}.{leaf}"].dtype).contiguous()
                            for leaf in BN_KEYS})
                if layer.norm_tracked:
                    out[f"{layer.norm}.num_batches_tracked"] = like[f"{layer.norm}.num_batches_tracked"].clone()
        return out
