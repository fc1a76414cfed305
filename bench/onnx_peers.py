"""Peer baselines: the original model exported to ONNX, and ONNX Runtime's own quantizers applied to it.

These are what a user could pick instead of this toolkit: a plain fp32 ONNX export of the original
model, ONNX Runtime's dynamic int8 quantization (`quantize_dynamic`) and its blockwise int4
weight-only quantization (`MatMulNBitsQuantizer`, symmetric, block 32, default accuracy level; the
embedding Gather and the tied output head, which reads the embedding through a Transpose, stay fp32).

The plain export is the toolkit's decoder graph (explicit KV cache, `exporters.onnx.graph_module`)
of the uncompressed model through `torch.onnx.export(dynamo=True)` with torch's default graph
optimizer, which folds each weight transpose into an initializer the quantizers can find. So the
peers run the same decode loop (`exporters.onnx.loader.OnnxDecoder`) as the toolkit's artifacts.

    python -m bench.onnx_peers --windows 16    # prints size and perplexity rows as JSON
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F

from compressor.progress import progress

TWO_GB = 2**31


def export_plain(model, path: Path) -> None:
    """The uncompressed model's decoder graph, exported with torch's default optimizer."""
    from exporters.onnx.export import decoder_proto

    proto = decoder_proto(model, optimize=True)
    large = proto.ByteSize() >= TWO_GB
    onnx.save(proto, str(path), save_as_external_data=large, location=path.name + ".data")


def size_on_disk(path: Path) -> int:
    """The .onnx file plus any external-data files its tensors name."""
    proto = onnx.load(str(path), load_external_data=False)
    tensors = list(proto.graph.initializer)
    tensors += [attr.t for node in proto.graph.node for attr in node.attribute if attr.HasField("t")]
    files = {path} | {path.parent / entry.value for tensor in tensors for entry in tensor.external_data
                      if entry.key == "location"}
    return sum(f.stat().st_size for f in files)


def onnx_perplexity(decoder, windows: torch.Tensor, description: str, quiet: bool = False) -> float:
    """exp(mean next-token NLL) over each window, as the torch evaluation computes it."""
    nll, tokens = 0.0, 0
    for window in progress(windows, description, quiet=quiet):
        logits = decoder.logits(window[None].numpy())[0, :-1]
        nll += F.cross_entropy(torch.from_numpy(logits), window[1:], reduction="sum").item()
        tokens += window.numel() - 1
    return math.exp(nll / tokens)


def quantize_int8_dynamic(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(source, target, weight_type=QuantType.QInt8)


def quantize_int4_blockwise(source: Path, target: Path, accuracy_level: int | None = None) -> None:
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as exc:  # onnxruntime's int4 quantizer imports onnx_ir
        raise ImportError(f"the int4 peer needs {exc.name}: pip install onnx-ir") from exc
    # Default op types are MatMul with an initializer weight, so the embedding Gather and the tied head stay fp32.
    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), bits=4, block_size=32, is_symmetric=True,
                                     accuracy_level=accuracy_level)
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=quantizer.model.model.ByteSize() >= TWO_GB)


def quantize_int4_int8_compute(source: Path, target: Path) -> None:
    quantize_int4_blockwise(source, target, accuracy_level=4)


PEERS = (
    ("ONNX fp32 (plain export)", "fp32.onnx", None),
    ("ONNX Runtime dynamic int8 (quantize_dynamic)", "int8-dynamic.onnx", quantize_int8_dynamic),
    ("ONNX Runtime int4 (MatMulNBitsQuantizer, symmetric, block 32)", "int4-block32.onnx", quantize_int4_blockwise),
    # The same int4 with int8 activations (accuracy_level 4): the fair peer of the toolkit's int8 compute.
    ("ONNX Runtime int4, int8 activations (accuracy_level 4)", "int4-block32-acc4.onnx", quantize_int4_int8_compute),
)


def build_peers(model, workdir: str | Path) -> list[tuple[str, Path, float]]:
    """Writes the three peer files into `workdir`; returns (name, path, seconds to quantize)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fp32 = workdir / PEERS[0][1]
    export_plain(model, fp32)
    built = []
    for name, filename, quantize in PEERS:
        path = workdir / filename
        start = time.perf_counter()
        if quantize is not None:
            quantize(fp32, path)
        built.append((name, path, time.perf_counter() - start if quantize is not None else 0.0))
    return built


def onnx_peer_rows(model, windows: torch.Tensor, workdir: str | Path, quiet: bool = False,
                   threads: int = 2) -> list[dict]:
    """Exports `model`, quantizes it with ONNX Runtime, and measures each file's size and perplexity."""
    from exporters.onnx.loader import OnnxDecoder

    rows = []
    for name, path, quantize_seconds in build_peers(model, workdir):
        start = time.perf_counter()
        decoder = OnnxDecoder(path.parent, threads=threads, graph=path.name)
        perplexity = onnx_perplexity(decoder, windows, name, quiet=quiet)
        rows.append({"name": name, "kind": "peer", "bytes": size_on_disk(path), "perplexity": perplexity,
                     "quantize_seconds": round(quantize_seconds, 2),
                     "eval_seconds": round(time.perf_counter() - start, 2)})
    return rows


def main() -> None:
    import tempfile

    from compressor.data import default_evaluation_text, evaluation_windows
    from compressor.sources import load_model

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
