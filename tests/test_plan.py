"""The planner is a pure function of (recipe, analysis): test it on hand-built analyses."""

from __future__ import annotations

import json

import pytest

from compressor.errors import CompressorError
from compressor.pipeline import make_plan
from compressor.plan import PLAN_FORMAT, load_plan, save_plan, validate_plan
from compressor.stages.removal import removal_quotas, search_key
from compressor.transforms.prune import block_configs
from compressor.recipe import parse_recipe

# Redundancies chosen so that every unit has a distinct, known rank.
ATTN = [0.99, 0.10, 0.80, 0.30, 0.95, 0.50, 0.20, 0.98]
MLP = [0.97, 0.40, 0.05, 0.85, 0.15, 0.60, 0.70, 0.96]


def make_analysis(attention=ATTN, mlp=MLP, absent=()):
    """layers i with the given redundancies; `absent` lists (layer, kind) units that are already gone."""
    layers = []
    for i, (a, m) in enumerate(zip(attention, mlp)):
        layers.append({"layer": i,
                       "attention": None if (i, "attention") in absent else {"redundancy": a},
                       "mlp": None if (i, "mlp") in absent else {"redundancy": m}})
    return {"model": {"name": "hand-built"}, "layers": layers}


def recipe(**remove):
    return parse_recipe({"name": "t", "remove": remove})


def removed(plan):
    return [(u["layer"], u["unit"]) for u in plan["removal"]["removed"]]


def decided(plan, decision="remove"):
    return sorted((d["layer"], kind) for d in plan["layers"] for kind in ("attention", "mlp") if d[kind] == decision)


# ---- similarity --------------------------------------------------------------------------------

def test_no_removal_keeps_everything():
    plan = make_plan(parse_recipe({"name": "keep"}), make_analysis())
    assert plan["format"] == PLAN_FORMAT
    assert plan["recipe"] == "keep"
    assert plan["model"] == {"name": "hand-built"}
    assert plan["num_hidden_layers"] == 8
    assert plan["removal"] is None
    assert [(d["layer"], d["attention"], d["mlp"], d["notes"]) for d in plan["layers"]] == \
        [(i, "keep", "keep", "") for i in range(8)]


def test_similarity_removes_the_k_most_redundant_attention_units():
    # Protected: layers 0 and 7. Among 1..6 attention: 4 (0.95), 2 (0.80), 5 (0.50), 3 (0.30), ...
    plan = make_plan(recipe(attention=3), make_analysis())
    assert removed(plan) == [(4, "attention"), (2, "attention"), (5, "attention")]
    assert decided(plan) == [(2, "attention"), (4, "attention"), (5, "attention")]
    assert all(d["mlp"] == "keep" for d in plan["layers"])
    assert plan["removal"]["method"] == "similarity"
    assert plan["removal"]["quotas"] == {"attention": 3, "mlp": 0, "any": 0}
    assert plan["removal"]["protect"] == {"first": 1, "last": 1}


def test_similarity_notes_name_the_redundancy_and_rank():
    plan = make_plan(recipe(attention=2), make_analysis())
    assert "attention redundancy 0.9500" in plan["layers"][4]["notes"]
    assert "rank 1 of 12 candidates" in plan["layers"][4]["notes"]
    assert "attention redundancy 0.8000" in plan["layers"][2]["notes"]
    assert "rank 3 of 12 candidates" in plan["layers"][2]["notes"]  # mlp 3 (0.85) ranks 2nd
    assert plan["layers"][3]["notes"] == ""
    assert plan["layers"][0]["notes"] == "protected"
    assert plan["layers"][7]["notes"] == "protected"


def test_similarity_removes_the_k_most_redundant_mlp_units():
    # Among 1..6 mlp: 3 (0.85), 6 (0.70), 5 (0.60), 1 (0.40), 4 (0.15), 2 (0.05)
    plan = make_plan(recipe(mlp=2), make_analysis())
    assert removed(plan) == [(3, "mlp"), (6, "mlp")]
    assert decided(plan) == [(3, "mlp"), (6, "mlp")]
    assert "mlp redundancy 0.8500" in plan["layers"][3]["notes"]
    assert "mlp redundancy 0.7000" in plan["layers"][6]["notes"]


