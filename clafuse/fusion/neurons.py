"""Neuron-level pieces of fusion: ground costs between two sets of units, and moving a tensor's
axis from one network's units onto another's through a transport plan."""

from __future__ import annotations

import numpy as np
import torch

MAX_FEATURES = 200_000
MAX_POSITIONS = 64
"""Spatial positions per feature map kept for the activation signal (evenly spaced, stored in
float16): the neuron costs still see thousands of values per channel, while recording every
layer's activations costs a fraction of the memory. (16 positions lost 3.5 points of one-shot
accuracy without correction on the Fashion-MNIST ResNet pair; 64 matched full resolution.)"""


def neuron_features(h: torch.Tensor) -> torch.Tensor:
    """(width, D) matrix: each neuron's (or channel's) responses over the samples (and positions)."""
    if h.dim() > 2:
        return h.transpose(0, 1).flatten(1)
    return h.T


def reduce_map(v: torch.Tensor, max_positions: int | None = MAX_POSITIONS) -> torch.Tensor:
    """A feature map (N, C, H, W) with at most ``max_positions`` evenly spaced positions kept, as
    (N, C, positions), in float16; vectors stay as they are."""
    if v.dim() <= 2:
        return v
    v = v.flatten(2)
    if max_positions is not None and v.shape[2] > max_positions:
        keep = torch.linspace(0, v.shape[2] - 1, max_positions).round().long()
        v = v[:, :, keep]
    return v.to(torch.float16).contiguous()


