"""Models: hand-written decoders and encoders that load and save Hugging Face-format folders.

This package imports torch; the CLI imports it inside the commands that need a model, so `rafale --help`
stays fast. Families (pythia.py, ...) register in weights.FAMILIES.
"""

from __future__ import annotations

from typing import Any

from rafale.errors import RafaleError
from rafale.models import bert
from rafale.models.bert import Encoder, EncoderConfig
from rafale.models.blocks import KVCache
from rafale.models.decoder import Decoder, DecoderConfig
from rafale.models.generate import generate, generate_text
from rafale.models.weights import FAMILIES, build, load_pretrained, load_weights, save_pretrained

# Every family's presets in one table: name -> DecoderConfig (EncoderConfig for bert.py's) keyword arguments.
PRESETS: dict[str, dict[str, Any]] = {name: kw for module in FAMILIES.values() for name, kw in module.PRESETS.items()}

__all__ = [
    "FAMILIES",
    "PRESETS",
    "Decoder",
    "DecoderConfig",
    "Encoder",
    "EncoderConfig",
    "KVCache",
    "build_model",
    "generate",
    "generate_text",
    "load_pretrained",
    "load_weights",
    "save_pretrained",
]


def build_model(preset: str, overrides: dict[str, Any] | None = None) -> Decoder | Encoder:
    """A randomly initialised model from a preset name, with some of its keys changed (None keeps the preset's).

    bert.py's presets build an Encoder, whose overrides include `head` and `num_labels`; the others a Decoder.
    """
    if preset not in PRESETS:
        raise RafaleError(f"model.config: unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    config_class = EncoderConfig if preset in bert.PRESETS else DecoderConfig
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(config_class.keys()))
    if unknown:
        raise RafaleError(f"model.{unknown[0]}: not a model setting; valid: {', '.join(config_class.keys())}")
    return build(config_class(**{**PRESETS[preset], **overrides}))
