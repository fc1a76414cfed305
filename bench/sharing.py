"""Cross-layer weight sharing on the embedded model against per-layer truncated SVD at equal parameters.

One run measures, on the same machine and the same evaluation windows (WikiText-2 test, first 16
windows x 512 tokens; calibration: 32 windows x 512 tokens of the embedded text, never the
evaluation text):
- the original fp32 model;
- at 10 %, 20 % and 30 % fewer attention parameters (q/k/v/o) and at 10 % and 20 % fewer parameters
  in all decoder linears: cross-layer sharing with the weight fit and with the activation-aware fit
  (groups by similarity; every group shares), the same with `per_layer_fallback: true` (off by
  default), which lets a group fall back to a basis per layer where that costs less fit error, and
  per-layer truncated SVD, plain and activation-whitened (group size 1 in the same code). Every
  variant gets the same rank allocation (by fit error, the same parameter budget), so the
  comparison is at equal parameters; the achieved counts are in the table;
- perplexity, bytes of model.safetensors, prefill of 512 tokens and greedy decode speed (median of
  repeats, in a fresh process that loads the saved artifact, as `compress eval` does).
It writes bench/results/sharing.{json,md}.

    python -m bench.sharing           # the full run
    python -m bench.sharing --quick   # tiny settings, to check the script itself
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import command_line, machine, write_results
from compressor.analysis.sharing import sharing_analysis
from compressor.data import calibration_windows, default_evaluation_text, evaluation_windows
from compressor.evaluate import parameter_count, perplexity, speed
from compressor.sources import load_model
from compressor.process import quiet_transformers
from compressor.recipe import Calibration, Share
from compressor.stages.sharing import plan_sharing, shared_groups
from compressor.transforms.share import ATTENTION_PROJECTIONS, PROJECTIONS, input_second_moments, share_weights
from exporters.safetensors import write_model
from exporters.shards import weights_bytes

TARGETS = (("attention", 0.1), ("attention", 0.2), ("attention", 0.3), ("linears", 0.1), ("linears", 0.2))
# (label, fit, group size, per-layer fallback): group size 1 is per-layer truncated SVD.
METHODS = (("SVD per layer", "weight", 1, False), ("whitened SVD per layer", "activation", 1, False),
           ("shared, weight fit", "weight", None, False), ("shared, activation fit", "activation", None, False),
           ("shared where it pays, activation fit", "activation", None, True))


def measure(model, tokenizer, eval_windows, prompt, new_tokens: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-share-") as tmp:
        write_model(model, tokenizer, tmp)
        size = weights_bytes(Path(tmp))
        timing = speed(tmp, prompt, new_tokens, repeats)
    return {"bytes": size, "parameters": parameter_count(model), "perplexity": perplexity(model, eval_windows, True),
            "prefill_seconds": timing["prefill_seconds"], "decode_tokens_per_second": timing["decode_tokens_per_second"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings, to check the script")
    parser.add_argument("--group-size", type=int, default=5, help="mean layers per shared group (default 5)")
    args = parser.parse_args()
    quiet_transformers()
    calibration = Calibration(samples=4, seq_len=128) if args.quick else Calibration()
    windows_count, seq_len = (2, 128) if args.quick else (16, 512)
    prompt_tokens, new_tokens, repeats = (64, 8, 1) if args.quick else (512, 64, 3)
    targets = TARGETS[1:2] if args.quick else TARGETS

    loaded = load_model("embedded", quiet=True)
    model, tokenizer = loaded.model, loaded.tokenizer
    text = default_evaluation_text()
    evaluation = evaluation_windows(tokenizer, text, windows_count, seq_len)
    eval_windows = evaluation.input_ids
    prompt = eval_windows[0, :prompt_tokens]
    cal = calibration_windows(tokenizer, calibration.text, calibration.samples, calibration.seq_len,
                              calibration.seed).input_ids
    started = time.perf_counter()
    wanted = {(layer, p) for layer in range(model.config.num_hidden_layers) for p in PROJECTIONS}
    moments = input_second_moments(model, cal, 4, wanted)
    moment_seconds = time.perf_counter() - started

    original = measure(model, tokenizer, eval_windows, prompt, new_tokens, repeats)
    rows = [dict(original, name="original", target=None, reduction=0.0, method="original", fit_seconds=0.0)]
    print(f"original: ppl {original['perplexity']:.2f}", flush=True)
    records = {}  # the analysis does not depend on the reduction: one per scope, fit, group size, fallback
    for scope, reduction in targets:
        projections = list(ATTENTION_PROJECTIONS if scope == "attention" else PROJECTIONS)
        for label, fit, group_size, fallback in METHODS:
            share = Share(projections=projections, reduction=reduction, fit=fit, grouping="similarity",
                          group_size=group_size or args.group_size, per_layer_fallback=fallback)
            t0 = time.perf_counter()
            key = (scope, fit, share.group_size, fallback)
            if key not in records:
                records[key] = sharing_analysis(model, share, calibration, cal, 4, quiet=True, moments=moments)[0]
            record = records[key]
            spec = plan_sharing(share, record)
            shared = share_weights(model, shared_groups({"sharing": spec}), fit, moments, quiet=True)
            fit_seconds = time.perf_counter() - t0
            row = measure(shared, tokenizer, eval_windows, prompt, new_tokens, repeats)
            row.update(name=f"{label} -{reduction:.0%} {scope}", target=scope, reduction=reduction, method=label,
                       fit_seconds=fit_seconds, achieved_reduction=spec["achieved_reduction"],
                       dense_parameters=spec["dense_parameters"], shared_parameters=spec["parameters"],
                       predicted_tensor_bytes=spec["predicted_tensor_bytes"],
                       parameters_in_shared_groups=spec["parameters_in_shared_groups"],
                       groups=[{k: g[k] for k in ("projection", "layers", "rank")} for g in spec["groups"]])
            rows.append(row)
            assert row["bytes"] - spec["predicted_tensor_bytes"] < 100_000, "file size differs from the plan"
            print(f"{row['name']}: ppl {row['perplexity']:.2f}, {row['bytes'] / 1e6:.1f} MB, "
                  f"achieved {spec['achieved_reduction']:.3f}", flush=True)
            del shared

    data = {"benchmark": "sharing", "command": command_line(), "machine": machine(),
            "settings": {"calibration": calibration.model_dump(), "evaluation_text": evaluation.record,
                         "evaluation_windows": windows_count, "seq_len": seq_len, "prompt_tokens": prompt_tokens,
                         "new_tokens": new_tokens, "repeats": repeats, "group_size": args.group_size,
                         "allocate": "error", "rank_multiple": 32, "moment_seconds": moment_seconds},
            "rows": rows}
    write_results("sharing-quick" if args.quick else "sharing", data, markdown(data))
    print(markdown(data))


def markdown(data: dict) -> str:
    rows = data["rows"]
    original = rows[0]
    settings = data["settings"]
    lines = ["# Cross-layer weight sharing vs per-layer truncated SVD (embedded model)", "",
             f"Command: `{data['command']}`. Machine: {data['machine']['cpu']}, {data['machine']['torch_threads']} "
             f"threads. Perplexity: {settings['evaluation_windows']} windows x {settings['seq_len']} tokens of the "
             f"evaluation text. Speed: prompt of {settings['prompt_tokens']} tokens, {settings['new_tokens']} new "
             f"tokens, greedy, median of {settings['repeats']}, fresh process. Shared groups: by similarity, "
             f"{settings['group_size']} layers on average; ranks by fit error (multiples of 32) for every method.", "",
             "| target | method | removed (achieved) | parameters M | in shared groups M | MB | perplexity | "
             f"prefill {settings['prompt_tokens']} s | decode tok/s |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| - | original | - | {original['parameters'] / 1e6:.2f} | - | {original['bytes'] / 1e6:.1f} | "
             f"{original['perplexity']:.2f} | {original['prefill_seconds']:.3f} | "
             f"{original['decode_tokens_per_second']:.1f} |"]
    for row in rows[1:]:
        lines.append(f"| -{row['reduction']:.0%} {row['target']} | {row['method']} | {row['achieved_reduction']:.1%} | "
                     f"{row['parameters'] / 1e6:.2f} | {row['parameters_in_shared_groups'] / 1e6:.2f} | "
                     f"{row['bytes'] / 1e6:.1f} | {row['perplexity']:.2f} | "
                     f"{row['prefill_seconds']:.3f} | {row['decode_tokens_per_second']:.1f} |")
    lines += ["", "Best per-layer baseline against activation-aware sharing, per target:", "",
              "| target | best per-layer SVD ppl | shared, activation fit | lower than per-layer | "
              "shared where it pays | lower than per-layer |", "|---|---|---|---|---|---|"]
    for scope, reduction in sorted({(r["target"], r["reduction"]) for r in rows[1:]}):
        at = {r["method"]: r["perplexity"] for r in rows[1:] if r["target"] == scope and r["reduction"] == reduction}
        baseline = min(v for k, v in at.items() if "per layer" in k)
        pure, hybrid = at["shared, activation fit"], at["shared where it pays, activation fit"]
        lines.append(f"| -{reduction:.0%} {scope} | {baseline:.2f} | {pure:.2f} | {'yes' if pure < baseline else 'no'} | "
                     f"{hybrid:.2f} | {'yes' if hybrid < baseline else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
