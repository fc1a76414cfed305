"""Safetensors export: config.json, model.safetensors, tokenizer files.

config.json takes the most standard form the model allows (exporters.config_forms, chosen by
compressor.serving): the source family's own class when nothing was removed or shared, the
Nemotron-NAS form when sub-layers were removed, the toolkit's CompressedForCausalLM otherwise. Every
form loads with `compressor.load` and, after `import compressor`, with
`AutoModelForCausalLM.from_pretrained`. A tied embedding is stored once. Quantized weights are
stored in the compressed-tensors pack-quantized layout (see `exporters.quantized_layout`);
`read_model` unpacks them itself, so `compressor.load` does not depend on transformers' loader.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer

from compressor.artifact import read_json
from compressor.errors import CompressorError, one_line, shorten
from compressor.execution.offload import LazyTensor, is_offloaded, offload_of, stored_state
from compressor.serving import require_targets
from compressor.modeling import CompressedForCausalLM, build_with_weights
from compressor.transforms.quantize import SCALE_DTYPE
from compressor.transforms.quantize_model import StoredCodes
from compressor.transforms.sparse_tokens import SparseTokenSettings, check_settings
from exporters.config_forms import compressed_config, form_of, write_config
from exporters.shards import DEFAULT_MAX_SHARD_BYTES, INDEX_FILE, MODEL_FILE, index_map, save_shards, weight_files
from exporters.packed import keep_packed
from exporters.quantized_layout import (formats_from_config, pack_weight, packed_shapes, quantization_config,
                                        unpack_weight)

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def write_model(model, tokenizer, folder: str | Path, quantized: dict | None = None, serve=(),
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Writes the model; `quantized` (module name -> QuantizedWeight) replaces those weights by their
    packed codes (the model itself must already hold their dequantized values). `serve` names the
    stacks (compressor.serving) that must load the result: anything else is refused before writing.
    Weights above `max_shard_bytes` are split into shards with an index (exporters.shards)."""
    folder = Path(folder)
    with _os_errors(folder):
        if quantized:
            _write_quantized(model, folder, quantized, serve, max_shard_bytes)
        elif is_offloaded(model):
            # Layers on disk: their tensors are read one at a time as the shards are written.
            config = copy.deepcopy(model.config)
            config.dtype = offload_of(model).placement.dtype
            require_targets(config, serve)
            folder.mkdir(parents=True, exist_ok=True)
            write_config(config, folder)
            model.generation_config.save_pretrained(folder)
            save_shards(stored_state(model), folder, max_shard_bytes, metadata={"format": "pt"})
        else:
            config = copy.deepcopy(model.config)
            config.dtype = model.dtype
            require_targets(config, serve)
            model.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_bytes)
            write_config(config, folder)  # the form compressor.serving picks (save_pretrained wrote the toolkit's)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)


@contextlib.contextmanager
def _os_errors(folder: Path):
    """safetensors reports a failed write (a full disk) as its own error type with the OS error number
    in the text; turn it back into the OSError it is, so the caller's disk-error handling applies."""
    try:
        yield
    except Exception as exc:
        found = re.search(r"os error (\d+)", str(exc)) if type(exc).__name__ == "SafetensorError" else None
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(folder)) from None


def _write_quantized(model, folder: Path, quantized: dict, serve, max_shard_bytes: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous() if isinstance(tensor, torch.Tensor) else tensor
             for name, tensor in stored_state(model).items()}
    exact = {}
    for name, weight in quantized.items():
        state.pop(f"{name}.weight")
        state.pop(f"{name}.exact_index", None)
        state.pop(f"{name}.exact_value", None)
        if isinstance(weight, StoredCodes):  # an offloaded run's codes: packed as they are written
            state.update(packed_later(name, weight))
            if weight.exact_count:
                exact[name] = weight.exact_count
            continue
        state.update(pack_weight(name, weight))
        if weight.exact_index is not None:
            exact[name] = int(weight.exact_index.numel())
    config = copy.deepcopy(model.config)
    # Without an explicit dtype, transformers would take the first floating tensor's (a float16 scale).
    config.dtype = offload_of(model).placement.dtype if is_offloaded(model) else model.dtype
    config.exact_weights = exact or None
    ignore = ["lm_head"] if model.lm_head is not None else []
    config.quantization_config = quantization_config({name: q.fmt for name, q in quantized.items()}, ignore)
    write_config(config, folder, serve)
    save_shards(state, folder, max_shard_bytes, metadata={"format": "pt"})


@dataclass(frozen=True)
class PackedPart(LazyTensor):
    """One tensor pack_weight stores for a quantized weight, packed from its stored codes when read."""

    name: str
    codes: StoredCodes
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def load(self) -> torch.Tensor:
        return pack_weight(self.name, self.codes.load())[self.key]