def _standardise(f: torch.Tensor) -> torch.Tensor:
    """Rows of ``f`` with zero mean and unit variance (constant rows become zero), in one new tensor."""
    f = f - f.mean(1, keepdim=True)
    std = torch.linalg.vector_norm(f, dim=1, keepdim=True) / f.shape[1] ** 0.5
    return f.div_(std.clamp_min(1e-12)).masked_fill_(std <= 1e-12, 0.0)


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of ``a`` and ``b``: sqrt(|a|^2 + |b|^2 - 2 a.b), with no
    copies of the (possibly long) rows."""
    sq_a, sq_b = torch.linalg.vector_norm(a, dim=1) ** 2, torch.linalg.vector_norm(b, dim=1) ** 2
    return (a @ b.T).mul_(-2).add_(sq_a[:, None]).add_(sq_b[None, :]).clamp_(min=0).sqrt_()


def activation_ground_cost(h_src: torch.Tensor, h_tgt: torch.Tensor, ground: str = "correlation") -> torch.Tensor:
    """(n_src, n_tgt) distances between the neurons' activation vectors.

    Maps of different spatial size are compared through their per-sample channel means; long
    feature vectors are thinned to at most ``MAX_FEATURES`` evenly spaced entries (the same ones on
    both sides) to bound memory. ``correlation`` compares z-scored activations, ``euclidean`` raw
    ones.
    """
    if h_src.dim() > 2 and h_src.shape[2:] != h_tgt.shape[2:]:
        h_src, h_tgt = h_src.float().flatten(2).mean(-1), h_tgt.float().flatten(2).mean(-1)
    fs, ft = neuron_features(h_src), neuron_features(h_tgt)
    if fs.shape[1] > MAX_FEATURES:
        keep = torch.linspace(0, fs.shape[1] - 1, MAX_FEATURES).long()
        fs, ft = fs[:, keep], ft[:, keep]
    fs, ft = fs.double(), ft.double()
    if ground == "correlation":
        fs, ft = _standardise(fs), _standardise(ft)
    return _distances(fs, ft)


def with_tie_break(acts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """An activation cost with a weight cost added at a millionth of its scale: neurons silent on
    every calibration sample look alike, and their weights break the tie."""
    return acts + 1e-6 * acts.max().clamp_min(1e-12) * weights / weights.max().clamp_min(1e-12)


def row_distances(src: list[torch.Tensor], tgt: list[torch.Tensor], block: int = 1024) -> torch.Tensor:
    """(n_src, n_tgt) Euclidean distances between units described by row blocks (e.g. a layer's
    weight rows and its bias as one more column), as float64.

    Computed as sqrt(|a|^2 + |b|^2 - 2 a.b): the float32 dot products of ``block`` source rows at a
    time go into the float64 result, so wide layers need no copies of their weights and no second
    full-size matrix.
    """
    a_parts = [t.reshape(t.shape[0], -1).float() for t in src]
    b_parts = [t.reshape(t.shape[0], -1).float() for t in tgt]
    n_a, n_b = a_parts[0].shape[0], b_parts[0].shape[0]
    sq_a = sum(p.pow(2).sum(1, dtype=torch.float64) for p in a_parts)
    sq_b = sum(p.pow(2).sum(1, dtype=torch.float64) for p in b_parts)
    dist = torch.empty(n_a, n_b, dtype=torch.float64)
    for start in range(0, n_a, block):
        rows = torch.zeros(min(block, n_a - start), n_b)
        for a, b in zip(a_parts, b_parts):
            rows.addmm_(a[start:start + block], b.T)
        dist[start:start + block] = rows
    return dist.mul_(-2).add_(sq_a[:, None]).add_(sq_b[None, :]).clamp_(min=0).sqrt_()


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 tensors, else float32: half-precision weights are moved in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _move_along(t: torch.Tensor, plan, factor: int, dim: int) -> torch.Tensor:
    """``t`` with its axis ``dim`` (the plan's source side) replaced by the target side:
    ``out[..., j, ...] = factor * sum_i plan[i, j] * t[..., i, ...]``, computed in ``t``'s dtype.

    A sparse (exact) plan is applied by gathering and scatter-adding its non-zeros, so moving a
    wide layer costs about two copies of it; a dense (entropic) plan by a tensor contraction.
    """
    n_tgt = plan.shape[1]
    if isinstance(plan, np.ndarray):
        p = torch.as_tensor(plan).to(t.dtype, copy=True).mul_(factor)
        return torch.tensordot(t, p, dims=([dim], [0])).movedim(-1, dim).contiguous()
    coo = plan.tocoo()
    rows, cols = torch.from_numpy(coo.row.astype(np.int64)), torch.from_numpy(coo.col.astype(np.int64))
    shape = [1] * t.dim()
    shape[dim] = -1
    scale = torch.from_numpy(coo.data * factor).to(t.dtype).view(shape)
    if len(cols) == n_tgt and bool((torch.bincount(cols, minlength=n_tgt) == 1).all()):
        # Each target gets exactly one source (a permutation, or an injection): one gather.
        order = torch.argsort(cols)
        return t.index_select(dim, rows[order]).mul_(scale.index_select(dim, order))
    picked = t.index_select(dim, rows).mul_(scale)
    out_shape = list(t.shape)
    out_shape[dim] = n_tgt
    return torch.zeros(out_shape, dtype=t.dtype).index_add_(dim, cols, picked)


def move_axis(t: torch.Tensor, plan, dim: int, reads: bool) -> torch.Tensor:
    """``t``'s axis ``dim`` re-expressed in the target's units through ``plan`` (n_src x n_tgt).

    A read axis (a layer's inputs) gives each target unit the sum of the source units sent to it
    (plan scaled by n_src), which keeps the layer's output when matched units carry the same
    activation; an owned axis (rows, biases, norm vectors) gives it their plan-weighted average.
    An axis n_src * g long (a conv map flattened into a Linear's inputs) moves in groups of g.
    """
    n_src = plan.shape[0]
    factor = n_src if reads else plan.shape[1]
    w = t.to(_compute_dtype(t))
    if w.shape[dim] == n_src:
        return _move_along(w, plan, factor, dim).to(t.dtype)
    shape = list(w.shape)
    grouped = w.reshape(*shape[:dim], n_src, shape[dim] // n_src, *shape[dim + 1:])
    moved = _move_along(grouped, plan, factor, dim)
    return moved.reshape(*shape[:dim], -1, *shape[dim + 1:]).to(t.dtype)


def align_inputs(weight: torch.Tensor, plan) -> torch.Tensor:
    """Re-express ``weight``'s input side (dim 1) in the anchor's order through ``plan``."""
    return move_axis(weight, plan, 1, reads=True)


def align_outputs(t: torch.Tensor, plan) -> torch.Tensor:
    """Move per-neuron rows (dim 0) onto the anchor's neurons (plan-weighted averages)."""
    return move_axis(t, plan, 0, reads=False)


def transport_activations(z: torch.Tensor, plan) -> torch.Tensor:
    """A layer's activations (N, n_src, ...) as the anchor's neurons would see them (N, n_tgt, ...)."""
    return move_axis(z, plan, 1, reads=False)
