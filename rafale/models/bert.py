"""BERT and RoBERTa: the bidirectional encoder, its task heads, presets, and the map to and from their checkpoints.

RoBERTa is BERT with other presets and two differences, each a test of `family`: positions count real tokens
from `pad_token_id + 1` (fairseq's layout), and its classification head puts dropout before the dense layer and
keeps that layer under `classifier.` instead of the pooler. Attention and the MLP are the shared blocks; the
layer around them is post-norm, as BERT was trained.

Like pythia.py, this module defines the names weights.py and `rafale.models` look up, and reads two model_types
(MODEL_TYPES) for two families.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from rafale.errors import RafaleError
from rafale.models.blocks import MLP, Attention
from rafale.models.loss import IGNORE_INDEX, linear_cross_entropy

MODEL_TYPES = ("bert", "roberta")
HEADS = ("mlm", "classification", "none")


@dataclass
class EncoderConfig:
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    # Hidden and attention dropout alike (BERT and RoBERTa ship both at 0.1).
    dropout: float = 0.1
    # Dropout of the classification head; None uses `dropout` (as transformers does).
    classifier_dropout: float | None = None
    pad_token_id: int = 0
    tie_embeddings: bool = True
    init_std: float = 0.02
    family: str = "bert"
    # What forward returns: MLM logits [B, T, vocab], class logits [B, num_labels], or hidden states [B, T, hidden].
    head: str = "mlm"
    num_labels: int = 2
    # Class names by index, kept so an exported classifier says what its outputs mean; None: LABEL_0, LABEL_1, ...
    id2label: dict[int, str] | None = None

    def __post_init__(self):
        for key in ("vocab_size", "hidden_size", "n_layers", "n_heads", "intermediate_size", "max_position_embeddings"):
            if getattr(self, key) <= 0:
                raise RafaleError(f"model.{key}: must be > 0, got {getattr(self, key)}")
        for key, valid in (("family", MODEL_TYPES), ("head", HEADS)):
            if getattr(self, key) not in valid:
                raise RafaleError(f"model.{key}: {getattr(self, key)!r} is not one of {', '.join(valid)}")
        if self.hidden_size % self.n_heads:
            raise RafaleError(
                f"model.hidden_size: {self.hidden_size} is not divisible by model.n_heads ({self.n_heads})"
            )
        for key in ("type_vocab_size", "num_labels"):
            if getattr(self, key) <= 0:
                raise RafaleError(f"model.{key}: must be > 0, got {getattr(self, key)}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise RafaleError(f"model.pad_token_id: {self.pad_token_id} is not a token id below {self.vocab_size}")
        if self.family == "roberta" and self.max_position_embeddings <= self.pad_token_id + 1:
            raise RafaleError(
                f"model.max_position_embeddings: RoBERTa positions start at pad_token_id + 1 = {self.pad_token_id + 1}"
            )
        for key in ("dropout", "classifier_dropout"):
            value = getattr(self, key)
            if value is not None and not 0 <= value < 1:
                raise RafaleError(f"model.{key}: must be in [0, 1), got {value}")
        if self.id2label is not None:
            self.id2label = {int(i): str(label) for i, label in self.id2label.items()}
            if sorted(self.id2label) != list(range(self.num_labels)):
                raise RafaleError(f"model.id2label: needs one label for each of the {self.num_labels} classes")

    # The switches the shared blocks read: BERT's attention and MLP are plain multi-head, GELU, with biases.
    attention_bias = mlp_bias = True
    mlp = "gelu"

    @property
    def kv_heads(self) -> int:
        return self.n_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]


class EncoderBlock(nn.Module):
    """One post-norm layer: x = norm1(x + attn(x)); x = norm2(x + mlp(x))."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.attn = Attention(config)
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = MLP(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.attn(x, mask=mask)))
        return self.norm2(x + self.drop(self.mlp(x)))


