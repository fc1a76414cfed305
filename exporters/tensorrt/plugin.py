"""The SelectTokens TensorRT plugin: its CUDA and C++ sources (exporters/tensorrt/plugin/), their build,
and the graph rewrite that hands the sparse prefill graph's `compressor.SelectTokens` node to it.

The plugin library is compiled with nvcc against TensorRT's C++ headers (NvInferRuntime.h), which no
Python wheel ships: they come with a TensorRT install (`TENSORRT_INCLUDE_DIR`, or the usual system
folders). Without nvcc or the headers the token selection stays the inlined standard-op function,
which every TensorRT builds; `token_selection: plugin` then is one clear error.

`build_host_library` compiles the plugin's arithmetic (select_tokens.cuh, the functions its kernels
call) for the CPU with the C++ compiler alone, so tests check it against `select_positions` on any
machine.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compressor.errors import CompressorError

SOURCES = Path(__file__).with_name("plugin")
LIBRARY_FILE = "libcompressor_select_tokens.so"
NAME, VERSION = "SelectTokens", "1"
SELECTIONS = ("auto", "plugin", "inlined")
# Native code for TensorRT for RTX's targets (Turing to Blackwell RTX) and datacenter parts
# (Ampere, Hopper, Blackwell), plus PTX of the newest for GPUs after these.
ARCHITECTURES = ("75", "80", "86", "89", "90", "100", "120")
HEADER = "NvInferRuntime.h"
HEADER_DIRS = ("/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu", "/usr/include",
               "/usr/local/tensorrt/include", "/opt/tensorrt/include")


@dataclass(frozen=True)
class Toolchain:
    nvcc: str
    include: str  # the folder holding TensorRT's NvInferRuntime.h


def find_nvcc() -> str | None:
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_toolchain() -> Toolchain | str:
    """What builds the plugin, or why nothing here can (a sentence)."""
    nvcc = find_nvcc()
    if nvcc is None:
        return "no CUDA compiler (nvcc) was found: install the CUDA toolkit or set CUDACXX"
    explicit = os.environ.get("TENSORRT_INCLUDE_DIR")
    folders = [explicit] if explicit else list(HEADER_DIRS)
    for folder in folders:
        if (Path(folder) / HEADER).is_file():
            return Toolchain(nvcc, folder)
    where = f"TENSORRT_INCLUDE_DIR={explicit}" if explicit else f"{', '.join(HEADER_DIRS)} (or set TENSORRT_INCLUDE_DIR)"
    return f"TensorRT's C++ headers ({HEADER}) were not found in {where}; no Python wheel ships them"


def resolve_selection(choice: str) -> tuple[str, Toolchain | None, str]:
    """(plugin | inlined, the toolchain for the plugin, a sentence for the log)."""
    if choice not in SELECTIONS:
        raise CompressorError(f"tensorrt token_selection {choice!r}: allowed: {', '.join(SELECTIONS)}")
    if choice == "inlined":
        return "inlined", None, "the token selection runs as inlined standard layers (token_selection: inlined)"
    found = find_toolchain()
    if isinstance(found, Toolchain):
        return "plugin", found, f"the token selection runs in the {NAME} plugin (nvcc {found.nvcc}, headers {found.include})"
    if choice == "plugin":
        raise CompressorError(f"tensorrt token_selection: plugin cannot be built: {found}")
    return "inlined", None, f"the token selection runs as inlined standard layers (the {NAME} plugin is not built: {found})"


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        errors = [line for line in (done.stdout + done.stderr).splitlines() if "error" in line.lower()]
        raise CompressorError(f"building {what} failed: {(errors or [done.stderr.strip() or 'no output'])[0][:400]}")


def _gencodes(architectures, ptx: bool = False) -> list[str]:
    """nvcc's native code for each architecture, and with `ptx` the newest one's PTX for later GPUs."""
    codes = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in architectures]
    if ptx:
        codes.append(f"-gencode=arch=compute_{architectures[-1]},code=compute_{architectures[-1]}")
    return codes


def build_plugin(target: Path, toolchain: Toolchain, architectures=ARCHITECTURES) -> Path:
    """Compiles the plugin library to `target` (a file path); returns it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    codes = _gencodes(architectures, ptx=True)
    _run([toolchain.nvcc, "-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC", "-Xcompiler", "-Wno-deprecated-declarations",
          "-I", toolchain.include, "-I", str(SOURCES), *codes, str(SOURCES / "select_tokens_plugin.cpp"),
          str(SOURCES / "select_tokens_kernel.cu"), "-o", str(target)], f"the {NAME} plugin")
    return target


