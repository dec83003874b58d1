"""Fusion search: calibration split, scoring, the closed-form head refit, candidate builders and
the search loop, on tiny in-memory MLPs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from clafuse.align.costs import activation_cost
from clafuse.align.dp import k_best_alignments
from clafuse.data import Dataset, calibration_inputs
from clafuse.errors import ClafuseError, DataError
from clafuse.fusion.engines import ENGINES, Member, Source
from clafuse.fusion.otfusion import FusionSettings
from clafuse.search.builders import Alternatives, PlanBuilder, engine_weights
from clafuse.search.refit import ensemble_teacher, last_linear, record_inputs, refit_head, refit_linear
from clafuse.search.run import fuse_command, mapping_text, search_fusion, search_requested
from clafuse.search.scoring import (
    cosine_agreement,
    ensemble_mean,
    ensemble_probs,
    kl_to_reference,
    make_reference,
    score_outputs,
    tempered_kl,
)
from clafuse.search.space import Budget, Candidate, SearchOptions, parse_budget, weight_moves
from clafuse.search.split import SearchData, calibration_split, rebuild_size, split_dataset
from tests.helpers import mlp_member

INPUTS, CLASSES = 12, 5


def tiny_mlp(hidden: list[int], seed: int, bias: bool = True) -> Member:
    return mlp_member(hidden, seed, inputs=INPUTS, classes=CLASSES, bias=bias)


def module(m: Member) -> nn.Module:
    return m.family.instantiate(m.spec, m.state_dict)


@pytest.fixture(scope="module")
def pair() -> tuple[Member, Member]:
    return tiny_mlp([16, 16, 12, 12, 8], seed=1), tiny_mlp([16, 12, 8], seed=2)


@pytest.fixture(scope="module")
def data() -> SearchData:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1000, INPUTS, generator=gen)
    return SearchData(x_build=x[:600], x_holdout=x[600:], y_holdout=torch.randint(0, CLASSES, (400,), generator=gen))


def mapping_alternatives(deep: Member, shallow: Member, x: torch.Tensor, k: int) -> list[list[list[int]]]:
    cost = activation_cost(shallow.family.layer_outputs(shallow.spec, shallow.state_dict, x),
                           deep.family.layer_outputs(deep.spec, deep.state_dict, x), "cka")
    return [[phi] for phi, _ in k_best_alignments(cost, k)]


# --- split -----------------------------------------------------------------------------------


def test_split_is_deterministic_and_disjoint() -> None:
    a, b = calibration_split(100, 30, 20, seed=4), calibration_split(100, 30, 20, seed=4)
    assert torch.equal(a.build, b.build) and torch.equal(a.holdout, b.holdout)
    assert len(a.build) == 30 and len(a.holdout) == 20
    assert not set(a.build.tolist()) & set(a.holdout.tolist())
    assert len(set(a.build.tolist())) == 30 and len(set(a.holdout.tolist())) == 20
    c = calibration_split(100, 30, 20, seed=5)
    assert not torch.equal(a.build, c.build)
    # The held-out part is disjoint from every smaller build too (a prefix of the build part).
    assert calibration_split(100, 10, 20, seed=4).holdout.tolist() == a.holdout.tolist()


def test_build_part_is_what_fuse_draws_with_the_same_seed() -> None:
    ds = Dataset(x=torch.arange(200.0)[:, None], y=None, name="toy:train")
    got = split_dataset(ds, 50, 40, seed=3)
    for n in (2, 17, 50):
        assert torch.equal(got.x_build[:n], calibration_inputs(ds, n, 3))
    assert not set(got.x_build[:, 0].tolist()) & set(got.x_holdout[:, 0].tolist())
    assert got.y_holdout is None


def test_split_for_a_rebuild_extends_the_build_part_as_fuse_draws_it() -> None:
    """With ``rebuild`` the build part runs on to that many samples (what ``fuse --samples
    rebuild`` draws), its first ``build`` unchanged and still disjoint from the held-out part."""
    plain, longer = calibration_split(100, 30, 20, seed=4), calibration_split(100, 30, 20, seed=4, rebuild=90)
    assert len(longer.build) == 90 and torch.equal(longer.build[:30], plain.build)
    assert torch.equal(longer.holdout, plain.holdout) and set(longer.build.tolist()) & set(longer.holdout.tolist())
    ds = Dataset(x=torch.arange(100.0)[:, None], y=None, name="toy:train")
    assert torch.equal(split_dataset(ds, 30, 20, 4, rebuild=90).x_build, calibration_inputs(ds, 90, 4))
    # The rebuild goes to the usual calibration count, when the search built from fewer.
    assert rebuild_size(100, 30, 90) == 90 and rebuild_size(60, 30, 90) == 60
    assert rebuild_size(100, 30, 30) is None and rebuild_size(100, 30, 20) is None
    with pytest.raises(DataError, match="rebuild from 101"):
        calibration_split(100, 30, 20, 4, rebuild=101)


def test_split_refuses_a_test_split_and_too_few_samples() -> None:
    ds = Dataset(x=torch.zeros(100, 2), y=torch.zeros(100, dtype=torch.long), name="mnist:test")
    with pytest.raises(DataError, match="test split"):
        split_dataset(ds, 10, 10, 0)
    with pytest.raises(DataError, match="need 120"):
        calibration_split(100, 60, 60, 0)
    with pytest.raises(DataError, match="at least 2"):
        calibration_split(100, 1, 10, 0)


# --- scoring ---------------------------------------------------------------------------------


def test_the_ensemble_itself_scores_best() -> None:
    gen = torch.Generator().manual_seed(0)
    parents = [torch.randn(300, 7, generator=gen) * 3 for _ in range(3)]
    weights = [0.2, 0.5, 0.3]
    ref = make_reference(parents, weights, "kl")
    own = score_outputs(torch.log(ref.target), ref)
    assert own["kl"] == pytest.approx(0.0, abs=1e-12) and own["agreement"] == 1.0
    others = [*parents, torch.randn(300, 7, generator=gen), sum(parents) / 3]
    for z in others:
        assert score_outputs(z, ref)["objective"] < own["objective"]
        assert kl_to_reference(z, ref.target) > 0
    # Embeddings: the weighted mean output agrees perfectly with itself, the parents less.
    cos_ref = make_reference(parents, weights, "cosine")
    assert score_outputs(ensemble_mean(parents, weights), cos_ref)["cosine"] == pytest.approx(1.0)
    assert all(cosine_agreement(z, cos_ref.target) < 1 - 1e-3 for z in parents)


def test_kl_is_scored_at_the_best_temperature() -> None:
    """A fusion whose logits are the ensemble's up to a scale scores as the ensemble does (KL 0 at
    the temperature undoing the scale); the score never exceeds the plain KL, and the minimum
    found is the grid's."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(500, 6, generator=gen) * 2
    ref = make_reference([z], [1.0], "kl")
    for scale in (0.25, 1.0, 3.0):
        got = score_outputs(z * scale, ref)
        assert got["kl"] == pytest.approx(0.0, abs=1e-9) and got["temperature"] == pytest.approx(scale, rel=1e-6)
        assert got["kl_at_1"] >= got["kl"]
    noisy = z * 0.5 + torch.randn(500, 6, generator=gen)
    kl, temperature, plain = tempered_kl(noisy, ref.target)
    assert plain == pytest.approx(kl_to_reference(noisy, ref.target)) and plain > kl
    grid = min(kl_to_reference(noisy / t, ref.target) for t in torch.logspace(-1, 1, 2001).tolist())
    assert kl <= grid + 1e-9 and kl == pytest.approx(grid, abs=1e-6) and abs(temperature - 1) > 0.1
    assert kl_to_reference(noisy / temperature, ref.target) == pytest.approx(kl)


