"""Peer baselines for the benchmarks: the original model exported to ONNX and ONNX Runtime's own quantizers.

These are what a user could pick instead of this toolkit: the fp32 ONNX export, ONNX Runtime's dynamic
int8 quantization (`quantize_dynamic`) and its blockwise int4 weight-only quantization
(`MatMulNBitsQuantizer`, symmetric, block 32, embedding Gather left in fp32). Each row gives the size on
disk and the perplexity measured with an ONNX Runtime CPU session on the same windows as the torch
evaluation. The int4 quantizer (and the dynamo exporter) need the `onnx-ir` / `onnxscript` packages.

    python -m bench.onnx_peers --windows 16    # prints the rows as JSON
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F

from compressor.progress import progress

OPSET = 21
IR_VERSION = 10  # onnx 1.23 writes IR 14, which some ONNX Runtime versions refuse
TWO_GB = 2**31


class _LogitsOnly(torch.nn.Module):
    """input_ids -> logits, no KV cache: the plain graph that gets exported."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids, use_cache=False).logits


def export_onnx(model, path: Path) -> str:
    """Exports to `path` (one file if under 2 GB); returns the exporter that worked."""
    wrapper = _LogitsOnly(model).eval()
    sample = torch.zeros(2, 16, dtype=torch.long)  # batch 2: a size-1 dim would be specialized
    names = dict(input_names=["input_ids"], output_names=["logits"])
    with torch.no_grad():
        wrapper(sample)  # builds lazily made attributes (the rotary frequencies) before tracing
    try:
        dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
        with torch.no_grad():
            torch.onnx.export(wrapper, (sample,), str(path), dynamo=True, opset_version=OPSET, external_data=False,
                              dynamic_shapes={"input_ids": dims}, verbose=False, **names)
        exporter = "dynamo"
    except Exception as exc:  # e.g. onnxscript not installed
        warnings.warn(f"dynamo ONNX export failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                      "using the legacy exporter, which stores the tied embedding twice")
        for leftover in path.parent.glob(path.name + "*"):
            leftover.unlink()
        axes = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
        with torch.no_grad():  # the legacy exporter goes up to opset 20
            torch.onnx.export(wrapper, (sample,), str(path), dynamo=False, opset_version=min(OPSET, 20),
                              dynamic_axes=axes, **names)
        exporter = "legacy"
    proto = onnx.load(str(path))
    proto.ir_version = IR_VERSION
    for leftover in path.parent.glob(path.name + "*"):
        leftover.unlink()
    large = proto.ByteSize() >= TWO_GB
    onnx.save(proto, str(path), save_as_external_data=large, location=path.name + ".data")
    return exporter


def size_on_disk(path: Path) -> int:
    """The .onnx file plus any external-data files its tensors name."""
    proto = onnx.load(str(path), load_external_data=False)
    tensors = list(proto.graph.initializer)
    tensors += [attr.t for node in proto.graph.node for attr in node.attribute if attr.HasField("t")]
    files = {path} | {path.parent / entry.value for tensor in tensors for entry in tensor.external_data
                      if entry.key == "location"}
    return sum(f.stat().st_size for f in files)


def onnx_perplexity(path: Path, windows: torch.Tensor, description: str, quiet: bool = False) -> float:
    """exp(mean next-token NLL) over each window, as the torch evaluation computes it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    nll, tokens = 0.0, 0
    for window in progress(windows, description, quiet=quiet):
        logits = session.run(["logits"], {"input_ids": window[None].numpy()})[0][0, :-1]
        nll += F.cross_entropy(torch.from_numpy(logits), window[1:], reduction="sum").item()
        tokens += window.numel() - 1
    return math.exp(nll / tokens)


def quantize_int8_dynamic(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(source, target, weight_type=QuantType.QInt8)


def quantize_int4_blockwise(source: Path, target: Path) -> None:
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as exc:  # onnxruntime's int4 quantizer imports onnx_ir
        raise ImportError(f"the int4 peer needs {exc.name}: pip install onnx-ir") from exc
    # Default op types are MatMul only, so the embedding Gather stays fp32.
    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), bits=4, block_size=32, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=quantizer.model.model.ByteSize() >= TWO_GB)


PEERS = (
    ("ONNX fp32", "fp32.onnx", None),
    ("ONNX Runtime dynamic int8 (quantize_dynamic)", "int8-dynamic.onnx", quantize_int8_dynamic),
    ("ONNX Runtime int4 (MatMulNBitsQuantizer, symmetric, block 32)", "int4-block32.onnx", quantize_int4_blockwise),
)


def onnx_peer_rows(model, windows: torch.Tensor, workdir: str | Path, quiet: bool = False) -> list[dict]:
    """Exports `model` to ONNX in `workdir`, quantizes it with ONNX Runtime, and measures each file."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fp32 = workdir / PEERS[0][1]
    export_onnx(model, fp32)
    rows = []
    for name, filename, quantize in PEERS:
        path = workdir / filename
        start = time.perf_counter()
        if quantize is not None:
            quantize(fp32, path)
        quantize_seconds = time.perf_counter() - start if quantize is not None else 0.0
        start = time.perf_counter()
        perplexity = onnx_perplexity(path, windows, name, quiet=quiet)
        rows.append({"name": name, "kind": "peer", "bytes": size_on_disk(path), "perplexity": perplexity,
                     "quantize_seconds": round(quantize_seconds, 2),
                     "eval_seconds": round(time.perf_counter() - start, 2)})
    return rows


def main() -> None:
    import tempfile

    from compressor.data import default_evaluation_text, evaluation_windows
    from compressor.models.sources import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows of 512 tokens")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    torch.set_num_threads(2)
    loaded = load_model("embedded", quiet=True)
    windows = evaluation_windows(loaded.tokenizer, default_evaluation_text(), args.windows, 512).input_ids
    with tempfile.TemporaryDirectory(prefix="onnx-peers-") as workdir:
        rows = onnx_peer_rows(loaded.model, windows, workdir, quiet=args.quiet)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