def compile_kernels(target: Path, nvcc: str, architectures=ARCHITECTURES) -> Path:
    """Compiles the CUDA kernels alone (no TensorRT headers needed) to the object file `target`."""
    codes = _gencodes(architectures)
    _run([nvcc, "-std=c++17", "-O3", "-c", "-Xcompiler", "-fPIC", *codes, str(SOURCES / "select_tokens_kernel.cu"),
          "-o", str(target)], f"the {NAME} kernels")
    return target


def build_device_library(target: Path, nvcc: str, architectures=ARCHITECTURES) -> Path:
    """Compiles the kernels with a C entry (select_tokens_device.cu) to the shared library `target`,
    for running them on torch CUDA tensors without TensorRT (`device_select`)."""
    codes = _gencodes(architectures)
    _run([nvcc, "-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC", *codes, "-I", str(SOURCES),
          str(SOURCES / "select_tokens_device.cu"), str(SOURCES / "select_tokens_kernel.cu"), "-o", str(target)],
         f"the {NAME} device library")
    return target


def device_select(library: Path, query, keys, attention_mask, keep_tokens: int, keep_first: int, keep_last: int,
                  pool_width: int):
    """The plugin kernels' selection of torch CUDA tensors (query and keys float32 or float16):
    a (batch, keep_tokens) int64 CUDA tensor."""
    import torch

    lib = ctypes.CDLL(str(library))
    q, k = query.contiguous(), keys.contiguous()
    m = attention_mask.to(torch.int64).contiguous()
    (b, heads, _, d), (kv_heads, n) = q.shape, k.shape[1:3]
    out = torch.empty((b, keep_tokens), dtype=torch.int64, device=q.device)
    pointer = ctypes.c_void_p
    status = lib.select_tokens_cuda(pointer(q.data_ptr()), pointer(k.data_ptr()), pointer(m.data_ptr()),
                                    pointer(out.data_ptr()), *(ctypes.c_int32(int(x)) for x in (
                                        q.dtype == torch.float16, b, heads, kv_heads, n, d, keep_tokens, keep_first,
                                        keep_last, pool_width)))
    if status:
        raise CompressorError(f"{NAME} kernels failed on the GPU (status {status})")
    return out


def build_host_library(target: Path, compiler: str = "c++") -> Path:
    """Compiles the plugin's arithmetic for the CPU (select_tokens_host.cpp) to the shared library `target`."""
    _run([compiler, "-std=c++17", "-O2", "-shared", "-fPIC", "-I", str(SOURCES), str(SOURCES / "select_tokens_host.cpp"),
          "-o", str(target)], f"the {NAME} host library")
    return target


def host_select(library: Path, query, keys, attention_mask, keep_tokens: int, keep_first: int, keep_last: int,
                pool_width: int) -> np.ndarray:
    """The plugin's selection computed on the CPU by `library` (build_host_library): (batch, keep_tokens) int64."""
    lib = ctypes.CDLL(str(library))
    q = np.ascontiguousarray(query, dtype=np.float32)
    k = np.ascontiguousarray(keys, dtype=np.float32)
    m = np.ascontiguousarray(attention_mask, dtype=np.int64)
    (b, heads, _, d), (kv_heads, n) = q.shape, k.shape[1:3]
    out = np.zeros((b, keep_tokens), dtype=np.int64)
    pointer = ctypes.c_void_p
    status = lib.select_tokens_host(pointer(q.ctypes.data), pointer(k.ctypes.data), pointer(m.ctypes.data),
                                    pointer(out.ctypes.data), *(ctypes.c_int32(int(x)) for x in (
                                        b, heads, kv_heads, n, d, keep_tokens, keep_first, keep_last, pool_width)))
    if status:
        raise CompressorError(f"{NAME} host selection: invalid shapes (status {status}: prompt shorter than "
                              "keep_tokens, or heads not a multiple of key heads)")
    return out


def use_plugin(model) -> int:
    """Hands each `compressor.SelectTokens` node to the plugin: drops the node's function body, so
    TensorRT's parser looks the op up in the plugin registry instead of inlining it. Returns the
    number of nodes."""
    from exporters.onnx.token_filter import DOMAIN, OP_TYPE

    nodes = sum(1 for node in model.graph.node if node.domain == DOMAIN and node.op_type == OP_TYPE)
    kept = [f for f in model.functions if not (f.domain == DOMAIN and f.name == OP_TYPE)]
    del model.functions[:]
    model.functions.extend(kept)
    return nodes
