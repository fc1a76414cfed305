"""The stage structure: every technique is one module with measure / decide / apply, decide is pure,
`compress plan` names the stage whose record an analysis lacks, nothing is measured, built or
fitted twice in one run, and library defaults are the recipe's defaults."""

from __future__ import annotations

import copy
import inspect
import json

import pytest

import compressor.analysis.sharing as sharing_analysis_module
import compressor.stages.quantization as quantization_stage
import compressor.stages.removal as removal_stage
import compressor.stages.sharing as sharing_stage
from compressor import cli, pipeline, stages
from compressor.analysis.collect import analyze_layers
from compressor.analysis.removal import greedy_removal_order, removal_sensitivity
from compressor.errors import MissingRecord
from compressor.recipe import Analysis, Quantize, SparseTokens, parse_recipe
from compressor.stages.run import Run
from compressor.transforms import share as share_transform
from compressor.transforms.quantize import gptq_quantize
from compressor.transforms.quantize_model import accumulate_hessians, quantize_model
from compressor.transforms.sparse_tokens import SparseTokenSettings, token_scores
from test_plan import make_analysis
from test_quantize_pipeline import CALIBRATION, EVALUATE

QUANTIZE = {"method": "gptq", "bits": [4, 8], "group_size": 32, "budget": {"avg_bits": 6.0},
            "allocate": "sensitivity", "sensitivity_samples": 2, "sensitivity_seq_len": 32}
SHARE = {"projections": ["q_proj", "k_proj", "v_proj", "o_proj"], "reduction": 0.1, "group_size": 2, "rank_multiple": 8}


def test_every_stage_has_the_three_steps_in_the_running_order():
    assert [s.PART for s in stages.STAGES] == ["removal", "sparse_tokens", "sharing", "equalization", "quantization"]
    for stage in stages.STAGES:
        for step in ("measure", "decide", "apply"):
            assert callable(getattr(stage, step)), (stage.__name__, step)
        assert hasattr(parse_recipe({"name": "r"}), stage.SECTION)
    recipe = parse_recipe({"name": "r", "quantize": QUANTIZE, "remove": {"attention": 1}})
    assert stages.named_by(recipe) == [removal_stage, quantization_stage]


# --- compress plan without a stage's record: exit 2, one line naming the stage --------------------

MISSING = {
    "removal": ({"remove": {"method": "finercut", "any": 2}}, "a finercut search"),
    "sparse_tokens": ({"sparse_tokens": {"filter_layer": "auto", "keep_tokens": 64, "keep_last": 8,
                                         "probe": {"tokens": 128}}}, "the filter-layer probe"),
    "sharing": ({"share": SHARE}, "sharing analysis for these settings"),
    "equalization": ({"equalize": {}, "quantize": QUANTIZE}, "the equalization search"),
    "quantization": ({"quantize": QUANTIZE}, "inventory of quantizable tensors"),
}


