"""`compressor.load(DIR, backend="tensorrt")`: the engines of `DIR/tensorrt/` behind the decoder
interface the ONNX Runtime backend has (exporters.onnx.loader.CachedDecoder: `logits`, `prefill`,
`decode`), so `generate`, `score` and `select` run through the shared decode loop. Inputs and outputs are torch CUDA tensors whose
addresses the execution context reads; the KV cache stays on the GPU between steps.

Without a CUDA GPU, or without the TensorRT runtime the engines were built with, loading is one
clear error before anything else. An engine built with the SelectTokens plugin has its library
beside it (manifest "plugin"), registered before the engines are deserialized. NOT VERIFIED: no machine here has a GPU with a TensorRT runtime,
so this module's execution path has never run; only its refusals are tested.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import numpy as np

from compressor.errors import CompressorError
from exporters.onnx.loader import CachedDecoder
from exporters.tensorrt.build import MANIFEST, TENSORRT_DIR, sha256


def require_runtime(folder: Path) -> tuple[dict, str]:
    """(the engines' manifest, the TensorRT module to run them with), or one clear error."""
    manifest_path = folder / TENSORRT_DIR / MANIFEST
    if not manifest_path.is_file():
        raise CompressorError(f"{folder}: no TensorRT engines ({TENSORRT_DIR}/{MANIFEST} is missing); build them with "
                              f"`compress export tensorrt {folder}`")
    manifest = json.loads(manifest_path.read_text())
    import torch

    if not torch.cuda.is_available():
        raise CompressorError(f"backend 'tensorrt' needs a CUDA GPU, and this torch sees none "
                              f"(the engines in {folder / TENSORRT_DIR} were built for {manifest.get('library')})")
    module = manifest.get("library", "tensorrt")
    if importlib.util.find_spec(module) is None:
        raise CompressorError(f"backend 'tensorrt': the engines were built with {module} "
                              f"{manifest.get('library_version', '')}, which is not installed here")
    return manifest, module


class TensorRTDecoder(CachedDecoder):
    def __init__(self, folder: Path, verify: bool = True):
        import torch

        self.manifest, module = require_runtime(folder)
        trt = importlib.import_module(module)
        self.trt, self.torch = trt, torch
        self.folder = folder / TENSORRT_DIR
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
        plugin = self.manifest.get("plugin")
        if plugin:  # the SelectTokens plugin: registered before the engine that calls it is deserialized
            library = self.folder / plugin["library"]
            if verify and sha256(library) != plugin["sha256"]:
                raise CompressorError(f"{library}: its SHA-256 differs from {MANIFEST}'s (a damaged or replaced library)")
            trt.get_plugin_registry().load_library(str(library))
        self.engines, self.contexts = {}, {}
        for name, info in self.manifest["engines"].items():
            path = self.folder / name
            if verify and sha256(path) != info["sha256"]:
                raise CompressorError(f"{path}: its SHA-256 differs from {MANIFEST}'s (a damaged or replaced engine)")
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise CompressorError(f"{path}: {module} could not deserialize it (another version or GPU than "
                                      f"it was built for: {self.manifest.get('library_version')}, "
                                      f"{self.manifest.get('targets')})")
            self.engines[name], self.contexts[name] = engine, engine.create_execution_context()
        self.has_sparse_prefill = "prefill_sparse.engine" in self.engines
        decoder = self.engines["model.engine"]
        names = [decoder.get_tensor_name(i) for i in range(decoder.num_io_tensors)]
        self.past_names = [n for n in names if n.startswith("past_key_values.")]
        if self.past_names:
            shape = decoder.get_tensor_shape(self.past_names[0])
            self.kv_heads, self.head_dim = shape[1], shape[3]
        self.stream = torch.cuda.Stream()

    def _dtype(self, engine, name: str):
        trt, torch = self.trt, self.torch
        table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT64: torch.int64,
                 trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool, trt.DataType.BF16: torch.bfloat16}
        return table[engine.get_tensor_dtype(name)]

    def _execute(self, engine_name: str, inputs: dict) -> list:
        """Runs one engine; `inputs` maps input names to numpy arrays or CUDA tensors; returns the
        outputs (CUDA tensors) in the engine's order."""
        torch, trt = self.torch, self.trt
        engine, context = self.engines[engine_name], self.contexts[engine_name]
        held, outputs = [], []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
                continue
            value = inputs[name]
            tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
            tensor = tensor.to(device="cuda", dtype=self._dtype(engine, name)).contiguous()
            context.set_input_shape(name, tuple(tensor.shape))
            held.append(tensor if tensor.numel() else torch.empty(1, dtype=tensor.dtype, device="cuda"))
            context.set_tensor_address(name, held[-1].data_ptr())
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
                continue
            shape = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise CompressorError(f"{engine_name}: output {name} has a data-dependent shape {shape}")
            out = torch.empty(shape, dtype=self._dtype(engine, name), device="cuda")
            context.set_tensor_address(name, (out if out.numel() else torch.empty(1, device="cuda")).data_ptr())
            outputs.append(out)
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise CompressorError(f"{engine_name}: TensorRT failed to run it")
        self.stream.synchronize()
        return outputs

    def _run(self, ids, mask, positions, logits_index, cache) -> list:
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
                 "position_ids": positions.astype(np.int64), "logits_index": np.asarray(logits_index, np.int64)}
        feeds.update(zip(self.past_names, cache))
        return self._execute("model.engine", feeds)

    def _empty_cache(self, batch: int) -> list:
        return [self.torch.zeros((batch, self.kv_heads, 0, self.head_dim), device="cuda") for _ in self.past_names]

    def _run_sparse(self, ids: np.ndarray, mask: np.ndarray) -> list:
        return self._execute("prefill_sparse.engine", {"input_ids": ids, "attention_mask": mask})

    @staticmethod
    def _host(value) -> np.ndarray:
        return (value.float() if value.is_floating_point() else value).cpu().numpy()
