"""BERT encoders in plain torch, with Hugging Face's state-dict layout.

Covers ``BertModel``, ``BertForSequenceClassification`` / ``BertForTokenClassification`` (a
``bert.`` prefix plus a top-level ``classifier``) and sentence-transformers checkpoints (plain keys,
or ``0.auto_model.`` when a whole ``SentenceTransformer`` was saved). The network is post-LN:
``h = LN1(x + Attn(x))``, ``y = LN2(h + FFN(h))``. The module built here has exactly the
checkpoint's keys, so weights load with ``strict=True`` and a state dict written from it loads
strictly into ``transformers.BertModel``.

The number of attention heads does not show in any shape: it comes from ``config.json``
(``num_attention_heads``) or the caller; without either, :func:`detect_bert` assumes BERT's head
size of 64 (``heads = hidden // 64``), which is right for Google's BERT checkpoints and wrong for
MiniLM (head size 32), so pass the config for those.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, ValidationError, model_validator
from torch import nn

from clafuse.arch.base import check_shapes
from clafuse.errors import DataError, SpecError
from clafuse.textdata import TokenBatch, masked_mean, unpack_tokens

DEFAULT_HEAD_SIZE = 64
Activation = Literal["gelu", "gelu_tanh", "relu"]
_HF_ACTIVATIONS: dict[str, Activation] = {
    "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_WORD_KEY = "embeddings.word_embeddings.weight"
_LAYER_KEY = re.compile(r"encoder\.layer\.(\d+)\.")


class BertSpec(BaseModel):
    """The shape of a BERT encoder and where its keys live."""

    family: Literal["bert"] = "bert"
    layers: int = Field(ge=0)
    hidden: int = Field(gt=0)
    heads: int = Field(gt=0)
    intermediate: int = Field(gt=0)
    vocab: int = Field(gt=0)
    max_positions: int = Field(gt=0)
    type_vocab: int = Field(gt=0)
    eps: float = Field(default=1e-12, gt=0)
    activation: Activation = "gelu"
    prefix: str = ""
    """Key prefix of the encoder: ``""``, ``"bert."``, ``"0.auto_model."``, ..."""
    pooler: bool = False
    position_ids: bool = False
    """Whether the checkpoint stores the ``embeddings.position_ids`` buffer (older transformers)."""
    classifier: int | None = Field(default=None, gt=0)
    """Number of labels of a top-level ``classifier`` Linear, if any."""
    classifier_on: Literal["pooled", "tokens"] = "pooled"

    @model_validator(mode="after")
    def _consistent(self) -> "BertSpec":
        if self.hidden % self.heads:
            raise ValueError(f"hidden size {self.hidden} is not a multiple of {self.heads} heads")
        if self.classifier is not None and self.classifier_on == "pooled" and not self.pooler:
            raise ValueError("a classifier on the pooled output needs the pooler")
        if self.prefix and not self.prefix.endswith("."):
            raise ValueError(f"prefix {self.prefix!r} must end with '.'")
        return self

    @property
    def head_size(self) -> int:
        return self.hidden // self.heads


LAYER_PARTS: dict[str, str] = {
    "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
    "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
    "ffn_in": "intermediate.dense", "ffn_out": "output.dense", "ffn_norm": "output.LayerNorm"}
"""Each part of an encoder layer (Linear or LayerNorm, with ``.weight`` and ``.bias``) by role:
``query``/``key``/``value``/``ffn_in`` read the residual stream (its units are their columns),
``attn_out``/``ffn_out`` write it (rows), the two LayerNorms act on it unit by unit."""


def layer_key(spec: BertSpec, layer: int, role: str) -> str:
    """The key prefix of ``role`` (see :data:`LAYER_PARTS`) in encoder layer ``layer``."""
    return f"{spec.prefix}encoder.layer.{layer}.{LAYER_PARTS[role]}"


def bert_shapes(spec: BertSpec) -> dict[str, tuple[int, ...]]:
    """Every key of a checkpoint with this spec and its shape, in Hugging Face's order."""
    p, d, f = spec.prefix, spec.hidden, spec.intermediate
    shapes: dict[str, tuple[int, ...]] = {
        f"{p}embeddings.word_embeddings.weight": (spec.vocab, d),
        f"{p}embeddings.position_embeddings.weight": (spec.max_positions, d),
        f"{p}embeddings.token_type_embeddings.weight": (spec.type_vocab, d),
        f"{p}embeddings.LayerNorm.weight": (d,),
        f"{p}embeddings.LayerNorm.bias": (d,),
    }
    if spec.position_ids:
        shapes[f"{p}embeddings.position_ids"] = (1, spec.max_positions)
    for i in range(spec.layers):
        for role, (rows, cols) in (("query", (d, d)), ("key", (d, d)), ("value", (d, d)), ("attn_out", (d, d)),
                                   ("attn_norm", (d, 0)), ("ffn_in", (f, d)), ("ffn_out", (d, f)),
                                   ("ffn_norm", (d, 0))):
            key = layer_key(spec, i, role)
            shapes[f"{key}.weight"] = (rows, cols) if cols else (rows,)
            shapes[f"{key}.bias"] = (rows,)
    if spec.pooler:
        shapes[f"{p}pooler.dense.weight"] = (d, d)
        shapes[f"{p}pooler.dense.bias"] = (d,)
    if spec.classifier is not None:
        shapes["classifier.weight"] = (spec.classifier, d)
        shapes["classifier.bias"] = (spec.classifier,)
    return shapes


