"""The decoder-only language model: one class that covers families through a few config switches (like litgpt).

A family (pythia.py, ...) is presets plus a map to and from its Hugging Face checkpoints; the forward pass
below is the same for all of them and reads top to bottom: embed, blocks, norm, head.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from rafale.errors import RafaleError
from rafale.models.blocks import Block, KVCache, Rotary, make_norm
from rafale.models.loss import IGNORE_INDEX, linear_cross_entropy
from rafale.models.masks import attention_layout

CHOICES = {"norm": ("layernorm", "rmsnorm"), "positions": ("rotary", "learned", "none"), "mlp": ("gelu", "swiglu")}


@dataclass
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    intermediate_size: int
    max_position_embeddings: int
    # None means one key/value head per query head (no grouped-query attention).
    n_kv_heads: int | None = None
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    positions: str = "rotary"
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000.0
    # Llama 3 rotary frequency scaling: {factor, low_freq_factor, high_freq_factor, original_max_position_embeddings},
    # or None for plain rotary.
    rope_scaling: dict | None = None
    mlp: str = "gelu"
    parallel_residual: bool = True
    tie_embeddings: bool = False
    attention_bias: bool = True
    mlp_bias: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    # The family (weights.FAMILIES) whose Hugging Face class this model is saved as; save_pretrained falls back
    # to another family only when this one cannot express the other settings.
    family: str = "pythia"
    # 0: a language model (the LM head). n > 0: a ScoredDecoder, n scores per sequence from a `score` head in place
    # of the LM head (a reward model: 1); the task sets it, an exported folder's architecture says it.
    num_scores: int = 0
    # A ValuedDecoder: a value head (one scalar per position) beside the LM head, PPO's critic; the task sets it.
    # It is training state only: the export is the plain language model.
    value_head: bool = False

    def __post_init__(self):
        for key in ("vocab_size", "hidden_size", "n_layers", "n_heads", "intermediate_size", "max_position_embeddings"):
            if getattr(self, key) <= 0:
                raise RafaleError(f"model.{key}: must be > 0, got {getattr(self, key)}")
        for key, valid in CHOICES.items():
            if getattr(self, key) not in valid:
                raise RafaleError(f"model.{key}: {getattr(self, key)!r} is not one of {', '.join(valid)}")
        if self.hidden_size % self.n_heads:
            raise RafaleError(
                f"model.hidden_size: {self.hidden_size} is not divisible by model.n_heads ({self.n_heads})"
            )
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise RafaleError(f"model.n_heads: {self.n_heads} is not divisible by model.n_kv_heads ({self.kv_heads})")
        if not 0 <= self.rotary_pct <= 1:
            raise RafaleError(f"model.rotary_pct: must be between 0 and 1, got {self.rotary_pct}")
        if self.positions == "rotary" and int(self.head_dim * self.rotary_pct) % 2:
            raise RafaleError(
                f"model.rotary_pct: {self.rotary_pct} of head size {self.head_dim} gives "
                f"{int(self.head_dim * self.rotary_pct)} rotary dims; it must be even"
            )
        if self.rope_scaling is not None:
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            if not isinstance(self.rope_scaling, dict) or sorted(self.rope_scaling) != sorted(keys):
                raise RafaleError(f"model.rope_scaling: needs exactly the keys {', '.join(keys)}")
            s = self.rope_scaling
            if not (s["factor"] > 0 and s["high_freq_factor"] > s["low_freq_factor"]):
                raise RafaleError("model.rope_scaling: needs factor > 0 and high_freq_factor > low_freq_factor")
        if self.num_scores < 0:
            raise RafaleError(f"model.num_scores: must be >= 0, got {self.num_scores}")
        if self.value_head and self.num_scores:
            raise RafaleError("model.value_head: a reward model (num_scores) has no LM head to add a value head to")
        if not 0 <= self.dropout < 1:
            raise RafaleError(f"model.dropout: must be in [0, 1), got {self.dropout}")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]


class Decoder(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.positions == "learned":
            self.pos_embed = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        rotary_dims = int(config.head_dim * config.rotary_pct)
        self.rotary = (
            Rotary(config.head_dim, config.rotary_pct, config.rotary_emb_base, config.rope_scaling)
            if config.positions == "rotary" and rotary_dims > 0
            else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = make_norm(config.norm, config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self, module: nn.Module):
        # GPT-NeoX / Hugging Face init: every matrix N(0, 0.02), biases zero, norms one. Module construction
        # order is fixed, so the same torch seed gives the same model.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: list[KVCache] | None = None,
        labels: torch.Tensor | None = None,
        reduction: str = "mean",
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab]; or, given labels [B, T] (the token each position predicts,
        -100 where none), their cross-entropy with the head and the loss fused (loss.py): the mean over labelled
        tokens, their sum, or per token ([B, T], `reduction="none"`, from which loss.sequence_log_probs sums each
        row's log-probabilities).

        The loss is computed here rather than by the caller so that under FSDP it runs where the head's weights
        are gathered.
        """
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, kv_cache, document_ids)
        if labels is None:
            return self.lm_head(hidden)
        # The head runs where a label is: not on an SFT prompt, padding or each row's last position.
        labelled = labels != IGNORE_INDEX
        losses = linear_cross_entropy(hidden[labelled], self.lm_head.weight, labels[labelled], reduction=reduction)
        if reduction == "none":  # back in place, 0 where no label
            return losses.new_zeros(labels.shape).masked_scatter(labelled, losses)
        return losses

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: list[KVCache] | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> the final norm's output [B, T, hidden], which the LM head reads.

        attention_mask [B, past+T]: 1 = real token, 0 = padding, covering cached positions too. document_ids
        [B, T]: the documents of packed rows (0 = padding), which attention and positions never cross. masks.py
        makes the mask and the positions for every case.
        """
        B, T = input_ids.shape
        past = kv_cache[0].length if kv_cache is not None else 0
        mask, is_causal, position_ids = attention_layout(attention_mask, document_ids, position_ids, past, B, T,
                                                         input_ids.device)
        x = self.embed(input_ids)
        if self.config.positions == "learned":
            x = x + self.pos_embed(position_ids)
        x = self.drop(x)
        rotary = self.rotary(position_ids) if self.rotary is not None else None
        for i, block in enumerate(self.blocks):
            x = block(x, rotary, mask, is_causal, kv_cache[i] if kv_cache is not None else None)
        return self.norm(x)

    def new_kv_cache(self, batch_size: int, max_len: int) -> list[KVCache]:
        """An empty cache, one KVCache per layer, for generating up to max_len positions."""
        weight = self.lm_head.weight
        c = self.config
        return [KVCache(batch_size, c.kv_heads, max_len, c.head_dim, weight.device, weight.dtype) for _ in self.blocks]

    def num_parameters(self) -> int:
        """Trainable parameters; tied embeddings count once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 per matmul weight, plus attention (PaLM, appendix B).

        Embedding lookups do no matmul, so the input tables are left out (the LM head is a real matmul and stays,
        tied or not). The attention term 12 * layers * hidden * seq_len is the usual convention; it ignores the
        causal mask, as published MFU numbers do.
        """
        matmul_params = self.num_parameters()
        if not self.config.tie_embeddings:
            matmul_params -= self.embed.weight.numel()
        if self.config.positions == "learned":
            matmul_params -= self.pos_embed.weight.numel()
        c = self.config
        return 6 * matmul_params + 12 * c.n_layers * c.hidden_size * seq_len


class ScoredDecoder(Decoder):
    """A decoder whose head gives `num_labels` scores of a whole sequence instead of next-token logits, read at
    its last real token: a reward model has one. The layout of transformers' `*ForSequenceClassification`
    decoders: the same blocks, a bias-free linear `score` head, no LM head."""

    def __init__(self, config: DecoderConfig, num_labels: int = 1):
        super().__init__(config)
        del self.lm_head
        self.score = nn.Linear(config.hidden_size, num_labels, bias=False)
        nn.init.normal_(self.score.weight, mean=0.0, std=config.init_std)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> the score of every sequence [B, num_labels], read at its last real token (the
        rightmost position that attention_mask keeps, as transformers reads the rightmost non-pad token)."""
        hidden = self.hidden_states(input_ids, attention_mask, document_ids=document_ids)
        if attention_mask is None:
            last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            last = (positions * attention_mask.bool()).argmax(-1)
        return self.score(hidden[torch.arange(input_ids.shape[0], device=input_ids.device), last])

    def flops_per_token(self, seq_len: int) -> float:
        # Without an LM head, a tied embedding table is a lookup only.
        tied_table = self.embed.weight.numel() if self.config.tie_embeddings else 0
        return super().flops_per_token(seq_len) - 6 * tied_table


