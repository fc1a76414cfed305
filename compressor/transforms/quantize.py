"""Weight quantizers as plain functions over tensors: round-to-nearest (min-max) and GPTQ.

A weight [out, in] is cut into groups of `group_size` consecutive input columns (or one group per
output row: per-channel). Each group gets a scale (symmetric: its largest-magnitude weight maps
exactly to the most negative code; asymmetric: its range over the code range, with a zero point);
codes are signed integers in [-2^(b-1), 2^(b-1) - 1] and a weight is read back as (code - zero) * scale.
This is the convention of the compressed-tensors `pack-quantized` layout, so codes are stored as
they are. Scales are rounded to float16 (what the artifact stores) *before* the codes are chosen,
so the stored model is exactly the model that was evaluated.

`keep_exact` marks single weights (super weights) that are left out of the group statistics and
restored exactly by a sparse correction stored beside the packed weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compressor.recipe import QUANT_BITS, Quantize, default

SCALE_DTYPE = torch.float16
SUPPORTED_BITS = QUANT_BITS


@dataclass(frozen=True)
class QuantFormat:
    bits: int
    group_size: int | None = 64
    symmetric: bool = True
    positive_scales: bool = False  # symmetric only: every scale positive (compressor.recipe.Quantize.scales)

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or None (per channel), got {self.group_size}")

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else math.ceil(in_features / self.group_size)

    def width(self, in_features: int) -> int:
        return in_features if self.group_size is None else self.group_size

    def label(self) -> str:
        group = "channel" if self.group_size is None else f"g{self.group_size}"
        return f"int{self.bits}-{group}-{'sym' if self.symmetric else 'asym'}{'-pos' if self.positive_scales else ''}"


def recipe_format(quantize, bits: int, group_size=None) -> QuantFormat:
    """The format of `bits` under a recipe's quantize section, in `group_size` (one of its group
    sizes; default the primary, the first listed; "channel": one scale per row)."""
    group = quantize.group_sizes[0] if group_size is None else group_size
    return QuantFormat(bits, None if group == "channel" else group, quantize.symmetric,
                       quantize.symmetric and quantize.scales == "positive")


@dataclass
class QuantizedWeight:
    codes: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # float16 [out, groups]
    zero_point: torch.Tensor | None  # int8 [out, groups]; None when symmetric
    fmt: QuantFormat
    # Weights kept exactly: flat indices into [out, in] and the exact values (float32).
    exact_index: torch.Tensor | None = None
    exact_value: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        out_features, in_features = self.codes.shape
        width = self.fmt.width(in_features)
        if in_features % width == 0:
            # The same products, in place in one float matrix (no repeated scale or zero matrices:
            # a 49152 x 576 embedding would otherwise take three 113 MB matrices at once).
            weight = self.codes.float()
            grouped = weight.view(out_features, -1, width)
            if self.zero_point is not None:
                grouped.sub_(self.zero_point.float()[..., None])
            grouped.mul_(self.scale.float()[..., None])
            if self.exact_index is not None:
                weight.view(-1)[self.exact_index] = self.exact_value
            return weight
        scale = self.scale.float().repeat_interleave(width, dim=1)[:, :in_features]
        codes = self.codes.float()
        if self.zero_point is not None:
            codes = codes - self.zero_point.float().repeat_interleave(width, dim=1)[:, :in_features]
        weight = codes * scale
        if self.exact_index is not None:
            weight.view(-1)[self.exact_index] = self.exact_value
        return weight


def code_range(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


# `clip: search`: the group's range shrunk by each of these factors (the GPTQ reference's `mse`
# option and AWQ's clipping search), the one with the least importance-weighted squared error kept.
CLIP_SHRINK = tuple(1.0 - i / 100 for i in range(0, 21))


def group_parameters(groups: torch.Tensor, fmt: QuantFormat, ignore: torch.Tensor | None = None,
                     clip: str = "minmax", importance: torch.Tensor | None = None):
    """Scale and zero point of each row of `groups` [..., width] (ignored entries left out).

    `minmax` covers the group's whole range. `search` tries the range shrunk by each CLIP_SHRINK
    factor and keeps, per group, the one whose round-to-nearest error sum importance * (w - q)^2 is
    least (`importance` [width]: a weight per input column, such as the Hessian diagonal; None:
    equal), the unshrunk range included, so it is never worse than `minmax` on that measure."""
    scale, low = _range_parameters(groups, fmt, ignore)
    if clip == "minmax":
        return _stored_parameters(scale, low, fmt)
    if clip != "search":
        raise ValueError(f"clip must be 'minmax' or 'search', got {clip!r}")
    values = groups.float()
    weight = torch.ones(values.shape[-1], device=values.device) if importance is None else importance.float()
    if ignore is not None:
        weight = weight * (~ignore).float()
    best = best_error = None
    for shrink in CLIP_SHRINK:
        candidate = _stored_parameters(scale * shrink, None if low is None else low * shrink, fmt)
        _, dequantized = quantize_with(values, *candidate, fmt.bits)
        error = ((values - dequantized) ** 2 * weight).sum(-1)
        if best is None:
            best, best_error = [t.clone() if t is not None else None for t in candidate], error
            continue
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = [torch.where(better, new, old) if old is not None else None for new, old in zip(candidate, best)]
    return best[0], best[1]


def _range_parameters(groups: torch.Tensor, fmt: QuantFormat, ignore: torch.Tensor | None):
    """The min-max scale (float32) of each group, and the low end of its range (asymmetric only)."""
    qmin, qmax = code_range(fmt.bits)
    values = groups.float()
    if fmt.symmetric and fmt.positive_scales:
        # The smallest positive scale that reaches both the largest weight (at qmax) and the most
        # negative one (at qmin): no weight is clipped.
        kept = values.masked_fill(ignore, 0) if ignore is not None else values
        return torch.maximum(kept.amax(-1).clamp(min=0) / qmax, kept.amin(-1).clamp(max=0) / qmin), None
    if fmt.symmetric:
        # The group's largest-magnitude weight, with its sign, lands exactly on the most negative
        # code: all 2^b codes are in use and the largest weight is exact (the scale is negative
        # when that weight is positive). Measured on the embedded model, this beats both
        # max/qmax and the half-open max/((qmax - qmin) / 2).
        kept = values.masked_fill(ignore, 0) if ignore is not None else values
        extreme = kept.gather(-1, kept.abs().argmax(-1, keepdim=True)).squeeze(-1)
        return extreme / qmin, None
    low = values.masked_fill(ignore, float("inf")) if ignore is not None else values
    high = values.masked_fill(ignore, float("-inf")) if ignore is not None else values
    low, high = low.amin(-1).clamp(max=0), high.amax(-1).clamp(min=0)
    return (high - low) / (qmax - qmin), low


def _stored_parameters(scale: torch.Tensor, low: torch.Tensor | None, fmt: QuantFormat):
    """The float16 scale as stored (at least the smallest normal float16 in magnitude: never zero)
    and, asymmetric, the int8 zero point that puts `low` on the lowest code."""
    qmin, qmax = code_range(fmt.bits)
    sign = torch.where(scale < 0, -1.0, 1.0)
    scale = (sign * scale.abs().clamp(min=2.0 ** -14)).to(SCALE_DTYPE)
    zero = None
    if not fmt.symmetric:
        zero = torch.clamp(torch.round(qmin - low / scale.float()), qmin, qmax).to(torch.int8)
    return scale, zero


def quantize_with(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int):
    """Codes of `values` [..., width] given per-row scale/zero [...]; returns (codes, dequantized)."""
    qmin, qmax = code_range(bits)
    s = scale.float().unsqueeze(-1)
    z = zero.float().unsqueeze(-1) if zero is not None else 0.0
    codes = torch.clamp(torch.round(values / s) + z, qmin, qmax)
    return codes.to(torch.int8), (codes - z) * s


def _pad_columns(weight: torch.Tensor, width: int) -> torch.Tensor:
    pad = (-weight.shape[1]) % width
    return torch.nn.functional.pad(weight, (0, pad)) if pad else weight


def _exact_parts(weight: torch.Tensor, keep_exact: torch.Tensor | None):
    if keep_exact is None or not bool(keep_exact.any()):
        return None, None
    index = keep_exact.to(weight.device).flatten().nonzero().flatten()
    return index, weight.flatten()[index].float().clone()


def rtn_quantize(weight: torch.Tensor, fmt: QuantFormat, keep_exact: torch.Tensor | None = None,
                 clip: str = "minmax") -> QuantizedWeight:
    """Round-to-nearest with min-max group scales (`clip: search`: searched ranges, equal importance)."""
    out_features, in_features = weight.shape
    width = fmt.width(in_features)
    padded = _pad_columns(weight.float(), width)
    groups = padded.view(out_features, -1, width)
    ignore = None
    if keep_exact is not None:
        ignore = _pad_columns(keep_exact.to(device=weight.device, dtype=torch.float32), width).bool().view(out_features, -1, width)
    scale, zero = group_parameters(groups, fmt, ignore, clip)
    codes, _ = quantize_with(groups, scale, zero, fmt.bits)
    codes = codes.view(out_features, -1)[:, :in_features].contiguous()
    index, value = _exact_parts(weight, keep_exact)
    return QuantizedWeight(codes, scale, zero, fmt, index, value)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, fmt: QuantFormat, damp: float = default(Quantize, "damp"),
                  act_order: bool = default(Quantize, "act_order"), block_size: int = 128,
                  keep_exact: torch.Tensor | None = None, clip: str = "minmax") -> QuantizedWeight:
    """GPTQ (Frantar et al. 2022): columns quantized one at a time, the rounding error of each spread
    over the columns not yet quantized through the inverse Hessian of the layer's inputs.

    `hessian` is X^T X (any positive multiple) of the inputs seen by this linear, [in, in].
    With `act_order`, columns go in order of decreasing Hessian diagonal; group parameters are then
    fixed up front from the original weight (static groups) so the stored layout stays plain.
    With `clip: search`, each group's range is searched (group_parameters) with the Hessian diagonal
    of its columns as their importance.
    """
    out_features, in_features = weight.shape
    width = fmt.width(in_features)
    if fmt.group_size is not None and block_size % width:
        raise ValueError(f"GPTQ needs a group_size dividing the block size {block_size}; got {fmt.group_size}")
    W = weight.float().clone()
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    importance = torch.diag(H).clone()  # of the columns in their original order
    exact = keep_exact.to(W.device).clone() if keep_exact is not None else torch.zeros_like(W, dtype=torch.bool)
    n_groups = fmt.groups(in_features)
    scale = torch.empty(out_features, n_groups, dtype=SCALE_DTYPE, device=W.device)
    zero = torch.empty(out_features, n_groups, dtype=torch.int8, device=W.device) if not fmt.symmetric else None

    def fix_group(g: int, source: torch.Tensor, source_exact: torch.Tensor):
        s, z = group_parameters(source, fmt, source_exact, clip, importance[g * width:(g + 1) * width])
        scale[:, g] = s
        if zero is not None:
            zero[:, g] = z

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if act_order or fmt.group_size is None:
        # Static parameters from the original weight (per channel: one group over all columns).
        for g in range(n_groups):
            cols = slice(g * width, (g + 1) * width)
            fix_group(g, W[:, cols], exact[:, cols])
    if act_order:
        W, H, exact = W[:, perm], H[perm][:, perm], exact[:, perm]
    original = W.clone()  # a weight kept exactly is stored as it was, before any error feedback
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))  # H + damp * mean(diag) * I, without an n x n identity
    # The inverse's upper Cholesky factor, each step's input released before the next one is made
    # (for an 8192-wide down_proj each of these matrices is 268 MB).
    factor = torch.linalg.cholesky(H)
    del H
    inverse = torch.cholesky_inverse(factor)
    del factor
    Hinv = torch.linalg.cholesky(inverse, upper=True)
    del inverse

    codes = torch.zeros(out_features, in_features, dtype=torch.int8, device=W.device)
    for start in range(0, in_features, block_size):
        stop = min(start + block_size, in_features)
        W1 = W[:, start:stop].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[start:stop, start:stop]
        for i in range(stop - start):
            column = start + i
            original_column = int(perm[column]) if act_order else column
            group = original_column // width if fmt.group_size is not None else 0
            if not act_order and fmt.group_size is not None and column % width == 0:
                fix_group(group, W1[:, i:i + width], exact[:, column:column + width])
            w = W1[:, i]
            z = zero[:, group] if zero is not None else None
            c, q = quantize_with(w.unsqueeze(-1), scale[:, group], z, fmt.bits)
            q = q.squeeze(-1)
            q = torch.where(exact[:, column], original[:, column], q)
            codes[:, original_column] = c.squeeze(-1)
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, stop:] -= Err1 @ Hinv[start:stop, stop:]
    index, value = _exact_parts(weight, keep_exact)
    return QuantizedWeight(codes, scale, zero, fmt, index, value)


def stored_bytes(out_features: int, in_features: int, fmt: QuantFormat) -> int:
    """Bytes of the pack-quantized tensors of one linear: packed int32 codes, float16 scales, int32
    zero points packed along the output dimension (asymmetric), and the int64 shape vector."""
    groups = fmt.groups(in_features)
    packed = out_features * math.ceil(in_features * fmt.bits / 32) * 4
    scales = out_features * groups * 2
    zeros = 0 if fmt.symmetric else math.ceil(out_features * fmt.bits / 32) * groups * 4
    return packed + scales + zeros + 2 * 8


def exact_bytes(count: int) -> int:
    """Bytes of a sparse exact-weight correction: int64 flat indices and float32 values."""
    return count * (8 + 4)
