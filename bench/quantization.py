"""Mixed-bit quantization on the embedded model: size on disk against WikiText-2 perplexity.

One run measures, on the same machine and the same evaluation windows (WikiText-2 test, first 16
windows x 512 tokens; calibration is the embedded text, never the evaluation text):
- the original fp32 model;
- uniform RTN and GPTQ at 8 / 4 / 3 bits (symmetric, group 64, embedding 8-bit), and GPTQ / RTN in
  ONNX Runtime's int4 format (symmetric, group 32, embedding kept in fp32);
- mixed allocations by `uniform`, `lim`, `zd` and `sensitivity` at 3.0, 3.5 and 4.0 average bits
  (widths 2/3/4/8, symmetric, group 64, embedding 8-bit);
- the recipes balanced, quantize-only and small through the whole `compress` pipeline;
- the peers: the model exported to ONNX, ONNX Runtime's dynamic int8 and MatMulNBits int4; and
  llama.cpp's Q8_0, Q4_K_M, Q4_0, Q3_K_M, Q2_K and IQ4_XS files of the same float model (built,
  converted and quantized by bench.llamacpp, the importance matrix from the embedded text), scored
  through its Python bindings' logits on the same windows and positions (group `llamacpp`).
It writes bench/results/quantization.{json,md} and quantization.png (size vs perplexity).

    python -m bench.quantization           # the full run
    python -m bench.quantization --quick   # tiny settings, to check the script itself
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bench.common import RESULTS, command_line, machine, write_results
from compressor.data import default_evaluation_text, evaluation_windows
from compressor.evaluate import perplexity
from compressor.sources import load_model
from compressor.pipeline import analyze, compress, make_plan
from compressor.process import quiet_transformers
from compressor.recipe import parse_recipe
from compressor.stages import equalization, quantization
from compressor.stages.run import Run
from exporters.safetensors import write_model
from exporters.shards import weights_bytes

RECIPES = ("balanced", "quantize-only", "quantize-quality", "small")
GROUPS = ("uniform", "mixed", "recipes", "peers", "llamacpp")
ALLOCATORS = ("uniform", "lim", "zd", "sensitivity")
AVERAGE_BITS = (3.0, 3.5, 4.0)


def file_size(model, quantized) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        write_model(model, None, tmp, quantized)
        return weights_bytes(Path(tmp))


def measured_row(name: str, kind: str, source, recipe, analysis, windows, started: float,
                 plan_edit: dict | None = None) -> dict:
    """Plans `recipe` on `analysis`, equalizes (when the plan says so) and quantizes a fresh copy of
    the source, saves it and scores it. `plan_edit` replaces fields of the plan's quantization part
    (how the planned widths are rounded: clip, method)."""
    plan = make_plan(recipe, analysis)
    plan["quantization"].update(plan_edit or {})
    run = Run(source.tokenizer, quiet=True)
    model = equalization.apply(copy.deepcopy(source.model), plan, run).model
    quantized = quantization.apply(model, plan, run).codes
    seconds = time.perf_counter() - started
    spec = plan["quantization"]
    return {"name": name, "kind": kind, "bytes": file_size(model, quantized), "perplexity": perplexity(model, windows, True),
            "avg_bits": spec["budget"]["avg_bits"], "method": spec["method"], "allocate": spec["allocate"],
            "predicted_tensor_bytes": spec["predicted_tensor_bytes"], "seconds": seconds,
            "widths": {str(b): sum(1 for u in spec["units"] if u["bits"] == b) for b in spec["widths"]}}


def quantize_recipe(base: dict, **quantize) -> dict:
    return dict(base, quantize=dict({"bits": [2, 3, 4, 8], "group_size": 64, "symmetric": True,
                                     "embeddings": 8}, **quantize))


def recipe_row(name: str, quick: bool, evaluation: dict, workdir: Path) -> dict:
    data = yaml.safe_load(Path(f"recipes/{name}.yaml").read_text())
    data["evaluate"] = dict(evaluation, compare_original=False)
    if quick:
        data["calibration"] = dict(data.get("calibration", {}), samples=4, seq_len=128)
        if data.get("quantize"):
            data["quantize"].update(sensitivity_samples=2, sensitivity_seq_len=64)
    started = time.perf_counter()
    out = compress(parse_recipe(data, name), out=workdir / name, force=True, quiet=True, log=lambda *_: None)
    report = json.loads((out / "report.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    return {"name": f"recipe {name}", "kind": "recipe", "bytes": weights_bytes(out),
            "perplexity": report["compressed"]["perplexity"], "seconds": time.perf_counter() - started,
            "avg_bits": ((plan.get("quantization") or {}).get("budget") or {}).get("avg_bits"),
            "removed_units": len((plan.get("removal") or {}).get("removed", []))}


def llamacpp_rows(windows: torch.Tensor) -> list[dict]:
    """llama.cpp's files of the embedded model's float weights (bench.llamacpp: built and converted
    once, cached), each scored on `windows` through the bindings' logits."""
    from bench import llamacpp
    from compressor.data import embedded_text
    from compressor.sources import _embedded_cache

    tools = llamacpp.build_tools()
    work = Path(tools["cache"]) / "models" / _embedded_cache().name
    f32 = llamacpp.convert(llamacpp.float_folder(work / "hf"), work / "f32.gguf", tools)
    matrix = llamacpp.imatrix(f32, embedded_text(), work / "imatrix.gguf", tools)
    rows = []
    for qtype, with_imatrix in llamacpp.QUANT_TYPES.items():
        started = time.perf_counter()
        gguf = llamacpp.quantize(f32, qtype, work / f"{qtype}.gguf", matrix if with_imatrix else None, tools)
        rows.append({"name": f"llama.cpp {qtype}{' (imatrix)' if with_imatrix else ''}", "kind": "peer",
                     "bytes": llamacpp.file_bytes(gguf), "perplexity": llamacpp.score(gguf, windows),
                     "seconds": time.perf_counter() - started})
    return rows


