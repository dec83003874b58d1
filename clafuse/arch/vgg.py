"""VGG-style CNNs in torchvision's layout: ``features`` (Conv2d, optional BatchNorm2d, ReLU,
MaxPool2d), an optional adaptive average pool, then ``classifier`` (Linear layers with ReLU and
Dropout between them).

Only convs, BatchNorms and Linears have keys; where the ReLUs and max-pools sit follows from the
gaps between the key indices, as torchvision's ``make_layers`` lays them out: a conv takes two
indices (conv, ReLU), three with BatchNorm (conv, BN, ReLU), and each max-pool ('M') one. A
checkpoint cannot tell whether its last conv is followed by a max-pool; torchvision's configs
always end with one, which detection assumes (pass a spec otherwise).
"""

from __future__ import annotations

import math
from typing import Literal, Mapping, Union

import torch
from pydantic import BaseModel, Field, PositiveInt, ValidationError, model_validator
from torch import nn

from clafuse.arch.base import BN_KEYS, Chain, ChainLayer, Family, Group, LayerInfo, check_shapes
from clafuse.arch.network import LayerOp, Network, Space, layer_block, pool_block
from clafuse.errors import SpecError

POOL = "M"
TORCHVISION_AVGPOOL = (7, 7)


class VGGLinear(BaseModel):
    """One Linear layer of the classifier: its index in ``classifier``, shape and bias."""

    index: int = Field(ge=0)
    in_features: int = Field(gt=0)
    out_features: int = Field(gt=0)
    bias: bool = True


