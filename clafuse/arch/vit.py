"""The ``vit`` family: timm-layout pre-LN vision transformers described for the fusion engine.

One residual **stream** space (patch embedding rows, class token, position embeddings, every
block's norms, readers' columns and writers' rows, the final norm and the head's columns); per
block two **attention-head spaces** sharing one head permutation (``qk``: the query and key rows
of the stacked ``attn.qkv``, one within-head plan for both; ``vo``: its value rows and
``attn.proj``'s columns) and the MLP's hidden units. ``attn.qkv``'s rows stack [Q; K; V], so its
first axis is described as the spaces (qk, qk, vo). A block with zero ``attn.proj`` and ``mlp.fc2``
is an exact identity, so ``add`` inserts blocks exactly and a deeper network's unmatched blocks
can be dropped.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from clafuse.arch.base import Family, Group, LayerInfo
from clafuse.arch.bert_model import attend
from clafuse.arch.network import SEQUENCE_BATCH, Block, Network, Param, Site, Space, Tap
from clafuse.arch.vit_model import ViTSpec, block_key, build_vit, check_vit, detect_vit, instantiate_vit

BATCH = 256
_EXACT = frozenset({"attn_out.weight", "attn_out.bias", "ffn_out.weight", "ffn_out.bias"})


def _tokens(h: torch.Tensor) -> torch.Tensor:
    return h.reshape(-1, h.shape[-1])


def _block(spec: ViTSpec, name: str, keys: Mapping[str, str]) -> Block:
    d, m, heads = spec.dim, spec.mlp_hidden, spec.heads
    qk, vo, ffn = f"{name}:qk", f"{name}:vo", f"{name}:ffn"
    params = {
        "attn_norm.weight": Param(keys["attn_norm.weight"], ("stream",), (d,), "norm"),
        "attn_norm.bias": Param(keys["attn_norm.bias"], ("stream",), (d,), "norm"),
        "qkv.weight": Param(keys["qkv.weight"], ((qk, qk, vo), "stream"), (3 * d, d)),
        "attn_out.weight": Param(keys["attn_out.weight"], ("stream", vo), (d, d)),
        "attn_out.bias": Param(keys["attn_out.bias"], ("stream",), (d,), "bias"),
        "ffn_norm.weight": Param(keys["ffn_norm.weight"], ("stream",), (d,), "norm"),
        "ffn_norm.bias": Param(keys["ffn_norm.bias"], ("stream",), (d,), "norm"),
        "ffn_in.weight": Param(keys["ffn_in.weight"], (ffn, "stream"), (m, d)),
        "ffn_in.bias": Param(keys["ffn_in.bias"], (ffn,), (m,), "bias"),
        "ffn_out.weight": Param(keys["ffn_out.weight"], ("stream", ffn), (d, m)),
        "ffn_out.bias": Param(keys["ffn_out.bias"], ("stream",), (d,), "bias"),
    }
    qkv = (keys["qkv.weight"],)
    if spec.qkv_bias:
        params["qkv.bias"] = Param(keys["qkv.bias"], ((qk, qk, vo),), (3 * d,), "bias")
        qkv += (keys["qkv.bias"],)
    spaces = {"qk": Space(qk, d, (qkv,), owner=name, local="qk", heads=heads),
              "vo": Space(vo, d, (qkv + (keys["attn_out.weight"],),), owner=name, local="vo", heads=heads),
              "ffn": Space(ffn, m, ((keys["ffn_in.weight"], keys["ffn_in.bias"], keys["ffn_out.weight"]),),
                           owner=name, local="ffn")}

    def forward(t: Mapping[str, torch.Tensor], h: torch.Tensor, tap: Tap) -> torch.Tensor:
        u = F.layer_norm(h, (d,), t["attn_norm.weight"], t["attn_norm.bias"], spec.eps)
        q, k, v = F.linear(u, t["qkv.weight"], t.get("qkv.bias")).chunk(3, dim=-1)
        tap.space(qk, torch.cat([_tokens(q), _tokens(k)]))
        ctx = attend(q, k, v, heads, None)
        tap.space(vo, torch.cat([_tokens(v), _tokens(ctx)]))
        r = h + F.linear(ctx, t["attn_out.weight"], t["attn_out.bias"])
        r = tap.site("attn_out", _tokens(r), _tokens(ctx), _tokens(h)).reshape(r.shape)
        u = F.layer_norm(r, (d,), t["ffn_norm.weight"], t["ffn_norm.bias"], spec.eps)
        z = F.linear(u, t["ffn_in.weight"], t["ffn_in.bias"])
        got = tap.site("ffn", _tokens(z), _tokens(u))
        a = F.gelu(got.reshape(z.shape))
        tap.space(ffn, _tokens(a))
        out = r + F.linear(a, t["ffn_out.weight"], t["ffn_out.bias"])
        return tap.site("ffn_out", _tokens(out), _tokens(a), _tokens(r)).reshape(out.shape)

    def identity(template: Block, width: int, in_space: str) -> Block:
        made = f"{template.name}+identity"
        block = _block(spec.model_copy(update={"dim": width}), made, {local: f"{made}.{local}" for local in keys})
        values = {p.key: torch.ones(p.shape) if local.endswith("norm.weight") else torch.zeros(p.shape)
                  for local, p in block.params.items()}
        return block.with_(inserted=True, exact=_EXACT, values=values)

    sites = {"attn_out": Site("stream", "attn_out.weight", "attn_out.bias", residual=True),
             "ffn": Site(ffn, "ffn_in.weight", "ffn_in.bias"),
             "ffn_out": Site("stream", "ffn_out.weight", "ffn_out.bias", residual=True)}
    return Block(name, params, forward, spaces, sites, group=0, output="stream", identity=identity, drop=True)


def _embed(spec: ViTSpec) -> Block:
    d = spec.dim
    params = {"proj.weight": Param("patch_embed.proj.weight", ("stream", None, None, None),
                                   (d, spec.in_chans, spec.patch, spec.patch), reads=()),
              "proj.bias": Param("patch_embed.proj.bias", ("stream",), (d,), "bias"),
              "cls_token": Param("cls_token", (None, None, "stream"), (1, 1, d), reads=()),
              "pos_embed": Param("pos_embed", (None, None, "stream"), (1, 1 + spec.grid ** 2, d), reads=())}

    def forward(t: Mapping[str, torch.Tensor], x: torch.Tensor, tap: Tap) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        h = F.conv2d(x, t["proj.weight"], t["proj.bias"], stride=spec.patch).flatten(2).transpose(1, 2)
        h = torch.cat([t["cls_token"].expand(len(h), -1, -1), h], 1) + t["pos_embed"]
        tap.space("stream", _tokens(h))
        return h

    return Block("patch_embed", params, forward, slot="embed", output="stream")


def _head(spec: ViTSpec) -> Block:
    d = spec.dim
    params = {"norm.weight": Param("norm.weight", ("stream",), (d,), "norm"),
              "norm.bias": Param("norm.bias", ("stream",), (d,), "norm")}
    if spec.classes is not None:
        params["head.weight"] = Param("head.weight", ("logits", "stream"), (spec.classes, d))
        params["head.bias"] = Param("head.bias", ("logits",), (spec.classes,), "bias")

    def forward(t: Mapping[str, torch.Tensor], h: torch.Tensor, tap: Tap) -> torch.Tensor:
        u = F.layer_norm(h[:, 0], (d,), t["norm.weight"], t["norm.bias"], spec.eps)
        if spec.classes is None:
            return u
        return tap.site("out", F.linear(u, t["head.weight"], t["head.bias"]), u)

    sites = {"out": Site("logits", "head.weight", "head.bias")} if spec.classes is not None else {}
    return Block("head", params, forward, sites=sites, slot="head", output="logits" if spec.classes else None)


class ViTFamily(Family):
    name = "vit"
    spec_model = ViTSpec
    description = "pre-LN vision transformers (timm layout)"

    def detect(self, state_dict: Mapping[str, torch.Tensor]) -> ViTSpec | None:
        return detect_vit(state_dict)

    def detect_config(self, state_dict: Mapping[str, torch.Tensor], config) -> ViTSpec | None:
        heads = (config or {}).get("num_heads") or (config or {}).get("num_attention_heads")
        return detect_vit(state_dict, heads=int(heads) if heads else None)

    def traits(self, spec: ViTSpec) -> dict[str, object]:
        """Heads never mix (softmax is per head), and patches, positions and classes must agree:
        the widths may differ, these may not."""
        return {"attention heads": spec.heads, "patch size": spec.patch, "input channels": spec.in_chans,
                "patch grid": spec.grid, "classes": spec.classes}

    def check(self, spec: ViTSpec, state_dict: Mapping[str, torch.Tensor]) -> None:
        check_vit(spec, state_dict)

    def build(self, spec: ViTSpec) -> torch.nn.Module:
        return build_vit(spec)

    def groups(self, spec: ViTSpec) -> list[Group]:
        d, m = spec.dim, spec.mlp_hidden
        params = 3 * d * d + (3 * d if spec.qkv_bias else 0) + d * d + d + 2 * d * m + m + d + 4 * d
        return [Group("blocks", tuple(LayerInfo(f"blocks.{i}", d, params, "transformer block")
                                      for i in range(spec.depth)))]

    def describe(self, spec: ViTSpec) -> Network:
        spaces = {"stream": Space("stream", spec.dim, (("patch_embed.proj.weight", "patch_embed.proj.bias",
                                                        "pos_embed"),))}
        if spec.classes is not None:
            spaces["logits"] = Space("logits", spec.classes, fixed=True)
        blocks = [_embed(spec)]
        for i in range(spec.depth):
            keys = {f"{role}.{leaf}": f"{block_key(i, role)}.{leaf}"
                    for role in ("attn_norm", "qkv", "attn_out", "ffn_norm", "ffn_in", "ffn_out")
                    for leaf in ("weight", "bias")}
            blocks.append(_block(spec, f"blocks.{i}", keys))
        return Network(spaces, [*blocks, _head(spec)], batch=SEQUENCE_BATCH)

    def forward(self, spec: ViTSpec, state_dict: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        net = instantiate_vit(spec, state_dict)
        with torch.no_grad():
            return torch.cat([net(x[s:s + BATCH].float()) for s in range(0, len(x), BATCH)])

    def layer_outputs(self, spec: ViTSpec, state_dict: Mapping[str, torch.Tensor],
                      x: torch.Tensor) -> list[torch.Tensor]:
        """Per block, its output's class token (what the head reads)."""
        net = instantiate_vit(spec, state_dict)
        outs: list[list[torch.Tensor]] = [[] for _ in range(spec.depth)]
        with torch.no_grad():
            for s in range(0, len(x), BATCH):
                for i, h in enumerate(net.hidden_states(x[s:s + BATCH].float())[1:]):
                    outs[i].append(h[:, 0])
        return [torch.cat(o) for o in outs]
