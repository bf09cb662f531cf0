"""Simulated number formats: a linear layer whose weights, inputs and outputs are rounded to a format the
hardware under study would hold them in, while the arithmetic stays in float32.

Formats (each a function of a tensor; values stay float32 on the format's grid):

- "int": signed integers of `width` bits. With `frac_bits`, fixed point: clamp(round(x * 2^f), -2^(w-1), 2^(w-1) - 1)
  / 2^f. Otherwise symmetric, levels -(2^(w-1) - 1) to 2^(w-1) - 1, scaled by max |x| per tensor, per channel
  (per row of the last dimension: a weight's output row, an activation's token) or per group of `group_size`
  values along the last dimension.
- "minifloat": `exponent_bits` E and `mantissa_bits` M, bias 2^(E-1) - 1, subnormals below the smallest normal, and
  no codes kept for infinity or NaN (MASE's convention): every value saturates at the largest, 2^(2^E - 1 - bias)
  * (2 - 2^-M), which for E4M3 is 480 where torch.float8_e4m3fn stops at 448 and turns larger values into NaN.
  Rounding is to the nearest, ties to even, as torch's casts round; on the values both hold, E4M3 and E5M2 give
  torch.float8_e4m3fn's and float8_e5m2's results (test/test_transforms.py).
- "block" (MXINT, block floating point): blocks of `block_size` values along the last dimension share the exponent
  s = ceil(log2 max |x|) of their largest value; each value keeps a signed `mantissa_bits`-bit integer,
  q = clamp(round(x / 2^s * 2^(k-1)), -2^(k-1), 2^(k-1) - 1), y = q * 2^(s - k + 1).

Gradients pass straight through the rounding, and the matmul's backward uses the unrounded weight and input, as
in transform-aware training (AICrossSim): the update is the one the float model would get at the rounded point.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class _Format(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IntFormat(_Format):
    format: Literal["int"]
    width: Annotated[int, Field(ge=2, le=32)] = 8
    # Fixed point with this many fraction bits; unset: scaled by max |x| (scaling).
    frac_bits: Optional[int] = None
    scaling: Literal["tensor", "channel", "group"] = "tensor"
    group_size: Annotated[int, Field(gt=0)] = 32


class MinifloatFormat(_Format):
    format: Literal["minifloat"]
    exponent_bits: Annotated[int, Field(ge=1, le=8)] = 4
    mantissa_bits: Annotated[int, Field(ge=0, le=23)] = 3


class BlockFormat(_Format):
    format: Literal["block"]
    block_size: Annotated[int, Field(gt=0)] = 32
    mantissa_bits: Annotated[int, Field(ge=2, le=24)] = 8


NumberFormat = Annotated[Union[IntFormat, MinifloatFormat, BlockFormat], Field(discriminator="format")]


class QuantizeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The format of each operand; unset: kept in float32.
    weight: Optional[NumberFormat] = None
    input: Optional[NumberFormat] = None
    output: Optional[NumberFormat] = None


def _grouped(x: torch.Tensor, size: int) -> tuple[torch.Tensor, int]:
    """x [..., n] -> [..., groups, size], zero-padded at the end of the last dimension; and the padding."""
    padding = (-x.shape[-1]) % size
    padded = F.pad(x, (0, padding)) if padding else x
    return padded.reshape(*x.shape[:-1], -1, size), padding


def _ungrouped(x: torch.Tensor, padding: int) -> torch.Tensor:
    x = x.flatten(-2)
    return x[..., : x.shape[-1] - padding] if padding else x


def integer(x: torch.Tensor, width: int, frac_bits: Optional[int] = None, scaling: str = "tensor",
            group_size: int = 32) -> torch.Tensor:
    top = 2 ** (width - 1) - 1
    if frac_bits is not None:
        step = 2.0 ** -frac_bits
        return torch.clamp(torch.round(x / step), -top - 1, top) * step
    if scaling == "group":
        grouped, padding = _grouped(x, group_size)
        return _ungrouped(integer(grouped, width, scaling="channel"), padding)
    largest = x.abs().amax() if scaling == "tensor" else x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(largest > 0, largest / top, torch.ones_like(largest))
    return torch.clamp(torch.round(x / scale), -top, top) * scale


def minifloat(x: torch.Tensor, exponent_bits: int, mantissa_bits: int) -> torch.Tensor:
    bias = 2 ** (exponent_bits - 1) - 1
    smallest_exponent, largest_exponent = 1 - bias, 2**exponent_bits - 1 - bias
    largest = 2.0**largest_exponent * (2 - 2.0**-mantissa_bits)
    magnitude = x.abs().clamp(max=largest)
    # Below the smallest normal the grid is the subnormals': the smallest normal's spacing.
    exponent = torch.floor(torch.log2(magnitude.clamp(min=2.0**smallest_exponent)))
    step = torch.exp2(exponent - mantissa_bits)
    return torch.sign(x) * torch.clamp(torch.round(magnitude / step) * step, max=largest)


def block(x: torch.Tensor, block_size: int, mantissa_bits: int) -> torch.Tensor:
    grouped, padding = _grouped(x, block_size)
    largest = grouped.abs().amax(dim=-1, keepdim=True)
    shared = torch.ceil(torch.log2(largest.clamp(min=torch.finfo(torch.float32).tiny)))
    step = torch.exp2(shared - (mantissa_bits - 1))
    top = 2 ** (mantissa_bits - 1)
    rounded = torch.clamp(torch.round(grouped / step), -top, top - 1) * step
    return _ungrouped(torch.where(largest > 0, rounded, torch.zeros_like(rounded)), padding)


def quantize(x: torch.Tensor, spec: Optional[_Format]) -> torch.Tensor:
    """x rounded to the format `spec` describes (unchanged for None), computed in float32."""
    if spec is None:
        return x
    values = x.float()
    if isinstance(spec, IntFormat):
        rounded = integer(values, spec.width, spec.frac_bits, spec.scaling, spec.group_size)
    elif isinstance(spec, MinifloatFormat):
        rounded = minifloat(values, spec.exponent_bits, spec.mantissa_bits)
    else:
        rounded = block(values, spec.block_size, spec.mantissa_bits)
    return rounded.to(x.dtype)


class _RoundedLinear(torch.autograd.Function):
    """F.linear on the rounded input and weight; the backward as if they had not been rounded."""

    @staticmethod
    def forward(ctx, x, weight, bias, rounded_x, rounded_weight):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(rounded_x, rounded_weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight
        grad_weight = grad.flatten(0, -2).t() @ x.flatten(0, -2)
        grad_bias = grad.flatten(0, -2).sum(0) if ctx.has_bias else None
        return grad_x, grad_weight, grad_bias, None, None


class QuantizedLinear(nn.Module):
    """A linear layer computed on rounded operands (QuantizeSettings), the base layer's weight and bias kept."""

    freezes_base = False
    Settings = QuantizeSettings

    def __init__(self, base: nn.Linear, settings: QuantizeSettings):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.settings = settings

    @classmethod
    def from_linear(cls, name: str, base: nn.Linear, settings: QuantizeSettings, model_config) -> "QuantizedLinear":
        return cls(base, settings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.settings
        with torch.no_grad():
            rounded_x, rounded_weight = quantize(x, s.input), quantize(self.weight, s.weight)
        y = _RoundedLinear.apply(x, self.weight, self.bias, rounded_x, rounded_weight)
        if s.output is None:
            return y
        # Straight through: the forward sees the rounded output, the backward its gradient unchanged.
        return y + (quantize(y.detach(), s.output) - y).detach()

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain layer holding the rounded weight (what an export carries; inputs and outputs need the rules)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        linear.weight.copy_(quantize(self.weight, self.settings.weight))
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        parts = {name: getattr(self.settings, name) for name in ("weight", "input", "output")}
        described = ", ".join(f"{name}={spec.format}" for name, spec in parts.items() if spec is not None)
        return f"in={self.in_features}, out={self.out_features}, {described or 'no rounding'}"
