"""What the integrity check costs at load: `compressor.load(folder)` (manifest of SHA-256 checked)
against `compressor.load(folder, verify=False)` on artifacts of the embedded model, and the hashing
alone (`compress verify`'s first step), in seconds and seconds per GB of files.

    python -m bench.verify [--repeats N]     # default 5; the recorded run used 9

Artifacts: the original model unchanged (fp32, one 538 MB file) and a 4/8-bit RTN model with its
ONNX export (safetensors plus onnx/weights.data). Each variant is timed in turn in one run, the
files already in the page cache (as after `compress` writes them); medians over repeats, the variants interleaved after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import command_line, machine, write_results


def _build(root: Path) -> dict[str, Path]:
    import compressor  # noqa: F401  (registers the model class)
    from compressor.manifest import write_manifest
    from compressor.sources import load_model
    from compressor.process import quiet_transformers
    from compressor.stages import quantization
    from compressor.stages.run import Run
    from exporters.onnx.export import export_artifact
    from exporters.safetensors import write_model

    quiet_transformers()
    loaded = load_model("embedded", quiet=True)
    original = root / "original"
    write_model(loaded.model, loaded.tokenizer, original)
    write_manifest(original)

    names = [n for n, m in loaded.model.named_modules() if n.endswith("_proj")]
    spec = {"quantization": {"linears": {n: {"bits": 8 if n.endswith("down_proj") else 4, "group_size": 64,
                                             "symmetric": True} for n in names},
                             "exact_weights": [], "embedding": {"bits": 8, "group_size": 64, "symmetric": True},
                             "method": "rtn", "damp": 0.1, "act_order": True}}
    quantized = quantization.apply(loaded.model, spec, Run(loaded.tokenizer, quiet=True)).codes
    rtn = root / "rtn-4-8bit-onnx"
    write_model(loaded.model, loaded.tokenizer, rtn, quantized)
    export_artifact(rtn, log=lambda *a: None)
    write_manifest(rtn)
    return {"original fp32": original, "RTN 4/8-bit with ONNX export": rtn}


def _interleaved(calls: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each call, run in turn within every repeat (so drift hits all alike),
    after one warm-up round (first-use imports and caches)."""
    times = {name: [] for name in calls}
    for round_ in range(repeats + 1):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            if round_:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    import compressor
    from compressor.manifest import verify_manifest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        for label, folder in _build(Path(tmp)).items():
            files_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            medians = _interleaved({"hash": lambda: verify_manifest(folder),
                                    "verified": lambda: compressor.load(folder),
                                    "unverified": lambda: compressor.load(folder, verify=False)}, args.repeats)
            hashing, verified, unverified = medians["hash"], medians["verified"], medians["unverified"]
            rows.append({"artifact": label, "bytes": files_bytes, "hash_s": hashing, "load_verified_s": verified,
                         "load_unverified_s": unverified, "added_s": verified - unverified,
                         "added_s_per_gb": (verified - unverified) / (files_bytes / 1e9),
                         "hash_s_per_gb": hashing / (files_bytes / 1e9)})
            print(rows[-1])
    data = {"command": command_line(), "machine": machine(), "repeats": args.repeats, "rows": rows}
    lines = [f"Command: `{data['command']}`; {data['machine']['cpu']}; medians of {args.repeats} (interleaved, after a warm-up), warm page cache.",
             "", "| artifact | files MB | hash s | hash s/GB | load (verify) s | load (verify=False) s | difference s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['artifact']} | {r['bytes'] / 1e6:.1f} | {r['hash_s']:.3f} | {r['hash_s_per_gb']:.2f} | "
                     f"{r['load_verified_s']:.3f} | {r['load_unverified_s']:.3f} | {r['added_s']:+.3f} |")
    json_path, md_path = write_results("verify", data, "\n".join(lines) + "\n")
    print(f"results: {json_path.name}, {md_path.name}")


if __name__ == "__main__":
    main()
