"""The one ComposerModel: Composer's calls (forward, loss, eval, metrics, FLOPs) handed to the run's task.

A task says how a batch becomes a loss (rafale/tasks/); this wrapper is all that Composer sees of it, so every
task trains through the same Trainer arguments. The model is the `model` child, so checkpoint keys are the
model's own under `model.`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from composer.models import ComposerModel

from rafale.tasks.base import Task


class TaskModel(ComposerModel):
    def __init__(self, task: Task, model: torch.nn.Module):
        super().__init__()
        self.task = task
        self.model = model
        self.eval_metrics = task.metrics(model)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # The loss is computed inside the forward, where FSDP has the head's weights gathered.
        return self.task.train_loss(self.model, batch)

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return outputs

    def eval_forward(self, batch: dict[str, torch.Tensor], outputs: Optional[Any] = None) -> Any:
        return self.task.eval_outputs(self.model, batch)

    def get_metrics(self, is_train: bool = False) -> dict:
        return {} if is_train else self.eval_metrics

    def update_metric(self, batch: dict[str, torch.Tensor], outputs: Any, metric) -> None:
        self.task.update_metric(batch, outputs, metric)

    def flops_per_batch(self, batch: dict[str, torch.Tensor]) -> float:
        return self.task.flops_per_batch(self.model, batch)
