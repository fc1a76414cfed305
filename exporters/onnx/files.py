"""File names of an artifact's ONNX export, shared by the exporter, the loader and the runtime.

Plain constants with no imports, so code that only looks for an export (compressor.runtime's
backend="auto") needs no ONNX package.
"""

ONNX_DIR = "onnx"  # the export's folder inside the artifact
DECODER_FILE = "model.onnx"  # the decoder with an explicit KV cache
SPARSE_FILE = "prefill_sparse.onnx"  # the sparse-token prefill graph, when the plan has a filter
WEIGHTS_FILE = "weights.data"  # the external data both graphs share
MANIFEST_FILE = "export.json"  # what was written and how it was checked
