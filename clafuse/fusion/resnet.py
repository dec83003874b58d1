"""The fusion engine for residual networks (the ``resnet`` family).

Blocks are balanced rather than layers: with ``add`` the shallow net gets identity blocks (their
residual branch outputs zero), so the fused model has the deep architecture; with ``merge`` the
deep net's unmatched blocks are dropped (a residual net stays valid without them) and the fused
model has the shallow architecture. Every layer that writes into a stage's residual stream (the
block outputs and the downsample) shares that stream's transport plan, which is carried through
inserted identity blocks instead of being solved on their all-zero branch activations.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from clafuse.arch.resnet import ResNetSpec
from clafuse.errors import ClafuseError
from clafuse.fusion.engines import Member, PairResult, register_engine
from clafuse.fusion.otfusion import (FusionSettings, activation_ground_cost, align_inputs, align_outputs,
                                     with_tie_break)
from clafuse.fusion.transport import transport_plan

BN_PARAMS = ("weight", "bias", "running_mean", "running_var")


def _cost_rows(rows_src: torch.Tensor, rows_tgt: torch.Tensor) -> torch.Tensor:
    return torch.cdist(rows_src.flatten(1).float(), rows_tgt.flatten(1).float()).double()


def _bn_rows(sd: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return torch.stack([sd[f"{prefix}.{leaf}"].double() for leaf in ("weight", "bias")], 1)


class _Aligner:
    """Holds both networks' weights and activations and solves the plans between them."""

    def __init__(self, target: Member, other: Member, x: torch.Tensor | None, settings: FusionSettings) -> None:
        self.t_spec: ResNetSpec = target.spec
        self.o_spec: ResNetSpec = other.spec
        self.t = {k: v.float() for k, v in target.state_dict.items()}
        self.o = {k: v.float() for k, v in other.state_dict.items()}
        self.settings = settings
        self.acts = settings.signal == "activations"
        if self.acts and x is None:
            raise ClafuseError("the activation signal needs calibration inputs")
        if x is not None:
            self.t_rec, self.t_logits = target.family.record(self.t_spec, self.t, x)
            self.o_rec, self.o_logits = other.family.record(self.o_spec, self.o, x)

    def plan(self, act_key_o: str, act_key_t: str, rows_o: torch.Tensor, rows_t: torch.Tensor) -> np.ndarray:
        cost = _cost_rows(rows_o, rows_t)
        if self.acts:
            cost = with_tie_break(activation_ground_cost(self.o_rec[act_key_o], self.t_rec[act_key_t],
                                                         self.settings.ground), cost)
        return transport_plan(cost, self.settings.solver, self.settings.reg)


def _moved(weight: torch.Tensor, plan_in: np.ndarray | None, plan_out: np.ndarray | None) -> torch.Tensor:
    if plan_in is not None:
        weight = align_inputs(weight, plan_in)
    if plan_out is not None:
        weight = align_outputs(weight, plan_out)
    return weight


def _identity_shortcut(width: int) -> torch.Tensor:
    return torch.eye(width)[:, :, None, None]


