"""Loads an artifact's `onnx/` folder into ONNX Runtime sessions and runs them: prefill (whole or
through the sparse-token graph), one decoding step with the KV cache, and logits for scoring.

Files are checked before any session is made, so a missing graph, a missing or truncated
external-data file and a corrupted .onnx each give one clear error naming the file.

onnx and onnxruntime (and int8_split, which imports onnx) are imported where they are used, so
this module imports without them; the runtime checks both are installed before it loads an export.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compressor.artifact import read_json
from compressor.errors import CompressorError
from exporters.onnx.files import DECODER_FILE, MANIFEST_FILE, ONNX_DIR, SPARSE_FILE

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
# What ONNX Runtime computes a fused DequantizeLinear -> MatMul (MatMulNBits) in: "fp32" keeps the
# graph equal to the torch model (on CPU, 8-bit weights are then read as two 4-bit halves, see
# exporters.onnx.int8_split, since ONNX Runtime's fp32 path for 8 bits is slow); "int8" quantizes
# activations on the fly (ONNX Runtime's own default for this fusion: faster, logits not equal).
MATMUL_ACCURACY = {"fp32": "1", "int8": "4"}
# Positions the in-place KV cache holds beyond the current length when it is (re)allocated.
CACHE_HEADROOM = 128
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def choose_providers(available: list[str], requested: list[str] | None = None) -> list[str]:
    """The execution providers to use: CUDA then CPU when CUDA is present (onnxruntime-gpu), else
    CPU; an explicit request must name available providers."""
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise CompressorError(f"execution provider(s) {missing} are not available in this onnxruntime "
                                  f"build; available: {', '.join(available)}")
        return list(requested)
    return [CUDA, CPU] if CUDA in available else [CPU]


def _graph_optimization(level: str):
    import onnxruntime as ort  # optional dependency

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if level not in levels:
        raise CompressorError(f"graph optimization level {level!r} is not one of {', '.join(OPTIMIZATION_LEVELS)}")
    return levels[level]


def session_options(threads: int | None = None, optimization: str = "all", matmul_accuracy: str = "fp32"):
    """ONNX Runtime session options: intra-op threads (None: its default), graph optimization level,
    and the compute of fused DequantizeLinear -> MatMul (see MATMUL_ACCURACY)."""
    import onnxruntime as ort  # optional dependency

    options = ort.SessionOptions()
    options.graph_optimization_level = _graph_optimization(optimization)
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if matmul_accuracy not in MATMUL_ACCURACY:
        raise CompressorError(f"matmul_accuracy {matmul_accuracy!r} is not one of {', '.join(MATMUL_ACCURACY)}")
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", MATMUL_ACCURACY[matmul_accuracy])
    return options


def check_files(onnx_dir: Path, graph: str):
    """One clear error for a missing graph, an unreadable one, or missing / short external data;
    returns the graph (without its external data)."""
    import onnx  # optional dependency

    path = onnx_dir / graph
    if not path.is_file():
        raise CompressorError(f"{onnx_dir.parent}: no ONNX export ({ONNX_DIR}/{graph} not found); "
                              f"write one with: compress export onnx {onnx_dir.parent}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise CompressorError(f"{path}: not a readable ONNX model ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else 'parse error'}); "
                              "export it again with: compress export onnx") from None
    needed: dict[str, int] = {}
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entry = {e.key: e.value for e in tensor.external_data}
            location = entry.get("location", "")
            try:
                end = int(entry.get("offset", 0)) + int(entry.get("length", 0))
            except ValueError:
                end = -1
            if (not location or Path(location).is_absolute() or ".." in Path(location).parts or "\\" in location
                    or end < 0):
                raise CompressorError(f"{path}: initializer {tensor.name[:80]} has a bad external-data entry "
                                      f"(location {location[:80]!r}); it must name a file inside {ONNX_DIR}/ "
                                      "with integer offset and length")
            needed[location] = max(needed.get(location, 0), end)
    for location, end in needed.items():
        data = onnx_dir / location
        if not data.is_file():
            raise CompressorError(f"{path}: its external-data file {data} is missing; "
                                  "export it again with: compress export onnx")
        if data.stat().st_size < end:
            raise CompressorError(f"{data}: external data is truncated ({data.stat().st_size} bytes, "
                                  f"{path.name} needs {end}); export it again with: compress export onnx")
    return proto


def _has_int8_codes(proto) -> bool:
    import onnx  # optional dependency

    return any(t.data_type == onnx.TensorProto.INT8 and t.name.endswith(".weight_codes") for t in proto.graph.initializer)


def _cpu_graph(path: Path, proto, split_8bit: bool, fuse_attention: bool) -> tuple[bytes | None, bool, bool]:
    """The graph rewritten for ONNX Runtime's CPU kernels, serialized (None when nothing applies),
    whether its weights stay in the external-data file (the session is then told the folder), and
    whether its attention runs as the fused kernel.
    `split_8bit`: 8-bit weights as 4-bit halves (exporters.onnx.int8_split), which needs the weights
    in memory, so it is skipped with a warning past protobuf's 2 GB limit; `fuse_attention`: each
    `compressor.CachedAttention` node as the fused kernel (exporters.onnx.fused_attention)."""
    import onnx  # optional dependency

    # optional dependency: these import onnx
    from exporters.onnx.fused_attention import fuse_nodes, has_fusable_nodes
    from exporters.onnx.int8_split import TWO_GB, split_int8_matmuls

    fuse_attention = fuse_attention and has_fusable_nodes(proto)
    if split_8bit and _has_int8_codes(proto):
        full = onnx.load(str(path))
        if split_int8_matmuls(full):
            if fuse_attention:
                fuse_nodes(full)
            if full.ByteSize() < TWO_GB:
                return full.SerializeToString(), False, fuse_attention
            warnings.warn(f"{path}: too large to rewrite in memory; 8-bit weights run through ONNX Runtime's "
                          "slow fp32 path (use matmul_accuracy='int8' for speed)")
    if not fuse_attention:
        return None, False, False
    graph = onnx.ModelProto()
    graph.CopyFrom(proto)
    fuse_nodes(graph)
    return graph.SerializeToString(), True, True


def _step_feeds(ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, logits_index: np.ndarray) -> dict:
    """The decoder graph's inputs other than the cache, as int64 arrays."""
    return {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
            "position_ids": positions.astype(np.int64), "logits_index": logits_index.astype(np.int64)}


