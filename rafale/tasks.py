"""What is learned: one ComposerModel wrapper per task, each a forward, a loss and its eval metrics.

Composer's Trainer does everything else; a wrapper only says how a batch becomes a loss.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity, MaskedAccuracy
from composer.models import ComposerModel
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

IGNORE_INDEX = -100


class _Task(ComposerModel):
    """What the wrappers share: the model, its eval metrics, eval forward, and FLOPs for MFU."""

    def __init__(self, model: torch.nn.Module, metrics: dict):
        super().__init__()
        self.model = model
        self.eval_metrics = metrics

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch["input_ids"], attention_mask=batch["attention_mask"])

    def eval_forward(self, batch: dict[str, torch.Tensor], outputs: Optional[Any] = None) -> torch.Tensor:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict:
        return {} if is_train else self.eval_metrics

    def flops_per_batch(self, batch: dict[str, torch.Tensor]) -> float:
        """Model FLOPs of one training batch (forward and backward), so SpeedMonitor can report MFU."""
        rows, length = batch["input_ids"].shape
        return self.model.flops_per_token(length) * rows * length


class _EncoderTask(_Task):
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Segment ids only where the model has segments: RoBERTa has one type, and a BERT-style tokenizer's
        # pairs would index past it.
        token_types = batch.get("token_type_ids") if self.model.config.type_vocab_size > 1 else None
        return self.model(batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=token_types)


class ComposerLM(_Task):
    """A causal LM for Composer: forward, next-token loss, and eval metrics (cross-entropy, perplexity).

    In training the model returns the loss itself (its head and cross-entropy fused, models/loss.py), so the
    [batch, time, vocab] logits are never kept; evaluation asks for the logits, which the metrics read.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__(model, {"LanguageCrossEntropy": LanguageCrossEntropy(),
                                 "LanguagePerplexity": LanguagePerplexity()})

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = next_token_labels(batch["labels"])
        return self.model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)

    def eval_forward(self, batch: dict[str, torch.Tensor], outputs: Optional[Any] = None) -> torch.Tensor:
        return self.model(batch["input_ids"], attention_mask=batch["attention_mask"])

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return outputs

    def update_metric(self, batch: dict[str, torch.Tensor], outputs: torch.Tensor, metric) -> None:
        metric.update(outputs.flatten(0, 1).float(), next_token_labels(batch["labels"]).flatten())


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels [B, T] -> the label each position predicts: the next token's, and IGNORE_INDEX at the end.

    Shifting the labels, not the logits, spares a copy of the [batch, time, vocab] logits."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


class ComposerMLM(_EncoderTask):
    """A masked LM: cross-entropy at the masked positions (labels -100 elsewhere), unshifted; eval metrics are
    the masked tokens' cross-entropy and accuracy."""

    def __init__(self, model: torch.nn.Module):
        super().__init__(model, {"LanguageCrossEntropy": LanguageCrossEntropy(ignore_index=IGNORE_INDEX),
                                 "MaskedAccuracy": MaskedAccuracy(ignore_index=IGNORE_INDEX)})

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(outputs.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)

    def update_metric(self, batch: dict[str, torch.Tensor], outputs: torch.Tensor, metric) -> None:
        metric.update(outputs.flatten(0, 1).float(), batch["labels"].flatten())


class ComposerClassifier(_EncoderTask):
    """Sequence classification: cross-entropy on the [batch, classes] logits; eval metrics are accuracy (the
    fraction right) and the F1 score averaged over classes (macro), which an unbalanced set cannot flatter."""

    def __init__(self, model: torch.nn.Module):
        classes = model.config.num_labels
        super().__init__(model, {"MulticlassAccuracy": MulticlassAccuracy(classes, average="micro"),
                                 "MulticlassF1Score": MulticlassF1Score(classes, average="macro")})

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(outputs.float(), batch["labels"])

    def update_metric(self, batch: dict[str, torch.Tensor], outputs: torch.Tensor, metric) -> None:
        metric.update(outputs.float(), batch["labels"])


def for_pipeline(pipeline: str, model: torch.nn.Module) -> ComposerModel:
    """The wrapper that learns what `pipeline` (config.py's PIPELINES) prepares the data for."""
    return {"causal_lm": ComposerLM, "mlm": ComposerMLM, "classification": ComposerClassifier}[pipeline](model)
