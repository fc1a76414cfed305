"""Where an ONNX export's decode time goes: ONNX Runtime's profiler over greedy decode steps.

Loads `FOLDER/onnx` with the compute its export records (or `--compute`), prefills a random prompt,
profiles `--steps` decode steps, and prints the kernel time per step by operator type, the share of
the step spent outside kernels, and the node count. Prints only (the profiler's own JSON trace is
written to a temporary folder and removed); the profiler slows each node, so compare shares, not
absolute times.

    python -m bench.onnx_profile out/quantize-only [--compute fp32|int8] [--prompt 128] [--steps 64]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an artifact folder with an onnx/ export")
    parser.add_argument("--compute", choices=["fp32", "int8"], default=None, help="default: the export's recorded one")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--unfused", action="store_true", help="run attention as its standard-op body, not the fused kernel")
    args = parser.parse_args(argv)
    if not (args.folder / "onnx").is_dir():
        raise SystemExit(f"bench.onnx_profile: {args.folder}: no onnx/ export")
    from exporters.onnx import loader

    with tempfile.TemporaryDirectory() as tmp:
        plain = loader.session_options

        def profiled(*a, **k):
            options = plain(*a, **k)
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tmp) / "decode")
            return options

        loader.session_options = profiled
        try:
            decoder = loader.OnnxDecoder(args.folder / "onnx", threads=args.threads, matmul_accuracy=args.compute,
                                         fused_attention=not args.unfused)
        finally:
            loader.session_options = plain
        vocab = decoder.session.get_outputs()[0].shape[-1]
        ids = np.random.default_rng(0).integers(0, vocab if isinstance(vocab, int) else 1000, size=(1, args.prompt))
        state = decoder.prefill(ids)
        for _ in range(args.steps):
            decoder.decode(state.logits.argmax(-1), state)
        events = json.loads(Path(decoder.session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    after_prefill = runs[0]["ts"] + runs[0]["dur"]
    by_op, nodes = collections.Counter(), set()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > after_prefill:
            by_op[e["args"]["op_name"]] += e["dur"]
            nodes.add(e["name"])
    step = statistics.median(r["dur"] for r in runs[1:])
    kernels = sum(by_op.values()) / args.steps
    print(f"{args.folder}: {decoder.matmul_accuracy} compute, {len(nodes)} nodes a step; step median {step / 1e3:.2f} ms, "
          f"kernels {kernels / 1e3:.2f} ms, outside kernels {100 * (1 - kernels / step):.0f} %")
    for op, us in by_op.most_common(15):
        print(f"  {op:30s} {us / args.steps / 1e3:7.3f} ms a step  {100 * us / sum(by_op.values()):5.1f} % of kernel time")


if __name__ == "__main__":
    main()
