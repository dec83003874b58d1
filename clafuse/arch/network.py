"""The description of a network that every family produces and the one fusion engine consumes.

A :class:`Network` says, as data, what fusion needs to know about an architecture:

* **neuron spaces** (:class:`Space`): sets of interchangeable units that one transport plan acts
  on — a layer's outputs, a residual stream shared by every tensor that writes into it or reads
  from it, the classes (fixed). Room is made for attention heads (``heads``).
* **parameters** (:class:`Param`): for each tensor of the checkpoint, which axis lives in which
  space, so that moving a network into another's neuron order is one generic operation.
* **blocks** (:class:`Block`): the units alignment matches, balancing inserts (``identity``),
  folds (``fold``) or drops (``drop``), grouped into alignment groups; fixed blocks (a stem, a
  pool, a classifier) pair by name. Each block can run (``forward``), calling a :class:`Tap` at
  the points fusion observes or corrects: normalisations, correction sites, neuron spaces.

A family builds the description from its spec alone (shapes, not values); the tensors stay in the
checkpoint's state dict and are read by key when needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal, Mapping

import torch
import torch.nn.functional as F

NORM_LEAVES = ("weight", "bias", "running_mean", "running_var")
SEQUENCE_BATCH = 32
"""Samples per recording pass for sequence models (:attr:`Network.batch`): 32 sentences of 128
tokens hold a transformer's attention for a MiniLM in a few hundred MB."""

@dataclass(frozen=True)
class Space:
    """A set of units one transport plan acts on.

    ``signature`` lists candidate groups of parameter keys whose slices along this space tell its
    units apart (the weight ground cost); the engine uses the first group whose first key both
    networks really have, the rest of a group filling in with zeros where one side lacks it.
    ``owner`` (a block name) makes it an inner space of that block, paired with the other
    network's space of the same ``local`` name in the matched block; otherwise spaces pair by
    name. ``same_as`` names another space of this network that holds the same units (a stem that
    writes straight into the first stage's stream). ``heads`` > 1 marks an attention space: units
    grouped into heads of ``size // heads`` consecutive units; its plan permutes whole heads and,
    inside each matched pair of heads, units (never across heads). The head spaces of one block
    (its query/key units and its value/output units) share one head permutation, since a head's
    query, key, value and output move together.
    """

    name: str
    size: int
    signature: tuple[tuple[str, ...], ...] = ()
    owner: str | None = None
    local: str = ""
    fixed: bool = False
    same_as: str | None = None
    heads: int = 1


@dataclass(frozen=True)
class Param:
    """One tensor: its key and, per axis, the space it lives in (None: not permuted), or a tuple
    of spaces for an axis that stacks several (a fused query/key/value projection's rows).

    Axes in ``reads`` are read from their space (input columns: moved by summing the units sent to
    each target unit); the others belong to it (rows, biases, norm vectors: averaged).
    ``implied`` marks a tensor the architecture implies without storing it (the identity of a
    plain shortcut), given by the network's ``values``.
    """

    key: str
    axes: tuple[str | tuple[str, ...] | None, ...]
    shape: tuple[int, ...] = ()
    kind: str = "weight"
    reads: tuple[int, ...] | None = None
    implied: bool = False

    def read_axes(self) -> tuple[int, ...]:
        return tuple(range(1, len(self.axes))) if self.reads is None else self.reads


@dataclass(frozen=True)
class Site:
    """A pre-activation the corrections act on: the output of ``weight`` (with ``bias``) and of
    the normalisation ``norm`` (a local prefix of its four tensors) when there is one, in
    ``space``. A ``residual`` site is a writer into a residual stream: its value is the stream
    plus ``weight``'s output, then ``norm`` (a LayerNorm, epsilon ``eps``) for a post-LN writer.
    Given their inputs at :meth:`Tap.site` (a writer also its residual), plain linear sites (no
    norm, 2-D weight) and writers can be refit by regression."""

    space: str
    weight: str
    bias: str | None = None
    norm: str | None = None
    eps: float = 1e-5
    residual: bool = False

    @property
    def repairable(self) -> bool:
        """Whether restoring per-unit statistics can act here: not on a pre-LN writer's stream,
        whose statistics are the residual's, not the writer's."""
        return not self.residual or self.norm is not None

    @property
    def primary(self) -> str:
        """The local parameter whose mixing weights the site's correction target uses."""
        return f"{self.norm}.weight" if self.norm else self.weight


