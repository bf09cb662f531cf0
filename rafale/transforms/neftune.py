"""NEFTune (Jain et al., 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"): uniform noise on the
input embeddings while training, of amplitude alpha / sqrt(length * hidden) so that its norm stays near alpha
whatever the batch's shape. A forward hook on the word embeddings: no branch in the model code, nothing in its state
dict, and never active in evaluation or generation, which run the model in eval mode."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def add_noise(model: nn.Module, alpha: float) -> RemovableHandle:
    """Noise on `model.embed`'s output (every rafale family's word embeddings) whenever the model trains."""

    def noisy(module: nn.Module, inputs: tuple, embeddings: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return embeddings
        length, hidden = embeddings.shape[-2:]
        bound = alpha / math.sqrt(length * hidden)
        return embeddings + torch.empty_like(embeddings).uniform_(-bound, bound)

    return model.embed.register_forward_hook(noisy)
