"""Activations in specs: a state dict cannot tell Tanh from ReLU, so detection assumes ReLU and
says so (``inspect``); a spec naming the activation makes eval, align, fuse and finetune compute
the real network. Balancing refuses what is only exact for ReLU: identity insertion needs
act(x) = x on the layer's inputs, and merge's folding replaces a ReLU by its gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from clafuse.arch.registry import FAMILIES, detect
from clafuse.data import load_source
from clafuse.errors import ClafuseError
from clafuse.fusion.engines import Member, Source, fuse_members
from clafuse.fusion.otfusion import FusionSettings
from tests.cli_runner import invoke
from tests.helpers import save_safetensors

pytestmark = pytest.mark.usefixtures("module_cache")


def train_tanh(widths: list[int], seed: int, steps: int = 150) -> nn.Sequential:
    """A Tanh MLP on the digits (64 inputs), trained briefly with Adam in plain torch."""
    torch.manual_seed(seed)
    layers, prev = [], 64
    for w in widths:
        layers += [nn.Linear(prev, w), nn.Tanh()]
        prev = w
    model = nn.Sequential(nn.Flatten(), *layers, nn.Linear(prev, 10))
    ds = load_source("digits:train")
    x, y = torch.as_tensor(ds.x).float(), torch.as_tensor(ds.y).long()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(steps):
        idx = torch.randint(len(x), (64,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval()


def accuracy(model: nn.Module, split: str = "test") -> float:
    ds = load_source(f"digits:{split}")
    with torch.no_grad():
        pred = model(torch.as_tensor(ds.x).float()).argmax(1)
    return float((pred == torch.as_tensor(ds.y)).double().mean())


def spec_file(path: Path, state: dict, activation: str) -> Path:
    _, spec = detect(state)
    path.write_text(json.dumps({**spec.model_dump(mode="json"), "activation": activation}))
    return path


@pytest.fixture(scope="module")
def tanh_pair(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tanh")
    deep, shallow = train_tanh([32, 32, 24], 0), train_tanh([32, 24], 1)
    out = {"root": root, "deep_module": deep, "shallow_module": shallow}
    for name, module in (("deep", deep), ("shallow", shallow)):
        out[name] = save_safetensors(root / f"{name}.safetensors", module[1:])
        out[f"{name}_spec"] = spec_file(root / f"{name}.json", module[1:].state_dict(), "tanh")
    return out


def test_tanh_mlp_evaluates_like_torch_when_the_spec_says_tanh(tanh_pair: dict) -> None:
    reference = accuracy(tanh_pair["deep_module"])
    assert reference > 0.85
    res = invoke("eval", tanh_pair["deep"], "--data", "digits", "--arch", tanh_pair["deep_spec"], "--json")
    assert res.code == 0, res
    assert json.loads(res.stdout)["models"][0]["accuracy"] == pytest.approx(reference, abs=1e-9)
    assumed = invoke("eval", tanh_pair["deep"], "--data", "digits", "--json")
    assert json.loads(assumed.stdout)["models"][0]["accuracy"] != pytest.approx(reference, abs=1e-9)


def test_inspect_says_what_it_assumes(tanh_pair: dict) -> None:
    res = invoke("inspect", tanh_pair["deep"])
    assert res.code == 0, res
    assert "assumes ReLU" in res.stdout
    res = invoke("inspect", tanh_pair["deep"], "--arch", tanh_pair["deep_spec"], "--json")
    assert json.loads(res.stdout)["activation"] == {"name": "tanh", "assumed": False}
    res = invoke("inspect", tanh_pair["deep"], "--json")
    assert json.loads(res.stdout)["activation"] == {"name": "relu", "assumed": True}


def test_tanh_fusion_of_equal_depths_uses_tanh(tanh_pair: dict) -> None:
    """A permuted copy fuses back exactly, and the description computes with tanh."""
    module = tanh_pair["deep_module"][1:]
    state = {k: v.clone() for k, v in module.state_dict().items()}
    family = FAMILIES["mlp"]
    _, spec = detect(state)
    spec = spec.model_copy(update={"activation": "tanh"})
    x = torch.as_tensor(load_source("digits:val").x).float()
    with torch.no_grad():
        torch.testing.assert_close(family.forward(spec, state, x), tanh_pair["deep_module"](x), rtol=1e-5, atol=1e-5)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    copy = dict(state)
    copy["1.weight"], copy["1.bias"], copy["3.weight"] = state["1.weight"][perm], state["1.bias"][perm], \
        state["3.weight"][:, perm]
    fused = fuse_members(Member(family, spec, state), [Source(Member(family, spec, copy), [[0, 1, 2]], False)],
                         [0.5, 0.5], x, FusionSettings(signal="activations", correction="none", bn_reset=False))
    for key in state:
        torch.testing.assert_close(fused.state_dict[key], state[key], rtol=1e-5, atol=1e-6)


def test_balancing_refuses_what_is_only_exact_for_relu(tanh_pair: dict) -> None:
    """align finds it up front, with both reasons, and writes no map."""
    root = tanh_pair["root"]
    res = invoke("align", tanh_pair["deep"], tanh_pair["shallow"], "--arch", tanh_pair["deep_spec"], "--arch",
                 tanh_pair["shallow_spec"], "--data", "digits", "--samples", 300, "-o", root / "map.json")
    assert res.code != 0 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res
    assert "by either balancing" in res.stderr and "no layer is an exact identity" in res.stderr
    assert "ReLU's gate" in res.stderr and "tanh" in res.stderr
    assert not (root / "map.json").exists()


def test_fusion_refuses_non_relu_balancing_in_the_library() -> None:
    torch.manual_seed(0)
    family = FAMILIES["mlp"]
    deep = nn.Sequential(nn.Linear(64, 16), nn.Linear(16, 16), nn.Linear(16, 10))
    shallow = nn.Sequential(nn.Linear(64, 16), nn.Linear(16, 10))
    d_spec, s_spec = (detect(m.state_dict())[1].model_copy(update={"activation": "sigmoid"}) for m in (deep, shallow))
    settings = FusionSettings(signal="weights", correction="none", bn_reset=False)
    with pytest.raises(ClafuseError, match="no layer is an exact identity.*--balance merge"):
        fuse_members(Member(family, d_spec, deep.state_dict()),
                     [Source(Member(family, s_spec, shallow.state_dict()), [[0]], False)], [0.5, 0.5], None, settings)
    x = torch.randn(30, 64)
    with pytest.raises(ClafuseError, match="ReLU's gate.*sigmoid.*--balance add"):
        fuse_members(Member(family, s_spec, shallow.state_dict()),
                     [Source(Member(family, d_spec, deep.state_dict()), [[0]], True)], [0.5, 0.5], x, settings)


def test_identity_activation_inserts_exact_identities() -> None:
    """Without an activation (a deep linear net) an identity layer is exact on any input."""
    torch.manual_seed(0)
    family = FAMILIES["mlp"]
    deep = nn.Sequential(nn.Linear(64, 16), nn.Linear(16, 16), nn.Linear(16, 10))
    shallow = nn.Sequential(nn.Linear(64, 16), nn.Linear(16, 10))
    specs = [detect(m.state_dict())[1].model_copy(update={"activation": "identity"}) for m in (deep, shallow)]
    x = torch.randn(20, 64)
    fused = fuse_members(Member(family, specs[0], deep.state_dict()),
                         [Source(Member(family, specs[1], shallow.state_dict()), [[0]], False)], [0.0, 1.0], None,
                         FusionSettings(signal="weights", correction="none", bn_reset=False))
    with torch.no_grad():
        torch.testing.assert_close(family.forward(specs[0], fused.state_dict, x), shallow(x), rtol=1e-5, atol=1e-5)
    gelu = specs[1].model_copy(update={"activation": "gelu"})
    with pytest.raises(ClafuseError, match="gelu"):
        fuse_members(Member(family, specs[0].model_copy(update={"activation": "gelu"}), deep.state_dict()),
                     [Source(Member(family, gelu, shallow.state_dict()), [[0]], False)], [0.5, 0.5], None,
                     FusionSettings(signal="weights", correction="none", bn_reset=False))


def test_finetune_trains_the_network_the_spec_names(tanh_pair: dict) -> None:
    root = tanh_pair["root"]
    out = root / "tuned.safetensors"
    res = invoke("finetune", tanh_pair["shallow"], "--arch", tanh_pair["shallow_spec"], "--data", "digits",
                 "--epochs", 1, "--lr", 0.001, "-o", out, "--json")
    assert res.code == 0, res
    from safetensors.torch import load_file

    module = tanh_pair["shallow_module"]
    tuned = nn.Sequential(nn.Flatten(), *[type(m)(*([m.in_features, m.out_features] if isinstance(m, nn.Linear)
                                                      else [])) for m in module[1:]])
    tuned[1:].load_state_dict(load_file(out))
    before, after = accuracy(module, "val"), accuracy(tuned.eval(), "val")
    assert after > before - 0.02  # a small-step epoch on the real (tanh) network keeps it working
    res = invoke("eval", out, "--data", "digits:val", "--arch", tanh_pair["shallow_spec"], "--json")
    assert json.loads(res.stdout)["models"][0]["accuracy"] == pytest.approx(after, abs=1e-9)
