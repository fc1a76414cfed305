"""Sub-layer removal on the embedded model: quality and speed of similarity / iterative / finercut.

For each method, removes 2, 4 and 8 attention units and 4 units of either kind (first and last
layer protected), then measures WikiText-2 test perplexity (first 16 windows x 512 tokens) and
prefill / decode speed against the original, all in one run. Calibration is the embedded text,
never the evaluation text. Also records the analysis pass's cost for 64 x 512 calibration tokens.

    python -m bench.removal            # writes bench/results/removal.json and removal.md
    python -m bench.removal --quick    # tiny settings, to check the script itself
"""

from __future__ import annotations

import argparse
import tempfile
import time

from bench.common import command_line, machine, write_results
from compressor.data import calibration_windows, default_evaluation_text
from compressor.evaluate import evaluate_model
from compressor.sources import load_model
from compressor.pipeline import analyze, make_plan
from compressor.process import quiet_transformers
from compressor.recipe import parse_recipe
from compressor.report import markdown_table
from compressor.stages.removal import greedy_search
from compressor.transforms.prune import remove_units
from exporters.safetensors import write_model

BUDGETS = ({"attention": 2}, {"attention": 4}, {"attention": 8}, {"any": 4})
METHODS = ("similarity", "iterative", "finercut")


def saved_and_evaluated(model, tokenizer, settings, eval_text: str) -> dict:
    """Size and speed are measured on the saved model, as for an artifact."""
    with tempfile.TemporaryDirectory(prefix="bench-removal-") as tmp:
        write_model(model, None, tmp)
        return evaluate_model(model, tokenizer, settings, eval_text, tmp, quiet=True)


