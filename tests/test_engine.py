"""The one fusion engine: it knows no family (no key names in clafuse/fusion/, no import circles in
fusion/ and arch/), and a family written outside clafuse as a description (tests/resmlp_family.py,
a residual MLP with LayerNorm) fuses exactly: a permuted copy comes back, inserted identity
blocks keep the function, dropped blocks give the deeper net without them."""

from __future__ import annotations

import ast
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clafuse.arch.network import run
from clafuse.fusion.corrections import correct, record, record_model
from clafuse.fusion.engines import Member, Source, balanced_model, fuse_members
from clafuse.fusion.otfusion import FusionSettings
from resmlp_family import ResMLPFamily, ResMLPSpec

ROOT = Path(__file__).resolve().parent.parent / "clafuse"
FAMILY = ResMLPFamily()
EXACT = dict(correction="none", bn_reset=False)


def test_fusion_package_names_no_family_keys() -> None:
    pattern = re.compile(r"layer[0-9]|downsample|bn1|features\.|classifier")
    hits = [f"{path.name}:{n}: {line.strip()}" for path in sorted((ROOT / "fusion").glob("*.py"))
            for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def _imports(path: Path, package: str) -> set[str]:
    """clafuse modules ``path`` imports at module level (outside ``if TYPE_CHECKING``)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clafuse."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("clafuse."))
    return found


def test_fusion_and_arch_have_no_import_circles() -> None:
    graph = {}
    for package in ("fusion", "arch"):
        for path in (ROOT / package).glob("*.py"):
            graph[f"clafuse.{package}.{path.stem}"] = _imports(path, package)

    def visit(module: str, stack: list[str]) -> None:
        assert module not in stack, " -> ".join(stack + [module])
        for dep in graph.get(module, ()):
            visit(dep, stack + [module])

    for module in graph:
        visit(module, [])


# --- a family described outside clafuse ---------------------------------------------------------


def random_state(spec: ResMLPSpec, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for block in FAMILY.describe(spec).blocks:
        for local, p in block.params.items():
            base = 1.0 if local.endswith("norm.weight") else 0.0
            out[p.key] = base + torch.randn(p.shape, generator=g) / max(1, p.shape[-1]) ** 0.5
    return out


def reference(spec: ResMLPSpec, sd: dict[str, torch.Tensor], x: torch.Tensor, skip: set[int] = frozenset()
              ) -> torch.Tensor:
    """The residual MLP written out in plain torch (independent of its description)."""
    h = F.linear(x, sd["embed.weight"], sd["embed.bias"])
    for i in range(spec.blocks):
        if i in skip:
            continue
        p = f"blocks.{i}."
        u = F.layer_norm(h, (spec.width,), sd[p + "norm.weight"], sd[p + "norm.bias"])
        h = h + F.linear(torch.relu(F.linear(u, sd[p + "fc1.weight"], sd[p + "fc1.bias"])), sd[p + "fc2.weight"],
                         sd[p + "fc2.bias"])
    u = F.layer_norm(h, (spec.width,), sd["norm.weight"], sd["norm.bias"])
    return F.linear(u, sd["head.weight"], sd["head.bias"])


def permuted(spec: ResMLPSpec, sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The same function with the stream and every block's hidden units reordered."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randperm(spec.width, generator=g)
    out = dict(sd)
    out["embed.weight"], out["embed.bias"] = sd["embed.weight"][s], sd["embed.bias"][s]
    out["norm.weight"], out["norm.bias"], out["head.weight"] = sd["norm.weight"][s], sd["norm.bias"][s], sd["head.weight"][:, s]
    for i in range(spec.blocks):
        p, q = f"blocks.{i}.", torch.randperm(spec.hidden, generator=g)
        out[p + "norm.weight"], out[p + "norm.bias"] = sd[p + "norm.weight"][s], sd[p + "norm.bias"][s]
        out[p + "fc1.weight"], out[p + "fc1.bias"] = sd[p + "fc1.weight"][q][:, s], sd[p + "fc1.bias"][q]
        out[p + "fc2.weight"], out[p + "fc2.bias"] = sd[p + "fc2.weight"][s][:, q], sd[p + "fc2.bias"][s]
    return out


DEEP = ResMLPSpec(in_features=10, width=12, hidden=16, blocks=4, classes=5)
SHALLOW = DEEP.model_copy(update={"blocks": 2})
X = torch.randn(200, 10, generator=torch.Generator().manual_seed(0))


def fuse(target: tuple, source: tuple, mapping: list[int], deeper: bool, weights: list[float], signal: str,
         **options) -> dict[str, torch.Tensor]:
    source_member = Member(FAMILY, *source)
    out = fuse_members(Member(FAMILY, *target), [Source(source_member, [mapping], deeper)], weights,
                       X if signal == "activations" or options.get("correction") != "none" else None,
                       FusionSettings(signal=signal, **options))
    return out.state_dict


def test_the_description_computes_the_network() -> None:
    sd = random_state(DEEP, 1)
    torch.testing.assert_close(run(FAMILY.describe(DEEP), sd, X), reference(DEEP, sd, X))


@pytest.mark.parametrize("signal", ["activations", "weights"])
def test_permuted_copy_fuses_back(signal: str) -> None:
    sd = random_state(DEEP, 1)
    copy = permuted(DEEP, sd, 2)
    torch.testing.assert_close(reference(DEEP, copy, X), reference(DEEP, sd, X), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(copy["blocks.0.fc1.weight"], sd["blocks.0.fc1.weight"])
    fused = fuse((DEEP, sd), (DEEP, copy), [0, 1, 2, 3], False, [0.5, 0.5], signal, **EXACT)
    for key in sd:
        torch.testing.assert_close(fused[key], sd[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("signal", ["activations", "weights"])
def test_inserted_identity_blocks_keep_the_function(signal: str) -> None:
    deep, shallow = random_state(DEEP, 3), random_state(SHALLOW, 4)
    for weights, expected in (([0.0, 1.0], reference(SHALLOW, shallow, X)), ([1.0, 0.0], reference(DEEP, deep, X))):
        fused = fuse((DEEP, deep), (SHALLOW, shallow), [1, 3], False, weights, signal, **EXACT)
        assert fused.keys() == deep.keys()
        torch.testing.assert_close(reference(DEEP, fused, X), expected, rtol=1e-4, atol=1e-4)


def test_dropped_blocks_give_the_deeper_network_without_them() -> None:
    deep, shallow = random_state(DEEP, 5), random_state(SHALLOW, 6)
    fused = fuse((SHALLOW, shallow), (DEEP, deep), [0, 2], True, [0.0, 1.0], "weights", **EXACT)
    assert fused.keys() == shallow.keys()
    torch.testing.assert_close(reference(SHALLOW, fused, X), reference(DEEP, deep, X, skip={1, 3}),
                               rtol=1e-4, atol=1e-4)


def test_a_merged_source_is_recorded_in_the_whole_network() -> None:
    """Dropping blocks of the deeper source leaves its recordings as the whole network computes
    them: each kept block's site records are the deep network's own at that block (the correction
    targets what the parent really computes there), not the shortened network's."""
    deep = random_state(DEEP, 9)
    net = FAMILY.describe(DEEP)
    model = balanced_model(FAMILY.describe(SHALLOW), Source(Member(FAMILY, DEEP, deep), [[0, 2]], True), X)
    assert model.context is not None and len(model.net.blocks) < len(net.blocks)
    record_model(model, X, spaces=True, sites=True)
    _, whole, _ = record(net, deep, X, sites=True)
    _, shortened, _ = record(model.net, model.state, X, sites=True)
    index = {b.name: i for i, b in enumerate(net.blocks)}
    assert model.pre.keys() == shortened.keys()
    differ = 0
    for (b, site), value in model.pre.items():
        original = whole[(index[model.net.blocks[b].name], site)]
        for got, want in zip(value if isinstance(value, tuple) else (value,),
                             original if isinstance(original, tuple) else (original,)):
            torch.testing.assert_close(got, want)
        differ += not torch.allclose(*(v[0] if isinstance(v, tuple) else v for v in (value, shortened[(b, site)])))
    assert differ  # blocks after a dropped one see other inputs in the shortened network


def test_plain_linear_sites_are_recorded_in_full_only_for_a_regression() -> None:
    """``repair`` needs each unit's mean and std, not every pre-activation: without ``full_sites``
    a plain linear site keeps its moments, the same as the full record's."""
    sd = random_state(DEEP, 10)
    net = FAMILY.describe(DEEP)
    _, full, _ = record(net, sd, X, spaces=False, sites=True)
    _, moments, _ = record(net, sd, X, spaces=False, sites=True, full_sites=False)
    assert full.keys() == moments.keys()
    plain = [k for k, v in full.items() if not isinstance(v, tuple)]
    assert plain and all(isinstance(v, tuple) for v in moments.values())
    for key in plain:
        mean, std = moments[key]
        torch.testing.assert_close(mean, full[key].double().mean(0))
        torch.testing.assert_close(std, full[key].double().std(0, unbiased=False))


@pytest.mark.parametrize("method", ["regress", "repair"])
def test_corrections_do_not_depend_on_the_batch_size(method: str) -> None:
    """The corrections run block by block over calibration batches, each step solved from every
    batch's statistics: the corrected tensors are those of one pass over all samples at once."""
    net = FAMILY.describe(DEEP)
    state, other = random_state(DEEP, 11), random_state(DEEP, 12)
    _, targets, _ = record(net, other, X, sites=True, full_sites=method == "regress")
    whole = correct(replace(net, batch=len(X)), state, X, targets, method)
    batched = correct(replace(net, batch=7), state, X, targets, method)
    changed = [k for k in state if not torch.equal(whole[k], state[k])]
    assert any(k.endswith("fc1.weight") for k in changed), changed
    for key in state:
        torch.testing.assert_close(batched[key], whole[key], rtol=1e-5, atol=1e-6)
    if method == "regress":  # the head (a fixed space) is refit onto the other network's logits
        assert torch.dist(run(net, whole, X), run(net, other, X)) < torch.dist(run(net, state, X), run(net, other, X))


@pytest.mark.parametrize("correction", ["regress", "repair"])
def test_corrections_apply_to_a_new_family(correction: str) -> None:
    """The corrections come with the description: a fused pair is refit towards its parents."""
    deep, shallow = random_state(DEEP, 7), random_state(SHALLOW, 8)
    plain = fuse((DEEP, deep), (SHALLOW, shallow), [0, 2], False, [0.5, 0.5], "activations", **EXACT)
    fixed = fuse((DEEP, deep), (SHALLOW, shallow), [0, 2], False, [0.5, 0.5], "activations",
                 correction=correction, bn_reset=False)
    assert all(torch.isfinite(v).all() for v in fixed.values())
    changed = [k for k in plain if not torch.equal(plain[k], fixed[k])]
    assert any(k.endswith("fc1.weight") for k in changed), changed
    if correction == "regress":
        assert "head.weight" in changed
