"""Safetensors export: config.json (with per-layer block_configs), model.safetensors, tokenizer files.

The folder loads with `compressor.load` and, after `import compressor`, with
`AutoModelForCausalLM.from_pretrained`. A tied embedding is stored once.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from compressor.errors import CompressorError

MODEL_FILE = "model.safetensors"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def write_model(model, tokenizer, folder: str | Path) -> None:
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


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
