"""The trained model as a Hugging Face-format folder that transformers loads with its Auto classes.

config.json and model.safetensors (models/weights.py), the tokenizer.json the data was made with, and a
tokenizer_config.json / special_tokens_map.json naming its special tokens. A decoder's config.json also gets
its bos, eos and pad token ids, which generation reads; a classifier's carries its class names (`id2label`), and
the task adds what it owns to tokenizer_config.json (an SFT model's chat template).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rafale.config import RunFile
from rafale.data import PreparedData
from rafale.data.tokenizer import hf_tokenizer_config
from rafale.models import Encoder, save_pretrained


def export_model(model: torch.nn.Module, folder: Path, prepared: PreparedData, config: RunFile) -> Path:
    encoder = isinstance(model, Encoder)
    tokenizer_config = hf_tokenizer_config(prepared.tokenizer, prepared.eos_token_id, prepared.pad_token_id,
                                           encoder, config.data.config.max_sequence_length)
    tokenizer_config.update(config.task.export_tokenizer_config(prepared, config))
    extras = {}
    if not encoder:
        token_id = prepared.tokenizer.token_to_id
        extras = {"bos_token_id": token_id(tokenizer_config["bos_token"]), "eos_token_id": prepared.eos_token_id,
                  "pad_token_id": prepared.pad_token_id}
    return save_pretrained(model, folder, tokenizer=prepared.tokenizer_file, tokenizer_config=tokenizer_config,
                           config_extras=extras)
