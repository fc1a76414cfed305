"""Speed and memory of one saved model, measured in a fresh process so that nothing else the
caller holds (other models, caches) counts toward its peak memory.

    python -m compressor.speed_probe FOLDER PROMPT_IDS.pt NEW_TOKENS REPEATS [DEVICE DTYPE PACKED]
                                                                              -> one JSON line

DEVICE and DTYPE are where the model runs (default cpu float32); PACKED (`packed`) keeps quantized
weights as codes dequantized on use (exporters.packed), what a model too large to hold in float
needs.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from compressor.evaluate import timed_generation
from compressor.placement import CPU_FLOAT32, resolve
from compressor.process import peak_rss_mb, quiet_transformers
from exporters.safetensors import read_model


def main(folder: str, prompt_file: str, new_tokens: int, repeats: int, device: str = "cpu",
         dtype: str = "float32", packed: bool = False) -> dict:
    quiet_transformers()
    placement = resolve(device, dtype)
    prompt = torch.load(prompt_file).to(placement.device)
    started = time.perf_counter()
    model, _ = read_model(folder, with_tokenizer=False, packed=packed)
    if placement != CPU_FLOAT32:
        model.to(device=placement.device, dtype=placement.dtype)
    load_seconds = time.perf_counter() - started
    timed_generation(model, prompt[:16], 2)  # warm-up
    prefill, decode = [], []
    for _ in range(repeats):
        p, d = timed_generation(model, prompt, new_tokens)
        prefill.append(p)
        decode.append(d)
    return {"prompt_tokens": int(prompt.numel()), "new_tokens": new_tokens, "repeats": repeats,
            "prefill_seconds": statistics.median(prefill), "decode_tokens_per_second": statistics.median(decode),
            "load_seconds": load_seconds, "peak_rss_mb": peak_rss_mb(), "device": str(placement.device),
            "packed": packed}


if __name__ == "__main__":
    extra = sys.argv[5:8]
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), *extra[:2],
                          *([extra[2] == "packed"] if len(extra) > 2 else []))))
