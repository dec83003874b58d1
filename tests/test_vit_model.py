"""The timm-layout pre-LN ViT: detection, equality with transformers' ViT, exact identity blocks."""

from __future__ import annotations

import pytest
import torch

from clafuse.arch.vit_model import ViTSpec, build_vit, detect_vit, identity_block, instantiate_vit, vit_shapes
from clafuse.errors import SpecError

SPEC = ViTSpec(depth=2, dim=16, heads=4, mlp_hidden=24, patch=4, in_chans=1, grid=3, classes=5)


def random_vit(spec: ViTSpec = SPEC, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in vit_shapes(spec).items():
        base = 1.0 if key.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else 0.0
        sd[key] = base + torch.randn(shape, generator=g) * (0.5 if len(shape) > 1 else 0.1)
    return sd


def images(n: int = 3, spec: ViTSpec = SPEC) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, spec.in_chans, spec.image_size, spec.image_size, generator=g)


def test_detect_and_errors():
    sd = random_vit()
    assert detect_vit(sd, heads=4) == SPEC
    with pytest.raises(SpecError, match="heads"):  # width 16: no head size of 64 to assume
        detect_vit(sd)
    wide = random_vit(SPEC.model_copy(update={"dim": 128, "heads": 2}))
    assert detect_vit(wide).heads == 2
    headless = {k: v for k, v in sd.items() if not k.startswith("head.")}
    assert detect_vit(headless, heads=4).classes is None
    assert detect_vit({"fc.weight": torch.zeros(2, 2)}) is None
    with pytest.raises(SpecError, match="square grid"):
        detect_vit({**sd, "pos_embed": torch.zeros(1, 9, 16)}, heads=4)
    with pytest.raises(SpecError, match="blocks.1.mlp.fc2.bias"):
        detect_vit({k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}, heads=4)
    with pytest.raises(SpecError, match="expects 12x12"):
        instantiate_vit(SPEC, sd)(torch.zeros(1, 1, 8, 8))


def test_build_has_the_checkpoint_keys():
    assert {k: tuple(v.shape) for k, v in build_vit(SPEC).state_dict().items()} == vit_shapes(SPEC)


def _hf_keys(hf_state: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Our timm keys in transformers' ViT layout (either of its two naming schemes)."""
    new = "vit.layers.0.attention.q_proj.weight" in hf_state
    out = {"vit.embeddings.cls_token": sd["cls_token"], "vit.embeddings.position_embeddings": sd["pos_embed"],
           "vit.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "vit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "vit.layernorm.weight": sd["norm.weight"], "vit.layernorm.bias": sd["norm.bias"],
           "classifier.weight": sd["head.weight"], "classifier.bias": sd["head.bias"]}
    for i in range(depth):
        b = f"blocks.{i}."
        layer = f"vit.layers.{i}." if new else f"vit.encoder.layer.{i}."
        att = f"{layer}attention." if new else f"{layer}attention.attention."
        names = ("q_proj", "k_proj", "v_proj") if new else ("query", "key", "value")
        out_proj = f"{layer}attention.o_proj" if new else f"{layer}attention.output.dense"
        mlp = (f"{layer}mlp.fc1", f"{layer}mlp.fc2") if new else (f"{layer}intermediate.dense", f"{layer}output.dense")
        for leaf in ("weight", "bias"):
            for name, chunk in zip(names, sd[f"{b}attn.qkv.{leaf}"].chunk(3)):
                out[f"{att}{name}.{leaf}"] = chunk
            out[f"{out_proj}.{leaf}"] = sd[f"{b}attn.proj.{leaf}"]
            out[f"{layer}layernorm_before.{leaf}"] = sd[f"{b}norm1.{leaf}"]
            out[f"{layer}layernorm_after.{leaf}"] = sd[f"{b}norm2.{leaf}"]
            out[f"{mlp[0]}.{leaf}"] = sd[f"{b}mlp.fc1.{leaf}"]
            out[f"{mlp[1]}.{leaf}"] = sd[f"{b}mlp.fc2.{leaf}"]
    return out


def test_outputs_equal_transformers_vit():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
                                    image_size=12, patch_size=4, num_channels=1, num_labels=5, layer_norm_eps=1e-6,
                                    hidden_act="gelu", qkv_bias=True)
    hf = transformers.ViTForImageClassification(config).eval()
    sd = random_vit()
    hf.load_state_dict(_hf_keys(hf.state_dict(), sd, SPEC.depth), strict=True)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(instantiate_vit(SPEC, sd)(x), hf(pixel_values=x).logits, atol=1e-5, rtol=0)


def _insert(sd: dict[str, torch.Tensor], spec: ViTSpec, at: int, block: dict[str, torch.Tensor]) -> dict:
    out = {}
    for key, value in sd.items():
        if key.startswith("blocks."):
            i = int(key.split(".")[1])
            key = key.replace(f"blocks.{i}.", f"blocks.{i + 1 if i >= at else i}.", 1)
        out[key] = value
    out.update(block)
    return out


@pytest.mark.parametrize("at", [0, 1, 2])
def test_zero_projection_block_is_an_exact_identity(at):
    sd = random_vit()
    deeper = SPEC.model_copy(update={"depth": SPEC.depth + 1})
    block = identity_block(SPEC, at)
    noisy = {k: v if ("attn.proj" in k or "mlp.fc2" in k) else torch.randn_like(v) for k, v in block.items()}
    x = images()
    with torch.no_grad():
        base = instantiate_vit(SPEC, sd).hidden_states(x)
        for inserted in (block, noisy):
            states = instantiate_vit(deeper, _insert(sd, SPEC, at, inserted)).hidden_states(x)
            assert torch.equal(states[at + 1], states[at])
            assert torch.equal(states[-1], base[-1])
    broken = dict(noisy)
    broken[f"blocks.{at}.mlp.fc2.bias"] = torch.full_like(broken[f"blocks.{at}.mlp.fc2.bias"], 1e-3)
    with torch.no_grad():
        assert not torch.equal(instantiate_vit(deeper, _insert(sd, SPEC, at, broken))(x), instantiate_vit(SPEC, sd)(x))
