"""A family written for the tests as the worked example of docs/ARCHITECTURE.md: a residual MLP
with pre-LayerNorm blocks, described as data and fused by the engine with no change to it.

    h = embed(x);  h = h + fc2(relu(fc1(LN_i(h))))  for each block i;  logits = head(LN(h))

One residual stream (every block writes into it, the embedding, LayerNorms and head read or
scale it), one hidden space per block. A block whose ``fc2`` is zero is the identity, so blocks
can be inserted exactly, and dropped.
"""

from __future__ import annotations

from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from pydantic import BaseModel

from clafuse.arch.base import Family, Group, LayerInfo
from clafuse.arch.network import Block, Network, Param, Site, Space, Tap


class ResMLPSpec(BaseModel):
    family: Literal["resmlp"] = "resmlp"
    in_features: int
    width: int
    hidden: int
    blocks: int
    classes: int


def _embed(t: Mapping[str, torch.Tensor], x: torch.Tensor, tap: Tap) -> torch.Tensor:
    return tap.space("stream", F.linear(x.flatten(1), t["embed.weight"], t["embed.bias"]))


def _head(t: Mapping[str, torch.Tensor], h: torch.Tensor, tap: Tap) -> torch.Tensor:
    u = F.layer_norm(h, h.shape[-1:], t["norm.weight"], t["norm.bias"])
    return tap.site("out", F.linear(u, t["head.weight"], t["head.bias"]), u)


def residual(name: str, width: int, hidden: int) -> Block:
    """Block ``name``: its hidden units are an inner space; it reads and writes the stream."""
    inner = f"{name}:hidden"

    def forward(t: Mapping[str, torch.Tensor], h: torch.Tensor, tap: Tap) -> torch.Tensor:
        u = F.layer_norm(h, h.shape[-1:], t["norm.weight"], t["norm.bias"])
        a = tap.space(inner, torch.relu(tap.site("hidden", F.linear(u, t["fc1.weight"], t["fc1.bias"]), u)))
        return tap.space("stream", h + F.linear(a, t["fc2.weight"], t["fc2.bias"]))

    params = {
        "norm.weight": Param(f"{name}.norm.weight", ("stream",), (width,), "norm"),
        "norm.bias": Param(f"{name}.norm.bias", ("stream",), (width,), "norm"),
        "fc1.weight": Param(f"{name}.fc1.weight", (inner, "stream"), (hidden, width)),
        "fc1.bias": Param(f"{name}.fc1.bias", (inner,), (hidden,), "bias"),
        "fc2.weight": Param(f"{name}.fc2.weight", ("stream", inner), (width, hidden)),
        "fc2.bias": Param(f"{name}.fc2.bias", ("stream",), (width,), "bias"),
    }
    spaces = {"hidden": Space(inner, hidden, ((f"{name}.fc1.weight", f"{name}.fc1.bias"),), owner=name, local="hidden")}
    return Block(name, params, forward, spaces, {"hidden": Site(inner, "fc1.weight", "fc1.bias")}, group=0,
                 output="stream", identity=identity, drop=True)


def identity(template: Block, width: int, in_space: str) -> Block:
    """A block whose fc2 is zero: it adds nothing to the stream. fc2 is what makes it exact; the
    rest are placeholders."""
    hidden = template.params["fc1.weight"].shape[0]
    block = residual(f"{template.name}+identity", width, hidden)
    values = {p.key: torch.ones(p.shape) if local == "norm.weight" else torch.zeros(p.shape)
              for local, p in block.params.items()}
    return block.with_(inserted=True, exact=frozenset({"fc2.weight", "fc2.bias"}), values=values)


class ResMLPFamily(Family):
    name = "resmlp"
    spec_model = ResMLPSpec

    def groups(self, spec: ResMLPSpec) -> list[Group]:
        return [Group("blocks", tuple(LayerInfo(f"blocks.{i}", spec.width, 0, "block") for i in range(spec.blocks)))]

    def describe(self, spec: ResMLPSpec) -> Network:
        w = spec.width
        spaces = {"input": Space("input", spec.in_features, fixed=True),
                  "stream": Space("stream", w, (("embed.weight", "embed.bias"),)),
                  "logits": Space("logits", spec.classes, fixed=True)}
        embed = Block("embed", {"embed.weight": Param("embed.weight", ("stream", "input"), (w, spec.in_features)),
                                "embed.bias": Param("embed.bias", ("stream",), (w,), "bias")},
                      _embed, output="stream")
        head = Block("head", {"norm.weight": Param("norm.weight", ("stream",), (w,), "norm"),
                              "norm.bias": Param("norm.bias", ("stream",), (w,), "norm"),
                              "head.weight": Param("head.weight", ("logits", "stream"), (spec.classes, w)),
                              "head.bias": Param("head.bias", ("logits",), (spec.classes,), "bias")},
                     _head, sites={"out": Site("logits", "head.weight", "head.bias")}, output="logits")
        blocks = [residual(f"blocks.{i}", w, spec.hidden) for i in range(spec.blocks)]
        return Network(spaces, [embed, *blocks, head])
