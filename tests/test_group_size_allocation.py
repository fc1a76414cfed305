"""Group sizes as allocation choices (`quantize.group_size` given as a list).

- The analysis measures every unit (and the embedding, with `embeddings: auto`) at every width and
  group size; scores at the primary group size keep their width-only keys.
- The plan is the exact optimum over all the options: its summed cost is at most the optimum of
  each group size alone under the same budget, and its bytes are the stored bytes of the formats it
  names, linear by linear.
- A whole run writes exactly the predicted bytes, and the artifact's config names each group size
  the plan chose; the saved model reloads with the same logits.
- Bad input is one clear error: a group size that does not divide the model's widths, a list without
  the sensitivity allocation, a plan asking for group sizes its analysis did not measure.
"""

from __future__ import annotations

import json

import pytest
import torch

from compressor.errors import CompressorError, MissingRecord
from compressor.pipeline import analyze, compress, make_plan
from compressor.recipe import parse_recipe
from compressor.sources import load_model
from compressor.transforms.quantize import QuantFormat, stored_bytes
from exporters.safetensors import MODEL_FILE
from helpers import tensor_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CALIBRATION = {"samples": 4, "seq_len": 64}
QUANTIZE = {"method": "rtn", "bits": [2, 4, 8], "group_size": [32, "channel"], "embeddings": "auto",
            "granularity": "unit", "sensitivity_samples": 2, "sensitivity_seq_len": 32}
LABELS = {"2", "4", "8", "2/channel", "4/channel", "8/channel"}


def recipe(**quantize):
    return parse_recipe({"name": "groups", "calibration": CALIBRATION, "quantize": dict(QUANTIZE, **quantize)})


@pytest.fixture(scope="module")
def analysis(tiny_model_folder) -> dict:
    loaded = load_model(str(tiny_model_folder["llama"]), quiet=True)
    return analyze(loaded, recipe(budget={"avg_bits": 4.0}), quiet=True)


def test_every_unit_and_the_embedding_is_measured_at_every_width_and_group_size(analysis):
    measured = analysis["quantization"]["sensitivity"]
    assert measured["group_size"] == 32 and measured["group_sizes"] == [32, "channel"]
    assert all(set(row) == LABELS for row in measured["scores"].values())
    # One scale per row is coarser than one per 32 weights: at 2 bits it costs more, summed over units.
    assert sum(r["2/channel"] for r in measured["scores"].values()) > sum(r["2"] for r in measured["scores"].values())


@pytest.mark.parametrize("avg_bits", [2.3, 3.0, 4.4, 6.0])
def test_the_plan_is_no_worse_than_either_group_size_alone_and_its_bytes_are_its_formats(analysis, avg_bits):
    both = make_plan(recipe(budget={"avg_bits": avg_bits}), analysis)["quantization"]
    shapes = {lin["name"]: lin["shape"] for lin in analysis["quantization"]["linears"]}
    linear_bytes = sum(stored_bytes(*shapes[name], QuantFormat(r["bits"], r["group_size"], r["symmetric"]))
                       for name, r in both["linears"].items())
    embedding = both["embedding"]
    vocab, hidden = analysis["quantization"]["embedding_shape"]
    assert embedding["bytes"] == stored_bytes(vocab, hidden, QuantFormat(embedding["bits"], embedding["group_size"]))
    assert both["budget"]["used_bytes"] == linear_bytes + embedding["bytes"] <= both["budget"]["capacity_bytes"]
    for unit in both["units"]:
        assert unit["group_size"] in (32, None)
        assert all(both["linears"][name]["group_size"] == unit["group_size"]
                   for name in shapes if name.startswith(f"model.layers.{unit['layer']}.") and
                   (".self_attn." in name) == (unit["unit"] == "attention"))
    for alone in ([32], ["channel"]):
        try:
            single = make_plan(recipe(group_size=alone, budget={"avg_bits": avg_bits}), analysis)["quantization"]
        except CompressorError:  # that group size alone does not fit this budget
            continue
        assert both["budget"]["summed_cost"] <= single["budget"]["summed_cost"] + 1e-12


def test_a_run_writes_the_predicted_bytes_names_each_group_size_and_transformers_loads_it(tiny_model_folder,
                                                                                        tmp_path):
    # The embedding kept in float, so that transformers' own classes load the artifact.
    quantize = dict(QUANTIZE, embeddings="keep", budget={"avg_bits": 3.0})
    spec = {"name": "groups", "calibration": CALIBRATION, "quantize": quantize,
            "evaluate": {"text": "embedded", "windows": 1, "seq_len": 32, "compare_original": False,
                         "speed": {"prompt_tokens": 8, "new_tokens": 2, "repeats": 1}}}
    out = compress(parse_recipe(spec), str(tiny_model_folder["llama"]), tmp_path / "out", quiet=True, log=lambda m: None)
    plan = json.loads((out / "plan.json").read_text())["quantization"]
    assert sum(tensor_bytes(out / MODEL_FILE).values()) == plan["predicted_tensor_bytes"]
    chosen = {(r["bits"], r["group_size"]) for r in plan["linears"].values()}
    assert {g for _, g in chosen} == {32, None}, chosen  # this budget mixes both group sizes
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    written = {(g["weights"]["num_bits"], g["weights"]["group_size"]) for g in config["config_groups"].values()}
    assert written == chosen
    import transformers

    import compressor

    ids = torch.randint(1, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = compressor.load(out).model(ids).logits
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
    assert float((ours - theirs).abs().max()) < 1e-4


def test_a_group_size_that_does_not_divide_the_widths_is_named(analysis):
    with pytest.raises(CompressorError, match=r"quantize.group_size: 128 does not divide the input width 64"):
        make_plan(recipe(group_size=[32, 128], budget={"avg_bits": 4.0}), analysis)


def test_a_list_of_group_sizes_needs_the_sensitivity_allocation():
    with pytest.raises(CompressorError, match=r"a list of group sizes .* needs allocate: sensitivity, got allocate: lim"):
        recipe(allocate="lim", embeddings=8, budget={"avg_bits": 4.0})


def test_a_plan_asking_for_unmeasured_group_sizes_says_what_is_missing(analysis):
    with pytest.raises(MissingRecord, match=r"group sizes \[32, 64\]"):
        make_plan(recipe(group_size=[32, 64], budget={"avg_bits": 4.0}), analysis)
