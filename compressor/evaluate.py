"""Evaluation: windowed perplexity, size, parameter count, prefill latency, decode speed, peak memory.

Perplexity uses consecutive non-overlapping windows of the evaluation text (see
`compressor.data.evaluation_windows`; the window count and length are reported with every figure). Speeds are medians over repeats of one
run, measured in a fresh process that loads the saved model (so its peak resident memory is
what serving that model costs: weights, KV cache, activations and the Python runtime).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from compressor.data import evaluation_windows, load_text
from compressor.execution.hidden import carried
from compressor.execution.layerwise import embed, placement_of, run_layer
from compressor.execution.offload import is_offloaded, streamed
from compressor.modeling import KVCache
from compressor.needles import build_cases, even_depths
from compressor.progress import progress
from compressor.transforms.sparse_tokens import SparseTokenSettings, full_prefill, greedy_continue, sparse_prefill
from exporters.shards import weights_bytes


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, quiet: bool = False) -> float:
    """exp(mean next-token NLL) over the windows, each scored alone, the model run one decoder layer
    at a time over all of them (compressor.execution.layerwise); NLL summed in float32."""
    if hasattr(model, "ensure_exact_weights"):
        model.ensure_exact_weights()
    hidden = carried((embed(model, window[None]) for window in windows), placement_of(model)[0])
    for layer in progress(range(len(model.model.layers)), "perplexity", quiet):
        hidden = run_layer(model, layer, hidden)
    total_nll, total_tokens = 0.0, 0
    for window, h in zip(windows, hidden):
        logits = model.output_logits(model.model.norm(h))[0, :-1].float()
        targets = window[1:].to(logits.device)
        total_nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)


@torch.no_grad()
def timed_generation(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Greedy decoding with the KV cache: (prefill seconds, decode tokens per second)."""
    cache = KVCache()
    t0 = time.perf_counter()
    logits = model(prompt[None], past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    t1 = time.perf_counter()
    token = logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(new_tokens - 1):
        logits = model(token, past_key_values=cache, use_cache=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
    t2 = time.perf_counter()
    return t1 - t0, (new_tokens - 1) / max(t2 - t1, 1e-9)


def speed(folder: str | Path, prompt: torch.Tensor, new_tokens: int, repeats: int, device: str = "cpu",
          dtype: str = "float32", packed: bool = False) -> dict:
    """Prefill / decode speed and peak memory of the model saved in `folder`, in a fresh process, on
    `device` in `dtype`; `packed` keeps quantized weights as codes (compressor.speed_probe)."""
    with tempfile.TemporaryDirectory(prefix="compressor-speed-") as tmp:
        prompt_file = Path(tmp) / "prompt.pt"
        torch.save(prompt.clone(), prompt_file)
        env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
        done = subprocess.run([sys.executable, "-m", "compressor.speed_probe", str(Path(folder).resolve()), str(prompt_file),
                               str(new_tokens), str(repeats), device, dtype, "packed" if packed else "dense"],
                              capture_output=True, text=True, env=env,
                              cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"speed probe failed for {folder}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def evaluate_model(model, tokenizer, settings, eval_text: str, folder: str | Path, quiet: bool = False) -> dict:
    """All metrics of one model, already saved in `folder`, under the recipe's `evaluate` settings."""
    started = time.perf_counter()
    device, dtype = placement_of(model)
    windows = evaluation_windows(tokenizer, eval_text, settings.windows, settings.seq_len)
    ppl = perplexity(model, windows.input_ids, quiet)
    perplexity_seconds = time.perf_counter() - started
    prompt = windows.input_ids.flatten()[: settings.speed.prompt_tokens]
    result = {
        "perplexity": ppl,
        "perplexity_text": windows.record,
        "parameters": parameter_count(model),
        # On the device the run computed on; a model whose layers were read from disk is probed in
        # float32 with its quantized weights kept packed (its float copy may not fit in memory; the
        # packed path dequantizes to float32).
        "speed": speed(folder, prompt, settings.speed.new_tokens, settings.speed.repeats, str(device),
                       str(dtype).removeprefix("torch."), is_offloaded(model) and dtype == torch.float32),
        "threads": torch.get_num_threads(),
        "weights_bytes": weights_bytes(Path(folder)),  # every shard
        "perplexity_seconds": perplexity_seconds,
    }
    if settings.needles is not None:
        result["needles"] = needle_evaluation(model, tokenizer, settings.needles, eval_text, quiet)
    return result


def needle_evaluation(model, tokenizer, needles, eval_text: str, quiet: bool = False) -> dict:
    """Needle accuracy and time to first token with full attention and, when the model has one,
    with its sparse-token filter, on the same cases. A model with its layers on disk reads each layer
    for every forward (the prefill and each generated token): its times include those reads."""
    source = eval_text if needles.text == "auto" else needles.text
    cases = build_cases(tokenizer, load_text(source), needles.lengths, even_depths(needles.depths),
                        needles.per_cell, needles.seed)
    record = {"haystack": Path(source).name if source != "embedded" else source, "lengths": needles.lengths,
              "depths": even_depths(needles.depths), "per_cell": needles.per_cell, "seed": needles.seed,
              "weights": "disk" if is_offloaded(model) else "memory"}
    with streamed(model):
        record["full"] = needle_summary(needle_suite(model, tokenizer, cases, None, needles.max_new_tokens, quiet,
                                                     "needles (full attention)"))
        stored = getattr(model.config, "sparse_tokens", None)
        if stored:
            settings = SparseTokenSettings.from_dict(stored)
            record["sparse_tokens"] = settings.as_dict()
            record["sparse"] = needle_summary(needle_suite(model, tokenizer, cases, settings, needles.max_new_tokens,
                                                           quiet, f"needles ({settings.method})"))
    return record


@torch.no_grad()
def needle_suite(model, tokenizer, cases, settings=None, max_new_tokens: int = 12, quiet: bool = False,
                 label: str = "needles") -> list[dict]:
    """Greedy answers to needle cases, with time to first token (prefill, the filter included).
    `settings` is a SparseTokenSettings, or None for full attention."""
    results = []
    for case in progress(cases, label, quiet):
        ids = case.input_ids[None]
        started = time.perf_counter()
        state = sparse_prefill(model, ids, settings) if settings is not None else full_prefill(model, ids)
        ttft = time.perf_counter() - started
        tokens = greedy_continue(model, state, max_new_tokens)[0].tolist()
        output = tokenizer.decode(tokens, skip_special_tokens=True)
        entry = {"length": case.length, "depth": case.depth, "answer": case.answer, "output": output,
                 "correct": output.strip().startswith(case.answer), "ttft_seconds": ttft}
        if state.selected is not None:
            kept = set(state.selected[0].tolist())
            a, b = case.answer_span
            entry["answer_tokens_kept"] = sum(p in kept for p in range(a, b)) / (b - a)
        results.append(entry)
    return results


def needle_summary(results: list[dict]) -> dict:
    """Accuracy and median time to first token per length, and accuracy per length x depth."""
    by_length: dict[int, list[dict]] = {}
    for r in results:
        by_length.setdefault(r["length"], []).append(r)
    summary = {}
    for length, rows in sorted(by_length.items()):
        grid: dict[float, list[bool]] = {}
        for r in rows:
            grid.setdefault(r["depth"], []).append(r["correct"])
        summary[str(length)] = {
            "cases": len(rows), "accuracy": sum(r["correct"] for r in rows) / len(rows),
            "median_ttft_seconds": statistics.median(r["ttft_seconds"] for r in rows),
            "accuracy_by_depth": {str(d): sum(v) / len(v) for d, v in sorted(grid.items())},
        }
    return summary


def needle_grid_png(summaries: dict[str, dict], path: str | Path) -> None:
    """One accuracy grid (length x depth) per variant, side by side."""
    import matplotlib  # lazy like the optional dependencies: only plotting needs it, and it is slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summaries)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names) + 1, 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        summary = summaries[name]
        lengths = list(summary)
        depths = list(summary[lengths[0]]["accuracy_by_depth"])
        grid = np.array([[summary[n]["accuracy_by_depth"].get(d, np.nan) for n in lengths] for d in depths])
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_yticks(range(len(depths)), [f"{float(d):.0%}" for d in depths])
        ax.set_xlabel("prompt tokens")
        ax.set_title(name, fontsize=10)
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=8)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.savefig(path, dpi=110)
    plt.close(fig)