def test_ensemble_probs_are_the_weighted_softmax_average() -> None:
    z = [torch.tensor([[0.0, 0.0]]), torch.tensor([[10.0, -10.0]])]
    p = ensemble_probs(z, [3, 1])
    assert torch.allclose(p, 0.75 * torch.tensor([[0.5, 0.5]]).double() + 0.25 * torch.softmax(z[1].double(), 1))


def test_accuracy_scoring_uses_labels_and_breaks_ties_by_kl() -> None:
    labels = torch.tensor([0, 1, 1, 0])
    parents = [torch.tensor([[2.0, 0], [0, 2], [0, 2], [0, 2]])]
    ref = make_reference(parents, [1.0], "accuracy", labels)
    confident = score_outputs(torch.tensor([[9.0, 0], [0, 9], [0, 9], [9, 0]]), ref)
    assert confident["accuracy"] == 1.0
    close = score_outputs(parents[0] + torch.tensor([[0.1, 0], [0, 0], [0, 0], [0, 0]]), ref)
    far = score_outputs(parents[0] + torch.tensor([[0, 0], [1.5, 0], [0, 0], [0, 0]]), ref)
    assert close["accuracy"] == far["accuracy"] == 0.75 and close["objective"] > far["objective"]
    with pytest.raises(DataError, match="labels"):
        make_reference(parents, [1.0], "accuracy")
    with pytest.raises(ClafuseError, match="unknown scoring"):
        make_reference(parents, [1.0], "mse")


