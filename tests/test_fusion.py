"""Transport plans, layer-wise OT fusion, and fusion through the public API on saved checkpoints."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from clafuse import api
from clafuse.arch.base import Chain, ChainLayer
from clafuse.arch.registry import detect
from clafuse.data import calibration_inputs, load_source
from clafuse.fusion.otfusion import FusionSettings, fuse_chains
from clafuse.fusion.transport import transport_plan
from clafuse.io.checkpoint import load_checkpoint, read_metadata, save_checkpoint


pytestmark = pytest.mark.usefixtures("module_cache")


def marginal_errors(plan: np.ndarray) -> tuple[float, float]:
    n, m = plan.shape
    return float(np.abs(plan.sum(1) - 1 / n).max()), float(np.abs(plan.sum(0) - 1 / m).max())


# --- transport plans ----------------------------------------------------------------------------

SHAPES = [(1, 1), (5, 5), (16, 16), (7, 4), (3, 9), (20, 13)]


@pytest.mark.parametrize("shape", SHAPES)
def test_emd_plan_has_uniform_marginals(shape: tuple[int, int]) -> None:
    cost = np.random.default_rng(sum(shape)).random(shape)
    plan = transport_plan(cost, "emd")
    assert plan.shape == shape
    assert (plan >= -1e-15).all()
    assert max(marginal_errors(plan)) < 1e-9


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reg", [0.05, 0.2])
def test_sinkhorn_plan_has_uniform_marginals(shape: tuple[int, int], reg: float) -> None:
    cost = np.random.default_rng(sum(shape)).random(shape) * 37.0  # reg is relative to the largest cost
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a "did not converge" warning fails the test
        plan = transport_plan(cost, "sinkhorn", reg)
    assert plan.shape == shape
    assert (plan >= 0).all()
    assert max(marginal_errors(plan)) < 1e-6


def test_sinkhorn_at_default_reg_converges_on_a_small_random_cost() -> None:
    cost = np.random.default_rng(0).random((5, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = transport_plan(cost, "sinkhorn")
    assert max(marginal_errors(plan)) < 1e-6


def test_sinkhorn_approaches_emd_as_reg_shrinks() -> None:
    rng = np.random.default_rng(3)
    n = 6
    perm = rng.permutation(n)
    cost = rng.uniform(0.5, 1.0, (n, n))
    cost[np.arange(n), perm] = 0.0  # a unique optimum with a clear gap
    exact = transport_plan(cost, "emd")
    expected = np.zeros((n, n))
    expected[np.arange(n), perm] = 1 / n
    np.testing.assert_allclose(exact, expected, atol=1e-12)
    distances = [float(np.abs(transport_plan(cost, "sinkhorn", reg) - exact).sum())
                 for reg in (1.0, 0.3, 0.1, 0.01, 0.001)]
    assert distances[0] > 0.5  # a large reg really blurs the plan
    for a, b in zip(distances, distances[1:]):
        assert b < a or b < 1e-9, distances
    assert distances[-1] < 1e-6


def test_sinkhorn_is_scale_invariant() -> None:
    cost = np.random.default_rng(4).random((6, 8))
    np.testing.assert_allclose(transport_plan(cost, "sinkhorn", 0.1),
                               transport_plan(cost * 1000.0, "sinkhorn", 0.1), atol=1e-9)


@pytest.mark.parametrize("n", [2, 5, 17, 40])
def test_emd_on_equal_widths_is_a_scaled_permutation(n: int) -> None:
    cost = np.random.default_rng(n).random((n, n))
    plan = transport_plan(torch.from_numpy(cost), "emd")  # torch input is accepted too
    scaled = plan * n
    assert np.allclose(scaled, np.round(scaled), atol=1e-9)
    assert (np.round(scaled).sum(0) == 1).all() and (np.round(scaled).sum(1) == 1).all()
    rows, cols = linear_sum_assignment(cost)
    assert (scaled.argmax(1)[rows] == cols).all()  # the optimal assignment


def test_unknown_solver_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown solver"):
        transport_plan(np.ones((2, 2)), "hungarian")


# --- fuse_chains on a permuted copy -------------------------------------------------------------


def random_chain(widths: list[int], bias: bool, seed: int) -> Chain:
    gen = torch.Generator().manual_seed(seed)
    layers = [ChainLayer(weight=torch.randn(o, i, generator=gen) / i ** 0.5,
                         bias=torch.randn(o, generator=gen) * 0.2 if bias else None)
              for i, o in zip(widths, widths[1:])]
    layers[-1].relu = False
    return Chain(layers[:-1], layers[-1])


def permute_chain(chain: Chain, perms: list[torch.Tensor]) -> Chain:
    """The same function with hidden layer k's neurons reordered by ``perms[k]``."""
    layers, prev = [], None
    for k, layer in enumerate(chain.layers):
        w = layer.weight if prev is None else layer.weight[:, prev]
        b = layer.bias
        if k < len(chain.hidden):
            w, b = w[perms[k]], b[perms[k]] if b is not None else None
            prev = perms[k]
        layers.append(layer.with_(weight=w.clone(), bias=None if b is None else b.clone()))
    return Chain(layers[:-1], layers[-1], chain.flatten_input)


