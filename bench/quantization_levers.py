"""Quality at size: each quantization lever on its own row, at equal bytes, on the embedded model.

Rows at one budget (90 MB, the size of llama.cpp's IQ4_XS; 105.5 MB, its Q4_K_M) each add one lever
to the row above. Each row plans under `budget.bytes` on a shared analysis (GPTQ sensitivity of
every allocation unit at its widths, and of the embedding), quantizes a fresh copy of the model
(symmetric, groups of 64, calibration 32 x 512 tokens of the embedded text) and scores the first
16 WikiText-2 test windows of 512 tokens (every next-token position). The levers:
- `embeddings: auto`: the tied 49152 x 576 embedding (28 M parameters) joins the knapsack at each
  width instead of a fixed 8 bits;
- `equalize:` (AWQ scales folded before rounding, then GPTQ), planned on the equalized model;
- 5- and 6-bit widths beside 4 and 8;
- `clip: search`: each group's range searched for the least Hessian-weighted rounding error;
- `granularity: unit`: attention and MLP units get widths of their own;
- `method: signround`: learned rounding (signed gradient steps per layer) on top of GPTQ;
- group sizes as allocation choices: each unit and the embedding at each width in groups of 64 or
  with one scale per row (`group_size: [64, channel]`), so the knapsack trades scale bytes against
  widths (this model's 576-wide rows take no group of 128).
It writes bench/results/quantization_levers.{json,md}.

    python -m bench.quantization_levers            # the full run (about 100 minutes on 2 cores)
    python -m bench.quantization_levers --analyses out/levers-analyses   # keeps (and reuses) the analyses
    python -m bench.quantization_levers --quick    # tiny settings, to check the script itself
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.common import command_line, machine, write_results
from bench.quantization import evaluation_setup, measured_row
from compressor.data import evaluation_windows
from compressor.evaluate import perplexity
from compressor.pipeline import analyze, make_plan
from compressor.process import quiet_transformers
from compressor.recipe import parse_recipe
from compressor.sources import load_model

BUDGETS_MB = (90.0, 105.5)  # the targets: IQ4_XS (90.9 MB) and Q4_K_M (105.5 MB)
HEADER_ROOM = 50_000  # budget.bytes counts tensors; the file adds its JSON header
# The analyses the rows plan on: (equalized, granularity, widths, group sizes), each also measuring the
# embedding (embeddings: auto). `unit` measures every width at both group sizes: the rows at groups of
# 64 read its primary scores, the group-size row all of them.
GROUPS = [64, "channel"]
ANALYSES = {
    "plain": (False, "layer", [4, 8], 64),
    "unit": (True, "unit", [4, 5, 6, 8], GROUPS),
}
WIDE = [4, 5, 6, 8]
UNIT = {"granularity": "unit"}
SIGNROUND = {"steps": 25, "windows": 1}
# (row label, analysis, quantize settings, what the row changes in the plan after planning, budgets).
# Each row adds one lever to the row before it (`clip` to the `embeddings: auto` row: BASE), except
# the third, which adds two (equalization and
# unit granularity: an analysis for each alone costs another 10-15 minutes; equalization alone was
# -1.15 at 90 MB in the previous run of this bench, with quantize-only's earlier settings). `clip` and
# `signround` change how the planned widths are rounded, not the widths: they edit the plan (their
# sensitivity would be GPTQ's with min-max ranges, the one planned on).
VARIANTS = (
    ("baseline: GPTQ 4/8 by sensitivity per layer, embedding 8-bit", "plain", {"bits": [4, 8], "embeddings": 8},
     {}, BUDGETS_MB),
    ("+ embedding in the allocation (embeddings: auto)", "plain", {"bits": [4, 8], "embeddings": "auto"}, {},
     (90.0,)),
    ("+ equalization (AWQ) and granularity: unit, embedding 8-bit", "unit", dict(UNIT, bits=[4, 8], embeddings=8),
     {}, BUDGETS_MB),
    ("+ 5- and 6-bit widths", "unit", dict(UNIT, bits=WIDE, embeddings=8), {}, BUDGETS_MB),
    ("+ embeddings: auto", "unit", dict(UNIT, bits=WIDE, embeddings="auto"), {}, BUDGETS_MB),
    ("+ group size per unit: 64 or per channel", "unit",
     dict(UNIT, bits=WIDE, embeddings="auto", group_size=GROUPS), {}, BUDGETS_MB),
    ("+ clip: search (same widths as embeddings: auto)", "unit", dict(UNIT, bits=WIDE, embeddings="auto"),
     {"clip": "search"}, BUDGETS_MB),
    (f"+ method: signround ({SIGNROUND['steps']} steps a layer, same widths)", "unit",
     dict(UNIT, bits=WIDE, embeddings="auto"),
     {"clip": "search", "method": "signround", "signround": dict(SIGNROUND, learning_rate=None)}, (90.0,)),
)
# The row a variant adds its lever to, where it is not the row above it at its budget.
BASE = {VARIANTS[6][0]: VARIANTS[4][0]}
# Where a row stands in the tables: by budget, then lever.
TABLE_ORDER = {variant[0]: i for i, variant in enumerate(VARIANTS)}


def quantize_settings(calibration_quick: bool, **overrides) -> dict:
    settings = {"method": "gptq", "group_size": 64, "symmetric": True, "allocate": "sensitivity",
                "protect": {"outliers": "auto"}}
    if calibration_quick:
        settings.update(sensitivity_samples=2, sensitivity_seq_len=64)
    return dict(settings, **overrides)


def group_counts(units: list[dict]) -> dict[str, int]:
    """Units per group size of a plan that chose them per unit ({} when it had one)."""
    counts: dict[str, int] = {}
    for unit in units:
        if "group_size" in unit:
            key = "channel" if unit["group_size"] is None else f"g{unit['group_size']}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def markdown(rows: list[dict], original: dict, meta: dict, complete: bool = True) -> str:
    minutes = ", ".join(f"{key} {seconds / 60:.1f}" for key, seconds in meta["analysis_seconds"].items()) or "read"
    lines = ["# Quantization levers at equal bytes", "",
             *([] if complete else ["**Partial: the run stopped (or is still running) before its last row.**", ""]),
             f"Embedded model (SmolLM2-135M-Instruct), WikiText-2 test, first {meta['windows']} windows x "
             f"{meta['seq_len']} tokens (every next-token position); calibration {meta['calibration']} "
             f"(never WikiText). GPTQ, symmetric, groups of 64 (but the group-size row), allocated by measured "
             f"sensitivity under `budget.bytes` (the whole model.safetensors). Each row adds one lever to the row "
             f"above it at its budget (the `clip` row to the `embeddings: auto` row; `vs row above` compares "
             f"with that row). Machine: {meta['machine']['cpu']}, {meta['machine']['torch_threads']} threads. "
             f"Command: `{meta['command']}`.", "",
             f"Analyses (minutes on 2 cores, shared by the rows that plan on them): {minutes}. `unit` "
             "includes the equalization search. Analyses read from an earlier run "
             "(`--analyses`) have no minutes here.", "",
             f"Original fp32: {original['bytes'] / 1e6:.1f} MB, perplexity {original['perplexity']:.2f}.", "",
             "| budget MB | variant | size MB | perplexity | vs row above | vs baseline | embedding bits | "
             "widths (units) | minutes |",
             "|---|---|---|---|---|---|---|---|---|"]
    baselines, previous, by_name = {}, {}, {}
    for row in rows:
        budget = row["budget_mb"]
        base = baselines.setdefault(budget, row["perplexity"])
        above = by_name.get((budget, row.get("adds_to")), previous.get(budget))
        step = "" if above is None else f"{row['perplexity'] - above:+.2f}"
        previous[budget] = by_name[(budget, row["name"])] = row["perplexity"]
        widths = ", ".join(f"{n} x {b}" for b, n in row["widths"].items() if n)
        if row.get("group_sizes"):
            widths += "; " + ", ".join(f"{n} x {g}" for g, n in row["group_sizes"].items())
        embedding = str(row["embedding_bits"])
        if row.get("group_sizes"):
            embedding += f" ({'channel' if row.get('embedding_group') is None else 'g' + str(row['embedding_group'])})"
        lines.append(f"| {budget:.1f} | {row['name']} | {row['bytes'] / 1e6:.1f} | {row['perplexity']:.2f} | {step} | "
                     f"{row['perplexity'] - base:+.2f} | {embedding} | {widths} | {row['seconds'] / 60:.1f} |")
    lines += ["", "Minutes: planning, equalization (its rows), GPTQ and refinement of that row on 2 cores (the "
              "analyses not included). Units: decoder layers, or attention and MLP units with `granularity: unit`.",
              ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings to smoke-test the script")
    parser.add_argument("--analyses", type=Path, default=None,
                        help="folder keeping each analysis as KEY.json: read when present, written when measured")
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

    variants = [VARIANTS[0], VARIANTS[2], VARIANTS[5], VARIANTS[-1]] if args.quick else VARIANTS
    wanted = {key for _, key, _, _, _ in variants}
    analyses, analysis_seconds = {}, {}
    for key, (equalized, granularity, bits, groups) in ANALYSES.items():
        if key not in wanted:
            continue
        cached = args.analyses / f"{key}.json" if args.analyses else None
        if cached is not None and cached.is_file():
            analyses[key] = json.loads(cached.read_text())
            print(f"analysis {key}: read from {cached}", flush=True)
            continue
        started = time.perf_counter()
        analyses[key] = analyze(source, recipe(int(BUDGETS_MB[0] * 1e6), equalized, bits=bits, embeddings="auto",
                                               granularity=granularity, group_size=groups), quiet=True)
        analysis_seconds[key] = time.perf_counter() - started
        print(f"analysis {key}: {analysis_seconds[key]:.0f} s", flush=True)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(analyses[key]))
    meta = {"command": command_line(), "machine": machine(), "windows": n_windows, "seq_len": seq_len,
            "calibration": f"{calibration['samples']} x {calibration['seq_len']} tokens of the embedded text",
            "analysis_seconds": analysis_seconds, "analyses": {k: ANALYSES[k] for k in analyses},
            "original": original}
    results_name = "quantization_levers" + ("-quick" if args.quick else "")
    # Every row of every budget, the learned-rounding rows (the slowest, by far) last, so that a run
    # stopped part-way has the others; the tables list them by budget, then lever.
    jobs = [(b, variant) for b in (BUDGETS_MB[:1] if args.quick else BUDGETS_MB) for variant in variants
            if b in variant[4]]
    jobs.sort(key=lambda job: "signround" in job[1][3])
    rows = []
    for budget_mb, (name, key, settings, plan_edit, budgets) in jobs:
        equalized = ANALYSES[key][0]
        plan_recipe = recipe(int(budget_mb * 1e6) - HEADER_ROOM, equalized, **settings)
        edit = dict(plan_edit, signround={"steps": 2, "windows": 1, "learning_rate": None}) \
            if args.quick and "signround" in plan_edit else plan_edit
        row = measured_row(name, "lever", source, plan_recipe, analyses[key], windows, time.perf_counter(),
                           plan_edit=edit)
        spec = make_plan(plan_recipe, analyses[key])["quantization"]
        row.update(budget_mb=budget_mb, embedding_bits=spec["embedding"]["bits"], settings=settings,
                   plan_edit=plan_edit, analysis=key, adds_to=BASE.get(name),
                   embedding_group=spec["embedding"].get("group_size"),
                   group_sizes=group_counts(spec["units"]))
        rows.append(row)
        print(f"{budget_mb} MB | {name}: {row['bytes'] / 1e6:.2f} MB, perplexity {row['perplexity']:.2f} "
              f"(embedding {row['embedding_bits']}-bit, {row['widths']}, {row['seconds']:.0f} s)", flush=True)
        # Written after every row: a run stopped part-way keeps the rows it measured (marked partial).
        rows.sort(key=lambda r: (BUDGETS_MB.index(r["budget_mb"]), TABLE_ORDER[r["name"]]))
        write_results(results_name, dict(meta, rows=rows, complete=False),
                      markdown(rows, original, meta, complete=False))
    write_results(results_name, dict(meta, rows=rows, complete=True), markdown(rows, original, meta))
    print(markdown(rows, original, meta))


if __name__ == "__main__":
    main()
