"""Sparse-token attention on the embedded model: needle retrieval and time to first token at 2k/4k/8k.

One run, on the same machine and the same cases:
- the filter layer is chosen by the retrieval probe of `recipes/long-context.yaml` (needles planted
  in the embedded calibration text, never the evaluation text);
- needle-in-a-haystack cases (haystack: the evaluation text, WikiText-2 test when present; 7-digit
  numbers drawn from a seed; evenly spread depths) at each length, answered greedily by full
  attention, `gemfilter` and `promptdistill` at that layer;
- time to first token is the prefill (the filter included) of each case; the table gives medians
  and the ratio to full attention;
- for contrast, `promptdistill` at a fixed earlier layer (`--early-layer`), where the filter would
  be cheaper.
It writes bench/results/sparse_tokens.{json,md} and sparse_tokens.png (accuracy per length x depth).

    python -m bench.sparse_tokens            # the full run (51.5 min on 2 cores in the recorded run)
    python -m bench.sparse_tokens --quick    # short prompts, to check the script itself
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from bench.common import RESULTS, command_line, machine, write_results
from compressor.analysis.filter_probe import filter_layer_probe
from compressor.data import default_evaluation_text, load_text
from compressor.evaluate import needle_grid_png, needle_suite, needle_summary
from compressor.sources import load_model
from compressor.needles import build_cases, even_depths
from compressor.process import quiet_transformers
from compressor.recipe import parse_recipe
from compressor.stages.sparse_tokens import choose_filter_layer
from compressor.transforms.sparse_tokens import METHODS, SparseTokenSettings

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "long-context.yaml"


def markdown(data: dict) -> str:
    lines = ["# Sparse-token attention: needle retrieval and time to first token", "",
             f"Embedded model ({data['model']['num_hidden_layers']} layers), filter layer {data['filter_layer']} "
             f"({data['filter_reason']}), keep {data['settings']['keep_tokens']} tokens "
             f"(first {data['settings']['keep_first']}, last {data['settings']['keep_last']}, pool "
             f"{data['settings']['pool_width']}). Haystack: {data['haystack']}; {data['cases_per_length']} cases per "
             f"length ({data['depths']} depths x {data['per_cell']}), greedy, seed {data['seed']}. "
             f"{data['machine']['torch_threads']} threads, {data['machine']['cpu']}.", "",
             "| prompt tokens | variant | needle accuracy | median TTFT s | TTFT speedup | accuracy - full (points) |",
             "|---|---|---|---|---|---|"]
    for length, rows in data["by_length"].items():
        full = rows["full"]
        for variant, row in rows.items():
            speedup = full["median_ttft_seconds"] / row["median_ttft_seconds"]
            delta = 100 * (row["accuracy"] - full["accuracy"])
            lines.append(f"| {length} | {variant} | {row['accuracy']:.0%} ({round(row['accuracy'] * row['cases'])}/"
                         f"{row['cases']}) | {row['median_ttft_seconds']:.2f} | {speedup:.2f}x | {delta:+.0f} |")
    probe = data["probe"]
    lines += ["", f"Filter-layer probe ({probe['cases']} needles in {probe['tokens']}-token prompts of calibration "
                  "text): share of needles whose number the layer's selection keeps whole, by layer:", "",
              "| layer | " + " | ".join(str(r["layer"]) for r in probe["layers"]) + " |",
              "|---|" + "---|" * len(probe["layers"]),
              "| recall | " + " | ".join(f"{r['recall']:.2f}" for r in probe["layers"]) + " |", "",
              "GPU: not measured in this run (no GPU on the machine that produced it).", "",
              f"Command: `{data['command']}`; total {data['seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,4096,8192")
    parser.add_argument("--depths", type=int, default=5)
    parser.add_argument("--per-cell", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--filter-layer", type=int, help="skip the probe and use this layer")
    parser.add_argument("--early-layer", type=int, default=9,
                        help="also run promptdistill at this earlier layer, to show what speed costs in accuracy "
                             "there (negative: skip)")
    parser.add_argument("--quick", action="store_true", help="short prompts and few cases")
    args = parser.parse_args(argv)
    quiet_transformers()
    started = time.perf_counter()
    recipe = parse_recipe(yaml.safe_load(RECIPE.read_text()), str(RECIPE.name))
    sparse = recipe.sparse_tokens
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.quick:
        lengths, args.depths, args.per_cell = [768, 1024], 2, 1
        sparse = sparse.model_copy(update={"keep_tokens": 256, "probe": sparse.probe.model_copy(
            update={"samples": 2, "tokens": 768})})
    loaded = load_model(recipe.model, quiet=True)
    model, tokenizer = loaded.model, loaded.tokenizer
    if args.filter_layer is None:
        probe = filter_layer_probe(model, tokenizer, sparse, recipe.calibration.text)
        layer, reason = choose_filter_layer(probe, sparse.probe.min_recall)
    else:
        probe, layer, reason = {"cases": 0, "tokens": 0, "layers": []}, args.filter_layer, "fixed on the command line"
    print(f"filter layer {layer}: {reason}")
    haystack = default_evaluation_text()
    cases = build_cases(tokenizer, load_text(haystack), lengths, even_depths(args.depths), args.per_cell, args.seed)
    variants = {"full": None}
    for method in METHODS:
        variants[method] = SparseTokenSettings(method, layer, sparse.keep_tokens, sparse.keep_first,
                                               sparse.keep_last, sparse.pool_width)
    if 0 <= args.early_layer < layer:
        variants[f"promptdistill@{args.early_layer}"] = SparseTokenSettings(
            "promptdistill", args.early_layer, sparse.keep_tokens, sparse.keep_first, sparse.keep_last,
            sparse.pool_width)
    results = {}
    for name, settings in variants.items():
        results[name] = needle_suite(model, tokenizer, cases, settings, label=name)
    summaries = {name: needle_summary(rows) for name, rows in results.items()}
    by_length = {str(n): {name: summaries[name][str(n)] for name in variants} for n in lengths}
    data = {"command": command_line(), "machine": machine(), "seconds": time.perf_counter() - started,
            "model": {"source": recipe.model, "num_hidden_layers": model.config.num_hidden_layers},
            "filter_layer": layer, "filter_reason": reason, "probe": probe,
            "settings": {k: getattr(sparse, k) for k in ("keep_tokens", "keep_first", "keep_last", "pool_width")},
            "haystack": Path(haystack).name, "depths": args.depths, "per_cell": args.per_cell, "seed": args.seed,
            "cases_per_length": args.depths * args.per_cell, "by_length": by_length, "cases": results,
            "gpu": None}
    name = "sparse_tokens_quick" if args.quick else "sparse_tokens"
    json_path, md_path = write_results(name, data, markdown(data))
    needle_grid_png(summaries, RESULTS / f"{name}.png")
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