@register_engine("resnet")
def fuse_resnet_pair(deep: Member, shallow: Member, mappings: list[list[int]], balance: str,
                     weights: tuple[float, float], x: torch.Tensor | None, settings: FusionSettings) -> PairResult:
    """Fuse two ResNets block by block; ``weights`` are (deep, shallow)."""
    if balance == "add":
        target, other, w_t, w_o, name = deep, shallow, weights[0], weights[1], "deep"
        pairs = {(s, mapping[i]): (s, i) for s, mapping in enumerate(mappings) for i in range(len(mapping))}
    elif balance == "merge":
        target, other, w_t, w_o, name = shallow, deep, weights[1], weights[0], "shallow"
        pairs = {(s, i): (s, mapping[i]) for s, mapping in enumerate(mappings) for i in range(len(mapping))}
    else:
        raise ClafuseError(f"unknown balance {balance!r}; choose from add, merge")
    ts, os_ = target.spec, other.spec
    if ts.block != os_.block or len(ts.layers) != len(os_.layers):
        raise ClafuseError(f"cannot fuse a {ts.block} ResNet with {len(ts.layers)} stages and a {os_.block} "
                           f"ResNet with {len(os_.layers)} stages")
    if ts.in_channels != os_.in_channels or ts.num_classes != os_.num_classes or ts.stem != os_.stem:
        raise ClafuseError("the two ResNets differ in input channels, classes or stem")
    total = w_t + w_o
    a, b = w_t / total, w_o / total
    al = _Aligner(target, other, x, settings)
    t, o = al.t, al.o
    out = dict(t)

    def mix(key: str, moved: torch.Tensor, ca: float = a, cb: float = b) -> None:
        out[key] = ca * t[key] + cb * moved

    pairs_bn: list[tuple[str, str | None, np.ndarray | None, float]] = []

    def mix_bn(prefix_t: str, prefix_o: str, plan: np.ndarray | None) -> None:
        for leaf in BN_PARAMS:
            mix(f"{prefix_t}.{leaf}", _moved(o[f"{prefix_o}.{leaf}"], None, plan))
        pairs_bn.append((prefix_t, prefix_o, plan, a))

    # The stem, and the plan of the stream it writes.
    stem_rows = (o["conv1.weight"], t["conv1.weight"])
    p_stem = al.plan("stem", "stem", *stem_rows)
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
            rows_o, rows_t = _bn_rows(o, f"{last_o}.bn{3 if ts.block == 'bottleneck' else 2}"), \
                _bn_rows(t, f"{last_t}.bn{3 if ts.block == 'bottleneck' else 2}")
        streams.append(al.plan(f"{last_o}.out", f"{last_t}.out", rows_o, rows_t))
    if shared0:
        p_stem = streams[0]
    out["conv1.weight"] = a * t["conv1.weight"] + b * _moved(o["conv1.weight"], None, p_stem)
    mix_bn("bn1", "bn1", p_stem)

    mixing: list[list[float]] = []
    convs = ["conv1", "conv2", "conv3"] if ts.block == "bottleneck" else ["conv1", "conv2"]
    for s, count in enumerate(ts.layers):
        for j in range(count):
            tname = f"layer{s + 1}.{j}"
            last_bn = f"{tname}.bn{len(convs)}"
            pair = pairs.get((s, j))
            if pair is None:
                keep = settings.inserted in ("keep", None) and a > 0
                scale = 1.0 if keep else a
                out[f"{last_bn}.weight"] = scale * t[f"{last_bn}.weight"]
                out[f"{last_bn}.bias"] = scale * t[f"{last_bn}.bias"]
                pairs_bn.extend((f"{tname}.bn{c + 1}", None, None, 1.0 if c < len(convs) - 1 else scale)
                                for c in range(len(convs)))
                mixing.append([scale, 1.0 - scale])
                continue
            oname = f"layer{pair[0] + 1}.{pair[1]}"
            p_in = streams[s] if j > 0 else (streams[s - 1] if s > 0 else p_stem)
            plan_in = p_in
            for c, conv in enumerate(convs):
                last = c == len(convs) - 1
                w_o = align_inputs(o[f"{oname}.{conv}.weight"], plan_in)
                if last:
                    plan_out = streams[s]
                else:
                    plan_out = al.plan(f"{oname}.mid{c + 1}", f"{tname}.mid{c + 1}", w_o, t[f"{tname}.{conv}.weight"])
                mix(f"{tname}.{conv}.weight", align_outputs(w_o, plan_out))
                mix_bn(f"{tname}.bn{c + 1}", f"{oname}.bn{c + 1}", plan_out)
                plan_in = plan_out
            if ts.has_downsample(s, j):
                if os_.has_downsample(pair[0], pair[1]):
                    w_o = o[f"{oname}.downsample.0.weight"]
                    bn_o = {leaf: o[f"{oname}.downsample.1.{leaf}"] for leaf in BN_PARAMS}
                else:
                    w_o = _identity_shortcut(o[f"{oname}.conv1.weight"].shape[1])
                    width = w_o.shape[0]
                    bn_o = {"weight": torch.ones(width), "bias": torch.zeros(width),
                            "running_mean": torch.zeros(width), "running_var": torch.full((width,), 1.0 - 1e-5)}
                mix(f"{tname}.downsample.0.weight", _moved(w_o, p_in, streams[s]))
                for leaf in BN_PARAMS:
                    mix(f"{tname}.downsample.1.{leaf}", _moved(bn_o[leaf], None, streams[s]))
                has_o = os_.has_downsample(pair[0], pair[1])
                pairs_bn.append((f"{tname}.downsample.1", f"{oname}.downsample.1" if has_o else None,
                                 streams[s] if has_o else None, a if has_o else 1.0))
            mixing.append([a, b])
    out["fc.weight"] = a * t["fc.weight"] + b * align_inputs(o["fc.weight"], streams[-1])
    out["fc.bias"] = a * t["fc.bias"] + b * o["fc.bias"]

    if x is not None and settings.bn_reset:
        out = reset_batchnorm_stats(target, out, x)
    if x is not None and settings.correction == "repair":
        out = _repair_batchnorm(target, other, al, out, pairs_bn, x)
    if x is not None and settings.correction == "regress":
        out = _refit_classifier(target, out, x, a * al.t_logits + b * al.o_logits, settings.ridge)
    state = {k: v.to(target.state_dict[k].dtype) for k, v in out.items()}
    return PairResult(name, state, mixing)


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


