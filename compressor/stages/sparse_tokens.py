"""The sparse-token filter (GemFilter, PromptDistill): where the filter layer goes and with which settings.

measure: with `filter_layer: auto`, the needle-retrieval probe (compressor.analysis.filter_probe) on
the model after removal; a fixed layer needs nothing. decide: the probe's earliest layer that
recovers the needles (or the fixed layer), which must keep its attention. apply: the model's config
carries the filter's settings (the weights are not changed).
"""

from __future__ import annotations

import copy

from compressor.analysis.filter_probe import filter_layer_probe
from compressor.errors import CompressorError, MissingRecord
from compressor.execution.offload import with_config
from compressor.modeling import config_with
from compressor.recipe import Recipe
from compressor.stages.run import Applied, Run
from compressor.transforms.sparse_tokens import SETTINGS, SparseTokenSettings, check_settings

SECTION, PART, RECORD = "sparse_tokens", "sparse_tokens", "filter_probe"


def measure(model, recipe: Recipe, analysis: dict, run: Run) -> dict | None:
    sparse = recipe.sparse_tokens
    if sparse.filter_layer != "auto":
        return None
    return filter_layer_probe(model, run.tokenizer, sparse, recipe.calibration.text, run.quiet)


def choose_filter_layer(probe: dict, min_recall: float) -> tuple[int, str]:
    """The earliest layer reaching `min_recall`; failing that, the earliest with the best recall."""
    rows = probe["layers"]
    for row in rows:
        if row["recall"] >= min_recall:
            return row["layer"], (f"earliest layer whose selection recovers {row['recall']:.0%} of "
                                  f"{probe['cases']} probe needles (min_recall {min_recall:.0%})")
    best = max(row["recall"] for row in rows)
    row = next(r for r in rows if r["recall"] == best)
    return row["layer"], (f"no layer reaches min_recall {min_recall:.0%}; earliest layer with the best recall "
                          f"{best:.0%} of {probe['cases']} probe needles")


def decide(recipe: Recipe, analysis: dict, plan: dict) -> dict:
    """The filter's settings; `auto` takes the probe's earliest layer that recovers the needles."""
    sparse = recipe.sparse_tokens
    decisions = copy.deepcopy(plan["layers"])
    probe = None
    if sparse.filter_layer == "auto":
        probe = analysis.get(RECORD)
        if probe is None:
            raise MissingRecord("sparse_tokens", "the filter-layer probe for filter_layer: auto")
        layer, reason = choose_filter_layer(probe, sparse.probe.min_recall)
        chosen_by = "probe"
    else:
        layer, reason, chosen_by = sparse.filter_layer, "fixed by the recipe", "recipe"
    if layer >= len(decisions):
        raise CompressorError(f"sparse_tokens.filter_layer: {layer} is outside the model's layers 0..{len(decisions) - 1}")
    if decisions[layer]["attention"] != "keep":
        raise CompressorError(f"sparse_tokens.filter_layer: layer {layer} has no attention unit in this plan; "
                              f"a filter layer must keep its attention")
    decisions[layer]["notes"] = (decisions[layer]["notes"] + "; " if decisions[layer]["notes"] else "") + \
        f"sparse-token filter ({sparse.method}, keeps {sparse.keep_tokens} tokens)"
    settings = {k: getattr(sparse, k) for k in SETTINGS}
    part = dict(settings, filter_layer=layer, chosen_by=chosen_by, reason=reason, probe=probe)
    return {"layers": decisions, PART: part}


def sparse_settings(plan: dict) -> dict | None:
    """The part of the plan's sparse-token section that config.json carries (None: no filter)."""
    spec = plan.get(PART)
    return None if not spec else {k: spec[k] for k in SETTINGS}


def apply(model, plan: dict, run: Run, record=None) -> Applied:
    settings = sparse_settings(plan)
    if settings is None:
        return Applied(model)
    config = config_with(model.config, sparse_tokens=settings)
    check_settings(SparseTokenSettings.from_dict(settings), config, "plan sparse_tokens")
    return Applied(with_config(model, config, "the sparse-token filter"))
