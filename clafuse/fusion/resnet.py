"""The fusion engine for residual networks (the ``resnet`` family).

Blocks are balanced rather than layers. A source shallower than the target gets identity blocks
(their residual branch outputs zero) where the target has unmatched blocks; a deeper source has its
unmatched blocks dropped (a residual net stays valid without them). Every layer that writes into a
stage's residual stream (the block outputs and the downsample) shares that stream's transport plan,
which is carried through inserted identity blocks instead of being solved on their all-zero branch
activations. Each source is transported into the target's channel order on its own; the results
are then averaged key by key over the models that really have the block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch

from clafuse.arch.resnet import ResNetSpec
from clafuse.errors import ClafuseError
from clafuse.fusion.engines import FusionOutcome, Member, Source, register_engine
from clafuse.fusion.otfusion import (FusionSettings, activation_ground_cost, align_inputs, align_outputs,
                                     with_tie_break)
from clafuse.fusion.transport import transport_plan
from clafuse.io.lazy import LazyStateDict
from clafuse.memory import release_memory

BN_PARAMS = ("weight", "bias", "running_mean", "running_var")
MAX_POSITIONS = 64
"""Spatial positions per feature map kept for the activation signal (evenly spaced, stored in
float16): the neuron costs still see thousands of values per channel, while recording every
block's activations costs a fraction of the memory. (16 positions lost 3.5 points of one-shot
accuracy without correction on the Fashion-MNIST ResNet pair; 64 matched full resolution.)"""


def _cost_rows(rows_src: torch.Tensor, rows_tgt: torch.Tensor) -> torch.Tensor:
    return torch.cdist(rows_src.flatten(1).float(), rows_tgt.flatten(1).float()).double()


def _bn_rows(sd: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return torch.stack([sd[f"{prefix}.{leaf}"].double() for leaf in ("weight", "bias")], 1)


def _moved(weight: torch.Tensor, plan_in: np.ndarray | None, plan_out: np.ndarray | None) -> torch.Tensor:
    if plan_in is not None:
        weight = align_inputs(weight, plan_in)
    if plan_out is not None:
        weight = align_outputs(weight, plan_out)
    return weight


def _identity_shortcut(width: int) -> torch.Tensor:
    return torch.eye(width)[:, :, None, None]


@dataclass
class _Recorded:
    """A network's float32 weights and, with calibration data, its activations and logits."""

    member: Member
    sd: dict[str, torch.Tensor]
    dtypes: dict[str, torch.dtype]
    rec: dict[str, torch.Tensor] | None = None
    logits: torch.Tensor | None = None

    @classmethod
    def of(cls, member: Member, x: torch.Tensor | None) -> "_Recorded":
        sd, dtypes = {}, {}
        for k, v in member.state_dict.items():
            sd[k], dtypes[k] = v.float(), v.dtype
        if x is None:
            return cls(member, sd, dtypes)
        rec, logits = member.family.record(member.spec, sd, x, max_positions=MAX_POSITIONS, dtype=torch.float16)
        return cls(member, sd, dtypes, rec, logits)


@dataclass
class _Transported:
    """One source in the target's layout: its values for the target keys it has a counterpart for,
    and, per target BatchNorm, the source BatchNorm (and plan) it was moved from."""

    moved: dict[str, torch.Tensor] = field(default_factory=dict)
    bn_links: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)


def _check_compatible(ts: ResNetSpec, os_: ResNetSpec) -> None:
    if ts.block != os_.block or len(ts.layers) != len(os_.layers):
        raise ClafuseError(f"cannot fuse a {ts.block} ResNet with {len(ts.layers)} stages and a {os_.block} "
                           f"ResNet with {len(os_.layers)} stages")
    if ts.in_channels != os_.in_channels or ts.num_classes != os_.num_classes or ts.stem != os_.stem:
        raise ClafuseError("the ResNets differ in input channels, classes or stem")


def _block_pairs(source: Source) -> dict[tuple[int, int], tuple[int, int]]:
    """Target block (stage, index) -> the source block fused into it."""
    if source.deeper:
        return {(s, i): (s, j) for s, mapping in enumerate(source.mappings) for i, j in enumerate(mapping)}
    return {(s, j): (s, i) for s, mapping in enumerate(source.mappings) for i, j in enumerate(mapping)}


