"""Quantized weights kept packed when an artifact is loaded for serving (exporters.packed).

- The parametrization gives exactly `QuantizedWeight.dequantize()` for every width, symmetric and
  asymmetric, per group and per channel, with weights kept exactly.
- `compressor.load` (packed by default) gives the logits and greedy tokens of `packed=False`
  (float copies) bit for bit, holds no float copy of a quantized weight (its tensors take about a quarter of the
  dense model's bytes for those weights), and its super weights read back exact.
- Reading an artifact as a source to compress further still gives float weights.
"""

from __future__ import annotations

import pytest
import torch

import compressor
from compressor.manifest import write_manifest
from compressor.models.adapters import to_compressed
from compressor.sources import load_model
from compressor.transforms.quantize import QuantFormat, rtn_quantize
from compressor.transforms.quantize_model import EMBEDDING, quantize_embedding, set_weight
from conftest import build_tiny_hf_model
from exporters.packed import Dequantized, packed_modules
from exporters.safetensors import write_model
from helpers import decoder_linears

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROBE = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("bits", (2, 3, 4, 5, 6, 8))
@pytest.mark.parametrize("group", (32, None))
@pytest.mark.parametrize("symmetric", (True, False))
def test_the_parametrization_is_dequantize_exactly(bits, group, symmetric):
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(bits))
    quantized = rtn_quantize(weight, QuantFormat(bits, group, symmetric))
    quantized.exact_index = torch.tensor([5, 700, 6000])
    quantized.exact_value = weight.view(-1)[quantized.exact_index]
    assert torch.equal(Dequantized(quantized)(quantized.codes), quantized.dequantize())


def quantized_artifact(tokenizer, folder):
    model = to_compressed(build_tiny_hf_model("llama"))
    quantized = {}
    for name, module in decoder_linears(model):
        quantized[name] = rtn_quantize(module.weight.data, QuantFormat(4, 32))
        set_weight(module, quantized[name])
    quantized[EMBEDDING] = quantize_embedding(model, QuantFormat(8, 32))
    # A weight kept exactly, as the outlier protection stores super weights.
    name = "model.layers.2.mlp.down_proj"
    module = model.get_submodule(name)
    original = float(module.weight[3, 7]) + 5.0
    quantized[name].exact_index = torch.tensor([3 * module.weight.shape[1] + 7])
    quantized[name].exact_value = torch.tensor([original])
    set_weight(module, quantized[name])
    write_model(model, tokenizer, folder, quantized)
    write_manifest(folder)
    return folder, name, original


def model_bytes(model) -> int:
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def test_load_keeps_codes_and_gives_the_dense_logits_exactly(tokenizer, tmp_path):
    folder, name, original = quantized_artifact(tokenizer, tmp_path / "artifact")
    packed, dense = compressor.load(folder), compressor.load(folder, packed=False)
    assert len(packed_modules(packed.model)) == 6 * 7 + 1 and not packed_modules(dense.model)
    with torch.no_grad():
        assert torch.equal(packed.model(PROBE).logits, dense.model(PROBE).logits)
    prompt = PROBE[:1, :12]
    assert packed.generate_ids(prompt, max_new_tokens=10, stop_token_ids=[]) == \
        dense.generate_ids(prompt, max_new_tokens=10, stop_token_ids=[])
    assert float(packed.model.get_submodule(name).weight[3, 7]) == original
    # One byte per code against four per float: the quantized weights are nearly all of this model.
    assert model_bytes(packed.model) < 0.35 * model_bytes(dense.model)
    for module in packed_modules(packed.model):
        assert packed.model.get_submodule(module).parametrizations.weight.original.dtype == torch.int8


def test_a_packed_artifact_read_as_a_source_has_float_weights(tokenizer, tmp_path):
    folder, _, _ = quantized_artifact(tokenizer, tmp_path / "artifact")
    source = load_model(str(folder)).model
    assert not packed_modules(source)
    assert all(p.dtype == torch.float32 for p in source.parameters())