@pytest.mark.parametrize("stage", MISSING)
def test_compress_plan_names_the_stage_whose_record_is_missing(tmp_path, capsys, stage):
    section, what = MISSING[stage]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(dict({"name": "r"}, **section)))  # JSON is YAML
    analysis = tmp_path / "analysis.json"
    analysis.write_text(json.dumps(dict(make_analysis(), model={"source": "./model"})))
    out = tmp_path / "plan.json"
    code = cli.main(["plan", "--recipe", str(recipe), "--analysis", str(analysis), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"no record of the {stage} stage ({what}" in err[0]
    assert f"compress analyze --recipe {recipe} --model ./model --out DIR" in err[0]
    assert not out.exists()


def test_an_analysis_with_every_record_plans_every_stage():
    analysis = dict(make_analysis(), filter_probe={"cases": 2, "layers": [{"layer": 2, "recall": 1.0}]})
    recipe = parse_recipe({"name": "r", **MISSING["sparse_tokens"][0]})
    assert pipeline.make_plan(recipe, analysis)["sparse_tokens"]["filter_layer"] == 2


# --- decide is pure -------------------------------------------------------------------------------

def test_decide_changes_neither_the_analysis_nor_the_plan_it_reads():
    recipe = parse_recipe({"name": "r", "remove": {"attention": 2},
                           "sparse_tokens": {"filter_layer": 3, "keep_tokens": 64, "keep_last": 8,
                                             "probe": {"tokens": 128}}})
    analysis = make_analysis()
    plan = pipeline.make_plan(parse_recipe({"name": "r"}), analysis)
    for stage in stages.named_by(recipe):
        before = copy.deepcopy((analysis, plan))
        entries = stage.decide(recipe, analysis, plan)
        assert (analysis, plan) == before, stage.__name__
        plan = dict(plan, **entries)
    assert plan["layers"][3]["attention"] == "keep" and "sparse-token filter" in plan["layers"][3]["notes"]


def test_a_missing_record_is_its_own_error_type():
    with pytest.raises(MissingRecord) as info:
        pipeline.make_plan(parse_recipe({"name": "r", "quantize": QUANTIZE}), make_analysis())
    assert info.value.stage == "quantization"


# --- one run: nothing measured, built or fitted twice ---------------------------------------------

def counting(monkeypatch, module, name, calls):
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


def test_compress_measures_builds_and_fits_each_thing_once(tmp_path, tiny_model_folder, monkeypatch):
    calls: dict[str, int] = {}
    counting(monkeypatch, removal_stage, "remove_units", calls)
    counting(monkeypatch, sharing_stage, "share_weights", calls)
    counting(monkeypatch, sharing_stage, "sharing_analysis", calls)
    counting(monkeypatch, sharing_analysis_module, "input_second_moments", calls)
    counting(monkeypatch, sharing_stage, "input_second_moments", calls)
    counting(monkeypatch, share_transform, "input_second_moments", calls)
    counting(monkeypatch, quantization_stage, "quantization_sensitivity", calls)
    counting(monkeypatch, quantization_stage, "quantize_model", calls)
    counting(monkeypatch, pipeline, "analyze_layers", calls)
    recipe = parse_recipe({"name": "once", "calibration": CALIBRATION, "remove": {"attention": 1},
                           "share": SHARE, "quantize": QUANTIZE, "evaluate": EVALUATE})
    run_draws = []
    real_calibration = Run.calibration

    def calibration(self, settings):
        run_draws.append(tuple(sorted(settings.items())))
        return real_calibration(self, settings)

    monkeypatch.setattr(Run, "calibration", calibration)
    import compressor.stages.run as run_module

    counting(monkeypatch, run_module, "calibration_windows", calls)
    pipeline.compress(recipe, str(tiny_model_folder["llama"]), tmp_path / "out", quiet=True, log=lambda m: None)
    assert calls == {"analyze_layers": 1, "remove_units": 1, "sharing_analysis": 1, "input_second_moments": 1,
                     "share_weights": 1, "quantization_sensitivity": 1, "quantize_model": 1,
                     "calibration_windows": 1}, calls
    assert len(set(run_draws)) == 1  # every stage asked for the same windows, drawn once


# --- library defaults are the recipe's defaults ---------------------------------------------------

def default_of(function, parameter):
    return inspect.signature(function).parameters[parameter].default


@pytest.mark.parametrize("function, parameter, section, field", [
    (quantize_model, "damp", Quantize, "damp"),
    (quantize_model, "act_order", Quantize, "act_order"),
    (quantize_model, "token_weighting", Quantize, "hessian_tokens"),
    (quantize_model, "batch_size", Analysis, "batch_size"),
    (gptq_quantize, "damp", Quantize, "damp"),
    (gptq_quantize, "act_order", Quantize, "act_order"),
    (accumulate_hessians, "token_weighting", Quantize, "hessian_tokens"),
    (analyze_layers, "batch_size", Analysis, "batch_size"),
    (removal_sensitivity, "batch_size", Analysis, "batch_size"),
    (greedy_removal_order, "batch_size", Analysis, "batch_size"),
    (token_scores, "pool_width", SparseTokens, "pool_width"),
    (Run, "batch_size", Analysis, "batch_size"),
])
def test_library_defaults_are_the_recipe_defaults(function, parameter, section, field):
    assert default_of(function, parameter) == section.model_fields[field].default


def test_sparse_token_settings_default_like_the_recipe():
    settings, recipe = SparseTokenSettings("promptdistill", 3), SparseTokens()
    for field in ("keep_tokens", "keep_first", "keep_last", "pool_width"):
        assert getattr(settings, field) == getattr(recipe, field), field