class MLMHead(nn.Module):
    """dense, GELU, LayerNorm, then the vocabulary projection (tied to the word embeddings) with its own bias."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before the vocabulary projection."""
        return self.norm(F.gelu(self.dense(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """attention_mask [B, T] (1 = real) -> [B, 1, T, T] bool: every query sees the real keys, and itself.

    Seeing itself changes nothing for a real query; it keeps an all-padding row from attending to nothing,
    which gives NaN that a later layer would spread (0 weight * NaN value = NaN).
    """
    T = attention_mask.shape[-1]
    real = attention_mask.bool()[:, None, None, :]
    return real | torch.eye(T, dtype=torch.bool, device=attention_mask.device)


class Encoder(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        # RoBERTa's padding position gets no gradient either, as in fairseq.
        pos_padding = c.pad_token_id if c.family == "roberta" else None
        self.pos_embed = nn.Embedding(c.max_position_embeddings, c.hidden_size, padding_idx=pos_padding)
        self.type_embed = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.embed_norm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(c) for _ in range(c.n_layers))
        if c.head == "mlm":
            self.mlm = MLMHead(c)
        # The pooler (dense + tanh on the first token) is part of the bare checkpoints (BertModel, RobertaModel)
        # and of BERT's classifier; RoBERTa's classification head has the same layer under another name.
        if c.head in ("none", "classification"):
            self.pooler = nn.Linear(c.hidden_size, c.hidden_size)
        if c.head == "classification":
            self.head_drop = nn.Dropout(c.dropout if c.classifier_dropout is None else c.classifier_dropout)
            self.classifier = nn.Linear(c.hidden_size, c.num_labels)
        self.apply(self._init_weights)
        if c.head == "mlm" and c.tie_embeddings:
            self.mlm.decoder.weight = self.embed.weight

    def _init_weights(self, module: nn.Module):
        # BERT's init: matrices N(0, init_std), biases zero, norms one, padding rows zero.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """BERT counts 0, 1, 2, ...; RoBERTa numbers non-pad tokens from pad_token_id + 1 and gives pads pad_token_id.

        RoBERTa's positions follow the pad tokens in input_ids (not attention_mask), as transformers does.
        """
        T = input_ids.shape[1]
        if self.config.family == "bert":
            return torch.arange(T, device=input_ids.device)[None]
        real = input_ids.ne(self.config.pad_token_id).long()
        return real.cumsum(-1) * real + self.config.pad_token_id

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> MLM logits [B, T, vocab], class logits [B, num_labels] or hidden states [B, T, C].

        attention_mask [B, T]: 1 = real token, 0 = padding. token_type_ids [B, T]: segment ids (default all 0).
        With the MLM head, labels [B, T] (the original id of each masked token, -100 elsewhere) make it return the
        mean cross-entropy instead: the head runs on the masked positions only (15% of them in BERT's recipe),
        its projection and the loss fused (loss.py).
        """
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embed(input_ids) + self.type_embed(token_type_ids) + self.pos_embed(self.position_ids(input_ids))
        x = self.drop(self.embed_norm(x))
        # One check per forward: without padding, SDPA runs with no mask at all.
        mask = None if attention_mask is None or bool(attention_mask.all()) else padding_mask(attention_mask)
        for block in self.blocks:
            x = block(x, mask)

        head = self.config.head
        if head == "mlm" and labels is not None:
            masked = labels != IGNORE_INDEX
            decoder = self.mlm.decoder
            return linear_cross_entropy(self.mlm.transform(x[masked]), decoder.weight, labels[masked], decoder.bias)
        if head == "mlm":
            return self.mlm(x)
        if head == "classification":
            first = x[:, 0]
            if self.config.family == "roberta":
                first = self.head_drop(first)
            return self.classifier(self.head_drop(torch.tanh(self.pooler(first))))
        return x

    def num_parameters(self) -> int:
        """Trainable parameters; the tied MLM decoder counts once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), counted as for the decoder: 6 per matmul weight plus
        12 * layers * hidden * seq_len for attention. The embedding tables are lookups; the MLM head is counted at
        every position, tied or not (in training it runs at the masked ones only: see mlm_head_flops_per_token).
        The classification head runs once per row: left out."""
        c = self.config
        lookups = self.embed.weight.numel() + self.pos_embed.weight.numel() + self.type_embed.weight.numel()
        matmul_params = self.num_parameters() - lookups
        if c.head == "mlm" and c.tie_embeddings:
            matmul_params += self.embed.weight.numel()
        return 6 * matmul_params + 12 * c.n_layers * c.hidden_size * seq_len

    def mlm_head_flops_per_token(self) -> float:
        """Training FLOPs of the MLM head's two matmuls at one position."""
        return 6 * (self.mlm.dense.weight.numel() + self.mlm.decoder.weight.numel())


# What BERT and RoBERTa base share (the BERT paper, section 3, and the released config.json files).
_BASE = dict(hidden_size=768, n_layers=12, n_heads=12, intermediate_size=3072, dropout=0.1, head="mlm")
_BERT = dict(vocab_size=30522, max_position_embeddings=512, type_vocab_size=2, norm_eps=1e-12, pad_token_id=0)
# RoBERTa reserves positions 0 and 1 (below and at the pad id): 512 tokens need 514 rows.
_ROBERTA = dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, norm_eps=1e-5, pad_token_id=1)
_TINY = dict(vocab_size=128, hidden_size=64, n_layers=2, n_heads=4, intermediate_size=256, head="mlm")

PRESETS = {
    "bert-base-uncased": dict(_BERT, **_BASE, family="bert"),
    # google/bert_uncased_L-2_H-128_A-2 (Turc et al., "Well-Read Students Learn Better").
    "bert-tiny": dict(_BERT, hidden_size=128, n_layers=2, n_heads=2, intermediate_size=512, head="mlm", family="bert"),
    "roberta-base": dict(_ROBERTA, **_BASE, family="roberta"),
    # For tests and smoke runs: train in seconds on a CPU.
    "bert-test-tiny": dict(_BERT, **_TINY, max_position_embeddings=64, family="bert"),
    "roberta-test-tiny": dict(_ROBERTA, **_TINY, max_position_embeddings=66, family="roberta"),
}


_ARCHITECTURES = {"mlm": "ForMaskedLM", "classification": "ForSequenceClassification", "none": "Model"}
_CLASS_PREFIX = {"bert": "Bert", "roberta": "Roberta"}


def _head_of(architectures: list[str], family: str) -> str:
    """The head of the first architecture rafale knows; a folder that names none is read as the bare encoder."""
    for name in architectures:
        for head, suffix in _ARCHITECTURES.items():
            if name == _CLASS_PREFIX[family] + suffix:
                return head
    if not architectures:
        return "none"
    valid = ", ".join(_CLASS_PREFIX[family] + suffix for suffix in _ARCHITECTURES.values())
    raise RafaleError(f"architectures: {', '.join(architectures)} is not supported; valid: {valid}")


def config_from_hf(hf: dict) -> EncoderConfig:
    """A bert or roberta config.json; `architectures` decides the head."""
    family = hf.get("model_type")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise RafaleError(f"hidden_act: {hf['hidden_act']!r} is not supported for {family} (only 'gelu')")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise RafaleError(
            f"position_embedding_type: {hf['position_embedding_type']!r} is not supported (only 'absolute')"
        )
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise RafaleError(f"is_decoder: {family} as a decoder is not supported (only the bidirectional encoder)")
    head = _head_of(hf.get("architectures") or [], family)
    id2label = hf.get("id2label")
    pad_token_id = hf.get("pad_token_id")
    num_labels = len(id2label) if id2label else hf.get("num_labels", 2)
    try:
        return EncoderConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            norm_eps=hf.get("layer_norm_eps", 1e-12),
            dropout=hf.get("hidden_dropout_prob", 0.1),
            classifier_dropout=hf.get("classifier_dropout"),
            pad_token_id=(1 if family == "roberta" else 0) if pad_token_id is None else pad_token_id,
            tie_embeddings=hf.get("tie_word_embeddings", True),
            init_std=hf.get("initializer_range", 0.02),
            family=family,
            head=head,
            num_labels=num_labels,
            id2label=id2label,
        )
    except KeyError as e:
        raise RafaleError(f"missing key {e.args[0]!r}") from None


def config_to_hf(config: EncoderConfig) -> dict:
    """The config.json transformers needs to rebuild the model as Bert*/Roberta* of the config's head."""
    c = config
    hf = {
        "architectures": [_CLASS_PREFIX[c.family] + _ARCHITECTURES[c.head]],
        "model_type": c.family,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings,
        "type_vocab_size": c.type_vocab_size,
        "hidden_act": "gelu",
        "position_embedding_type": "absolute",
        "layer_norm_eps": c.norm_eps,
        "hidden_dropout_prob": c.dropout,
        "attention_probs_dropout_prob": c.dropout,
        "classifier_dropout": c.classifier_dropout,
        "pad_token_id": c.pad_token_id,
        "tie_word_embeddings": c.tie_embeddings,
        "initializer_range": c.init_std,
    }
    if c.head == "classification":
        id2label = c.id2label or {i: f"LABEL_{i}" for i in range(c.num_labels)}
        hf["id2label"] = {str(i): label for i, label in id2label.items()}
        hf["label2id"] = {label: i for i, label in id2label.items()}
    return hf


# rafale name -> checkpoint name, inside one layer (weights and biases alike). Query, key and value are three
# tensors in the checkpoint and one fused projection here, stacked by rows in that order (see weight_names).
_QKV = ("attention.self.query", "attention.self.key", "attention.self.value")
_LAYER = {
    "attn.proj": "attention.output.dense",
    "norm1": "attention.output.LayerNorm",
    "mlp.up": "intermediate.dense",
    "mlp.down": "output.dense",
    "norm2": "output.LayerNorm",
}
_EMBEDDINGS = {
    "embed.weight": "embeddings.word_embeddings.weight",
    "pos_embed.weight": "embeddings.position_embeddings.weight",
    "type_embed.weight": "embeddings.token_type_embeddings.weight",
    "embed_norm.weight": "embeddings.LayerNorm.weight",
    "embed_norm.bias": "embeddings.LayerNorm.bias",
}
# The MLM head of each family: where it lives, and its dense and norm layers.
_MLM = {
    "bert": ("cls.predictions.", "transform.dense", "transform.LayerNorm"),
    "roberta": ("lm_head.", "dense", "layer_norm"),
}

# Never loaded: buffers older checkpoints saved, copies of the tied decoder, and the heads of other tasks
# (next-sentence prediction, a pooler or classifier this model does not use), which a task model drops.
IGNORED_HF = re.compile(
    r"embeddings\.(position_ids|token_type_ids)$|^(cls|lm_head|classifier)\.|(^|\.)pooler\.dense\.(weight|bias)$"
)


def weight_names(config: EncoderConfig, prefix: str | None = None) -> dict[str, str | dict[str, int]]:
    """Every rafale tensor name -> its checkpoint name, or {name: rows} for the fused QKV (three stacked by rows).

    The encoder's names carry `bert.`/`roberta.` inside a task model and none in a bare one, as transformers
    saves them; `prefix` overrides that, for checkpoints saved the other way.
    """
    if prefix is None:
        prefix = "" if config.head == "none" else f"{config.family}."
    names: dict[str, str | dict[str, int]] = {ours: prefix + theirs for ours, theirs in _EMBEDDINGS.items()}
    for i in range(config.n_layers):
        layer = f"{prefix}encoder.layer.{i}."
        for suffix in ("weight", "bias"):
            names[f"blocks.{i}.attn.qkv.{suffix}"] = {f"{layer}{q_k_v}.{suffix}": config.hidden_size for q_k_v in _QKV}
            for ours, theirs in _LAYER.items():
                names[f"blocks.{i}.{ours}.{suffix}"] = f"{layer}{theirs}.{suffix}"
    return names | head_names(config, prefix)


def head_names(config: EncoderConfig, prefix: str) -> dict[str, str]:
    """The head's tensors, pooler included: what a checkpoint of another task lacks."""
    c = config
    names = {}
    if c.head == "mlm":
        base, dense, norm = _MLM[c.family]
        for suffix in ("weight", "bias"):
            names[f"mlm.dense.{suffix}"] = f"{base}{dense}.{suffix}"
            names[f"mlm.norm.{suffix}"] = f"{base}{norm}.{suffix}"
        # transformers ties decoder.bias to the head's own `bias` and saves that one.
        names["mlm.decoder.bias"] = f"{base}bias"
        if not c.tie_embeddings:
            names["mlm.decoder.weight"] = f"{base}decoder.weight"
    if c.head in ("none", "classification"):
        pooler = "classifier.dense" if c.family == "roberta" and c.head == "classification" else f"{prefix}pooler.dense"
        names.update({"pooler.weight": f"{pooler}.weight", "pooler.bias": f"{pooler}.bias"})
    if c.head == "classification":
        classifier = "classifier.out_proj" if c.family == "roberta" else "classifier"
        names.update({"classifier.weight": f"{classifier}.weight", "classifier.bias": f"{classifier}.bias"})
    return names


def checkpoint_names(config: EncoderConfig, present: Collection[str], new_head: bool):
    """The name map for one checkpoint, and the rafale tensors it leaves as initialised.

    The encoder's prefix is whichever the checkpoint uses. The head comes in two parts, the pooler and the task
    layers (MLM or classifier); with `new_head`, a part the checkpoint holds none of stays as initialised (an MLM
    or bare checkpoint loaded to fine-tune a classifier keeps a pretrained pooler where there is one). A bare
    encoder's pooler may be absent in any case: its output does not use it.
    """
    canonical = "" if config.head == "none" else f"{config.family}."
    other = f"{config.family}." if canonical == "" else ""
    word = _EMBEDDINGS["embed.weight"]
    prefix = other if other + word in present and canonical + word not in present else canonical
    names = weight_names(config, prefix)
    fresh = []
    if new_head or config.head == "none":
        head = head_names(config, prefix)
        for is_pooler in (True, False):
            part = [ours for ours, theirs in head.items() if ("pooler." in theirs) == is_pooler]
            if part and not any(head[ours] in present for ours in part):
                fresh += part
    return {ours: theirs for ours, theirs in names.items() if ours not in fresh}, sorted(fresh)


def from_hf(name: str, tensor: torch.Tensor, config: EncoderConfig) -> torch.Tensor:
    """BERT tensors are already in rafale's layout (query, key and value are stacked by weights.py)."""
    return tensor


def to_hf(name: str, tensor: torch.Tensor, config: EncoderConfig) -> torch.Tensor:
    return tensor
