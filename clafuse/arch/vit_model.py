"""Pre-LN vision transformers in plain torch, with timm's state-dict layout.

Keys: ``cls_token`` (1, 1, d), ``pos_embed`` (1, 1 + patches, d), ``patch_embed.proj`` (a Conv2d
with kernel = stride = patch size), ``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
mlp.fc2}``, a final ``norm`` and an optional classifier ``head`` on the class token. A block is
``h = x + proj(Attn(LN1(x)))``, ``y = h + fc2(GELU(fc1(LN2(h))))``: zeroing ``attn.proj`` and
``mlp.fc2`` (weights and biases) makes it an exact identity.

``attn.qkv`` stacks the query, key and value projections (rows ``[Q; K; V]``, each d rows with head
``h`` owning rows ``h*d_h .. (h+1)*d_h - 1``). The head count does not show in any shape: it is
given, or taken as ``d // 64`` (timm's ViT-Ti/S/B/L all use head size 64).
"""

from __future__ import annotations

import math
import re
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, ValidationError, model_validator
from torch import nn

from clafuse.arch.base import check_shapes
from clafuse.arch.bert_model import DEFAULT_HEAD_SIZE, attend
from clafuse.errors import SpecError

_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


class ViTSpec(BaseModel):
    """The shape of a timm-layout pre-LN ViT."""

    family: Literal["vit"] = "vit"
    depth: int = Field(ge=0)
    dim: int = Field(gt=0)
    heads: int = Field(gt=0)
    mlp_hidden: int = Field(gt=0)
    patch: int = Field(gt=0)
    in_chans: int = Field(gt=0)
    grid: int = Field(gt=0)
    """Patches per side: the image is ``grid * patch`` pixels square."""
    classes: int | None = Field(default=None, gt=0)
    qkv_bias: bool = True
    eps: float = Field(default=1e-6, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> "ViTSpec":
        if self.dim % self.heads:
            raise ValueError(f"width {self.dim} is not a multiple of {self.heads} heads")
        return self

    @property
    def image_size(self) -> int:
        return self.grid * self.patch


BLOCK_PARTS: dict[str, str] = {
    "attn_norm": "norm1", "qkv": "attn.qkv", "attn_out": "attn.proj",
    "ffn_norm": "norm2", "ffn_in": "mlp.fc1", "ffn_out": "mlp.fc2"}
"""Each part of a block by role: ``qkv`` and ``ffn_in`` read the (normalised) residual stream,
``attn_out`` and ``ffn_out`` write it; the norms act on it unit by unit (pre-LN: the stream itself
is never normalised inside the blocks, only by the final ``norm``)."""


def block_key(block: int, role: str) -> str:
    """The key prefix of ``role`` (see :data:`BLOCK_PARTS`) in block ``block``."""
    return f"blocks.{block}.{BLOCK_PARTS[role]}"


def vit_shapes(spec: ViTSpec) -> dict[str, tuple[int, ...]]:
    """Every key of a checkpoint with this spec and its shape, in timm's order."""
    d, m = spec.dim, spec.mlp_hidden
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 1 + spec.grid ** 2, d),
        "patch_embed.proj.weight": (d, spec.in_chans, spec.patch, spec.patch),
        "patch_embed.proj.bias": (d,),
    }
    for i in range(spec.depth):
        b = f"blocks.{i}."
        shapes.update({f"{b}norm1.weight": (d,), f"{b}norm1.bias": (d,), f"{b}attn.qkv.weight": (3 * d, d)})
        if spec.qkv_bias:
            shapes[f"{b}attn.qkv.bias"] = (3 * d,)
        shapes.update({
            f"{b}attn.proj.weight": (d, d), f"{b}attn.proj.bias": (d,),
            f"{b}norm2.weight": (d,), f"{b}norm2.bias": (d,),
            f"{b}mlp.fc1.weight": (m, d), f"{b}mlp.fc1.bias": (m,),
            f"{b}mlp.fc2.weight": (d, m), f"{b}mlp.fc2.bias": (d,)})
    shapes.update({"norm.weight": (d,), "norm.bias": (d,)})
    if spec.classes is not None:
        shapes.update({"head.weight": (spec.classes, d), "head.bias": (spec.classes,)})
    return shapes


