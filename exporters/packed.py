"""Quantized weights kept packed in a loaded model, for serving with less memory.

Each quantized linear (and a quantized embedding) keeps its int8 codes as its `weight` parameter and
its scales (zero points, weights kept exactly) in a torch parametrization, which dequantizes the
weight when the module uses it: one layer's float weights exist at a time, and the model holds about
a quarter of the float32 bytes of its quantized weights (one byte per code). The values are exactly
those of `QuantizedWeight.dequantize`, so the logits equal the dense model's.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from compressor.transforms.quantize import QuantizedWeight


class Dequantized(nn.Module):
    """The parametrization: int8 codes [out, in] -> the float32 weight."""

    def __init__(self, quantized: QuantizedWeight):
        super().__init__()
        self.fmt = quantized.fmt
        self.register_buffer("scale", quantized.scale)
        self.register_buffer("zero_point", quantized.zero_point)
        self.register_buffer("exact_index", quantized.exact_index)
        self.register_buffer("exact_value", quantized.exact_value)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        rows, columns = codes.shape
        width = self.fmt.width(columns)
        if columns % width:  # a last group cut short: the reference path
            return QuantizedWeight(codes, self.scale, self.zero_point, self.fmt, self.exact_index,
                                   self.exact_value).dequantize()
        # The same products as QuantizedWeight.dequantize, with the scales broadcast over each group
        # instead of repeated into a full matrix.
        values = codes.float().view(rows, -1, width)
        if self.zero_point is not None:
            values = values - self.zero_point.float()[..., None]
        weight = (values * self.scale.float()[..., None]).view(rows, columns)
        if self.exact_index is not None:
            weight.view(-1)[self.exact_index] = self.exact_value.to(weight.dtype)
        return weight


def keep_packed(module: nn.Module, quantized: QuantizedWeight) -> None:
    """Makes `module.weight` the codes, dequantized on use."""
    module.weight = nn.Parameter(quantized.codes.contiguous(), requires_grad=False)
    parametrize.register_parametrization(module, "weight", Dequantized(quantized), unsafe=True)


def packed_modules(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if parametrize.is_parametrized(module, "weight")]