def _transport(target: _Recorded, other: _Recorded, pairs: dict[tuple[int, int], tuple[int, int]],
               settings: FusionSettings, consume: bool = False) -> _Transported:
    """Move ``other``'s weights into the target's channel order, stream by stream and block by block.
    With ``consume`` each source tensor is dropped from ``other`` once moved (each is moved once),
    so that the source and its moved copy are not both held in full."""
    ts, os_ = target.member.spec, other.member.spec
    t, o = target.sd, other.sd
    take = o.pop if consume else o.__getitem__
    use_acts = settings.signal == "activations"
    out = _Transported()

    def plan(key_o: str, key_t: str, rows_o: torch.Tensor, rows_t: torch.Tensor) -> np.ndarray:
        cost = _cost_rows(rows_o, rows_t)
        if use_acts:
            cost = with_tie_break(activation_ground_cost(other.rec[key_o], target.rec[key_t], settings.ground), cost)
        return transport_plan(cost, settings.solver, settings.reg, sparse=True)

    def move_bn(prefix_t: str, prefix_o: str, p: np.ndarray) -> None:
        for leaf in BN_PARAMS:
            out.moved[f"{prefix_t}.{leaf}"] = _moved(take(f"{prefix_o}.{leaf}"), None, p)
        out.bn_links[prefix_t] = (prefix_o, p)

    last_bn = "bn3" if ts.block == "bottleneck" else "bn2"
    p_stem = plan("stem", "stem", o["conv1.weight"], t["conv1.weight"])
    shared0 = not ts.has_downsample(0, 0) and not os_.has_downsample(0, 0)
    streams: list[np.ndarray] = []
    for s in range(len(ts.layers)):
        if s == 0 and shared0:
            streams.append(p_stem)
            continue
        p_in = p_stem if s == 0 else streams[s - 1]
        last_t, last_o = f"layer{s + 1}.{ts.layers[s] - 1}", f"layer{s + 1}.{os_.layers[s] - 1}"
        if os_.has_downsample(s, 0) and ts.has_downsample(s, 0):
            rows_o = align_inputs(o[f"layer{s + 1}.0.downsample.0.weight"], p_in)
            rows_t = t[f"layer{s + 1}.0.downsample.0.weight"]
        else:
            rows_o, rows_t = _bn_rows(o, f"{last_o}.{last_bn}"), _bn_rows(t, f"{last_t}.{last_bn}")
        streams.append(plan(f"{last_o}.out", f"{last_t}.out", rows_o, rows_t))
    if shared0:
        p_stem = streams[0]
    out.moved["conv1.weight"] = _moved(take("conv1.weight"), None, p_stem)
    move_bn("bn1", "bn1", p_stem)

    convs = ["conv1", "conv2", "conv3"] if ts.block == "bottleneck" else ["conv1", "conv2"]
    for (s, j), (so, jo) in sorted(pairs.items()):
        tname, oname = f"layer{s + 1}.{j}", f"layer{so + 1}.{jo}"
        p_in = streams[s] if j > 0 else (streams[s - 1] if s > 0 else p_stem)
        plan_in = p_in
        in_width = o[f"{oname}.conv1.weight"].shape[1]
        for c, conv in enumerate(convs):
            w_o = align_inputs(take(f"{oname}.{conv}.weight"), plan_in)
            if c == len(convs) - 1:
                plan_out = streams[s]
            else:
                plan_out = plan(f"{oname}.mid{c + 1}", f"{tname}.mid{c + 1}", w_o, t[f"{tname}.{conv}.weight"])
            out.moved[f"{tname}.{conv}.weight"] = align_outputs(w_o, plan_out)
            move_bn(f"{tname}.bn{c + 1}", f"{oname}.bn{c + 1}", plan_out)
            plan_in = plan_out
        if ts.has_downsample(s, j):
            if os_.has_downsample(so, jo):
                out.moved[f"{tname}.downsample.0.weight"] = _moved(take(f"{oname}.downsample.0.weight"), p_in,
                                                                   streams[s])
                move_bn(f"{tname}.downsample.1", f"{oname}.downsample.1", streams[s])
            else:
                # The source's block adds its input unchanged: an identity 1x1 conv with identity BN.
                width = in_width
                identity = {"weight": torch.ones(width), "bias": torch.zeros(width),
                            "running_mean": torch.zeros(width), "running_var": torch.full((width,), 1.0 - 1e-5)}
                out.moved[f"{tname}.downsample.0.weight"] = _moved(_identity_shortcut(width), p_in, streams[s])
                for leaf in BN_PARAMS:
                    out.moved[f"{tname}.downsample.1.{leaf}"] = _moved(identity[leaf], None, streams[s])
    out.moved["fc.weight"] = align_inputs(take("fc.weight"), streams[-1])
    out.moved["fc.bias"] = take("fc.bias")
    return out


