"""Cross-layer weight sharing (Basis Sharing): which layers' projections share one basis, at which rank.

measure: per projection, the layers' subspace similarity, the groups, and each group's fit-error
curve over ranks (compressor.analysis.sharing), on the model after removal; the calibration second
moments of the activation fit ride along with the record (not stored) so that apply reuses them.
decide: the ranks, chosen across all groups (a group may stay dense) to minimize the summed fit
error within the parameter budget (an exact knapsack). apply: the model with the groups factored.
"""

from __future__ import annotations

import copy
import math

from compressor.analysis.sharing import sharing_analysis, sharing_key
from compressor.bit_allocation import solve_knapsack
from compressor.errors import CompressorError, MissingRecord
from compressor.recipe import Quantize, Recipe
from compressor.stages.run import Applied, Run
from compressor.transforms.share import (basis_key, full_rank, input_second_moments, rank_for_budget, share_weights,
                                         shared_parameters, unit_of)

SECTION, PART, RECORD = "share", "sharing", "sharing"

# The per-layer fallback of a group offers at most this many points of its Pareto frontier.
FALLBACK_POINTS = 48


class SharingRecord(dict):
    """The sharing analysis's record (what analysis.json stores), carrying the calibration second
    moments it measured (`moments`, not stored) for the same run's fit."""

    moments = None


def measure(model, recipe: Recipe, analysis: dict, run: Run) -> SharingRecord:
    windows = run.calibration(recipe.calibration.model_dump()).input_ids
    record, moments = sharing_analysis(model, recipe.share, recipe.calibration, windows, run.batch_size, run.quiet)
    record = SharingRecord(record)
    record.moments = moments
    return record


# --- decide -------------------------------------------------------------------------------------

def current_record(recipe: Recipe, analysis: dict) -> dict | None:
    """The analysis's sharing record when it was measured for the recipe's settings, else None."""
    record = analysis.get(RECORD)
    if record is None or record.get("key") != sharing_key(recipe.share, recipe.calibration):
        return None
    return record


def check_measured_after_removal(record: dict, decisions: list[dict], where: str = "analysis") -> None:
    """The record is measured on the model after the plan's removals; one measured for another
    removal would share units that are gone: refused, with what to run."""
    for j, group in enumerate(record["groups"]):
        kind = unit_of(group["projection"])
        for layer in group["layers"]:
            if decisions[layer][kind] != "keep":
                raise CompressorError(f"{where}: sharing.groups[{j}] groups the {group['projection']} of layer "
                                      f"{layer}, whose {kind} unit this plan does not keep; it was measured for "
                                      "another removal; run `compress analyze --recipe RECIPE` again")


def decide(recipe: Recipe, analysis: dict, plan: dict) -> dict:
    record = current_record(recipe, analysis)
    if record is None:
        raise MissingRecord("sharing", "sharing analysis for these settings")
    decisions = copy.deepcopy(plan["layers"])
    check_measured_after_removal(record, decisions)
    part = dict(plan_sharing(recipe.share, record, recipe.quantize), calibration=recipe.calibration.model_dump())
    for group in shared_groups({PART: part}):
        for layer in group["layers"]:
            decisions[layer].setdefault("shared", {})[group["projection"]] = f"{group['basis']} rank {group['rank']}"
    return {PART: part, "layers": decisions}


def _per_layer_frontier(layer_costs: list[list[float]], shape: list[int], residual: int,
                        multiple: int) -> list[tuple[int, float, tuple]]:
    """Pareto frontier of (parameters, summed cost, rank per layer or None for dense) when each layer
    of a group gets its own basis, thinned to FALLBACK_POINTS evenly spaced points."""
    out_features, in_features = shape
    dense = in_features * out_features
    frontier: list[tuple[int, float, tuple]] = [(0, 0.0, ())]
    for curve in layer_costs:
        options = [(dense, 0.0, None)] + [
            (shared_parameters(in_features, out_features, 1, rank, residual), curve[rank], rank)
            for rank in range(multiple, full_rank(in_features, out_features, 1) + 1, multiple)
            if shared_parameters(in_features, out_features, 1, rank, residual) < dense]
        combined: dict[int, tuple[float, tuple]] = {}
        for parameters, cost, ranks in frontier:
            for size, option_cost, rank in options:
                held = combined.get(parameters + size)
                if held is None or cost + option_cost < held[0]:
                    combined[parameters + size] = (cost + option_cost, ranks + (rank,))
        frontier, lowest = [], math.inf
        for parameters in sorted(combined):
            cost, ranks = combined[parameters]
            if cost < lowest:
                lowest = cost
                frontier.append((parameters, cost, ranks))
    if len(frontier) > FALLBACK_POINTS:
        step = (len(frontier) - 1) / (FALLBACK_POINTS - 1)
        frontier = [frontier[round(i * step)] for i in range(FALLBACK_POINTS)]
    return frontier


def _rank_options(group: dict, shape: list[int], residual: int, multiple: int,
                  fallback: bool) -> list[tuple[int, float, int | tuple | None, bool]]:
    """(parameters, cost, rank, per layer) per choice: dense; every rank (a multiple of `multiple`)
    whose shared factors are smaller; and with `fallback`, the best ways of giving each layer of the
    group its own basis instead (per-layer SVD; the rank is then one per layer, None for dense).
    Cost: the summed per-layer relative error."""
    out_features, in_features = shape
    layers = len(group["layers"])
    dense = layers * in_features * out_features
    options = [(dense, 0.0, None, False)]
    for rank in range(multiple, full_rank(in_features, out_features, layers) + 1, multiple):
        parameters = shared_parameters(in_features, out_features, layers, rank, residual)
        if parameters >= dense:
            break
        options.append((parameters, group["cost"][rank], rank, False))
    if fallback and group.get("layer_costs"):
        options += [(parameters, cost, ranks, True) for parameters, cost, ranks in
                    _per_layer_frontier(group["layer_costs"], shape, residual, multiple) if parameters < dense]
    return options