def test_per_kind_quotas_together():
    plan = make_plan(recipe(attention=1, mlp=2), make_analysis())
    assert sorted(removed(plan)) == [(3, "mlp"), (4, "attention"), (6, "mlp")]


def test_protected_layers_are_never_removed_even_when_most_redundant():
    # Layers 0 and 7 hold the most redundant units of both kinds (0.99/0.98/0.97/0.96).
    plan = make_plan(recipe(any=12), make_analysis())
    assert decided(plan) == sorted((i, k) for i in range(1, 7) for k in ("attention", "mlp"))
    for layer in (0, 7):
        assert plan["layers"][layer]["attention"] == "keep"
        assert plan["layers"][layer]["mlp"] == "keep"
        assert plan["layers"][layer]["notes"] == "protected"


def test_protect_more_layers():
    plan = make_plan(recipe(attention=2, protect={"first": 3, "last": 3}), make_analysis())
    # Only layers 3 and 4 are candidates.
    assert sorted(removed(plan)) == [(3, "attention"), (4, "attention")]
    assert [d["layer"] for d in plan["layers"] if d["notes"] == "protected"] == [0, 1, 2, 5, 6, 7]


def test_protect_nothing_allows_the_outer_layers():
    plan = make_plan(recipe(attention=2, protect={"first": 0, "last": 0}), make_analysis())
    assert removed(plan) == [(0, "attention"), (7, "attention")]


def test_fractional_budget_of_8_layers():
    plan = make_plan(recipe(attention=0.25), make_analysis())
    assert plan["removal"]["quotas"]["attention"] == 2
    assert removed(plan) == [(4, "attention"), (2, "attention")]


def test_fractional_budget_rounds_down_and_any_counts_both_kinds():
    quotas = removal_quotas(recipe(attention=0.3, mlp=0.2, any=0.25).remove, 8)
    assert quotas == {"attention": 2, "mlp": 1, "any": 4}


def test_whole_float_is_a_count():
    assert removal_quotas(recipe(attention=3.0).remove, 8)["attention"] == 3


def test_fraction_of_one_or_more_is_an_error():
    with pytest.raises(CompressorError, match=r"remove\.mlp: a fraction must be below 1, got 1\.5"):
        removal_quotas(recipe(mlp=1.5).remove, 8)


@pytest.mark.parametrize("fraction, layers, kind, expected", [
    (0.58, 50, "attention", 29),   # 0.58 * 50 is exactly 29
    (0.29, 50, "any", 29),         # 0.29 * 100 units is exactly 29
    (0.7, 90, "mlp", 63),
])
def test_fraction_that_is_exact_in_decimal_is_not_rounded_down_by_float_error(fraction, layers, kind, expected):
    assert removal_quotas(recipe(**{kind: fraction}).remove, layers)[kind] == expected


def test_any_quota_mixes_kinds_by_redundancy():
    # Candidates 1..6 of both kinds by redundancy: 4.att .95, 3.mlp .85, 2.att .80, 6.mlp .70, ...
    plan = make_plan(recipe(any=4), make_analysis())
    assert removed(plan) == [(4, "attention"), (3, "mlp"), (2, "attention"), (6, "mlp")]
    assert plan["layers"][3]["notes"].startswith("mlp redundancy 0.8500 (rank 2 of 12")


def test_kind_quota_is_spent_before_any():
    # attention=1 takes 4.att; any=2 then takes the next two of either kind: 3.mlp, 2.att.
    plan = make_plan(recipe(attention=1, any=2), make_analysis())
    assert removed(plan) == [(4, "attention"), (3, "mlp"), (2, "attention")]


def test_a_layer_with_both_units_removed_has_both_notes():
    plan = make_plan(recipe(attention=1, mlp=1, any=0, protect={"first": 0, "last": 7}), make_analysis())
    # Only layer 0 is a candidate.
    assert removed(plan) == [(0, "attention"), (0, "mlp")]
    notes = plan["layers"][0]["notes"]
    assert "attention redundancy 0.9900" in notes and "mlp redundancy 0.9700" in notes