def _repair_batchnorm(target: Member, other: Member, al: "_Aligner", state: dict[str, torch.Tensor],
                      pairs_bn: list[tuple[str, str | None, np.ndarray | None, float]],
                      x: torch.Tensor) -> dict[str, torch.Tensor]:
    """REPAIR for BatchNorm networks: rescale and shift each fused BN's output channels, in network
    order, to the mix of the parents' matched channels' mean and std on ``x``."""
    t_stats = _bn_output_stats(target, al.t, x, [p[0] for p in pairs_bn])
    o_stats = _bn_output_stats(other, al.o, x, [p[1] for p in pairs_bn if p[1] is not None])
    state = dict(state)
    for t_name, o_name, plan, weight in pairs_bn:
        t_mean, t_std = t_stats[t_name]
        if o_name is not None:
            o_mean, o_std = o_stats[o_name]
            t_mean = weight * t_mean + (1 - weight) * align_outputs(o_mean, plan)
            t_std = weight * t_std + (1 - weight) * align_outputs(o_std, plan)
        elif weight != 1.0:
            t_mean, t_std = weight * t_mean, weight * t_std
        mean, std = _bn_output_stats(target, state, x, [t_name])[t_name]
        scale = torch.where(std > 1e-8, t_std / std.clamp_min(1e-8), torch.ones_like(std))
        state[f"{t_name}.weight"] = (state[f"{t_name}.weight"].double() * scale).float()
        state[f"{t_name}.bias"] = (scale * (state[f"{t_name}.bias"].double() - mean) + t_mean).float()
    return state


@torch.no_grad()
def _refit_classifier(member: Member, state: dict[str, torch.Tensor], x: torch.Tensor, target_logits: torch.Tensor,
                      ridge: float) -> dict[str, torch.Tensor]:
    """Least-squares refit of ``fc`` so that the fused features reproduce the parents' mixed logits."""
    from clafuse.arch.base import ChainLayer
    from clafuse.fusion.otfusion import regress_layer

    rec, _ = member.family.record(member.spec, state, x)
    layer = ChainLayer(weight=state["fc.weight"], bias=state["fc.bias"], relu=False)
    fitted = regress_layer(layer, rec["pooled"], target_logits, ridge)
    return {**state, "fc.weight": fitted.weight, "fc.bias": fitted.bias}
