"""Decode speed of ONNX artifacts against llama.cpp GGUF files, in one run on the same cores.

Each ONNX artifact is timed through the toolkit's decode loop (`exporters.onnx.loader`) with the
compute its export records (its default loading) and, for comparison, with each compute named in
`--also` and (`--unfused`) with attention and RoPE as their standard-op bodies instead of ONNX
Runtime's fused kernels; each GGUF file through llama.cpp's bindings (`bench.llamacpp.decode_speed`). Same prompt
length, new tokens, threads and repeats for all; rows are timed in rounds (one repeat of every row
per round) so that a slow spell of this shared machine falls on every row alike. Medians, and ratios
to the first GGUF file. Build the GGUF files first with `python -m bench.llamacpp`.

    python -m bench.decode_speed --onnx out/quantize-only out/quantize-quality \\
        --gguf ~/.cache/compressor-bench/llama.cpp-0.3.36/models/Q4_K_M.gguf
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

THREADS = 2


def onnx_decode_seconds(decoder, prompt: np.ndarray, new: int) -> float:
    """Seconds for `new` greedy decode steps after a prefill of `prompt` (the prefill not counted)."""
    state = decoder.prefill(prompt)
    started = time.perf_counter()
    for _ in range(new):
        decoder.decode(state.logits.argmax(-1), state)
    return time.perf_counter() - started


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", nargs="*", type=Path, default=[], help="artifact folders with an onnx/ export")
    parser.add_argument("--also", nargs="*", default=["fp32"], choices=["fp32", "int8"],
                        help="computes to time besides each export's recorded one (default: fp32)")
    parser.add_argument("--unfused", action="store_true",
                        help="also time each export's recorded compute with attention as its standard-op body")
    parser.add_argument("--gguf", nargs="*", type=Path, default=[], help="llama.cpp GGUF files (the first is the ratios' base)")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default="decode_speed", help="results file stem under bench/results/")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.gguf if not p.is_file()] + [str(p) for p in args.onnx if not (p / "onnx").is_dir()]
    if missing or not (args.onnx or args.gguf):
        raise SystemExit(f"bench.decode_speed: {'not found: ' + missing[0] if missing else 'nothing to time'}")

    from bench.common import command_line, machine, write_results
    from bench.llamacpp import decode_speed
    from compressor.data import embedded_text
    from compressor.sources import load_model
    from exporters.onnx.loader import OnnxDecoder

    tokenizer = load_model("embedded").tokenizer
    prompt = np.array([tokenizer(embedded_text())["input_ids"][:args.prompt]])
    rows, runs = [], []
    for folder in args.onnx:
        recorded = OnnxDecoder(folder / "onnx", threads=THREADS)
        variants = [(recorded.matmul_accuracy, True)] + [(c, True) for c in args.also if c != recorded.matmul_accuracy]
        if args.unfused:
            variants.insert(1, (recorded.matmul_accuracy, False))
        for compute, fused in variants:
            decoder = recorded if (compute, fused) == variants[0] else \
                OnnxDecoder(folder / "onnx", threads=THREADS, matmul_accuracy=compute, fused_attention=fused)
            onnx_decode_seconds(decoder, prompt, 4)  # warm-up
            rows.append({"model": f"{folder.name} ONNX, {compute} compute"
                         + (" (recorded default)" if (compute, fused) == variants[0] else "")
                         + ("" if fused else ", attention unfused"),
                         "kind": "onnx", "compute": compute, "fused_attention": fused, "seconds": []})
            runs.append(lambda d=decoder: onnx_decode_seconds(d, prompt, args.new))
    for gguf in args.gguf:
        rows.append({"model": f"llama.cpp {gguf.stem}", "kind": "gguf", "seconds": []})
        runs.append(lambda g=gguf: args.new / decode_speed(g, THREADS, args.prompt, args.new, repeats=1)["decode_tok_s"])
    for round_ in range(args.repeats):
        for row, run in zip(rows, runs):
            row["seconds"].append(run())
        print(f"round {round_ + 1}/{args.repeats}: " + ", ".join(f"{args.new / r['seconds'][-1]:.1f}" for r in rows),
              flush=True)
    for row in rows:
        row["decode_tok_s"] = args.new / statistics.median(row["seconds"])
    base = next((r for r in rows if r["kind"] == "gguf"), rows[0])
    for row in rows:
        row["ratio"] = row["decode_tok_s"] / base["decode_tok_s"]
    data = {"machine": machine(), "command": command_line(), "threads": THREADS, "prompt": args.prompt,
            "new": args.new, "repeats": args.repeats, "base": base["model"], "rows": rows}
    lines = ["# Decode speed: ONNX artifacts and llama.cpp, one run", "",
             f"{THREADS} threads, {args.prompt}-token prompt (the embedded text), {args.new} greedy decode steps, "
             f"median of {args.repeats} rounds (each round times every row once). Ratio: to {base['model']}. "
             f"Command: `{data['command']}`.", "",
             "| model | decode tok/s | ratio |", "|---|---|---|"]
    lines += [f"| {r['model']} | {r['decode_tok_s']:.1f} | {r['ratio']:.2f} |" for r in rows]
    json_path, md_path = write_results(args.name, data, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