class Tap:
    """What a block's forward calls at the points fusion cares about; this base only computes.

    ``block`` and ``tensors`` (the block's local tensors) are set by :func:`run` before each
    block runs; ``x`` is the batch's raw input, for blocks that need more of it than the hidden
    state they receive (a transformer's attention mask).
    """

    block: "Block"
    tensors: Mapping[str, torch.Tensor]
    x: torch.Tensor
    current: str | None = None
    """The space of the block input (the last space a block wrote; None before the first)."""

    def norm(self, local: str, z: torch.Tensor, eps: float) -> torch.Tensor:
        t = self.tensors
        return F.batch_norm(z, t[f"{local}.running_mean"], t[f"{local}.running_var"], t[f"{local}.weight"],
                            t[f"{local}.bias"], training=False, eps=eps)

    def site(self, name: str, z: torch.Tensor, inputs: torch.Tensor | None = None,
             residual: torch.Tensor | None = None) -> torch.Tensor:
        """``z``: site ``name``'s pre-activation (its norm's output, where it has one);
        ``inputs``: what its linear map read, for a site that can be refit; ``residual``: for a
        writer, the stream its linear map's output is added to."""
        return z

    def space(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """``h``: the activations of space ``name`` (what the activation signal compares)."""
        return h


Forward = Callable[[Mapping[str, torch.Tensor], torch.Tensor, Tap], torch.Tensor]


@dataclass
class Block:
    """A unit of the network: its tensors (local name -> :class:`Param`), its inner spaces, its
    correction sites and how it runs.

    ``group`` is its alignment group; a fixed block (no group) pairs with the other network's
    block of the same ``slot`` (default: its name). ``output`` is the space its result lives in
    (None: the space it reads, e.g. a pool). ``identity`` builds an
    exact identity block in this block's place given the width and space of its input, or returns
    None when the architecture has none; ``fold`` (an affine map followed by a ReLU, nothing else) lets a
    deeper network fold it into the next block; ``drop`` says the network stays valid without it;
    ``optional`` marks a fixed block one of two networks may lack (a pooler): where the target has
    it and a source not, the target's tensors stand alone, and a source's extra one is left out.
    An inserted block marks the tensors that make it an identity as ``exact``; its other tensors
    are placeholders that are never mixed.
    """

    name: str
    params: dict[str, Param]
    forward: Forward
    spaces: dict[str, Space] = field(default_factory=dict)
    sites: dict[str, Site] = field(default_factory=dict)
    group: int | None = None
    slot: str | None = None
    output: str | None = None
    identity: Callable[["Block", int, str], "Block | None"] | None = None
    fold: bool = False
    drop: bool = False
    optional: bool = False
    reported: bool | None = None
    inserted: bool = False
    exact: frozenset[str] = frozenset()
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def alignable(self) -> bool:
        return self.group is not None

    @property
    def pairing(self) -> str:
        return self.slot or self.name

    @property
    def in_report(self) -> bool:
        """Whether the fusion report gives this block a row of mixing weights."""
        return self.alignable if self.reported is None else self.reported

    def with_(self, **changes: Any) -> "Block":
        return replace(self, **changes)


@dataclass
class Network:
    """An architecture as data: shared spaces (in network order) and blocks (in execution order).
    ``pre`` turns the raw input into what the first block reads (e.g. flattening)."""

    spaces: dict[str, Space]
    blocks: list[Block]
    pre: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    detached: list[Block] = field(default_factory=list)
    """Blocks balancing removed; their tensors can still describe the units of a space."""
    correction: str = "regress"
    """The correction fusion applies unless told otherwise: ``regress`` by default; ``repair`` where
    refitting was measured to hurt."""
    ridge: float = 1e-3
    """The ``regress`` correction's ridge term (relative to the mean input energy) unless told
    otherwise: small where a layer's inputs pin its map down (MLPs, CNNs); large where they do
    not (post-LN transformers: a sequence's tokens are strongly correlated, and a weak ridge fits
    the calibration sentences instead of the map)."""
    batch: int = 256
    """Samples per forward pass when the network is recorded on calibration data: a transformer's
    attention grows with the square of its length, so its description asks for fewer."""

    def all_spaces(self) -> dict[str, Space]:
        """Every space by name: the shared ones, then each block's inner ones, in block order."""
        out = dict(self.spaces)
        for block in self.blocks:
            out.update({s.name: s for s in block.spaces.values()})
        return out

    def block(self, name: str) -> Block:
        return next(b for b in self.blocks if b.name == name)

    def groups(self) -> list[list[int]]:
        """Per alignment group, the indices of its blocks."""
        out: dict[int, list[int]] = {}
        for i, block in enumerate(self.blocks):
            if block.alignable:
                out.setdefault(block.group, []).append(i)
        return [out[g] for g in sorted(out)]

    def param_value(self, block: Block, local: str, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        p = block.params[local]
        return block.values[p.key] if p.key in block.values else state[p.key]

    def tensor(self, key: str, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """A tensor by key: made by balancing or implied (a block's values), else the checkpoint's."""
        for block in (*self.blocks, *self.detached):
            if key in block.values:
                return block.values[key]
        return state[key]

    def has(self, key: str, state: Mapping[str, torch.Tensor]) -> bool:
        """Whether the tensor ``key`` really exists (in the checkpoint, or made by balancing), not
        just implied by the architecture."""
        if key in state:
            return True
        return any(p.key == key and not p.implied and p.key in b.values
                   for b in (*self.blocks, *self.detached) for p in b.params.values())

    def stored_keys(self) -> list[str]:
        """The keys of the checkpoint this network's parameters come from."""
        return [p.key for b in self.blocks for p in b.params.values()
                if not p.implied and p.key not in b.values]

    def has_norms(self) -> bool:
        return any(p.kind == "norm" for b in self.blocks for p in b.params.values())

    def has_stats(self) -> bool:
        """Whether any normalisation keeps running statistics (BatchNorm; LayerNorm does not)."""
        return any(p.kind == "stat" for b in self.blocks for p in b.params.values())


def block_tensors(net: Network, block: Block, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The block's tensors by local name, as float32."""
    return {local: net.param_value(block, local, state).float() for local in block.params}


@torch.no_grad()
def run(net: Network, state: Mapping[str, torch.Tensor], x: torch.Tensor, tap: Tap | None = None,
        tensors: Callable[[Block], Mapping[str, torch.Tensor]] | None = None) -> torch.Tensor:
    """The network's output on ``x``, calling ``tap`` inside every block. ``tensors`` gives a
    block's local tensors (default: read from ``state`` and the block's values, as float32).
    Integer inputs (token ids) reach ``pre`` as they are, floating-point ones as float32."""
    tap = tap or Tap()
    tap.x = x
    tap.current = None
    h = net.pre(x.float() if x.is_floating_point() else x)
    for block in net.blocks:
        tap.block = block
        tap.tensors = tensors(block) if tensors is not None else block_tensors(net, block, state)
        h = block.forward(tap.tensors, h, tap)
        tap.current = block.output or tap.current
    return h


class _LayerOutputs(Tap):
    """Collects each alignable block's output as the next block sees it (after a max-pool that
    follows it, which keeps the space)."""

    def __init__(self) -> None:
        self.outputs: list[torch.Tensor] = []
        self.last: str | None = None

    def space(self, name: str, h: torch.Tensor) -> torch.Tensor:
        if self.block.alignable and name == self.block.output:
            self.outputs.append(h)
            self.last = name
        elif not self.block.alignable and name == self.last and self.outputs:
            self.outputs[-1] = h
        return h


def layer_outputs(net: Network, state: Mapping[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of ``net``'s alignable blocks on ``x``, in order (what layer costs compare)."""
    tap = _LayerOutputs()
    run(net, state, x, tap)
    return tap.outputs