def _block_of(key: str) -> str | None:
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0].startswith("layer") else None


@register_engine("resnet")
def fuse_resnets(target: Member, sources: list[Source], weights: list[float], x: torch.Tensor | None,
                 settings: FusionSettings) -> FusionOutcome:
    """Fuse ResNets into the target's architecture block by block; ``weights``: the target's first.

    A block only some models have is averaged over those models; with ``inserted="average"`` its
    residual branch is also scaled by their share of the total weight (as if averaged with the
    other models' identity blocks), with ``keep`` (the default) it is taken as they have it.
    """
    for source in sources:
        _check_compatible(target.spec, source.member.spec)
    if settings.signal == "activations" and x is None:
        raise ClafuseError("the activation signal needs calibration inputs")
    tgt = _Recorded.of(target, x)
    others = [_Recorded.of(source.member, x) for source in sources]
    repair = x is not None and settings.correction == "repair"
    moved = []
    for source, other in zip(sources, others):
        moved.append(_transport(tgt, other, _block_pairs(source), settings, consume=not repair))
        if not repair:  # only REPAIR needs the source's own weights again
            other.sd = {}
        release_memory()
    total = sum(weights)
    keep = settings.inserted in ("keep", None)
    last_bn = "bn3" if target.spec.block == "bottleneck" else "bn2"

    def contributors(key: str) -> list[tuple[int, float]]:
        return [(0, weights[0])] + [(i + 1, w) for i, (w, m) in enumerate(zip(weights[1:], moved)) if key in m.moved]

    def factor(key: str, real: float) -> float:
        block = _block_of(key)
        on_branch_end = block is not None and key.startswith(f"{block}.{last_bn}.") and key.rsplit(".", 1)[1] in ("weight", "bias")
        if not on_branch_end:
            return 1.0
        return 1.0 if keep and real > 0 else real / total

    mixing = []
    for _, _, name in target.spec.blocks():
        parts = dict(contributors(f"{name}.conv1.weight"))
        real = sum(parts.values())
        mixing.append([round(parts.get(i, 0.0) / real, 6) if real > 0 else float(i == 0) for i in range(len(weights))])

    # The target's weights were read for this fusion alone (a lazily opened checkpoint) and REPAIR
    # does not need them again: each is then replaced by its mix in place, and each source's
    # moved tensor freed once used, so that one copy of the network is in memory, not three.
    in_place = not repair and isinstance(target.state_dict, LazyStateDict)
    out: dict[str, torch.Tensor] = tgt.sd if in_place else {}
    for key in list(tgt.sd):
        value = tgt.sd[key]
        if not tgt.dtypes[key].is_floating_point:
            out[key] = value.to(tgt.dtypes[key])
            continue
        parts = contributors(key)
        real = sum(w for _, w in parts)
        mixed = value if in_place else value.clone()
        if real > 0:
            mixed.mul_(weights[0] / real)
            for i, w in parts[1:]:
                mixed.add_(moved[i - 1].moved.pop(key), alpha=w / real)
        out[key] = mixed.mul_(factor(key, real))
    release_memory()

    if x is not None and settings.bn_reset:
        out = reset_batchnorm_stats(target, out, x)
    if x is not None and settings.correction == "repair":
        out = _repair_batchnorm(target, tgt, others, moved, weights, out, x, factor)
    if x is not None and settings.correction == "regress":
        mixed_logits = sum(w * r.logits for w, r in zip(weights, [tgt, *others])) / total
        out = _refit_classifier(target, out, x, mixed_logits, settings.ridge)
    state = {k: v.to(tgt.dtypes[k]) for k, v in out.items()}
    return FusionOutcome(state, mixing)