def detect_vit(state_dict: Mapping[str, torch.Tensor], heads: int | None = None,
               eps: float = 1e-6) -> ViTSpec | None:
    """A spec if ``state_dict`` is a timm-layout ViT, else None; SpecError if it is one but does
    not fit. ``heads`` defaults to ``dim // 64``."""
    if not {"cls_token", "pos_embed", "patch_embed.proj.weight"} <= set(state_dict):
        return None
    proj = state_dict["patch_embed.proj.weight"]
    if proj.dim() != 4 or proj.shape[2] != proj.shape[3]:
        raise SpecError(f"patch_embed.proj.weight has shape {tuple(proj.shape)}, expected (dim, channels, p, p)")
    dim, in_chans, patch = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[2])
    patches = int(state_dict["pos_embed"].shape[1]) - 1
    grid = math.isqrt(max(patches, 0))
    if patches < 1 or grid * grid != patches:
        raise SpecError(f"pos_embed holds {patches} patch positions, not a square grid plus a class token")
    ids = {int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k))}
    if ids != set(range(len(ids))):
        raise SpecError(f"ViT blocks are numbered {sorted(ids)}, expected 0..{len(ids) - 1}")
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    if heads is None:
        if dim % DEFAULT_HEAD_SIZE:
            raise SpecError(f"cannot tell the number of attention heads of a ViT of width {dim}: give it")
        heads = dim // DEFAULT_HEAD_SIZE
    head = state_dict.get("head.weight")
    try:
        spec = ViTSpec(depth=len(ids), dim=dim, heads=heads, mlp_hidden=int(fc1.shape[0]) if fc1 is not None else 4 * dim,
                       patch=patch, in_chans=in_chans, grid=grid,
                       classes=int(head.shape[0]) if head is not None else None,
                       qkv_bias="blocks.0.attn.qkv.bias" in state_dict or not ids, eps=eps)
    except ValidationError as exc:
        raise SpecError(f"not a valid ViT: {exc.errors()[0]['msg']}") from exc
    check_vit(spec, state_dict)
    return spec


def check_vit(spec: ViTSpec, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise SpecError unless ``state_dict`` has exactly the keys and shapes ``spec`` implies."""
    check_shapes(vit_shapes(spec), state_dict, f" (ViT, {spec.depth} blocks, width {spec.dim})")


class _Attention(nn.Module):
    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        self.heads = spec.heads
        self.qkv = nn.Linear(spec.dim, 3 * spec.dim, bias=spec.qkv_bias)
        self.proj = nn.Linear(spec.dim, spec.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(attend(q, k, v, self.heads, None))


class _Mlp(nn.Module):
    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        self.fc1 = nn.Linear(spec.dim, spec.mlp_hidden)
        self.fc2 = nn.Linear(spec.mlp_hidden, spec.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    """One pre-LN block: ``h = x + attn(norm1(x))``, ``y = h + mlp(norm2(h))``."""

    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(spec.dim, eps=spec.eps)
        self.attn = _Attention(spec)
        self.norm2 = nn.LayerNorm(spec.dim, eps=spec.eps)
        self.mlp = _Mlp(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTNet(nn.Module):
    """timm's ``VisionTransformer`` with class-token pooling, without dropout."""

    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        self.spec = spec
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + spec.grid ** 2, spec.dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(spec.in_chans, spec.dim, spec.patch, stride=spec.patch)
        self.blocks = nn.ModuleList(ViTBlock(spec) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(spec.dim, eps=spec.eps)
        if spec.classes is not None:
            self.head = nn.Linear(spec.dim, spec.classes)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Class token and patch embeddings plus positions: (batch, 1 + patches, dim)."""
        if images.dim() == 3:
            images = images.unsqueeze(1)
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        if x.shape[1] != self.pos_embed.shape[1] - 1:
            raise SpecError(f"images of {tuple(images.shape[-2:])} pixels give {x.shape[1]} patches; "
                            f"the ViT expects {self.spec.image_size}x{self.spec.image_size}")
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed

    def hidden_states(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The embedded tokens and every block's output, each (batch, 1 + patches, dim)."""
        x = self.tokens(images)
        states = [x]
        for block in self.blocks:
            x = block(x)
            states.append(x)
        return states

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The final norm of the class token: (batch, dim)."""
        return self.norm(self.hidden_states(images)[-1])[:, 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits when there is a head, else the class-token features."""
        features = self.features(images)
        return self.head(features) if self.spec.classes is not None else features


def build_vit(spec: ViTSpec) -> ViTNet:
    """A plain-torch ViT whose ``state_dict()`` has exactly the keys and shapes of :func:`vit_shapes`."""
    return ViTNet(spec)


def instantiate_vit(spec: ViTSpec, state_dict: Mapping[str, torch.Tensor]) -> ViTNet:
    """The network with ``state_dict`` loaded strictly, float32, eval mode (built on the meta device)."""
    check_vit(spec, state_dict)
    with torch.device("meta"):
        net = build_vit(spec)
    net.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True, assign=True)
    return net.eval()


def identity_block(spec: ViTSpec, index: int) -> dict[str, torch.Tensor]:
    """The state dict (keys ``blocks.{index}.*``) of a block that computes the identity: every
    weight zero except the LayerNorms' gains (one). Only the zero ``attn.proj`` and ``mlp.fc2``
    matter; any other values there give the identity as well."""
    one = ViTSpec(**{**spec.model_dump(), "depth": 1})
    return {f"blocks.{index}.{key[len('blocks.0.'):]}":
            torch.ones(shape) if key.endswith(("norm1.weight", "norm2.weight")) else torch.zeros(shape)
            for key, shape in vit_shapes(one).items() if key.startswith("blocks.0.")}
