"""ONNX export of a model above protobuf's 2 GB limit: external data, validation, loading.

    python -m bench.onnx_large [--model llama-3.2-1b] [--layers 8] [--threads N] [--work DIR] [--keep]

A random-weight model of a published config (bench.scale) at a reduced depth, large enough that
its float32 artifact passes 2 GB, is compressed with nothing removed or quantized and
`export: [onnx]` (its layers read from disk). The export's own check (ONNX Runtime logits against
torch's on a probe) must pass; then onnx's checker runs on the saved graph by path (the only way
it accepts a model above 2 GB), and the graph is loaded through `compressor.load(...,
backend="onnxruntime")` and asked for greedy tokens, compared with the torch backend's. Writes
bench/results/onnx_large.json and .md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import command_line, machine, write_results
from bench.scale import CONFIGS, build_folder

CHILD = """
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))
from compressor.pipeline import compress
from compressor.process import peak_rss_mb
started = time.perf_counter()
compress(sys.argv[1], out=sys.argv[2], force=True, quiet=True, log=lambda m: None)
print(json.dumps({"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}))
"""

CHECK = """
import json, sys, time
import onnx, torch
torch.set_num_threads(int(sys.argv[2]))
import compressor
from compressor.process import peak_rss_mb
folder = sys.argv[1]
started = time.perf_counter()
onnx.checker.check_model(folder + "/onnx/model.onnx", full_check=False)
checker_seconds = time.perf_counter() - started
prompt = torch.tensor([[1, 450, 7483, 310, 3444, 338]])
onnx_art = compressor.load(folder, backend="onnxruntime", verify=False)
onnx_ids = onnx_art.generate_ids(prompt, max_new_tokens=8, stop_token_ids=[])
del onnx_art
torch_ids = compressor.load(folder, verify=False).generate_ids(prompt, max_new_tokens=8, stop_token_ids=[])
print(json.dumps({"checker_seconds": checker_seconds, "onnx_ids": onnx_ids, "torch_ids": torch_ids,
                  "peak_rss_mb": peak_rss_mb()}))
"""


def run_child(code: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"failed: {done.stderr.strip()[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.2-1b", choices=sorted(CONFIGS))
    parser.add_argument("--layers", type=int, default=8, help="depth (8: a float32 artifact of about 2.5 GB)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--work", help="folder for the model and artifact (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the model and artifact")
    args = parser.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="onnx-large-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        source = work / "source"
        build_folder(args.model, args.layers, source)
        recipe = work / "recipe.yaml"
        recipe.write_text(json.dumps({
            "name": "onnx-large", "model": str(source), "weights": "disk", "export": ["safetensors", "onnx"],
            "calibration": {"samples": 1, "seq_len": 16},
            "evaluate": {"windows": 1, "seq_len": 32, "compare_original": False,
                         "speed": {"prompt_tokens": 8, "new_tokens": 2, "repeats": 1}}}))
        out = work / "out"
        compressed = run_child(CHILD, str(recipe), str(out), str(args.threads))
        export = json.loads((out / "onnx" / "export.json").read_text())
        checked = run_child(CHECK, str(out), str(args.threads))
        onnx_dir = out / "onnx"
        data = {
            "command": command_line(), "machine": machine(),
            "model": args.model, "layers": args.layers,
            "artifact_bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")),
            "graph_bytes": (onnx_dir / "model.onnx").stat().st_size,
            "external_data_bytes": (onnx_dir / "weights.data").stat().st_size,
            "compress_seconds": compressed["seconds"], "compress_peak_rss_mb": compressed["peak_rss_mb"],
            "export_check": export["validation"],
            "checker_seconds": checked["checker_seconds"], "check_peak_rss_mb": checked["peak_rss_mb"],
            "greedy_equal": checked["onnx_ids"] == checked["torch_ids"],
            "onnx_ids": checked["onnx_ids"], "torch_ids": checked["torch_ids"],
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    lines = ["# ONNX export above 2 GB", "",
             f"Command: `{data['command']}`. {args.model} config at {args.layers} layers, random weights; the artifact holds float32 layers and the bfloat16 embedding "
             "(nothing removed or quantized; the ONNX graph widens the embedding to float32), `export: [safetensors, onnx]`, layers read from disk. The export itself loads the artifact whole.", "",
             "| artifact GB | model.onnx MB | weights.data GB | compress s | compress peak RSS MB | "
             "onnx checker s | ORT greedy = torch greedy |", "|---|---|---|---|---|---|---|",
             f"| {data['artifact_bytes'] / 1e9:.2f} | {data['graph_bytes'] / 1e6:.1f} | "
             f"{data['external_data_bytes'] / 1e9:.2f} | {data['compress_seconds']:.0f} | "
             f"{data['compress_peak_rss_mb']:.0f} | {data['checker_seconds']:.1f} | {data['greedy_equal']} |", "",
             f"The export's own check (ONNX Runtime against torch on a probe): `{json.dumps(data['export_check'])[:400]}`"]
    write_results("onnx_large", data, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if data["greedy_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
