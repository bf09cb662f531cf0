"""What is learned: one ComposerModel wrapper per task, each a forward, a loss and its eval metrics.

Composer's Trainer does everything else; a wrapper only says how a batch becomes a loss.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel

IGNORE_INDEX = -100


class ComposerLM(ComposerModel):
    """A causal LM for Composer: forward, next-token loss, and eval metrics (cross-entropy, perplexity)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.eval_metrics = {"LanguageCrossEntropy": LanguageCrossEntropy(), "LanguagePerplexity": LanguagePerplexity()}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch["input_ids"], attention_mask=batch["attention_mask"])

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = outputs[:, :-1].flatten(0, 1)
        labels = batch["labels"][:, 1:].flatten()
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)

    def eval_forward(self, batch: dict[str, torch.Tensor], outputs: Optional[Any] = None) -> torch.Tensor:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict:
        return {} if is_train else self.eval_metrics

    def update_metric(self, batch: dict[str, torch.Tensor], outputs: torch.Tensor, metric) -> None:
        logits = outputs[:, :-1].reshape(-1, outputs.shape[-1]).float()
        metric.update(logits, batch["labels"][:, 1:].reshape(-1))

    def flops_per_batch(self, batch: dict[str, torch.Tensor]) -> float:
        """Model FLOPs of one training batch (forward and backward), so SpeedMonitor can report MFU."""
        rows, length = batch["input_ids"].shape
        return self.model.flops_per_token(length) * rows * length
