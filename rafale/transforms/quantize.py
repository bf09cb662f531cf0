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
- "optical" (the optical transformer's quantiser): `levels` evenly spaced values over a range [lo, hi] that each
  operand tracks while training, an exponential moving average (0.9 old, 0.1 new) of its min and max (or of its
  0.001 and 0.999 quantiles, `range: "quantile"`), kept with the model (so in checkpoints):
  y = round((clamp(x, lo, hi) - lo) / (hi - lo) * (levels - 1)) / (levels - 1) * (hi - lo) + lo, the rounding
  deterministic or stochastic (round(v + U(-1/2, 1/2))); then a look-up table's floor: values in (0, lut_min * hi)
  rise to lut_min * hi, and in (lut_min * lo, 0) fall to lut_min * lo. By default inputs round deterministically
  and weights and outputs stochastically while training, as the optical transformer does; evaluation and
  generation round to the nearest level.

Gradients pass straight through the rounding, and the matmul's backward uses the unrounded weight and input, as
in transform-aware training (AICrossSim): the update is the one the float model would get at the rounded point.

Two kinds: "quantize" rounds a linear layer's weight, input and output; "quantize_attention" rounds the operands
of an attention's own products, QK^T (queries, keys) and AV (the attention probabilities, values), which SDPA
would otherwise compute in float: the attention is then computed explicitly (slower, and exact to SDPA's result
when no format is set).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, Optional, Union

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from rafale.models.blocks import Attention


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


class OpticalFormat(_Format):
    format: Literal["optical"]
    levels: Annotated[int, Field(ge=2)] = 256
    lut_min: Annotated[float, Field(ge=0, lt=1)] = 0.0
    range: Literal["minmax", "quantile"] = "minmax"
    # Unset: deterministic for inputs, stochastic for weights and outputs.
    stochastic: Optional[bool] = None


NumberFormat = Annotated[Union[IntFormat, MinifloatFormat, BlockFormat, OpticalFormat],
                         Field(discriminator="format")]


class AttentionQuantizeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The operands of QK^T and of AV; unset: kept in float32.
    query: Optional[NumberFormat] = None
    key: Optional[NumberFormat] = None
    probabilities: Optional[NumberFormat] = None
    value: Optional[NumberFormat] = None

    @field_validator("query", "key", "probabilities", "value")
    @classmethod
    def _stateless(cls, spec):
        if isinstance(spec, OpticalFormat):
            raise ValueError("the optical format tracks ranges per linear layer: use it with kind 'quantize'")
        return spec


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


def optical(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, levels: int, lut_min: float = 0.0,
            stochastic: bool = False) -> torch.Tensor:
    span = (high - low).clamp(min=torch.finfo(torch.float32).tiny)
    scaled = (x.clamp(low, high) - low) / span * (levels - 1)
    if stochastic:
        scaled = scaled + torch.rand_like(scaled) - 0.5
    y = torch.round(scaled).clamp(0, levels - 1) / (levels - 1) * span + low
    floor_high, floor_low = lut_min * high, lut_min * low
    y = torch.where((y > 0) & (y < floor_high), floor_high, y)
    return torch.where((y < 0) & (y > floor_low), floor_low, y)


class OpticalRounder(nn.Module):
    """The optical format for one operand, with the range it tracks (buffers, so checkpoints carry them)."""

    def __init__(self, spec: OpticalFormat, stochastic: bool):
        super().__init__()
        self.spec = spec
        self.stochastic = spec.stochastic if spec.stochastic is not None else stochastic
        self.register_buffer("range", torch.zeros(2))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = x.float()
        if self.training:
            if self.spec.range == "quantile":
                sample = values.flatten()[:1 << 24]  # torch.quantile's limit on its input's size
                observed = torch.quantile(sample, torch.tensor([0.001, 0.999], device=x.device))
            else:
                observed = torch.stack([values.min(), values.max()])
            self.range.copy_(torch.where(self.seen, 0.9 * self.range + 0.1 * observed, observed))
            self.seen.fill_(True)
        low, high = self.range
        # Stochastic rounding is a training device: evaluation and generation round to the nearest level.
        stochastic = self.stochastic and self.training
        return optical(values, low, high, self.spec.levels, self.spec.lut_min, stochastic).to(x.dtype)


def quantize(x: torch.Tensor, spec: Optional[_Format]) -> torch.Tensor:
    """x rounded to the format `spec` describes (unchanged for None), computed in float32. (The optical format,
    which tracks a range, is an OpticalRounder.)"""
    if spec is None:
        return x
    if isinstance(spec, OpticalFormat):
        raise ValueError("the optical format rounds through an OpticalRounder, which tracks its range")
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


class _RoundedMatmul(torch.autograd.Function):
    """a @ b on the rounded operands; the backward as if they had not been rounded."""

    @staticmethod
    def forward(ctx, a, b, rounded_a, rounded_b):
        ctx.save_for_backward(a, b)
        return rounded_a @ rounded_b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return grad @ b.transpose(-1, -2), a.transpose(-1, -2) @ grad, None, None


def rounded_matmul(a: torch.Tensor, b: torch.Tensor, spec_a: Optional[_Format], spec_b: Optional[_Format]):
    with torch.no_grad():
        rounded_a, rounded_b = quantize(a, spec_a), quantize(b, spec_b)
    return _RoundedMatmul.apply(a, b, rounded_a, rounded_b)


class QuantizedAttention(Attention):
    """An attention whose QK^T and AV products take rounded operands (AttentionQuantizeSettings); its projections
    (and their names) are the base attention's."""

    freezes_base = False
    Settings = AttentionQuantizeSettings
    targets = (Attention,)

    def __init__(self, base: Attention, settings: AttentionQuantizeSettings):
        nn.Module.__init__(self)
        self.n_heads, self.n_kv_heads, self.head_dim = base.n_heads, base.n_kv_heads, base.head_dim
        self.dropout = base.dropout
        self.qkv, self.proj = base.qkv, base.proj
        self.settings = settings

    @classmethod
    def from_linear(cls, name: str, base: Attention, settings: AttentionQuantizeSettings,
                    model_config) -> "QuantizedAttention":
        return cls(base, settings)

    def attend(self, q, k, v, mask=None, is_causal=False):
        s = self.settings
        scores = rounded_matmul(q, k.transpose(-1, -2), s.query, s.key) / math.sqrt(q.shape[-1])
        if is_causal:
            mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril(
                k.shape[-2] - q.shape[-2])
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probabilities = scores.float().softmax(-1).to(q.dtype)
        if self.training and self.dropout:
            probabilities = F.dropout(probabilities, self.dropout)
        return rounded_matmul(probabilities, v, s.probabilities, s.value)

    def merged(self) -> Attention:
        """The plain attention (the products' rounding travels with the export's rules)."""
        plain = Attention.__new__(Attention)
        nn.Module.__init__(plain)
        plain.n_heads, plain.n_kv_heads, plain.head_dim = self.n_heads, self.n_kv_heads, self.head_dim
        plain.dropout, plain.qkv, plain.proj = self.dropout, self.qkv, self.proj
        return plain

    def extra_repr(self) -> str:
        parts = {name: getattr(self.settings, name) for name in ("query", "key", "probabilities", "value")}
        return ", ".join(f"{name}={spec.format}" for name, spec in parts.items() if spec is not None) or "no rounding"


class QuantizedLinear(nn.Module):
    """A linear layer computed on rounded operands (QuantizeSettings), the base layer's weight and bias kept."""

    freezes_base = False
    Settings = QuantizeSettings
    targets = (nn.Linear,)

    def __init__(self, base: nn.Linear, settings: QuantizeSettings):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.settings = settings
        # The operands in the optical format, each with its tracked range: inputs round deterministically.
        self.rounders = nn.ModuleDict({name: OpticalRounder(getattr(settings, name), stochastic=name != "input")
                                       for name in ("weight", "input", "output")
                                       if isinstance(getattr(settings, name), OpticalFormat)})

    def _round(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.rounders[name](x) if name in self.rounders else quantize(x, getattr(self.settings, name))

    @classmethod
    def from_linear(cls, name: str, base: nn.Linear, settings: QuantizeSettings, model_config) -> "QuantizedLinear":
        return cls(base, settings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            rounded_x, rounded_weight = self._round("input", x), self._round("weight", self.weight)
        y = _RoundedLinear.apply(x, self.weight, self.bias, rounded_x, rounded_weight)
        if self.settings.output is None:
            return y
        # Straight through: the forward sees the rounded output, the backward its gradient unchanged.
        with torch.no_grad():
            rounded_y = self._round("output", y.detach())
        return y + (rounded_y - y).detach()

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain layer holding the rounded weight (what an export carries; inputs and outputs need the rules)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        if "weight" in self.rounders:  # rounded to the nearest level: an export is the same every time
            rounder = self.rounders["weight"]
            low, high = rounder.range
            rounded = optical(self.weight.float(), low, high, rounder.spec.levels, rounder.spec.lut_min)
        else:
            rounded = quantize(self.weight, self.settings.weight)
        linear.weight.copy_(rounded)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        parts = {name: getattr(self.settings, name) for name in ("weight", "input", "output")}
        described = ", ".join(f"{name}={spec.format}" for name, spec in parts.items() if spec is not None)
        return f"in={self.in_features}, out={self.out_features}, {described or 'no rounding'}"
