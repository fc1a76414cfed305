"""Quality at size: each quantization lever on its own row, at equal bytes, on the embedded model.

One analysis (GPTQ sensitivity of every decoder layer at 3, 4 and 8 bits, and of the embedding)
serves every row; each row plans under a byte budget on that analysis, quantizes a fresh copy of
the model with GPTQ (symmetric, groups of 64, calibration 32 x 512 tokens of the embedded text),
and scores the first 16 WikiText-2 test windows of 512 tokens (every next-token position).
Rows at one budget differ by one lever only. Levers measured so far:
- `embeddings: auto`: the tied 49152 x 576 embedding (28 M parameters) joins the knapsack at each
  width instead of a fixed 8 bits.
- `equalize:` (AWQ scales folded before rounding, then GPTQ); its rows plan on a second analysis
  measured on the equalized model.
It writes bench/results/quantization_levers.{json,md}.

    python -m bench.quantization_levers            # the full run (about 30 minutes on 2 cores)
    python -m bench.quantization_levers --quick    # tiny settings, to check the script itself
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import command_line, machine, write_results
from bench.quantization import evaluation_setup, measured_row
from compressor.data import evaluation_windows
from compressor.evaluate import perplexity
from compressor.pipeline import analyze, make_plan
from compressor.process import quiet_transformers
from compressor.recipe import parse_recipe
from compressor.sources import load_model

BUDGETS_MB = (90.0,)  # the target size (quantize-only is 94.7 MB today)
# (row label, quantize settings, equalize) at each budget: the baseline first, then the levers.
VARIANTS = (
    ("GPTQ 4/8 by sensitivity, embedding 8-bit (quantize-only's settings)", {"bits": [4, 8], "embeddings": 8}, False),
    ("+ embedding in the allocation (embeddings: auto)", {"bits": [4, 8], "embeddings": "auto"}, False),
    ("+ equalization (AWQ), embedding 8-bit", {"bits": [4, 8], "embeddings": 8}, True),
    ("+ equalization and embeddings: auto", {"bits": [4, 8], "embeddings": "auto"}, True),
)


def quantize_settings(calibration_quick: bool, **overrides) -> dict:
    settings = {"method": "gptq", "group_size": 64, "symmetric": True, "allocate": "sensitivity",
                "protect": {"outliers": "auto"}}
    if calibration_quick:
        settings.update(sensitivity_samples=2, sensitivity_seq_len=64)
    return dict(settings, **overrides)


def markdown(rows: list[dict], original: dict, meta: dict) -> str:
    lines = ["# Quantization levers at equal bytes", "",
             f"Embedded model (SmolLM2-135M-Instruct), WikiText-2 test, first {meta['windows']} windows x "
             f"{meta['seq_len']} tokens (every next-token position); calibration {meta['calibration']} "
             f"(never WikiText). GPTQ, symmetric, groups of 64, allocated by measured sensitivity. "
             f"Machine: {meta['machine']['cpu']}, {meta['machine']['torch_threads']} threads. "
             f"Command: `{meta['command']}`. The analyses took {meta['analysis_seconds']['plain'] / 60:.1f} min "
             f"(plain) and {meta['analysis_seconds']['equalized'] / 60:.1f} min (equalization search + sensitivity "
             "of the equalized model).", "",
             f"Original fp32: {original['bytes'] / 1e6:.1f} MB, perplexity {original['perplexity']:.2f}.", "",
             "| budget MB | variant | size MB | perplexity | vs baseline | embedding bits | widths (layers) | minutes |",
             "|---|---|---|---|---|---|---|---|"]
    baselines = {}
    for row in rows:
        base = baselines.setdefault(row["budget_mb"], row["perplexity"])
        widths = ", ".join(f"{n} x {b}" for b, n in row["widths"].items() if n)
        lines.append(f"| {row['budget_mb']:.1f} | {row['name']} | {row['bytes'] / 1e6:.1f} | {row['perplexity']:.2f} | "
                     f"{row['perplexity'] - base:+.2f} | {row['embedding_bits']} | {widths} | {row['seconds'] / 60:.1f} |")
    lines += ["", "Minutes: planning, equalization (its rows) and GPTQ of that row on 2 cores (the analyses not "
              "included).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings to smoke-test the script")
    args = parser.parse_args()
    quiet_transformers()
    torch.manual_seed(0)
    eval_text, n_windows, seq_len, calibration = evaluation_setup(args.quick, "bench.quantization_levers")
    source = load_model("embedded", quiet=True)
    windows = evaluation_windows(source.tokenizer, eval_text, n_windows, seq_len).input_ids
    original = {"bytes": sum(p.numel() * p.element_size() for p in source.model.state_dict().values()),
                "perplexity": perplexity(source.model, windows, True)}
    print(f"original: {original['perplexity']:.2f}", flush=True)

    def recipe(budget_bytes: int, equalized: bool, **quantize):
        data = {"name": "levers", "calibration": calibration,
                "quantize": quantize_settings(args.quick, budget={"bytes": budget_bytes}, **quantize)}
        if equalized:
            data["equalize"] = {"samples": 2, "tokens": 256, "grid": 5} if args.quick else {}
        return parse_recipe(data)

    analyses, analysis_seconds = {}, {}
    for equalized in (False, True):
        started = time.perf_counter()
        analyses[equalized] = analyze(source, recipe(int(BUDGETS_MB[0] * 1e6), equalized, bits=[4, 8],
                                                     embeddings="auto"), quiet=True)
        analysis_seconds[equalized] = time.perf_counter() - started
        print(f"analysis (equalized: {equalized}): {analysis_seconds[equalized]:.0f} s", flush=True)
    budgets, variants = (BUDGETS_MB[:1], VARIANTS[1:3]) if args.quick else (BUDGETS_MB, VARIANTS)
    rows = []
    for budget_mb in budgets:
        for name, settings, equalized in variants:
            plan_recipe = recipe(int(budget_mb * 1e6), equalized, **settings)
            row = measured_row(name, "lever", source, plan_recipe, analyses[equalized], windows, time.perf_counter())
            spec = make_plan(plan_recipe, analyses[equalized])["quantization"]
            row.update(budget_mb=budget_mb, embedding_bits=spec["embedding"]["bits"], settings=settings,
                       equalized=equalized)
            rows.append(row)
            print(f"{budget_mb} MB | {name}: {row['bytes'] / 1e6:.1f} MB, perplexity {row['perplexity']:.2f} "
                  f"(embedding {row['embedding_bits']}-bit, {row['seconds']:.0f} s)", flush=True)
    meta = {"command": command_line(), "machine": machine(), "windows": n_windows, "seq_len": seq_len,
            "calibration": f"{calibration['samples']} x {calibration['seq_len']} tokens of the embedded text",
            "analysis_seconds": {"plain": analysis_seconds[False], "equalized": analysis_seconds[True]},
            "original": original}
    name = "quantization_levers" + ("-quick" if args.quick else "")
    write_results(name, dict(meta, rows=rows), markdown(rows, original, meta))
    print(markdown(rows, original, meta))


if __name__ == "__main__":
    main()