@pytest.mark.parametrize("signal", ["activations", "weights"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("correction", ["repair", "none"])
def test_fusing_a_permuted_copy_gives_back_the_function(signal: str, bias: bool, correction: str) -> None:
    widths = [10, 16, 12, 8, 4]
    anchor = random_chain(widths, bias, seed=1)
    gen = torch.Generator().manual_seed(2)
    perms = [torch.randperm(w, generator=gen) for w in widths[1:-1]]
    copy = permute_chain(anchor, perms)
    x = torch.randn(300, 10, generator=gen)
    torch.testing.assert_close(copy(x), anchor(x), rtol=1e-5, atol=1e-5)  # same function
    assert not torch.allclose(copy.hidden[0].weight, anchor.hidden[0].weight)  # different weights
    settings = FusionSettings(signal=signal, correction=correction)
    result = fuse_chains(anchor, [copy], [0.5, 0.5], x, settings)
    fused = result.chain
    x_new = torch.randn(100, 10, generator=gen)
    for inputs in (x, x_new):
        torch.testing.assert_close(fused(inputs), anchor(inputs), rtol=1e-4, atol=1e-4)
    for lf, la in zip(fused.layers, anchor.layers):
        torch.testing.assert_close(lf.weight, la.weight, rtol=1e-4, atol=1e-4)
        assert (lf.bias is None) == (not bias)
    # Each plan sends copy neuron i to anchor neuron perms[k][i].
    (plans,) = result.plans
    plans = [p.toarray() if hasattr(p, "toarray") else p for p in plans]
    for plan, perm in zip(plans, perms):
        n = len(perm)
        expected = np.zeros((n, n))
        expected[np.arange(n), perm.numpy()] = 1.0 / n
        np.testing.assert_allclose(plan, expected, atol=1e-9)
    assert result.mixing == [[0.5, 0.5]] * len(anchor.layers)


def test_fusing_unaligned_copies_without_transport_would_not_give_the_function() -> None:
    """Sanity check: the permuted copy is not already aligned, so plain averaging breaks it."""
    anchor = random_chain([10, 16, 12, 4], True, seed=1)
    gen = torch.Generator().manual_seed(2)
    copy = permute_chain(anchor, [torch.randperm(16, generator=gen), torch.randperm(12, generator=gen)])
    naive = Chain([a.with_(weight=(a.weight + c.weight) / 2, bias=(a.bias + c.bias) / 2)
                   for a, c in zip(anchor.hidden, copy.hidden)],
                  anchor.classifier.with_(weight=(anchor.classifier.weight + copy.classifier.weight) / 2),
                  True)
    x = torch.randn(50, 10, generator=gen)
    assert not torch.allclose(naive(x), anchor(x), atol=1e-3)


# --- through the public API on checkpoints ------------------------------------------------------

INPUTS = 64  # digits: 1 x 8 x 8
CLASSES = 10


def make_state(names: list[str], hidden: list[int], bias: bool, seed: int,
               dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    widths = [INPUTS, *hidden, CLASSES]
    state = {}
    for name, i, o in zip(names, widths, widths[1:]):
        state[f"{name}.weight"] = (torch.randn(o, i, generator=gen) * (2 / i) ** 0.5).to(dtype)
        if bias:
            state[f"{name}.bias"] = (torch.randn(o, generator=gen) * 0.1).to(dtype)
    return state


DEEP_HIDDEN = [32, 32, 32, 24, 16]
SHALLOW_HIDDEN = [32, 24, 16]  # 'neuron' alignment maps it to [0, 3, 4]: identities of width 32, 32
DEEP_NAMES = ["encoder.fc1", "encoder.fc2", "encoder.fc3", "encoder.fc4", "encoder.fc5", "head"]
SHALLOW_NAMES = ["layers.0", "layers.2", "layers.4", "layers.6"]


def write_pair(tmp_path: Path, deep_bias: bool = True, shallow_bias: bool = True,
               deep_dtype: torch.dtype = torch.float32, shallow_dtype: torch.dtype = torch.float32,
               deep_ext: str = ".safetensors", shallow_ext: str = ".pt") -> tuple[Path, Path]:
    a = tmp_path / f"deep{deep_ext}"
    b = tmp_path / f"shallow{shallow_ext}"
    save_checkpoint(a, make_state(DEEP_NAMES, DEEP_HIDDEN, deep_bias, seed=10, dtype=deep_dtype))
    save_checkpoint(b, make_state(SHALLOW_NAMES, SHALLOW_HIDDEN, shallow_bias, seed=20, dtype=shallow_dtype))
    return a, b


def module_of(path: Path) -> torch.nn.Module:
    state = load_checkpoint(path)
    family, spec = detect(state)
    module = family.build(spec)
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return module.eval()


@pytest.fixture(scope="module")
def digits_x() -> torch.Tensor:
    return load_source("digits:test").x


def test_weights_one_zero_give_back_the_deep_model(tmp_path: Path, digits_x: torch.Tensor) -> None:
    a, b = write_pair(tmp_path)
    doc = api.align([a, b], tmp_path / "map.json", data="digits", samples=300)
    assert doc.anchor == 0 and doc.alignments[0].deep == 0
    mapping = doc.alignments[0].groups[0].mapping
    assert len(mapping) == 3 and mapping[0] == 0 and mapping[-1] == 4
    report = api.fuse(tmp_path / "map.json", tmp_path / "fused.safetensors", weights="1,0")
    assert report["weights"] == [1.0, 0.0] and report["signal"] == "activations"
    assert all(mix[0] == 1.0 for mix in report["mixing"])
    fused, original = load_checkpoint(tmp_path / "fused.safetensors"), load_checkpoint(a)
    assert fused.keys() == original.keys()
    for key in original:
        torch.testing.assert_close(fused[key], original[key], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(module_of(tmp_path / "fused.safetensors")(digits_x), module_of(a)(digits_x),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("signal", ["activations", "weights"])
def test_weights_zero_one_give_back_the_balanced_shallow_model(tmp_path: Path, digits_x: torch.Tensor,
                                                               signal: str) -> None:
    a, b = write_pair(tmp_path)
    doc = api.align([a, b], tmp_path / "map.json", metric="neuron")
    assert doc.alignments[0].groups[0].mapping == [0, 3, 4]
    assert doc.data is None
    api.fuse(tmp_path / "map.json", tmp_path / "fused.safetensors", weights="0,1", signal=signal,
             data="digits", samples=300)
    fused = module_of(tmp_path / "fused.safetensors")
    assert sorted(load_checkpoint(tmp_path / "fused.safetensors")) == sorted(load_checkpoint(a))
    with torch.no_grad():
        torch.testing.assert_close(fused(digits_x), module_of(b)(digits_x), rtol=1e-4, atol=1e-4)


def test_merge_with_weights_on_the_shallow_model_gives_it_back(tmp_path: Path, digits_x: torch.Tensor) -> None:
    a, b = write_pair(tmp_path)
    api.align([a, b], tmp_path / "map.json", data="digits", samples=300)
    report = api.fuse(tmp_path / "map.json", tmp_path / "fused.pt", balance="merge", weights="0,1")
    assert [layer["width"] for layer in report["layers"]] == SHALLOW_HIDDEN
    fused, original = load_checkpoint(tmp_path / "fused.pt"), load_checkpoint(b)
    assert fused.keys() == original.keys()
    for key in original:
        torch.testing.assert_close(fused[key], original[key], rtol=1e-5, atol=1e-6)


def test_weights_follow_the_align_order(tmp_path: Path) -> None:
    a, b = write_pair(tmp_path)
    doc = api.align([b, a], tmp_path / "map.json", data="digits", samples=300)  # shallow first
    assert doc.anchor == 1 and doc.alignments[0].deep == 1 and doc.alignments[0].shallow == 0
    api.fuse(tmp_path / "map.json", tmp_path / "fused.safetensors", weights="0,1")
    fused, original = load_checkpoint(tmp_path / "fused.safetensors"), load_checkpoint(a)
    for key in original:
        torch.testing.assert_close(fused[key], original[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("deep_bias,shallow_bias", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("balance", ["add", "merge"])
def test_fused_checkpoint_loads_strictly_into_the_target(tmp_path: Path, balance: str, deep_bias: bool,
                                                         shallow_bias: bool, digits_x: torch.Tensor) -> None:
    a, b = write_pair(tmp_path, deep_bias, shallow_bias, deep_dtype=torch.float64, shallow_dtype=torch.bfloat16)
    api.align([a, b], tmp_path / "map.json", data="digits", samples=300)
    out = tmp_path / "fused.safetensors"
    report = api.fuse(tmp_path / "map.json", out, balance=balance)
    target = a if balance == "add" else b
    target_bias = deep_bias if balance == "add" else shallow_bias
    assert Path(report["target"]).name == target.name
    fused, original = load_checkpoint(out), load_checkpoint(target)
    assert set(fused) == set(original)
    for key in original:
        assert fused[key].dtype == original[key].dtype, key
        assert fused[key].shape == original[key].shape, key
        assert bool(torch.isfinite(fused[key].float()).all()), key
    assert any(k.endswith(".bias") for k in fused) == target_bias
    family, spec = detect(original)
    module = family.build(spec)
    missing, unexpected = module.load_state_dict(fused, strict=True)
    assert not missing and not unexpected
    # Equal weights really mix the two models: the result is neither parent.
    assert any(not torch.equal(fused[k], original[k]) for k in original)
    with torch.no_grad():
        logits = module.float()(digits_x)
    assert logits.shape == (len(digits_x), CLASSES) and bool(torch.isfinite(logits).all())
    meta = read_metadata(out)
    settings = json.loads(meta["settings"])
    assert settings["balance"] == balance and settings["weights"] == [0.5, 0.5]
    assert len(meta["map_sha256"]) == 64


@pytest.mark.parametrize("signal", ["activations", "weights"])
def test_api_fusion_of_a_permuted_copy(tmp_path: Path, digits_x: torch.Tensor, signal: str) -> None:
    state = make_state(SHALLOW_NAMES, SHALLOW_HIDDEN, True, seed=6)
    for name in SHALLOW_NAMES[:-1]:
        state[f"{name}.bias"] += 0.5
    # Precondition: no neuron is silent on the calibration data. Silent neurons all have the same
    # (zero) activations, so activation-based matching cannot tell them apart.
    family, spec = detect(state)
    _, post, _ = family.to_chain(spec, state).forward_record(calibration_inputs(load_source("digits"), 300, 0))
    assert all(bool((h > 0).any(0).all()) for h in post)
    gen = torch.Generator().manual_seed(6)
    perms = [torch.randperm(w, generator=gen) for w in SHALLOW_HIDDEN]
    permuted, prev = {}, None
    for k, name in enumerate(SHALLOW_NAMES):
        w, b = state[f"{name}.weight"], state[f"{name}.bias"]
        if prev is not None:
            w = w[:, prev]
        if k < len(perms):
            w, b, prev = w[perms[k]], b[perms[k]], perms[k]
        permuted[f"{name}.weight"], permuted[f"{name}.bias"] = w.clone(), b.clone()
    save_checkpoint(tmp_path / "a.safetensors", state)
    save_checkpoint(tmp_path / "b.pt", permuted)
    doc = api.align([tmp_path / "a.safetensors", tmp_path / "b.pt"], tmp_path / "map.json", data="digits",
                    samples=300)
    assert doc.alignments[0].groups[0].mapping == [0, 1, 2]
    api.fuse(tmp_path / "map.json", tmp_path / "fused.safetensors", signal=signal)
    with torch.no_grad():
        want = module_of(tmp_path / "a.safetensors")(digits_x)
        torch.testing.assert_close(module_of(tmp_path / "b.pt")(digits_x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(module_of(tmp_path / "fused.safetensors")(digits_x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("metric", ["cka", "euclidean", "wd", "neuron"])
def test_align_with_every_metric_gives_a_valid_map(tmp_path: Path, metric: str) -> None:
    a, b = write_pair(tmp_path)
    kwargs = {} if metric == "neuron" else {"data": "digits", "samples": 200}
    doc = api.align([b, a], tmp_path / "map.json", metric=metric, **kwargs)
    assert (doc.data is None) == (metric == "neuron")
    (group,) = doc.alignments[0].groups
    assert np.array(group.cost).shape == (len(SHALLOW_HIDDEN), len(DEEP_HIDDEN))
    assert np.isfinite(group.cost).all() and (np.array(group.cost) >= -1e-9).all()
    assert group.mapping[0] == 0 and group.mapping[-1] == len(DEEP_HIDDEN) - 1
    assert all(x < y for x, y in zip(group.mapping, group.mapping[1:]))
    assert group.total_cost == pytest.approx(sum(group.cost[i][j] for i, j in enumerate(group.mapping)), abs=1e-8)
    # Same inputs, same seed: the same bytes.
    first = (tmp_path / "map.json").read_bytes()
    api.align([b, a], tmp_path / "map.json", metric=metric, **kwargs)
    assert (tmp_path / "map.json").read_bytes() == first
