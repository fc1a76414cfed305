"""ONNX export of compressed artifacts (`export`) and its ONNX Runtime loader (`loader`); `files`
names the export's files.

Importing this package needs no ONNX package; `export`, `quantized_graph`, `int8_split`,
`token_filter`, `attention_op` and `fused_attention` import onnx at their top, so import them only
after `require()`.
"""

from __future__ import annotations

import importlib.util

from compressor.errors import CompressorError

REQUIRED = ("onnx", "onnxscript", "onnxruntime")  # what the export needs
RUNTIME_REQUIRED = ("onnx", "onnxruntime")  # what loading an export needs
DEFAULT_TOLERANCE = 1e-3  # max |logit difference| allowed at export (fp32 graphs match to ~1e-5 .. 1e-4)


def missing(packages: tuple[str, ...]) -> list[str]:
    """The packages of `packages` that are not installed."""
    return [name for name in packages if importlib.util.find_spec(name) is None]


def require(packages: tuple[str, ...] = REQUIRED, what: str = "ONNX export") -> None:
    """One clear error, before any work, when the packages `what` needs are missing."""
    absent = missing(packages)
    if absent:
        raise CompressorError(f"{what} needs {', '.join(absent)}: pip install 'compressor[onnx]' "
                              "(or 'compressor[onnx-gpu]' on a CUDA machine)")