def _find_prefix(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    prefixes = [k[: -len(_WORD_KEY)] for k in state_dict if k.endswith(_WORD_KEY)]
    prefixes = [p for p in prefixes if p == "" or p.endswith(".")]
    if len(prefixes) > 1:
        raise SpecError(f"found several BERT encoders (key prefixes {', '.join(repr(p) for p in prefixes)})")
    return prefixes[0] if prefixes else None


def detect_bert(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None,
                heads: int | None = None) -> BertSpec | None:
    """A spec if ``state_dict`` is a BERT encoder, else None.

    Sizes come from the shapes; the head count from ``heads``, else ``config["num_attention_heads"]``,
    else ``hidden // 64``. ``config`` (a Hugging Face ``config.json``) also supplies the LayerNorm
    eps and activation. Raises SpecError when the keys are BERT's but something does not fit.
    """
    prefix = _find_prefix(state_dict)
    if prefix is None or f"{prefix}embeddings.LayerNorm.weight" not in state_dict:
        return None
    config = dict(config or {})
    vocab, hidden = (int(n) for n in state_dict[f"{prefix}{_WORD_KEY}"].shape)
    layer_ids = {int(m.group(1)) for k in state_dict if k.startswith(prefix)
                 and (m := _LAYER_KEY.match(k[len(prefix):]))}
    layers = len(layer_ids)
    if layer_ids != set(range(layers)):
        raise SpecError(f"BERT layers are numbered {sorted(layer_ids)}, expected 0..{layers - 1}")
    inter = state_dict.get(f"{prefix}encoder.layer.0.intermediate.dense.weight")
    intermediate = int(inter.shape[0]) if inter is not None else int(config.get("intermediate_size", 4 * hidden))
    if heads is None:
        heads = config.get("num_attention_heads")
    if heads is None:
        if hidden % DEFAULT_HEAD_SIZE:
            raise SpecError(f"cannot tell the number of attention heads of a BERT of width {hidden}: "
                            "give its config.json (num_attention_heads)")
        heads = hidden // DEFAULT_HEAD_SIZE
    act = str(config.get("hidden_act", "gelu"))
    if act not in _HF_ACTIVATIONS:
        raise SpecError(f"BERT activation {act!r} is not supported (use one of {', '.join(_HF_ACTIVATIONS)})")
    classifier = state_dict.get("classifier.weight")
    pooler = f"{prefix}pooler.dense.weight" in state_dict
    fields = dict(
        layers=layers, hidden=hidden, heads=int(heads), intermediate=intermediate, vocab=vocab,
        max_positions=int(state_dict[f"{prefix}embeddings.position_embeddings.weight"].shape[0]),
        type_vocab=int(state_dict[f"{prefix}embeddings.token_type_embeddings.weight"].shape[0]),
        eps=float(config.get("layer_norm_eps", 1e-12)), activation=_HF_ACTIVATIONS[act], prefix=prefix,
        pooler=pooler, position_ids=f"{prefix}embeddings.position_ids" in state_dict,
        classifier=int(classifier.shape[0]) if classifier is not None else None,
        classifier_on="pooled" if pooler or classifier is None else "tokens")
    try:
        spec = BertSpec(**fields)
    except ValidationError as exc:
        raise SpecError(f"not a valid BERT: {exc.errors()[0]['msg']}") from exc
    check_bert(spec, state_dict)
    return spec


def check_bert(spec: BertSpec, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise SpecError unless ``state_dict`` has exactly the keys and shapes ``spec`` implies."""
    check_shapes(bert_shapes(spec), state_dict,
                 f" (BERT, {spec.layers} layers, width {spec.hidden}, prefix {spec.prefix!r})")


def bert_config(spec: BertSpec, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A Hugging Face ``config.json`` for ``spec``: ``base`` (the parent's config) with its sizes replaced."""
    hf_act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}[spec.activation]
    config = dict(base or {"model_type": "bert", "architectures": ["BertModel"], "position_embedding_type": "absolute"})
    if base and config.get("hidden_act") in _HF_ACTIVATIONS and _HF_ACTIVATIONS[config["hidden_act"]] == spec.activation:
        hf_act = config["hidden_act"]
    config.update(num_hidden_layers=spec.layers, hidden_size=spec.hidden, num_attention_heads=spec.heads,
                  intermediate_size=spec.intermediate, vocab_size=spec.vocab,
                  max_position_embeddings=spec.max_positions, type_vocab_size=spec.type_vocab,
                  layer_norm_eps=spec.eps, hidden_act=hf_act)
    if spec.classifier is not None:
        config["num_labels"] = spec.classifier
    return config


def activation(name: Activation, x: torch.Tensor) -> torch.Tensor:
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return F.relu(x)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
           key_bias: torch.Tensor | None) -> torch.Tensor:
    """Multi-head scaled dot-product attention on (batch, tokens, width) projections.

    Head ``h`` owns units ``h*d .. (h+1)*d - 1`` of each projection (d = width // heads).
    ``key_bias`` (batch, tokens) is added to every score for that key (0 or a large negative).
    """
    b, n, width = q.shape
    d = width // heads
    q, k, v = (t.reshape(b, n, heads, d).transpose(1, 2) for t in (q, k, v))
    mask = None if key_bias is None else key_bias[:, None, None, :].to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, width)


