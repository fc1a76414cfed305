"""The planner's sparse-token section, on hand-built analyses (no model)."""

from __future__ import annotations

import pytest

from compressor.errors import CompressorError, MissingRecord
from compressor.pipeline import make_plan
from compressor.plan import validate_plan
from compressor.recipe import parse_recipe
from test_plan import make_analysis


def recipe(filter_layer, remove=None, **sparse):
    data = {"name": "t", "sparse_tokens": dict({"filter_layer": filter_layer, "keep_tokens": 64}, **sparse)}
    if remove:
        data["remove"] = remove
    return parse_recipe(data)


def probe(recalls):
    return {"cases": 4, "tokens": 512, "layers": [{"layer": layer, "recall": r} for layer, r in recalls.items()]}


def test_fixed_filter_layer_is_passed_over_by_removal():
    # Attention redundancy ranks layer 4 (0.95) first, then 2 (0.80), then 5 (0.50).
    plan = make_plan(recipe(4, {"attention": 2}), make_analysis())
    removed = [(u["layer"], u["unit"]) for u in plan["removal"]["removed"]]
    assert removed == [(2, "attention"), (5, "attention")]
    spec = plan["sparse_tokens"]
    assert (spec["filter_layer"], spec["chosen_by"], spec["probe"]) == (4, "recipe", None)
    assert spec["keep_tokens"] == 64 and spec["method"] == "promptdistill"
    assert "sparse-token filter" in plan["layers"][4]["notes"]


def test_auto_takes_the_earliest_layer_reaching_min_recall():
    analysis = dict(make_analysis(), filter_probe=probe({1: 0.25, 3: 0.5, 4: 1.0, 6: 1.0}))
    spec = make_plan(recipe("auto", probe={"min_recall": 1.0}), analysis)["sparse_tokens"]
    assert spec["filter_layer"] == 4 and spec["chosen_by"] == "probe" and "earliest layer" in spec["reason"]
    assert make_plan(recipe("auto", probe={"min_recall": 0.5}), analysis)["sparse_tokens"]["filter_layer"] == 3
    # No layer reaches it: the earliest with the best recall, said so.
    low = dict(make_analysis(), filter_probe=probe({1: 0.25, 3: 0.75, 5: 0.75}))
    spec = make_plan(recipe("auto"), low)["sparse_tokens"]
    assert spec["filter_layer"] == 3 and spec["reason"].startswith("no layer reaches")


def test_auto_without_the_probe_is_a_missing_record_of_the_sparse_tokens_stage():
    with pytest.raises(MissingRecord, match="no record of the sparse_tokens stage .the filter-layer probe"):
        make_plan(recipe("auto"), make_analysis())


def test_filter_layer_without_attention_is_refused():
    with pytest.raises(CompressorError, match="layer 2 has no attention unit in this plan"):
        make_plan(recipe(2), make_analysis(absent={(2, "attention")}))
    with pytest.raises(CompressorError, match="filter_layer: 8 is outside the model's layers 0..7"):
        make_plan(recipe(8), make_analysis())


def test_an_edited_plan_with_a_removed_filter_layer_is_refused():
    plan = make_plan(recipe(4), make_analysis())
    plan["layers"][4]["attention"] = "remove"
    with pytest.raises(CompressorError, match="sparse_tokens.filter_layer 4 must be a layer whose attention"):
        validate_plan(plan)
    plan = make_plan(recipe(4), make_analysis())
    del plan["sparse_tokens"]["keep_tokens"]
    with pytest.raises(CompressorError, match="sparse_tokens lacks"):
        validate_plan(plan)
