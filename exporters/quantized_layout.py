"""The compressed-tensors `pack-quantized` layout of quantized weights in model.safetensors.

Each quantized linear (or the embedding) `NAME.weight` is stored as `NAME.weight_packed` (codes
packed densely into int32 by compressed-tensors), `NAME.weight_scale` (float16, [out, groups]),
`NAME.weight_zero_point` (asymmetric only, packed along the output dimension) and
`NAME.weight_shape`. config.json gets a `quantization_config` with one config group per format
(bit width, group size, symmetry) whose targets are the exact module names, so transformers (with
compressed-tensors installed) and vLLM read it. The compressed-tensors version used for packing
is recorded beside it (3-bit packing changed between versions).

Weights kept exactly (super weights) are stored apart as `NAME.exact_index` (int64 flat indices)
and `NAME.exact_value` (float32); the toolkit's model class adds them back at load time.
"""

from __future__ import annotations

import re

import compressed_tensors
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationConfig

from compressor.errors import CompressorError
from compressor.transforms.quantize import QuantFormat, QuantizedWeight

LAYOUT = "pack-quantized"


def compressed_tensors_version() -> str:
    return compressed_tensors.__version__


def pack_weight(name: str, quantized: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The tensors stored for one quantized weight; `name` is the module name (no `.weight`)."""
    bits = quantized.fmt.bits
    tensors = {
        f"{name}.weight_packed": pack_to_int32(quantized.codes.contiguous(), bits),
        f"{name}.weight_scale": quantized.scale.contiguous(),
        f"{name}.weight_shape": torch.tensor(list(quantized.codes.shape), dtype=torch.int64),
    }
    if quantized.zero_point is not None:
        tensors[f"{name}.weight_zero_point"] = pack_to_int32(quantized.zero_point.contiguous(), bits, packed_dim=0)
    if quantized.exact_index is not None:
        tensors[f"{name}.exact_index"] = quantized.exact_index.to(torch.int64).contiguous()
        tensors[f"{name}.exact_value"] = quantized.exact_value.float().contiguous()
    return tensors


def unpack_weight(name: str, tensors: dict[str, torch.Tensor], fmt: QuantFormat) -> QuantizedWeight:
    shape = torch.Size(tensors[f"{name}.weight_shape"].tolist())
    codes = unpack_from_int32(tensors[f"{name}.weight_packed"], fmt.bits, shape)
    scale = tensors[f"{name}.weight_scale"]
    zero = None
    if not fmt.symmetric:
        zero = unpack_from_int32(tensors[f"{name}.weight_zero_point"], fmt.bits, scale.shape, packed_dim=0)
    return QuantizedWeight(codes, scale, zero, fmt, tensors.get(f"{name}.exact_index"),
                           tensors.get(f"{name}.exact_value"))


def format_weights_args(fmt: QuantFormat) -> dict:
    return {"num_bits": fmt.bits, "type": "int", "symmetric": fmt.symmetric,
            "strategy": "channel" if fmt.group_size is None else "group",
            "group_size": fmt.group_size, "dynamic": False, "actorder": None, "observer": "minmax"}


def quantization_config(formats: dict[str, QuantFormat], ignore: list[str]) -> dict:
    """The `quantization_config` entry of config.json for these module formats."""
    by_format: dict[QuantFormat, list[str]] = {}
    for name, fmt in formats.items():
        by_format.setdefault(fmt, []).append(name)
    groups = {}
    for index, (fmt, names) in enumerate(sorted(by_format.items(), key=lambda kv: (kv[0].bits, str(kv[0].group_size)))):
        groups[f"group_{index}"] = {"targets": sorted(names, key=_natural_key), "weights": format_weights_args(fmt),
                                    "input_activations": None, "output_activations": None, "format": LAYOUT}
    config = QuantizationConfig(config_groups=groups, format=LAYOUT, quantization_status="compressed",
                                ignore=sorted(ignore, key=_natural_key))
    data = config.model_dump(mode="json", exclude_none=False)
    data["version"] = compressed_tensors_version()
    return data


def formats_from_config(quantization: dict) -> dict[str, QuantFormat]:
    """Module name -> format, read back from a `quantization_config` this module wrote."""
    formats = {}
    for group in quantization.get("config_groups", {}).values():
        args = group["weights"]
        fmt = QuantFormat(args["num_bits"], args.get("group_size") if args.get("strategy") == "group" else None,
                          args.get("symmetric", True))
        for target in group["targets"]:
            if target.startswith("re:") or not re.fullmatch(r"[\w.]+", target):
                raise CompressorError(f"quantization_config target {target!r}: only exact module names are supported")
            formats[target] = fmt
    return formats


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def packed_shapes(name: str, shape: tuple[int, int], fmt: QuantFormat) -> dict[str, tuple[tuple[int, ...], str]]:
    """The tensors `pack_weight` stores for a weight of `shape` in `fmt`: name -> (shape, kind), kind
    'float' or a safetensors integer dtype (see exporters.safetensors.expected_tensors). Measured by
    packing one zero row and column, so the rule is compressed-tensors' own."""
    rows, columns = shape
    groups = fmt.groups(columns)
    packed_columns = pack_to_int32(torch.zeros(1, columns, dtype=torch.int8), fmt.bits).shape[1]
    tensors = {f"{name}.weight_packed": ((rows, packed_columns), "I32"),
               f"{name}.weight_scale": ((rows, groups), "float"),
               f"{name}.weight_shape": ((2,), "I64")}
    if not fmt.symmetric:
        packed_rows = pack_to_int32(torch.zeros(rows, 1, dtype=torch.int8), fmt.bits, packed_dim=0).shape[0]
        tensors[f"{name}.weight_zero_point"] = ((packed_rows, groups), "I32")
    return tensors
