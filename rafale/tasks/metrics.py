"""Metrics that tasks share, imported when a task builds its metrics (torchmetrics is slow to import)."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class WeightedMean(Metric):
    """The weighted mean of per-example values, summed across processes; `name` says which of a task's outputs
    it reads."""

    full_state_update = False

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor, weights: torch.Tensor) -> None:
        self.total += (values.double() * weights.double()).sum()
        self.weight += weights.double().sum()

    def compute(self) -> torch.Tensor:
        return self.total / self.weight.clamp(min=1e-12)
