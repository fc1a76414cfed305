"""Mixed-bit quantization through the real pipeline, on tiny random models.

- A GPTQ recipe with removal and an `avg_bits` budget on the tiny Llama (compressed once): the plan
  lists every linear with a width, the file holds exactly the predicted tensor bytes, and the
  artifact reloads (with `compressor.load` and with transformers) to the in-memory model's logits.
- Infeasible budgets are refused with a message naming the field and the smallest feasible figure.
- Weights kept exactly survive the export and both loaders.
- The `allocate` variants, `protect.layers` and `granularity: unit` produce valid plans.
- Round-to-nearest with `embeddings: keep` on the tiny Qwen2 (untied head): the embedding stays a
  float32 tensor, the weights are exactly round-to-nearest of the source, the artifact reloads.
- An asymmetric (zero-point) artifact reloads with both loaders.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import compressor
import exporters.safetensors as safetensors_exporter
from compressor import pipeline
from compressor.errors import CompressorError
from compressor.sources import load_model
from compressor.pipeline import analyze, compress, make_plan
from compressor.stages import quantization
from compressor.stages.run import Run
from compressor.recipe import parse_recipe
from compressor.transforms.quantize import QuantFormat, rtn_quantize, stored_bytes
from helpers import decoder_linears
from exporters.quantized_layout import formats_from_config
from compressor.manifest import write_manifest
from exporters.safetensors import MODEL_FILE, write_model
from helpers import tensor_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EVALUATE = {"text": "embedded", "windows": 2, "seq_len": 64,
            "speed": {"prompt_tokens": 16, "new_tokens": 4, "repeats": 1}, "compare_original": False}
CALIBRATION = {"samples": 4, "seq_len": 64}
MIXED_QUANTIZE = {"method": "gptq", "bits": [2, 4, 8], "group_size": 32, "budget": {"avg_bits": 4.5},
                  "sensitivity_samples": 2, "sensitivity_seq_len": 32}
RTN_QUANTIZE = {"method": "rtn", "bits": [4, 8], "group_size": 64, "allocate": "uniform", "embeddings": "keep",
                "budget": {"avg_bits": 6.0}}
# Plans made from one analysis of the unmodified tiny Llama (no removal, no sensitivity needed).
PLAN_QUANTIZE = {"method": "gptq", "bits": [2, 4, 8], "group_size": 32, "allocate": "uniform",
                 "budget": {"avg_bits": 4.5}}


@dataclass
class Built:
    folder: Path
    model: torch.nn.Module  # the in-memory model that compress() evaluated and exported
    quantized: dict


def compress_capturing(recipe: dict, source: Path, out: Path) -> Built:
    """Runs compress() and keeps the model it hands to the exporter."""
    captured = {}
    real_write = safetensors_exporter.write_model

    def capture(model, tokenizer, folder, quantized=None, *args, **kwargs):
        captured.update(model=model, quantized=quantized)
        return real_write(model, tokenizer, folder, quantized, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "write_model", capture)
        folder = compress(parse_recipe(recipe), str(source), out, quiet=True, log=lambda m: None)
    return Built(folder, captured["model"], captured["quantized"])


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def probe_ids() -> torch.Tensor:
    return torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(11))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(probe_ids()).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def auto_load(folder: Path, **kwargs):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


def config_targets(config: dict) -> list[str]:
    return [t for group in config["quantization_config"]["config_groups"].values() for t in group["targets"]]


def header_bytes(path: Path) -> int:
    with open(path, "rb") as handle:
        return 8 + struct.unpack("<Q", handle.read(8))[0]


def removed_units(plan: dict) -> set[tuple[int, str]]:
    return {(d["layer"], kind) for d in plan["layers"] for kind in ("attention", "mlp") if d[kind] == "remove"}


# ---------------------------------------------------------------------------------------------
# GPTQ, mixed widths, avg_bits budget, with removal


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tiny_model_folder) -> Built:
    recipe = {"name": "mixed", "calibration": CALIBRATION, "remove": {"attention": 1}, "quantize": MIXED_QUANTIZE,
              "evaluate": EVALUATE}
    return compress_capturing(recipe, tiny_model_folder["llama"], tmp_path_factory.mktemp("mixed") / "artifact")


def test_plan_gives_every_linear_a_width_within_the_budget(mixed):
    plan = read_json(mixed.folder / "plan.json")
    spec = plan["quantization"]
    assert spec["method"] == "gptq" and spec["allocate"] == "sensitivity" and spec["widths"] == [2, 4, 8]
    budget = spec["budget"]
    assert budget["requested"] == {"avg_bits": 4.5}
    assert budget["avg_bits"] <= 4.5
    assert budget["used_bytes"] <= budget["capacity_bytes"]
    assert budget["used_bytes"] == sum(u["bytes"] for u in spec["units"])

    artifact = compressor.load(mixed.folder).model
    names = {name for name, _ in decoder_linears(artifact)}
    assert len(names) == 6 * 7 - 4  # one attention unit (4 linears) removed
    assert set(spec["linears"]) == names
    assert {record["bits"] for record in spec["linears"].values()} <= {2, 4, 8}
    assert all(record["group_size"] == 32 and record["symmetric"] for record in spec["linears"].values())
    # Each unit's width is the width of each of its linears.
    for unit in spec["units"]:
        assert unit["bits"] in (2, 4, 8)
        prefix = f"model.layers.{unit['layer']}."
        assert all(spec["linears"][n]["bits"] == unit["bits"] for n in names if n.startswith(prefix))

    config = read_json(mixed.folder / "config.json")
    formats = formats_from_config(config["quantization_config"])
    expected = {name: QuantFormat(r["bits"], r["group_size"], r["symmetric"]) for name, r in spec["linears"].items()}
    expected["model.embed_tokens"] = QuantFormat(8, 32, True)  # default embeddings: 8
    assert formats == expected
    assert set(mixed.quantized) == set(expected)


def test_file_holds_exactly_the_predicted_tensor_bytes(mixed):
    plan = read_json(mixed.folder / "plan.json")
    path = mixed.folder / MODEL_FILE
    data = sum(tensor_bytes(path).values())
    assert data == plan["quantization"]["predicted_tensor_bytes"]
    assert path.stat().st_size - data == header_bytes(path)


def test_compressor_load_gives_the_in_memory_model(mixed):
    artifact = compressor.load(mixed.folder, packed=False).model  # float weights, compared tensor by tensor
    assert max_diff(logits(artifact), logits(mixed.model)) < 1e-6
    stored, evaluated = artifact.state_dict(), mixed.model.state_dict()
    assert set(stored) == set(evaluated)
    assert all(torch.equal(stored[k], evaluated[k]) for k in stored)


def test_transformers_load_with_default_dtype_matches_compressor_load(mixed):
    """`from_pretrained(folder)` with no dtype: the artifact must come back in float32."""
    expected = logits(compressor.load(mixed.folder).model)
    auto = auto_load(mixed.folder)
    assert type(auto).__name__ == "CompressedForCausalLM"
    assert auto.dtype == torch.float32
    assert max_diff(logits(auto), expected) < 1e-5


def test_transformers_load_in_float32_matches_compressor_load(mixed):
    expected = logits(compressor.load(mixed.folder).model)
    auto = auto_load(mixed.folder, dtype=torch.float32)
    assert max_diff(logits(auto), expected) < 1e-5


def test_removed_attention_stays_removed_and_unquantized(mixed):
    plan = read_json(mixed.folder / "plan.json")
    removed = removed_units(plan)
    assert len(removed) == 1
    (layer, kind), = removed
    assert kind == "attention"
    config = read_json(mixed.folder / "config.json")
    assert config["block_configs"][layer] == {"attention": {"no_op": True}, "ffn": {"no_op": False}}
    prefix = f"model.layers.{layer}.self_attn."
    assert not [t for t in config_targets(config) if t.startswith(prefix)]
    assert not [n for n in plan["quantization"]["linears"] if n.startswith(prefix)]
    assert not [n for n in tensor_bytes(mixed.folder / MODEL_FILE) if n.startswith(prefix)]
    assert compressor.load(mixed.folder).model.model.layers[layer].self_attn is None
    assert auto_load(mixed.folder, dtype=torch.float32).model.layers[layer].self_attn is None


def test_plan_records_widths_only_for_kept_units(mixed):
    plan = read_json(mixed.folder / "plan.json")
    for decision in plan["layers"]:
        for kind in ("attention", "mlp"):
            if decision[kind] == "keep":
                assert decision["bits"][kind] in (2, 4, 8)
            else:
                assert kind not in decision.get("bits", {}), decision


# ---------------------------------------------------------------------------------------------
# Plans from one analysis: budgets, allocate variants, protect, granularity


def plan_recipe(**quantize):
    return parse_recipe({"name": "plan", "calibration": CALIBRATION, "quantize": dict(PLAN_QUANTIZE, **quantize)})


@pytest.fixture(scope="module")
def tiny_analysis(tiny_model_folder) -> dict:
    loaded = load_model(str(tiny_model_folder["llama"]), quiet=True)
    analysis = analyze(loaded, plan_recipe(), quiet=True)
    assert "sensitivity" not in analysis["quantization"]
    return analysis


def linear_shapes(analysis: dict) -> list[tuple[int, int]]:
    return [tuple(linear["shape"]) for linear in analysis["quantization"]["linears"]]


def smallest_linear_bytes(analysis: dict, fmt: QuantFormat) -> int:
    return sum(stored_bytes(out_features, in_features, fmt) for out_features, in_features in linear_shapes(analysis))


def named_smallest_avg_bits(analysis: dict, group_size) -> tuple[str, float]:
    with pytest.raises(CompressorError) as error:
        make_plan(plan_recipe(bits=[2, 4], group_size=group_size, budget={"avg_bits": 1.0}), analysis)
    message = str(error.value)
    return message, float(re.search(r"smallest feasible ([0-9.]+)", message).group(1))


def test_infeasible_avg_bits_budget_names_the_smallest_feasible_figure(tiny_analysis):
    weights = sum(o * i for o, i in linear_shapes(tiny_analysis))
    smallest = 8 * smallest_linear_bytes(tiny_analysis, QuantFormat(2, 64, True)) / weights
    message, figure = named_smallest_avg_bits(tiny_analysis, 64)
    assert message.startswith("quantize.budget.avg_bits: 1.0 is below the smallest feasible")
    assert abs(figure - smallest) < 1e-3, (figure, smallest)


@pytest.mark.parametrize("group_size", (32, 64))
def test_named_smallest_avg_bits_is_feasible(tiny_analysis, group_size):
    """Asking for the figure the error names gives a plan (every linear at the lowest width)."""
    _, figure = named_smallest_avg_bits(tiny_analysis, group_size)
    plan = make_plan(plan_recipe(bits=[2, 4], group_size=group_size, budget={"avg_bits": figure}), tiny_analysis)
    assert {r["bits"] for r in plan["quantization"]["linears"].values()} == {2}


def test_infeasible_bytes_budget_names_the_smallest_feasible_size(tiny_analysis):
    inventory = tiny_analysis["quantization"]
    vocab, hidden = inventory["embedding_shape"]
    smallest = (inventory["other_tensor_bytes"] + stored_bytes(vocab, hidden, QuantFormat(8, 64, True))
                + smallest_linear_bytes(tiny_analysis, QuantFormat(2, 64, True)))
    with pytest.raises(CompressorError) as error:
        make_plan(plan_recipe(bits=[2, 4], group_size=64, budget={"bytes": smallest - 1}), tiny_analysis)
    message = str(error.value)
    assert "quantize.budget.bytes" in message and f"smallest feasible {smallest} bytes" in message
    plan = make_plan(plan_recipe(bits=[2, 4], group_size=64, budget={"bytes": smallest}), tiny_analysis)
    assert plan["quantization"]["predicted_tensor_bytes"] == smallest


def test_compress_refuses_an_infeasible_budget_and_writes_nothing(tiny_model_folder, tmp_path):
    recipe = {"name": "impossible", "calibration": CALIBRATION, "evaluate": EVALUATE,
              "quantize": dict(PLAN_QUANTIZE, bits=[2, 4], budget={"avg_bits": 1.0})}
    out = tmp_path / "impossible"
    with pytest.raises(CompressorError, match=r"quantize\.budget\.avg_bits: 1\.0 is below the smallest feasible"):
        compress(parse_recipe(recipe), str(tiny_model_folder["llama"]), out, quiet=True, log=lambda m: None)
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir()]


def test_an_unreachable_budget_is_refused_before_the_sensitivity_is_measured(tiny_model_folder, tmp_path,
                                                                               monkeypatch):
    import compressor.stages.quantization as stage

    def measured(*args, **kwargs):
        raise AssertionError("the sensitivity was measured for a budget no plan can meet")

    monkeypatch.setattr(stage, "quantization_sensitivity", measured)
    recipe = {"name": "impossible", "calibration": CALIBRATION, "evaluate": EVALUATE,
              "quantize": dict(PLAN_QUANTIZE, bits=[2, 4], allocate="sensitivity", embeddings="auto",
                               budget={"bytes": 1000})}
    with pytest.raises(CompressorError, match=r"quantize\.budget\.bytes: 1000 is below the smallest feasible \d+ bytes"):
        compress(parse_recipe(recipe), str(tiny_model_folder["llama"]), tmp_path / "out", quiet=True,
                 log=lambda m: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("allocate", ("uniform", "lim", "zd"))
@pytest.mark.parametrize("granularity", ("layer", "unit"))
def test_allocate_variants_plan_within_budget(tiny_analysis, allocate, granularity):
    spec = make_plan(plan_recipe(allocate=allocate, granularity=granularity), tiny_analysis)["quantization"]
    assert spec["allocate"] == allocate
    assert spec["budget"]["avg_bits"] <= 4.5
    assert spec["budget"]["used_bytes"] <= spec["budget"]["capacity_bytes"]
    assert set(spec["linears"]) == {linear["name"] for linear in tiny_analysis["quantization"]["linears"]}
    assert {r["bits"] for r in spec["linears"].values()} <= {2, 4, 8}
    assert len(spec["units"]) == (6 if granularity == "layer" else 12)
    # The plan's summed cost is the cost of the chosen widths.
    assert spec["budget"]["summed_cost"] == pytest.approx(sum(u["costs"][str(u["bits"])] for u in spec["units"]))
    if allocate != "uniform":  # importance scores make some units differ from weights x 4^-bits
        uniform = make_plan(plan_recipe(granularity=granularity), tiny_analysis)["quantization"]
        assert [u["costs"] for u in spec["units"]] != [u["costs"] for u in uniform["units"]]


@pytest.mark.parametrize("allocate", ("uniform", "lim"))
def test_protect_layers_pins_layer_zero_to_the_highest_width(tiny_analysis, allocate):
    spec = make_plan(plan_recipe(allocate=allocate, protect={"layers": [0]}), tiny_analysis)["quantization"]
    unit = next(u for u in spec["units"] if u["layer"] == 0)
    assert unit["bits"] == 8 and unit["pinned"]
    assert all(r["bits"] == 8 for n, r in spec["linears"].items() if n.startswith("model.layers.0."))
    assert all(u["pinned"] is None for u in spec["units"] if u["layer"] != 0)
    assert spec["budget"]["avg_bits"] <= 4.5
    with pytest.raises(CompressorError, match="quantize.protect.layers"):
        make_plan(plan_recipe(protect={"layers": [6]}), tiny_analysis)


def test_unit_granularity_gives_attention_and_mlp_their_own_widths(tiny_analysis):
    plan = make_plan(plan_recipe(granularity="unit"), tiny_analysis)
    spec = plan["quantization"]
    keys = [u["key"] for u in spec["units"]]
    assert sorted(keys) == sorted(f"{layer}.{kind}" for layer in range(6) for kind in ("attention", "mlp"))
    widths = {(u["layer"], u["unit"]): u["bits"] for u in spec["units"]}
    for name, record in spec["linears"].items():
        layer, kind = int(name.split(".")[2]), "attention" if ".self_attn." in name else "mlp"
        assert record["bits"] == widths[(layer, kind)]
        assert plan["layers"][layer]["bits"][kind] == widths[(layer, kind)]
    assert any(widths[(layer, "attention")] != widths[(layer, "mlp")] for layer in range(6))


# ---------------------------------------------------------------------------------------------
# Weights kept exactly


EXACT_MODULE = "model.layers.1.mlp.down_proj"


def test_exact_weight_survives_export_and_both_loaders(tiny_model_folder, tiny_analysis, tmp_path):
    loaded = load_model(str(tiny_model_folder["llama"]), quiet=True)
    original = loaded.model.get_submodule(EXACT_MODULE).weight.detach().clone()
    plan = make_plan(plan_recipe(), tiny_analysis)
    plan["quantization"]["exact_weights"].append({"module": EXACT_MODULE, "row": 3, "column": 5,
                                                  "weight": float(original[3, 5]), "reason": "test"})
    quantized = quantization.apply(loaded.model, plan, Run(loaded.tokenizer, quiet=True)).codes
    code = quantized[EXACT_MODULE]
    assert code.exact_index.tolist() == [3 * original.shape[1] + 5]
    codes_only = (code.codes[3, 5].float() * code.scale[3, 5 // 32].float()).item()
    assert codes_only != original[3, 5].item()  # the test is meaningful: plain codes would change it
    assert loaded.model.get_submodule(EXACT_MODULE).weight[3, 5].item() == original[3, 5].item()
    expected = logits(loaded.model)

    folder = tmp_path / "exact"
    write_model(loaded.model, loaded.tokenizer, folder, quantized)
    write_manifest(folder)
    config = read_json(folder / "config.json")
    assert config["exact_weights"] == {EXACT_MODULE: 1}
    stored = tensor_bytes(folder / MODEL_FILE)
    assert stored[f"{EXACT_MODULE}.exact_index"] == 8 and stored[f"{EXACT_MODULE}.exact_value"] == 4

    artifact = compressor.load(folder).model
    assert max_diff(logits(artifact), expected) == 0.0
    assert artifact.get_submodule(EXACT_MODULE).weight[3, 5].item() == original[3, 5].item()
    auto = auto_load(folder, dtype=torch.float32)
    assert max_diff(logits(auto), expected) == 0.0
    assert auto.get_submodule(EXACT_MODULE).weight[3, 5].item() == original[3, 5].item()


# ---------------------------------------------------------------------------------------------
# Round-to-nearest, embeddings kept, untied head (Qwen2)


@pytest.fixture(scope="module")
def rtn_keep(tmp_path_factory, tiny_model_folder) -> Built:
    recipe = {"name": "rtn-keep", "calibration": CALIBRATION, "quantize": RTN_QUANTIZE, "evaluate": EVALUATE}
    return compress_capturing(recipe, tiny_model_folder["qwen2"], tmp_path_factory.mktemp("rtn") / "artifact")


def test_kept_embedding_stays_a_float32_tensor(rtn_keep, tiny_model_folder):
    from safetensors import safe_open

    plan = read_json(rtn_keep.folder / "plan.json")
    assert plan["quantization"]["embedding"] == {"bits": "keep", "bytes": 512 * 64 * 4}
    with safe_open(str(rtn_keep.folder / MODEL_FILE), framework="pt") as handle:
        names = set(handle.keys())
        embedding = handle.get_slice("model.embed_tokens.weight")
        assert embedding.get_dtype() == "F32" and embedding.get_shape() == [512, 64]
        assert handle.get_slice("lm_head.weight").get_dtype() == "F32"
    assert not [n for n in names if n.startswith("model.embed_tokens.") and n != "model.embed_tokens.weight"]
    config = read_json(rtn_keep.folder / "config.json")
    targets = config_targets(config)
    assert "model.embed_tokens" not in targets and "lm_head" not in targets
    assert config["quantization_config"]["ignore"] == ["lm_head"]
    assert "model.embed_tokens" not in rtn_keep.quantized
    # The embedding is the source's, untouched, in memory and after reloading.
    source = load_model(str(tiny_model_folder["qwen2"])).model.model.embed_tokens.weight
    assert torch.equal(rtn_keep.model.model.embed_tokens.weight, source)
    assert torch.equal(compressor.load(rtn_keep.folder).model.model.embed_tokens.weight, source)


def test_rtn_weights_are_round_to_nearest_of_the_source(rtn_keep, tiny_model_folder):
    spec = read_json(rtn_keep.folder / "plan.json")["quantization"]
    assert spec["method"] == "rtn" and spec["budget"]["avg_bits"] <= 6.0
    assert {r["bits"] for r in spec["linears"].values()} <= {4, 8}
    source = load_model(str(tiny_model_folder["qwen2"])).model
    for name, module in decoder_linears(rtn_keep.model):
        record = spec["linears"][name]
        fmt = QuantFormat(record["bits"], record["group_size"], record["symmetric"])
        expected = rtn_quantize(source.get_submodule(name).weight.data, fmt).dequantize()
        assert torch.equal(module.weight.data, expected), name


def test_rtn_artifact_reloads_with_equal_logits(rtn_keep):
    plan = read_json(rtn_keep.folder / "plan.json")
    path = rtn_keep.folder / MODEL_FILE
    assert sum(tensor_bytes(path).values()) == plan["quantization"]["predicted_tensor_bytes"]
    expected = logits(rtn_keep.model)
    assert max_diff(logits(compressor.load(rtn_keep.folder).model), expected) < 1e-6
    auto = auto_load(rtn_keep.folder)
    assert auto.dtype == torch.float32
    assert max_diff(logits(auto), expected) < 1e-5


# ---------------------------------------------------------------------------------------------
# Asymmetric formats (packed zero points)


@pytest.fixture(scope="module")
def asymmetric(tmp_path_factory, tiny_model_folder, tiny_analysis) -> Built:
    """Round-to-nearest, 3 and 4 bits, zero points (embedding included), written by write_model."""
    loaded = load_model(str(tiny_model_folder["llama"]), quiet=True)
    plan = make_plan(plan_recipe(method="rtn", symmetric=False, bits=[3, 4]), tiny_analysis)
    quantized = quantization.apply(loaded.model, plan, Run(loaded.tokenizer, quiet=True)).codes
    folder = tmp_path_factory.mktemp("asym") / "artifact"
    write_model(loaded.model, loaded.tokenizer, folder, quantized)
    (folder / "plan.json").write_text(json.dumps(plan))
    write_manifest(folder)
    return Built(folder, loaded.model, quantized)


def test_asymmetric_artifact_reloads_with_compressor_load(asymmetric):
    assert all(q.zero_point is not None for q in asymmetric.quantized.values())
    stored = tensor_bytes(asymmetric.folder / MODEL_FILE)
    assert f"{EXACT_MODULE}.weight_zero_point" in stored
    plan = read_json(asymmetric.folder / "plan.json")
    assert sum(stored.values()) == plan["quantization"]["predicted_tensor_bytes"]
    assert max_diff(logits(compressor.load(asymmetric.folder).model), logits(asymmetric.model)) == 0.0


def test_group_size_not_dividing_the_model_widths_is_refused(tiny_analysis):
    # The tiny models are 64 wide: compressed-tensors needs whole groups.
    with pytest.raises(CompressorError, match=r"quantize.group_size: 128 does not divide the input width 64.*"
                                              r"allowed here: \[32, 64, 'channel'\]"):
        make_plan(plan_recipe(group_size=128), tiny_analysis)
