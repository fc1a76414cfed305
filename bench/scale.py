"""Compressing real-size models one decoder layer at a time: wall time per stage and per layer, peak
resident memory (and peak device memory on CUDA), the same model at two depths, and a projection.

    python -m bench.scale [--models llama-3.2-1b,llama-3.2-3b] [--half MODELS] [--device cpu] [--samples 4]
                          [--seq-len 256] [--threads N]

Each model is built from its published config (Llama-3.2-1B, Llama-3.2-3B; Llama-3.1-8B with
`--models llama-3.1-8b`) with random bfloat16 weights, written as sharded safetensors first (speed and
memory do not depend on the weights' values), once at full depth and once with half the layers. Each
is compressed in a fresh process with `weights: disk` (the decoder layers read from the shards one
at a time): similarity removal of 2 attention units, GPTQ 4-bit (group 128, symmetric, every linear),
the embedding kept, then perplexity and a short speed probe. The peak resident memory is the
compressing process's own high-water mark (the speed probe is a process of its own and reports its
own). Writes bench/results/scale.json and .md; the 8B/70B rows are a projection from the measured
per-layer figures, labelled as such.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import command_line, machine, write_results
from compressor.execution.offload import LazyTensor

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
# The published configs (hidden sizes, depths, heads, vocabulary, RoPE, tying).
CONFIGS = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                         rope_scaling=dict(LLAMA3_ROPE, factor=8.0)),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                          rope_scaling=dict(LLAMA3_ROPE, factor=8.0)),
}
COMMON = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, rms_norm_eps=1e-5,
              rope_theta=500000.0, max_position_embeddings=131072, hidden_act="silu", attention_bias=False,
              mlp_bias=False, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
SHARD_BYTES = 2_000_000_000
GIB = 2**30


@dataclass(frozen=True)
class RandomTensor(LazyTensor):
    """A bfloat16 tensor of normal values (or ones, for a norm), made when the shard writer reaches it."""

    shape: tuple[int, ...]
    seed: int
    ones: bool = False
    dtype: torch.dtype = torch.bfloat16

    def load(self) -> torch.Tensor:
        if self.ones:
            return torch.ones(self.shape, dtype=self.dtype)
        generator = torch.Generator().manual_seed(self.seed)
        return (torch.randn(self.shape, generator=generator) * 0.02).to(self.dtype)


def layer_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    h, i = config["hidden_size"], config["intermediate_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    return {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, q), "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
            "mlp.down_proj.weight": (h, i)}


def layer_parameters(config: dict) -> int:
    return sum(math.prod(s) for s in layer_shapes(config).values())


def build_folder(name: str, layers: int, folder: Path) -> dict:
    """A random-weight model folder of this config at `layers` depth; returns the config."""
    from exporters.shards import save_shards
    from compressor.sources import _embedded_cache, load_model

    config = dict(COMMON, **dict(CONFIGS[name], num_hidden_layers=layers))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    cache = _embedded_cache()
    if not (cache / "tokenizer.json").is_file():
        load_model("embedded", quiet=True)  # converts the embedded model once (its tokenizer is used here)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(cache / file, folder / file)
    state, seed = {"model.embed_tokens.weight": RandomTensor((config["vocab_size"], config["hidden_size"]), 0)}, 1
    for layer in range(layers):
        for short, shape in layer_shapes(config).items():
            state[f"model.layers.{layer}.{short}"] = RandomTensor(shape, seed, ones=short.endswith("layernorm.weight"))
            seed += 1
    state["model.norm.weight"] = RandomTensor((config["hidden_size"],), seed, ones=True)
    if not config["tie_word_embeddings"]:
        state["lm_head.weight"] = RandomTensor((config["vocab_size"], config["hidden_size"]), seed + 1)
    save_shards(state, folder, SHARD_BYTES, metadata={"format": "pt"})
    return config


def recipe_text(folder: Path, args) -> str:
    return json.dumps({
        "name": "scale", "model": str(folder), "device": args.device, "weights": "disk",
        "calibration": {"samples": args.samples, "seq_len": args.seq_len},
        "remove": {"method": "similarity", "attention": 2, "protect": {"first": 1, "last": 1}},
        "quantize": {"method": "gptq", "bits": [4], "group_size": 128, "budget": {"avg_bits": 4.5},
                     "allocate": "uniform", "embeddings": "keep"},
        "evaluate": {"windows": args.eval_windows, "seq_len": args.seq_len,
                     "speed": {"prompt_tokens": 16, "new_tokens": 4, "repeats": 1}, "compare_original": False},
        "max_shard_bytes": SHARD_BYTES,
    })


CHILD = """
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))
from compressor.pipeline import compress
from compressor.process import peak_rss_mb
started = time.perf_counter()
out = compress(sys.argv[1], out=sys.argv[2], force=True, quiet=True, log=lambda m: None)
print(json.dumps({"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}))
"""


def measure(name: str, layers: int, work: Path, args) -> dict:
    folder = work / f"{name}-{layers}"
    built = time.perf_counter()
    config = build_folder(name, layers, folder)
    build_seconds = time.perf_counter() - built
    recipe = work / f"{name}-{layers}.yaml"
    recipe.write_text(recipe_text(folder, args))  # JSON is YAML
    out = work / f"{name}-{layers}-out"
    done = subprocess.run([sys.executable, "-c", CHILD, str(recipe), str(out), str(args.threads)],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} at {layers} layers: compress failed: {done.stderr.strip()[-2000:]}")
    run = json.loads(done.stdout.strip().splitlines()[-1])
    analysis = json.loads((out / "analysis.json").read_text())
    report = json.loads((out / "report.json").read_text())
    stages = analysis["cost"]["stage_seconds"]
    metrics = report["compressed"] if "compressed" in report else report
    row = {
        "model": name, "layers": layers, "parameters": analysis["model"]["parameters"],
        "source_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
        "build_seconds": build_seconds, "seconds": run["seconds"], "peak_rss_mb": run["peak_rss_mb"],
        "stage_seconds": stages, "evaluation_seconds": metrics.get("perplexity_seconds"),
        "per_layer_seconds": {key: value / layers for key, value in stages.items()},
        "peak_device_mb": analysis["cost"].get("peak_device_mb"),
        "device": analysis["cost"]["device"], "artifact_bytes": metrics.get("weights_bytes"),
        "speed_probe_peak_rss_mb": (metrics.get("speed") or {}).get("peak_rss_mb"),
        "layer_parameters": layer_parameters(config), "hidden_size": config["hidden_size"],
    }
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    return row


def projection(measured: dict, target: str, args) -> dict:
    """Time and memory of `target` from a measured row: per-layer time scaled by the parameters per
    layer (the work of every stage grows with them for the same calibration tokens) times the depth;
    memory as one bfloat16 layer, the largest Hessian, two sets of hidden states and the resident
    embedding and head on an 80 GB GPU. A projection, not a measurement."""
    config = dict(COMMON, **CONFIGS[target])
    ratio = layer_parameters(config) / measured["layer_parameters"]
    per_layer = {key: value * ratio for key, value in measured["per_layer_seconds"].items()}
    tokens = args.gpu_samples * args.gpu_seq_len
    vocab_rows = config["vocab_size"] * config["hidden_size"] * (1 if config["tie_word_embeddings"] else 2)
    device_bytes = (layer_parameters(config) * 2 + config["intermediate_size"] ** 2 * 4
                    + 2 * tokens * config["hidden_size"] * 2 + vocab_rows * 2
                    + tokens * config["intermediate_size"] * 2 * 3)
    return {"model": target, "layers": config["num_hidden_layers"], "from": f"{measured['model']} at "
            f"{measured['layers']} layers on {measured['device']}",
            "cpu_hours_projected": sum(per_layer.values()) * config["num_hidden_layers"] / 3600,
            "gpu_memory_gb_projected": device_bytes / 1e9, "gpu_calibration": f"{args.gpu_samples} x {args.gpu_seq_len}",
            "fits_80gb": device_bytes < 80e9}


def markdown(data: dict) -> str:
    lines = ["# Compressing one decoder layer at a time", "",
             f"Command: `{data['command']}`. Machine: {data['machine']['cpu']}, {data['machine']['torch_threads']} threads. "
             f"Calibration {data['calibration']}; removal of 2 attention units by similarity, GPTQ 4-bit g128 on every "
             "linear, embedding kept, perplexity on the evaluation windows; `weights: disk`.", "",
             "| model | layers | parameters | source GB (bf16) | peak RSS MB | peak device MB | layer report s | "
             "removal s | GPTQ s | GPTQ s/layer | evaluation s | total s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        stages = row["stage_seconds"]
        device = f"{row['peak_device_mb']:.0f}" if row.get("peak_device_mb") else "-"
        lines.append(f"| {row['model']} | {row['layers']} | {row['parameters'] / 1e9:.2f} B | "
                     f"{row['source_bytes'] / 1e9:.2f} | {row['peak_rss_mb']:.0f} | {device} | "
                     f"{stages.get('layer_report', 0):.0f} | {stages.get('removal.apply', 0):.1f} | "
                     f"{stages.get('quantization.apply', 0):.0f} | "
                     f"{row['per_layer_seconds'].get('quantization.apply', 0):.1f} | "
                     f"{row['evaluation_seconds'] or 0:.0f} | {row['seconds']:.0f} |")
    if data.get("depth"):
        lines += ["", "Same model at two depths:", "", "| model | layers | peak RSS ratio (half / full) | "
                  "time ratio (half / full) |", "|---|---|---|---|"]
        for item in data["depth"]:
            lines.append(f"| {item['model']} | {item['layers']} | {item['rss_ratio']:.3f} | {item['time_ratio']:.3f} |")
    if data.get("projection"):
        lines += ["", "**Projection** (not measured): per-layer times scaled by parameters per layer; GPU memory as "
                  "one bfloat16 layer + largest Hessian + two sets of hidden states + resident embedding/head.", "",
                  "| model | layers | from | CPU hours (2 cores, projected) | GPU memory GB (projected) | "
                  "calibration | fits 80 GB |", "|---|---|---|---|---|---|---|"]
        for item in data["projection"]:
            lines.append(f"| {item['model']} | {item['layers']} | {item['from']} | {item['cpu_hours_projected']:.1f} | "
                         f"{item['gpu_memory_gb_projected']:.1f} | {item['gpu_calibration']} | "
                         f"{'yes' if item['fits_80gb'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama-3.2-1b,llama-3.2-3b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=4, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration and evaluation window")
    parser.add_argument("--eval-windows", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--half", help="models also run at half depth (default: every one of --models; '' for none)")
    parser.add_argument("--gpu-samples", type=int, default=128, help="calibration windows assumed by the projection")
    parser.add_argument("--gpu-seq-len", type=int, default=2048)
    parser.add_argument("--work", help="folder for the models and artifacts (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the models and artifacts")
    args = parser.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"--models: {unknown[0]!r} is not known; allowed: {', '.join(CONFIGS)}")
    halves = names if args.half is None else [n for n in args.half.split(",") if n]
    work = Path(args.work or tempfile.mkdtemp(prefix="compressor-scale-"))
    rows, depth = [], []
    for name in names:
        full = CONFIGS[name]["num_hidden_layers"]
        print(f"{name}: {full} layers", flush=True)
        rows.append(measure(name, full, work, args))
        if name in halves:
            print(f"{name}: {full // 2} layers", flush=True)
            rows.append(measure(name, full // 2, work, args))
            half, whole = rows[-1], rows[-2]
            depth.append({"model": name, "layers": f"{half['layers']} / {whole['layers']}",
                          "rss_ratio": half["peak_rss_mb"] / whole["peak_rss_mb"],
                          "time_ratio": half["seconds"] / whole["seconds"]})
    largest = max((r for r in rows if r["layers"] == CONFIGS[r["model"]]["num_hidden_layers"]),
                  key=lambda r: r["parameters"])
    data = {"command": command_line(), "machine": machine(), "calibration": f"{args.samples} x {args.seq_len}",
            "rows": rows, "depth": depth,
            "projection": [projection(largest, target, args) for target in ("llama-3.1-8b", "llama-3.1-70b")]}
    json_path, md_path = write_results("scale", data, markdown(data))
    print(markdown(data))
    print(f"wrote {json_path} and {md_path}")
    if not args.work and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