@torch.no_grad()
def reset_batchnorm_stats(member: Member, state: dict[str, torch.Tensor], x: torch.Tensor,
                          batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Recompute every BatchNorm's running statistics of a network from calibration inputs
    (cumulative averages over batches of ``x``, the network in training mode)."""
    state = {k: v.clone() if k.endswith(("running_mean", "running_var", "num_batches_tracked")) else v
             for k, v in state.items()}
    model = member.family.instantiate(member.spec, state)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for start in range(0, len(x), batch_size):
        model(x[start:start + batch_size].float())
    model.eval()
    fresh = model.state_dict()
    return {k: fresh[k].detach() if k.endswith(("running_mean", "running_var")) else v for k, v in state.items()}


def _bn_output_stats(member: Member, state: Mapping[str, torch.Tensor], x: torch.Tensor,
                     names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and std of the named BatchNorms' outputs on ``x`` (eval mode)."""
    model = member.family.instantiate(member.spec, state)
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for name in names:
        def hook(_module: torch.nn.Module, _inp: object, output: torch.Tensor, name: str = name) -> None:
            f = output.transpose(0, 1).flatten(1).double()
            stats[name] = (f.mean(1), f.std(1, unbiased=False))
        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        model(x.float())
    for h in hooks:
        h.remove()
    return stats


def _repair_batchnorm(target: Member, tgt: _Recorded, others: list[_Recorded], moved: list[_Transported],
                      weights: list[float], state: dict[str, torch.Tensor], x: torch.Tensor,
                      factor) -> dict[str, torch.Tensor]:
    """REPAIR for BatchNorm networks: rescale and shift each fused BN's output channels, in network
    order, to the weighted mix of the models' matched channels' mean and std on ``x``."""
    names = [name for name, module in target.family.instantiate(target.spec, tgt.sd).named_modules()
             if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
    t_stats = _bn_output_stats(target, tgt.sd, x, names)
    o_stats = [_bn_output_stats(other.member, other.sd, x, sorted({p for p, _ in m.bn_links.values()}))
               for other, m in zip(others, moved)]
    state = dict(state)
    for t_name in names:
        parts = [(weights[0], t_stats[t_name])]
        for w, m, stats in zip(weights[1:], moved, o_stats):
            if t_name in m.bn_links:
                o_name, plan = m.bn_links[t_name]
                o_mean, o_std = stats[o_name]
                parts.append((w, (align_outputs(o_mean, plan), align_outputs(o_std, plan))))
        real = sum(w for w, _ in parts)
        if real <= 0:
            continue
        scale_to = factor(f"{t_name}.weight", real) / real
        want_mean = scale_to * sum(w * s[0] for w, s in parts)
        want_std = scale_to * sum(w * s[1] for w, s in parts)
        mean, std = _bn_output_stats(target, state, x, [t_name])[t_name]
        scale = torch.where(std > 1e-8, want_std / std.clamp_min(1e-8), torch.ones_like(std))
        state[f"{t_name}.weight"] = (state[f"{t_name}.weight"].double() * scale).float()
        state[f"{t_name}.bias"] = (scale * (state[f"{t_name}.bias"].double() - mean) + want_mean).float()
    return state


@torch.no_grad()
def _refit_classifier(member: Member, state: dict[str, torch.Tensor], x: torch.Tensor, target_logits: torch.Tensor,
                      ridge: float) -> dict[str, torch.Tensor]:
    """Least-squares refit of ``fc`` so that the fused features reproduce the models' mixed logits."""
    from clafuse.arch.base import ChainLayer
    from clafuse.fusion.otfusion import regress_layer

    rec, _ = member.family.record(member.spec, state, x, pooled=True)
    layer = ChainLayer(weight=state["fc.weight"], bias=state["fc.bias"], relu=False)
    fitted = regress_layer(layer, rec["pooled"], target_logits, ridge)
    return {**state, "fc.weight": fitted.weight, "fc.bias": fitted.bias}
