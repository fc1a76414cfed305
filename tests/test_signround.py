"""Learned rounding on top of GPTQ (method: signround, compressor.transforms.signround).

- One layer: the refinement lowers the layer's output error against the float layer below GPTQ's,
  keeps codes in range and the exact weights exact, and the stored result is what the module holds.
- A whole tiny model: the final distributions are closer to the float model's than with GPTQ.
- The recipe and plan fields, and `compress apply --plan` reproducing the artifact's bytes.
"""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch

from compressor.cli import main
from compressor.errors import CompressorError
from compressor.plan import PLAN_FORMAT, validate_plan
from compressor.recipe import parse_recipe
from compressor.execution.layerwise import embedded_batches, rotary_and_mask, run_block
from compressor.models.adapters import to_compressed
from compressor.transforms.quantize import QuantFormat, code_range
from compressor.transforms.quantize_model import accumulate_hessians, layer_linears, quantize_layer_linears, quantize_model
from compressor.transforms.signround import refine_layer, token_loss
from conftest import build_tiny_hf_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return to_compressed(build_tiny_hf_model("llama")).eval()


def calibration(seed=0, windows=8, tokens=48):
    return torch.randint(0, 512, (windows, tokens), generator=torch.Generator().manual_seed(seed))


def layer_error(block, rotary, inputs, targets) -> float:
    with torch.no_grad():
        return sum(float(token_loss(block(h, *rotary, None), t)) for h, t in zip(inputs, targets)) / len(targets)


def test_refinement_lowers_the_layer_error_below_gptq(model):
    model = copy.deepcopy(model)
    hidden = embedded_batches(model, calibration(), 2)
    block = model.model.layers[0]
    targets = list(run_block(model, block, hidden))
    inputs = list(hidden)
    rotary = rotary_and_mask(model, inputs[0].shape[1])
    names = [name for name, _ in layer_linears(model, 0)]
    originals = {name: module.weight.data.clone() for name, module in layer_linears(model, 0)}
    hessians = accumulate_hessians(model, 0, hidden, names)
    fmt = QuantFormat(3, 32, True)
    exact = {names[-1]: torch.zeros(originals[names[-1]].shape, dtype=torch.bool)}
    exact[names[-1]][1, 5] = True
    gptq = quantize_layer_linears(model, 0, {n: fmt for n in names}, "gptq", hessians, exact, 0.1, True)
    gptq_error = layer_error(block, rotary, inputs, targets)
    modules = dict(layer_linears(model, 0))
    refined, record = refine_layer(block, rotary, inputs, targets, originals, gptq, modules, steps=60)
    assert record["kept"] == "refined" and record["refined_loss"] < 0.9 * record["gptq_loss"], record
    assert record["gptq_loss"] == pytest.approx(gptq_error, rel=1e-5)
    assert 0 < record["codes_changed"] < 0.5
    # The modules hold GPTQ's weights again until the caller writes the refined ones.
    assert layer_error(block, rotary, inputs, targets) == pytest.approx(gptq_error, rel=1e-6)
    qmin, qmax = code_range(3)
    for name, weight in refined.items():
        assert weight.scale.dtype == torch.float16
        assert int(weight.codes.min()) >= qmin and int(weight.codes.max()) <= qmax
        modules[name].weight = torch.nn.Parameter(weight.dequantize(), requires_grad=False)
    assert float(refined[names[-1]].dequantize()[1, 5]) == float(originals[names[-1]][1, 5])
    assert layer_error(block, rotary, inputs, targets) == pytest.approx(record["refined_loss"], rel=1e-2)


def final_kl(reference, model, ids) -> float:
    with torch.no_grad():
        p = torch.log_softmax(reference(ids).logits.float(), -1)
        q = torch.log_softmax(model(ids).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_signround_model_is_closer_to_the_float_model_than_gptq(model):
    ids = calibration(1)
    formats = {name: QuantFormat(3, 32, True) for layer in range(len(model.model.layers))
               for name, _ in layer_linears(model, layer)}
    divergence = {}
    for method in ("gptq", "signround"):
        quantized = copy.deepcopy(model)
        codes = quantize_model(quantized, formats, method, ids, batch_size=2, signround={"steps": 40}, quiet=True)
        assert set(codes) == set(formats)
        divergence[method] = final_kl(model, quantized, ids)
    assert divergence["signround"] < divergence["gptq"], divergence


RECIPE = {"name": "sr", "calibration": {"text": "embedded", "samples": 4, "seq_len": 64},
          "quantize": {"method": "signround", "signround": {"steps": 8}, "clip": "search", "bits": [3, 4],
                       "group_size": 32, "budget": {"avg_bits": 4.0}, "embeddings": 8,
                       "sensitivity_samples": 2, "sensitivity_seq_len": 32},
          "evaluate": {"text": "embedded", "windows": 1, "seq_len": 32, "compare_original": False,
                       "speed": {"prompt_tokens": 8, "new_tokens": 2, "repeats": 1}}}


def test_a_signround_run_records_its_settings_and_apply_reproduces_it(tiny_model_folder, tmp_path):
    recipe = tmp_path / "sr.yaml"
    recipe.write_text(json.dumps(RECIPE))
    source = str(tiny_model_folder["llama"])
    assert main(["--recipe", str(recipe), "--model", source, "--out", str(tmp_path / "a"), "--quiet"]) == 0
    plan = json.loads((tmp_path / "a" / "plan.json").read_text())
    spec = plan["quantization"]
    assert spec["method"] == "signround" and spec["signround"] == {"steps": 8, "windows": 1, "learning_rate": None}
    assert spec["clip"] == "search"
    analysis = json.loads((tmp_path / "a" / "analysis.json").read_text())
    # Sensitivity is measured with GPTQ and min-max ranges (they rank widths; a refinement per unit
    # and width would cost that many runs).
    assert analysis["quantization"]["sensitivity"]["method"] == "gptq"
    assert "clip" not in analysis["quantization"]["sensitivity"]  # measured with min-max ranges
    assert main(["apply", "--plan", str(tmp_path / "a" / "plan.json"), "--model", source, "--out",
                 str(tmp_path / "b"), "--quiet"]) == 0
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(tmp_path / "a" / "model.safetensors") == digest(tmp_path / "b" / "model.safetensors")


def test_bad_settings_are_one_clear_error():
    with pytest.raises(CompressorError, match="quantize.signround.steps"):
        parse_recipe(dict(RECIPE, quantize=dict(RECIPE["quantize"], signround={"steps": 0})))
    with pytest.raises(CompressorError, match="quantize.clip"):
        parse_recipe(dict(RECIPE, quantize=dict(RECIPE["quantize"], clip="mse")))
    plan = {"format": PLAN_FORMAT, "layers": [{"layer": 0, "attention": "keep", "mlp": "keep"}],
            "quantization": {"method": "signround", "damp": 0.1, "act_order": True, "clip": "search",
                             "signround": {"steps": 0}, "linears": {}, "embedding": {"bits": "keep"},
                             "predicted_tensor_bytes": 0,
                             "calibration": {"text": "embedded", "samples": 4, "seq_len": 64, "seed": 0}}}
    with pytest.raises(CompressorError, match=r"quantization.signround.steps"):
        validate_plan(plan)
    plan["quantization"].update(signround={"steps": 10}, clip="wide")
    with pytest.raises(CompressorError, match=r"quantization.clip"):
        validate_plan(plan)
    plan["quantization"]["clip"] = "search"
    validate_plan(plan)