class VGGSpec(BaseModel):
    """A VGG: the conv widths with 'M' for each 2x2 max-pool (torchvision's cfg lists), and the
    classifier.

    ``conv_indices`` are the convs' indices in ``features`` (default: torchvision's layout).
    ``bn_num_batches_tracked``: whether the BatchNorms' counters are in the checkpoint.
    ``avgpool`` is the output size of the adaptive average pool before the classifier (torchvision:
    [7, 7]), or null for none. ``input_size`` [C, H, W] is optional; without an avgpool it fixes the
    flattened size, which is checked against the classifier.
    """

    family: Literal["vgg"] = "vgg"
    in_channels: int = Field(3, gt=0)
    config: list[Union[PositiveInt, Literal["M"]]] = Field(min_length=1)
    batch_norm: bool = False
    conv_bias: bool = True
    kernel_size: int = Field(3, gt=0)
    bn_eps: float = Field(1e-5, gt=0)
    bn_num_batches_tracked: bool = True
    conv_indices: list[int] | None = None
    avgpool: tuple[PositiveInt, PositiveInt] | None = TORCHVISION_AVGPOOL
    input_size: tuple[PositiveInt, PositiveInt, PositiveInt] | None = None
    classifier: list[VGGLinear] = Field(min_length=1)
    dropout: float = Field(0.5, ge=0.0, lt=1.0)

    @property
    def convs(self) -> list[int]:
        return [v for v in self.config if v != POOL]

    @property
    def pools_after(self) -> list[bool]:
        """Per conv, whether a max-pool follows it."""
        return [v != POOL and i + 1 < len(self.config) and self.config[i + 1] == POOL
                for i, v in enumerate(self.config) if v != POOL]

    @property
    def conv_span(self) -> int:
        """Indices a conv takes in ``features``: conv (, BN), ReLU."""
        return 3 if self.batch_norm else 2

    def conv_in(self, k: int) -> int:
        return self.in_channels if k == 0 else self.convs[k - 1]

    def feature_map(self) -> tuple[int, int] | None:
        """(H, W) of the last feature map, when ``input_size`` is known."""
        if self.input_size is None:
            return None
        h, w = self.input_size[1:]
        for _ in range(sum(self.pools_after)):
            h, w = h // 2, w // 2
        return h, w

    def chunks(self) -> list[list[int]]:
        """The conv numbers of each chunk between max-pools."""
        out: list[list[int]] = [[]]
        for k, pooled in enumerate(self.pools_after):
            out[-1].append(k)
            if pooled and k + 1 < len(self.convs):
                out.append([])
        return out

    @model_validator(mode="after")
    def _consistent(self) -> "VGGSpec":
        if self.config[0] == POOL:
            raise ValueError("config must start with a conv width (a max-pool on the input is not supported)")
        if any(a == POOL and b == POOL for a, b in zip(self.config, self.config[1:])):
            raise ValueError("config has two max-pools in a row, which is not supported")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (size-preserving padding), got {self.kernel_size}")
        convs, pools = self.convs, self.pools_after
        if self.conv_indices is None:
            indices, i = [], 0
            for pooled in pools:
                indices.append(i)
                i += self.conv_span + int(pooled)
            self.conv_indices = indices
        idx = self.conv_indices
        if len(idx) != len(convs):
            raise ValueError(f"conv_indices has {len(idx)} entries but config has {len(convs)} convs")
        if any(i < 0 for i in idx):
            raise ValueError("conv_indices must be non-negative")
        for k in range(len(idx) - 1):
            need = self.conv_span + int(pools[k])
            if idx[k + 1] - idx[k] < need:
                raise ValueError(f"conv at features.{idx[k]} needs {need} indices "
                                 f"(conv{', BN' if self.batch_norm else ''}, ReLU{', max-pool' if pools[k] else ''}) "
                                 f"but the next conv is at features.{idx[k + 1]}")
        cls = self.classifier
        for a, b in zip(cls, cls[1:]):
            if b.index - a.index < 2:
                raise ValueError(f"classifier.{a.index} and classifier.{b.index} leave no room for the ReLU between them")
            if b.in_features != a.out_features:
                raise ValueError(f"classifier.{b.index} takes {b.in_features} inputs but classifier.{a.index} "
                                 f"gives {a.out_features}")
        if self.input_size is not None and self.input_size[0] != self.in_channels:
            raise ValueError(f"input_size has {self.input_size[0]} channels but in_channels is {self.in_channels}")
        last, flat = convs[-1], cls[0].in_features
        if self.avgpool is not None:
            h, w = self.avgpool
            if flat != last * h * w:
                raise ValueError(f"classifier.{cls[0].index} takes {flat} features but the last conv gives "
                                 f"{last} channels x {h}x{w} (avgpool) = {last * h * w}")
        elif self.input_size is not None:
            h, w = self.feature_map()
            if h == 0 or w == 0:
                raise ValueError(f"input_size {list(self.input_size)} is too small for {sum(pools)} max-pools")
            if flat != last * h * w:
                raise ValueError(f"classifier.{cls[0].index} takes {flat} features but a {list(self.input_size)} "
                                 f"input gives {last} channels x {h}x{w} = {last * h * w}")
        elif flat % last:
            raise ValueError(f"classifier.{cls[0].index} takes {flat} features, not a multiple of the last "
                             f"conv's {last} channels")
        return self