# --- refit -----------------------------------------------------------------------------------


def test_refit_linear_recovers_an_exact_softmax_target() -> None:
    """Soft targets that a Linear head produces exactly are fitted back to that head (up to the
    per-sample shift softmax ignores: rows of the weights centred, the bias centred)."""
    net = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 4))
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(0))
    assert last_linear(net) == "2"
    h = record_inputs(net, "2", x)
    assert torch.allclose(h, torch.relu(net[0](x)).detach())
    w, b = torch.randn(4, 9), torch.randn(4)
    target = torch.softmax(h @ w.T + b, -1)
    fitted = refit_linear(net, "2", h, target, ridge=0.0)
    centred = lambda t: t - t.mean(0, keepdim=True)  # noqa: E731
    assert torch.allclose(centred(fitted[2].weight), centred(w), atol=1e-3)
    assert torch.allclose(centred(fitted[2].bias), centred(b), atol=1e-3)
    assert torch.allclose(torch.softmax(fitted(x), -1), target, atol=1e-5)
    assert not torch.allclose(net[2].weight, w, atol=1e-2), "the input module must not change"
    # The ridge pulls towards the current head: a huge one leaves it where it was.
    kept = refit_linear(net, "2", h, target, ridge=1e9)
    assert torch.allclose(kept[2].weight, net[2].weight, atol=1e-5)
    with pytest.raises(ClafuseError, match="not a Linear"):
        refit_linear(net, "1", h, target, 0.0)
    with pytest.raises(ClafuseError, match="do not fit"):
        refit_linear(net, "2", h[:, :5], target, 0.0)
    with pytest.raises(ClafuseError, match="class probabilities"):
        refit_linear(net, "2", h, torch.log(target), 0.0)


