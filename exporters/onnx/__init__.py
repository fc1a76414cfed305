"""ONNX export of compressed artifacts (`export`) and its ONNX Runtime loader (`loader`)."""

from __future__ import annotations

import importlib.util

REQUIRED = ("onnx", "onnxscript", "onnxruntime")
DEFAULT_TOLERANCE = 1e-3  # max |logit difference| allowed at export (fp32 graphs match to ~1e-5 .. 1e-4)


def require() -> None:
    """One clear error, before any work, when the packages the export needs are missing."""
    from compressor.errors import CompressorError

    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        raise CompressorError(f"ONNX export needs {', '.join(missing)}: pip install 'compressor[onnx]' "
                              "(or 'compressor[onnx-gpu]' on a CUDA machine)")
