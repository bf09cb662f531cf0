"""Pythia / GPT-NeoX: presets with the real shapes, and the map to and from `gpt_neox` checkpoints.

Every family module defines the same names, which weights.py and `rafale.models` look up:
MODEL_TYPE, PRESETS, config_from_hf, config_to_hf, weight_names, IGNORED_HF, from_hf, to_hf.
"""

from __future__ import annotations

import re

import torch

from rafale.errors import RafaleError
from rafale.models.decoder import DecoderConfig

MODEL_TYPE = "gpt_neox"

# What every Pythia model shares (the Pythia paper, table 1, and the released config.json files).
_PYTHIA = dict(
    vocab_size=50304,
    max_position_embeddings=2048,
    norm="layernorm",
    norm_eps=1e-5,
    positions="rotary",
    rotary_pct=0.25,
    rotary_emb_base=10000.0,
    mlp="gelu",
    parallel_residual=True,
    tie_embeddings=False,
    family="pythia",
)

PRESETS = {
    "pythia14m": dict(_PYTHIA, hidden_size=128, n_layers=6, n_heads=4, intermediate_size=512),
    "pythia70m": dict(_PYTHIA, hidden_size=512, n_layers=6, n_heads=8, intermediate_size=2048),
    "pythia160m": dict(_PYTHIA, hidden_size=768, n_layers=12, n_heads=12, intermediate_size=3072),
    "pythia410m": dict(_PYTHIA, hidden_size=1024, n_layers=24, n_heads=16, intermediate_size=4096),
    # For tests and smoke runs: trains in seconds on a CPU.
    "pythia-tiny": dict(
        _PYTHIA,
        vocab_size=128,
        hidden_size=64,
        n_layers=2,
        n_heads=4,
        intermediate_size=256,
        max_position_embeddings=128,
    ),
}


def config_from_hf(hf: dict) -> DecoderConfig:
    """A gpt_neox config.json (old style with rotary_pct, or transformers 5 style with rope_parameters)."""
    if hf.get("hidden_act", "gelu") != "gelu":
        raise RafaleError(f"hidden_act: {hf['hidden_act']!r} is not supported for gpt_neox (only 'gelu')")
    # transformers 5 writes rope_parameters; older configs have rotary_pct, rotary_emb_base and rope_scaling.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise RafaleError(f"rope_parameters: rope type {rope_type!r} is not supported for gpt_neox (only 'default')")
    try:
        return DecoderConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            norm="layernorm",
            norm_eps=hf.get("layer_norm_eps", 1e-5),
            positions="rotary",
            rotary_pct=rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)),
            rotary_emb_base=rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0)),
            mlp="gelu",
            parallel_residual=hf.get("use_parallel_residual", True),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", True),
            mlp_bias=True,
            dropout=hf.get("hidden_dropout", 0.0),
            init_std=hf.get("initializer_range", 0.02),
            family="pythia",
        )
    except KeyError as e:
        raise RafaleError(f"missing key {e.args[0]!r}") from None


def config_to_hf(config: DecoderConfig) -> dict:
    """The config.json transformers needs to rebuild the model as GPTNeoXForCausalLM."""
    # What GPT-NeoX cannot express: refuse rather than write a checkpoint that loads as a different model.
    needs = dict(
        norm="layernorm",
        positions="rotary",
        mlp="gelu",
        mlp_bias=True,
        n_kv_heads=(None, config.n_heads),
        rope_scaling=None,
    )
    for key, value in needs.items():
        allowed = value if isinstance(value, tuple) else (value,)
        if getattr(config, key) not in allowed:
            have = getattr(config, key)
            raise RafaleError(f"model.{key}: {have!r} cannot be saved as gpt_neox (needs {allowed[-1]!r})")
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "hidden_act": "gelu",
        "layer_norm_eps": config.norm_eps,
        "use_parallel_residual": config.parallel_residual,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": config.attention_bias,
        "hidden_dropout": config.dropout,
        "attention_dropout": config.dropout,
        "initializer_range": config.init_std,
        # transformers 5 reads rope_parameters; older releases read rotary_pct and rotary_emb_base.
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": config.rotary_emb_base,
            "partial_rotary_factor": config.rotary_pct,
        },
        "rotary_pct": config.rotary_pct,
        "rotary_emb_base": config.rotary_emb_base,
    }


# rafale name -> gpt_neox name, inside one layer (weights and biases alike).
_LAYER = {
    "norm1": "input_layernorm",
    "attn.qkv": "attention.query_key_value",
    "attn.proj": "attention.dense",
    "norm2": "post_attention_layernorm",
    "mlp.up": "mlp.dense_h_to_4h",
    "mlp.down": "mlp.dense_4h_to_h",
}

# Buffers that older gpt_neox checkpoints saved alongside the weights (causal masks, rotary frequencies).
IGNORED_HF = re.compile(r"\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$")


def weight_names(config: DecoderConfig) -> dict[str, str]:
    """Every rafale tensor name -> its gpt_neox name. A tied LM head is not saved (it is the input embedding)."""
    names = {
        "embed.weight": "gpt_neox.embed_in.weight",
        "norm.weight": "gpt_neox.final_layer_norm.weight",
        "norm.bias": "gpt_neox.final_layer_norm.bias",
    }
    if not config.tie_embeddings:
        names["lm_head.weight"] = "embed_out.weight"
    suffixes = ("weight", "bias")
    for i in range(config.n_layers):
        for ours, theirs in _LAYER.items():
            has_bias = not ours.startswith("attn") or config.attention_bias
            for suffix in suffixes if has_bias else ("weight",):
                names[f"blocks.{i}.{ours}.{suffix}"] = f"gpt_neox.layers.{i}.{theirs}.{suffix}"
    return names


def _regroup_qkv(tensor: torch.Tensor, n_heads: int, from_hf: bool) -> torch.Tensor:
    """Reorder fused QKV rows: GPT-NeoX groups them per head [heads, (q, k, v), head_dim], rafale per kind
    [(q, k, v), heads, head_dim]."""
    rest = tensor.shape[1:]
    grouped = (n_heads, 3, -1) if from_hf else (3, n_heads, -1)
    return tensor.reshape(*grouped, *rest).transpose(0, 1).reshape(tensor.shape)


def from_hf(name: str, tensor: torch.Tensor, config: DecoderConfig) -> torch.Tensor:
    """A tensor as read from the checkpoint -> rafale's layout (name is the rafale name)."""
    return _regroup_qkv(tensor, config.n_heads, True) if ".attn.qkv." in name else tensor


def to_hf(name: str, tensor: torch.Tensor, config: DecoderConfig) -> torch.Tensor:
    """A rafale tensor -> the checkpoint's layout (name is the rafale name)."""
    return _regroup_qkv(tensor, config.n_heads, False) if ".attn.qkv." in name else tensor