def test_absent_units_are_not_candidates_and_stay_absent():
    analysis = make_analysis(absent={(4, "attention"), (3, "mlp")})
    plan = make_plan(recipe(attention=1, mlp=1), analysis)
    assert removed(plan) == [(2, "attention"), (6, "mlp")]
    assert plan["layers"][4]["attention"] == "absent"
    assert plan["layers"][3]["mlp"] == "absent"
    cfg = block_configs(plan)
    assert cfg[4]["attention"] == {"no_op": True}
    assert cfg[3]["ffn"] == {"no_op": True}


@pytest.mark.parametrize("remove, field, allowed", [
    ({"attention": 7}, "remove.attention", "0..6"),
    ({"mlp": 9}, "remove.mlp", "0..6"),
    ({"attention": 3, "protect": {"first": 3, "last": 3}}, "remove.attention", "0..2"),
])
def test_budget_larger_than_removable_units(remove, field, allowed):
    with pytest.raises(CompressorError) as info:
        make_plan(recipe(**remove), make_analysis())
    message = str(info.value)
    assert message.startswith(f"{field}: budget of ")
    assert message.endswith(f"allowed: {allowed}")
    assert "8 layers" in message


def test_total_budget_larger_than_removable_units():
    with pytest.raises(CompressorError) as info:
        make_plan(recipe(attention=6, any=7), make_analysis())
    message = str(info.value)
    assert message.startswith("remove: budgets add up to 13 units but only 12 units are removable")


def test_planner_does_not_modify_the_analysis():
    analysis = make_analysis()
    before = json.dumps(analysis, sort_keys=True)
    make_plan(recipe(any=3), analysis)
    assert json.dumps(analysis, sort_keys=True) == before


# ---- iterative / finercut ----------------------------------------------------------------------

def with_search(analysis, rec, order):
    quotas = removal_quotas(rec.remove, len(analysis["layers"]))
    search = dict(search_key(rec.remove, quotas),
                  order=[{"layer": layer, "unit": unit, "score": score} for layer, unit, score in order])
    return dict(analysis, removal_searches=[search])


GREEDY = [(5, "mlp", 0.0011), (2, "attention", 0.0023), (1, "mlp", 0.0040), (6, "attention", 0.0100)]


@pytest.mark.parametrize("method, metric", [("iterative", "redundancy"), ("finercut", "JS divergence from the original")])
def test_greedy_plans_take_the_recorded_order(method, metric):
    rec = recipe(method=method, any=4)
    plan = make_plan(rec, with_search(make_analysis(), rec, GREEDY))
    # Not the similarity order: the recorded search decides.
    assert removed(plan) == [(5, "mlp"), (2, "attention"), (1, "mlp"), (6, "attention")]
    assert plan["removal"]["method"] == method
    assert plan["layers"][5]["notes"] == f"{method} step 1: {metric} 0.00110"
    assert plan["layers"][6]["notes"] == f"{method} step 4: {metric} 0.01000"


def test_greedy_plan_takes_a_prefix_of_a_longer_single_kind_search():
    long = recipe(method="finercut", any=4)
    analysis = with_search(make_analysis(), long, GREEDY)
    plan = make_plan(recipe(method="finercut", any=2), analysis)
    assert removed(plan) == [(5, "mlp"), (2, "attention")]
    assert decided(plan) == [(2, "attention"), (5, "mlp")]


def test_greedy_plan_with_per_kind_quota_skips_other_kinds():
    rec = recipe(method="iterative", attention=2)
    order = [(3, "attention", 0.1), (1, "attention", 0.2)]
    plan = make_plan(rec, with_search(make_analysis(), rec, order))
    assert removed(plan) == [(3, "attention"), (1, "attention")]


@pytest.mark.parametrize("method", ["iterative", "finercut"])
def test_missing_search_is_a_clear_error(method):
    with pytest.raises(CompressorError) as info:
        make_plan(recipe(method=method, any=2), make_analysis())
    message = str(info.value)
    assert "no record of the removal stage" in message and f"{method} search" in message
    assert "compress analyze" in message


