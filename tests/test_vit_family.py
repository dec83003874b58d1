"""The ``vit`` family (pre-LN, timm layout) through the one engine: a permuted copy (stream, heads,
units within heads of the stacked qkv, MLP units) fuses back; inserted identity blocks are exact;
a deeper network's unmatched blocks are dropped."""

from __future__ import annotations

import torch

from clafuse.arch.network import run
from clafuse.arch.registry import detect
from clafuse.arch.vit import ViTFamily
from clafuse.arch.vit_model import ViTSpec, build_vit, instantiate_vit
from clafuse.fusion.balance import insert_blocks
from clafuse.fusion.engines import Member, Source, fuse_members
from clafuse.fusion.otfusion import FusionSettings

FAMILY = ViTFamily()
EXACT = dict(correction="none", bn_reset=False)


def spec(depth: int) -> ViTSpec:
    return ViTSpec(depth=depth, dim=16, heads=4, mlp_hidden=24, patch=4, in_chans=1, grid=2, classes=5)


def random_vit(s: ViTSpec, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {k: v.clone() for k, v in build_vit(s).state_dict().items()}
    return {k: (1.0 if k.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else 0.0)
            + 0.4 * torch.randn(v.shape, generator=g) for k, v in sd.items()}


def permute_vit(sd, s: ViTSpec, g: torch.Generator):
    """The ViT's symmetries applied: stream, per block heads, within-head qk and vo orders, MLP."""
    d, dh = s.dim, s.dim // s.heads
    stream = torch.randperm(d, generator=g)
    out = dict(sd)
    out["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"][stream]
    out["patch_embed.proj.bias"] = sd["patch_embed.proj.bias"][stream]
    out["cls_token"], out["pos_embed"] = sd["cls_token"][..., stream], sd["pos_embed"][..., stream]
    for key in ("norm.weight", "norm.bias"):
        out[key] = sd[key][stream]
    out["head.weight"] = sd["head.weight"][:, stream]
    for i in range(s.depth):
        b = f"blocks.{i}."
        heads = torch.randperm(s.heads, generator=g)
        qk = torch.cat([heads[j] * dh + torch.randperm(dh, generator=g) for j in range(s.heads)])
        vo = torch.cat([heads[j] * dh + torch.randperm(dh, generator=g) for j in range(s.heads)])
        ffn = torch.randperm(s.mlp_hidden, generator=g)
        rows = torch.cat([qk, d + qk, 2 * d + vo])
        out[f"{b}attn.qkv.weight"] = sd[f"{b}attn.qkv.weight"][rows][:, stream]
        out[f"{b}attn.qkv.bias"] = sd[f"{b}attn.qkv.bias"][rows]
        out[f"{b}attn.proj.weight"] = sd[f"{b}attn.proj.weight"][stream][:, vo]
        out[f"{b}attn.proj.bias"] = sd[f"{b}attn.proj.bias"][stream]
        out[f"{b}mlp.fc1.weight"] = sd[f"{b}mlp.fc1.weight"][ffn][:, stream]
        out[f"{b}mlp.fc1.bias"] = sd[f"{b}mlp.fc1.bias"][ffn]
        out[f"{b}mlp.fc2.weight"] = sd[f"{b}mlp.fc2.weight"][stream][:, ffn]
        out[f"{b}mlp.fc2.bias"] = sd[f"{b}mlp.fc2.bias"][stream]
        for key in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"):
            out[b + key] = sd[b + key][stream]
    return out


def images(n: int = 20, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_detected_and_described_forward_matches_the_module():
    s = spec(2)
    sd = random_vit(s, 0)
    family, found = detect(sd, {"num_heads": 4})
    assert family.name == "vit" and found == s
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(run(FAMILY.describe(s), sd, x), instantiate_vit(s, sd)(x), atol=1e-5, rtol=0)


def test_permuted_copy_fuses_back():
    s = spec(2)
    sd = random_vit(s, 0)
    permuted = permute_vit(sd, s, torch.Generator().manual_seed(5))
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(instantiate_vit(s, permuted)(x), instantiate_vit(s, sd)(x), atol=1e-5, rtol=0)
    for signal, data in (("weights", None), ("activations", x)):
        out = fuse_members(Member(FAMILY, s, sd), [Source(Member(FAMILY, s, permuted), [[0, 1]], deeper=False)],
                           [0.5, 0.5], data, FusionSettings(signal=signal, **EXACT))
        for key, value in sd.items():
            torch.testing.assert_close(out.state_dict[key], value, atol=1e-6, rtol=0, msg=key)


def test_identity_blocks_are_exact_and_unmatched_blocks_drop():
    shallow, deep = spec(1), spec(3)
    sd_s, sd_d = random_vit(shallow, 1), random_vit(deep, 0)
    x = images()
    balanced = insert_blocks(FAMILY.describe(shallow), [[1]], FAMILY.describe(deep))
    assert [b.inserted for b in balanced.blocks] == [False, True, False, True, False]
    torch.testing.assert_close(run(balanced, sd_s, x), instantiate_vit(shallow, sd_s)(x), atol=1e-6, rtol=0)
    # fused into the deep layout with all weight on the shallow model: the shallow model's function
    out = fuse_members(Member(FAMILY, deep, sd_d), [Source(Member(FAMILY, shallow, sd_s), [[1]], deeper=False)],
                       [0.0, 1.0], None, FusionSettings(signal="weights", inserted="average", **EXACT))
    with torch.no_grad():
        torch.testing.assert_close(instantiate_vit(deep, out.state_dict)(x), instantiate_vit(shallow, sd_s)(x),
                                   atol=1e-5, rtol=0)
    # the deep model into the shallow layout: its block 1 kept, the others dropped
    out = fuse_members(Member(FAMILY, shallow, sd_s), [Source(Member(FAMILY, deep, sd_d), [[1]], deeper=True)],
                       [0.0, 1.0], None, FusionSettings(signal="weights", **EXACT))
    kept = {k.replace("blocks.1.", "blocks.0."): v for k, v in sd_d.items()
            if not k.startswith(("blocks.0.", "blocks.2."))}
    with torch.no_grad():
        torch.testing.assert_close(instantiate_vit(shallow, out.state_dict)(x), instantiate_vit(shallow, kept)(x),
                                   atol=1e-5, rtol=0)


def test_networks_of_different_widths_fuse_with_identities_of_the_shallower_width():
    """A wider shallow ViT balanced to a narrower deep one: its inserted identities have its own
    width (exact), and the fusion keeps the target's shapes; equal head counts are required."""
    deep = spec(3)
    wide = ViTSpec(depth=1, dim=24, heads=4, mlp_hidden=40, patch=4, in_chans=1, grid=2, classes=5)
    sd_d, sd_w = random_vit(deep, 0), random_vit(wide, 1)
    x = images()
    balanced = insert_blocks(FAMILY.describe(wide), [[1]], FAMILY.describe(deep))
    torch.testing.assert_close(run(balanced, sd_w, x), instantiate_vit(wide, sd_w)(x), atol=1e-6, rtol=0)
    source = [Source(Member(FAMILY, wide, sd_w), [[1]], deeper=False)]
    kept = fuse_members(Member(FAMILY, deep, sd_d), source, [1.0, 0.0], x, FusionSettings(**EXACT))
    assert all(torch.equal(kept.state_dict[k], v) for k, v in sd_d.items())
    mixed = fuse_members(Member(FAMILY, deep, sd_d), source, [0.5, 0.5], x, FusionSettings())
    assert {k: v.shape for k, v in mixed.state_dict.items()} == {k: v.shape for k, v in sd_d.items()}
    with torch.no_grad():
        assert torch.isfinite(instantiate_vit(deep, mixed.state_dict)(x)).all()
    assert "attention heads 4 vs 2" in FAMILY.incompatibility(deep, wide.model_copy(update={"heads": 2}))


def test_regress_recovers_a_pre_ln_writer_from_the_stream_it_should_write():
    """A pre-LN writer's site is the residual stream after it: its target, less the residual,
    is linear in the writer's inputs. With a network that differs from the target only in one
    block's MLP output projection, the regression (tiny ridge) gives that projection back
    exactly, and every other site, already on target, stays as it was."""
    from clafuse.fusion.corrections import correct, record

    s = spec(2)
    net = FAMILY.describe(s)
    state = random_vit(s, 0)
    wanted = dict(state)
    g = torch.Generator().manual_seed(5)
    for key in ("blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias"):
        wanted[key] = 0.4 * torch.randn(state[key].shape, generator=g)
    x = torch.randn(200, 1, 8, 8, generator=g)
    _, targets, _ = record(net, wanted, x, spaces=False, sites=True)
    assert {name for _, name in targets} == {"attn_out", "ffn", "ffn_out", "out"}
    got = correct(net, state, x, targets, "regress", ridge=1e-9)
    for key, value in wanted.items():
        torch.testing.assert_close(got[key], value, atol=2e-4, rtol=1e-4, msg=key)
    assert not torch.allclose(state["blocks.0.mlp.fc2.weight"], wanted["blocks.0.mlp.fc2.weight"], atol=0.1)
