"""Weights in shards: `model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`
(transformers' convention, which transformers and vLLM read), or one `model.safetensors` when the
tensors fit in one shard (the file is then exactly what an unsharded write gives).

The index maps every tensor name to its shard and records the tensors' total bytes; shards are
filled in the order of the state dict, a new one started when the next tensor would pass the limit
(a tensor larger than the limit gets a shard of its own).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import torch

from compressor.artifact import read_json
from compressor.errors import CompressorError, shorten
from compressor.recipe import Recipe, default

MODEL_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The recipe's default (5 GB, the hub's customary size): a 1B model in bfloat16 stays one file.
DEFAULT_MAX_SHARD_BYTES = default(Recipe, "max_shard_bytes")
SHARD_NAME = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")


# safetensors' dtype names, and the order it lays tensors out in a file: larger ranks first, then by
# name (its Rust writer sorts by the Dtype enum, descending). write_file follows both, so a file it
# writes has exactly the bytes safetensors.torch.save_file writes (tests/test_shards.py checks).
DTYPE_NAMES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
               torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
               torch.int64: "I64"}
DTYPE_RANK = {dtype: rank for rank, dtype in enumerate(DTYPE_NAMES)}


def tensor_bytes(tensor) -> int:
    """Bytes of a tensor, or of a lazy one (anything with numel, element_size and load)."""
    return tensor.numel() * tensor.element_size()


def materialized(tensor) -> torch.Tensor:
    """A tensor as it is, or a lazy one read now."""
    return tensor if isinstance(tensor, torch.Tensor) else tensor.load()


def write_file(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """One safetensors file, written one tensor at a time: a lazy tensor (see tensor_bytes) is read
    just before its bytes are written, so the file never has to be in memory whole."""
    names = sorted(tensors, key=lambda name: (-DTYPE_RANK[tensors[name].dtype], name))
    header = {} if metadata is None else {"__metadata__": metadata}
    offset = 0
    for name in names:
        size = tensor_bytes(tensors[name])
        header[name] = {"dtype": DTYPE_NAMES[tensors[name].dtype], "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        for name in names:
            tensor = materialized(tensors[name]).detach().to("cpu").contiguous()
            if tuple(tensor.shape) != tuple(tensors[name].shape) or tensor.dtype != tensors[name].dtype:
                raise ValueError(f"tensor {name} read as {tuple(tensor.shape)} {tensor.dtype}, announced as "
                                 f"{tuple(tensors[name].shape)} {tensors[name].dtype}")
            if tensor.numel():
                out.write(tensor.view(-1).view(torch.uint8).numpy().data)  # the tensor's own memory, no copy


def shard_names(state: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """The tensor names of each shard, in the state dict's order."""
    shards: list[list[str]] = [[]]
    filled = 0
    for name, tensor in state.items():
        size = tensor_bytes(tensor)
        if shards[-1] and filled + size > max_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += size
    return shards


def shard_file(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def save_shards(state: dict[str, torch.Tensor], folder: Path, max_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                metadata: dict | None = None) -> list[str]:
    """Writes the tensors (or lazy ones, read as they are written) as one file or as shards with their
    index; returns the file names."""
    groups = shard_names(state, max_bytes)
    if len(groups) == 1:
        write_file(folder / MODEL_FILE, state, metadata=metadata)
        return [MODEL_FILE]
    weight_map, files = {}, []
    for i, names in enumerate(groups):
        files.append(shard_file(i, len(groups)))
        write_file(folder / files[-1], {name: state[name] for name in names}, metadata=metadata)
        weight_map.update({name: files[-1] for name in names})
    index = {"metadata": {"total_size": sum(tensor_bytes(t) for t in state.values())}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding an artifact's weights: the index's shards, or model.safetensors."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        index = read_json(index_path, INDEX_FILE)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CompressorError(f"{index_path}: expected an object with a non-empty weight_map")
        names = sorted(set(weight_map.values()), key=str)
        bad = [n for n in names if not isinstance(n, str) or not SHARD_NAME.fullmatch(n)]
        if bad:
            raise CompressorError(f"{index_path}: weight_map names {shorten(bad[0])}, not a shard "
                                  "(model-0000k-of-0000n.safetensors)")
        counts = {int(SHARD_NAME.fullmatch(n).group(2)) for n in names}
        if len(counts) != 1 or len(names) != counts.pop():
            raise CompressorError(f"{index_path}: weight_map names {len(names)} shards, not the n of their "
                                  "model-0000k-of-0000n names")
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CompressorError(f"{folder}: shard {missing[0]} named in {INDEX_FILE} is missing")
        return [folder / n for n in names]
    if (folder / MODEL_FILE).is_file():
        return [folder / MODEL_FILE]
    raise CompressorError(f"{folder}: not an artifact folder (needs config.json and {MODEL_FILE}, or {INDEX_FILE} "
                          "with its shards)")


def index_map(folder: Path) -> dict[str, str] | None:
    """Tensor name -> shard file from the index, or None when the weights are one file."""
    index_path = folder / INDEX_FILE
    return dict(read_json(index_path, INDEX_FILE)["weight_map"]) if index_path.is_file() else None


def weights_bytes(folder: Path) -> int:
    """Bytes of every weight file (headers included), the artifact's weight size on disk."""
    return sum(path.stat().st_size for path in weight_files(folder))
