"""LoRA: a frozen linear layer plus a trainable low-rank update, y = W x + b + scale * B A dropout(x).

PEFT's conventions, so that adapters travel: A [r, in] starts kaiming-uniform (a = sqrt 5) and B [out, r] at zero,
so a fresh adapter leaves the model's output unchanged; scale is alpha / r, or alpha / sqrt(r) with rsLoRA. The
module keeps the base layer's `weight` and `bias` as they are (same Parameters, same names), so pretrained loading,
checkpoints and export need no renamed keys; its own tensors are `lora_A` and `lora_B`.

rafale's attention projects queries, keys and values with one fused linear layer (rows [q | k | v]). An adapter on
some of them (`projections: [q, v]`, say) shares one A and has B rows for those parts only: the other rows of the
output are exactly the base layer's. `delta_weight` is the update as a [out, in] matrix, zero on rows without an
adapter; `merged` folds it into a plain nn.Linear for export.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

PROJECTIONS = ("q", "k", "v")


class LoRASettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: Annotated[int, Field(gt=0)] = 8
    alpha: Annotated[float, Field(gt=0)] = 8.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # alpha / sqrt(r) rather than alpha / r (rank-stabilised LoRA).
    rslora: bool = False
    # Which parts of a fused query-key-value projection get the adapter (other modules take it whole).
    projections: list[Literal["q", "k", "v"]] = Field(default_factory=lambda: list(PROJECTIONS), min_length=1)
    # Full-match regular expressions of further modules to train whole (a new classification head trains anyway).
    train: list[str] = Field(default_factory=list)


class LoRALinear(nn.Module):
    # Trainable parameters are the adapter's: the base layer is frozen (transforms/__init__.py).
    freezes_base = True
    Settings = LoRASettings
    targets = (nn.Linear,)

    def __init__(self, base: nn.Linear, settings: LoRASettings, rows: Optional[torch.Tensor] = None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.settings = settings
        self.r = settings.r
        self.scale = settings.alpha / (math.sqrt(settings.r) if settings.rslora else settings.r)
        # The output rows the adapter writes (None: all of them), in rafale's row order.
        self.register_buffer("rows", rows, persistent=False)
        adapted = self.out_features if rows is None else len(rows)
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(settings.r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(adapted, settings.r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(settings.dropout)

    @classmethod
    def from_linear(cls, name: str, base: nn.Linear, settings: LoRASettings, model_config) -> "LoRALinear":
        """The adapter for module `name` of a model with `model_config`: on a fused qkv, only the chosen parts."""
        rows = None
        if name.endswith("attn.qkv") and sorted(settings.projections) != sorted(PROJECTIONS):
            query = model_config.n_heads * model_config.head_dim
            key_value = model_config.kv_heads * model_config.head_dim
            spans = {"q": (0, query), "k": (query, query + key_value), "v": (query + key_value, query + 2 * key_value)}
            rows = torch.cat([torch.arange(*spans[part], device=base.weight.device)
                              for part in PROJECTIONS if part in settings.projections])
        return cls(base, settings, rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale
        return y + update if self.rows is None else y.index_add(-1, self.rows, update)

    def delta_weight(self) -> torch.Tensor:
        """The update as a [out, in] matrix: scale * B A on the adapted rows, zero elsewhere."""
        delta = (self.lora_B @ self.lora_A) * self.scale
        if self.rows is None:
            return delta
        return delta.new_zeros(self.out_features, self.in_features).index_copy(0, self.rows, delta)

    def full_B(self) -> torch.Tensor:
        """B with a row for every output row (zero where there is no adapter): PEFT's B for a whole module."""
        if self.rows is None:
            return self.lora_B
        return self.lora_B.new_zeros(self.out_features, self.r).index_copy(0, self.rows, self.lora_B)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        linear.weight.copy_(self.weight + self.delta_weight().to(self.weight.dtype))
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        parts = "" if self.rows is None else f", rows={len(self.rows)} of {self.out_features}"
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:g}{parts}"

