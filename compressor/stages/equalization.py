"""Activation-aware equalization (AWQ) before quantization: per input channel scales folded exactly
into the model so that rounding spends its range where the activations are large.

measure: the exponent alpha of every group of linears, searched on calibration activations of the
model after removal (compressor.transforms.equalize.search_alphas; the model is not changed).
decide: the alphas (a group whose best alpha is 0 is left alone). apply: the scales recomputed from
the same calibration windows and folded into the norms, up and value projections and the linears
that read them (fold_alphas); the model computes what it did, and the quantization stage after it
measures and rounds the equalized weights.
"""

from __future__ import annotations

import statistics

from compressor.errors import MissingRecord
from compressor.recipe import Recipe
from compressor.stages.run import Applied, Run
from compressor.transforms.equalize import fold_alphas, search_alphas
from compressor.transforms.quantize import recipe_format

SECTION, PART, RECORD = "equalize", "equalization", "equalization"


def settings_of(recipe: Recipe) -> dict:
    """What a recorded search must match to be reused by a plan."""
    eq, fmt = recipe.equalize, recipe_format(recipe.quantize, recipe.equalize.bits)
    return {"method": eq.method, "bits": eq.bits, "grid": eq.grid, "samples": eq.samples, "tokens": eq.tokens,
            "group_size": fmt.group_size, "symmetric": fmt.symmetric, "positive_scales": fmt.positive_scales,
            "calibration": recipe.calibration.model_dump()}


def _windows(run: Run, calibration: dict, samples: int):
    return run.calibration(calibration).input_ids[:samples]


def measure(model, recipe: Recipe, analysis: dict, run: Run) -> dict:
    settings = settings_of(recipe)
    fmt = recipe_format(recipe.quantize, recipe.equalize.bits)
    groups = search_alphas(model, _windows(run, settings["calibration"], settings["samples"]), fmt, run.batch_size,
                           settings["tokens"], settings["grid"], run.quiet)
    return dict(settings, groups=groups)


def decide(recipe: Recipe, analysis: dict, plan: dict) -> dict:
    record = analysis.get(RECORD)
    wanted = settings_of(recipe)
    if record is None or {k: record.get(k) for k in wanted} != wanted:
        raise MissingRecord("equalization", "the equalization search for this recipe's equalize and quantize settings")
    groups = [{"layer": g["layer"], "group": g["group"], "alpha": g["alpha"]} for g in record["groups"] if g["alpha"] > 0]
    return {PART: {"method": wanted["method"], "groups": groups, "searched_groups": len(record["groups"]),
                   "calibration": wanted["calibration"], "samples": wanted["samples"]}}


def summary(part: dict) -> str:
    alphas = [g["alpha"] for g in part["groups"]]
    median = f", median alpha {statistics.median(alphas):.2f}" if alphas else ""
    return f"plan: equalize {len(alphas)} of {part['searched_groups']} groups of linears ({part['method']}{median})"


def apply(model, plan: dict, run: Run, record=None) -> Applied:
    spec = plan.get(PART)
    if not spec:
        return Applied(model)
    fold_alphas(model, _windows(run, spec["calibration"], spec["samples"]), spec["groups"], run.batch_size, run.quiet)
    return Applied(model)
