"""Speed and memory of one saved model, measured in a fresh process so that nothing else the
caller holds (other models, caches) counts toward its peak memory.

    python -m compressor.speed_probe FOLDER PROMPT_IDS.pt NEW_TOKENS REPEATS   -> one JSON line
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time

import torch


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the address space made at exec;
    ru_maxrss would also count the parent's memory at fork time."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(folder: str, prompt_file: str, new_tokens: int, repeats: int) -> dict:
    import transformers

    from compressor.evaluate import timed_generation
    from exporters.safetensors import read_model

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    prompt = torch.load(prompt_file)
    started = time.perf_counter()
    model, _ = read_model(folder, with_tokenizer=False)
    load_seconds = time.perf_counter() - started
    timed_generation(model, prompt[:16], 2)  # warm-up
    prefill, decode = [], []
    for _ in range(repeats):
        p, d = timed_generation(model, prompt, new_tokens)
        prefill.append(p)
        decode.append(d)
    return {"prompt_tokens": int(prompt.numel()), "new_tokens": new_tokens, "repeats": repeats,
            "prefill_seconds": statistics.median(prefill), "decode_tokens_per_second": statistics.median(decode),
            "load_seconds": load_seconds, "peak_rss_mb": peak_rss_mb()}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
