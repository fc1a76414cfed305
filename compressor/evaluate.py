"""Evaluation: windowed perplexity, size, parameter count, prefill latency, decode speed, peak memory.

Perplexity uses consecutive non-overlapping windows of the evaluation text (see
`compressor.data.evaluation_windows`; the window count and length are reported with every figure). Speeds are medians over repeats of one
run; peak memory is the largest resident-set growth seen while the timed work ran.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from pathlib import Path

import torch

from compressor.data import evaluation_windows
from compressor.modeling import KVCache
from compressor.progress import progress


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, quiet: bool = False) -> float:
    total_nll, total_tokens = 0.0, 0
    for window in progress(windows, "perplexity", quiet):
        logits = model(window[None]).logits[0, :-1].float()
        targets = window[1:]
        total_nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Samples resident memory in a thread; `peak_growth` is the largest rise above the start."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.start = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def peak_growth(self) -> int:
        return self.peak - self.start


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


def speed(model, prompt: torch.Tensor, new_tokens: int, repeats: int, quiet: bool = False) -> dict:
    timed_generation(model, prompt[:16], 2)  # warm-up
    prefill, decode = [], []
    with PeakMemory() as memory:
        for _ in progress(range(repeats), "speed", quiet):
            p, d = timed_generation(model, prompt, new_tokens)
            prefill.append(p)
            decode.append(d)
    return {"prompt_tokens": int(prompt.numel()), "new_tokens": new_tokens, "repeats": repeats,
            "prefill_seconds": statistics.median(prefill), "decode_tokens_per_second": statistics.median(decode),
            "peak_memory_growth_mb": memory.peak_growth / 2**20}


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def folder_size(folder: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def evaluate_model(model, tokenizer, settings, eval_text: str, weights_file: str | Path | None = None,
                   quiet: bool = False) -> dict:
    """All metrics of one model under the recipe's `evaluate` settings."""
    windows = evaluation_windows(tokenizer, eval_text, settings.windows, settings.seq_len)
    ppl = perplexity(model, windows.input_ids, quiet)
    prompt = windows.input_ids.flatten()[: settings.speed.prompt_tokens]
    result = {
        "perplexity": ppl,
        "perplexity_text": windows.record,
        "parameters": parameter_count(model),
        "speed": speed(model, prompt, settings.speed.new_tokens, settings.speed.repeats, quiet),
        "threads": torch.get_num_threads(),
    }
    if weights_file is not None:
        result["weights_bytes"] = Path(weights_file).stat().st_size
    return result