def key_bias_from_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive attention bias: 0 for real tokens, the dtype's lowest value for padding."""
    if mask is None:
        return None
    return (1.0 - mask.to(dtype)) * torch.finfo(dtype).min


class _Named(nn.Module):
    """A container whose children are given by name (``LayerNorm``, ``0``, ...)."""

    def __init__(self, children: Mapping[str, nn.Module]) -> None:
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


def _embedding(rows: int, width: int) -> nn.Embedding:
    """``nn.Embedding(rows, width)`` as torch initialises it (standard normal), except on the meta
    device, where the values are never read: torch's normal_ there imports its reference kernels,
    about 2 s once per process, a fifth of what ``fuse`` of a MiniLM pair spends outside its work."""
    weight = torch.empty(rows, width)
    if not weight.is_meta:
        nn.init.normal_(weight)
    return nn.Embedding(rows, width, _weight=weight)


class BertEmbeddings(nn.Module):
    def __init__(self, spec: BertSpec) -> None:
        super().__init__()
        self.word_embeddings = _embedding(spec.vocab, spec.hidden)
        self.position_embeddings = _embedding(spec.max_positions, spec.hidden)
        self.token_type_embeddings = _embedding(spec.type_vocab, spec.hidden)
        self.LayerNorm = nn.LayerNorm(spec.hidden, eps=spec.eps)
        if spec.position_ids:
            self.register_buffer("position_ids", torch.arange(spec.max_positions)[None], persistent=True)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        n = input_ids.shape[1]
        positions = torch.arange(n, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class BertLayer(nn.Module):
    """One post-LN encoder layer, with Hugging Face's module names."""

    def __init__(self, spec: BertSpec) -> None:
        super().__init__()
        d, f = spec.hidden, spec.intermediate
        self.heads, self.act = spec.heads, spec.activation
        self.attention = _Named({
            "self": _Named({"query": nn.Linear(d, d), "key": nn.Linear(d, d), "value": nn.Linear(d, d)}),
            "output": _Named({"dense": nn.Linear(d, d), "LayerNorm": nn.LayerNorm(d, eps=spec.eps)})})
        self.intermediate = _Named({"dense": nn.Linear(d, f)})
        self.output = _Named({"dense": nn.Linear(f, d), "LayerNorm": nn.LayerNorm(d, eps=spec.eps)})

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor | None = None) -> torch.Tensor:
        att, out = self.attention.self, self.attention.output
        ctx = attend(att.query(x), att.key(x), att.value(x), self.heads, key_bias)
        h = out.LayerNorm(x + out.dense(ctx))
        return self.output.LayerNorm(h + self.output.dense(activation(self.act, self.intermediate.dense(h))))


