"""The ``bert`` family: Hugging Face BERT encoders (and sentence-transformers ones) described for
the fusion engine.

The description follows the network's symmetries: one residual **stream** space for the whole
depth (the embeddings' feature axis and LayerNorm, every layer's writers' rows, readers' columns
and LayerNorms); per encoder layer two **attention-head spaces** (``qk``: the query and key units,
one within-head plan shared so that q.k is unchanged; ``vo``: the value units and the output
projection's columns) that share one head permutation, and the **FFN** hidden units. With
permutations fusion is exact; with soft plans the stream is only approximately preserved, since
LayerNorm's statistics are not invariant to mixing units.

Calibration inputs are token ids and masks packed as (n, 2, length) (:func:`~clafuse.textdata.pack_tokens`);
activations and corrections see real tokens only. Post-LN layers have no exact identity: an
inserted layer is fitted to the identity on calibration data (:func:`fit_identity`) and says how
far it is from one. Layer costs use the layers' mean-pooled sentence representations
(:func:`layer_features`, see there for what was measured).
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F

from clafuse.arch.base import Family, Group, LayerInfo
from clafuse.arch.bert_model import (
    BertSpec,
    PackedEncoder,
    activation,
    attend,
    bert_config,
    build_bert,
    check_bert,
    detect_bert,
    instantiate_bert,
    key_bias_from_mask,
    layer_key,
)
from clafuse.arch.network import SEQUENCE_BATCH, Block, Network, Param, Site, Space, Tap
from clafuse.textdata import masked_mean, unpack_tokens

LayerFeatures = Literal["mean", "centred", "tokens"]
LAYER_FEATURES: LayerFeatures = "mean"
BATCH = 64
_EXACT = frozenset(f"{role}.{leaf}" for role in ("attn_out", "ffn_out", "attn_norm", "ffn_norm")
                   for leaf in ("weight", "bias"))


def _mask(tap: Tap, h: torch.Tensor) -> torch.Tensor:
    """The real-token mask of the batch, cut to the hidden state's length."""
    return tap.x[:, 1, :h.shape[1]].bool()


