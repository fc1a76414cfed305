"""ONNX benchmark: the toolkit's ONNX artifacts against ONNX Runtime's own quantizers, in one run.

Rows, all in ONNX Runtime CPU sessions with the same decode loop (`exporters.onnx.loader`):
- peers: the original model exported to ONNX (fp32), then ONNX Runtime's dynamic int8 and its
  MatMulNBits int4 (symmetric, block 32) quantizers applied to that export (`bench.onnx_peers`);
- the toolkit: `compress --recipe R` with `export: [onnx]` for the original weights, the balanced
  and quantize-only recipes. Quantized artifacts are measured twice: with the fused MatMulNBits
  computing in fp32 (the default; same logits as the torch model) and in int8 (activations
  quantized on the fly: faster, not equal to torch).

Each row: bytes on disk, perplexity (WikiText-2 test, 16 x 512), prefill of 512 tokens (median of
repeats) and greedy decode speed (prompt of 128 tokens, 64 new tokens). Then:
- parity: torch vs ONNX Runtime (fp32 compute) logits and greedy generations for the original, a
  removal-only plan, a mixed-bit plan (balanced) and a sparse-token plan (long-context);
- long prompts: time to first token at 4096 tokens and needle accuracy, the long-context artifact's
  sparse-token prefill graph against its full prefill.

    python -m bench.onnx                 # about 40 min on 2 cores
    python -m bench.onnx --workdir DIR   # keeps the built artifacts in DIR and reuses them next time
    python -m bench.onnx --quick         # fewer windows and cases (a smoke run)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from bench.common import command_line, machine, write_results
from bench.onnx_peers import build_peers, onnx_perplexity, size_on_disk
from compressor.data import default_evaluation_text, embedded_text, evaluation_windows, load_text
from compressor.sources import load_model
from compressor.pipeline import compress
from compressor.process import quiet_transformers
from compressor.recipe import parse_recipe
from exporters.onnx.files import DECODER_FILE, ONNX_DIR, SPARSE_FILE
from exporters.onnx.loader import OnnxDecoder

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
QUICK_EVALUATION = {"text": "embedded", "windows": 1, "seq_len": 128, "compare_original": False,
                    "speed": {"prompt_tokens": 16, "new_tokens": 2, "repeats": 1}}


def recipe_data(name: str) -> dict:
    return yaml.safe_load((RECIPES / f"{name}.yaml").read_text())


def build_artifact(name: str, data: dict, workdir: Path, log) -> Path:
    """`compress` with `export: [onnx]` and a token evaluation (this script measures everything)."""
    out = workdir / name
    if (out / ONNX_DIR / DECODER_FILE).is_file():
        log(f"reusing {out}")
        return out
    data = dict(data, name=name, evaluate=QUICK_EVALUATION, export=["safetensors", "onnx"])
    started = time.perf_counter()
    compress(parse_recipe(data, f"bench {name}"), None, out, force=True, quiet=True, log=lambda m: None)
    log(f"built {name} in {time.perf_counter() - started:.0f} s")
    return out


def speed(decoder: OnnxDecoder, prompt512: np.ndarray, prompt128: np.ndarray, new_tokens: int, repeats: int) -> dict:
    decoder.prefill(prompt128)  # warm-up
    prefill = []
    for _ in range(repeats):
        started = time.perf_counter()
        decoder.prefill(prompt512)
        prefill.append(time.perf_counter() - started)
    decode = []
    for _ in range(repeats):
        state = decoder.prefill(prompt128)
        started = time.perf_counter()
        for _ in range(new_tokens - 1):
            decoder.decode(state.logits.argmax(-1), state)
        decode.append((new_tokens - 1) / (time.perf_counter() - started))
    return {"prefill_512_seconds": statistics.median(prefill), "decode_tokens_per_second": statistics.median(decode),
            "prefill_runs": prefill, "decode_runs": decode}


def measure(name: str, kind: str, decoder: OnnxDecoder, size: int, windows, prompts, args, log, **extra) -> dict:
    started = time.perf_counter()
    row = {"name": name, "kind": kind, "bytes": size, **extra,
           "perplexity": onnx_perplexity(decoder, windows, name, quiet=True)}
    row.update(speed(decoder, prompts[0], prompts[1], args.new_tokens, args.repeats))
    log(f"{name}: {size / 1e6:.1f} MB, perplexity {row['perplexity']:.2f}, prefill "
        f"{row['prefill_512_seconds']:.3f} s, decode {row['decode_tokens_per_second']:.1f} tok/s "
        f"({time.perf_counter() - started:.0f} s)")
    return row


def text_prompts(tokenizer, count: int, tokens: int) -> list[torch.Tensor]:
    ids = torch.tensor(tokenizer(embedded_text()[:400_000], add_special_tokens=False)["input_ids"])
    step = ids.numel() // (count + 1)
    return [ids[i * step: i * step + tokens][None] for i in range(count)]


@torch.no_grad()
def parity(folder: Path, tokenizer, prompts: list[torch.Tensor], new_tokens: int, sparse: bool) -> dict:
    """Max |logit difference| torch vs ONNX Runtime (fp32 compute) on the prompts, and whether greedy
    generations of `new_tokens` (no stop tokens) are identical."""
    import compressor
    from compressor.transforms.sparse_tokens import SparseTokenSettings, sparse_prefill

    torch_art = compressor.load(folder)
    onnx_art = compressor.load(folder, backend="onnxruntime", threads=2)
    exact = None if sparse else copy.deepcopy(torch_art.model).double()
    worst, same = 0.0, 0
    floor = {"torch": 0.0, "onnxruntime": 0.0}  # each against the float64 model: fp32 rounding alone
    for ids in prompts:
        if sparse:
            settings = SparseTokenSettings.from_dict(torch_art.config.sparse_tokens)
            reference = sparse_prefill(torch_art.model, ids, settings).logits
            got = torch.from_numpy(onnx_art.onnx.prefill(ids.numpy(), sparse=True).logits)
        else:
            reference = torch_art.model(ids).logits
            got = torch.from_numpy(onnx_art.onnx.logits(ids.numpy()))
            exact_logits = exact(ids).logits
            floor["torch"] = max(floor["torch"], float((reference.double() - exact_logits).abs().max()))
            floor["onnxruntime"] = max(floor["onnxruntime"], float((got.double() - exact_logits).abs().max()))
        worst = max(worst, float((reference - got).abs().max()))
        a = torch_art.generate_ids(ids, new_tokens, stop_token_ids=[])
        b = onnx_art.generate_ids(ids, new_tokens, stop_token_ids=[])
        same += a == b
    return {"prompts": len(prompts), "prompt_tokens": int(prompts[0].shape[1]), "new_tokens": new_tokens,
            "max_abs_logit_difference": worst, "identical_generations": same,
            "max_abs_difference_from_float64": None if sparse else floor,
            "what": "last-token logits after the sparse prefill" if sparse else "logits at every prompt position"}


def needles(folder: Path, tokenizer, lengths: list[int], depths: int, per_cell: int, log) -> dict:
    from compressor.needles import build_cases, even_depths

    decoder = OnnxDecoder(folder / ONNX_DIR, threads=2)
    haystack = default_evaluation_text()
    cases = build_cases(tokenizer, load_text(haystack), lengths, even_depths(depths), per_cell, 0)
    rows = {"full": [], "sparse": []}
    for case in cases:
        ids = case.input_ids[None].numpy()
        for variant in rows:
            started = time.perf_counter()
            state = decoder.prefill(ids, sparse=variant == "sparse")
            ttft = time.perf_counter() - started
            tokens = [int(state.logits.argmax(-1)[0])]
            for _ in range(11):
                tokens.append(int(decoder.decode(np.array(tokens[-1:]), state).argmax(-1)[0]))
            output = tokenizer.decode(tokens, skip_special_tokens=True)
            rows[variant].append({"length": case.length, "depth": case.depth, "answer": case.answer,
                                  "output": output, "correct": output.strip().startswith(case.answer),
                                  "ttft_seconds": ttft})
            log(f"needle {case.length} tokens depth {case.depth:.2f} {variant}: TTFT {ttft:.2f} s, "
                f"{'correct' if rows[variant][-1]['correct'] else 'wrong: ' + output[:30]!r}")
    summary = {}
    for variant, results in rows.items():
        for length in lengths:
            chosen = [r for r in results if r["length"] == length]
            summary.setdefault(str(length), {})[variant] = {
                "cases": len(chosen), "accuracy": sum(r["correct"] for r in chosen) / len(chosen),
                "median_ttft_seconds": statistics.median(r["ttft_seconds"] for r in chosen)}
    for length, entry in summary.items():
        entry["ttft_speedup"] = entry["full"]["median_ttft_seconds"] / entry["sparse"]["median_ttft_seconds"]
    return {"haystack": Path(haystack).name, "depths": even_depths(depths), "per_cell": per_cell,
            "by_length": summary, "cases": rows}


def markdown(data: dict) -> str:
    rows = data["rows"]
    int4 = next(r for r in rows if r["name"].startswith("ONNX Runtime int4 (MatMulNBitsQuantizer"))
    lines = ["# ONNX export: the toolkit's artifacts against ONNX Runtime's quantizers", "",
             f"Embedded model, ONNX Runtime {data['versions']['onnxruntime']} CPU, {data['threads']} threads, "
             f"{data['machine']['cpu']}. Perplexity: {data['evaluation']['source']}, "
             f"{data['evaluation']['windows']} x {data['evaluation']['seq_len']} tokens. Prefill: 512 tokens, "
             f"median of {data['repeats']}. Decode: prompt of 128 tokens, {data['new_tokens']} new tokens, greedy, "
             f"median of {data['repeats']}. Ratios against the peer int4 row.", "",
             "| variant | MatMulNBits compute | size MB | perplexity | prefill 512 s | decode tok/s "
             "| size ratio | prefill speedup | decode speedup |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r.get('compute', '-')} | {r['bytes'] / 1e6:.1f} | {r['perplexity']:.2f} | "
                     f"{r['prefill_512_seconds']:.3f} | {r['decode_tokens_per_second']:.1f} | "
                     f"{r['bytes'] / int4['bytes']:.2f} | "
                     f"{int4['prefill_512_seconds'] / r['prefill_512_seconds']:.2f}x | "
                     f"{r['decode_tokens_per_second'] / int4['decode_tokens_per_second']:.2f}x |")
    lines += ["", "Parity, torch against ONNX Runtime (fp32 compute):", "",
              "| artifact | plan | max abs logit difference | torch fp32 / ONNX Runtime vs a float64 torch model "
              "| identical greedy generations |", "|---|---|---|---|---|"]
    for name, p in data["parity"].items():
        floor = p.get("max_abs_difference_from_float64")
        floor = f"{floor['torch']:.2e} / {floor['onnxruntime']:.2e}" if floor else "-"
        lines.append(f"| {name} | {p['plan']} | {p['max_abs_logit_difference']:.2e} ({p['what']}, "
                     f"{p['prompts']} prompts of {p['prompt_tokens']} tokens) | {floor} | "
                     f"{p['identical_generations']}/{p['prompts']} ({p['new_tokens']} tokens) |")
    if data.get("needles"):
        n = data["needles"]
        lines += ["", f"Long prompts: the long-context artifact ({n['filter']}), ONNX Runtime, "
                      f"{len(n['depths'])} depths x {n['per_cell']} needles in {n['haystack']}:", "",
                  "| prompt tokens | prefill | needle accuracy | median TTFT s | TTFT speedup |", "|---|---|---|---|---|"]
        for length, entry in n["by_length"].items():
            for variant in ("full", "sparse"):
                e = entry[variant]
                speedup = f"{entry['ttft_speedup']:.2f}x" if variant == "sparse" else "1.00x"
                lines.append(f"| {length} | {variant} | {e['accuracy']:.0%} | {e['median_ttft_seconds']:.2f} | {speedup} |")
    lines += ["", f"Command: `{data['command']}`; total {data['seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--needle-depths", type=int, default=5)
    parser.add_argument("--needle-per-cell", type=int, default=1)
    parser.add_argument("--workdir", help="keep built artifacts here and reuse them (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="2 windows, 1 repeat, short needles")
    args = parser.parse_args(argv)
    quiet_transformers()
    torch.set_num_threads(2)
    started = time.perf_counter()
    log = print
    needle_lengths = [4096]
    if args.quick:
        args.windows, args.repeats, args.needle_depths, needle_lengths = 2, 1, 2, [1536]
    loaded = load_model("embedded", quiet=True)
    tokenizer = loaded.tokenizer
    evaluation = evaluation_windows(tokenizer, default_evaluation_text(), args.windows, 512)
    windows = evaluation.input_ids
    prompts = (windows[0][None].numpy(), windows[min(1, len(windows) - 1)][None, :128].numpy())
    temporary = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench-onnx-")
    workdir = Path(args.workdir or temporary.name)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, path, seconds in build_peers(loaded.model, workdir / "peers"):
        decoder = OnnxDecoder(path.parent, threads=2, graph=path.name)
        rows.append(measure(name, "peer", decoder, size_on_disk(path), windows, prompts, args, log,
                            quantize_seconds=round(seconds, 1)))
    del loaded
    artifacts = {
        "original": ("original weights (no plan)", build_artifact("original", {}, workdir, log)),
        "removal-only": ("balanced's removal, no quantization",
                         build_artifact("removal-only", {"remove": recipe_data("balanced")["remove"]}, workdir, log)),
        "balanced": ("removal + mixed 4/8-bit GPTQ", build_artifact("balanced", recipe_data("balanced"), workdir, log)),
        "quantize-only": ("mixed 4/8-bit GPTQ", build_artifact("quantize-only", recipe_data("quantize-only"), workdir, log)),
        "long-context": ("sparse tokens (promptdistill)",
                         build_artifact("long-context", recipe_data("long-context"), workdir, log)),
    }
    for name in ("original", "balanced", "quantize-only"):
        folder = artifacts[name][1]
        modes = ["fp32"] if name == "original" else ["fp32", "int8"]
        for mode in modes:
            decoder = OnnxDecoder(folder / ONNX_DIR, threads=2, matmul_accuracy=mode)
            rows.append(measure(f"toolkit {name}", "toolkit", decoder, size_on_disk(folder / ONNX_DIR / DECODER_FILE), windows, prompts,
                                args, log, compute=mode))
    parity_results = {}
    short = text_prompts(tokenizer, 5, 128)
    for name, (plan, folder) in artifacts.items():
        if name == "quantize-only":
            continue
        sparse = name == "long-context"
        chosen = text_prompts(tokenizer, 5, 1536 if not args.quick else 1100) if sparse else short
        parity_results[name] = dict(parity(folder, tokenizer, chosen, args.new_tokens, sparse), plan=plan)
        log(f"parity {name}: {parity_results[name]}")
    from compressor.modeling import CompressedConfig

    sparse_config = CompressedConfig.from_pretrained(artifacts["long-context"][1]).sparse_tokens
    needle_record = needles(artifacts["long-context"][1], tokenizer, needle_lengths, args.needle_depths,
                            args.needle_per_cell, log)
    needle_record["filter"] = (f"{sparse_config['method']} at layer {sparse_config['filter_layer']}, keeps "
                               f"{sparse_config['keep_tokens']} tokens")
    import onnxruntime

    command = command_line().replace(str(args.workdir), "WORKDIR") if args.workdir else command_line()
    data = {"command": command, "machine": machine(), "threads": 2, "seconds": time.perf_counter() - started,
            "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
            "evaluation": evaluation.record, "repeats": args.repeats, "new_tokens": args.new_tokens,
            "rows": rows, "parity": parity_results, "needles": needle_record,
            "sparse_tokens": sparse_config, "gpu": None,
            "has_sparse_graph": (artifacts["long-context"][1] / ONNX_DIR / SPARSE_FILE).is_file()}
    name = "onnx_quick" if args.quick else "onnx"
    json_path, md_path = write_results(name, data, markdown(data))
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    if temporary is not None:
        temporary.cleanup()


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