def _encoder_parts(spec: BertSpec) -> dict[str, nn.Module]:
    parts: dict[str, nn.Module] = {
        "embeddings": BertEmbeddings(spec),
        "encoder": _Named({"layer": nn.ModuleList(BertLayer(spec) for _ in range(spec.layers))})}
    if spec.pooler:
        parts["pooler"] = _Named({"dense": nn.Linear(spec.hidden, spec.hidden)})
    return parts


class BertNet(nn.Module):
    """Hugging Face's ``BertModel`` (without dropout) at its checkpoint's key prefix, plus the
    top-level classifier when there is one."""

    def __init__(self, spec: BertSpec) -> None:
        super().__init__()
        self.spec = spec
        self._path = spec.prefix.split(".")[:-1]
        parts = _encoder_parts(spec)
        if self._path:
            body: nn.Module = _Named(parts)
            for name in reversed(self._path[1:]):
                body = _Named({name: body})
            self.add_module(self._path[0], body)
        else:
            for name, module in parts.items():
                self.add_module(name, module)
        if spec.classifier is not None:
            self.classifier = nn.Linear(spec.hidden, spec.classifier)

    @property
    def body(self) -> nn.Module:
        """The module holding ``embeddings``, ``encoder`` and ``pooler`` (self when there is no prefix)."""
        module: nn.Module = self
        for name in self._path:
            module = getattr(module, name)
        return module

    @property
    def layers(self) -> nn.ModuleList:
        return self.body.encoder.layer

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The embeddings' output and every layer's output, each (batch, tokens, hidden)."""
        if input_ids.shape[1] > self.spec.max_positions:
            raise DataError(f"sequences of {input_ids.shape[1]} tokens exceed the model's "
                            f"{self.spec.max_positions} positions; tokenize with a smaller max length")
        if input_ids.numel() and int(input_ids.max()) >= self.spec.vocab:
            raise DataError(f"token id {int(input_ids.max())} does not fit the model's vocabulary of {self.spec.vocab}")
        x = self.body.embeddings(input_ids, token_type_ids)
        bias = key_bias_from_mask(attention_mask, x.dtype)
        states = [x]
        for layer in self.layers:
            x = layer(x, bias)
            states.append(x)
        return states

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The last hidden state (batch, tokens, hidden)."""
        return self.hidden_states(input_ids, attention_mask, token_type_ids)[-1]

    def pooled(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooler: tanh of a Linear on the first ([CLS]) token."""
        return torch.tanh(self.body.pooler.dense(last_hidden[:, 0]))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits when there is a classifier, else the last hidden state."""
        hidden = self.encode(input_ids, attention_mask, token_type_ids)
        if self.spec.classifier is None:
            return hidden
        return self.classifier(self.pooled(hidden) if self.spec.classifier_on == "pooled" else hidden)


class PackedEncoder(nn.Module):
    """A :class:`BertNet` called on packed token ids and masks (n, 2, length), as calibration data
    holds them: its logits with a classifier on the pooled token, else its outputs mean-pooled over
    real tokens (sentence embeddings, or a token classifier's mean logits)."""

    def __init__(self, net: BertNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = unpack_tokens(x)
        out = self.net(tokens.input_ids, tokens.attention_mask)
        if self.net.spec.classifier is not None and self.net.spec.classifier_on == "pooled":
            return out
        return masked_mean(out, tokens.attention_mask)


def build_bert(spec: BertSpec) -> BertNet:
    """A plain-torch BERT whose ``state_dict()`` has exactly the keys and shapes of :func:`bert_shapes`."""
    return BertNet(spec)


def instantiate_bert(spec: BertSpec, state_dict: Mapping[str, torch.Tensor]) -> BertNet:
    """The network with ``state_dict`` loaded strictly, float32, eval mode (built on the meta device)."""
    check_bert(spec, state_dict)
    with torch.device("meta"):
        net = build_bert(spec)
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    net.load_state_dict(tensors, strict=True, assign=True)
    return net.eval()


@torch.no_grad()
def sentence_embeddings(net: BertNet, tokens: TokenBatch, normalize: bool = True,
                        batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled embeddings over real tokens (sentence-transformers' pooling), L2-normalised
    unless ``normalize=False``, one row per sentence in input order. Sentences are batched by
    length so that little time goes into padding."""
    emb = torch.zeros(len(tokens), net.spec.hidden)
    for rows, batch in tokens.batches_by_length(batch_size):
        emb[rows] = masked_mean(net.encode(batch.input_ids, batch.attention_mask), batch.attention_mask)
    return F.normalize(emb, dim=-1) if normalize else emb