def budget_name(budget: dict) -> str:
    kind, count = next(iter(budget.items()))
    return f"{count} {'attention' if kind == 'attention' else 'any-kind'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings to smoke-test the script")
    args = parser.parse_args()
    quiet_transformers()
    calib = {"samples": 4, "seq_len": 128} if args.quick else {"samples": 64, "seq_len": 512}
    evaluation = ({"windows": 2, "seq_len": 128, "speed": {"prompt_tokens": 64, "new_tokens": 8, "repeats": 1}}
                  if args.quick else {"windows": 16, "seq_len": 512,
                                      "speed": {"prompt_tokens": 512, "new_tokens": 32, "repeats": 5}})
    search = {"search_samples": 2, "search_seq_len": 64} if args.quick else {"search_samples": 8, "search_seq_len": 128}
    base = {"name": "bench", "calibration": dict(calib, text="embedded", seed=0), "evaluate": evaluation}
    eval_text = default_evaluation_text()
    if eval_text == "embedded" and not args.quick:
        raise SystemExit("bench/removal.py: WikiText-2 test not found; put shared/data/wikitext-2-raw/wiki.test.raw "
                         "beside the project or set COMPRESSOR_EVAL_TEXT to that file")

    loaded = load_model("embedded", quiet=True)
    recipe = parse_recipe(base)
    analysis = analyze(loaded, recipe)
    cost = dict(analysis["cost"], samples=calib["samples"], seq_len=calib["seq_len"])
    print(f"analysis pass: {cost['seconds']:.1f} s, peak resident memory {cost['peak_rss_mb']:.0f} MB")

    original = saved_and_evaluated(loaded.model, loaded.tokenizer, recipe.evaluate, eval_text)
    print(f"original: perplexity {original['perplexity']:.2f}")
    rows, results = [("original", original)], []
    c = recipe.calibration
    search_windows = calibration_windows(loaded.tokenizer, c.text, c.samples, c.seq_len, c.seed).input_ids[
        : search["search_samples"], : search["search_seq_len"]]
    searches = {}  # (method, kind) -> search; one greedy search for the largest budget serves smaller ones
    for method in METHODS:
        for budget in BUDGETS:
            removal = dict(budget, method=method, protect={"first": 1, "last": 1}, **search)
            variant = parse_recipe(dict(base, remove=removal))
            search_seconds = 0.0
            if method != "similarity":
                kind = next(iter(budget))
                if (method, kind) not in searches:
                    largest = {"attention": 8} if kind == "attention" else budget
                    wide = parse_recipe(dict(base, remove=removal | largest))
                    started = time.perf_counter()
                    found = greedy_search(loaded.model, analysis, wide.remove, search_windows,
                                          recipe.analysis.batch_size, quiet=False)
                    found["seconds"] = time.perf_counter() - started
                    analysis["removal_searches"].append(found)
                    searches[(method, kind)] = found
                search_seconds = searches[(method, kind)]["seconds"]
            plan = make_plan(variant, analysis)
            model = remove_units(loaded.model, plan)
            metrics = saved_and_evaluated(model, loaded.tokenizer, variant.evaluate, eval_text)
            name = f"{method}, {budget_name(budget)}"
            removed = [f"{u['layer']}.{u['unit']}" for u in plan["removal"]["removed"]]
            print(f"{name}: perplexity {metrics['perplexity']:.2f}, removed {removed}")
            rows.append((name, metrics))
            results.append({"method": method, "budget": budget, "removed": removed, "metrics": metrics,
                            "search_seconds": search_seconds})
            del model

    finercut_ok = all(
        next(r for r in results if r["method"] == "finercut" and r["budget"] == b)["metrics"]["perplexity"]
        <= next(r for r in results if r["method"] == "similarity" and r["budget"] == b)["metrics"]["perplexity"]
        for b in BUDGETS)
    data = {"command": command_line(), "machine": machine(), "evaluation_text": original["perplexity_text"],
            "calibration": analysis["calibration"], "analysis_cost": cost, "original": original,
            "variants": results, "finercut_at_least_as_good_as_similarity": finercut_ok,
            "searches": [{k: s[k] for k in ("method", "quotas", "seconds")} for s in analysis["removal_searches"]]}
    m = data["machine"]
    text = [
        "# Sub-layer removal on the embedded model (SmolLM2-135M-Instruct)", "",
        f"Command: `{data['command']}`  ",
        f"Machine: {m['cpu']}, {m['torch_threads']} torch threads, torch {m['torch']}.  ",
        f"Perplexity: {original['perplexity_text']['source']}, first {original['perplexity_text']['windows']} windows x "
        f"{original['perplexity_text']['seq_len']} tokens. Calibration: {calib['samples']} x {calib['seq_len']} tokens "
        f"of the embedded text (seed 0); greedy searches score candidates on {search['search_samples']} x "
        f"{search['search_seq_len']} of them. Speed: prefill of {evaluation['speed']['prompt_tokens']} tokens and "
        f"{evaluation['speed']['new_tokens']} greedy new tokens, median of {evaluation['speed']['repeats']}. "
        "First and last layer protected.", "",
        markdown_table(rows, original), "",
        f"Analysis pass ({cost['samples']} x {cost['seq_len']} tokens): {cost['seconds']:.1f} s, "
        f"peak resident memory of the process {cost['peak_rss_mb']:.0f} MB "
        f"({cost['peak_rss_before_mb']:.0f} MB before the pass, model loaded).  ",
        "Greedy searches: " + ", ".join(f"{s['method']} {({k: v for k, v in s['quotas'].items() if v})} "
                                        f"{s['seconds']:.0f} s" for s in data["searches"]) + ".  ",
        f"finercut at least as good as similarity at every budget: {'yes' if finercut_ok else 'NO'}.", "",
        "Removed units per variant: " + "; ".join(f"{r['method']} {budget_name(r['budget'])}: {', '.join(r['removed'])}"
                                                  for r in results), "",
    ]
    json_path, md_path = write_results("removal" + ("-quick" if args.quick else ""), data, "\n".join(text))
    print("\n".join(text))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
