"""Sharded weights: model-0000k-of-0000n.safetensors with model.safetensors.index.json.

- Written above `max_shard_bytes` (packed and float artifacts), read back exactly by the toolkit's
  loader and by transformers' own, verified against the manifest, and sized over every shard.
- Below the limit the single model.safetensors is byte for byte what an unsharded write gives.
- A damaged index (a missing shard, a tensor in the wrong shard, a name no shard holds) is one error.
- A sharded transformers folder is read as a model source.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import compressor
from compressor.errors import CompressorError
from compressor.manifest import write_manifest
from compressor.models.adapters import to_compressed
from compressor.pipeline import verify_artifact
from compressor.sources import load_model
from compressor.transforms.quantize import QuantFormat, rtn_quantize
from compressor.transforms.quantize_model import set_weight
from conftest import build_tiny_hf_model
from exporters.safetensors import write_model
from exporters.shards import INDEX_FILE, MODEL_FILE, save_shards, shard_names, weight_files, weights_bytes
from helpers import decoder_linears, tensor_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROBE = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(2))
SMALL_SHARDS = 60_000  # bytes: the tiny models' weights (about 0.2 to 0.7 MB) take several shards


def quantized_tiny():
    model = to_compressed(build_tiny_hf_model("llama"))
    quantized = {}
    for name, module in decoder_linears(model):
        quantized[name] = rtn_quantize(module.weight.data, QuantFormat(4, 32))
        set_weight(module, quantized[name])
    return model, quantized


def written(folder: Path, model, tokenizer, quantized=None, max_shard_bytes=SMALL_SHARDS) -> Path:
    write_model(model, tokenizer, folder, quantized, max_shard_bytes=max_shard_bytes)
    write_manifest(folder)
    return folder


@pytest.mark.parametrize("packed", (True, False))
def test_sharded_artifacts_round_trip_exactly(tokenizer, tmp_path, packed):
    model, quantized = quantized_tiny() if packed else (to_compressed(build_tiny_hf_model("llama")), None)
    folder = written(tmp_path / "artifact", model, tokenizer, quantized)
    files = weight_files(folder)
    assert len(files) > 2 and not (folder / MODEL_FILE).exists()
    assert [f.name for f in files] == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    index = json.loads((folder / INDEX_FILE).read_text())
    sizes = {}
    for path in files:
        for name, size in tensor_bytes(path).items():
            assert index["weight_map"][name] == path.name
            sizes[name] = size
    assert set(index["weight_map"]) == set(sizes) and index["metadata"]["total_size"] == sum(sizes.values())
    assert weights_bytes(folder) == sum(path.stat().st_size for path in files)
    verify_artifact(folder)
    with torch.no_grad():
        expected = model(PROBE).logits
        assert torch.equal(compressor.load(folder).model(PROBE).logits, expected)
        plain = AutoModelForCausalLM.from_pretrained(folder).eval()  # transformers' LlamaForCausalLM
        assert type(plain).__name__ == "LlamaForCausalLM"
        torch.testing.assert_close(plain(PROBE).logits, expected, atol=1e-5, rtol=0)


def test_under_the_limit_the_one_file_is_what_an_unsharded_write_gives(tmp_path):
    state = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}
    assert shard_names(state, 10**9) == [list(state)]
    assert shard_names(state, 800) == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    assert shard_names({"big": torch.zeros(1000), "small": torch.zeros(1)}, 100) == [["big"], ["small"]]
    (tmp_path / "one").mkdir()
    (tmp_path / "plain").mkdir()
    assert save_shards(state, tmp_path / "one", 10**9, metadata={"format": "pt"}) == [MODEL_FILE]
    save_file(state, str(tmp_path / "plain" / MODEL_FILE), metadata={"format": "pt"})
    assert (tmp_path / "one" / MODEL_FILE).read_bytes() == (tmp_path / "plain" / MODEL_FILE).read_bytes()
    assert not (tmp_path / "one" / INDEX_FILE).exists()


def test_a_damaged_index_is_one_error(tokenizer, tmp_path):
    model, quantized = quantized_tiny()
    folder = written(tmp_path / "artifact", model, tokenizer, quantized)
    index_path = folder / INDEX_FILE
    index = json.loads(index_path.read_text())
    files = sorted(set(index["weight_map"].values()))

    def broken(change) -> str:
        data = json.loads(json.dumps(index))
        change(data)
        index_path.write_text(json.dumps(data))
        with pytest.raises(CompressorError) as error:
            compressor.load(folder, verify=False)
        index_path.write_text(json.dumps(index))
        return str(error.value)

    counts = {f: list(index["weight_map"].values()).count(f) for f in files}
    name = next(n for n, f in index["weight_map"].items() if counts[f] > 1)  # its shard keeps others
    other = next(f for f in files if f != index["weight_map"][name])
    assert "places in" in broken(lambda d: d["weight_map"].update({name: other}))
    assert "which no shard holds" in broken(lambda d: d["weight_map"].update({"model.extra.weight": files[0]}))
    assert "not a shard" in broken(lambda d: d["weight_map"].update({name: "../elsewhere.safetensors"}))
    moved = folder / files[1]
    moved.rename(folder / "aside")
    with pytest.raises(CompressorError, match=f"shard {files[1]} named in {INDEX_FILE} is missing"):
        compressor.load(folder, verify=False)


def test_a_sharded_transformers_folder_is_a_model_source(tokenizer, tmp_path):
    hf = build_tiny_hf_model("qwen2")
    hf.save_pretrained(tmp_path / "source", max_shard_size=SMALL_SHARDS)
    tokenizer.save_pretrained(tmp_path / "source")
    assert (tmp_path / "source" / INDEX_FILE).is_file()
    loaded = load_model(str(tmp_path / "source"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(PROBE).logits, hf(PROBE).logits, atol=1e-5, rtol=0)
