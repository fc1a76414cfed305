"""`DIR/tensorrt/` for an artifact with an ONNX export: each graph prepared (exporters.tensorrt.prepare)
and built (exporters.tensorrt.build), staged beside the folder and swapped into place at the end, so
a failed build leaves no half-written `tensorrt/`.

The sparse prefill graph's token selection is the SelectTokens plugin (exporters.tensorrt.plugin)
when it can be compiled here, its library then written beside the engines; otherwise, or with
`token_selection: inlined`, the standard-op function body that every TensorRT builds.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import onnx

from compressor.artifact import staging_beside
from compressor.errors import CompressorError
from exporters.onnx.files import DECODER_FILE, ONNX_DIR, SPARSE_FILE
from exporters.tensorrt.build import MANIFEST, TENSORRT_DIR, TIMING_CACHE, Profiles, build_engine, library_module, sha256
from exporters.tensorrt.plugin import ARCHITECTURES, LIBRARY_FILE, NAME, VERSION, build_plugin, resolve_selection, use_plugin
from exporters.tensorrt.precision import sixteen_bit_products
from exporters.tensorrt.prepare import prepare

# The two forms of the sparse prefill graph's token selection, as the manifest names them.
SELECTION = {"inlined": "inlined compressor.SelectTokens (standard layers)",
             "plugin": f"{NAME} plugin version {VERSION} ({LIBRARY_FILE})"}


def prepared_graph(source: Path, target: Path, plugin: bool = False, precision: str = "float32") -> dict:
    """Writes `source` (an exported graph) prepared for TensorRT to `target` (its weights in
    `target`.data beside it); returns what the preparation did. `plugin`: its SelectTokens node
    goes to the plugin instead of being inlined; `precision`: the matrix products' activations
    (exporters.tensorrt.precision)."""
    model = onnx.load(str(source))
    record = prepare(model)
    if plugin:
        record["plugin_nodes"] = use_plugin(model)
    record["activations"] = sixteen_bit_products(model, precision)
    onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{target.name}.data", size_threshold=1024)
    return record


def export_artifact(folder: str | Path, profiles: Profiles = Profiles(), library: str = "auto", log=print,
                    name: str | Path | None = None, token_selection: str = "auto", precision: str = "float16") -> Path:
    """Builds `folder/tensorrt/` from `folder/onnx/` (replacing an earlier build); returns its path.
    The caller holds the artifact's claim, as for the ONNX export."""
    folder = Path(folder)
    name = name or folder
    module = library_module(library)
    onnx_dir = folder / ONNX_DIR
    if not (onnx_dir / DECODER_FILE).is_file():
        raise CompressorError(f"{name}: TensorRT engines are built from the ONNX export, which it lacks; run "
                              f"`compress export onnx {name}` first (or list onnx before tensorrt in export:)")
    config = json.loads((folder / "config.json").read_text())
    sparse = config.get("sparse_tokens") or None
    graphs = [DECODER_FILE] + ([SPARSE_FILE] if sparse and (onnx_dir / SPARSE_FILE).is_file() else [])
    selection, toolchain, reason = resolve_selection(token_selection) if SPARSE_FILE in graphs else ("inlined", None, "")
    engines, plugin = {}, None
    with staging_beside(folder / TENSORRT_DIR) as staging, tempfile.TemporaryDirectory(dir=folder) as scratch:
        if SPARSE_FILE in graphs:
            log(reason)
        if selection == "plugin":
            log(f"compiling the {NAME} plugin for sm_{', sm_'.join(ARCHITECTURES)}")
            library_path = build_plugin(staging / LIBRARY_FILE, toolchain)
            plugin = {"name": NAME, "version": VERSION, "namespace": "", "library": LIBRARY_FILE,
                      "architectures": list(ARCHITECTURES), "sha256": sha256(library_path)}
        for graph in graphs:
            stem = Path(graph).stem
            log(f"preparing {graph} for TensorRT")
            prepared = Path(scratch) / graph
            with_plugin = plugin is not None and graph == SPARSE_FILE
            preparation = prepared_graph(onnx_dir / graph, prepared, plugin=with_plugin, precision=precision)
            axes = profiles.axes(stem, sparse["keep_tokens"] if stem == "prefill_sparse" else None)
            log(f"building the {stem} engine with {module}")
            figures = build_engine(module, prepared, staging / f"{stem}.engine", axes, staging / TIMING_CACHE,
                                   plugins={NAME: staging / LIBRARY_FILE} if with_plugin else None)
            engines[f"{stem}.engine"] = dict(figures, graph=graph, preparation=preparation,
                                             sha256=sha256(staging / f"{stem}.engine"))
        manifest = {"library": module, "library_version": next(iter(engines.values()))["library_version"],
                    "targets": next(iter(engines.values()))["targets"],
                    "profiles": {"batch": list(profiles.batch), "sequence": list(profiles.sequence),
                                 "past": list(profiles.past)},
                    "token_selection": SELECTION[selection] if SPARSE_FILE in graphs else None, "plugin": plugin,
                    "precision": precision,
                    "timing_cache": TIMING_CACHE,
                    "engines": engines}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    sizes = ", ".join(f"{engine} {info['bytes'] / 1e6:.1f} MB in {info['seconds']:.0f} s" for engine, info in engines.items())
    log(f"TensorRT engines written: {Path(name) / TENSORRT_DIR} ({sizes})")
    return folder / TENSORRT_DIR