def packed_later(name: str, codes: StoredCodes) -> dict[str, PackedPart]:
    """The tensors pack_weight would give for `codes`, each packed when the writer reaches it."""
    rows, columns = codes.tensors["codes"].shape
    kinds = {"float": SCALE_DTYPE, "I32": torch.int32, "I64": torch.int64}
    parts = {key: PackedPart(name, codes, key, tuple(shape), kinds[kind])
             for key, (shape, kind) in packed_shapes(name, (rows, columns), codes.fmt).items()}
    if codes.exact_count:
        parts[f"{name}.exact_index"] = PackedPart(name, codes, f"{name}.exact_index", (codes.exact_count,), torch.int64)
        parts[f"{name}.exact_value"] = PackedPart(name, codes, f"{name}.exact_value", (codes.exact_count,),
                                                  torch.float32)
    return parts


def read_quantized_weights(folder: str | Path, state: dict | None = None, config=None) -> dict:
    """Module name -> QuantizedWeight (codes, scales, exact weights) of an artifact's packed weights;
    empty when the artifact is not quantized. The ONNX exporter writes these codes as they are.
    `state` and `config`, when the caller has read them already, are used instead of reading again."""

    folder = Path(folder)
    config = read_config(folder) if config is None else config
    if not getattr(config, "quantization_config", None):
        return {}
    state = load_checked(folder, config) if state is None else state
    weights = {}
    for name, fmt in formats_from_config(config.quantization_config).items():
        try:
            weights[name] = unpack_weight(name, state, fmt)
        except KeyError as exc:
            raise CompressorError(f"{folder}: packed tensor {exc} of {name} is missing from the weights") from None
    return weights


def _read_packed(state: dict, config, folder: Path) -> "torch.nn.Module":
    """The model with its quantized weights kept as codes (exporters.packed), no float copy of them."""
    weights = read_quantized_weights(folder, state, config)
    for name, weight in weights.items():
        for suffix in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point"):
            state.pop(f"{name}.{suffix}", None)
        weight.exact_index, weight.exact_value = state.get(f"{name}.exact_index"), state.get(f"{name}.exact_value")

    def attach(model):
        for name, weight in weights.items():
            keep_packed(model.get_submodule(name), weight)

    return build_with_weights(config, state, f"reading {folder}", attach)


def _read_quantized(state: dict, config, folder: Path) -> "torch.nn.Module":
    for name, weight in read_quantized_weights(folder, state, config).items():
        for suffix in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point"):
            state.pop(f"{name}.{suffix}", None)
        weight.exact_index = weight.exact_value = None  # restored by the model on its first forward
        state[f"{name}.weight"] = weight.dequantize()
    return build_with_weights(config, state, f"reading {folder}")


def read_config(folder: Path):
    """The artifact's CompressedConfig, from config.json in any of its forms, after checking it (see
    compressor.models.config_checks)."""
    path = folder / "config.json"
    data = read_json(path, "config.json")
    if form_of(data) is None:
        raise CompressorError(
            f"{folder}: config.json model_type is {shorten(data.get('model_type'))} without the toolkit's "
            f"compressor_artifact key; expected an artifact written by this toolkit")
    return compressed_config(data, str(path))


def expected_tensors(config) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, tuple[int, int]]]:
    """Every tensor model.safetensors must hold for this config: name -> (shape, kind), where kind is
    'float' (any floating dtype) or a safetensors integer dtype. Quantized modules hold their packed
    tensors instead of `weight`; the second mapping gives their unpacked (out, in) shapes."""

    try:
        with torch.device("meta"):
            model = CompressedForCausalLM(config)
    except (AttributeError, KeyError, ValueError, TypeError, IndexError) as exc:
        # e.g. exact_weights naming a module the model does not have
        raise CompressorError(f"config.json describes a model this toolkit cannot build ({type(exc).__name__}: "
                              f"{one_line(exc, 160)})") from None
    expected = {}
    for name, tensor in model.state_dict().items():
        kind = "float" if tensor.is_floating_point() else "I64"
        expected[name] = (tuple(tensor.shape), kind)
    logical = {}
    quantization = getattr(config, "quantization_config", None)
    if quantization:
        try:
            formats = formats_from_config(quantization)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CompressorError(f"config.json quantization_config is not one this toolkit writes "
                                  f"({type(exc).__name__}: {one_line(exc, 120)})") from None
        for name, fmt in formats.items():
            weight = expected.pop(f"{name}.weight", None)
            if weight is None or len(weight[0]) != 2:
                raise CompressorError(f"config.json quantization_config targets {shorten(name)}, which is not a "
                                      "linear or the embedding of this model")
            expected.update(packed_shapes(name, weight[0], fmt))
            logical[name] = weight[0]
    return expected, logical


