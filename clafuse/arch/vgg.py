"""VGG-style CNNs: ``features`` (Conv2d, optional BatchNorm2d, activation, MaxPool2d), then
torchvision's optional adaptive average pool and ``classifier`` (Linear layers with the activation
and Dropout between them) or timm's head. Key layouts and their detection: :mod:`clafuse.arch.vgg_detect`;
the spec: :mod:`clafuse.arch.vgg_spec`.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from clafuse.arch.base import BN_KEYS, Chain, ChainLayer, Family, Group, LayerInfo, check_shapes
from clafuse.arch.modules import activation_module, attach
from clafuse.arch.layers import ACTIVATIONS, LayerOp, layer_block, pool_block
from clafuse.arch.network import Network, Space, layer_outputs, run
from clafuse.arch.vgg_detect import detect_vgg
from clafuse.arch.vgg_spec import POOL, TORCHVISION_AVGPOOL, TimmHead, VGGLinear, VGGSpec
from clafuse.errors import SpecError

__all__ = ["POOL", "TORCHVISION_AVGPOOL", "TimmHead", "VGGFamily", "VGGLinear", "VGGSpec"]


class VGGNet(nn.Module):
    """torchvision's VGG: features, avgpool, flatten, classifier."""

    def __init__(self, features: nn.Sequential, avgpool: nn.Module, classifier: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.avgpool = avgpool
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class VGGLayout(nn.Module):
    """A VGG whose modules sit at the spec's keys (nested Sequentials, timm's head), run as the
    spec says: conv, BatchNorm, activation, max-pool where the config has one; then the classifier
    (dropout between its layers while training) or timm's head."""

    def __init__(self, spec: VGGSpec) -> None:
        super().__init__()
        self.spec = spec
        k_size = spec.kernel_size
        for k, width in enumerate(spec.convs):
            attach(self, spec.conv_key(k), nn.Conv2d(spec.conv_in(k), width, k_size, padding=k_size // 2,
                                                     bias=spec.conv_bias))
            if spec.batch_norm:
                attach(self, spec.norm_key(k), nn.BatchNorm2d(width, eps=spec.bn_eps))
        if spec.head is not None:
            h = spec.head
            attach(self, "pre_logits.fc1", nn.Conv2d(spec.convs[-1], h.mid_features, h.kernel_size))
            attach(self, "pre_logits.fc2", nn.Conv2d(h.mid_features, h.out_features, 1))
            attach(self, "head.fc", nn.Linear(h.out_features, h.num_classes))
        for layer in spec.classifier:
            attach(self, f"classifier.{layer.index}", nn.Linear(layer.in_features, layer.out_features, bias=layer.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec, act, h = self.spec, ACTIVATIONS[self.spec.activation], x
        for k, pooled in enumerate(spec.pools_after):
            h = self.get_submodule(spec.conv_key(k))(h)
            if spec.batch_norm:
                h = self.get_submodule(spec.norm_key(k))(h)
            h = act(h)
            if pooled:
                h = F.max_pool2d(h, 2)
        if spec.head is not None:
            size = spec.head.kernel_size
            if min(h.shape[-2:]) < size:
                h = F.adaptive_avg_pool2d(h, (max(size, h.shape[-2]), max(size, h.shape[-1])))
            h = act(self.get_submodule("pre_logits.fc2")(act(self.get_submodule("pre_logits.fc1")(h))))
            return self.get_submodule("head.fc")(h.mean((2, 3)))
        if spec.avgpool is not None:
            h = F.adaptive_avg_pool2d(h, spec.avgpool)
        h = h.flatten(1)
        for i, layer in enumerate(spec.classifier):
            h = self.get_submodule(f"classifier.{layer.index}")(h)
            if i < len(spec.classifier) - 1:
                h = F.dropout(act(h), spec.dropout, self.training)
        return h


class VGGFamily(Family):
    name = "vgg"
    spec_model = VGGSpec
    description = ("VGG-style CNN: features.N convs/BatchNorms (flat, or nested Sequentials features.S.I), then "
                   "torchvision's classifier.N Linears or timm's pre_logits/head")

    def detect(self, state_dict: Mapping[str, torch.Tensor]) -> VGGSpec | None:
        return detect_vgg(state_dict)

    def expected_shapes(self, spec: VGGSpec) -> dict[str, tuple[int, ...]]:
        """Every key of the checkpoint with its shape, in the layout's order."""
        out: dict[str, tuple[int, ...]] = {}
        k_size = spec.kernel_size
        for k, width in enumerate(spec.convs):
            conv, norm = spec.conv_key(k), spec.norm_key(k)
            out[f"{conv}.weight"] = (width, spec.conv_in(k), k_size, k_size)
            if spec.conv_bias:
                out[f"{conv}.bias"] = (width,)
            if spec.batch_norm:
                for leaf in BN_KEYS:
                    out[f"{norm}.{leaf}"] = (width,)
                if spec.bn_num_batches_tracked:
                    out[f"{norm}.num_batches_tracked"] = ()
        if spec.head is not None:
            head = spec.head
            out.update({"pre_logits.fc1.weight": (head.mid_features, spec.convs[-1], head.kernel_size, head.kernel_size),
                        "pre_logits.fc1.bias": (head.mid_features,),
                        "pre_logits.fc2.weight": (head.out_features, head.mid_features, 1, 1),
                        "pre_logits.fc2.bias": (head.out_features,),
                        "head.fc.weight": (head.num_classes, head.out_features), "head.fc.bias": (head.num_classes,)})
        for layer in spec.classifier:
            out[f"classifier.{layer.index}.weight"] = (layer.out_features, layer.in_features)
            if layer.bias:
                out[f"classifier.{layer.index}.bias"] = (layer.out_features,)
        return out

    def check(self, spec: VGGSpec, state_dict: Mapping[str, torch.Tensor]) -> None:
        check_shapes(self.expected_shapes(spec), state_dict)

    def build(self, spec: VGGSpec) -> nn.Module:
        if not spec.plain:
            return VGGLayout(spec)
        pools = spec.pools_after
        last = spec.conv_indices[-1] + spec.conv_span + int(pools[-1])
        slots: list[nn.Module | None] = [None] * last
        for k, (idx, width) in enumerate(zip(spec.conv_indices, spec.convs)):
            slots[idx] = nn.Conv2d(spec.conv_in(k), width, spec.kernel_size, padding=spec.kernel_size // 2,
                                   bias=spec.conv_bias)
            if spec.batch_norm:
                # Without num_batches_tracked in the checkpoint torch still loads it strictly (it
                # fills in the counter), as it does for old checkpoints.
                slots[idx + 1] = nn.BatchNorm2d(width, eps=spec.bn_eps)
            slots[idx + spec.conv_span - 1] = activation_module(spec.activation)
            if pools[k]:
                slots[idx + spec.conv_span] = nn.MaxPool2d(kernel_size=2, stride=2)
        features = nn.Sequential(*(m if m is not None else nn.Identity() for m in slots))
        cls_slots: list[nn.Module | None] = [None] * (spec.classifier[-1].index + 1)
        for a, b in zip(spec.classifier, spec.classifier[1:]):
            cls_slots[a.index + 1] = activation_module(spec.activation)
            for i in range(a.index + 2, b.index):
                cls_slots[i] = nn.Dropout(p=spec.dropout)
        for layer in spec.classifier:
            cls_slots[layer.index] = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias)
        classifier = nn.Sequential(*(m if m is not None else nn.Identity() for m in cls_slots))
        avgpool = nn.AdaptiveAvgPool2d(spec.avgpool) if spec.avgpool is not None else nn.Identity()
        return VGGNet(features, avgpool, classifier)

    def traits(self, spec: VGGSpec) -> dict[str, object]:
        return {"activation": spec.activation, "input channels": spec.in_channels, "classes": spec.num_classes,
                "kernel size": spec.kernel_size, "BatchNorm": spec.batch_norm, "conv bias": spec.conv_bias,
                "head": "timm" if spec.head is not None else "torchvision",
                "avgpool": spec.avgpool, "timm head kernel": spec.head.kernel_size if spec.head else None}

    def groups(self, spec: VGGSpec) -> list[Group]:
        k_size = spec.kernel_size
        out = []
        for c, chunk in enumerate(spec.chunks()):
            layers = []
            for k in chunk:
                width = spec.convs[k]
                params = width * (spec.conv_in(k) * k_size * k_size + int(spec.conv_bias) + 2 * int(spec.batch_norm))
                layers.append(LayerInfo(spec.conv_key(k), width, params, "conv"))
            # An identity before the first conv would see the raw (signed) inputs at the input's width.
            out.append(Group(f"features.chunk{c}", tuple(layers), pin_first=c == 0))
        hidden = tuple(LayerInfo(f"classifier.{l.index}", l.out_features, l.out_features * (l.in_features + int(l.bias)))
                       for l in spec.classifier[:-1])
        if hidden:
            # The first classifier layer flattens the feature maps: it cannot be an inserted identity.
            out.append(Group("classifier", hidden, pin_first=True))
        if spec.head is not None:
            h, last = spec.head, spec.convs[-1]
            # fc1 reads k x k windows of the feature maps (resizing small ones): never an identity.
            out.append(Group("pre_logits", (
                LayerInfo("pre_logits.fc1", h.mid_features, h.mid_features * (last * h.kernel_size ** 2 + 1), "conv"),
                LayerInfo("pre_logits.fc2", h.out_features, h.out_features * (h.mid_features + 1), "conv")),
                pin_first=True))
        return out

    def describe(self, spec: VGGSpec) -> Network:
        """One block per conv (with its BatchNorm) and per Linear; the max-pools are fixed blocks
        between the chunks (alignment groups), the classifier's hidden Linears (or timm's
        pre-logits convs) one more group and the last Linear (the classes) a fixed block."""
        spaces = {"input": Space("input", spec.in_channels, fixed=True),
                  "logits": Space("logits", spec.num_classes, fixed=True)}
        shapes = self.expected_shapes(spec)
        blocks, prev, group = [], "input", 0
        for k, pooled in enumerate(spec.pools_after):
            name = spec.conv_key(k)
            keys = {"weight": f"{name}.weight"}
            if spec.conv_bias:
                keys["bias"] = f"{name}.bias"
            if spec.batch_norm:
                keys.update({f"bn.{leaf}": f"{spec.norm_key(k)}.{leaf}" for leaf in BN_KEYS})
            op = LayerOp(conv=True, padding=spec.kernel_size // 2, norm=spec.batch_norm, eps=spec.bn_eps,
                         act=spec.activation)
            blocks.append(layer_block(name, keys, {k: shapes[v] for k, v in keys.items()}, op, prev, group))
            prev = f"{name}:out"
            if pooled:
                blocks.append(pool_block(f"features.pool{group}", prev, slot=f"pool{group}"))
                group += 1
        group = len(spec.chunks())
        if spec.head is not None:
            layers = [("pre_logits.fc1", LayerOp(conv=True, act=spec.activation, min_size=spec.head.kernel_size)),
                      ("pre_logits.fc2", LayerOp(conv=True, act=spec.activation)),
                      ("head.fc", LayerOp(relu=False, avgpool_before=(1, 1), flatten_before=True))]
        else:
            layers = [(f"classifier.{layer.index}",
                       LayerOp(relu=i < len(spec.classifier) - 1, act=spec.activation, flatten_before=i == 0,
                               avgpool_before=tuple(spec.avgpool) if i == 0 and spec.avgpool is not None else None))
                      for i, layer in enumerate(spec.classifier)]
        for i, (name, op) in enumerate(layers):
            last = i == len(layers) - 1
            keys = {leaf: f"{name}.{leaf}" for leaf in ("weight", "bias") if f"{name}.{leaf}" in shapes}
            blocks.append(layer_block(name, keys, {k: shapes[v] for k, v in keys.items()}, op, prev,
                                      None if last else group, out_space="logits" if last else None,
                                      slot="classifier" if last else None))
            prev = f"{name}:out"
        return Network(spaces, blocks)

    def layer_outputs(self, spec: VGGSpec, state_dict: Mapping[str, torch.Tensor],
                      x: torch.Tensor) -> list[torch.Tensor]:
        return layer_outputs(self.describe(spec), state_dict, x)

    def forward(self, spec: VGGSpec, state_dict: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return run(self.describe(spec), state_dict, x)

    def to_chain(self, spec: VGGSpec, state_dict: Mapping[str, torch.Tensor]) -> Chain:
        if spec.head is not None:
            raise SpecError("the layer-chain view covers torchvision's classifier, not timm's head")
        convs = []
        for k, pooled in enumerate(spec.pools_after):
            conv, bn = spec.conv_key(k), None
            if spec.batch_norm:
                bn = {leaf: state_dict[f"{spec.norm_key(k)}.{leaf}"].float() for leaf in BN_KEYS}
            convs.append(ChainLayer(
                weight=state_dict[f"{conv}.weight"].float(),
                bias=state_dict[f"{conv}.bias"].float() if spec.conv_bias else None,
                bn=bn, bn_eps=spec.bn_eps, relu=True, pool_after=pooled, stride=1, padding=spec.kernel_size // 2,
                act=spec.activation,
            ))
        linears = [
            ChainLayer(weight=state_dict[f"classifier.{l.index}.weight"].float(),
                       bias=state_dict[f"classifier.{l.index}.bias"].float() if l.bias else None, act=spec.activation)
            for l in spec.classifier
        ]
        linears[0].flatten_before = True
        linears[0].avgpool_before = tuple(spec.avgpool) if spec.avgpool is not None else None
        linears[-1].relu = False
        return Chain(hidden=convs + linears[:-1], classifier=linears[-1], flatten_input=False)

    def from_chain(self, spec: VGGSpec, chain: Chain, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if spec.head is not None:
            raise SpecError("the layer-chain view covers torchvision's classifier, not timm's head")
        n_convs = len(spec.convs)
        if len(chain.layers) != n_convs + len(spec.classifier):
            raise SpecError(f"fused network has {len(chain.layers)} layers, the target has "
                            f"{n_convs + len(spec.classifier)}")
        expected = self.expected_shapes(spec)
        values: dict[str, torch.Tensor | None] = {}
        for k, layer in enumerate(chain.layers[:n_convs]):
            values[f"{spec.conv_key(k)}.weight"] = layer.weight
            values[f"{spec.conv_key(k)}.bias"] = layer.bias
            for leaf in BN_KEYS:
                values[f"{spec.norm_key(k)}.{leaf}"] = layer.bn[leaf] if layer.bn is not None else None
        for spec_layer, layer in zip(spec.classifier, chain.layers[n_convs:]):
            values[f"classifier.{spec_layer.index}.weight"] = layer.weight
            values[f"classifier.{spec_layer.index}.bias"] = layer.bias
        out: dict[str, torch.Tensor] = {}
        for key, shape in expected.items():
            if key.endswith("num_batches_tracked"):
                out[key] = like[key].clone() if key in like else torch.tensor(0)
                continue
            value = values.get(key)
            if value is None:
                raise SpecError(f"fused network has no tensor for {key}")
            if tuple(value.shape) != shape:
                raise SpecError(f"fused {key} has shape {tuple(value.shape)}, the target needs {shape}")
            out[key] = value.to(like[key].dtype if key in like else torch.float32).contiguous()
        return out