@dataclass
class InPlaceCache:
    """A decoding state's KV cache buffers (batch, kv heads, capacity, dim), which GroupQueryAttention
    writes in place, their OrtValues, the logits buffer, and the session binding that holds them."""

    capacity: int
    arrays: list[np.ndarray]
    values: list
    logits: np.ndarray
    binding: object


@dataclass
class OnnxState:
    """Decoding state: next-token logits (batch, vocab), the KV cache arrays in graph-input order,
    the attention mask over cached tokens, the next positions and the prompt positions kept.
    `buffers`: where a decoder writes the cache in place (OnnxDecoder with the fused kernel), the
    buffers of which `cache` holds the filled part."""

    logits: np.ndarray
    cache: list[np.ndarray]
    attention_mask: np.ndarray
    next_positions: np.ndarray
    selected: list[np.ndarray] | None = None
    buffers: InPlaceCache | None = None


class CachedDecoder:
    """What the shared decode loop (compressor.runtime) calls on a graph runtime: whole-batch logits,
    a prefill (full, or with the sparse-token filter) and one decode step with the cache kept.
    Subclasses run the graphs: `_run` (the decoder: ids, mask, positions, logits index, cache ->
    logits, present cache), `_run_sparse` (the sparse prefill: logits, selected, next positions,
    cache), `_empty_cache`, and `_host` (an output as a numpy array)."""

    folder: Path
    has_sparse_prefill: bool = False

    @staticmethod
    def _host(value) -> np.ndarray:
        return value

    def logits(self, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """(batch, seq, vocab) logits of a whole (left-padded) batch, no cache kept."""
        mask = np.ones_like(ids) if mask is None else mask
        positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
        return self._host(self._run(ids, mask, positions, np.arange(ids.shape[1]), self._empty_cache(ids.shape[0]))[0])

    def prefill(self, ids: np.ndarray, mask: np.ndarray | None = None, sparse: bool = False) -> OnnxState:
        mask = np.ones_like(ids) if mask is None else mask
        if sparse:
            if not self.has_sparse_prefill:
                raise CompressorError(f"{self.folder}: this export has no sparse-token prefill graph")
            outputs = self._run_sparse(ids, mask)
            logits, selected, next_positions = (self._host(o) for o in outputs[:3])
            starts = mask.shape[1] - mask.sum(-1)
            return OnnxState(logits, list(outputs[3:]), np.ones_like(selected), next_positions,
                             [row - start for row, start in zip(selected, starts)])
        positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
        outputs = self._run(ids, mask, positions, np.array([ids.shape[1] - 1]), self._empty_cache(ids.shape[0]))
        return OnnxState(self._host(outputs[0])[:, -1], list(outputs[1:]), mask, mask.sum(-1))

    def decode(self, tokens: np.ndarray, state: OnnxState) -> np.ndarray:
        """Feeds one token per row after `state` (advanced in place); returns next-token logits."""
        state.attention_mask = np.concatenate([state.attention_mask, np.ones_like(state.attention_mask[:, :1])], 1)
        outputs = self._run(tokens.reshape(-1, 1), state.attention_mask, state.next_positions[:, None],
                            np.array([0]), state.cache)
        state.cache = list(outputs[1:])
        state.next_positions = state.next_positions + 1
        state.logits = self._host(outputs[0])[:, -1]
        return state.logits


class OnnxDecoder(CachedDecoder):
    """ONNX Runtime sessions of an export. `matmul_accuracy` None: the compute the export's manifest
    records (`compress export onnx --matmul-accuracy`, a recipe's `onnx.matmul_accuracy`), else fp32.
    `fused_attention`: on CPU, run each layer's `compressor.CachedAttention` node as ONNX Runtime's
    fused GroupQueryAttention kernel (False: its standard-op body, inlined)."""

    def __init__(self, onnx_dir: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 optimization: str = "all", matmul_accuracy: str | None = None, graph: str = DECODER_FILE,
                 fused_attention: bool = True):
        import onnxruntime as ort  # optional dependency

        self.folder = Path(onnx_dir)
        self._graphs = {graph: check_files(self.folder, graph)}
        self.has_sparse_prefill = graph == DECODER_FILE and (self.folder / SPARSE_FILE).is_file()
        if self.has_sparse_prefill:
            self._graphs[SPARSE_FILE] = check_files(self.folder, SPARSE_FILE)
        manifest = self.folder / MANIFEST_FILE
        self.manifest = read_json(manifest, f"{ONNX_DIR}/{MANIFEST_FILE}") if manifest.is_file() else {}
        self.providers = choose_providers(ort.get_available_providers(), providers)
        if matmul_accuracy is None:
            matmul_accuracy = self.manifest.get("matmul_accuracy", "fp32")
        self.matmul_accuracy = matmul_accuracy
        options = session_options(threads, optimization, matmul_accuracy)
        self.split_8bit = matmul_accuracy == "fp32"
        self.fused_attention = fused_attention
        self.in_place_cache = False  # set by _session when the decoder runs GroupQueryAttention
        self.session = self._session(graph, options)
        self.sparse_session = self._session(SPARSE_FILE, options) if self.has_sparse_prefill else None
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [name for name in inputs if name.startswith("past_key_values.")]
        if self.past_names:
            shape = inputs[self.past_names[0]].shape
            self.kv_heads, self.head_dim = shape[1], shape[3]
        self.present_names = ["present." + name[len("past_key_values."):] for name in self.past_names]

    def _session(self, graph: str, options):
        import onnxruntime as ort  # optional dependency

        source = str(self.folder / graph)
        if CPU in self.providers[:1]:
            rewritten, external, fused = _cpu_graph(self.folder / graph, self._graphs[graph], self.split_8bit,
                                                    self.fused_attention)
            if rewritten is not None:
                source = rewritten
            if graph == DECODER_FILE:
                self.in_place_cache = fused
            if external:
                options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                                 str(self.folder))
        try:
            return ort.InferenceSession(source, options, providers=self.providers)
        except Exception as exc:
            raise CompressorError(f"{self.folder / graph}: ONNX Runtime could not load it "
                                  f"({str(exc).splitlines()[0][:300]})") from None

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, logits_index: np.ndarray,
             cache: list[np.ndarray]) -> list[np.ndarray]:
        feeds = _step_feeds(ids, mask, positions, logits_index)
        feeds.update(zip(self.past_names, cache))
        return self.session.run(None, feeds)

    def _empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32) for _ in self.past_names]

    def decode(self, tokens: np.ndarray, state: OnnxState) -> np.ndarray:
        """One decode step (see CachedDecoder.decode). With the fused kernel, the cache is written in
        place: GroupQueryAttention appends this step's keys and values to buffers bound as both its
        past input and its present output, so that no step copies the whole cache (the buffers grow
        by doubling, CACHE_HEADROOM positions at least)."""
        if not self.in_place_cache or not self.past_names:
            return super().decode(tokens, state)
        state.attention_mask = np.concatenate([state.attention_mask, np.ones_like(state.attention_mask[:, :1])], 1)
        total = state.attention_mask.shape[1]
        cache = state.buffers
        if cache is None or cache.capacity < total:
            cache = state.buffers = self._in_place_cache(state, max(total + CACHE_HEADROOM, 2 * (cache.capacity if cache else 0)))
        feeds = _step_feeds(tokens.reshape(-1, 1), state.attention_mask, state.next_positions[:, None], np.array([0]))
        for name, value in feeds.items():  # rebinding a name replaces its earlier binding
            cache.binding.bind_cpu_input(name, value)
        self.session.run_with_iobinding(cache.binding)
        state.cache = [a[:, :, :total] for a in cache.arrays]
        state.next_positions = state.next_positions + 1
        state.logits = cache.logits[:, -1].copy()  # the buffer is written again by the next step
        return state.logits

    def _in_place_cache(self, state: OnnxState, capacity: int) -> InPlaceCache:
        """Buffers of `capacity` positions holding `state.cache`, bound (with a logits buffer) once for
        all the steps they last."""
        import onnxruntime as ort  # optional dependency

        arrays = []
        for filled in state.cache:
            array = np.zeros(filled.shape[:2] + (capacity,) + filled.shape[3:], dtype=filled.dtype)
            array[:, :, :filled.shape[2]] = filled
            arrays.append(array)
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]  # on CPU: the arrays' memory, no copy
        logits = np.empty((state.logits.shape[0], 1, state.logits.shape[-1]), dtype=np.float32)
        binding = self.session.io_binding()
        values.append(ort.OrtValue.ortvalue_from_numpy(logits))
        binding.bind_ortvalue_output("logits", values[-1])
        for past, present, value in zip(self.past_names, self.present_names, values):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        return InPlaceCache(capacity, arrays, values, logits, binding)

    def _run_sparse(self, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        return self.sparse_session.run(None, {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)})