def test_refit_to_a_models_own_predictions_keeps_its_head() -> None:
    """The soft-target fit's optimum, when the target is what the head already predicts, is that
    head (the cross-entropy is minimal there and the ridge term is zero): the solver must find it."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3))
    x = torch.randn(300, 5)
    with torch.no_grad():
        own = torch.softmax(net(x), -1)
    for ridge in (0.0, 1e-2):
        kept = refit_head(net, x, own, ridge=ridge)
        assert torch.allclose(torch.softmax(kept(x), -1), own, atol=1e-5)
        if ridge > 0:
            assert torch.allclose(kept[2].weight, net[2].weight, atol=1e-4)
            assert torch.allclose(kept[2].bias, net[2].bias, atol=1e-4)


def test_refit_reduces_kl_to_the_ensemble_on_held_out_data(pair, data) -> None:
    deep, shallow = pair
    parents = [module(deep), module(shallow)]
    maps = mapping_alternatives(deep, shallow, data.x_build, 1)
    builder = PlanBuilder(deep, [Alternatives(shallow, maps, deeper=False)], data.x_build)
    with torch.no_grad():
        teacher = ensemble_probs([p(data.x_build) for p in parents], [1, 1])
        ref = make_reference([p(data.x_holdout) for p in parents], [1, 1])
    kl = {}
    for correction, weights in (("none", (0.5, 0.5)), ("regress", (0.8, 0.2))):
        fused = builder(Candidate(weights, (0,), "average", correction, False, 600))
        refit = refit_head(fused, data.x_build, teacher)
        with torch.no_grad():
            kl[correction] = (kl_to_reference(fused(data.x_holdout), ref.target),
                              kl_to_reference(refit(data.x_holdout), ref.target))
    # Uncorrected averaging is off and the refit recovers part of it; the layer-wise regression at
    # weights 0.8/0.2 fits the logits to that mix, and the refit moves them to the ensemble's
    # (scored on held-out samples, not used to fit).
    assert kl["none"][1] < 0.85 * kl["none"][0]
    assert kl["regress"][1] < 0.85 * kl["regress"][0]


# --- builders --------------------------------------------------------------------------------


@pytest.mark.parametrize("deep_is_target", [True, False])
def test_plan_builder_equals_a_plain_fusion_bit_for_bit(pair, data, deep_is_target: bool) -> None:
    """Candidates reuse recordings, plans and moved tensors, yet each is exactly what the engine
    gives for the same settings on its own, in any order of candidates."""
    deep, shallow = pair
    maps = mapping_alternatives(deep, shallow, data.x_build[:300], 3)
    target, source = (deep, shallow) if deep_is_target else (shallow, deep)
    builder = PlanBuilder(target, [Alternatives(source, maps, deeper=not deep_is_target)], data.x_build)
    candidates = [Candidate((0.5, 0.5), (0,), "average", "regress", False, 300),
                  Candidate((0.3, 0.7), (1,), "keep", "repair", False, 200),
                  Candidate((0.6, 0.4), (2,), "average", "none", False, 300),
                  Candidate((0.9, 0.1), (0,), "keep", "regress", False, 300),
                  Candidate((0.5, 0.5), (0,), "average", "regress", False, 300)]
    for c in candidates:
        ours = builder.outcome(c).state_dict
        direct = ENGINES["network"](target, [Source(source, maps[c.mappings[0]], not deep_is_target)],
                                    engine_weights(c.weights), data.x_build[:c.samples],
                                    FusionSettings(inserted=c.inserted, correction=c.correction))
        assert ours.keys() == direct.state_dict.keys()
        for key in ours:
            assert torch.equal(ours[key], direct.state_dict[key]), (c, key)
    # One recording of the target per size (and per kind: sites in full for a regression, else
    # their moments) and one balanced, recorded source per mapping, size and kind.
    assert sorted(builder._anchors) == [(200, False), (300, False), (300, True)] and len(builder._pairs) == 3
    # Another mapping really gives another network.
    built = builder.outcome(candidates[0]).state_dict
    other = builder.outcome(candidates[0].with_(mappings=(1,))).state_dict
    assert any(not torch.equal(built[k], other[k]) for k in built)


def test_plan_builder_refits_the_head_to_the_ensemble(pair, data) -> None:
    deep, shallow = pair
    maps = mapping_alternatives(deep, shallow, data.x_build, 1)
    builder = PlanBuilder(deep, [Alternatives(shallow, maps, deeper=False)], data.x_build)
    c = Candidate((0.7, 0.3), (0,), "average", "regress", True, 400)
    refit = builder(c)
    plain = builder(c.with_(refit=False))
    teacher = ensemble_teacher([module(deep), module(shallow)], data.x_build[:400])
    expected = refit_head(plain, data.x_build[:400], teacher)
    for key, value in refit.state_dict().items():
        assert torch.equal(value, expected.state_dict()[key]), key
    head = last_linear(refit)
    assert not torch.equal(refit.state_dict()[f"{head}.weight"], plain.state_dict()[f"{head}.weight"])
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in refit.state_dict().items() if not k.startswith(head))


# --- the search ------------------------------------------------------------------------------


class Mixer(nn.Module):
    """A stand-in fused network: logits = w0 * first parent's + w1 * second's, plus a
    per-candidate disturbance (rank of the mapping, the correction)."""

    def __init__(self, parents, c: Candidate) -> None:
        super().__init__()
        self.parents, self.c = parents, c
        self.head = nn.Linear(CLASSES, CLASSES)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(CLASSES) * (1 + 0.3 * c.mappings[0]))
            self.head.bias.fill_(0.0 if c.correction == "regress" else 0.5)

    def forward(self, x):
        return self.head(sum(w * p(x) for w, p in zip(self.c.weights, self.parents)))


def test_search_with_a_count_budget_returns_the_best_candidate_and_its_table(pair, data) -> None:
    parents = [module(m) for m in pair]
    built: list[Candidate] = []

    def build(c: Candidate) -> nn.Module:
        built.append(c)
        return Mixer(parents, c)

    start = Candidate((0.9, 0.1), (2,), "average", "none", False, 600)
    seen = []
    result = search_fusion(build, parents, data, start, mapping_counts=[3],
                           options=SearchOptions(budget=Budget(candidates=12)), progress=seen.append)
    assert len(result.table) == 12 and result.stopped == "budget (candidates)"
    assert seen == result.table and [r["index"] for r in result.table] == list(range(12))
    assert result.table[0]["stage"] == "start" and result.table[0]["weights"] == [0.9, 0.1]
    best = max(result.table, key=lambda r: r["objective"])
    assert result.score["objective"] == best["objective"] and result.best.weights == tuple(best["weights"])
    assert result.best.refit == best["refit"] and result.best.correction == best["correction"]
    keys = [(tuple(r["weights"]), tuple(r["mappings"]), r["inserted"], r["correction"], r["refit"], r["samples"])
            for r in result.table]
    assert len(set(keys)) == len(keys), "a candidate was scored twice"
    assert built == [Candidate(*k) for k in keys], "each candidate is built once, head refit included"
    assert result.best.weights != start.weights and result.score["objective"] > result.table[0]["objective"]
    # The returned module is the chosen one: it scores what the table says.
    ref = make_reference([p(data.x_holdout) for p in parents], [1, 1])
    with torch.no_grad():
        assert score_outputs(result.module(data.x_holdout), ref)["kl"] == pytest.approx(result.score["kl"])
    assert result.references["ensemble"]["kl"] == pytest.approx(0.0, abs=1e-9)


def test_search_converges_on_a_real_tiny_pair_and_beats_its_start(pair, data) -> None:
    deep, shallow = pair
    parents = [module(deep), module(shallow)]
    maps = mapping_alternatives(deep, shallow, data.x_build, 2)
    builder = PlanBuilder(deep, [Alternatives(shallow, maps, deeper=False)], data.x_build)
    start = Candidate((0.5, 0.5), (0,), "average", "regress", False, 300)
    options = SearchOptions(budget=Budget(candidates=200), samples=(600,), mappings=2)
    result = search_fusion(builder, parents, data, start, mapping_counts=[len(maps)], options=options)
    assert result.stopped == "converged"
    assert result.score["objective"] >= result.table[0]["objective"]
    assert result.score["objective"] == max(r["objective"] for r in result.table)
    stages = {r["stage"] for r in result.table}
    assert {"start", "refit", "weights", "mappings", "inserted", "correction", "samples"} <= stages
    assert {r["samples"] for r in result.table} == {300, 600}


def test_search_rebuilds_its_choice_from_more_samples(pair, data) -> None:
    """``rebuild``: the best-scoring candidate is built once more from that many build samples and
    that fusion is returned (unscored); the table and the best are as without it."""
    deep, shallow = pair
    parents = [module(deep), module(shallow)]
    maps = mapping_alternatives(deep, shallow, data.x_build, 2)
    start = Candidate((0.5, 0.5), (0,), "average", "regress", False, 200)

    def run(rebuild: int | None):
        builder = PlanBuilder(deep, [Alternatives(shallow, maps, deeper=False)], data.x_build)
        options = SearchOptions(budget=Budget(candidates=6), mappings=2, rebuild=rebuild)
        return search_fusion(builder, parents, data, start, mapping_counts=[len(maps)], options=options)

    plain, rebuilt = run(None), run(600)
    untimed = lambda table: [{k: v for k, v in r.items() if k != "seconds"} for r in table]  # noqa: E731
    assert plain.chosen == plain.best and rebuilt.best == plain.best and untimed(rebuilt.table) == untimed(plain.table)
    assert rebuilt.chosen == plain.best.with_(samples=600)
    assert all(r["samples"] == 200 for r in rebuilt.table), "candidates are scored as built from 200 samples"
    fresh = PlanBuilder(deep, [Alternatives(shallow, maps, deeper=False)], data.x_build)(rebuilt.chosen)
    with torch.no_grad():
        assert torch.equal(rebuilt.module(data.x_holdout), fresh(data.x_holdout))
        assert not torch.equal(rebuilt.module(data.x_holdout), plain.module(data.x_holdout))
    with pytest.raises(ClafuseError, match="1000 samples"):
        run(1000)


def test_search_accuracy_scoring_needs_labels(pair, data) -> None:
    parents = [module(m) for m in pair]
    unlabelled = SearchData(data.x_build, data.x_holdout, None)
    with pytest.raises(DataError, match="labels"):
        search_fusion(lambda c: Mixer(parents, c), parents, unlabelled,
                      Candidate((0.5, 0.5), (0,), "average", "regress", False, 100), mapping_counts=[1],
                      options=SearchOptions(scoring="accuracy"))


def test_search_starts_on_the_simplex(pair, data) -> None:
    parents = [module(m) for m in pair]
    with pytest.raises(ClafuseError, match="simplex"):
        search_fusion(lambda c: Mixer(parents, c), parents, data,
                      Candidate((1.0, 1.0), (0,), "average", "regress", False, 100), mapping_counts=[1])


def test_explicit_weights_mean_no_search() -> None:
    assert search_requested(False, None) is False
    assert search_requested(True, None) is True
    assert search_requested(False, [0.5, 0.5]) is False
    with pytest.raises(ClafuseError, match="--weights fixes the fusion"):
        search_requested(True, "0.3,0.7")


def test_budget_parsing() -> None:
    assert parse_budget("40") == Budget(candidates=40)
    assert parse_budget(7) == Budget(candidates=7)
    assert parse_budget("30s") == Budget(seconds=30.0)
    assert parse_budget("2m") == Budget(seconds=120.0)
    assert parse_budget(None).candidates is not None
    for bad in ("0", "-3", "1.5", "fast", "10h", ""):
        with pytest.raises(ClafuseError, match="--budget"):
            parse_budget(bad)


def test_weight_moves_stay_on_the_simplex() -> None:
    moves = weight_moves((0.5, 0.3, 0.2), 0.25)
    assert len(moves) == 6
    for w in moves:
        assert min(w) >= 0 and sum(w) == pytest.approx(1.0)
    assert (0.25, 0.55, 0.2) in moves and (0.7, 0.3, 0.0) in moves
    assert weight_moves((1.0, 0.0), 0.2) == [(0.8, 0.2)]


def test_fuse_command_repeats_the_choice() -> None:
    c = Candidate((0.35, 0.65), (1,), "average", "regress", True, 5000)
    text = fuse_command(c, "map.json", "fused.safetensors", mappings=[mapping_text("B", [[0, 2, 4]])])
    assert text == ("clafuse fuse --map map.json -o fused.safetensors --weights 0.35,0.65 --samples 5000 "
                    "--inserted average --correction regress --mapping B=0,2,4 --refit-head")
    plain = fuse_command(c.with_(refit=False), "m.json", "o.pt", target="shallow", mappings=[None])
    assert "--mapping" not in plain and "--refit-head" not in plain and "--target shallow" in plain
    # The target (align index 1) comes first in the candidate; --weights is in align order.
    assert "--weights 0.65,0.35 " in fuse_command(c, "m.json", "o.pt", align_order=[1, 0])
    assert np.isclose(sum(c.weights), 1.0)


def test_search_through_the_resnet_engine_with_a_head_refit() -> None:
    """Any family: the engine builder runs the residual engine per candidate and the refit finds
    the ResNet's ``fc`` head by itself."""
    import math

    from clafuse.arch.resnet import ResNetFamily, ResNetSpec

    family = ResNetFamily()

    def member(layers: list[int], seed: int) -> Member:
        spec = ResNetSpec(block="basic", layers=layers, widths=[4, 8], stem_width=4, stem="small", num_classes=3)
        gen = torch.Generator().manual_seed(seed)
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in family.build(spec).state_dict().items()}
        state = {}
        for key, shape in shapes.items():
            if key.endswith("num_batches_tracked"):
                state[key] = torch.tensor(0)
            elif key.endswith("running_var") or (len(shape) == 1 and key.endswith("weight")):
                state[key] = 0.5 + torch.rand(shape, generator=gen)
            elif len(shape) == 1:
                state[key] = 0.1 * torch.randn(shape, generator=gen)
            else:
                state[key] = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        return Member(family, spec, state)

    deep, shallow = member([2, 2], 1), member([1, 1], 2)
    gen = torch.Generator().manual_seed(0)
    data = SearchData(torch.randn(64, 3, 8, 8, generator=gen), torch.randn(32, 3, 8, 8, generator=gen))
    # Per stage the strided first block is pinned; the one alternative is the other second block.
    maps = [[[0], [0]]]
    build = PlanBuilder(deep, [Alternatives(shallow, maps, deeper=False)], data.x_build)
    parents = [family.instantiate(m.spec, m.state_dict) for m in (deep, shallow)]
    start = Candidate((0.5, 0.5), (0,), "keep", "regress", False, 64)
    result = search_fusion(build, parents, data, start, mapping_counts=[1],
                           options=SearchOptions(budget=Budget(candidates=5), corrections=("regress",)))
    assert len(result.table) == 5 and [r["stage"] for r in result.table[:2]] == ["start", "refit"]
    assert result.table[1]["refit"] is True and result.table[1]["kl"] != result.table[0]["kl"]
    assert result.score["objective"] == max(r["objective"] for r in result.table)
    assert set(result.module.state_dict()) == set(deep.state_dict)


