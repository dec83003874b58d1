"""A ViT pair through the command line: align and fuse with spec files (the head count does not
show in any shape), identity insertion exact end to end, and the outputs of ``fuse`` and
``finetune`` carry their spec, so they are read back with the right head count without one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clafuse import api
from clafuse.arch.vit_model import ViTSpec, build_vit, instantiate_vit
from tests.cli_runner import invoke
from tests.helpers import save_safetensors


def spec(depth: int) -> ViTSpec:
    # width 64 with 4 heads: detection alone would take 64 // 64 = 1 head
    return ViTSpec(depth=depth, dim=64, heads=4, mlp_hidden=32, patch=4, in_chans=1, grid=2, classes=5)


def vit_state(s: ViTSpec, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (1.0 if k.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else 0.0)
            + 0.3 * torch.randn(v.shape, generator=g) for k, v in build_vit(s).state_dict().items()}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit-cli")
    gen = np.random.default_rng(0)
    np.savez(root / "x.npz", x=gen.standard_normal((48, 1, 8, 8)).astype(np.float32), y=np.arange(48) % 5)
    files = {}
    for name, depth, seed in (("A", 2, 1), ("B", 1, 2)):
        files[name] = save_safetensors(root / f"{name}.safetensors", vit_state(spec(depth), seed))
        files[f"{name}.spec"] = root / f"{name}.spec.json"
        files[f"{name}.spec"].write_text(spec(depth).model_dump_json())
    out = invoke("align", files["A"], files["B"], "-o", root / "map.json", "--arch", files["A.spec"],
                 "--arch", files["B.spec"], "--data", root / "x.npz", "--samples", 48)
    assert out.code == 0, out
    return root, files


def logits(path, s: ViTSpec, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return instantiate_vit(s, api.load_model(path).state_dict)(x)


def test_inserted_identity_reproduces_the_shallow_parent_and_the_output_keeps_its_spec(pair):
    root, files = pair
    out = root / "fused-01.safetensors"
    done = invoke("fuse", "--map", root / "map.json", "-o", out, "--weights", "0,1", "--correction", "none",
                  "--balance", "add")
    assert done.code == 0, done
    loaded = api.load_model(out)
    assert loaded.spec == spec(2)
    x = torch.from_numpy(np.load(root / "x.npz")["x"])
    with torch.no_grad():
        fused = loaded.module()(x)
        parent = instantiate_vit(spec(1), api.load_model(files["B"], arch=files["B.spec"]).state_dict)(x)
    torch.testing.assert_close(fused, parent, atol=1e-5, rtol=0)
    plain = json.loads(invoke("eval", out, "--data", root / "x.npz", "--json").stdout)
    given = json.loads(invoke("eval", out, "--arch", files["A.spec"], "--data", root / "x.npz", "--json").stdout)
    assert plain == given


def test_shallow_target_and_finetuned_output_keep_their_spec(pair):
    root, files = pair
    out = root / "fused-shallow.safetensors"
    assert invoke("fuse", "--map", root / "map.json", "-o", out, "--target", "shallow").code == 0
    assert api.load_model(out).spec == spec(1)
    tuned = root / "tuned.safetensors"
    done = invoke("finetune", out, "--data", root / "x.npz", "--val", root / "x.npz", "-o", tuned, "--epochs", 1,
                  "--optimizer", "adamw", "--lr", 1e-3)
    assert done.code == 0, done
    assert api.load_model(tuned).spec == spec(1)


def test_a_recorded_spec_that_no_longer_fits_falls_back_to_detection(pair):
    root, files = pair
    out = root / "fused-stale.safetensors"
    assert invoke("fuse", "--map", root / "map.json", "-o", out, "--target", "shallow").code == 0
    from clafuse.io.checkpoint import read_metadata, save_checkpoint

    metadata = read_metadata(out)
    state = api.load_model(out).state_dict
    save_checkpoint(out, {k: v for k, v in state.items() if not k.startswith("head.")}, metadata)
    assert api.load_model(out).spec == ViTSpec(**{**spec(1).model_dump(), "heads": 1, "classes": None})
