"""Safetensors export: config.json (with per-layer block_configs), model.safetensors, tokenizer files.

The folder loads with `compressor.load` and, after `import compressor`, with
`AutoModelForCausalLM.from_pretrained`. A tied embedding is stored once. Quantized weights are
stored in the compressed-tensors pack-quantized layout (see `exporters.quantized_layout`);
`read_model` unpacks them itself, so `compressor.load` does not depend on transformers' loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from compressor.errors import CompressorError

MODEL_FILE = "model.safetensors"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def write_model(model, tokenizer, folder: str | Path, quantized: dict | None = None) -> None:
    """Writes the model; `quantized` (module name -> QuantizedWeight) replaces those weights by their
    packed codes (the model itself must already hold their dequantized values)."""
    folder = Path(folder)
    if quantized:
        _write_quantized(model, folder, quantized)
    else:
        model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _write_quantized(model, folder: Path, quantized: dict) -> None:
    import copy

    from safetensors.torch import save_file

    from exporters.quantized_layout import pack_weight, quantization_config

    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    exact = {}
    for name, weight in quantized.items():
        state.pop(f"{name}.weight")
        state.pop(f"{name}.exact_index", None)
        state.pop(f"{name}.exact_value", None)
        state.update(pack_weight(name, weight))
        if weight.exact_index is not None:
            exact[name] = int(weight.exact_index.numel())
    config = copy.deepcopy(model.config)
    # Without an explicit dtype, transformers would take the first floating tensor's (a float16 scale).
    config.dtype = model.dtype
    config.exact_weights = exact or None
    ignore = ["lm_head"] if model.lm_head is not None else []
    config.quantization_config = quantization_config({name: q.fmt for name, q in quantized.items()}, ignore)
    config.save_pretrained(folder)
    save_file(state, str(folder / MODEL_FILE), metadata={"format": "pt"})


def read_quantized_weights(folder: str | Path, state: dict | None = None) -> dict:
    """Module name -> QuantizedWeight (codes, scales, exact weights) of an artifact's packed weights;
    empty when the artifact is not quantized. The ONNX exporter writes these codes as they are."""
    from safetensors.torch import load_file

    from compressor.modeling import CompressedConfig
    from exporters.quantized_layout import formats_from_config, unpack_weight

    folder = Path(folder)
    config = CompressedConfig.from_pretrained(folder)
    if not getattr(config, "quantization_config", None):
        return {}
    state = load_file(str(folder / MODEL_FILE)) if state is None else state
    weights = {}
    for name, fmt in formats_from_config(config.quantization_config).items():
        try:
            weights[name] = unpack_weight(name, state, fmt)
        except KeyError as exc:
            raise CompressorError(f"{folder / MODEL_FILE}: packed tensor {exc} of {name} is missing") from None
    return weights


def _read_quantized(folder: Path, config) -> "torch.nn.Module":
    from safetensors.torch import load_file

    from compressor.modeling import build_with_weights

    state = load_file(str(folder / MODEL_FILE))
    for name, weight in read_quantized_weights(folder, state).items():
        for suffix in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point"):
            state.pop(f"{name}.{suffix}", None)
        weight.exact_index = weight.exact_value = None  # restored by the model on its first forward
        state[f"{name}.weight"] = weight.dequantize()
    return build_with_weights(config, state, f"reading {folder}")


def read_model(folder: str | Path, with_tokenizer: bool = True):
    from transformers import AutoTokenizer

    from compressor.modeling import CompressedConfig, CompressedForCausalLM

    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / MODEL_FILE).is_file():
        raise CompressorError(f"{folder}: not an artifact folder (needs config.json and {MODEL_FILE})")
    config_data = json.loads((folder / "config.json").read_text())
    if config_data.get("model_type") != CompressedConfig.model_type:
        raise CompressorError(
            f"{folder}: config.json model_type is {config_data.get('model_type')!r}, expected "
            f"{CompressedConfig.model_type!r} (an artifact written by this toolkit)")
    if config_data.get("quantization_config"):
        model = _read_quantized(folder, CompressedConfig.from_pretrained(folder))
    else:
        model = CompressedForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder) if with_tokenizer else None
    return model, tokenizer


def tensor_bytes(path: str | Path) -> dict[str, int]:
    """Bytes of every tensor stored in a safetensors file (the data section, header excluded)."""
    sizes = {}
    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():
            sl = handle.get_slice(name)
            count = 1
            for d in sl.get_shape():
                count *= d
            sizes[name] = count * DTYPE_BYTES[sl.get_dtype()]
    return sizes