def plan_sharing(share, record: dict, quantize: Quantize | None = None) -> dict:
    """Which groups of the sharing record share a basis and at which rank, for the recipe's
    parameter reduction."""
    multiple = share.rank_multiple
    if quantize is not None:  # coefficient inputs are rank wide: every group size must divide a rank
        multiple = math.lcm(multiple, *(g for g in quantize.group_sizes if g != "channel"))
    fallback = share.per_layer_fallback and share.allocate == "error"
    items = [_rank_options(g, record["projections"][g["projection"]]["shape"], share.residual_rank, multiple, fallback)
             for g in record["groups"]]
    dense_total = sum(options[0][0] for options in items)
    if not dense_total:
        raise CompressorError(f"share.projections: none of {share.projections} is left in the model to share")
    capacity = math.floor((1 - share.reduction) * dense_total)
    if share.allocate == "error":
        solution = solve_knapsack([[(option[0], option[1]) for option in options] for options in items], capacity)
        if solution is None:
            smallest = sum(min(option[0] for option in options) for options in items)
            raise CompressorError(
                f"share.reduction: {share.reduction} is out of reach; with rank multiple {multiple} and residual "
                f"rank {share.residual_rank} at most {1 - smallest / dense_total:.3f} of these parameters can go")
        picks = [options[choice] for options, choice in zip(items, solution[0])]
    else:
        picks = []
        for group in record["groups"]:
            out_features, in_features = record["projections"][group["projection"]]["shape"]
            layers = len(group["layers"])
            rank = rank_for_budget(in_features, out_features, layers, 1 - share.reduction, share.residual_rank,
                                   multiple)
            if rank == 0:
                raise CompressorError(
                    f"share.reduction: {share.reduction} leaves {group['projection']} of layers {group['layers']} "
                    f"no rank that is a multiple of {multiple}; lower the reduction or rank_multiple")
            picks.append((shared_parameters(in_features, out_features, layers, rank, share.residual_rank),
                          group["cost"][rank], rank, False))
    groups, counters = [], {}

    def add(projection: str, layers: list[int], rank, size: int, dense: int, error: float, note: str | None = None):
        entry = {"projection": projection, "layers": layers, "rank": rank,
                 "residual_rank": share.residual_rank if rank else 0, "parameters": size, "dense_parameters": dense,
                 "expected_error": round(error / len(layers), 6)}
        if rank:
            index = counters.get(projection, 0)
            counters[projection] = index + 1
            entry["basis"] = basis_key(projection, index)
        if note:
            entry["note"] = note
        groups.append(entry)

    for group, options, (size, error, rank, per_layer) in zip(record["groups"], items, picks):
        projection, layers = group["projection"], group["layers"]
        if not per_layer:
            add(projection, layers, rank, size, options[0][0], error)
            continue
        note = (f"per-layer fallback: sharing layers {layers[0]}-{layers[-1]} cost more error than a basis per "
                f"layer at these parameters")
        out_features, in_features = record["projections"][projection]["shape"]
        for layer, curve, layer_rank in zip(layers, group["layer_costs"], rank):
            dense = in_features * out_features
            size = shared_parameters(in_features, out_features, 1, layer_rank, share.residual_rank) if layer_rank else dense
            add(projection, [layer], layer_rank, size, dense, curve[layer_rank] if layer_rank else 0.0, note)
    parameters = sum(g["parameters"] for g in groups)
    shared_parameters_total = sum(g["parameters"] for g in groups if g["rank"] and len(g["layers"]) > 1)
    return {"fit": share.fit, "projections": list(share.projections), "reduction": share.reduction,
            "grouping": share.grouping, "group_size": share.group_size, "allocate": share.allocate,
            "per_layer_fallback": fallback, "rank_multiple": multiple, "groups": groups,
            "dense_parameters": dense_total, "parameters": parameters,
            "parameters_in_shared_groups": shared_parameters_total,
            "achieved_reduction": round(1 - parameters / dense_total, 6),
            "predicted_tensor_bytes": record["other_tensor_bytes"] + parameters * record["bytes_per_parameter"]}


def shared_groups(plan: dict) -> list[dict]:
    """The plan's groups that share a basis (a group left dense is not one)."""
    return [g for g in ((plan.get(PART) or {}).get("groups") or []) if g.get("rank")]


# --- apply --------------------------------------------------------------------------------------

def apply(model, plan: dict, run: Run, record: SharingRecord | None = None) -> Applied:
    """The model with the plan's shared groups factored (a new model; `model` is left as it was).
    The activation fit uses the moments measured with the record, or measures them."""
    groups = shared_groups(plan)
    if not groups:
        return Applied(model)
    spec = plan[PART]
    moments = getattr(record, "moments", None)
    if spec["fit"] == "activation" and moments is None:
        windows = run.calibration(spec["calibration"]).input_ids
        wanted = {(layer, g["projection"]) for g in groups for layer in g["layers"]}
        moments = input_second_moments(model, windows, run.batch_size, wanted, run.quiet)
    return Applied(share_weights(model, groups, spec["fit"], moments, run.quiet))
