"""The VGG spec: conv widths and max-pools (torchvision's cfg lists), where the modules' keys are,
and the classifier (torchvision's ``classifier.N`` Linears or timm's conv-MLP head)."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, Field, PositiveInt, model_validator

from clafuse.arch.layers import Activation

POOL = "M"
TORCHVISION_AVGPOOL = (7, 7)


class VGGLinear(BaseModel):
    """One Linear layer of the classifier: its index in ``classifier``, shape and bias."""

    index: int = Field(ge=0)
    in_features: int = Field(gt=0)
    out_features: int = Field(gt=0)
    bias: bool = True


class TimmHead(BaseModel):
    """timm's VGG head: ``pre_logits.fc1`` (a k x k conv without padding, on feature maps average-
    pooled up to k x k where smaller), ``pre_logits.fc2`` (a 1x1 conv), each with the activation,
    then a global average pool and ``head.fc`` (a Linear to the classes). All with biases."""

    mid_features: int = Field(gt=0)
    out_features: int = Field(gt=0)
    kernel_size: int = Field(7, gt=0)
    num_classes: int = Field(gt=0)


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
    classifier: list[VGGLinear] = []
    dropout: float = Field(0.5, ge=0.0, lt=1.0)
    activation: Activation = "relu"
    conv_keys: list[str] | None = None
    norm_keys: list[str] | None = None
    head: TimmHead | None = None

    def conv_key(self, k: int) -> str:
        """The module prefix of conv ``k``."""
        return self.conv_keys[k] if self.conv_keys is not None else f"features.{self.conv_indices[k]}"

    def norm_key(self, k: int) -> str:
        """The module prefix of conv ``k``'s BatchNorm."""
        return self.norm_keys[k] if self.norm_keys is not None else f"features.{self.conv_indices[k] + 1}"

    @property
    def num_classes(self) -> int:
        return self.head.num_classes if self.head is not None else self.classifier[-1].out_features

    @property
    def plain(self) -> bool:
        """torchvision's layout exactly (flat features, classifier.N)."""
        return self.conv_keys is None and self.norm_keys is None and self.head is None

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
        for what, names in (("conv_keys", self.conv_keys), ("norm_keys", self.norm_keys)):
            if names is not None and len(names) != len(convs):
                raise ValueError(f"{what} has {len(names)} entries but config has {len(convs)} convs")
        if self.norm_keys is not None and not self.batch_norm:
            raise ValueError("norm_keys given but batch_norm is false")
        if (self.head is None) == (not self.classifier):
            raise ValueError("give exactly one of 'classifier' (torchvision) and 'head' (timm)")
        if self.head is not None:
            return self
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
