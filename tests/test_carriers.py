"""Balancing a shallower MLP into a deeper one whose extra layers come after the shallow one's last
and are narrower: an identity there cannot be moved into the narrower units without loss, so the
inserted layers carry the shallow network's logits as ReLU([z; -z]) and the classifier reads
z+ - z-. Exact properties: the balanced network is the shallow one, at the deep one's widths, and
fusing with all weight on it gives it back; where the rule does not apply, identities stand."""

from __future__ import annotations

import pytest
import torch

from clafuse.arch.network import run
from clafuse.fusion.engines import Member, Source, balanced_model, fuse_members
from clafuse.fusion.otfusion import FusionSettings
from tests.helpers import mlp_member

INPUTS, CLASSES = 12, 4


def tiny_mlp(hidden: list[int], seed: int, bias: bool = True) -> Member:
    return mlp_member(hidden, seed, inputs=INPUTS, classes=CLASSES, bias=bias, bias_std=0.3)


def outputs(m: Member, x: torch.Tensor) -> torch.Tensor:
    return m.family.instantiate(m.spec, m.state_dict)(x)


X = torch.randn(200, INPUTS, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("shallow_bias, deep_bias", [(True, True), (False, False), (True, False), (False, True)])
def test_carriers_keep_the_shallow_function_at_the_deep_widths(shallow_bias: bool, deep_bias: bool) -> None:
    shallow, deep = tiny_mlp([20, 16], 1, shallow_bias), tiny_mlp([20, 16, 12, 9], 2, deep_bias)
    target = deep.family.describe(deep.spec)
    model = balanced_model(target, Source(shallow, [[0, 1]], deeper=False), X)
    names = [b.name for b in model.net.blocks]
    assert sum("+carrier" in n for n in names) == 2
    assert model.net.blocks[-1].params["weight"].key.endswith("+readout.weight")
    widths = [s.size for s in model.net.all_spaces().values() if not s.fixed]
    assert widths == [s.size for s in target.all_spaces().values() if not s.fixed]
    got = run(model.net, model.state, X)
    torch.testing.assert_close(got, outputs(shallow, X), rtol=1e-5, atol=1e-5)


def test_fusing_with_all_weight_on_the_carried_network_gives_it_back() -> None:
    shallow, deep = tiny_mlp([20, 16], 3), tiny_mlp([20, 16, 12, 9], 4)
    settings = FusionSettings(correction="none")
    for weights, expected in (([0.0, 1.0], outputs(shallow, X)), ([1.0, 0.0], outputs(deep, X))):
        fused = fuse_members(deep, [Source(shallow, [[0, 1]], deeper=False)], weights, X, settings)
        assert fused.state_dict.keys() == deep.state_dict.keys()
        torch.testing.assert_close(deep.family.instantiate(deep.spec, fused.state_dict)(X), expected,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("deep_hidden, mapping", [
    ([20, 16, 24], [0, 1]),      # the extra layer is wider: the identity is exact and moves without loss
    ([20, 16, 12, 6], [0, 1]),   # too narrow to carry 2 x 4 logits
    ([20, 16, 12, 9], [0, 3]),   # the last layers are matched: nothing after the shallow one's last
])
def test_identities_stand_where_carriers_do_not_apply(deep_hidden: list[int], mapping: list[int]) -> None:
    shallow, deep = tiny_mlp([20, 16], 5), tiny_mlp(deep_hidden, 6)
    model = balanced_model(deep.family.describe(deep.spec), Source(shallow, [mapping], deeper=False), X)
    assert not any("+carrier" in b.name for b in model.net.blocks)
    torch.testing.assert_close(run(model.net, model.state, X), outputs(shallow, X), rtol=1e-5, atol=1e-5)


def test_fuse_with_a_mapping_that_leaves_the_tail_carries_the_logits(tmp_path) -> None:
    """End to end: ``fuse --mapping`` that leaves the deep model's narrower last layers unmatched
    writes the deep architecture computing the shallow model exactly (weights 0,1, no correction)."""
    import json

    import numpy as np
    from safetensors.torch import save_file

    from clafuse.io.checkpoint import load_checkpoint
    from tests.cli_runner import invoke

    shallow, deep = tiny_mlp([20, 16], 7), tiny_mlp([20, 16, 12, 9], 8)
    for name, m in (("deep", deep), ("shallow", shallow)):
        save_file({k: v.contiguous() for k, v in m.state_dict.items()}, str(tmp_path / f"{name}.safetensors"))
    np.savez(tmp_path / "x.npz", x=X.numpy())
    run = invoke("align", tmp_path / "deep.safetensors", tmp_path / "shallow.safetensors", "-o", tmp_path / "map.json",
                 "--data", tmp_path / "x.npz", "--samples", 200, cwd=tmp_path)
    assert run.code == 0, run
    run = invoke("fuse", "--map", tmp_path / "map.json", "-o", tmp_path / "out.safetensors", "--target", "A",
                 "--mapping", "B=0,1", "--weights", "0,1", "--correction", "none", cwd=tmp_path)
    assert run.code == 0, run
    assert run.stdout.count("B's logits carried") == 2 and "identity in B" not in run.stdout
    again = invoke("fuse", "--map", tmp_path / "map.json", "-o", tmp_path / "again.safetensors", "--target", "A",
                   "--mapping", "B=0,1", "--json", cwd=tmp_path)
    assert json.loads(again.stdout)["carried"] == {"B": ["fc2", "fc3"]}
    fused = load_checkpoint(tmp_path / "out.safetensors")
    assert {k: tuple(v.shape) for k, v in fused.items()} == {k: tuple(v.shape) for k, v in deep.state_dict.items()}
    got = deep.family.instantiate(deep.spec, fused)(X)
    torch.testing.assert_close(got, outputs(shallow, X), rtol=1e-4, atol=1e-4)


def test_search_starts_from_the_mapping_whose_balancing_keeps_the_shallow_network(tmp_path) -> None:
    """Into the deeper architecture, the search starts from the mapping that keeps every layer of
    the shallower network at least as wide and lets the deeper one's narrower last layers carry its
    logits (found with the last pin released), not from align's pinned mapping; an explicit
    --mapping is where it starts instead."""
    import numpy as np
    from safetensors.torch import save_file

    from clafuse import api
    from clafuse.align.mapfile import read_map

    shallow, deep = tiny_mlp([20, 16], 9), tiny_mlp([20, 16, 12, 9], 10)
    for name, m in (("deep", deep), ("shallow", shallow)):
        save_file({k: v.contiguous() for k, v in m.state_dict.items()}, str(tmp_path / f"{name}.safetensors"))
    x = torch.randn(600, INPUTS, generator=torch.Generator().manual_seed(1))
    np.savez(tmp_path / "x.npz", x=x.numpy())
    api.align([tmp_path / "deep.safetensors", tmp_path / "shallow.safetensors"], tmp_path / "map.json",
              data=str(tmp_path / "x.npz"), samples=200)
    pinned = read_map(tmp_path / "map.json").alignments[0].groups[0].mapping
    assert pinned[-1] == 3, "align pins the shallow network's last layer to the deep one's last"
    report = api.fuse(tmp_path / "map.json", tmp_path / "s.safetensors", target="A", search=True, budget=1)
    assert report["mapping"] == [[0, 1]] and "--mapping B=0,1" in report["search"]["command"]
    given = api.fuse(tmp_path / "map.json", tmp_path / "g.safetensors", target="A", search=True, budget=1,
                     mapping=["B=0,3"])
    assert given["mapping"] == [[0, 3]]
