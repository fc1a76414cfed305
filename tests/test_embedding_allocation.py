"""The token embedding as one more unit of the bit allocation (`quantize.embeddings: auto`).

- The analysis measures the embedding's sensitivity at each width (KL divergence of the final
  distributions with only the embedding quantized), larger at fewer bits.
- The plan is the exact optimum of the knapsack with the embedding in it: its summed cost equals
  the best, over the embedding's widths, of the embedding's cost plus the linears' optimum in what
  the embedding leaves of the budget; a tight budget narrows the embedding, a loose one does not.
- A whole run writes exactly the bytes the plan predicts, and the artifact's config names the
  embedding's chosen format.
- `embeddings: auto` without `allocate: sensitivity` is one clear error.
"""

from __future__ import annotations

import json

import pytest

from compressor.bit_allocation import allocation_units, solve_knapsack, unit_bytes
from compressor.errors import CompressorError
from compressor.pipeline import analyze, compress, make_plan
from compressor.recipe import parse_recipe
from compressor.sources import load_model
from compressor.transforms.quantize import recipe_format, stored_bytes
from exporters.safetensors import MODEL_FILE
from helpers import tensor_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CALIBRATION = {"samples": 4, "seq_len": 64}
QUANTIZE = {"method": "rtn", "bits": [2, 4, 8], "group_size": 32, "embeddings": "auto",
            "sensitivity_samples": 2, "sensitivity_seq_len": 32}


def recipe(**quantize):
    return parse_recipe({"name": "emb", "calibration": CALIBRATION, "quantize": dict(QUANTIZE, **quantize)})


@pytest.fixture(scope="module")
def analysis(tiny_model_folder) -> dict:
    loaded = load_model(str(tiny_model_folder["llama"]), quiet=True)
    return analyze(loaded, recipe(budget={"avg_bits": 4.0}), quiet=True)


def test_the_analysis_measures_the_embedding_at_each_width(analysis):
    scores = analysis["quantization"]["sensitivity"]["scores"]["embedding"]
    assert set(scores) == {"2", "4", "8"}
    assert scores["2"] > scores["4"] > scores["8"] >= 0


def best_with_embedding(analysis: dict, quantize, capacity: int) -> float:
    """min over the embedding's widths of its cost + the linears' exact optimum in the rest."""
    inventory = analysis["quantization"]
    scores = inventory["sensitivity"]["scores"]
    units = allocation_units(inventory["linears"], quantize.granularity)
    items = [[(unit_bytes(u, recipe_format(quantize, b)), max(0.0, scores[u["key"]][str(b)])) for b in quantize.bits]
             for u in units]
    vocab, hidden = inventory["embedding_shape"]
    best = float("inf")
    for b in quantize.bits:
        size = stored_bytes(vocab, hidden, recipe_format(quantize, b))
        rest = solve_knapsack(items, capacity - size)
        if rest is not None:
            best = min(best, rest[2] + max(0.0, scores["embedding"][str(b)]))
    return best


@pytest.mark.parametrize("avg_bits", [2.6, 3.5, 6.0])
def test_the_plan_is_the_knapsack_optimum_with_the_embedding_in_it(analysis, avg_bits):
    r = recipe(budget={"avg_bits": avg_bits})
    spec = make_plan(r, analysis)["quantization"]
    embedding = spec["embedding"]
    assert embedding["allocated"] and embedding["bits"] in (2, 4, 8)
    vocab, hidden = analysis["quantization"]["embedding_shape"]
    assert embedding["bytes"] == stored_bytes(vocab, hidden, recipe_format(r.quantize, embedding["bits"]))
    budget = spec["budget"]
    assert budget["used_bytes"] == sum(u["bytes"] for u in spec["units"]) + embedding["bytes"] <= budget["capacity_bytes"]
    assert abs(budget["summed_cost"] - best_with_embedding(analysis, r.quantize, budget["capacity_bytes"])) < 1e-12
    assert spec["predicted_tensor_bytes"] == (analysis["quantization"]["other_tensor_bytes"] + budget["used_bytes"])


def test_a_tight_budget_narrows_the_embedding_and_a_loose_one_does_not(analysis):
    tight = make_plan(recipe(budget={"avg_bits": 2.6}), analysis)["quantization"]["embedding"]["bits"]
    loose = make_plan(recipe(budget={"avg_bits": 8.3}), analysis)["quantization"]["embedding"]["bits"]
    assert tight < loose == 8


def test_a_run_writes_the_predicted_bytes_and_names_the_embeddings_format(tiny_model_folder, tmp_path):
    spec = {"name": "emb", "calibration": CALIBRATION, "quantize": dict(QUANTIZE, budget={"avg_bits": 3.5}),
            "evaluate": {"text": "embedded", "windows": 1, "seq_len": 32, "compare_original": False,
                         "speed": {"prompt_tokens": 8, "new_tokens": 2, "repeats": 1}}}
    out = compress(parse_recipe(spec), str(tiny_model_folder["llama"]), tmp_path / "out", quiet=True, log=lambda m: None)
    plan = json.loads((out / "plan.json").read_text())["quantization"]
    assert sum(tensor_bytes(out / MODEL_FILE).values()) == plan["predicted_tensor_bytes"]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = [g for g in config["config_groups"].values() if "model.embed_tokens" in str(g.get("targets"))]
    assert groups and groups[0]["weights"]["num_bits"] == plan["embedding"]["bits"]


def test_auto_embeddings_need_the_sensitivity_allocation():
    with pytest.raises(CompressorError, match=r"embeddings: auto .* needs allocate: sensitivity, got allocate: lim"):
        recipe(allocate="lim", budget={"avg_bits": 4.0})
