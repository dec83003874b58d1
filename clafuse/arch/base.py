"""What every architecture family provides, and the layer-chain view fusion works on.

A family (MLP, VGG, ResNet, ...) knows how to recognise its state dicts, describe a network as a
spec, build a plain-torch module whose state-dict keys are the checkpoint's own, and translate
between a checkpoint and a :class:`Chain`: an ordered list of weight layers that alignment and
fusion handle without knowing the family.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from pydantic import BaseModel

from clafuse.arch.layers import ACTIVATIONS, LayerOp, layer_block, pool_block
from clafuse.arch.network import Block, Network, Space
from clafuse.errors import SpecError

BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def check_shapes(expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, torch.Tensor],
                 context: str = "") -> None:
    """Raise SpecError naming the first missing, unexpected or mis-shaped key; ``context`` (e.g. the
    spec in brief) is appended to the message."""
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise SpecError(f"the spec expects {missing[0]!r}, which the checkpoint lacks"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") + context)
    extra = [k for k in state_dict if k not in expected]
    if extra:
        raise SpecError(f"the checkpoint has {extra[0]!r}, which the spec does not describe"
                        + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "") + context)
    for key, shape in expected.items():
        got = tuple(state_dict[key].shape)
        if got != shape:
            raise SpecError(f"{key} has shape {got}, the spec implies {shape}{context}")


@dataclass
class ChainLayer:
    """One weight layer: a Linear or Conv2d, optionally followed by BatchNorm and an activation
    (``relu``: whether it has one; ``act``: which, default ReLU).

    ``weight`` has shape (out, in, *kernel). ``inserted`` marks an identity layer added by balancing,
    which computes nothing new and should not dilute a real layer when averaged. ``avgpool_before``
    (an adaptive average pool to that (h, w), as in torchvision's VGG) and ``flatten_before`` turn a
    conv feature map into the layer's input.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    bn: dict[str, torch.Tensor] | None = None
    bn_eps: float = 1e-5
    relu: bool = True
    flatten_before: bool = False
    pool_after: bool = False
    stride: int = 1
    padding: int = 0
    inserted: bool = False
    avgpool_before: tuple[int, int] | None = None
    act: str = "relu"

    @property
    def width(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_width(self) -> int:
        return int(self.weight.shape[1])

    @property
    def is_conv(self) -> bool:
        return self.weight.dim() == 4

    def with_(self, **changes: Any) -> "ChainLayer":
        return replace(self, **changes)

    def layer_input(self, h: torch.Tensor) -> torch.Tensor:
        """The previous layer's output ``h`` as this layer's weights see it (pooled, flattened)."""
        if self.avgpool_before is not None:
            h = F.adaptive_avg_pool2d(h, self.avgpool_before)
        return h.flatten(1) if self.flatten_before else h


@dataclass
class Chain:
    """A feed-forward network as hidden layers followed by one classifier layer."""

    hidden: list[ChainLayer]
    classifier: ChainLayer
    flatten_input: bool = True

    @property
    def layers(self) -> list[ChainLayer]:
        return [*self.hidden, self.classifier]

    def pre_activation(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Output of layer ``k``'s weights (and BN) on its input ``h``, before the ReLU."""
        layer = self.layers[k]
        h = layer.layer_input(h)
        if layer.is_conv:
            z = F.conv2d(h, layer.weight, layer.bias, stride=layer.stride, padding=layer.padding)
        else:
            z = F.linear(h, layer.weight, layer.bias)
        if layer.bn is not None:
            z = F.batch_norm(z, layer.bn["running_mean"], layer.bn["running_var"], layer.bn["weight"],
                             layer.bn["bias"], training=False, eps=layer.bn_eps)
        return z

    def post_activation(self, k: int, z: torch.Tensor) -> torch.Tensor:
        """Layer ``k``'s output from its pre-activation: the activation, then max-pool where the layer has one."""
        layer = self.layers[k]
        h = ACTIVATIONS[layer.act](z) if layer.relu else z
        if layer.pool_after:
            h = F.max_pool2d(h, 2)
        return h

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) if self.flatten_input else x

    @torch.no_grad()
    def forward_record(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Run the chain; return per hidden layer its pre- and post-activations, and the logits."""
        h = self.input(x)
        pre, post = [], []
        for k in range(len(self.hidden)):
            z = self.pre_activation(k, h)
            h = self.post_activation(k, z)
            pre.append(z)
            post.append(h)
        return pre, post, self.pre_activation(len(self.hidden), h)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_record(x)[2]


@dataclass(frozen=True)
class LayerInfo:
    """An alignable layer as ``inspect`` and map files show it."""

    name: str
    width: int
    params: int
    kind: str = "linear"


@dataclass(frozen=True)
class Group:
    """Layers aligned together by one DP (MLP hidden layers, a VGG chunk, a ResNet stage)."""

    name: str
    layers: tuple[LayerInfo, ...]
    pin_first: bool | None = None
    """True where the architecture forces the first layers to match (a stage's strided block)."""


@dataclass
class Family:
    """Base class of an architecture family; subclasses are registered in :mod:`clafuse.arch.registry`."""

    name: ClassVar[str] = ""
    spec_model: ClassVar[type[BaseModel]]
    description: ClassVar[str] = ""
    engine: ClassVar[str] = "network"

    def detect(self, state_dict: Mapping[str, torch.Tensor]) -> BaseModel | None:
        """A spec if ``state_dict`` looks like this family, else None. Raise SpecError if it
        clearly is this family but ambiguous, saying what was found."""
        raise NotImplementedError

    def detect_config(self, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None) -> BaseModel | None:
        """:meth:`detect` with the checkpoint folder's ``config.json`` at hand (where it has one):
        families whose shapes do not tell everything (attention heads) read it."""
        return self.detect(state_dict)

    def token_limits(self, spec: BaseModel) -> tuple[int, int] | None:
        """For a family whose inputs are token ids (calibration data is text): the longest
        sequence and the vocabulary size; None for the others."""
        return None

    def calibration_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` (from :meth:`instantiate`) as it is called on calibration inputs, e.g. by a
        fusion search scoring it: the module itself where inputs are tensors; text families unpack
        token ids and masks."""
        return module

    def embeds(self, spec: BaseModel) -> bool:
        """Whether the network outputs an embedding rather than class logits (a search then scores
        it by cosine agreement with the parents' mean embedding)."""
        return False

    def config(self, spec: BaseModel, base: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """The ``config.json`` of a model folder holding a network of ``spec`` (``base``: the
        target's), or None where the family writes no folders."""
        return None

    def check(self, spec: BaseModel, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Raise SpecError unless ``state_dict`` has exactly the keys and shapes ``spec`` implies."""
        raise NotImplementedError

    def build(self, spec: BaseModel) -> torch.nn.Module:
        """A plain-torch module whose ``state_dict()`` keys and shapes are those of the checkpoint."""
        raise NotImplementedError

    def instantiate(self, spec: BaseModel, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        """The network with ``state_dict`` loaded strictly, in float32 and eval mode. It is built on
        the meta device, so no memory or time goes into initial weights that are replaced at once;
        the module shares the (float32) tensors of ``state_dict``."""
        with torch.device("meta"):
            module = self.build(spec)
        tensors = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
        module.load_state_dict(tensors, strict=True, assign=True)
        return module.eval()

    def groups(self, spec: BaseModel) -> list[Group]:
        """The alignment groups, in network order."""
        raise NotImplementedError

    def traits(self, spec: BaseModel) -> dict[str, object]:
        """What two networks of this family must share to be fused (block kind, activation,
        inputs, classes, ...), by name; fusion pairs everything else."""
        return {}

    def incompatibility(self, spec: BaseModel, other: BaseModel) -> str | None:
        """Why networks ``spec`` and ``other`` cannot be fused (None: they can), said before any
        alignment work: the first trait they differ in."""
        mine, theirs = self.traits(spec), self.traits(other)
        for name, value in mine.items():
            if theirs.get(name) != value:
                return f"{name} {_shown(value)} vs {_shown(theirs.get(name))}"
        return None

    def describe(self, spec: BaseModel) -> Network:
        """The network as fusion sees it (:mod:`clafuse.arch.network`): spaces, tensors by key and
        axis, blocks in the order and groups of :meth:`groups`. Built from the spec alone."""
        raise NotImplementedError

    def to_chain(self, spec: BaseModel, state_dict: Mapping[str, torch.Tensor]) -> Chain:
        raise NotImplementedError

    def layer_outputs(self, spec: BaseModel, state_dict: Mapping[str, torch.Tensor],
                      x: torch.Tensor) -> list[torch.Tensor]:
        """Post-activation outputs of the alignable layers on ``x``, in group order."""
        return self.to_chain(spec, state_dict).forward_record(x)[1]

    def forward(self, spec: BaseModel, state_dict: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The network's logits on ``x``."""
        return self.to_chain(spec, state_dict)(x)

    def from_chain(self, spec: BaseModel, chain: Chain, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The state dict of ``chain`` under ``spec``'s key names, with the dtypes of ``like``."""
        raise NotImplementedError



def _shown(value: object) -> str:
    return "none" if value is None else str(list(value) if isinstance(value, tuple) else value)


def describe_chain(chain: Chain) -> tuple[Network, dict[str, torch.Tensor]]:
    """The chain as a description with its tensors under keys ``<k>.weight``, ``<k>.bias`` and
    ``<k>.bn.<leaf>``: hidden layers in alignment groups that change after each max-pool and at the
    layer that flattens feature maps; max-pools as fixed blocks; the classifier fixed."""
    state: dict[str, torch.Tensor] = {}
    blocks: list[Block] = []
    prev, group, in_group = "input", 0, 0
    first = chain.layers[0]
    spaces = {"input": Space("input", first.in_width, fixed=True),
              "logits": Space("logits", chain.classifier.width, fixed=True)}
    for k, layer in enumerate(chain.layers):
        last = k == len(chain.hidden)
        if layer.flatten_before and in_group:
            group, in_group = group + 1, 0
        tensors = {"weight": layer.weight, "bias": layer.bias}
        if layer.bn is not None:
            tensors.update({f"bn.{leaf}": layer.bn[leaf] for leaf in BN_KEYS})
        keys = {local: f"{k}.{local}" for local, t in tensors.items() if t is not None}
        state.update({keys[local]: tensors[local] for local in keys})
        op = LayerOp(conv=layer.is_conv, stride=layer.stride, padding=layer.padding, norm=layer.bn is not None,
                     eps=layer.bn_eps, relu=layer.relu, flatten_before=layer.flatten_before,
                     avgpool_before=layer.avgpool_before, act=layer.act)
        block = layer_block(str(k), keys, {local: tuple(state[key].shape) for local, key in keys.items()}, op, prev,
                            None if last else group, out_space="logits" if last else None,
                            slot="classifier" if last else None)
        if layer.inserted:
            block = block.with_(inserted=True, exact=frozenset(block.params))
        block.attrs["layer"] = layer
        blocks.append(block)
        prev, in_group = block.output, in_group + 1
        if layer.pool_after:
            blocks.append(pool_block(f"pool{group}", prev, slot=f"pool{group}"))
            group, in_group = group + 1, 0
    return Network(spaces, blocks, pre=(lambda x: x.flatten(1)) if chain.flatten_input else (lambda x: x)), state


def chain_of(net: Network, state: Mapping[str, torch.Tensor], flatten_input: bool) -> Chain:
    """A description of weight layers and max-pools (as :func:`describe_chain` makes) as a Chain;
    a layer whose tensors are the ones it was described from comes back as the same object."""
    layers: list[ChainLayer] = []
    pooled: list[bool] = []
    for block in net.blocks:
        if "op" not in block.attrs:
            pooled[-1] = True
            continue
        op: LayerOp = block.attrs["op"]
        t = {local: net.param_value(block, local, state) for local in block.params}
        bn = {leaf: t[f"bn.{leaf}"] for leaf in BN_KEYS} if op.norm else None
        original = block.attrs.get("layer")
        if original is not None and t["weight"] is original.weight and t.get("bias") is original.bias and (
                bn is None or all(bn[leaf] is original.bn[leaf] for leaf in BN_KEYS)):
            layers.append(original)
        else:
            layers.append(ChainLayer(weight=t["weight"], bias=t.get("bias"), bn=bn, bn_eps=op.eps, relu=op.relu,
                                     flatten_before=op.flatten_before, stride=op.stride, padding=op.padding,
                                     inserted=block.inserted, avgpool_before=op.avgpool_before, act=op.act))
        pooled.append(False)
    layers = [layer if layer.pool_after == pool else layer.with_(pool_after=pool) for layer, pool in zip(layers, pooled)]
    return Chain(layers[:-1], layers[-1], flatten_input)
