"""Decoder layers kept on disk: a model whose layers hold no weights until one is placed on the device.

The model is the toolkit's CompressedForCausalLM built on the meta device; an `Offload` attached to
it keeps, for every tensor of every decoder layer, where its value lives: a tensor of the source's
safetensors files (read when its layer is placed, never before), or a tensor written to a spill
folder after a stage changed it (quantized weights). `placed(model, layer)` reads one layer's
tensors, casts floats to the compute precision, puts them on the device and yields the layer;
leaving it writes back the tensors the caller changed and releases them all, so one layer's weights
are in memory at a time. Everything outside the decoder layers (embedding, final norm, head) stays
resident. A model without an Offload is resident: `placed` yields its layer as it is.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import math
import os
import struct
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from compressor.errors import CompressorError, one_line
from compressor.placement import CPU_FLOAT32, Placement

LAYER_PREFIX = "model.layers."


class LazyTensor:
    """A tensor known by its `shape` and `dtype` and made only by `load()`: what the shard writer
    (exporters.shards) takes beside real tensors, so that a file is never in memory whole."""

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class StoredTensor(LazyTensor):
    """One tensor of a safetensors file, known by its header: read only when asked."""

    path: str
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def load(self) -> torch.Tensor:
        return read_tensors([self])[0]


@dataclass(frozen=True)
class CastTensor(LazyTensor):
    """A stored tensor read as another dtype (what the resident model would hold)."""

    stored: StoredTensor
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stored.shape

    def load(self) -> torch.Tensor:
        return self.stored.load().to(self.dtype)


def read_tensors(stored: list[StoredTensor]) -> list[torch.Tensor]:
    """The tensors, each read with plain file reads into a tensor of its own. No memory map: the pages
    read stay in the system's file cache instead of counting as this process's memory beside the copy
    (a 1.5 GB embedding would otherwise peak at twice that while it is read)."""
    out = []
    offsets: dict[str, tuple[int, dict]] = {}
    for item in stored:
        if item.path not in offsets:
            offsets[item.path] = read_header(item.path)
        start, header = offsets[item.path]
        entry = header.get(item.key)
        if entry is None:
            raise CompressorError(f"{item.path}: tensor {item.key} is missing (the file changed during the run)")
        begin, end = entry["data_offsets"]
        tensor = torch.empty(item.shape, dtype=item.dtype)
        if end - begin != tensor.numel() * tensor.element_size():
            raise CompressorError(f"{item.path}: tensor {item.key} holds {end - begin} bytes, its shape and dtype "
                                  f"need {tensor.numel() * tensor.element_size()}")
        if tensor.numel():
            target = tensor.view(-1).view(torch.uint8).numpy()
            with open(item.path, "rb") as handle:
                handle.seek(start + begin)
                if handle.readinto(memoryview(target)) != end - begin:
                    raise CompressorError(f"{item.path}: tensor {item.key} is cut short (a truncated file)")
        out.append(tensor)
    return out


def read_header(path: str) -> tuple[int, dict]:
    """(where the data starts, the parsed header) of a safetensors file."""
    try:
        with open(path, "rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            header = json.loads(handle.read(size))
        if not isinstance(header, dict) or not all(
                isinstance(e, dict) and {"dtype", "shape", "data_offsets"} <= e.keys()
                for k, e in header.items() if k != "__metadata__"):
            raise ValueError("the header is not a table of tensors")
        ends = [e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"]
        if os.path.getsize(path) != 8 + size + max(ends, default=0):
            raise ValueError("the file is not as long as its header says (truncated or padded)")
    except (OSError, struct.error, ValueError, MemoryError) as exc:
        raise CompressorError(f"{path}: not a readable safetensors file ({one_line(exc, 160)})") from None
    return 8 + size, header


def all_finite(tensor: torch.Tensor, rows: int = 4096) -> bool:
    """No NaN or infinity in a float tensor, checked a block of rows at a time (no full-size mask)."""
    if not tensor.is_floating_point():
        return True
    if tensor.dim() < 2:
        return bool(torch.isfinite(tensor).all())
    return all(bool(torch.isfinite(block).all()) for block in tensor.split(rows))


# safetensors' dtype names, as torch spells them.
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def file_tensors(path: Path) -> dict[str, StoredTensor]:
    """Every tensor of a safetensors file, from its header."""
    found = {}
    for key, entry in read_header(str(path))[1].items():
        if key == "__metadata__":
            continue
        dtype = DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise CompressorError(f"{path}: tensor {key} has dtype {entry.get('dtype')}; allowed: {', '.join(DTYPES)}")
        found[key] = StoredTensor(str(path), key, tuple(entry["shape"]), dtype)
    return found


class SpillFolder:
    """A temporary folder for tensors written during a run, shared by the models of that run (a
    removal's new model and the source it came from); removed on close or when no model holds it."""

    def __init__(self, root: str | None = None):
        self.root = root
        self.path: Path | None = None
        self._counter = itertools.count()

    def new_file(self) -> Path:
        if self.path is None:
            self.path = Path(tempfile.mkdtemp(prefix=".compressor-spill-", dir=self.root))
        return self.path / f"tensors-{next(self._counter):06d}.safetensors"

    def close(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None

    def __del__(self):
        self.close()


@dataclass
class Offload:
    """Where each decoder-layer tensor lives, and the placement the layers compute in."""

    stored: dict[str, StoredTensor]
    placement: Placement = CPU_FLOAT32
    spill: SpillFolder = field(default_factory=SpillFolder)
    placed_layers: set = field(default_factory=set, repr=False)
    # Weights whose value is computed from stored codes when placed (quantized ones): name -> an
    # object whose load() gives something with dequantize() (compressor.transforms.quantize_model).
    derived: dict = field(default_factory=dict)

    def replace(self, tensors: dict[str, torch.Tensor]) -> None:
        """Writes changed tensors to the spill folder; later placements read them from there."""
        if not tensors:
            return
        path = self.spill.new_file()
        save_file({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}, str(path))
        for name, t in tensors.items():
            self.stored[name] = StoredTensor(str(path), name, tuple(t.shape), t.dtype)

    def fork(self) -> "Offload":
        """The same stored values for another model: replacing one of them later changes only this copy."""
        return Offload(dict(self.stored), self.placement, self.spill, derived=dict(self.derived))


def offload_of(model) -> Offload | None:
    return getattr(model, "_offload", None)


def is_offloaded(model) -> bool:
    return offload_of(model) is not None


def attach(model, offload: Offload) -> None:
    """Marks `model` (decoder layers on the meta device) as reading its layers through `offload`."""
    model.__dict__["_offload"] = offload  # a plain attribute: not a module, parameter or buffer
    return_large_frees()


def return_large_frees() -> None:
    """Keeps blocks of 1 MiB and more in mappings of their own, returned to the system when freed.

    glibc's malloc raises its mmap threshold after each large free (up to 32 MB), after which a
    placed layer's tensors come from the heap and are not all given back when the layer is released:
    a layer-by-layer run's resident memory then grew with every layer (measured: Llama-3.2-3B
    shapes peaked at 4.76 GB over 28 layers and 3.77 GB over 14; Llama-3.2-1B shapes at 2.42 GB for
    both 4 and 8 layers with a fixed 1 MiB threshold). Elsewhere (not glibc) nothing is changed."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD, which also ends the raising
    except (OSError, AttributeError):
        pass


def layer_tensor_names(model, layer: int) -> list[str]:
    prefix = f"{LAYER_PREFIX}{layer}."
    block = model.model.layers[layer]
    return [prefix + name for name, _ in itertools.chain(block.named_parameters(), block.named_buffers())]


def set_tensor(root: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


def _cast(tensor: torch.Tensor, placement: Placement) -> torch.Tensor:
    dtype = placement.dtype if tensor.is_floating_point() else tensor.dtype
    return tensor.to(device=placement.device, dtype=dtype)


@contextlib.contextmanager
def placed(model, layer: int, keep: tuple[str, ...] | list[str] = ()):
    """Decoder layer `layer` with its weights on the device. `keep` names the tensors (full names,
    model.layers.N....) the caller changes and wants kept: they are written back on leaving."""
    offload = offload_of(model)
    block = model.model.layers[layer]
    if offload is None or layer in offload.placed_layers:
        # Resident, or placed already by an enclosing call (a search scoring the tail of the model
        # from a layer it is changing): that call keeps and releases it.
        yield block
        return
    names = layer_tensor_names(model, layer)
    missing = [n for n in names if n not in offload.stored and n not in offload.derived]
    if missing:
        raise CompressorError(f"offloaded model: tensor {missing[0]} has no stored value")
    for name in names:  # one at a time: the stored copy of a tensor is dropped once it is cast
        if name in offload.derived:  # a quantized weight: its dequantized codes, as the resident model holds
            set_tensor(model, name, _cast(offload.derived[name].load().dequantize(), offload.placement))
            continue
        value = read_tensors([offload.stored[name]])[0]
        if not all_finite(value):
            raise CompressorError(f"{offload.stored[name].path}: weight {name} holds NaN or infinite values")
        set_tensor(model, name, _cast(value, offload.placement))
        del value
    offload.placed_layers.add(layer)
    try:
        yield block
        if keep:
            offload.replace({name: model.get_parameter(name) if _is_parameter(model, name) else model.get_buffer(name)
                             for name in keep})
    finally:
        offload.placed_layers.discard(layer)
        release(model, layer)


@contextlib.contextmanager
def streamed(model):
    """Whole-model forwards (generation with a cache included) on an offloaded model: each decoder
    layer is placed for its own call and released after it, so every call reads its layers again
    (a generated token reads the whole model). A resident model is left as it is."""
    if offload_of(model) is None:
        yield model
        return
    entered: dict[int, contextlib.AbstractContextManager] = {}

    def before(layer: int):
        def hook(_module, _args):
            context = placed(model, layer)
            context.__enter__()
            entered[layer] = context
        return hook

    def after(layer: int):
        def hook(_module, _args, _output):
            entered.pop(layer).__exit__(None, None, None)
        return hook

    handles = []
    for layer, block in enumerate(model.model.layers):
        handles += [block.register_forward_pre_hook(before(layer)), block.register_forward_hook(after(layer))]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for context in entered.values():  # a forward that raised left its layer placed
            context.__exit__(None, None, None)


def _is_parameter(model, name: str) -> bool:
    owner_name, _, leaf = name.rpartition(".")
    return leaf in model.get_submodule(owner_name)._parameters


def release(model, layer: int) -> None:
    """The layer's tensors back to the meta device (same shapes and dtypes, no memory)."""
    for name in layer_tensor_names(model, layer):
        current = model.get_parameter(name) if _is_parameter(model, name) else model.get_buffer(name)
        set_tensor(model, name, torch.empty(current.shape, dtype=current.dtype, device="meta"))


def stored_state(model) -> dict:
    """The model's state as the exporter writes it: resident tensors as they are, offloaded ones as
    a CastTensor of their stored value, in the dtype the placed layer holds (read when written)."""
    offload = offload_of(model)
    state = model.state_dict()
    if offload is None:
        return state
    return {name: (DerivedTensor(offload.derived[name], tensor.shape, tensor.dtype) if name in offload.derived
                   else CastTensor(offload.stored[name], tensor.dtype)) if tensor.is_meta else tensor
            for name, tensor in state.items()}


@dataclass(frozen=True)
class DerivedTensor(LazyTensor):
    """A weight dequantized from its stored codes when read."""

    codes: object
    shape: tuple[int, ...]
    dtype: torch.dtype

    def load(self) -> torch.Tensor:
        return self.codes.load().dequantize().to(self.dtype)


def skeleton(config, dtype: torch.dtype):
    """A CompressedForCausalLM of `config` on the meta device, floats in `dtype` (no memory)."""
    from compressor.modeling import CompressedForCausalLM

    with torch.device("meta"):
        model = CompressedForCausalLM(config)
    return model.to(dtype=dtype).eval()


def rebuilt(model, config):
    """An offloaded model of a new config (units removed): the resident tensors and the stored ones
    the new model still has carry over; nothing is read."""
    offload = offload_of(model).fork()  # the source model keeps its own values
    new = skeleton(config, offload.placement.dtype)
    resident = {name: t for name, t in model.state_dict().items() if not t.is_meta}
    new.load_state_dict(resident, strict=False, assign=True)
    names = set(new.state_dict())
    offload.stored = {name: t for name, t in offload.stored.items() if name in names or not name.startswith(LAYER_PREFIX)}
    offload.derived = {name: t for name, t in offload.derived.items() if name in names}
    attach(new, offload)
    return new


def with_config(model, config, origin: str):
    """The model rebuilt for a new config on the same tensors (none copied): offloaded ones stay on disk."""
    if is_offloaded(model):
        return rebuilt(model, config)
    from compressor.modeling import build_with_weights

    return build_with_weights(config, model.state_dict(), origin)
