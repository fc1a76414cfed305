"""Calibration and evaluation text: sources, seeded sampling, consecutive evaluation windows."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from compressor.data import (calibration_windows, default_evaluation_text, embedded_text, evaluation_windows,
                             load_text)
from compressor.errors import CompressorError


def tokenize(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(embedded_text()[:30_000], encoding="utf-8")
    return path


def is_slice_of(row: torch.Tensor, ids: torch.Tensor) -> bool:
    all_windows = ids.unfold(0, row.numel(), 1)
    return bool((all_windows == row).all(dim=1).any())


# ---- calibration -------------------------------------------------------------------------------

def test_calibration_shape_and_record(tokenizer, text_file):
    windows = calibration_windows(tokenizer, str(text_file), samples=5, seq_len=48, seed=3)
    assert tuple(windows.input_ids.shape) == (5, 48)
    assert windows.input_ids.dtype == torch.long
    text = text_file.read_text(encoding="utf-8")
    ids = tokenize(tokenizer, text)
    assert windows.record == {"source": str(text_file), "samples": 5, "seq_len": 48, "seed": 3,
                              "tokens_in_text": ids.numel(),
                              "text_sha256": hashlib.sha256(text.encode()).hexdigest()}


def test_calibration_windows_are_slices_of_the_tokenized_text(tokenizer, text_file):
    ids = tokenize(tokenizer, text_file.read_text(encoding="utf-8"))
    windows = calibration_windows(tokenizer, str(text_file), samples=6, seq_len=32, seed=0)
    for row in windows.input_ids:
        assert is_slice_of(row, ids)


def test_calibration_is_deterministic_for_a_seed(tokenizer, text_file):
    a = calibration_windows(tokenizer, str(text_file), samples=8, seq_len=32, seed=11)
    b = calibration_windows(tokenizer, str(text_file), samples=8, seq_len=32, seed=11)
    assert torch.equal(a.input_ids, b.input_ids)
    assert a.record == b.record


def test_calibration_differs_for_another_seed(tokenizer, text_file):
    a = calibration_windows(tokenizer, str(text_file), samples=8, seq_len=32, seed=0)
    b = calibration_windows(tokenizer, str(text_file), samples=8, seq_len=32, seed=1)
    assert not torch.equal(a.input_ids, b.input_ids)
    assert a.record["seed"] == 0 and b.record["seed"] == 1
    assert a.record["text_sha256"] == b.record["text_sha256"]


def test_calibration_on_embedded_text(tokenizer):
    windows = calibration_windows(tokenizer, "embedded", samples=3, seq_len=64, seed=0)
    assert tuple(windows.input_ids.shape) == (3, 64)
    assert windows.record["source"] == "embedded"
    assert windows.record["text_sha256"] == hashlib.sha256(embedded_text().encode()).hexdigest()
    assert windows.record["tokens_in_text"] > 10_000


def test_calibration_text_too_short(tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("def f(): return 1\n")
    n = tokenize(tokenizer, path.read_text()).numel()
    with pytest.raises(CompressorError) as info:
        calibration_windows(tokenizer, str(path), samples=2, seq_len=64, seed=0)
    assert str(info.value) == f"calibration text {path} has {n} tokens, fewer than seq_len=64"


@pytest.mark.parametrize("folder", ["", "shared/data/wikitext-2-raw/"])
def test_evaluation_text_is_refused_for_calibration(tokenizer, tmp_path, folder):
    path = tmp_path / folder / "wiki.test.raw"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(embedded_text()[:5000])
    with pytest.raises(CompressorError) as info:
        calibration_windows(tokenizer, str(path), samples=2, seq_len=32, seed=0)
    assert str(info.value) == f"calibration text {path}: this is evaluation data; calibrate on a different text"
    # ... while evaluating on it is fine.
    assert tuple(evaluation_windows(tokenizer, str(path), windows=2, seq_len=32).input_ids.shape) == (2, 32)


def test_missing_text_file(tokenizer, tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(CompressorError, match=r"text file not found: .*nope\.txt \(allowed: a \.txt or \.jsonl file"):
        calibration_windows(tokenizer, str(missing), samples=2, seq_len=32, seed=0)


def test_malformed_dataset_spec():
    with pytest.raises(CompressorError, match=r"dataset text 'wikitext': expected hf:NAME\[/CONFIG\]:SPLIT"):
        load_text("hf:wikitext")


# ---- jsonl -------------------------------------------------------------------------------------

def test_jsonl_source_joins_text_fields(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "first row", "id": 1}\n\n{"text": "second row"}\n   \n{"text": "third"}\n')
    assert load_text(str(path)) == "first row\n\nsecond row\n\nthird"


def test_jsonl_source_for_calibration(tokenizer, tmp_path):
    chunks = [embedded_text()[i : i + 2000] for i in range(0, 20_000, 2000)]
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": c}) + "\n" for c in chunks))
    windows = calibration_windows(tokenizer, str(path), samples=4, seq_len=32, seed=0)
    ids = tokenize(tokenizer, "\n\n".join(chunks))
    assert tuple(windows.input_ids.shape) == (4, 32)
    assert windows.record["tokens_in_text"] == ids.numel()
    for row in windows.input_ids:
        assert is_slice_of(row, ids)


def test_jsonl_crlf_line_endings(tmp_path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b'{"text": "a"}\r\n{"text": "b"}\r\n')
    assert load_text(str(path)) == "a\n\nb"


@pytest.mark.parametrize("bad_line", [
    "this is not json",
    '{"txt": "wrong field"}',
    '["a", "list"]',
    '"just a string"',
    '{"text": 5}',
    '{"text": null}',
])
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad_line):
    path = tmp_path / "bad.jsonl"
    # Line 2 is blank; the bad line is physical line 3 of the file.
    path.write_text('{"text": "fine"}\n\n' + bad_line + '\n{"text": "also fine"}\n')
    with pytest.raises(CompressorError) as info:
        load_text(str(path))
    assert str(info.value).startswith(f"{path}:3: ")
    assert "'text'" in str(info.value)


def test_jsonl_text_with_unicode_line_separators(tmp_path):
    # JSON Lines are separated by "\n" only; U+2028, U+0085 and form feeds are ordinary characters
    # inside a JSON string (json.dumps(ensure_ascii=False) writes them raw).
    texts = ["first\u2028line", "second\x85line", "third\x0cline"]
    path = tmp_path / "u.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    assert load_text(str(path)) == "\n\n".join(texts)


# ---- evaluation --------------------------------------------------------------------------------

def test_evaluation_windows_are_consecutive_from_the_start(tokenizer, text_file):
    text = text_file.read_text(encoding="utf-8")
    ids = tokenize(tokenizer, text)
    windows = evaluation_windows(tokenizer, str(text_file), windows=3, seq_len=40)
    assert tuple(windows.input_ids.shape) == (3, 40)
    assert torch.equal(windows.input_ids, ids[:120].view(3, 40))
    assert windows.record == {"source": "sample.txt", "windows": 3, "seq_len": 40,
                              "text_sha256": hashlib.sha256(text.encode()).hexdigest()}


def test_evaluation_windows_are_capped_by_the_text(tokenizer, tmp_path):
    text = embedded_text()[:2000]
    path = tmp_path / "small.txt"
    path.write_text(text)
    ids = tokenize(tokenizer, text)
    available = ids.numel() // 64
    assert available >= 1
    windows = evaluation_windows(tokenizer, str(path), windows=available + 5, seq_len=64)
    assert tuple(windows.input_ids.shape) == (available, 64)
    assert windows.record["windows"] == available
    assert torch.equal(windows.input_ids.flatten(), ids[: available * 64])


def test_embedded_evaluation_uses_the_last_windows(tokenizer):
    # The embedded text also feeds calibration, so its evaluation windows are its last ones.
    ids = tokenize(tokenizer, embedded_text())
    available = ids.numel() // 32
    windows = evaluation_windows(tokenizer, "embedded", windows=2, seq_len=32)
    assert tuple(windows.input_ids.shape) == (2, 32)
    assert torch.equal(windows.input_ids.flatten(), ids[(available - 2) * 32 : available * 32])
    assert windows.record["source"] == "embedded" and windows.record["windows"] == 2


def test_evaluation_text_too_short(tokenizer, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("x = 1\n")
    n = tokenize(tokenizer, path.read_text()).numel()
    with pytest.raises(CompressorError) as info:
        evaluation_windows(tokenizer, str(path), windows=2, seq_len=64)
    assert str(info.value) == f"evaluation text {path} has {n} tokens, fewer than seq_len=64"


def test_default_evaluation_text_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESSOR_EVAL_TEXT", str(tmp_path / "eval.txt"))
    assert default_evaluation_text() == str(tmp_path / "eval.txt")
