"""What a weight width costs ONNX Runtime's CPU MatMulNBits kernel at one token a step, when the
weights stream from memory as they do in a decode step (not from cache, as a single repeated matrix
would).

A chain of distinct random MatMulNBits weights of one shape (`--layers` of them, so that the chain
is larger than the caches) is run on one row of activations, for each width ONNX Runtime's kernel
takes (2, 4 and 8 bits; 5- and 6-bit codes of the toolkit's exports ride in 8-bit containers) and
each accuracy level (fp32 activations, int8 activations). The rows are timed in rounds (one run of
every row per round); medians, with the bytes of weights each run reads and the rate that implies.
Writes bench/results/matmulnbits_bits.{json,md}.

    python -m bench.matmulnbits_bits [--k 576 --n 1536 --layers 120 --repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

THREADS = 2
BLOCK = 64
ACCURACY = {"fp32": 1, "int8": 4}


def chain_session(k: int, n: int, layers: int, bits: int, accuracy: int):
    """An ONNX Runtime session of `layers` MatMulNBits nodes, each (1, k) x (k, n) with its own
    weights, all reading the same input (so every node runs and the shapes need not chain)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    blob = BLOCK * bits // 8
    nodes, initializers, outputs = [], [], []
    for i in range(layers):
        codes = rng.integers(0, 256, size=(n, k // BLOCK, blob), dtype=np.uint8)
        scales = rng.random(n * k // BLOCK, dtype=np.float32) * 1e-3
        initializers += [numpy_helper.from_array(codes, f"codes{i}"), numpy_helper.from_array(scales, f"scales{i}")]
        nodes.append(helper.make_node("MatMulNBits", ["x", f"codes{i}", f"scales{i}"], [f"y{i}"], domain="com.microsoft",
                                      K=k, N=n, bits=bits, block_size=BLOCK, accuracy_level=accuracy))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])], outputs,
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=576, help="input features (the embedded model's hidden size)")
    parser.add_argument("--n", type=int, default=1536, help="output features (its MLP width)")
    parser.add_argument("--layers", type=int, default=120, help="distinct weights in the chain")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    if args.k % BLOCK:
        raise SystemExit(f"bench.matmulnbits_bits: --k {args.k} is not a multiple of the block size {BLOCK}")

    from bench.common import command_line, machine, write_results

    x = np.random.default_rng(1).random((1, args.k), dtype=np.float32)
    rows = []
    for accuracy, level in ACCURACY.items():
        for bits in (2, 4, 8):
            rows.append({"bits": bits, "accuracy": accuracy, "session": chain_session(args.k, args.n, args.layers, bits, level),
                         "megabytes": args.layers * args.k * args.n * bits / 8 / 1e6, "seconds": []})
    for row in rows:
        row["session"].run(None, {"x": x})  # warm-up (prepacking)
    for _ in range(args.repeats):
        for row in rows:
            started = time.perf_counter()
            row["session"].run(None, {"x": x})
            row["seconds"].append(time.perf_counter() - started)
    for row in rows:
        del row["session"]
        row["ms"] = statistics.median(row["seconds"]) * 1e3
        row["gb_per_s"] = row["megabytes"] / row["ms"]
    base = {r["accuracy"]: r["ms"] for r in rows if r["bits"] == 4}
    for row in rows:
        row["vs_4_bit"] = row["ms"] / base[row["accuracy"]]
    data = {"machine": machine(), "command": command_line(), "threads": THREADS, "block": BLOCK, "k": args.k,
            "n": args.n, "layers": args.layers, "repeats": args.repeats, "rows": rows}
    lines = ["# MatMulNBits at one token: cost by weight width, weights streamed from memory", "",
             f"{args.layers} distinct {args.k} x {args.n} weights run on one row of activations, blocks of {BLOCK}, "
             f"{THREADS} threads, median of {args.repeats} rounds. Command: `{data['command']}`.", "",
             "| bits | activations | weight MB | ms | GB/s | vs 4-bit |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['bits']} | {r['accuracy']} | {r['megabytes']:.1f} | {r['ms']:.2f} | {r['gb_per_s']:.1f} | "
              f"{r['vs_4_bit']:.2f} |" for r in rows]
    json_path, md_path = write_results("matmulnbits_bits", data, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