class ValuedDecoder(Decoder):
    """A language model with a value head: a bias-free scalar per position, read from the same last hidden state as
    the LM head (PPO's critic, as HALOs' AutoModelForCausalLMWithValueHead). The head is not part of the Hugging
    Face layout: saving writes the plain language model, loading a language model's folder leaves it as
    initialised (weights.scored_names)."""

    def __init__(self, config: DecoderConfig):
        super().__init__(config)
        self.value = nn.Linear(config.hidden_size, 1, bias=False)
        nn.init.normal_(self.value.weight, mean=0.0, std=config.init_std)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache: list[KVCache] | None = None,
                labels: torch.Tensor | None = None, reduction: str = "mean", document_ids: torch.Tensor | None = None,
                with_values: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Decoder.forward; with `with_values`, (its output, the values [B, T] in fp32) from one pass of the
        blocks."""
        if not with_values:
            return super().forward(input_ids, attention_mask, position_ids, kv_cache, labels, reduction, document_ids)
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, kv_cache, document_ids)
        values = self.value(hidden)[..., 0].float()
        if labels is None:
            return self.lm_head(hidden), values
        labelled = labels != IGNORE_INDEX
        losses = linear_cross_entropy(hidden[labelled], self.lm_head.weight, labels[labelled], reduction=reduction)
        if reduction == "none":
            losses = losses.new_zeros(labels.shape).masked_scatter(labelled, losses)
        return losses, values
