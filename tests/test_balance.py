"""Depth balancing: identity insertion is exact, merging folds layers exactly where ReLUs are inactive."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from clafuse.arch.base import Chain, ChainLayer
from clafuse.errors import ClafuseError
from clafuse.fusion.balance import identity_layer, insert_identities, merge_layers, relu_gates


TOL = dict(rtol=1e-5, atol=1e-5)


def mlp_chain(widths: list[int], bias: bool, gen: torch.Generator, nonneg: set[int] = frozenset(),
              scale: float = 1.0) -> Chain:
    """Random Linear chain ``widths[0] -> ... -> widths[-1]``; layers in ``nonneg`` get non-negative
    weights and biases (so their pre-activations are non-negative on non-negative inputs)."""
    layers = []
    for k, (i, o) in enumerate(zip(widths, widths[1:])):
        w = torch.randn(o, i, generator=gen) * scale / i ** 0.5
        b = torch.randn(o, generator=gen) * 0.1 if bias else None
        if k in nonneg:
            w = w.abs()
            b = b.abs() if b is not None else None
        layers.append(ChainLayer(weight=w, bias=b))
    layers[-1].relu = False
    return Chain(hidden=layers[:-1], classifier=layers[-1])


def conv_layer(c_in: int, c_out: int, gen: torch.Generator, k: int = 3, bias: bool = True, bn: bool = False,
               eps: float = 1e-5) -> ChainLayer:
    bn_params = None
    if bn:
        bn_params = {
            "weight": torch.rand(c_out, generator=gen) + 0.5,
            "bias": torch.randn(c_out, generator=gen) * 0.1,
            "running_mean": torch.randn(c_out, generator=gen) * 0.1,
            "running_var": torch.rand(c_out, generator=gen) + 0.5,
        }
    return ChainLayer(weight=torch.randn(c_out, c_in, k, k, generator=gen) / (c_in * k * k) ** 0.5,
                      bias=torch.randn(c_out, generator=gen) * 0.1 if bias else None,
                      bn=bn_params, bn_eps=eps, padding=k // 2)


def increasing_maps(n: int, m: int) -> list[list[int]]:
    return [list(c) for c in itertools.combinations(range(m), n)]


# --- insert_identities --------------------------------------------------------------------------


@pytest.mark.parametrize("shallow_bias", [True, False])
@pytest.mark.parametrize("deep_bias", [True, False])
def test_insert_identities_is_exact_for_every_mapping(shallow_bias: bool, deep_bias: bool) -> None:
    gen = torch.Generator().manual_seed(int(shallow_bias) * 2 + int(deep_bias))
    shallow = mlp_chain([12, 9, 7, 5, 4], shallow_bias, gen)  # 3 hidden layers
    deep = mlp_chain([12, 6, 6, 6, 6, 6, 4], deep_bias, gen)  # 5 hidden layers (only shapes matter)
    x = torch.randn(64, 12, generator=gen)
    x_pos = x.abs()
    want, want_pos = shallow(x), shallow(x_pos)
    for mapping in increasing_maps(3, 5):
        balanced = insert_identities(shallow, mapping, deep)
        assert len(balanced.hidden) == len(deep.hidden)
        assert balanced.classifier is shallow.classifier
        width = 12
        for j, layer in enumerate(balanced.hidden):
            if j in mapping:
                assert layer is shallow.hidden[mapping.index(j)] and not layer.inserted
            else:
                assert layer.inserted and layer.relu
                # The identity keeps its predecessor's width and follows the deep layer's bias-ness.
                assert layer.weight.shape == (width, width)
                assert torch.equal(layer.weight, torch.eye(width))
                assert (layer.bias is not None) == deep_bias
                if deep_bias:
                    assert torch.equal(layer.bias, torch.zeros(width))
            width = layer.width
        # Non-negative inputs: exact whatever the mapping.
        torch.testing.assert_close(balanced(x_pos), want_pos, **TOL)
        if mapping[0] == 0:
            # First layer real: the identities only ever see post-ReLU inputs, exact on any input.
            torch.testing.assert_close(balanced(x), want, **TOL)
        else:
            # An identity before the first real layer applies a ReLU to the raw inputs.
            assert not torch.allclose(balanced(x), want, **TOL)


def test_insert_identities_with_nothing_to_insert_is_the_same_chain() -> None:
    gen = torch.Generator().manual_seed(5)
    shallow = mlp_chain([8, 5, 5, 3], True, gen)
    deep = mlp_chain([8, 4, 4, 3], True, gen)
    balanced = insert_identities(shallow, [0, 1], deep)
    assert all(a is b for a, b in zip(balanced.hidden, shallow.hidden))
    assert not any(layer.inserted for layer in balanced.hidden)


@pytest.mark.parametrize("mapping", [[0, 0, 1], [2, 1, 3], [0, 1, 5], [0, 1], [0, 1, 2, 3], [-1, 1, 2]])
def test_insert_identities_rejects_invalid_mappings(mapping: list[int]) -> None:
    gen = torch.Generator().manual_seed(0)
    shallow = mlp_chain([6, 5, 5, 5, 2], True, gen)
    deep = mlp_chain([6, 5, 5, 5, 5, 5, 2], True, gen)
    with pytest.raises(ClafuseError, match="invalid layer mapping"):
        insert_identities(shallow, mapping, deep)


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_conv_identity_layer_is_exact_on_nonnegative_inputs(k: int, bn: bool, bias: bool) -> None:
    gen = torch.Generator().manual_seed(k)
    template = conv_layer(3, 4, gen, k=k, bias=bias, bn=bn, eps=1e-3 if bn else 1e-5)
    template.stride = 2  # the identity must not inherit a stride
    ident = identity_layer(6, template)
    assert ident.is_conv and ident.inserted and ident.relu
    assert ident.weight.shape == (6, 6, k, k)
    assert ident.stride == 1 and ident.padding == k // 2
    assert (ident.bias is not None) == bias
    assert (ident.bn is not None) == bn
    if bn:
        assert ident.bn_eps == template.bn_eps
    x = torch.rand(5, 6, 7, 9, generator=gen) * 3
    chain = Chain(hidden=[ident], classifier=ChainLayer(torch.zeros(1, 6 * 7 * 9), relu=False, flatten_before=True),
                  flatten_input=False)
    pre = chain.pre_activation(0, x)
    out = chain.post_activation(0, pre)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x, **TOL)


def test_linear_identity_layer_copies_the_template_kind() -> None:
    gen = torch.Generator().manual_seed(0)
    ident = identity_layer(5, ChainLayer(weight=torch.randn(3, 7, generator=gen), bias=None))
    assert not ident.is_conv and ident.bias is None and ident.bn is None
    x = torch.rand(10, 5, generator=gen)
    torch.testing.assert_close(torch.relu(F.linear(x, ident.weight)), x, **TOL)


@pytest.mark.parametrize("bn", [False, True])
def test_insert_identities_into_a_conv_chain(bn: bool) -> None:
    gen = torch.Generator().manual_seed(11 + bn)
    h = w = 6

    def chain(widths: list[int]) -> Chain:
        hidden = [conv_layer(i, o, gen, bn=bn) for i, o in zip(widths, widths[1:])]
        classifier = ChainLayer(torch.randn(3, widths[-1] * h * w, generator=gen) / 10, torch.zeros(3),
                                relu=False, flatten_before=True)
        return Chain(hidden, classifier, flatten_input=False)

    shallow = chain([2, 4, 5])
    deep = chain([2, 3, 3, 3, 3])
    x = torch.rand(8, 2, h, w, generator=gen)
    want = shallow(x)
    for mapping in increasing_maps(2, 4):
        balanced = insert_identities(shallow, mapping, deep)
        assert len(balanced.hidden) == 4
        torch.testing.assert_close(balanced(x), want, **TOL)


# --- merge_layers -------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_merge_with_unit_gates_is_exact_when_folded_relus_are_inactive(bias: bool) -> None:
    gen = torch.Generator().manual_seed(int(bias))
    widths = [10, 9, 8, 7, 6, 5, 3]  # 5 hidden layers
    x = torch.rand(50, 10, generator=gen)  # non-negative, in case the first layer is folded
    gates_one = [torch.ones(o) for o in widths[1:-1]]
    tried = 0
    for n in (1, 2, 3, 4, 5):
        for mapping in increasing_maps(n, 5):
            folded = set(range(5)) - set(mapping)
            # Folded layers: non-negative weights and biases, so their pre-activations are
            # non-negative (their inputs are inputs or post-ReLU); kept layers are arbitrary.
            deep = mlp_chain(widths, bias, gen, nonneg=folded, scale=1.5)
            pre, _, _ = deep.forward_record(x)
            assert all(bool((pre[j] >= 0).all()) for j in folded)
            merged = merge_layers(deep, mapping, gates_one)
            assert len(merged.hidden) == n
            assert [layer.width for layer in merged.hidden] == [widths[j + 1] for j in mapping]
            assert merged.hidden[0].in_width == widths[0]
            assert merged.classifier.width == widths[-1] and not merged.classifier.relu
            assert all((layer.bias is not None) == bias for layer in merged.layers)
            torch.testing.assert_close(merged(x), deep(x), **TOL)
            tried += 1
    assert tried == 31


def test_merge_is_not_exact_when_a_folded_relu_is_active() -> None:
    """Sanity check of the test above: with sign-mixed folded layers, unit gates are wrong."""
    gen = torch.Generator().manual_seed(3)
    deep = mlp_chain([10, 9, 8, 3], True, gen)
    x = torch.randn(50, 10, generator=gen)
    pre, _, _ = deep.forward_record(x)
    assert bool((pre[1] < 0).any())
    merged = merge_layers(deep, [0], [torch.ones(9), torch.ones(8)])
    assert not torch.allclose(merged(x), deep(x), **TOL)


def test_merge_uses_the_gates_as_the_folded_relu() -> None:
    gen = torch.Generator().manual_seed(7)
    deep = mlp_chain([6, 5, 4, 3], True, gen)
    (w0, b0), (w1, b1), (w2, b2) = [(l.weight.double(), l.bias.double()) for l in deep.layers]
    g0, g1 = torch.rand(5, generator=gen), torch.rand(4, generator=gen)
    # Fold layer 0 into layer 1: W1 diag(g0) W0, bias W1 (g0 * b0) + b1.
    merged = merge_layers(deep, [1], [g0, g1])
    assert len(merged.hidden) == 1
    torch.testing.assert_close(merged.hidden[0].weight.double(), w1 @ (g0.double()[:, None] * w0), **TOL)
    torch.testing.assert_close(merged.hidden[0].bias.double(), w1 @ (g0.double() * b0) + b1, **TOL)
    torch.testing.assert_close(merged.classifier.weight, deep.classifier.weight)
    # Fold layer 1 into the classifier.
    merged = merge_layers(deep, [0], [g0, g1])
    torch.testing.assert_close(merged.classifier.weight.double(), w2 @ (g1.double()[:, None] * w1), **TOL)
    torch.testing.assert_close(merged.classifier.bias.double(), w2 @ (g1.double() * b1) + b2, **TOL)
    torch.testing.assert_close(merged.hidden[0].weight, deep.hidden[0].weight)


def test_relu_gates_are_the_fraction_of_active_samples() -> None:
    gen = torch.Generator().manual_seed(2)
    deep = mlp_chain([6, 5, 4, 3], True, gen)
    x = torch.randn(40, 6, generator=gen)
    gates = relu_gates(deep, x)
    pre, _, _ = deep.forward_record(x)
    assert len(gates) == 2
    for g, z in zip(gates, pre):
        assert g.shape == (z.shape[1],)
        torch.testing.assert_close(g.double(), (z > 0).double().mean(0))
        assert bool(((g >= 0) & (g <= 1)).all())


def test_merge_refuses_conv_and_batchnorm_chains() -> None:
    gen = torch.Generator().manual_seed(0)
    conv = Chain([conv_layer(2, 3, gen), conv_layer(3, 3, gen)],
                 ChainLayer(torch.randn(2, 3 * 16), relu=False, flatten_before=True), flatten_input=False)
    with pytest.raises(ClafuseError, match="--balance add"):
        merge_layers(conv, [1], [torch.ones(3), torch.ones(3)])
    bn_chain = mlp_chain([6, 5, 4, 3], True, gen)
    bn_chain.hidden[0].bn = {"weight": torch.ones(5), "bias": torch.zeros(5), "running_mean": torch.zeros(5),
                             "running_var": torch.ones(5)}
    with pytest.raises(ClafuseError, match="--balance add"):
        merge_layers(bn_chain, [1], [torch.ones(5), torch.ones(4)])


@pytest.mark.parametrize("mapping", [[1, 1], [2, 0], [0, 3], [-1, 0]])
def test_merge_rejects_invalid_mappings(mapping: list[int]) -> None:
    gen = torch.Generator().manual_seed(0)
    deep = mlp_chain([6, 5, 4, 4, 3], True, gen)
    with pytest.raises(ClafuseError, match="invalid layer mapping"):
        merge_layers(deep, mapping, [torch.ones(5), torch.ones(4), torch.ones(4)])