def markdown(rows: list[dict], original: dict, checks: dict, meta: dict) -> str:
    lines = ["# Mixed-bit quantization: size on disk vs perplexity", "",
             f"Embedded model (SmolLM2-135M-Instruct), WikiText-2 test, {meta['windows']} windows x "
             f"{meta['seq_len']} tokens; calibration {meta['calibration']}. Machine: {meta['machine']['cpu']}, "
             f"{meta['machine']['torch_threads']} threads. Command: `{meta['command']}`.", "",
             "| variant | kind | size MB | vs original | perplexity | ppl ratio | avg bits (linears) | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        bits = f"{row['avg_bits']:.3f}" if row.get("avg_bits") else ""
        lines.append(f"| {row['name']} | {row['kind']} | {row['bytes'] / 1e6:.1f} | "
                     f"{row['bytes'] / original['bytes']:.3f} | {row['perplexity']:.2f} | "
                     f"{row['perplexity'] / original['perplexity']:.3f} | {bits} | {row.get('seconds', 0):.0f} |")
    lines += ["", "## Checks", ""] + [f"- {k}: {v}" for k, v in checks.items()] + [""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"original": "black", "uniform": "tab:blue", "mixed": "tab:green", "recipe": "tab:red",
              "peer": "tab:orange"}
    fig, ax = plt.subplots(figsize=(10, 6.5))
    for row in rows:
        ax.scatter(row["bytes"] / 1e6, row["perplexity"], color=colors.get(row["kind"], "gray"), s=24)
        ax.annotate(row["name"], (row["bytes"] / 1e6, row["perplexity"]), fontsize=6, xytext=(3, 2),
                    textcoords="offset points")
    for kind, color in colors.items():
        ax.scatter([], [], color=color, label=kind)
    ax.set_yscale("log")
    ax.set_xlabel("model file size (MB)")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    ax.set_title("Quantization of the embedded model: size vs perplexity")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def check_figures(rows: list[dict], original: dict) -> dict:
    by_name = {row["name"]: row for row in rows}
    peer_int4 = next((r for r in rows if r["kind"] == "peer" and "int4" in r["name"]), None)
    checks = {}
    gptq32 = by_name.get("gptq int4 g32 sym, embedding fp32")
    if gptq32 and peer_int4:
        target = original["perplexity"] + (peer_int4["perplexity"] - original["perplexity"]) / 2
        checks["GPTQ sym 4-bit g32 closes half the peer int4 gap"] = (
            f"{gptq32['perplexity']:.2f} vs target <= {target:.2f}: {'yes' if gptq32['perplexity'] <= target else 'NO'}")
    if peer_int4:
        better = [r["name"] for r in rows if r["kind"] in ("mixed", "recipe", "uniform")
                  and r["bytes"] < peer_int4["bytes"] and r["perplexity"] < peer_int4["perplexity"]]
        checks["smaller and better than the peer int4"] = ", ".join(better) or "none"
    balanced = by_name.get("recipe balanced")
    if balanced:
        ok = balanced["bytes"] <= 100e6 and balanced["perplexity"] <= 42
        checks["balanced <= 100 MB at perplexity <= 42"] = (
            f"{balanced['bytes'] / 1e6:.1f} MB, {balanced['perplexity']:.2f}: {'yes' if ok else 'NO'}")
    for method in ("rtn", "gptq"):
        row = by_name.get(f"{method} uniform 8-bit")
        if row:
            ratio = row["perplexity"] / original["perplexity"]
            checks[f"{method} 8-bit within 1% of the original"] = f"ratio {ratio:.4f}: {'yes' if ratio <= 1.01 else 'NO'}"
    for bits in AVERAGE_BITS[:2]:
        sens, uni = by_name.get(f"mixed sensitivity {bits}"), by_name.get(f"mixed uniform {bits}")
        if sens and uni:
            checks[f"sensitivity beats uniform at {bits} bits"] = (
                f"{sens['perplexity']:.2f} vs {uni['perplexity']:.2f}: "
                f"{'yes' if sens['perplexity'] < uni['perplexity'] else 'NO'}")
    return checks


def evaluation_setup(quick: bool, script: str) -> tuple[str, int, int, dict]:
    """(evaluation text, windows, tokens per window, calibration settings) of the quantization
    benches: the first 16 WikiText-2 test windows of 512 tokens, calibration 32 x 512 tokens of the
    embedded text (tiny settings with `quick`)."""
    eval_text = default_evaluation_text()
    if eval_text == "embedded" and not quick:
        raise SystemExit(f"{script}: WikiText-2 test not found; put shared/data/wikitext-2-raw/wiki.test.raw "
                         "beside the project or set COMPRESSOR_EVAL_TEXT to that file")
    n_windows, seq_len = (2, 128) if quick else (16, 512)
    calibration = {"text": "embedded", "samples": 4, "seq_len": 128, "seed": 0} if quick else \
        {"text": "embedded", "samples": 32, "seq_len": 512, "seed": 0}
    return eval_text, n_windows, seq_len, calibration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings to smoke-test the script")
    parser.add_argument("--only", default=",".join(GROUPS),
                        help="comma-separated row groups to measure (default: all); a partial run writes "
                             "quantization-GROUPS.json")
    args = parser.parse_args()
    quiet_transformers()
    torch.manual_seed(0)
    eval_text, n_windows, seq_len, calibration = evaluation_setup(args.quick, "bench.quantization")
    sensitivity = {"sensitivity_samples": 2, "sensitivity_seq_len": 64} if args.quick else {}
    evaluation = {"windows": n_windows, "seq_len": seq_len,
                  "speed": {"prompt_tokens": 64 if args.quick else 512, "new_tokens": 8, "repeats": 1}}
    source = load_model("embedded", quiet=True)
    windows = evaluation_windows(source.tokenizer, eval_text, n_windows, seq_len).input_ids
    base = {"name": "bench", "calibration": calibration}
    rows = []

    started = time.perf_counter()
    original = {"name": "original fp32", "kind": "original", "bytes": file_size(source.model, None),
                "perplexity": perplexity(source.model, windows, True), "seconds": time.perf_counter() - started}
    rows.append(original)
    print(f"original: {original['perplexity']:.2f}", flush=True)

    def add(row):
        rows.append(row)
        print(f"{row['name']}: {row['bytes'] / 1e6:.1f} MB, perplexity {row['perplexity']:.2f} "
              f"({row.get('seconds', 0):.0f} s)", flush=True)

    # One analysis serves every row: the layer report, the inventory, and RTN sensitivity (used by
    # the `sensitivity` rows only).
    groups = set(args.only.split(","))
    analysis, analysis_seconds = None, None
    if groups & {"uniform", "mixed"}:
        recipe = parse_recipe(quantize_recipe(base, method="rtn", allocate="sensitivity", budget={"avg_bits": 4.0},
                                              **sensitivity))
        started = time.perf_counter()
        analysis = analyze(source, recipe, quiet=True)
        analysis_seconds = time.perf_counter() - started
        print(f"analysis with quantization sensitivity: {analysis_seconds:.0f} s", flush=True)

    # Uniform widths: one width everywhere (a budget every width fits).
    for method in ("rtn", "gptq") if "uniform" in groups else ():
        for bits in (8, 4, 3):
            recipe = parse_recipe(quantize_recipe(base, method=method, bits=[bits], allocate="uniform",
                                                  budget={"avg_bits": 9}))
            add(measured_row(f"{method} uniform {bits}-bit", "uniform", source, recipe, analysis, windows,
                             time.perf_counter()))
        recipe = parse_recipe(quantize_recipe(base, method=method, bits=[4], group_size=32, embeddings="keep",
                                              allocate="uniform", budget={"avg_bits": 9}))
        add(measured_row(f"{method} int4 g32 sym, embedding fp32", "uniform", source, recipe, analysis, windows,
                         time.perf_counter()))

    # Mixed allocations under average-bit budgets (RTN: a GPTQ run costs minutes on 2 cores).
    for allocate in ALLOCATORS if "mixed" in groups else ():
        for bits in AVERAGE_BITS:
            recipe = parse_recipe(quantize_recipe(base, method="rtn", allocate=allocate, budget={"avg_bits": bits},
                                                  **sensitivity))
            add(measured_row(f"mixed {allocate} {bits}", "mixed", source, recipe, analysis, windows,
                             time.perf_counter()))

    with tempfile.TemporaryDirectory(prefix="bench-quant-recipes-") as tmp:
        for name in RECIPES if "recipes" in groups else ():
            add(recipe_row(name, args.quick, evaluation, Path(tmp)))

    if "peers" in groups:
        from bench.onnx_peers import onnx_peer_rows

        with tempfile.TemporaryDirectory(prefix="bench-quant-onnx-") as tmp:
            for row in onnx_peer_rows(source.model, windows, tmp, quiet=True):
                row["seconds"] = row.get("quantize_seconds", 0) + row.get("eval_seconds", 0)
                add(row)

    if "llamacpp" in groups and not args.quick:
        for row in llamacpp_rows(windows):
            add(row)

    checks = check_figures(rows, original)
    meta = {"command": command_line(), "machine": machine(), "windows": n_windows, "seq_len": seq_len,
            "calibration": f"{calibration['samples']} x {calibration['seq_len']} tokens of the embedded text",
            "analysis_seconds": analysis_seconds}
    name = "quantization" + ("" if groups >= set(GROUPS) else
                             "-" + "-".join(sorted(groups))) + ("-quick" if args.quick else "")
    write_results(name, dict(meta, rows=rows, checks=checks), markdown(rows, original, checks, meta))
    plot(rows, RESULTS / f"{name}.png")
    print(markdown(rows, original, checks, meta))


if __name__ == "__main__":
    main()
