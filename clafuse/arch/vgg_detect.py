"""Recognising a VGG state dict: torchvision's flat ``features.N`` or nested Sequentials
(``features.S.I``), and torchvision's ``classifier.N`` or timm's head (``pre_logits.fc1/fc2``,
``head.fc``).

Only convs, BatchNorms and Linears have keys; where the activations and max-pools sit follows from
the gaps between the key indices, as ``make_layers`` lays them out: in the flat layout a conv
takes two indices (conv, activation), three with BatchNorm, and each max-pool one. Nested
Sequentials hold one chunk each (convs up to a max-pool, which closes the chunk), or one conv
each with the max-pools as indices of their own between them (told apart by those gaps). A
checkpoint cannot tell whether its last conv is followed by a max-pool; torchvision's and timm's
configs always end with one, which detection assumes (pass a spec otherwise).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from pydantic import ValidationError

from clafuse.arch.vgg_spec import POOL, TORCHVISION_AVGPOOL, TimmHead, VGGLinear, VGGSpec
from clafuse.errors import SpecError

BN_KEYS = ("weight", "bias", "running_mean", "running_var")
TIMM_HEAD = ("pre_logits.fc1", "pre_logits.fc2", "head.fc")


def _split(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, dict, dict] | None:
    """Features by index tuple, classifier by index, timm head by module; None if any key is foreign."""
    feats: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}
    cls: dict[int, dict[str, torch.Tensor]] = {}
    timm: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        module, _, leaf = key.rpartition(".")
        if parts[0] == "features" and len(parts) in (3, 4) and all(p.isdigit() for p in parts[1:-1]):
            feats.setdefault(tuple(int(p) for p in parts[1:-1]), {})[leaf] = value
        elif parts[0] == "classifier" and len(parts) == 3 and parts[1].isdigit():
            cls.setdefault(int(parts[1]), {})[leaf] = value
        elif module in TIMM_HEAD:
            timm.setdefault(module, {})[leaf] = value
        else:
            return None
    return feats, cls, timm


def _name(index: tuple[int, ...]) -> str:
    return "features." + ".".join(map(str, index))


def _modules(feats: dict) -> tuple[list[tuple[int, ...]], dict[tuple[int, ...], dict]]:
    convs, bns = [], {}
    for idx in sorted(feats):
        params = feats[idx]
        weight = params.get("weight")
        if weight is not None and weight.dim() == 4:
            if set(params) - {"weight", "bias"}:
                raise SpecError(f"{_name(idx)} is a conv but also holds {sorted(set(params) - {'weight', 'bias'})}")
            convs.append(idx)
        elif set(BN_KEYS) <= set(params) and set(params) <= {*BN_KEYS, "num_batches_tracked"}:
            bns[idx] = params
        else:
            raise SpecError(f"{_name(idx)} holds {sorted(params)}: neither a Conv2d nor a BatchNorm2d")
    return convs, bns


def _flat_pools(convs: list[tuple[int, ...]], span: int, batch_norm: bool) -> list[bool]:
    if convs[0] != (0,):
        raise SpecError(f"features.0 is not a conv (first conv at {_name(convs[0])}); pass --arch with a spec")
    pools = []
    for (a,), (b,) in zip(convs, convs[1:]):
        gap = b - a - span
        if gap < 0 or gap > 1:
            raise SpecError(f"features.{a} and features.{b} are {b - a} apart, which is not conv"
                            f"{', BN' if batch_norm else ''}, ReLU and at most one max-pool; pass --arch with a spec")
        pools.append(gap == 1)
    return pools


def _nested_pools(convs: list[tuple[int, ...]]) -> list[bool]:
    outer = [s for s, _ in convs]
    if outer[0] != 0:
        raise SpecError(f"features.0 holds no conv (first conv at {_name(convs[0])}); pass --arch with a spec")
    one_each = len(set(outer)) == len(outer)
    gaps = [b - a for a, b in zip(outer, outer[1:])]
    if one_each and any(g > 1 for g in gaps):
        # One conv per Sequential, the max-pools as indices of their own between them.
        if any(g > 2 for g in gaps):
            raise SpecError(f"nested convs at {', '.join(map(_name, convs))} leave more than one index between "
                            f"two convs; pass --arch with a spec")
        return [g == 2 for g in gaps]
    # One chunk per Sequential: a max-pool closes each.
    return [a != b for a, b in zip(outer, outer[1:])]


def detect_vgg(state_dict: Mapping[str, torch.Tensor]) -> VGGSpec | None:
    """The VGG spec of ``state_dict``, None if it is not VGG-like; SpecError naming what does not
    fit when it clearly is meant as one."""
    split = _split(state_dict)
    if split is None:
        return None
    feats, cls, timm = split
    if not (cls or timm) or (cls and timm) or not any(
            isinstance(p.get("weight"), torch.Tensor) and p["weight"].dim() == 4 for p in feats.values()):
        return None
    depths = {len(idx) for idx in feats}
    if len(depths) != 1:
        raise SpecError("features mixes flat (features.N) and nested (features.N.M) modules; pass --arch with a spec")
    nested = depths.pop() == 2
    convs, bns = _modules(feats)
    batch_norm = bool(bns)
    after = [idx[:-1] + (idx[-1] + 1,) for idx in convs]
    if batch_norm and sorted(bns) != after:
        raise SpecError(f"BatchNorms at {', '.join(map(_name, sorted(bns)))} do not follow each conv "
                        f"(convs at {', '.join(map(_name, convs))})")
    weights = [feats[i]["weight"] for i in convs]
    kernels = {tuple(w.shape[2:]) for w in weights}
    if len(kernels) != 1 or len(next(iter(kernels))) != 2 or len(set(next(iter(kernels)))) != 1:
        raise SpecError(f"convs have kernel sizes {sorted(kernels)}; one square kernel size is supported")
    for a, b, ia, ib in zip(weights, weights[1:], convs, convs[1:]):
        if b.shape[1] != a.shape[0]:
            raise SpecError(f"{_name(ib)} takes {b.shape[1]} channels but {_name(ia)} gives {a.shape[0]}")
    biased = {"bias" in feats[i] for i in convs}
    if len(biased) != 1:
        raise SpecError("some convs have a bias and some do not")
    tracked = {"num_batches_tracked" in p for p in bns.values()}
    if len(tracked) > 1:
        raise SpecError("some BatchNorms have num_batches_tracked and some do not")
    pools = _nested_pools(convs) if nested else _flat_pools(convs, 3 if batch_norm else 2, batch_norm)
    config: list[int | str] = []
    for k, weight in enumerate(weights):
        config.append(int(weight.shape[0]))
        if k < len(pools) and pools[k]:
            config.append(POOL)
    config.append(POOL)  # torchvision's and timm's configs end with a max-pool; the keys cannot tell
    last = int(weights[-1].shape[0])
    common = dict(in_channels=int(weights[0].shape[1]), config=config, batch_norm=batch_norm,
                  conv_bias=biased.pop(), kernel_size=next(iter(kernels))[0],
                  bn_num_batches_tracked=tracked.pop() if tracked else True)
    if nested:
        common.update(conv_keys=[_name(i) for i in convs], norm_keys=[_name(i) for i in after] if batch_norm else None)
    else:
        common["conv_indices"] = [i[0] for i in convs]
    if timm:
        common.update(head=_timm_head(timm, last), avgpool=None)
    else:
        common.update(_classifier(cls, last, int(weights[0].shape[1]), config))
    try:
        return VGGSpec(**common)
    except ValidationError as exc:
        raise SpecError(f"VGG-like checkpoint does not fit a VGG spec: {exc.errors()[0]['msg']}") from None


def _timm_head(timm: dict[str, dict[str, torch.Tensor]], last: int) -> TimmHead:
    shapes = {m: {leaf: tuple(t.shape) for leaf, t in timm.get(m, {}).items()} for m in TIMM_HEAD}
    fc1, fc2, fc = (shapes[m].get("weight") for m in TIMM_HEAD)
    if fc1 is None or fc2 is None or fc is None or len(fc1) != 4 or len(fc2) != 4 or len(fc) != 2:
        found = ", ".join(f"{m}.weight {s['weight']}" for m, s in shapes.items() if "weight" in s) or "none"
        raise SpecError(f"timm VGG head: expected pre_logits.fc1 and fc2 (convs) and head.fc (a Linear), found {found}")
    head = TimmHead(mid_features=fc1[0], out_features=fc2[0], kernel_size=fc1[-1], num_classes=fc[0])
    expected = {"pre_logits.fc1": {"weight": (head.mid_features, last, head.kernel_size, head.kernel_size),
                                   "bias": (head.mid_features,)},
                "pre_logits.fc2": {"weight": (head.out_features, head.mid_features, 1, 1), "bias": (head.out_features,)},
                "head.fc": {"weight": (head.num_classes, head.out_features), "bias": (head.num_classes,)}}
    for module, leaves in expected.items():
        if shapes[module] != leaves:
            raise SpecError(f"timm VGG head: {module} holds {shapes[module]}, expected {leaves} after a last conv "
                            f"of {last} channels")
    return head


def _classifier(cls: dict[int, dict[str, torch.Tensor]], last: int, in_channels: int, config: list) -> dict:
    layers = []
    for idx in sorted(cls):
        params = cls[idx]
        weight = params.get("weight")
        if weight is None or weight.dim() != 2 or set(params) - {"weight", "bias"}:
            raise SpecError(f"classifier.{idx} holds {sorted(params)}, not a Linear layer")
        layers.append(VGGLinear(index=idx, in_features=int(weight.shape[1]), out_features=int(weight.shape[0]),
                                bias="bias" in params))
    flat = layers[0].in_features
    if flat % last:
        raise SpecError(f"classifier.{layers[0].index} takes {flat} features, not a multiple of the last conv's "
                        f"{last} channels; pass --arch with a spec")
    positions = flat // last
    avgpool, input_size = None, None
    if positions == TORCHVISION_AVGPOOL[0] * TORCHVISION_AVGPOOL[1]:
        avgpool = TORCHVISION_AVGPOOL
    else:
        side = math.isqrt(positions)
        if side * side == positions:
            size = side * 2 ** config.count(POOL)
            input_size = (in_channels, size, size)
    return {"classifier": layers, "avgpool": avgpool, "input_size": input_size}
