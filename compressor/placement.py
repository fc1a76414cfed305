"""The device and compute precision a run computes in: `auto|cpu|cuda|cuda:N` and
`auto|float32|bfloat16|float16` resolved against this machine, with one clear error for a device
that does not exist or a precision it cannot run.

auto picks the first CUDA device when one is visible, else the CPU; the auto precision is bfloat16
on CUDA and float32 on the CPU. Sums that need the range (Hessians, second moments, Cholesky and
SVD, divergences, perplexity) are taken in float32 or float64 by their own code, whatever this is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from compressor.errors import CompressorError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d{1,3})?)$")
DEVICE_RULE = "auto, cpu, cuda or cuda:N"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_RULE = "auto, " + ", ".join(DTYPES)


@dataclass(frozen=True)
class Placement:
    """Where the model computes: the device and the precision of weights and activations there."""

    device: torch.device
    dtype: torch.dtype

    def describe(self) -> str:
        return f"{self.device} ({str(self.dtype).removeprefix('torch.')})"


CPU_FLOAT32 = Placement(torch.device("cpu"), torch.float32)


def resolve_device(spec: str | torch.device | None = "auto", where: str = "device") -> torch.device:
    """The torch device a spec names; an error line for a spec that is not one or a device that is absent."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = "auto" if spec is None else spec
    if not isinstance(spec, str) or not DEVICE_PATTERN.fullmatch(spec):
        raise CompressorError(f"{where}: {spec!r} is not a device; allowed: {DEVICE_RULE}")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "auto":
        return torch.device("cuda:0" if visible else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    index = int(spec.split(":")[1]) if ":" in spec else 0
    if not visible:
        reason = ("this torch build has no CUDA support" if torch.version.cuda is None
                  else "no CUDA device is visible (CUDA_VISIBLE_DEVICES, driver)")
        raise CompressorError(f"{where}: {spec} does not exist here: {reason}; allowed here: auto, cpu")
    if index >= visible:
        names = ", ".join(f"cuda:{i}" for i in range(visible))
        raise CompressorError(f"{where}: {spec} does not exist here: {visible} CUDA device(s) are visible; "
                              f"allowed here: auto, cpu, cuda, {names}")
    return torch.device(f"cuda:{index}")


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device, where: str = "compute_dtype") -> torch.dtype:
    """The compute precision a spec names on `device`, after checking that the device runs it."""
    if isinstance(spec, torch.dtype):
        spec = str(spec).removeprefix("torch.")
    spec = "auto" if spec is None else spec
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if spec not in DTYPES:
        raise CompressorError(f"{where}: {spec!r} is not a precision; allowed: {DTYPE_RULE}")
    dtype = DTYPES[spec]
    if device.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        major, minor = torch.cuda.get_device_capability(device)
        raise CompressorError(f"{where}: bfloat16 does not run on {device} (compute capability {major}.{minor}; "
                              "it needs 8.0 or newer); allowed here: float32, float16")
    _check_runs(dtype, device, where)
    return dtype


def _check_runs(dtype: torch.dtype, device: torch.device, where: str) -> None:
    """One small matmul, softmax and scaled-dot-product attention in `dtype`: what every layer runs."""
    try:
        x = torch.ones(2, 1, 4, 8, dtype=dtype, device=device)
        (x @ x.transpose(-1, -2)).softmax(-1)
        torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)
    except (RuntimeError, NotImplementedError) as exc:
        name = str(dtype).removeprefix("torch.")
        raise CompressorError(f"{where}: {name} does not run on {device} ({str(exc).splitlines()[0][:120]}); "
                              "allowed: another precision, or auto") from None


def resolve(device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = "auto",
            where: str = "") -> Placement:
    """device and compute_dtype together (the dtype's default depends on the device)."""
    prefix = f"{where}: " if where else ""
    found = resolve_device(device, f"{prefix}device")
    return Placement(found, resolve_dtype(dtype, found, f"{prefix}compute_dtype"))
