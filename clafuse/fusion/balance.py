"""Balancing depths on descriptions: a source network made to pair block for block with the target.

``add`` (the source is shallower) inserts an exact identity block wherever the target has a block
no source block maps to (where those are plain ReLU layers after the source's last, narrower than
it, they carry the source's logits instead: exact at the target's widths); ``merge`` (the source
is deeper) drops its unmatched blocks where the network stays valid without them (residual
blocks) and folds them into the next kept block where they are an affine map and a ReLU (the
ReLU replaced by its gate on calibration data).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import torch

from clafuse.arch.base import Chain, ChainLayer, chain_of, describe_chain
from clafuse.arch.layers import LayerOp, identity_layer_block, layer_block
from clafuse.arch.network import Block, Network, Tap, block_tensors
from clafuse.errors import ClafuseError
from clafuse.fusion.corrections import record

BALANCE_METHODS = ("add", "merge")


def check_mapping(mapping: list[int], n: int, m: int) -> None:
    if len(mapping) != n or any(not 0 <= j < m for j in mapping) or any(
        a >= b for a, b in zip(mapping, mapping[1:])
    ):
        raise ClafuseError(f"invalid layer mapping {mapping} for {n} shallow and {m} deep layers")


def _check_groups(net: Network, other: Network, mappings: list[list[int]]) -> list[list[int]]:
    groups, other_groups = net.groups(), other.groups()
    if len(groups) != len(other_groups) or len(mappings) != len(groups):
        raise ClafuseError(f"the networks have {len(groups)} and {len(other_groups)} alignment groups, the "
                           f"mapping {len(mappings)}")
    return groups


def insert_blocks(shallow: Network, mappings: list[list[int]], deep: Network,
                  state: Mapping[str, torch.Tensor] | None = None) -> Network:
    """``shallow`` with an identity block at every position of ``deep`` that no shallow block maps
    to (``mappings``: per group, the deep position of each shallow block). An inserted block reads
    and writes the units of its predecessor; it is exact where the architecture has an exact
    identity there (after a ReLU; for an inserted layer before any real one, on non-negative
    inputs). With ``state`` (the shallow network's tensors), inserted layers after its last one
    that are narrower than its last hidden layer carry its logits instead (:func:`_logit_carriers`)."""
    by_position = _positions(shallow, mappings, deep)
    fixed = {b.pairing: b for b in shallow.blocks if not b.alignable}
    spaces = shallow.all_spaces()
    carriers = _logit_carriers(shallow, deep, by_position, state) if state is not None else {}
    fixed.update({b.pairing: b for j, b in carriers.items() if not deep.blocks[j].alignable})
    current = "input"
    blocks = []
    for j, template in enumerate(deep.blocks):
        if j in carriers and template.alignable:
            block = carriers[j]
            spaces.update({s.name: s for s in block.spaces.values()})
        elif not template.alignable:
            block = fixed.get(template.pairing)
            if block is None and template.optional:
                continue
            if block is None:
                raise ClafuseError(f"the shallower network has no {template.pairing}")
        elif j in by_position:
            block = by_position[j]
        else:
            made = template.identity(template, spaces[current].size, current) if template.identity else None
            if made is None and template.attrs.get("no_identity"):
                raise ClafuseError(f"cannot insert an identity in place of {template.name}: "
                                   f"{template.attrs['no_identity']}; use --balance merge (the shallower "
                                   f"architecture) or fuse networks of equal depth")
            if made is None:
                raise ClafuseError(f"cannot insert an identity in place of {template.name}: the first fully-connected "
                                   f"layers of both networks must map to each other, and a block that changes "
                                   f"resolution or width must be matched")
            block = made
            spaces.update({s.name: s for s in made.spaces.values()})
        blocks.append(block)
        current = block.output or current
    return replace(shallow, blocks=blocks)


def _positions(shallow: Network, mappings: list[list[int]], deep: Network) -> dict[int, Block]:
    """The shallow network's alignable blocks by the deep position each maps to."""
    groups = _check_groups(shallow, deep, mappings)
    by_position: dict[int, Block] = {}
    for s_idx, d_idx, mapping in zip(groups, deep.groups(), mappings):
        check_mapping(mapping, len(s_idx), len(d_idx))
        for i, j in zip(s_idx, mapping):
            by_position[d_idx[j]] = shallow.blocks[i]
    return by_position


def carried_positions(shallow: Network, mappings: list[list[int]], deep: Network) -> list[int]:
    """The deep positions whose layers carry the shallow network's logits after balancing with
    ``mappings`` (:func:`_logit_carriers`; empty where identities stand)."""
    found = _carried_tail(shallow, deep, _positions(shallow, mappings, deep))
    return found.tail if found is not None else []


def carried_intact(shallow: Network, mappings: list[list[int]], deep: Network) -> bool:
    """Whether balancing ``shallow`` into ``deep`` with ``mappings`` keeps all of it: each of its
    layers maps to one of the deep network at least as wide, and the deep network's unmatched last
    layers carry its logits (:func:`_logit_carriers`)."""
    by_position = _positions(shallow, mappings, deep)
    if _carried_tail(shallow, deep, by_position) is None:
        return False
    s_spaces, d_spaces = shallow.all_spaces(), deep.all_spaces()
    return all(b.output is not None and deep.blocks[j].output is not None
               and s_spaces[b.output].size <= d_spaces[deep.blocks[j].output].size for j, b in by_position.items())


def _plain_linear(block: Block, relu: bool) -> bool:
    """Whether ``block`` is a plain Linear layer (no conv, norm, pooling or flattening before it),
    with a ReLU when ``relu``, else with no activation."""
    op = block.attrs.get("op")
    if not isinstance(op, LayerOp) or op.conv or op.norm or op.flatten_before or op.avgpool_before is not None:
        return False
    return op.min_size is None and (op.relu and op.act == "relu" if relu else not op.relu)


def _logit_carriers(shallow: Network, deep: Network, by_position: Mapping[int, Block],
                    state: Mapping[str, torch.Tensor]) -> dict[int, Block]:
    """Blocks that make the shallow network exactly itself at the deep one's widths where the deep
    network has plain ReLU layers after the shallow one's last, narrower than that last layer: an
    identity there cannot be moved into the narrower units without loss, but the logits z = W h + b
    can. The first inserted layer computes ReLU([z; -z]) (its other units zero), the next ones pass
    those 2C units on (ReLU is exact on them), and the head reads z = z+ - z-. Keyed by deep
    position (the head's too); empty where this does not apply (the identities then stand)."""
    found = _carried_tail(shallow, deep, by_position)
    if found is None:
        return {}
    head = found.head
    weight = shallow.param_value(head, "weight", state).float()
    classes, width = weight.shape
    bias = shallow.param_value(head, "bias", state).float() if "bias" in head.params else None
    out: dict[int, Block] = {}
    current, previous = by_position[max(by_position)].output, width
    for k, (j, w) in enumerate(zip(found.tail, found.widths)):
        template = deep.blocks[j]
        values = {"weight": torch.zeros(w, previous)}
        if k == 0:
            values["weight"][:2 * classes] = torch.cat([weight, -weight])
        else:
            values["weight"][:2 * classes, :2 * classes] = torch.eye(2 * classes)
        if "bias" in template.params:
            values["bias"] = torch.zeros(w)
            if k == 0 and bias is not None:
                values["bias"][:2 * classes] = torch.cat([bias, -bias])
        out[j] = _made_block(f"{template.name}+carrier", template, values, current)
        current, previous = out[j].output, w
    readout = {"weight": torch.zeros(classes, previous)}
    readout["weight"][:, :2 * classes] = torch.cat([torch.eye(classes), -torch.eye(classes)], dim=1)
    if bias is not None:  # the bias rode in the first carrier where it has one, else it stays here
        readout["bias"] = torch.zeros(classes) if "bias" in deep.blocks[found.tail[0]].params else bias.clone()
    out[found.head_position] = _made_block(f"{head.name}+readout", head, readout, current)
    return out


@dataclass(frozen=True)
class _Tail:
    """Deep positions after the shallow network's last block that can carry its logits, their
    widths, the deep head's position and the shallow network's head."""

    tail: list[int]
    widths: list[int]
    head_position: int
    head: Block


def _carried_tail(shallow: Network, deep: Network, by_position: Mapping[int, Block]) -> _Tail | None:
    """The deep positions after the shallow network's last block where they can carry its logits:
    plain ReLU layers, each at least 2 x classes wide and narrower than the shallow's last hidden
    layer, before a plain Linear head; None elsewhere."""
    if not by_position:
        return None
    last = max(by_position)
    tail = [j for j, b in enumerate(deep.blocks) if b.alignable and j > last]
    after = [j for j, b in enumerate(deep.blocks) if j > last and not b.alignable and not b.optional]
    head = next((b for b in shallow.blocks if not b.alignable and len(after) == 1
                 and b.pairing == deep.blocks[after[0]].pairing), None)
    if not tail or head is None or after[0] < tail[-1] or by_position[last].output is None:
        return None
    if not _plain_linear(head, relu=False) or not all(_plain_linear(deep.blocks[j], relu=True) for j in tail):
        return None
    classes, width = head.params["weight"].shape
    widths = [int(deep.blocks[j].params["weight"].shape[0]) for j in tail]
    if min(widths) < 2 * classes or min(widths) >= width:
        return None
    return _Tail(tail, widths, after[0], head)


def _made_block(name: str, template: Block, values: dict[str, torch.Tensor], in_space: str) -> Block:
    """A plain Linear block like ``template`` with the given tensors (under new keys ``name.local``)
    reading ``in_space``: in place of an alignable template, an inserted block of its group; in
    place of a head, the head itself (its name, output space and slot)."""
    op, keys = template.attrs["op"], {local: f"{name}.{local}" for local in values}
    shapes = {local: tuple(v.shape) for local, v in values.items()}
    if template.alignable:
        block = layer_block(name, keys, shapes, op, in_space, template.group)
    else:
        block = layer_block(template.name, keys, shapes, op, in_space, None, out_space=template.attrs["out_space"],
                            slot=template.slot)
    inserted = template.alignable
    return block.with_(inserted=inserted, exact=frozenset(values) if inserted else frozenset(),
                       values={keys[k]: v for k, v in values.items()})


def pair_optional(source: Network, target: Network) -> Network:
    """``source`` with its fixed blocks made to pair with ``target``'s: an optional block the target
    lacks is left out, one only the target has stands in as a placeholder (the target's block,
    marked inserted with no exact tensors, so that nothing of the source is mixed there)."""
    t_fixed = {b.pairing for b in target.blocks if not b.alignable}
    kept = [b for b in source.blocks if b.alignable or b.pairing in t_fixed or not b.optional]
    detached = [b for b in source.blocks if b not in kept]
    have = {b.pairing for b in kept if not b.alignable}
    blocks, k = [], 0
    for block in target.blocks:
        if not block.alignable and block.optional and block.pairing not in have:
            zeros = {p.key: torch.zeros(p.shape) for p in block.params.values() if not p.implied}
            blocks.append(block.with_(inserted=True, exact=frozenset(), values={**block.values, **zeros}))
            continue
        if k < len(kept):
            blocks.append(kept[k])
            k += 1
    blocks += kept[k:]
    return replace(source, blocks=blocks, detached=[*source.detached, *detached])


FitInput = list[tuple[torch.Tensor, torch.Tensor]]
"""What an inserted block's ``fit`` receives: per calibration batch, the hidden state entering the
block and the batch's raw input."""


def needs_fitting(net: Network) -> bool:
    return any(b.inserted and "fit" in b.attrs for b in net.blocks)


@torch.no_grad()
def fit_inserted(net: Network, state: Mapping[str, torch.Tensor], x: torch.Tensor) -> Network:
    """``net`` with every inserted block that is only a near-identity (one whose ``attrs["fit"]``
    is set: post-LN transformers have no exact identity layer) fitted on what it receives from the
    blocks before it on calibration inputs ``x``; ``fit(block, inputs)`` returns the fitted block."""
    if not needs_fitting(net):
        return net
    tap = Tap()
    states: FitInput = []
    for start in range(0, len(x), net.batch):
        xb = x[start:start + net.batch]
        states.append((net.pre(xb.float() if xb.is_floating_point() else xb), xb))
    blocks = []
    for block in net.blocks:
        if block.inserted and "fit" in block.attrs:
            block = block.attrs["fit"](block, states)
        tensors = block_tensors(net, block, state)
        tap.block, tap.tensors = block, tensors
        moved = []
        for h, xb in states:
            tap.x = xb
            moved.append((block.forward(tensors, h, tap), xb))
        states = moved
        blocks.append(block)
    return replace(net, blocks=blocks)


def gates_of(net: Network, pre: Mapping[tuple[int, str], torch.Tensor]) -> dict[int, torch.Tensor]:
    """Per block, from its site pre-activations ``pre`` (where recorded in full: the plain linear
    layers, the ones that fold), the fraction of calibration samples on which each unit is active:
    the diagonal that best stands in for the ReLU when it is folded."""
    out = {}
    for (b, name), z in pre.items():
        if name == "out" and isinstance(z, torch.Tensor):
            out[b] = (z > 0).double().flatten(2).mean(-1).mean(0) if z.dim() > 2 else (z > 0).double().mean(0)
    return out


def needs_folding(deep: Network, mappings: list[list[int]]) -> bool:
    kept = {deep.groups()[g][j] for g, mapping in enumerate(mappings) for j in mapping}
    return any(b.alignable and i not in kept and not b.drop for i, b in enumerate(deep.blocks))


def merge_problem(deep: Network, mappings: list[list[int]]) -> str | None:
    """Why ``deep`` cannot lose the blocks ``mappings`` leaves unmatched (None: it can), from the
    description alone: each must be droppable, or fold into a fully-connected successor."""
    kept = set()
    for idx, mapping in zip(deep.groups(), mappings):
        check_mapping(mapping, len(mapping), len(idx))
        kept.update(idx[j] for j in mapping)
    alignable = [i for i, b in enumerate(deep.blocks) if b.alignable]
    folding = False
    for i, block in enumerate(deep.blocks):
        if folding and not (block.alignable and i not in kept and block.drop):
            if "op" not in block.attrs or len(block.params["weight"].shape) != 2:
                return f"cannot fold into {block.name}: only into a fully-connected layer"
            folding = False
        if not block.alignable or i in kept or block.drop:
            continue
        position = alignable.index(i)
        if not block.fold and block.attrs.get("no_fold"):
            return (f"merge balancing cannot fold hidden layer {position} of the deeper network: "
                    f"{block.attrs['no_fold']}; use --balance add (the deeper architecture) or fuse networks of "
                    f"equal depth")
        if not block.fold:
            return (f"merge balancing cannot fold hidden layer {position} of the deeper network: only "
                    "fully-connected layers without BatchNorm fold into their successor; use --balance "
                    "add (the deeper architecture)")
        folding = True
    return None


def merge_blocks(deep: Network, state: Mapping[str, torch.Tensor], mappings: list[list[int]],
                 gates: Mapping[int, torch.Tensor] | None) -> Network:
    """``deep`` with its unmatched blocks dropped or folded (``mappings``: per group, the deep
    position of each kept block; ``gates``: per foldable block, its ReLU's gate). Layers j..k fold
    into the single Linear W_k D_{k-1} W_{k-1} ... D_j W_j (biases carried through)."""
    problem = merge_problem(deep, mappings)
    if problem is not None:
        raise ClafuseError(problem)
    kept = {idx[j] for idx, mapping in zip(deep.groups(), mappings) for j in mapping}
    if gates is None and needs_folding(deep, mappings):
        raise ClafuseError("folding a deeper network's unmatched layers needs calibration data to "
                           "approximate their ReLUs: pass --data")
    blocks, detached = [], list(deep.detached)
    acc: tuple[torch.Tensor, torch.Tensor | None, str] | None = None
    for i, block in enumerate(deep.blocks):
        if block.alignable and i not in kept and block.drop:
            detached.append(block)
            continue
        if acc is not None:
            if "op" not in block.attrs or block.params["weight"].shape.__len__() != 2:
                raise ClafuseError(f"cannot fold into {block.name}: only into a fully-connected layer")
            block = _folded(deep, block, state, acc)
            acc = None
        if block.alignable and i not in kept:
            detached.append(block)
            gate = gates[i].double()
            w = deep.param_value(block, "weight", state).double()
            b = deep.param_value(block, "bias", state).double() if "bias" in block.params else None
            acc = (gate[:, None] * w, gate * b if b is not None else None, block.attrs["in_space"])
            continue
        blocks.append(block)
    return replace(deep, blocks=blocks, detached=detached)


def _folded(net: Network, block: Block, state: Mapping[str, torch.Tensor],
            acc: tuple[torch.Tensor, torch.Tensor | None, str]) -> Block:
    """``block`` (a Linear layer) applied after the folded affine map ``acc``: one Linear reading
    the folded layers' inputs."""
    acc_w, acc_b, in_space = acc
    w = net.param_value(block, "weight", state).double()
    b = net.param_value(block, "bias", state).double() if "bias" in block.params else None
    weight = w @ acc_w
    if acc_b is not None:
        b = w @ acc_b if b is None else w @ acc_b + b
    values = {"weight": weight.float()}
    if b is not None:
        values["bias"] = b.float()
    keys = {local: block.params[local].key if local in block.params else f"{block.name}.{local}" for local in values}
    made = layer_block(block.name, keys, {k: tuple(v.shape) for k, v in values.items()}, block.attrs["op"], in_space,
                       block.group, out_space=block.attrs["out_space"], slot=block.slot)
    return made.with_(values={keys[k]: v for k, v in values.items()})


# --- the same on layer chains (:class:`~clafuse.arch.base.Chain`), through their descriptions -----


def _groups_of(chain_net: Network) -> list[int]:
    """Per hidden layer of a described chain, its alignment group."""
    return [b.group for b in chain_net.blocks if b.alignable]


def _per_group(mapping: list[int], s_groups: list[int], d_groups: list[int]) -> list[list[int]]:
    starts = {g: d_groups.index(g) for g in set(d_groups)}
    out: list[list[int]] = [[] for _ in sorted(set(d_groups))]
    for i, j in enumerate(mapping):
        if s_groups[i] != d_groups[j]:
            raise ClafuseError(f"shallow hidden layer {i} is in chunk {s_groups[i]} but deep position {j} in chunk "
                               f"{d_groups[j]}: layers must map within their chunk")
        out[d_groups[j]].append(j - starts[d_groups[j]])
    return out


def insert_identities(shallow: Chain, mapping: list[int], deep: Chain) -> Chain:
    """The shallow chain with an identity layer at every deep position no shallow layer maps to
    (``mapping[i]``: the deep position of shallow hidden layer i, strictly increasing); max-pools
    stay between the chunks, which layers map within."""
    check_mapping(mapping, len(shallow.hidden), len(deep.hidden))
    s_net, state = describe_chain(shallow)
    d_net, _ = describe_chain(deep)
    s_groups, d_groups = _groups_of(s_net), _groups_of(d_net)
    if len(set(s_groups)) != len(set(d_groups)):
        raise ClafuseError(f"the shallow network has {len(set(s_groups))} chunks, the deep one {len(set(d_groups))}: "
                           f"they must pool equally often")
    balanced = insert_blocks(s_net, _per_group(mapping, s_groups, d_groups), d_net)
    return chain_of(balanced, state, shallow.flatten_input)


def identity_layer(width: int, template: ChainLayer) -> ChainLayer:
    """A layer computing ReLU(x) = x on non-negative inputs of ``width`` features, shaped like
    ``template`` (Linear or k x k conv, with a zero bias / identity BatchNorm where it has them)."""
    net, state = describe_chain(Chain([template.with_(flatten_before=False, avgpool_before=None)], template))
    made = identity_layer_block(net.blocks[0], width, "input")
    return chain_of(replace(net, blocks=[made, net.blocks[-1]]), state, False).hidden[0]


@torch.no_grad()
def relu_gates(deep: Chain, x: torch.Tensor) -> list[torch.Tensor]:
    """Per hidden layer of ``deep``, the fraction of calibration samples on which each unit is
    active: the diagonal that best stands in for the ReLU when the layer is folded away."""
    net, state = describe_chain(deep)
    gates = gates_of(net, record(net, state, x, spaces=False, sites=True)[1])
    return [gates[i] for i, b in enumerate(net.blocks) if b.alignable]


def merge_layers(deep: Chain, mapping: list[int], gates: list[torch.Tensor]) -> Chain:
    """The deep chain with each unmatched hidden layer folded into the next kept layer, its ReLU
    replaced by diag(gate); layers after the last kept one fold into the last layer."""
    check_mapping(mapping, len(mapping), len(deep.hidden))
    net, state = describe_chain(deep)
    groups = _groups_of(net)
    hidden = [i for i, b in enumerate(net.blocks) if b.alignable]
    per_group = _per_group(mapping, [groups[j] for j in mapping], groups)
    merged = merge_blocks(net, state, per_group, dict(zip(hidden, gates)))
    return chain_of(merged, state, deep.flatten_input)
