"""Calibration and evaluation text: where it comes from and how it is cut into token windows.

Sources: `embedded` (CPython's own reference text from `pydoc_data`, so no network is needed), a
`.txt` or `.jsonl` file (one JSON object per line with a `text` field), or `hf:NAME[/CONFIG]:SPLIT`
when the `datasets` package and a hub are reachable. Calibration samples are drawn at random
offsets from a seed; evaluation windows are consecutive and non-overlapping from the start of a
file (from the end of the embedded text, whose beginning calibration also draws on).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from pydoc_data.topics import topics

import torch

from compressor.errors import CompressorError

EMBEDDED_TEXT = "embedded"
# The evaluation-only text; calibrating on it would contaminate every quality figure.
EVALUATION_ONLY_FILES = ("wiki.test.raw",)
WIKITEXT_RELATIVE = Path("shared") / "data" / "wikitext-2-raw" / "wiki.test.raw"


def embedded_text() -> str:
    return "\n\n".join(topics[key] for key in sorted(topics))


def load_text(source: str) -> str:
    if source == EMBEDDED_TEXT:
        return embedded_text()
    if source.startswith("hf:"):
        return _load_dataset_text(source[3:])
    path = Path(source)
    if not path.is_file():
        raise CompressorError(f"text file not found: {source} (allowed: a .txt or .jsonl file, 'embedded', hf:NAME:SPLIT)")
    raw = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    if path.suffix == ".jsonl":
        texts = []
        # split("\n"), not splitlines(): JSON strings may hold U+2028 and other line separators.
        for number, line in enumerate(raw.split("\n"), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CompressorError(f"{source}:{number}: expected a JSON object with a 'text' field") from exc
            if not isinstance(text, str):
                raise CompressorError(f"{source}:{number}: 'text' must be a string, got {type(text).__name__}")
            texts.append(text)
        return "\n\n".join(texts)
    return raw


def _load_dataset_text(spec: str) -> str:
    name, _, split = spec.partition(":")
    if not name or not split:
        raise CompressorError(f"dataset text {spec!r}: expected hf:NAME[/CONFIG]:SPLIT, e.g. hf:wikitext/wikitext-2-raw-v1:train")
    try:
        import datasets  # optional dependency
    except ImportError as exc:
        raise CompressorError("dataset text needs the 'datasets' package: pip install datasets") from exc
    path, _, config = name.partition("/")
    try:
        rows = datasets.load_dataset(path, config or None, split=split)
    except Exception as exc:  # datasets raises many types for offline or unknown names
        raise CompressorError(f"dataset {name!r} split {split!r} could not be loaded: {str(exc).splitlines()[0]}") from exc
    return "\n\n".join(rows["text"])


@dataclass
class TokenWindows:
    """Token windows plus the record that makes them reproducible."""

    input_ids: torch.Tensor  # (windows, seq_len)
    record: dict


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokenizer, source: str, samples: int, seq_len: int, seed: int) -> TokenWindows:
    if Path(source).name in EVALUATION_ONLY_FILES:
        raise CompressorError(f"calibration text {source}: this is evaluation data; calibrate on a different text")
    text = load_text(source)
    ids = _tokenize(tokenizer, text)
    if ids.numel() < seq_len + 1:
        raise CompressorError(f"calibration text {source} has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (samples,), generator=generator)
    windows = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
    record = {"source": source, "samples": samples, "seq_len": seq_len, "seed": seed,
              "tokens_in_text": int(ids.numel()), "text_sha256": hashlib.sha256(text.encode()).hexdigest()}
    return TokenWindows(windows, record)


def default_evaluation_text() -> str:
    """WikiText-2 test when it lies in a `shared/` folder beside the project (or COMPRESSOR_EVAL_TEXT)."""
    if os.environ.get("COMPRESSOR_EVAL_TEXT"):
        return os.environ["COMPRESSOR_EVAL_TEXT"]
    project = Path(__file__).resolve().parent.parent
    for root in (Path.cwd(), Path.cwd().parent, project, project.parent):
        if (root / WIKITEXT_RELATIVE).is_file():
            return str(root / WIKITEXT_RELATIVE)
    return EMBEDDED_TEXT


def evaluation_windows(tokenizer, source: str, windows: int, seq_len: int) -> TokenWindows:
    text = load_text(source)
    ids = _tokenize(tokenizer, text)
    available = ids.numel() // seq_len
    if available == 0:
        raise CompressorError(f"evaluation text {source} has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    if source == EMBEDDED_TEXT:
        # Calibration draws from the whole embedded text too, so evaluate on its last windows and
        # say so; WikiText-2 is the real yardstick.
        chosen = ids[(available - min(windows, available)) * seq_len : available * seq_len]
    else:
        chosen = ids[: min(windows, available) * seq_len]
    record = {"source": Path(source).name if source != EMBEDDED_TEXT else source,
              "windows": chosen.numel() // seq_len, "seq_len": seq_len,
              "text_sha256": hashlib.sha256(text.encode()).hexdigest()}
    return TokenWindows(chosen.view(-1, seq_len), record)


