"""Resident memory and speed of `compressor.load` (quantized weights kept as codes, the default)
against `packed=False` (float32 copies of them) and the original model.

    python -m bench.packed_memory [--artifact out/balanced] [--repeats 3]

Each variant runs in a fresh process: load, then greedy generation of 32 tokens after each of 3
prompts (ids compared across the variants of the artifact), then a 512-token prompt timed as prefill
and 32 decoded tokens; peak resident memory is the process's high-water mark. The original is the
embedded model written as an artifact (float32). Writes bench/results/packed_memory.json and .md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,")
CHILD = """
import json, sys, time, statistics
import torch
torch.set_num_threads(2)
import compressor
from compressor.data import embedded_text
from compressor.evaluate import timed_generation
from compressor.process import peak_rss_mb
folder, packed, repeats = sys.argv[1], sys.argv[2] == "packed", int(sys.argv[3])
started = time.perf_counter()
art = compressor.load(folder, packed=packed)
load_seconds = time.perf_counter() - started
ids = [art.generate_ids(torch.tensor([art.tokenizer(p, add_special_tokens=False)["input_ids"]]), max_new_tokens=32,
                        stop_token_ids=[]) for p in json.loads(sys.argv[4])]
prompt = torch.tensor(art.tokenizer(embedded_text()[:20000], add_special_tokens=False)["input_ids"][:512])
timed_generation(art.model, prompt[:16], 2)
runs = [timed_generation(art.model, prompt, 32) for _ in range(repeats)]
print(json.dumps({"load_seconds": load_seconds, "peak_rss_mb": peak_rss_mb(), "greedy_ids": ids,
                  "prefill_seconds": statistics.median(r[0] for r in runs),
                  "decode_tokens_per_second": statistics.median(r[1] for r in runs)}))
"""


def run(folder: Path, packed: bool, repeats: int) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(folder), "packed" if packed else "dense", str(repeats),
                           json.dumps(PROMPTS)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{folder.name}: the measuring process failed: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", default="out/balanced", help="a quantized artifact (default: make demo's)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import compressor  # noqa: F401
    from compressor.manifest import write_manifest
    from compressor.process import quiet_transformers
    from compressor.sources import load_model
    from exporters.safetensors import write_model
    from exporters.shards import weights_bytes
    from bench.common import command_line, machine, write_results

    quiet_transformers()
    artifact = Path(args.artifact)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="packed-memory-") as tmp:
        original = Path(tmp) / "original"
        loaded = load_model("embedded", quiet=True)
        write_model(loaded.model, loaded.tokenizer, original)
        write_manifest(original)
        del loaded
        rows["original fp32"] = dict(run(original, False, args.repeats), weights_mb=weights_bytes(original) / 1e6)
        for packed in (True, False):
            name = f"{artifact.name}, {'packed' if packed else 'packed=False'}"
            rows[name] = dict(run(artifact, packed, args.repeats), weights_mb=weights_bytes(artifact) / 1e6)
    names = list(rows)
    same = rows[names[1]]["greedy_ids"] == rows[names[2]]["greedy_ids"]
    data = {"command": command_line(), "machine": machine(), "artifact": artifact.name, "prompts": list(PROMPTS),
            "greedy_ids_equal_packed_and_not": same, "variants": rows}
    lines = ["# Packed serving: resident memory of compressor.load", "",
             f"Command: `{data['command']}`. Fresh process per row, 2 threads; prefill of 512 tokens and 32 decoded "
             f"tokens, median of {args.repeats}. Greedy ids of 3 prompts x 32 tokens equal packed and not: {same}.", "",
             "| variant | weights MB | peak RSS MB | load s | prefill s | decode tok/s |", "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['weights_mb']:.1f} | {row['peak_rss_mb']:.0f} | {row['load_seconds']:.2f} | "
                     f"{row['prefill_seconds']:.3f} | {row['decode_tokens_per_second']:.1f} |")
    markdown = "\n".join(lines) + "\n"
    paths = write_results("packed_memory", data, markdown)
    print(markdown)
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
