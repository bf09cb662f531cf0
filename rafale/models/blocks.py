"""Building blocks shared by every decoder family: norms, rotary embeddings, attention, MLPs, the KV cache.

Each block reads only the few config switches it needs, so a family is a choice of switches, not new code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama): no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: under bf16 autocast the mean of squares loses too much precision.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps) if kind == "layernorm" else RMSNorm(dim, eps)


class Rotary(nn.Module):
    """Rotary position embedding on the first `rotary_pct` of each head's dimensions (GPT-NeoX rotates a quarter).

    The frequencies are recomputed on each call (a handful of tiny ops, once per forward, shared by all
    layers) rather than kept in a buffer: a buffer would be cast along with the model to bf16, and rotary
    angles at long positions need fp32.

    `scaling` is Llama 3's frequency scaling (factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings), or None. It stretches the slow frequencies by `factor` so a model trained
    on short contexts reaches longer ones, keeps the fast ones that encode local order, and blends in between.
    """

    def __init__(self, head_dim: int, rotary_pct: float, base: float, scaling: dict | None = None):
        super().__init__()
        self.dim = int(head_dim * rotary_pct)
        self.base = base
        self.scaling = scaling

    def inverse_frequencies(self, device: torch.device) -> torch.Tensor:
        exponents = torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim
        frequencies = 1.0 / (self.base**exponents)
        if self.scaling is None:
            return frequencies
        s = self.scaling
        # How many turns each frequency makes over the pretraining context, placed between the two cutoffs:
        # 0 or below (few turns, long wavelengths) is divided by factor, 1 or above is kept, in between is blended.
        turns = s["original_max_position_embeddings"] * frequencies / (2 * math.pi)
        blend = ((turns - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])).clamp(0, 1)
        return torch.lerp(frequencies / s["factor"], frequencies, blend)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> (cos, sin), each [B, 1, T, dim], broadcast over heads."""
        angles = position_ids[..., None].float() * self.inverse_frequencies(position_ids.device)
        angles = torch.cat((angles, angles), dim=-1)[:, None]
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x [B, H, T, D] in halves (the GPT-NeoX/Llama layout); pass the rest."""
    dim = cos.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    first, second = rot.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    rot = (rot.float() * cos + rotated.float() * sin).to(x.dtype)
    return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot


class KVCache:
    """Keys and values of one layer, preallocated for the whole generation and written in place.

    `length` is how many positions are filled; the decoder reads it to know where new tokens go. Keys and values
    are the two halves of one tensor, `both` [2, B, H, max_len, D], so that a decoding step writes a position's
    keys and values with one copy.
    """

    def __init__(self, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int, device, dtype):
        self.both = torch.zeros(2, batch_size, n_kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.keys, self.values = self.both.unbind(0)
        self.length = 0

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append keys/values [B, H, T, D]; return everything cached so far."""
        start, end = self.length, self.length + keys.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache holds {self.keys.shape[2]} positions, asked to write up to {end}")
        # narrow is one view op where indexing [:, :, a:b] dispatches a slice per dimension: a decoding step
        # updates every layer's cache, and these small ops add up.
        self.keys.narrow(2, start, end - start).copy_(keys)
        self.values.narrow(2, start, end - start).copy_(values)
        self.length = end
        return self.keys.narrow(2, 0, end), self.values.narrow(2, 0, end)

    def append(self, keys_and_values: torch.Tensor) -> torch.Tensor:
        """Write one position's keys and values [2, B, H, D] with one copy; return everything cached so far,
        [2, B, H, length, D]."""
        self.both.select(3, self.length).copy_(keys_and_values)
        self.length += 1
        return self.both.narrow(3, 0, self.length)


class Attention(nn.Module):
    """Causal self-attention with one fused QKV projection and grouped-query heads.

    The fused projection's output rows are [all query heads | all key heads | all value heads]; families whose
    checkpoints lay QKV out differently (GPT-NeoX interleaves per head) reorder rows in their weight map.
    """

    def __init__(self, config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.dropout = config.dropout
        qkv_size = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv = nn.Linear(config.hidden_size, qkv_size, bias=config.attention_bias)
        self.proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)

    def forward(self, x, rotary=None, mask=None, is_causal=False, cache: KVCache | None = None):
        """x [B, T, C]; rotary (cos, sin) or None; mask [B, 1, T, S] bool (True = attend) or None."""
        B, T, _ = x.shape
        heads = self.qkv(x).view(B, T, self.n_heads + 2 * self.n_kv_heads, self.head_dim).transpose(1, 2)
        queries_and_keys, v = heads.split([self.n_heads + self.n_kv_heads, self.n_kv_heads], dim=1)
        if rotary is not None:
            # Queries and keys rotate alike: one call for both halves the small ops of a decoding step.
            queries_and_keys = apply_rotary(queries_and_keys, *rotary)
        q, k = queries_and_keys.split([self.n_heads, self.n_kv_heads], dim=1)
        if cache is not None:
            k, v = cache.update(k, v)
        if self.n_kv_heads != self.n_heads:
            # Each key/value head serves a contiguous group of query heads.
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        y = self.attend(q, k, v, mask, is_causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def attend(self, q, k, v, mask=None, is_causal=False):
        """softmax(q k^T / sqrt(d) + mask) v, [B, H, T, D] each (keys and values already one per query head);
        a transform that simulates the products' number formats overrides this (transforms/quantize.py)."""
        dropout = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)


class MLP(nn.Module):
    """The feed-forward block: `gelu` (GPT-NeoX: up, GELU, down) or `swiglu` (Llama: down(silu(gate) * up))."""

    def __init__(self, config):
        super().__init__()
        self.kind = config.mlp
        if self.kind == "swiglu":
            self.gate = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """One transformer layer, pre-norm; parallel (GPT-NeoX: x + attn(ln1 x) + mlp(ln2 x)) or sequential."""

    def __init__(self, config):
        super().__init__()
        self.parallel = config.parallel_residual
        self.norm1 = make_norm(config.norm, config.hidden_size, config.norm_eps)
        self.attn = Attention(config)
        self.norm2 = make_norm(config.norm, config.hidden_size, config.norm_eps)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, rotary=None, mask=None, is_causal=False, cache: KVCache | None = None):
        attn = self.drop(self.attn(self.norm1(x), rotary, mask, is_causal, cache))
        if self.parallel:
            return x + attn + self.drop(self.mlp(self.norm2(x)))
        x = x + attn
        return x + self.drop(self.mlp(self.norm2(x)))
