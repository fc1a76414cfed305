"""TensorRT engines from an artifact's ONNX export: `DIR/tensorrt/` with one engine per graph, the
timing cache, the prepared graphs they were built from, and `manifest.json` (library and version,
target, optimization profiles, plugin, SHA-256 of each engine).

One build function serves both libraries: full TensorRT (`tensorrt`, for datacenter GPUs; it needs
one to build) and TensorRT for RTX (`tensorrt_rtx`, which builds ahead of time on a machine without
a GPU, for Ampere and later RTX parts by default). Parsing and building run in a subprocess of
their own (`python -m exporters.tensorrt.build SPEC`): TensorRT's parser and builder end the
process on some inputs (a segfault), and that must be one error line here, never a dead run.

Optimization profiles (min / opt / max): batch, new tokens per call (`sequence`) and cached tokens
(`past`); the decoder's attention mask spans past + sequence, its logits index at most sequence.
The sparse prefill graph's prompt is longer than the filter's keep_tokens by its export's contract.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from compressor.errors import CompressorError

TENSORRT_DIR = "tensorrt"
MANIFEST = "manifest.json"
TIMING_CACHE = "timing.cache"
LIBRARIES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}  # choice -> module


@dataclass(frozen=True)
class Profiles:
    """min / opt / max of each dynamic axis."""

    batch: tuple[int, int, int] = (1, 1, 4)
    sequence: tuple[int, int, int] = (1, 128, 2048)
    past: tuple[int, int, int] = (0, 512, 2048)

    def __post_init__(self):
        for axis, (low, opt, high) in asdict(self).items():
            if not (0 <= low <= opt <= high) or (axis != "past" and low < 1):
                raise CompressorError(f"tensorrt profile {axis}: {low}/{opt}/{high} must be min <= opt <= max"
                                      f"{' and min >= 1' if axis != 'past' else ''}")

    def axes(self, graph: str, keep_tokens: int | None = None) -> dict[str, tuple[int, int, int]]:
        """Dimension name in the graph -> (min, opt, max)."""
        b, s, p = self.batch, self.sequence, self.past
        if graph == "prefill_sparse":
            low = keep_tokens + 1
            prompt = (low, max(low, s[1]), max(low, s[2]))
            return {"batch": b, "sequence": prompt}
        total = tuple(x + y for x, y in zip(s, p))
        return {"batch": b, "sequence": s, "past_sequence": p, "total_sequence": total, "logits": (1, 1, s[2])}


def library_module(choice: str = "auto"):
    """The TensorRT Python module to build with: `auto` takes full TensorRT when installed, else
    TensorRT for RTX; one clear error when neither (or not the chosen one) is installed."""
    if choice not in ("auto", *LIBRARIES):
        raise CompressorError(f"tensorrt library {choice!r}: allowed: auto, {', '.join(LIBRARIES)}")
    names = list(LIBRARIES.values()) if choice == "auto" else [LIBRARIES[choice]]
    for name in names:
        if importlib.util.find_spec(name) is not None:
            return name
    raise CompressorError(f"TensorRT export needs {' or '.join(names)}: pip install 'compressor[tensorrt-rtx]' "
                          "(TensorRT for RTX, builds without a GPU), or full TensorRT from NVIDIA's index "
                          "for datacenter GPUs")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _library_environment(module: str, scratch: Path) -> dict:
    """The build subprocess's environment. TensorRT for RTX's ONNX parser opens `libtensorrt_rtx.so`
    by its unversioned name when it imports a plugin node, and the wheel ships only
    `libtensorrt_rtx.so.1`: without that name on the library path the parser's static initializer
    throws and the process aborts ("terminate called without an active exception"). A link under
    `scratch` gives it the name."""
    env = dict(os.environ)
    spec = importlib.util.find_spec(f"{module}_libs")
    if spec is None or not spec.submodule_search_locations:
        return env
    libs = Path(next(iter(spec.submodule_search_locations)))
    versioned = sorted(libs.glob(f"lib{module}.so.*"))
    if versioned and not (libs / f"lib{module}.so").exists():
        link = scratch / f"lib{module}.so"
        if not link.exists():
            link.symlink_to(versioned[0])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(scratch), env.get("LD_LIBRARY_PATH")]))
    return env


def build_engine(module: str, graph: Path, engine: Path, axes: dict, timing_cache: Path,
                 plugins: dict[str, Path] | None = None) -> dict:
    """Parses `graph` and builds its engine in a subprocess, with the plugin libraries `plugins`
    (creator name -> library) registered first; returns the build's figures."""
    spec = {"module": module, "graph": str(graph), "engine": str(engine), "axes": axes,
            "timing_cache": str(timing_cache), "plugins": {name: str(p) for name, p in (plugins or {}).items()}}
    started = time.perf_counter()
    env = _library_environment(module, graph.parent) if plugins else None
    done = subprocess.run([sys.executable, "-m", "exporters.tensorrt.build", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if line.startswith("error:")), None)
        if reason is None:
            how = f"signal {-done.returncode}" if done.returncode < 0 else f"status {done.returncode}"
            tail = " | ".join(line.strip() for line in lines[-3:])[-400:]
            reason = f"the TensorRT process ended with {how}{f' ({tail})' if tail else ''}"
        raise CompressorError(f"TensorRT build of {graph.name}: {reason.removeprefix('error: ')}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["seconds"] = time.perf_counter() - started
    return figures


# --- the subprocess ---------------------------------------------------------------------------------

def _graph_dims(graph: str) -> dict[str, list]:
    import onnx

    model = onnx.load(graph, load_external_data=False)
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}


def _worker(spec: dict) -> dict:
    trt = importlib.import_module(spec["module"])
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    registry = trt.get_plugin_registry()
    for name, library in spec["plugins"].items():
        registry.load_library(library)
        if not any(creator.name == name for creator in registry.all_creators):
            raise SystemExit(f"error: the plugin library {library} registered no {name} creator")
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(spec["graph"]):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = errors[0] if errors else None
        where = f" at node {first.node()} ({first.node_name()})" if first is not None else ""
        raise SystemExit(f"error: the ONNX parser refused the graph{where}: "
                         f"{first.desc().strip()[:300] if first is not None else 'no reason given'}")
    config = builder.create_builder_config()
    cache_path = Path(spec["timing_cache"])
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    dims, axes = _graph_dims(spec["graph"]), spec["axes"]
    profiles = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        named = dims[tensor.name]
        unknown = [d for d in named if isinstance(d, str) and d not in axes]
        if unknown:
            raise SystemExit(f"error: input {tensor.name} has dynamic axis {unknown[0]!r}, which no profile covers")
        shapes = [[axes[d][k] if isinstance(d, str) else d for d in named] for k in range(3)]
        profile.set_shape(tensor.name, *shapes)
        profiles[tensor.name] = shapes
    config.add_optimization_profile(profile)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SystemExit("error: the builder returned no engine (its log above says why)")
    Path(spec["engine"]).write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    targets = []
    if hasattr(config, "num_compute_capabilities"):
        targets = [str(config.get_compute_capability(i)).split(".")[-1] for i in range(config.num_compute_capabilities)]
    return {"build_seconds": time.perf_counter() - started, "bytes": Path(spec["engine"]).stat().st_size,
            "profile": profiles, "library_version": trt.__version__, "targets": targets or ["default"],
            "layers": network.num_layers, "plugin_layers": sum(
                network.get_layer(i).type == trt.LayerType.PLUGIN_V3 for i in range(network.num_layers))}


if __name__ == "__main__":
    print(json.dumps(_worker(json.loads(sys.argv[1]))))