def test_search_for_other_settings_is_not_reused():
    recorded = recipe(method="finercut", any=4, search_samples=8)
    analysis = with_search(make_analysis(), recorded, GREEDY)
    for other in (recipe(method="iterative", any=4),                       # other method
                  recipe(method="finercut", any=4, search_samples=4),      # other search windows
                  recipe(method="finercut", any=4, protect={"first": 2, "last": 1}),
                  recipe(method="finercut", any=5),                        # a longer budget than searched
                  recipe(method="finercut", mlp=2)):                       # another kind
        with pytest.raises(CompressorError, match="no record of the removal stage .a (finercut|iterative) search"):
            make_plan(other, analysis)


# ---- plan files --------------------------------------------------------------------------------

def test_block_configs_match_the_decisions():
    plan = make_plan(recipe(attention=1, mlp=2), make_analysis())
    configs = block_configs(plan)
    assert len(configs) == 8
    assert [i for i, c in enumerate(configs) if c["attention"]["no_op"]] == [4]
    assert [i for i, c in enumerate(configs) if c["ffn"]["no_op"]] == [3, 6]
    assert configs[0] == {"attention": {"no_op": False}, "ffn": {"no_op": False}}


def test_save_and_load_plan_round_trip(tmp_path):
    plan = make_plan(recipe(any=3), make_analysis())
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    assert load_plan(path) == plan


def test_an_edited_plan_is_authoritative(tmp_path):
    plan = make_plan(recipe(attention=1), make_analysis())
    plan["layers"][1]["mlp"] = "remove"
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    loaded = load_plan(path)
    assert [i for i, c in enumerate(block_configs(loaded)) if c["ffn"]["no_op"]] == [1]