def _check_header(handles: dict, expected: dict, where: Path) -> None:
    """`handles`: tensor name -> the open safetensors file holding it (one file, or every shard)."""
    present = set(handles)
    missing = [name for name in expected if name not in present]
    if missing:
        raise CompressorError(f"{where}: tensor {missing[0]} is missing"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; config.json "
                              "implies it (a layer dropped from the weights, or config.json edited)")
    unexplained = sorted(present - set(expected))
    if unexplained:
        raise CompressorError(f"{where}: tensor {shorten(unexplained[0])} is not explained by config.json"
                              f"{f' (and {len(unexplained) - 1} more)' if len(unexplained) > 1 else ''}; "
                              "config.json and the weights disagree")
    for name, (shape, kind) in expected.items():
        sliced = handles[name].get_slice(name)
        got_shape, got_dtype = tuple(sliced.get_shape()), sliced.get_dtype()
        if got_shape != shape:
            raise CompressorError(f"{where}: tensor {name} has shape {list(got_shape)}, config.json implies "
                                  f"{list(shape)}")
        if (got_dtype not in FLOAT_DTYPES) if kind == "float" else (got_dtype != kind):
            allowed = "a floating type" if kind == "float" else kind
            raise CompressorError(f"{where}: tensor {name} is {got_dtype}, expected {allowed}")


def refuse_non_finite(tensors: dict, where: str, what: str = "tensor") -> None:
    """One error naming the first floating tensor that holds NaN or an infinity."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CompressorError(f"{where}: {what} {name} holds NaN or infinite values")


def _check_values(state: dict, config, logical: dict, path: Path) -> None:
    refuse_non_finite(state, str(path))
    for module, shape in logical.items():
        stored = state[f"{module}.weight_shape"].tolist()
        if stored != list(shape):
            raise CompressorError(f"{path}: {module}.weight_shape is {shorten(stored)}, config.json implies "
                                  f"{list(shape)}")
    for name, count in (getattr(config, "exact_weights", None) or {}).items():
        index = state[f"{name}.exact_index"]
        rows, columns = state_shape(state, name)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= rows * columns):
            raise CompressorError(f"{path}: {name}.exact_index points outside its {rows} x {columns} matrix")


def state_shape(state: dict, module: str) -> tuple[int, int]:
    if f"{module}.weight_shape" in state:
        rows, columns = state[f"{module}.weight_shape"].tolist()
        return int(rows), int(columns)
    rows, columns = state[f"{module}.weight"].shape
    return int(rows), int(columns)


def load_checked(folder: Path, config) -> dict:
    """The weights as tensors (model.safetensors, or every shard of the index), after checking their
    headers against the config: every tensor the config implies present with its shape and dtype,
    nothing unexplained, no tensor in two shards, the index naming each tensor's shard; then every
    float finite."""
    files = weight_files(folder)
    where = files[0] if len(files) == 1 else folder / INDEX_FILE
    expected, logical = expected_tensors(config)
    indexed = index_map(folder)
    state = {}
    try:
        with contextlib.ExitStack() as stack:
            handles = {}
            for path in files:
                handle = stack.enter_context(safe_open(str(path), framework="pt"))
                for name in handle.keys():
                    if name in handles:
                        raise CompressorError(f"{path}: tensor {shorten(name)} is also in another shard")
                    if indexed is not None and indexed.get(name) != path.name:
                        raise CompressorError(f"{path}: holds tensor {shorten(name)}, which {INDEX_FILE} places in "
                                              f"{shorten(indexed.get(name))}")
                    handles[name] = handle
            if indexed is not None and set(indexed) != set(handles):
                extra = sorted(set(indexed) - set(handles))
                raise CompressorError(f"{folder / INDEX_FILE}: names tensor {shorten(extra[0])}, which no shard holds")
            _check_header(handles, expected, where)
        for path in files:
            state.update(load_file(str(path)))
    except CompressorError:
        raise
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CompressorError(f"{where}: not a readable safetensors file ({one_line(exc, 160)})") from None
    _check_values(state, config, logical, where)
    return state


def read_model(folder: str | Path, with_tokenizer: bool = True, packed: bool = False):
    """The artifact's model (float, eval mode) and tokenizer. Strict: config.json is checked, and the
    weights against it, before the model is built (the manifest is compressor.runtime.load's).
    With `packed`, quantized weights stay codes dequantized on use (exporters.packed: for serving);
    without, they are float tensors (for compressing further and exporting)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CompressorError(f"{folder}: not an artifact folder (needs config.json and {MODEL_FILE})")
    weight_files(folder)  # one error when the weights are missing, before config.json is read
    config = read_config(folder)
    state = load_checked(folder, config)
    if getattr(config, "quantization_config", None):
        model = (_read_packed if packed else _read_quantized)(state, config, folder)
    else:
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        model = build_with_weights(config, state, f"reading {folder}")
    if getattr(config, "sparse_tokens", None):
        where = f"{folder / 'config.json'} sparse_tokens"
        check_settings(SparseTokenSettings.from_dict(config.sparse_tokens, where), config, where)
    tokenizer = read_tokenizer(folder) if with_tokenizer else None
    return model, tokenizer


def read_tokenizer(folder: Path):
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # tokenizers and transformers raise many types for damaged files
        raise CompressorError(f"{folder}: the tokenizer files cannot be read ({type(exc).__name__}: "
                              f"{one_line(exc, 160)})") from None