def _token_site(tap: Tap, name: str, z: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor,
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """Site ``name`` seen on real tokens only; a corrected result is put back in place."""
    real = z[mask]
    got = tap.site(name, real, inputs[mask], residual[mask] if residual is not None else None)
    if got is real:
        return z
    out = z.clone()
    out[mask] = got.to(z.dtype)
    return out


def _layer(spec: BertSpec, name: str, keys: Mapping[str, str]) -> Block:
    """Encoder layer ``name`` as a block; ``keys``: local name -> checkpoint key."""
    d, f, heads = spec.hidden, spec.intermediate, spec.heads
    qk, vo, ffn = f"{name}:qk", f"{name}:vo", f"{name}:ffn"
    axes = {"query": (qk, "stream"), "key": (qk, "stream"), "value": (vo, "stream"), "attn_out": ("stream", vo),
            "ffn_in": (ffn, "stream"), "ffn_out": ("stream", ffn)}
    shapes = {"query": (d, d), "key": (d, d), "value": (d, d), "attn_out": (d, d), "ffn_in": (f, d), "ffn_out": (d, f)}
    params = {}
    for role, ax in axes.items():
        params[f"{role}.weight"] = Param(keys[f"{role}.weight"], ax, shapes[role])
        params[f"{role}.bias"] = Param(keys[f"{role}.bias"], ax[:1], shapes[role][:1], "bias")
    for role in ("attn_norm", "ffn_norm"):
        for leaf in ("weight", "bias"):
            params[f"{role}.{leaf}"] = Param(keys[f"{role}.{leaf}"], ("stream",), (d,), "norm")
    spaces = {
        "qk": Space(qk, d, ((keys["query.weight"], keys["query.bias"], keys["key.weight"], keys["key.bias"]),),
                    owner=name, local="qk", heads=heads),
        "vo": Space(vo, d, ((keys["value.weight"], keys["value.bias"], keys["attn_out.weight"]),),
                    owner=name, local="vo", heads=heads),
        "ffn": Space(ffn, f, ((keys["ffn_in.weight"], keys["ffn_in.bias"], keys["ffn_out.weight"]),),
                     owner=name, local="ffn"),
    }

    def forward(t: Mapping[str, torch.Tensor], h: torch.Tensor, tap: Tap) -> torch.Tensor:
        mask = _mask(tap, h)
        q = F.linear(h, t["query.weight"], t["query.bias"])
        k = F.linear(h, t["key.weight"], t["key.bias"])
        v = F.linear(h, t["value.weight"], t["value.bias"])
        tap.space(qk, torch.cat([q[mask], k[mask]]))
        ctx = attend(q, k, v, heads, key_bias_from_mask(mask, h.dtype))
        tap.space(vo, torch.cat([v[mask], ctx[mask]]))
        a = _token_site(tap, "attn_norm", F.layer_norm(h + F.linear(ctx, t["attn_out.weight"], t["attn_out.bias"]),
                                                      (d,), t["attn_norm.weight"], t["attn_norm.bias"], spec.eps),
                        ctx, mask, h)
        z = _token_site(tap, "ffn", F.linear(a, t["ffn_in.weight"], t["ffn_in.bias"]), a, mask)
        u = activation(spec.activation, z)
        tap.space(ffn, u[mask])
        return _token_site(tap, "ffn_norm", F.layer_norm(a + F.linear(u, t["ffn_out.weight"], t["ffn_out.bias"]),
                                                         (d,), t["ffn_norm.weight"], t["ffn_norm.bias"], spec.eps),
                           u, mask, a)

    def identity(template: Block, width: int, in_space: str) -> Block:
        made = f"{template.name}+identity"
        block = _layer(spec.model_copy(update={"hidden": width}), made, {local: f"{made}.{local}" for local in params})
        values = {p.key: torch.ones(p.shape) if local.endswith("norm.weight") else torch.zeros(p.shape)
                  for local, p in block.params.items()}
        return block.with_(inserted=True, exact=_EXACT, values=values, attrs={**block.attrs, "fit": fit_identity})

    writer = dict(eps=spec.eps, residual=True)
    sites = {"attn_norm": Site("stream", "attn_out.weight", "attn_out.bias", norm="attn_norm", **writer),
             "ffn": Site(ffn, "ffn_in.weight", "ffn_in.bias"),
             "ffn_norm": Site("stream", "ffn_out.weight", "ffn_out.bias", norm="ffn_norm", **writer)}
    return Block(name, params, forward, spaces, sites, group=0,
                 output="stream", identity=identity, drop=True, attrs={"eps": spec.eps})


@torch.no_grad()
def fit_identity(block: Block, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> Block:
    """The inserted layer (zero attention and FFN outputs, first LayerNorm with unit gain) with the
    second LayerNorm's gain and bias fitted by least squares, unit by unit, so that the layer's
    output LN(LN(x)) comes closest to its input x on the calibration tokens. Post-LN has no exact
    identity (x is a LayerNorm's output whose gain varies by unit); ``attrs["identity_error"]`` is
    the relative error ||y - x|| / ||x|| that remains."""
    eps = block.attrs["eps"]
    moments = None
    for h, xb in inputs:
        mask = xb[:, 1, :h.shape[1]].bool()
        x = h[mask].double()
        n = F.layer_norm(x, x.shape[-1:], eps=eps)
        part = torch.stack([n.sum(0), x.sum(0), (n * n).sum(0), (n * x).sum(0),
                            torch.full((x.shape[1],), float(len(x)), dtype=torch.float64)])
        moments = part if moments is None else moments + part
    s_n, s_x, s_nn, s_nx, count = moments
    mean_n, mean_x = s_n / count, s_x / count
    var_n = (s_nn / count - mean_n ** 2).clamp_min(1e-12)
    gain = (s_nx / count - mean_n * mean_x) / var_n
    bias = mean_x - gain * mean_n
    values = dict(block.values)
    values[block.params["ffn_norm.weight"].key] = gain.float()
    values[block.params["ffn_norm.bias"].key] = bias.float()
    fitted = block.with_(values=values)
    tensors = {local: fitted.values[p.key].float() for local, p in fitted.params.items()}
    tap = Tap()
    tap.block, tap.tensors = fitted, tensors
    err = total = 0.0
    for h, xb in inputs:
        tap.x = xb
        mask = xb[:, 1, :h.shape[1]].bool()
        y = fitted.forward(tensors, h, tap)
        err += float((y[mask] - h[mask]).double().pow(2).sum())
        total += float(h[mask].double().pow(2).sum())
    return fitted.with_(attrs={**fitted.attrs, "identity_error": (err / max(total, 1e-30)) ** 0.5})


def _embeddings(spec: BertSpec) -> Block:
    p, d = spec.prefix, spec.hidden
    e = f"{p}embeddings."
    params = {
        "word": Param(f"{e}word_embeddings.weight", (None, "stream"), (spec.vocab, d), reads=()),
        "position": Param(f"{e}position_embeddings.weight", (None, "stream"), (spec.max_positions, d), reads=()),
        "token_type": Param(f"{e}token_type_embeddings.weight", (None, "stream"), (spec.type_vocab, d), reads=()),
        "norm.weight": Param(f"{e}LayerNorm.weight", ("stream",), (d,), "norm"),
        "norm.bias": Param(f"{e}LayerNorm.bias", ("stream",), (d,), "norm"),
    }
    if spec.position_ids:
        params["position_ids"] = Param(f"{e}position_ids", (None, None), (1, spec.max_positions), "buffer")

    def forward(t: Mapping[str, torch.Tensor], x: torch.Tensor, tap: Tap) -> torch.Tensor:
        tokens = unpack_tokens(x)
        n = tokens.input_ids.shape[1]
        h = t["word"][tokens.input_ids] + t["position"][:n][None] + t["token_type"][0]
        h = F.layer_norm(h, (d,), t["norm.weight"], t["norm.bias"], spec.eps)
        tap.space("stream", h[tokens.attention_mask.bool()])
        return h

    return Block(f"{e[:-1]}", params, forward, slot="embeddings", output="stream")


def _pooler(spec: BertSpec) -> Block:
    """The pooler (tanh of a Linear on the first token); without a classifier it feeds nothing
    the description computes, so the stream passes through."""
    key = f"{spec.prefix}pooler.dense"
    params = {"weight": Param(f"{key}.weight", ("pooled", "stream"), (spec.hidden, spec.hidden)),
              "bias": Param(f"{key}.bias", ("pooled",), (spec.hidden,), "bias")}
    return Block(key, params, lambda t, h, tap: h, slot="pooler", optional=True)


def _classifier(spec: BertSpec) -> Block:
    """The classifier (with the pooler when it reads the pooled output): the network's logits,
    averaged over real tokens for a token classifier."""
    d, c = spec.hidden, spec.classifier
    pooled = spec.classifier_on == "pooled"
    params = {"weight": Param("classifier.weight", ("logits", "pooled" if pooled else "stream"), (c, d)),
              "bias": Param("classifier.bias", ("logits",), (c,), "bias")}
    if pooled:
        key = f"{spec.prefix}pooler.dense"
        params["pooler.weight"] = Param(f"{key}.weight", ("pooled", "stream"), (d, d))
        params["pooler.bias"] = Param(f"{key}.bias", ("pooled",), (d,), "bias")

    def forward(t: Mapping[str, torch.Tensor], h: torch.Tensor, tap: Tap) -> torch.Tensor:
        if pooled:
            return F.linear(torch.tanh(F.linear(h[:, 0], t["pooler.weight"], t["pooler.bias"])), t["weight"], t["bias"])
        return masked_mean(F.linear(h, t["weight"], t["bias"]), _mask(tap, h))

    return Block("classifier", params, forward, slot="classifier", output="logits", optional=True)


def _sentence(t: Mapping[str, torch.Tensor], h: torch.Tensor, tap: Tap) -> torch.Tensor:
    return masked_mean(h, _mask(tap, h))


class BertFamily(Family):
    name = "bert"
    spec_model = BertSpec
    description = "BERT encoders (Hugging Face / sentence-transformers layouts), post-LN"

    def detect(self, state_dict: Mapping[str, torch.Tensor]) -> BertSpec | None:
        return detect_bert(state_dict)

    def detect_config(self, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None) -> BertSpec | None:
        return detect_bert(state_dict, config)

    def check(self, spec: BertSpec, state_dict: Mapping[str, torch.Tensor]) -> None:
        check_bert(spec, state_dict)

    def traits(self, spec: BertSpec) -> dict[str, object]:
        """Heads never mix (softmax is per head), and embedding rows are token ids and positions:
        the widths may differ, these may not."""
        return {"attention heads": spec.heads, "vocabulary": spec.vocab, "positions": spec.max_positions,
                "token types": spec.type_vocab, "activation": spec.activation}

    def build(self, spec: BertSpec) -> torch.nn.Module:
        return build_bert(spec)

    def calibration_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return PackedEncoder(module)

    def embeds(self, spec: BertSpec) -> bool:
        return spec.classifier is None

    def token_limits(self, spec: BertSpec) -> tuple[int, int]:
        return spec.max_positions, spec.vocab

    def config(self, spec: BertSpec, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return bert_config(spec, base)

    def groups(self, spec: BertSpec) -> list[Group]:
        d, f = spec.hidden, spec.intermediate
        params = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d
        return [Group("layers", tuple(LayerInfo(f"{spec.prefix}encoder.layer.{i}", d, params, "encoder layer")
                                      for i in range(spec.layers)))]

    def describe(self, spec: BertSpec) -> Network:
        d = spec.hidden
        spaces = {"stream": Space("stream", d, ((f"{spec.prefix}embeddings.word_embeddings.weight",
                                                 f"{spec.prefix}embeddings.position_embeddings.weight"),))}
        blocks = [_embeddings(spec)]
        for i in range(spec.layers):
            name = f"{spec.prefix}encoder.layer.{i}"
            keys = {f"{role}.{leaf}": f"{layer_key(spec, i, role)}.{leaf}"
                    for role in ("query", "key", "value", "attn_out", "attn_norm", "ffn_in", "ffn_out", "ffn_norm")
                    for leaf in ("weight", "bias")}
            blocks.append(_layer(spec, name, keys))
        if spec.pooler or spec.classifier is not None:
            # The pooler's units are matched by its rows like any hidden units (the target's order
            # is kept either way), so that poolers of different widths fuse too.
            pooler = f"{spec.prefix}pooler.dense"
            spaces["pooled"] = Space("pooled", d, ((f"{pooler}.weight", f"{pooler}.bias"),))
        if spec.pooler and not (spec.classifier is not None and spec.classifier_on == "pooled"):
            blocks.append(_pooler(spec))
        if spec.classifier is not None:
            spaces["logits"] = Space("logits", spec.classifier, fixed=True)
            blocks.append(_classifier(spec))
        else:
            blocks.append(Block("sentence", {}, _sentence, slot="sentence"))
        return Network(spaces, blocks, batch=SEQUENCE_BATCH, ridge=1.0)

    def forward(self, spec: BertSpec, state_dict: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Logits with a classifier, else mean-pooled sentence embeddings, on packed tokens ``x``."""
        net = PackedEncoder(instantiate_bert(spec, state_dict))
        with torch.no_grad():
            return torch.cat([net(x[start:start + BATCH]) for start in range(0, len(x), BATCH)])

    def layer_outputs(self, spec: BertSpec, state_dict: Mapping[str, torch.Tensor],
                      x: torch.Tensor) -> list[torch.Tensor]:
        """Per encoder layer, its output as :func:`layer_features` describes it."""
        net = instantiate_bert(spec, state_dict)
        states: list[list[torch.Tensor]] = [[] for _ in range(spec.layers)]
        ids = []
        with torch.no_grad():
            for start in range(0, len(x), BATCH):
                b = unpack_tokens(x[start:start + BATCH])
                hidden = net.hidden_states(b.input_ids, b.attention_mask)[1:]
                mask = b.attention_mask.bool()
                for i, h in enumerate(hidden):
                    states[i].append(layer_features(h, mask, LAYER_FEATURES))
                ids.append(b.input_ids[mask])
        token_ids = torch.cat(ids)
        out = [torch.cat(s) for s in states]
        return [centre_by_token(z, token_ids) for z in out] if LAYER_FEATURES == "centred" else out


def layer_features(h: torch.Tensor, mask: torch.Tensor, how: LayerFeatures) -> torch.Tensor:
    """A layer's output (n, length, d) as rows for a layer cost: ``mean``, one mean-pooled row per
    sentence (what a sentence encoder outputs); ``tokens`` or ``centred`` (centred later by
    :func:`centre_by_token`), one row per real token.

    Measured on all-MiniLM-L6-v2 vs paraphrase-MiniLM-L3-v2 (see README): plain token-level CKA is
    dominated by which words occur and ranks layers by closeness to the embeddings.
    """
    if how == "mean":
        return masked_mean(h, mask.long())
    return h[mask]


def centre_by_token(z: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Token rows with each token id's mean row subtracted: what is left is what the context
    added, not which word it is."""
    uniq, inverse = torch.unique(token_ids, return_inverse=True)
    sums = torch.zeros(len(uniq), z.shape[1], dtype=z.dtype).index_add_(0, inverse, z)
    counts = torch.bincount(inverse, minlength=len(uniq)).to(z.dtype)[:, None]
    return z - (sums / counts)[inverse]