def test_mapping_alternatives_from_a_map_keep_its_own_first_and_the_pins() -> None:
    from clafuse.align.mapfile import Alignment, GroupAlignment
    from clafuse.search.mappings import mapping_alternatives

    rng = np.random.default_rng(2)
    costs = [rng.random((3, 5)), rng.random((1, 3))]
    # The map holds a mapping that need not be the cheapest (as if chosen by hand or with ties).
    groups = [GroupAlignment(name="g0", cost=costs[0].tolist(), mapping=[0, 2, 4], total_cost=0.0),
              GroupAlignment(name="g1", cost=costs[1].tolist(), mapping=[2], total_cost=0.0)]
    alignment = Alignment(shallow=1, deep=0, groups=groups)
    alts = mapping_alternatives(alignment, 4, pin_first=True, pin_last=True, forced_first=[None, None])
    # Pinned at both ends, the middle layer has 3 places; the single layer keeps the last pin.
    assert alts[0] == [[0, 2, 4], [2]] and len(alts) == 3
    assert sorted(maps[0][1] for maps in alts) == [1, 2, 3]
    assert all(maps[0][0] == 0 and maps[0][2] == 4 and maps[1] == [2] for maps in alts)
    others = sorted(alts[1:], key=lambda m: float(costs[0][np.arange(3), m[0]].sum()))
    assert alts[1:] == others, "after the map's own, cheapest first"
    forced = mapping_alternatives(alignment, 10, pin_first=False, pin_last=True, forced_first=[None, True])
    # The map's own comes first as it is; the others follow the pins, a forced first pin winning.
    assert forced[0] == [[0, 2, 4], [2]] and all(maps[1] == [0] for maps in forced[1:])
    assert {tuple(maps[0]) for maps in forced[1:]} == {(a, b, 4) for a in range(4) for b in range(a + 1, 4)}


def test_holdout_size_leaves_the_build_part() -> None:
    from clafuse.search.split import holdout_size

    assert holdout_size(50_000, 2000) == 2000
    assert holdout_size(1500, 1000) == 500
    with pytest.raises(DataError, match="fewer --samples"):
        holdout_size(1001, 1000)