class VGGNet(nn.Module):
    """torchvision's VGG: features, avgpool, flatten, classifier."""

    def __init__(self, features: nn.Sequential, avgpool: nn.Module, classifier: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.avgpool = avgpool
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _split_keys(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[int, dict], dict[int, dict]] | None:
    feats: dict[int, dict[str, torch.Tensor]] = {}
    cls: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if len(parts) != 3 or parts[0] not in ("features", "classifier") or not parts[1].isdigit():
            return None
        (feats if parts[0] == "features" else cls).setdefault(int(parts[1]), {})[parts[2]] = value
    return feats, cls


class VGGFamily(Family):
    name = "vgg"
    spec_model = VGGSpec
    description = "VGG-style CNN in torchvision's layout (features.N convs/BatchNorms, classifier.N Linears)"

    def detect(self, state_dict: Mapping[str, torch.Tensor]) -> VGGSpec | None:
        split = _split_keys(state_dict)
        if split is None:
            return None
        feats, cls = split
        if not cls or not any(isinstance(p.get("weight"), torch.Tensor) and p["weight"].dim() == 4
                              for p in feats.values()):
            return None
        # From here on it is clearly meant as a VGG: say what does not fit.
        convs: list[int] = []
        bns: dict[int, dict[str, torch.Tensor]] = {}
        for idx in sorted(feats):
            params = feats[idx]
            weight = params.get("weight")
            if weight is not None and weight.dim() == 4:
                if set(params) - {"weight", "bias"}:
                    raise SpecError(f"features.{idx} is a conv but also holds {sorted(set(params) - {'weight', 'bias'})}")
                convs.append(idx)
            elif set(BN_KEYS) <= set(params) and set(params) <= {*BN_KEYS, "num_batches_tracked"}:
                bns[idx] = params
            else:
                raise SpecError(f"features.{idx} holds {sorted(params)}: neither a Conv2d nor a BatchNorm2d")
        batch_norm = bool(bns)
        if batch_norm and sorted(bns) != [i + 1 for i in convs]:
            raise SpecError(f"BatchNorms at features {sorted(bns)} do not follow each conv (convs at {convs})")
        if convs[0] != 0:
            raise SpecError(f"features.0 is not a conv (first conv at features.{convs[0]}); pass --arch with a spec")
        weights = [feats[i]["weight"] for i in convs]
        kernels = {tuple(w.shape[2:]) for w in weights}
        if len(kernels) != 1 or len(next(iter(kernels))) != 2 or len(set(next(iter(kernels)))) != 1:
            raise SpecError(f"convs have kernel sizes {sorted(kernels)}; one square kernel size is supported")
        kernel = next(iter(kernels))[0]
        for a, b, ia, ib in zip(weights, weights[1:], convs, convs[1:]):
            if b.shape[1] != a.shape[0]:
                raise SpecError(f"features.{ib} takes {b.shape[1]} channels but features.{ia} gives {a.shape[0]}")
        biased = {"bias" in feats[i] for i in convs}
        if len(biased) != 1:
            raise SpecError("some convs have a bias and some do not")
        tracked = {"num_batches_tracked" in p for p in bns.values()}
        if len(tracked) > 1:
            raise SpecError("some BatchNorms have num_batches_tracked and some do not")
        span = 3 if batch_norm else 2
        config: list[int | str] = []
        for k, idx in enumerate(convs):
            config.append(int(weights[k].shape[0]))
            if k + 1 < len(convs):
                pools = convs[k + 1] - idx - span
                if pools < 0 or pools > 1:
                    raise SpecError(f"features.{idx} and features.{convs[k + 1]} are {convs[k + 1] - idx} apart, which "
                                    f"is not conv{', BN' if batch_norm else ''}, ReLU and at most one max-pool; "
                                    f"pass --arch with a spec")
                config += [POOL] * pools
        config.append(POOL)  # torchvision's configs end with a max-pool; the keys cannot tell
        layers = []
        for idx in sorted(cls):
            params = cls[idx]
            weight = params.get("weight")
            if weight is None or weight.dim() != 2 or set(params) - {"weight", "bias"}:
                raise SpecError(f"classifier.{idx} holds {sorted(params)}, not a Linear layer")
            layers.append(VGGLinear(index=idx, in_features=int(weight.shape[1]), out_features=int(weight.shape[0]),
                                    bias="bias" in params))
        last = int(weights[-1].shape[0])
        flat = layers[0].in_features
        if flat % last:
            raise SpecError(f"classifier.{layers[0].index} takes {flat} features, not a multiple of the last conv's "
                            f"{last} channels; pass --arch with a spec")
        positions = flat // last
        avgpool, input_size = None, None
        if positions == TORCHVISION_AVGPOOL[0] * TORCHVISION_AVGPOOL[1]:
            avgpool = TORCHVISION_AVGPOOL
        else:
            side = math.isqrt(positions)
            if side * side == positions:
                size = side * 2 ** config.count(POOL)
                input_size = (int(weights[0].shape[1]), size, size)
        try:
            return VGGSpec(in_channels=int(weights[0].shape[1]), config=config, batch_norm=batch_norm,
                           conv_bias=biased.pop(), kernel_size=kernel,
                           bn_num_batches_tracked=tracked.pop() if tracked else True,
                           conv_indices=convs, avgpool=avgpool, input_size=input_size, classifier=layers)
        except ValidationError as exc:
            raise SpecError(f"VGG-like checkpoint does not fit a VGG spec: {exc.errors()[0]['msg']}") from None

    def expected_shapes(self, spec: VGGSpec) -> dict[str, tuple[int, ...]]:
        """Every key of the checkpoint with its shape, in torchvision's order."""
        out: dict[str, tuple[int, ...]] = {}
        k_size = spec.kernel_size
        for k, (idx, width) in enumerate(zip(spec.conv_indices, spec.convs)):
            out[f"features.{idx}.weight"] = (width, spec.conv_in(k), k_size, k_size)
            if spec.conv_bias:
                out[f"features.{idx}.bias"] = (width,)
            if spec.batch_norm:
                for leaf in BN_KEYS:
                    out[f"features.{idx + 1}.{leaf}"] = (width,)
                if spec.bn_num_batches_tracked:
                    out[f"features.{idx + 1}.num_batches_tracked"] = ()
        for layer in spec.classifier:
            out[f"classifier.{layer.index}.weight"] = (layer.out_features, layer.in_features)
            if layer.bias:
                out[f"classifier.{layer.index}.bias"] = (layer.out_features,)
        return out

    def check(self, spec: VGGSpec, state_dict: Mapping[str, torch.Tensor]) -> None:
        check_shapes(self.expected_shapes(spec), state_dict)

    def build(self, spec: VGGSpec) -> nn.Module:
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
            slots[idx + spec.conv_span - 1] = nn.ReLU(inplace=True)
            if pools[k]:
                slots[idx + spec.conv_span] = nn.MaxPool2d(kernel_size=2, stride=2)
        features = nn.Sequential(*(m if m is not None else nn.Identity() for m in slots))
        cls_slots: list[nn.Module | None] = [None] * (spec.classifier[-1].index + 1)
        for a, b in zip(spec.classifier, spec.classifier[1:]):
            cls_slots[a.index + 1] = nn.ReLU(inplace=True)
            for i in range(a.index + 2, b.index):
                cls_slots[i] = nn.Dropout(p=spec.dropout)
        for layer in spec.classifier:
            cls_slots[layer.index] = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias)
        classifier = nn.Sequential(*(m if m is not None else nn.Identity() for m in cls_slots))
        avgpool = nn.AdaptiveAvgPool2d(spec.avgpool) if spec.avgpool is not None else nn.Identity()
        return VGGNet(features, avgpool, classifier)

    def groups(self, spec: VGGSpec) -> list[Group]:
        k_size = spec.kernel_size
        out = []
        for c, chunk in enumerate(spec.chunks()):
            layers = []
            for k in chunk:
                width = spec.convs[k]
                params = width * (spec.conv_in(k) * k_size * k_size + int(spec.conv_bias) + 2 * int(spec.batch_norm))
                layers.append(LayerInfo(f"features.{spec.conv_indices[k]}", width, params, "conv"))
            # An identity before the first conv would see the raw (signed) inputs at the input's width.
            out.append(Group(f"features.chunk{c}", tuple(layers), pin_first=c == 0))
        hidden = tuple(LayerInfo(f"classifier.{l.index}", l.out_features, l.out_features * (l.in_features + int(l.bias)))
                       for l in spec.classifier[:-1])
        if hidden:
            # The first classifier layer flattens the feature maps: it cannot be an inserted identity.
            out.append(Group("classifier", hidden, pin_first=True))
        return out

    def describe(self, spec: VGGSpec) -> Network:
        """One block per conv (with its BatchNorm) and per Linear; the max-pools are fixed blocks
        between the chunks (alignment groups), the classifier's hidden Linears one more group and
        its last Linear (the classes) a fixed block."""
        spaces = {"input": Space("input", spec.in_channels, fixed=True),
                  "logits": Space("logits", spec.classifier[-1].out_features, fixed=True)}
        shapes = self.expected_shapes(spec)
        blocks, prev, group = [], "input", 0
        for idx, pooled in zip(spec.conv_indices, spec.pools_after):
            keys = {"weight": f"features.{idx}.weight"}
            if spec.conv_bias:
                keys["bias"] = f"features.{idx}.bias"
            if spec.batch_norm:
                keys.update({f"bn.{leaf}": f"features.{idx + 1}.{leaf}" for leaf in BN_KEYS})
            op = LayerOp(conv=True, padding=spec.kernel_size // 2, norm=spec.batch_norm, eps=spec.bn_eps)
            name = f"features.{idx}"
            blocks.append(layer_block(name, keys, {k: shapes[v] for k, v in keys.items()}, op, prev, group))
            prev = f"{name}:out"
            if pooled:
                blocks.append(pool_block(f"features.pool{group}", prev, slot=f"pool{group}"))
                group += 1
        group = len(spec.chunks())
        for i, layer in enumerate(spec.classifier):
            last = i == len(spec.classifier) - 1
            name = f"classifier.{layer.index}"
            keys = {"weight": f"{name}.weight", **({"bias": f"{name}.bias"} if layer.bias else {})}
            op = LayerOp(relu=not last, flatten_before=i == 0,
                         avgpool_before=tuple(spec.avgpool) if i == 0 and spec.avgpool is not None else None)
            blocks.append(layer_block(name, keys, {k: shapes[v] for k, v in keys.items()}, op, prev,
                                      None if last else group, out_space="logits" if last else None,
                                      slot="classifier" if last else None))
            prev = f"{name}:out"
        return Network(spaces, blocks)

    def to_chain(self, spec: VGGSpec, state_dict: Mapping[str, torch.Tensor]) -> Chain:
        convs = []
        for idx, pooled in zip(spec.conv_indices, spec.pools_after):
            bn = None
            if spec.batch_norm:
                bn = {leaf: state_dict[f"features.{idx + 1}.{leaf}"].float() for leaf in BN_KEYS}
            convs.append(ChainLayer(
                weight=state_dict[f"features.{idx}.weight"].float(),
                bias=state_dict[f"features.{idx}.bias"].float() if spec.conv_bias else None,
                bn=bn, bn_eps=spec.bn_eps, relu=True, pool_after=pooled, stride=1, padding=spec.kernel_size // 2,
            ))
        linears = [
            ChainLayer(weight=state_dict[f"classifier.{l.index}.weight"].float(),
                       bias=state_dict[f"classifier.{l.index}.bias"].float() if l.bias else None)
            for l in spec.classifier
        ]
        linears[0].flatten_before = True
        linears[0].avgpool_before = tuple(spec.avgpool) if spec.avgpool is not None else None
        linears[-1].relu = False
        return Chain(hidden=convs + linears[:-1], classifier=linears[-1], flatten_input=False)

    def from_chain(self, spec: VGGSpec, chain: Chain, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n_convs = len(spec.convs)
        if len(chain.layers) != n_convs + len(spec.classifier):
            raise SpecError(f"fused network has {len(chain.layers)} layers, the target has "
                            f"{n_convs + len(spec.classifier)}")
        expected = self.expected_shapes(spec)
        values: dict[str, torch.Tensor | None] = {}
        for idx, layer in zip(spec.conv_indices, chain.layers[:n_convs]):
            values[f"features.{idx}.weight"] = layer.weight
            values[f"features.{idx}.bias"] = layer.bias
            for leaf in BN_KEYS:
                values[f"features.{idx + 1}.{leaf}"] = layer.bn[leaf] if layer.bn is not None else None
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
