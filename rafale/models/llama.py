"""Llama and its small cousins (SmolLM, TinyLlama): presets with the real shapes, and the map to `llama` checkpoints.

A Llama is the shared decoder with RMSNorm, full rotary, a SwiGLU MLP, sequential residuals, no biases and,
in most sizes, grouped-query attention. Same module names as pythia.py (see its docstring).
"""

from __future__ import annotations

import re

import torch

from rafale.errors import RafaleError
from rafale.models.decoder import DecoderConfig

MODEL_TYPE = "llama"

# What every Llama-style model shares (the released config.json files); sizes and rotary settings vary.
_LLAMA = dict(
    norm="rmsnorm",
    norm_eps=1e-5,
    positions="rotary",
    rotary_pct=1.0,
    mlp="swiglu",
    parallel_residual=False,
    attention_bias=False,
    mlp_bias=False,
    family="llama",
)

PRESETS = {
    # HuggingFaceTB/SmolLM-135M
    "smollm135m": dict(
        _LLAMA,
        vocab_size=49152,
        hidden_size=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        intermediate_size=1536,
        max_position_embeddings=2048,
        rotary_emb_base=10000.0,
        tie_embeddings=True,
    ),
    # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
    "tinyllama1b": dict(
        _LLAMA,
        vocab_size=32000,
        hidden_size=2048,
        n_layers=22,
        n_heads=32,
        n_kv_heads=4,
        intermediate_size=5632,
        max_position_embeddings=2048,
        rotary_emb_base=10000.0,
        tie_embeddings=False,
    ),
    # meta-llama/Llama-3.2-1B: trained at 8192 positions, stretched to 131072 by the Llama 3 frequency scaling.
    "llama3.2-1b": dict(
        _LLAMA,
        vocab_size=128256,
        hidden_size=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        intermediate_size=8192,
        max_position_embeddings=131072,
        rotary_emb_base=500000.0,
        rope_scaling=dict(
            factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
        ),
        tie_embeddings=True,
    ),
    # For tests and smoke runs: trains in seconds on a CPU.
    "llama-tiny": dict(
        _LLAMA,
        vocab_size=128,
        hidden_size=64,
        n_layers=2,
        n_heads=4,
        intermediate_size=192,
        max_position_embeddings=128,
        rotary_emb_base=10000.0,
        tie_embeddings=False,
    ),
}

_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def config_from_hf(hf: dict) -> DecoderConfig:
    """A llama config.json: transformers 5 style (rope_parameters) or older (rope_theta, rope_scaling)."""
    if hf.get("hidden_act", "silu") != "silu":
        raise RafaleError(f"hidden_act: {hf['hidden_act']!r} is not supported for llama (only 'silu')")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise RafaleError(f"rope_parameters: rope type {rope_type!r} is not supported for llama (default, llama3)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise RafaleError("rope_parameters: partial_rotary_factor must be 1.0 for llama (it rotates whole heads)")
    try:
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
        if head_dim * n_heads != hf["hidden_size"]:
            # rafale's heads always split hidden_size evenly; some Llama-likes decouple the two.
            raise RafaleError(f"head_dim: {head_dim} x {n_heads} heads != hidden_size {hf['hidden_size']}")
        n_kv_heads = hf.get("num_key_value_heads") or n_heads
        scaling = None
        if rope_type == "llama3":
            # transformers falls back on max_position_embeddings when the pretraining length is not given.
            rope = {"original_max_position_embeddings": hf.get("max_position_embeddings", 2048), **rope}
            missing = [key for key in _SCALING_KEYS if key not in rope]
            if missing:
                raise RafaleError(f"rope_parameters: llama3 scaling needs {', '.join(missing)}")
            scaling = {key: rope[key] for key in _SCALING_KEYS}
        return DecoderConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=None if n_kv_heads == n_heads else n_kv_heads,
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            norm="rmsnorm",
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            positions="rotary",
            rotary_pct=1.0,
            rotary_emb_base=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            mlp="swiglu",
            parallel_residual=False,
            tie_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False),
            dropout=hf.get("attention_dropout", 0.0),
            init_std=hf.get("initializer_range", 0.02),
            family="llama",
        )
    except KeyError as e:
        raise RafaleError(f"missing key {e.args[0]!r}") from None


def config_to_hf(config: DecoderConfig) -> dict:
    """The config.json transformers needs to rebuild the model as LlamaForCausalLM."""
    # What Llama cannot express: refuse rather than write a checkpoint that loads as a different model.
    needs = dict(norm="rmsnorm", positions="rotary", rotary_pct=1.0, mlp="swiglu", parallel_residual=False)
    for key, value in needs.items():
        if getattr(config, key) != value:
            raise RafaleError(f"model.{key}: {getattr(config, key)!r} cannot be saved as llama (needs {value!r})")
    scaling = None if config.rope_scaling is None else {"rope_type": "llama3", **config.rope_scaling}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias,
        # Llama has no residual dropout: rafale's one dropout rate is saved as the attention's.
        "attention_dropout": config.dropout,
        "initializer_range": config.init_std,
        # transformers 5 reads rope_parameters; older releases read rope_theta and rope_scaling.
        "rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": config.rotary_emb_base},
        "rope_theta": config.rotary_emb_base,
        "rope_scaling": scaling,
    }


# rafale name -> llama name, inside one layer, for everything but the fused QKV projection.
_LAYER = {
    "norm1": "input_layernorm",
    "attn.proj": "self_attn.o_proj",
    "norm2": "post_attention_layernorm",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
}

# Buffers older llama checkpoints saved (rotary frequencies); a tied head that a checkpoint stored anyway (the
# input embedding is the one rafale reads; an untied head is expected by name, so this never hides it).
IGNORED_HF = re.compile(r"(\.self_attn\.rotary_emb\.inv_freq|^lm_head\.weight)$")


def weight_names(config: DecoderConfig) -> dict[str, str | dict[str, int]]:
    """Every rafale tensor name -> its llama name; a tied LM head is not saved (it is the input embedding).

    Llama keeps q_proj, k_proj and v_proj apart; rafale's fused QKV is the three stacked by rows, in that order,
    so it maps to {name: rows}. The rotary layouts already agree: transformers' Llama checkpoints rotate in halves
    (rotate_half), as rafale does, so no row is permuted.
    """
    names: dict[str, str | dict[str, int]] = {
        "embed.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
    }
    if not config.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    q_rows, kv_rows = config.n_heads * config.head_dim, config.kv_heads * config.head_dim
    for i in range(config.n_layers):
        prefix = f"model.layers.{i}"
        suffixes = ("weight", "bias") if config.attention_bias else ("weight",)
        for suffix in suffixes:
            names[f"blocks.{i}.attn.qkv.{suffix}"] = {
                f"{prefix}.self_attn.q_proj.{suffix}": q_rows,
                f"{prefix}.self_attn.k_proj.{suffix}": kv_rows,
                f"{prefix}.self_attn.v_proj.{suffix}": kv_rows,
            }
        for ours, theirs in _LAYER.items():
            has_bias = config.attention_bias if ours.startswith("attn") else ours.startswith("mlp") and config.mlp_bias
            for suffix in ("weight", "bias") if has_bias else ("weight",):
                names[f"blocks.{i}.{ours}.{suffix}"] = f"{prefix}.{theirs}.{suffix}"
    return names


def from_hf(name: str, tensor: torch.Tensor, config: DecoderConfig) -> torch.Tensor:
    """Llama tensors are already in rafale's layout (see weight_names)."""
    return tensor


def to_hf(name: str, tensor: torch.Tensor, config: DecoderConfig) -> torch.Tensor:
    return tensor
