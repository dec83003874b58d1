"""Fully-connected networks: any chain of Linear layers with ReLU between them, whatever the key names."""

from __future__ import annotations

import re
from typing import Literal, Mapping

import torch
from pydantic import BaseModel, Field, model_validator
from torch import nn

from clafuse.arch.base import Chain, ChainLayer, Family, Group, LayerInfo, check_shapes
from clafuse.arch.modules import LinearChain
from clafuse.arch.network import LayerOp, Network, Space, layer_block
from clafuse.errors import SpecError


class LinearSpec(BaseModel):
    """One Linear layer: its key prefix, shape and whether it has a bias."""

    name: str = Field(min_length=1)
    in_features: int = Field(gt=0)
    out_features: int = Field(gt=0)
    bias: bool = True


class MLPSpec(BaseModel):
    """A chain of Linear layers; the last one is the classifier."""

    family: Literal["mlp"] = "mlp"
    layers: list[LinearSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _chained(self) -> "MLPSpec":
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ValueError("layer names must be unique")
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


class MLPFamily(Family):
    name = "mlp"
    spec_model = MLPSpec
    description = "chain of Linear layers with ReLU between them (any key names, biases optional)"

    def detect(self, state_dict: Mapping[str, torch.Tensor]) -> MLPSpec | None:
        prefixes: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state_dict.items():
            prefix, _, leaf = key.rpartition(".")
            if leaf not in ("weight", "bias") or not prefix:
                return None
            prefixes.setdefault(prefix, {})[leaf] = value
        layers = []
        for prefix, params in prefixes.items():
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
            return MLPSpec(layers=natural)
        orders = _chain_orders(layers)
        if len(orders) == 1:
            return MLPSpec(layers=orders[0])
        found = ", ".join(f"{layer.name} ({layer.in_features}->{layer.out_features})" for layer in natural)
        why = "no order chains their shapes" if not orders else "several orders chain their shapes"
        raise SpecError(f"found Linear layers {found} but {why}; pass --arch with a spec listing them in order")

    def check(self, spec: MLPSpec, state_dict: Mapping[str, torch.Tensor]) -> None:
        expected: dict[str, tuple[int, ...]] = {}
        for layer in spec.layers:
            expected[f"{layer.name}.weight"] = (layer.out_features, layer.in_features)
            if layer.bias:
                expected[f"{layer.name}.bias"] = (layer.out_features,)
        check_shapes(expected, state_dict)

    def build(self, spec: MLPSpec) -> nn.Module:
        return LinearChain([(layer.name, nn.Linear(layer.in_features, layer.out_features, bias=layer.bias))
                            for layer in spec.layers])

    def groups(self, spec: MLPSpec) -> list[Group]:
        hidden = tuple(
            LayerInfo(layer.name, layer.out_features, layer.out_features * (layer.in_features + int(layer.bias)))
            for layer in spec.layers[:-1]
        )
        return [Group("hidden", hidden)]

    def describe(self, spec: MLPSpec) -> Network:
        """One block per Linear layer on flattened inputs; the hidden ones are one alignment group,
        the last one (the classes) is fixed."""
        spaces = {"input": Space("input", spec.layers[0].in_features, fixed=True),
                  "logits": Space("logits", spec.layers[-1].out_features, fixed=True)}
        blocks, prev = [], "input"
        for i, layer in enumerate(spec.layers):
            last = i == len(spec.layers) - 1
            keys = {"weight": f"{layer.name}.weight", **({"bias": f"{layer.name}.bias"} if layer.bias else {})}
            shapes = {"weight": (layer.out_features, layer.in_features), "bias": (layer.out_features,)}
            blocks.append(layer_block(layer.name, keys, shapes, LayerOp(relu=not last), prev, None if last else 0,
                                      out_space="logits" if last else None, slot="classifier" if last else None))
            prev = f"{layer.name}:out"
        return Network(spaces, blocks, pre=lambda x: x.flatten(1))

    def to_chain(self, spec: MLPSpec, state_dict: Mapping[str, torch.Tensor]) -> Chain:
        layers = [
            ChainLayer(
                weight=state_dict[f"{layer.name}.weight"].float(),
                bias=state_dict[f"{layer.name}.bias"].float() if layer.bias else None,
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
        return out