def test_load_plan_bad_json_names_the_line(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text('{\n  "format": "compressor-plan/1",\n  "layers": [,]\n}\n')
    with pytest.raises(CompressorError) as info:
        load_plan(path)
    assert str(info.value).startswith(f"{path}: not valid JSON (line 3:")


def test_load_plan_missing_file(tmp_path):
    with pytest.raises(CompressorError, match="plan not found: .*nope.json"):
        load_plan(tmp_path / "nope.json")


def test_unknown_decision_is_rejected_with_the_allowed_values(tmp_path):
    plan = make_plan(recipe(attention=1), make_analysis())
    plan["layers"][3]["mlp"] = "drop"
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    with pytest.raises(CompressorError) as info:
        load_plan(path)
    assert str(info.value) == f"{path}: layers[3].mlp is 'drop'; allowed: keep, remove, absent"


@pytest.mark.parametrize("bad, expected", [
    ([1, 2], "not a plan"),
    ({"layers": []}, "not a plan"),
    ({"format": "compressor-plan/0", "layers": []}, "not a plan"),
    ({"format": PLAN_FORMAT, "layers": {"0": {}}}, "not a plan"),
    ({"format": PLAN_FORMAT, "layers": [{"layer": 1, "attention": "keep", "mlp": "keep"}]},
     'layers[0] must be an object with "layer": 0'),
    ({"format": PLAN_FORMAT, "layers": ["keep"]}, 'layers[0] must be an object with "layer": 0'),
    ({"format": PLAN_FORMAT, "layers": [{"layer": 0, "mlp": "keep"}]}, "layers[0].attention is None"),
])
def test_validate_plan_rejects_malformed_plans(bad, expected):
    with pytest.raises(CompressorError) as info:
        validate_plan(bad, "p.json")
    assert str(info.value).startswith("p.json: ")
    assert expected in str(info.value)


def test_validate_plan_accepts_a_made_plan():
    plan = make_plan(recipe(mlp=1), make_analysis())
    assert validate_plan(plan) is plan


# ---- hostile plans and analyses -----------------------------------------------------------------

def plan_error(plan, where="p.json") -> str:
    with pytest.raises(CompressorError) as info:
        validate_plan(plan, where)
    return str(info.value)


def a_plan():
    return make_plan(recipe(attention=1), make_analysis())


QUANTIZATION = {"method": "rtn", "damp": 0.1, "act_order": True, "hessian_tokens": "equal",
                "linears": {"model.layers.1.mlp.up_proj": {"bits": 4, "group_size": 64, "symmetric": True}},
                "embedding": {"bits": "keep", "bytes": 0}, "exact_weights": [], "predicted_tensor_bytes": 100}


@pytest.mark.parametrize("edit, expected", [
    (lambda p: p.update(model="tiny"), "p.json: model is 'tiny'; allowed: an object describing the source model, or null"),
    (lambda p: p["layers"][1].update(layer=True), 'p.json: layers[1] must be an object with "layer": 1'),
    (lambda p: p.update(sparse_tokens="on"), "p.json: sparse_tokens is 'on'; allowed: an object"),
    (lambda p: p.update(sharing=[1]), "p.json: sharing is [1]; allowed: an object"),
    (lambda p: p.update(sharing={"groups": [{"projection": "q_proj", "layers": [1], "rank": 8, "residual_rank": 0,
                                             "basis": "q_proj_g0"}], "fit": "magic"}),
     "p.json: sharing.fit is 'magic'; allowed: \"activation\", \"weight\""),
    (lambda p: p.update(sharing={"groups": [{"projection": "q_proj", "layers": [1], "rank": 8, "residual_rank": 0,
                                             "basis": "../x"}], "fit": "weight"}),
     "p.json: sharing.groups[0].basis is '../x'; allowed: a basis name q_proj_gN"),
    (lambda p: p.update(sharing={"groups": [{"projection": "q_proj", "layers": [1], "rank": 8, "residual_rank": 0,
                                             "basis": "q_proj_g0"}], "fit": "activation"}),
     "p.json: sharing.calibration is None; allowed: an object with text, samples, seq_len and seed"),
    (lambda p: p.update(quantization=dict(QUANTIZATION, linears={"model.layers.1.mlp.up_proj": {
        "bits": 4.0, "group_size": 64, "symmetric": True}})),
     "p.json: quantization.linears['model.layers.1.mlp.up_proj'].bits is 4.0; allowed: 2, 3, 4, 5, 6, 8"),
    (lambda p: p.update(quantization=dict(QUANTIZATION, damp=float("nan"))),
     "p.json: quantization.damp is nan; allowed: a finite number > 0 and <= 100"),
    (lambda p: p.update(quantization=dict(QUANTIZATION, method="gptq")),
     "p.json: quantization.calibration is None"),
    (lambda p: p.update(quantization=dict(QUANTIZATION, method="gptq", calibration={
        "text": "embedded", "samples": "2", "seq_len": 32, "seed": 0})),
     "p.json: quantization.calibration.samples: input should be a valid integer (got '2')"),
    (lambda p: p.update(quantization=dict(QUANTIZATION, exact_weights=[{"module": "model.x", "row": 0, "column": 0}])),
     "p.json: quantization.exact_weights[0].module is 'model.x'; allowed: one of the modules in quantization.linears"),
    (lambda p: p.update(quantization=dict(QUANTIZATION, exact_weights=[
        {"module": "model.layers.1.mlp.up_proj", "row": -1, "column": 0}])),
     "p.json: quantization.exact_weights[0].row is -1"),
])
def test_validate_plan_checks_what_apply_reads(edit, expected):
    plan = a_plan()
    edit(plan)
    assert plan_error(plan).startswith(expected)


def test_a_quantization_section_that_is_complete_passes():
    plan = dict(a_plan(), quantization=QUANTIZATION)
    assert validate_plan(plan) is plan


def write_bytes(tmp_path, content: bytes):
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    return path


def load_error(path) -> str:
    with pytest.raises(CompressorError) as info:
        load_plan(path)
    return str(info.value)


def test_load_plan_remembers_the_file_for_later_checks(tmp_path):
    path = tmp_path / "plan.json"
    save_plan(a_plan(), path)
    assert load_plan(path).where == str(path)


@pytest.mark.parametrize("content, expected", [
    (b"", "not valid JSON (line 1: Expecting value)"),
    (b"[" * 100_000 + b"]" * 100_000, "JSON nested more than 64 levels deep"),
    (b'{"a": ' * 70 + b"1" + b"}" * 70, "JSON nested more than 64 levels deep"),
    (b'{"format": "compressor-plan/1", "format": "x"}', "an object repeats the key 'format'; each key may appear once"),
    (b'{"format": "\xe9"}', "not UTF-8 text (byte 0xe9 at offset 12); a plan must be UTF-8"),
    (b'{"x": ' + b"9" * 5000 + b"}", "not valid JSON (Exceeds the limit (4300 digits)"),
])
def test_load_plan_refuses_files_that_are_not_plans(tmp_path, content, expected):
    path = write_bytes(tmp_path, content)
    assert load_error(path).startswith(f"{path}: {expected}")


def test_load_plan_refuses_a_huge_file_before_reading(tmp_path):
    from compressor.safe_load import PLAN_MAX_BYTES

    path = write_bytes(tmp_path, b" " * (PLAN_MAX_BYTES + 1))
    assert load_error(path) == f"{path}: {PLAN_MAX_BYTES + 1} bytes, more than the {PLAN_MAX_BYTES} bytes a plan may have"


def analysis_error(rec, analysis) -> str:
    with pytest.raises(CompressorError) as info:
        make_plan(rec, analysis)
    return str(info.value)


@pytest.mark.parametrize("edit, expected", [
    (lambda a: a.update(format=PLAN_FORMAT), "analysis: format is 'compressor-plan/1'; allowed: 'compressor-analysis/1'"),
    (lambda a: a.update(layers={}), "analysis: not an analysis (expected 'layers'"),
    (lambda a: a.update(model=[1]), "analysis: model is [1]; allowed: an object"),
    (lambda a: a["layers"][3].update(layer=4), 'analysis: layers[3] must be an object with "layer": 3'),
    (lambda a: a["layers"][3].update(mlp="x"), "analysis: layers[3].mlp is 'x'; allowed: an object"),
    (lambda a: a["layers"][3]["mlp"].update(redundancy="high"),
     "analysis: layers[3].mlp.redundancy is 'high'; allowed: a finite number"),
    (lambda a: a["layers"][3]["mlp"].update(redundancy=float("nan")), "analysis: layers[3].mlp.redundancy is nan"),
])
def test_a_malformed_analysis_is_one_clean_error(edit, expected):
    analysis = make_analysis()
    edit(analysis)
    assert analysis_error(recipe(attention=1), analysis).startswith(expected)


def test_an_analysis_that_is_not_an_object():
    assert analysis_error(recipe(attention=1), [1]) == \
        "analysis: not an analysis (expected a JSON object written by `compress analyze`, got list)"


@pytest.mark.parametrize("step, expected", [
    ({"layer": 99, "unit": "mlp", "score": 0.1}, "removal_searches[0].order[0].layer is 99; allowed: an integer 0..7"),
    ({"layer": 2, "unit": "ffn", "score": 0.1}, "removal_searches[0].order[0].unit is 'ffn'"),
    ({"layer": 2, "unit": "mlp", "score": "x"}, "removal_searches[0].order[0].score is 'x'"),
    ({"layer": 0, "unit": "mlp", "score": 0.1}, "removes layer 0's mlp although it is protected"),
])
def test_a_recorded_search_with_bad_steps_is_refused(step, expected):
    rec = recipe(method="finercut", any=1)
    analysis = with_search(make_analysis(), rec, [])
    analysis["removal_searches"][0]["order"] = [step]
    assert expected in analysis_error(rec, analysis)


def test_a_filter_probe_without_layers_is_refused():
    rec = parse_recipe({"name": "t", "sparse_tokens": {"filter_layer": "auto", "keep_tokens": 64}})
    analysis = dict(make_analysis(), filter_probe={"cases": 4, "layers": []})
    assert analysis_error(rec, analysis).startswith("analysis: filter_probe.layers is []; allowed: a non-empty list")
