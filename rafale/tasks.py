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

from rafale.models.loss import IGNORE_INDEX


class _Task(ComposerModel):
    """What the wrappers share: the model, its eval metrics, eval forward, and FLOPs for MFU."""

    def __init__(self, model: torch.nn.Module, metrics: dict):
        super().__init__()
        self.model = model
        self.eval_metrics = metrics

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**self.model_inputs(batch))

    def eval_forward(self, batch: dict[str, torch.Tensor], outputs: Optional[Any] = None) -> torch.Tensor:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict:
        return {} if is_train else self.eval_metrics

    def flops_per_batch(self, batch: dict[str, torch.Tensor]) -> float:
        """Model FLOPs of one training batch (forward and backward), so SpeedMonitor can report MFU."""
        rows, length = batch["input_ids"].shape
        return self.model.flops_per_token(length) * rows * length


class _EncoderTask(_Task):
    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Segment ids only where the model has segments: RoBERTa has one type, and a BERT-style tokenizer's
        # pairs would index past it.
        token_types = batch.get("token_type_ids") if self.model.config.type_vocab_size > 1 else None
        return {**super().model_inputs(batch), "token_type_ids": token_types}


class _LossInModel(_Task):
    """For the language models, whose model returns the training loss itself when given labels: its head and
    cross-entropy run fused (models/loss.py), so the [batch, time, vocab] logits are never kept, and inside the
    model's forward, where FSDP has gathered the head's weights. Evaluation asks for the logits the metrics read."""

    def labels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["labels"]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**self.model_inputs(batch), labels=self.labels(batch))

    def eval_forward(self, batch: dict[str, torch.Tensor], outputs: Optional[Any] = None) -> torch.Tensor:
        return self.model(**self.model_inputs(batch))

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return outputs

    def update_metric(self, batch: dict[str, torch.Tensor], outputs: torch.Tensor, metric) -> None:
        metric.update(outputs.flatten(0, 1).float(), self.labels(batch).flatten())


class ComposerLM(_LossInModel):
    """A causal LM for Composer: next-token loss; eval metrics are cross-entropy and perplexity."""

    def __init__(self, model: torch.nn.Module):
        super().__init__(model, {"LanguageCrossEntropy": LanguageCrossEntropy(),
                                 "LanguagePerplexity": LanguagePerplexity()})

    def labels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return next_token_labels(batch["labels"])


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels [B, T] -> the label each position predicts: the next token's, and IGNORE_INDEX at the end.

    Shifting the labels, not the logits, spares a copy of the [batch, time, vocab] logits."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


class ComposerMLM(_LossInModel, _EncoderTask):
    """A masked LM: cross-entropy at the masked positions (labels -100 elsewhere), unshifted, with the head run on
    those positions only; eval metrics are the masked tokens' cross-entropy and accuracy."""

    def __init__(self, model: torch.nn.Module):
        super().__init__(model, {"LanguageCrossEntropy": LanguageCrossEntropy(ignore_index=IGNORE_INDEX),
                                 "MaskedAccuracy": MaskedAccuracy(ignore_index=IGNORE_INDEX)})

    def flops_per_batch(self, batch: dict[str, torch.Tensor]) -> float:
        """As for any model, less the MLM head's FLOPs at the positions it does not run on."""
        rows, length = batch["input_ids"].shape
        unmasked = int((batch["labels"] == IGNORE_INDEX).sum())
        return super().flops_per_batch(batch) - self.model.mlm_head_flops_per_token() * unmasked


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
