"""The planner: a pure function (recipe, analysis) -> plan, and the plan's file format.

A plan says, layer by layer, whether each attention and MLP unit is kept or removed, and why.
`layers` is authoritative: a user may edit plan.json (flip "keep" to "remove") and `apply` does
exactly what it says.

Removal methods share one quota rule: budgets per kind (`attention`, `mlp`) plus `any` (either
kind); candidates are taken in the method's order and a candidate is accepted while its own kind's
quota, or the `any` quota, has room. `similarity` orders by one-shot redundancy (LLM-Drop);
`iterative` and `finercut` read a greedy search recorded in the analysis (redundancy recomputed
after each removal, or final-logit divergence), since finding it needs the model.
"""

from __future__ import annotations

import json
import os
import math
import re
from pathlib import Path

from compressor.bit_allocation import allocation_units, option_costs, solve_knapsack, unit_bytes
from compressor.errors import CompressorError, shorten
from compressor.recipe import (MAX_BYTES, MAX_LAYERS, MAX_PROMPT_TOKENS, MAX_RANK, MAX_UNITS, Quantize, Recipe,
                               Removal, SparseTokens)
from compressor.transforms.quantize import QuantFormat, exact_bytes, stored_bytes

PLAN_FORMAT = "compressor-plan/1"
UNIT_KINDS = ("attention", "mlp")
DECISIONS = ("keep", "remove")


def removal_quotas(removal: Removal, num_layers: int) -> dict[str, int]:
    """Budgets as unit counts; fractions are of that kind's units in the model, rounded down."""
    quotas = {}
    for kind in ("attention", "mlp", "any"):
        value = getattr(removal, kind)
        units = num_layers * (2 if kind == "any" else 1)
        if isinstance(value, float) and not value.is_integer():
            if value >= 1:
                raise CompressorError(f"remove.{kind}: a fraction must be below 1, got {value}")
            # round() first: 0.58 * 50 is 28.999999999999996 in binary floating point.
            quotas[kind] = math.floor(round(value * units, 9))
        else:
            quotas[kind] = int(value)
    return quotas


def removable_candidates(analysis: dict, protect, required: set[tuple[int, str]] = frozenset()) -> list[tuple[int, str]]:
    """Units removal may take: not in a protected outer layer, and not `required` by another part
    of the recipe (a fixed sparse-token filter layer needs its attention)."""
    layers = analysis["layers"]
    n = len(layers)
    protected = set(range(min(protect.first, n))) | set(range(max(n - protect.last, 0), n))
    return [(entry["layer"], kind) for entry in layers if entry["layer"] not in protected
            for kind in UNIT_KINDS if entry.get(kind) is not None and (entry["layer"], kind) not in required]


def required_units(recipe: Recipe) -> set[tuple[int, str]]:
    sparse = recipe.sparse_tokens
    if sparse is not None and isinstance(sparse.filter_layer, int):
        return {(sparse.filter_layer, "attention")}
    return set()


def check_budget(quotas: dict[str, int], candidates: list[tuple[int, str]], num_layers: int, protect) -> None:
    by_kind = {kind: sum(1 for _, k in candidates if k == kind) for kind in UNIT_KINDS}
    where = f"({num_layers} layers, protect first {protect.first} and last {protect.last})"
    for kind in UNIT_KINDS:
        if quotas[kind] > by_kind[kind]:
            raise CompressorError(
                f"remove.{kind}: budget of {quotas[kind]} units but only {by_kind[kind]} {kind} units "
                f"are removable {where}; allowed: 0..{by_kind[kind]}")
    if sum(quotas.values()) > len(candidates):
        raise CompressorError(
            f"remove: budgets add up to {sum(quotas.values())} units but only {len(candidates)} units are "
            f"removable {where}")


def fill_quotas(ordered: list[tuple[int, str]], quotas: dict[str, int]) -> list[tuple[int, str]]:
    left = dict(quotas)
    chosen = []
    for unit in ordered:
        kind = unit[1]
        if left[kind] > 0:
            left[kind] -= 1
        elif left["any"] > 0:
            left["any"] -= 1
        else:
            continue
        chosen.append(unit)
        if not any(left.values()):
            break
    return chosen


def search_key(removal: Removal, quotas: dict[str, int], required: set[tuple[int, str]] = frozenset()) -> dict:
    """What a recorded greedy search must match to be reused by a plan."""
    key = {"method": removal.method, "quotas": quotas,
           "protect": removal.protect.model_dump(),
           "search_samples": removal.search_samples, "search_seq_len": removal.search_seq_len}
    if required:
        key["required"] = [list(u) for u in sorted(required)]
    return key


def _search_covers(search: dict, wanted: dict) -> bool:
    if any(search.get(k) != wanted[k] for k in ("method", "protect", "search_samples", "search_seq_len")):
        return False
    if search.get("required", []) != wanted.get("required", []):
        return False
    if search["quotas"] == wanted["quotas"]:
        return True
    # A single-kind greedy search is a prefix sequence: its first k steps serve any smaller budget.
    have = {k: v for k, v in search["quotas"].items() if v}
    want = {k: v for k, v in wanted["quotas"].items() if v}
    return len(have) == 1 and len(want) == 1 and have.keys() == want.keys() and \
        next(iter(have.values())) >= next(iter(want.values()))


def make_plan(recipe: Recipe, analysis: dict, where: str = "analysis") -> dict:
    """The plan of `recipe` from `analysis` (checked first: what the recipe's planning reads must be
    there and well-formed, or one error names the analysis field)."""
    validate_analysis(recipe, analysis, where)
    layers = analysis["layers"]
    num_layers = len(layers)
    decisions = [{"layer": e["layer"], "attention": "keep" if e.get("attention") else "absent",
                  "mlp": "keep" if e.get("mlp") else "absent", "notes": ""} for e in layers]
    plan = {"format": PLAN_FORMAT, "recipe": recipe.name, "model": analysis.get("model", {}),
            "num_hidden_layers": num_layers, "removal": None, "layers": decisions}
    if recipe.remove is not None:
        plan_removal(recipe.remove, analysis, plan, required_units(recipe))
    if recipe.sparse_tokens is not None and not filter_probe_pending(recipe, analysis):
        plan["sparse_tokens"] = plan_sparse_tokens(recipe.sparse_tokens, analysis, decisions)
    if recipe.share is not None and not sharing_pending(recipe, analysis):
        check_measured_after_removal(analysis, decisions, where, "sharing")
        plan["sharing"] = dict(plan_sharing(recipe.share, analysis, recipe.quantize),
                               calibration=recipe.calibration.model_dump())
        for group in shared_groups(plan):
            for layer in group["layers"]:
                decisions[layer].setdefault("shared", {})[group["projection"]] = f"{group['basis']} rank {group['rank']}"
    if recipe.quantize is not None and not quantization_pending(analysis):
        check_measured_after_removal(analysis, decisions, where, "quantization")
        plan["quantization"] = dict(plan_quantization(recipe.quantize, analysis),
                                    calibration=recipe.calibration.model_dump())
        for unit in plan["quantization"]["units"]:
            kinds = UNIT_KINDS if unit["unit"] is None else (unit["unit"],)
            bits = decisions[unit["layer"]].setdefault("bits", {})
            bits.update({kind: unit["bits"] for kind in kinds if decisions[unit["layer"]][kind] == "keep"})
    return plan


def plan_removal(removal: Removal, analysis: dict, plan: dict, required: set[tuple[int, str]] = frozenset()) -> None:
    layers = analysis["layers"]
    num_layers = len(layers)
    decisions = plan["layers"]
    quotas = removal_quotas(removal, num_layers)
    candidates = removable_candidates(analysis, removal.protect, required)
    check_budget(quotas, candidates, num_layers, removal.protect)
    if removal.method == "similarity":
        ordered = sorted(candidates, key=lambda u: -layers[u[0]][u[1]]["redundancy"])
        chosen = fill_quotas(ordered, quotas)
        reasons = {u: f"{u[1]} redundancy {layers[u[0]][u[1]]['redundancy']:.4f} (rank {ordered.index(u) + 1} "
                      f"of {len(ordered)} candidates)" for u in chosen}
    else:
        wanted = search_key(removal, quotas, required)
        search = next((s for s in analysis.get("removal_searches", []) if _search_covers(s, wanted)), None)
        if search is None:
            raise CompressorError(
                f"the analysis has no {removal.method} search for quotas {quotas} and this protect/search "
                f"setting; run `compress analyze --recipe RECIPE` (or `compress --recipe`) to record it")
        steps = [(s["layer"], s["unit"]) for s in search["order"]]
        chosen = fill_quotas(steps, quotas)
        allowed = set(candidates)
        for unit in chosen:
            if unit not in allowed or chosen.count(unit) > 1:
                raise CompressorError(
                    f"analysis: the recorded {removal.method} search removes layer {unit[0]}'s {unit[1]} "
                    f"{'twice' if unit in allowed else 'although it is protected or required by the recipe'}; "
                    "run `compress analyze --recipe RECIPE` again")
        metric = "JS divergence from the original" if removal.method == "finercut" else "redundancy"
        reasons = {(s["layer"], s["unit"]): f"{removal.method} step {i + 1}: {metric} {s['score']:.5f}"
                   for i, s in enumerate(search["order"])}
    protected = sorted({e["layer"] for e in layers} - {u[0] for u in candidates})
    for layer in protected:
        decisions[layer]["notes"] = "protected"
    for unit in chosen:
        decisions[unit[0]][unit[1]] = "remove"
        decisions[unit[0]]["notes"] = "; ".join(filter(None, [decisions[unit[0]]["notes"], reasons[unit]]))
    plan["removal"] = {"method": removal.method, "quotas": quotas, "protect": removal.protect.model_dump(),
                       "removed": [{"layer": u[0], "unit": u[1]} for u in chosen]}


def block_configs(plan: dict) -> list[dict]:
    """The config.json `block_configs` a plan implies (a unit already absent stays absent)."""
    return [{"attention": {"no_op": d["attention"] != "keep"}, "ffn": {"no_op": d["mlp"] != "keep"}}
            for d in plan["layers"]]


def save_plan(plan: dict, path: str | Path) -> None:
    """Writes plan.json whole or not at all (a temporary sibling renamed into place)."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        staging.write_text(json.dumps(plan, indent=2) + "\n")
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


SPARSE_SETTINGS = ("method", "filter_layer", "keep_tokens", "keep_first", "keep_last", "pool_width")


def filter_probe_pending(recipe: Recipe, analysis: dict) -> bool:
    """True while `filter_layer: auto` lacks its probe (run on the model after removal)."""
    return recipe.sparse_tokens.filter_layer == "auto" and analysis.get("filter_probe") is None


def plan_sparse_tokens(sparse: SparseTokens, analysis: dict, decisions: list[dict]) -> dict:
    """The filter's settings; `auto` takes the probe's earliest layer that recovers the needles."""
    from compressor.analysis.filter_probe import choose_filter_layer

    probe = None
    if sparse.filter_layer == "auto":
        probe = analysis["filter_probe"]
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
    settings = {k: getattr(sparse, k) for k in SPARSE_SETTINGS}
    return dict(settings, filter_layer=layer, chosen_by=chosen_by, reason=reason, probe=probe)


def sparse_settings(plan: dict) -> dict | None:
    """The part of the plan's sparse-token section that config.json carries (None: no filter)."""
    spec = plan.get("sparse_tokens")
    return None if not spec else {k: spec[k] for k in SPARSE_SETTINGS}


def quantization_pending(analysis: dict) -> bool:
    """True while the analysis lacks the quantization inventory (it is measured on the model after
    removal, so the pipeline plans removal first); the plan then has no quantization section."""
    return analysis.get("quantization") is None


def quant_format(quantize: Quantize, bits: int) -> QuantFormat:
    return QuantFormat(bits, None if quantize.group_size == "channel" else quantize.group_size, quantize.symmetric)


def sensitivity_key(quantize: Quantize) -> dict:
    """What a recorded sensitivity measurement must match to be reused by a plan."""
    return {"method": quantize.method, "group_size": quantize.group_size, "symmetric": quantize.symmetric,
            "granularity": quantize.granularity, "samples": quantize.sensitivity_samples,
            "seq_len": quantize.sensitivity_seq_len, "damp": quantize.damp, "act_order": quantize.act_order,
            "hessian_tokens": quantize.hessian_tokens}


def protected_outliers(quantize: Quantize, analysis: dict, linear_names: set[str]):
    """(weights kept exactly, {layer: reason} pinned to the highest width) from the recipe's protect."""
    exact, pinned = [], {}
    num_layers = len(analysis["layers"])
    for layer in quantize.protect.layers:
        if not 0 <= layer < num_layers:
            raise CompressorError(f"quantize.protect.layers: layer {layer} does not exist; allowed: 0..{num_layers - 1}")
        pinned[layer] = "protected by the recipe"
    candidates = analysis.get("super_weight_candidates", [])
    if quantize.protect.outliers in ("auto", "keep"):
        for c in candidates:
            module = f"model.layers.{c['layer']}.mlp.down_proj"
            if module in linear_names:
                exact.append({"module": module, "row": c["row"], "column": c["column"], "weight": c["weight"],
                              "reason": f"super-weight candidate (down_proj output peak {c['output_peak']:.0f})"})
    elif quantize.protect.outliers == "pin":
        for c in candidates:
            pinned.setdefault(c["layer"], f"super-weight candidate at row {c['row']}, column {c['column']}")
        first_massive = next((e["layer"] for e in analysis["layers"]
                              if (e.get("massive_activations") or {}).get("count")), None)
        if first_massive is not None:
            pinned.setdefault(first_massive, "massive activations first appear here")
    return exact, pinned


def check_group_size(quantize: Quantize, inventory: dict) -> None:
    if quantize.group_size == "channel":
        return
    widths = {shape[1] for shape in (lin["shape"] for lin in inventory["linears"])}
    if quantize.embeddings != "keep":
        widths.add(inventory["embedding_shape"][1])
    bad = sorted(w for w in widths if w % quantize.group_size)
    if bad:
        allowed = [g for g in (32, 64, 128) if all(w % g == 0 for w in widths)] + ["channel"]
        raise CompressorError(f"quantize.group_size: {quantize.group_size} does not divide the input width "
                              f"{bad[0]} of this model's quantized tensors; allowed here: {allowed}")


def plan_quantization(quantize: Quantize, analysis: dict) -> dict:
    """Bit width of every decoder linear: the exact knapsack optimum under the budget."""
    inventory = analysis["quantization"]
    widths = list(quantize.bits)
    check_group_size(quantize, inventory)
    units = allocation_units(inventory["linears"], quantize.granularity)
    exact, pinned = protected_outliers(quantize, analysis, {lin["name"] for lin in inventory["linears"]})
    sensitivity = None
    if quantize.allocate == "sensitivity":
        measured = inventory.get("sensitivity") or {}
        wanted = sensitivity_key(quantize)
        if {k: measured.get(k) for k in wanted} != wanted or not set(widths) <= set(measured.get("bits", [])):
            raise CompressorError("the analysis has no quantization sensitivity for these settings "
                                  f"({wanted}, bits {widths}); run `compress --recipe RECIPE` to measure it")
        sensitivity = measured["scores"]
    check_costs_recorded(quantize, analysis, units, widths, sensitivity)
    costs = option_costs(units, widths, quantize.allocate, analysis["layers"], sensitivity)
    items = []
    for unit, unit_costs in zip(units, costs):
        options = [(unit_bytes(unit, quant_format(quantize, b)), c) for b, c in zip(widths, unit_costs)]
        items.append(options[-1:] if unit["layer"] in pinned else options)
    vocab, hidden = inventory["embedding_shape"]
    if quantize.embeddings == "keep":
        embedding = {"bits": "keep", "bytes": vocab * hidden * 4}
    else:
        fmt = quant_format(quantize, quantize.embeddings)
        embedding = dict(format_record(fmt), bytes=stored_bytes(vocab, hidden, fmt))
    fixed = inventory["other_tensor_bytes"] + embedding["bytes"] + exact_bytes(len(exact))
    weights = sum(u["weights"] for u in units)
    if quantize.budget.avg_bits is not None:
        capacity = math.floor(quantize.budget.avg_bits * weights / 8)
    else:
        capacity = quantize.budget.bytes - fixed
    solution = solve_knapsack(items, capacity)
    if solution is None:
        smallest = sum(min(size for size, _ in options) for options in items)
        if quantize.budget.avg_bits is not None:
            raise CompressorError(
                f"quantize.budget.avg_bits: {quantize.budget.avg_bits} is below the smallest feasible "
                f"{math.ceil(8000 * smallest / weights) / 1000:.3f} bits per weight for widths {widths} with group size "
                f"{quantize.group_size} (scales included) and the pinned layers")
        raise CompressorError(
            f"quantize.budget.bytes: {quantize.budget.bytes} is below the smallest feasible {smallest + fixed} bytes "
            f"for widths {widths} with group size {quantize.group_size}, embedding {quantize.embeddings} "
            f"and the pinned layers")
    choices, used, total_cost = solution
    unit_records, linears = [], {}
    for unit, options, unit_costs, choice in zip(units, items, costs, choices):
        bits = widths[-1] if unit["layer"] in pinned else widths[choice]
        fmt = quant_format(quantize, bits)
        unit_records.append({"key": unit["key"], "layer": unit["layer"], "unit": unit["unit"], "bits": bits,
                             "bytes": options[choice][0], "weights": unit["weights"],
                             "pinned": pinned.get(unit["layer"]),
                             "costs": {str(b): c for b, c in zip(widths, unit_costs)}})
        for name in unit["linears"]:
            linears[name] = format_record(fmt)
    return {
        "method": quantize.method, "damp": quantize.damp, "act_order": quantize.act_order,
        "hessian_tokens": quantize.hessian_tokens,
        "allocate": quantize.allocate, "granularity": quantize.granularity, "widths": widths,
        "budget": {"requested": quantize.budget.model_dump(exclude_none=True), "capacity_bytes": capacity,
                   "used_bytes": used, "avg_bits": 8 * used / weights, "summed_cost": total_cost},
        "predicted_tensor_bytes": fixed + used,
        "embedding": embedding, "exact_weights": exact, "units": unit_records, "linears": linears,
    }


def format_record(fmt: QuantFormat) -> dict:
    return {"bits": fmt.bits, "group_size": fmt.group_size, "symmetric": fmt.symmetric}


# --- cross-layer weight sharing ------------------------------------------------------------------

def sharing_pending(recipe: Recipe, analysis: dict) -> bool:
    """True while the analysis lacks a sharing record for the recipe's settings."""
    from compressor.analysis.sharing import sharing_key

    record = analysis.get("sharing")
    return record is None or record["key"] != sharing_key(recipe.share, recipe.calibration)


def share_groups(layers: list[int], similarity: list[list[float]], grouping: str, group_size: int) -> list[list[int]]:
    """Contiguous groups of `layers`: runs of `group_size` (adjacent), or (similarity) as many groups
    as that makes, each at most twice `group_size` long, placed to minimize the summed dissimilarity
    of each member to the rest of its group (a layer alone counts as wholly dissimilar)."""
    n = len(layers)
    if grouping == "adjacent" or group_size == 1 or n <= 1:
        return [layers[i:i + group_size] for i in range(0, n, group_size)]
    count, longest = math.ceil(n / group_size), 2 * group_size

    def cost(start: int, stop: int) -> float:
        if stop - start == 1:
            return 1.0
        members = range(start, stop)
        return sum(1 - sum(similarity[a][b] for b in members if b != a) / (stop - start - 1) for a in members)

    best = {(0, 0): (0.0, None)}  # (groups made, layers covered) -> (cost, previous cover)
    for made in range(1, count + 1):
        for stop in range(1, n + 1):
            options = [(best[(made - 1, start)][0] + cost(start, stop), start)
                       for start in range(max(0, stop - longest), stop) if (made - 1, start) in best]
            if options:
                best[(made, stop)] = min(options)
    groups, stop = [], n
    for made in range(count, 0, -1):
        start = best[(made, stop)][1]
        groups.append(layers[start:stop])
        stop = start
    return groups[::-1]


# The per-layer fallback of a group offers at most this many points of its Pareto frontier.
FALLBACK_POINTS = 48


def _per_layer_frontier(layer_costs: list[list[float]], shape: list[int], residual: int,
                        multiple: int) -> list[tuple[int, float, tuple]]:
    """Pareto frontier of (parameters, summed cost, rank per layer or None for dense) when each layer
    of a group gets its own basis, thinned to FALLBACK_POINTS evenly spaced points."""
    from compressor.transforms.share import full_rank, shared_parameters

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
    from compressor.transforms.share import full_rank, shared_parameters

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


def plan_sharing(share, analysis: dict, quantize: Quantize | None = None) -> dict:
    """Which groups share a basis and at which rank, for the recipe's parameter reduction."""
    from compressor.transforms.share import basis_key, rank_for_budget, shared_parameters

    record = analysis["sharing"]
    multiple = share.rank_multiple
    if quantize is not None and quantize.group_size != "channel":
        multiple = math.lcm(multiple, quantize.group_size)  # coefficient inputs are rank wide
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
    return [g for g in ((plan.get("sharing") or {}).get("groups") or []) if g.get("rank")]


# --- plan files: everything `apply` reads, checked before any work ------------------------------
#
# validate_plan checks a plan on its own (types, ranges, cross-references between its sections);
# check_plan_for_model checks it against the loaded model (layer count, units, module names and
# shapes) before the long work of `apply` starts. Both raise one CompressorError naming the file
# and the field. Fields that are only informational (notes, costs, reasons) are not checked.

ANALYSIS_FORMAT = "compressor-analysis/1"
SPARSE_METHODS = ("gemfilter", "promptdistill")
QUANT_METHODS = ("rtn", "gptq")
PLAN_BITS = (2, 3, 4, 8)
PLAN_GROUP_SIZES = (32, 64, 128, None)
HESSIAN_TOKENS = ("equal", "raw")
SHARE_FITS = ("activation", "weight")
MAX_PLAN_ENTRIES = 1_000_000
MAX_MODULE_NAME = 200


class PlanFile(dict):
    """A plan read from a file: a plain dict that also remembers the file (`where`), so that the
    checks made later, against the model, name it."""

    where = "plan"


def _bad(where: str, field: str, value, allowed: str) -> CompressorError:
    return CompressorError(f"{where}: {field} is {shorten(value, 60)}; allowed: {allowed}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def _need_int(where: str, field: str, value, low: int, high: int) -> int:
    if not _is_int(value) or not low <= value <= high:
        raise _bad(where, field, value, f"an integer {low}..{high}")
    return value


def _need_number(where: str, field: str, value, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    ok = _is_number(value) and (low is None or (value > low if low_open else value >= low)) and \
        (high is None or value <= high)
    if not ok:
        bounds = ([f"{'>' if low_open else '>='} {low}"] if low is not None else []) + \
            ([f"<= {high}"] if high is not None else [])
        raise _bad(where, field, value, " ".join(["a finite number", " and ".join(bounds)]).strip())
    return value


def _need_choice(where: str, field: str, value, allowed: tuple):
    # Types matter: 4.0 is not the width 4, true is not 1.
    if not any(type(value) is type(a) and value == a for a in allowed):
        raise _bad(where, field, value, ", ".join("null" if a is None else json.dumps(a) for a in allowed))
    return value


def _need_object(where: str, field: str, value, what: str) -> dict:
    if not isinstance(value, dict):
        raise _bad(where, field, value, what)
    return value


def _need_list(where: str, field: str, value, what: str, nonempty: bool = False) -> list:
    if not isinstance(value, list) or (nonempty and not value) or len(value) > MAX_PLAN_ENTRIES:
        raise _bad(where, field, value, what)
    return value


def _need_name(where: str, field: str, value) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_MODULE_NAME or not value.isprintable():
        raise _bad(where, field, value, f"a module name (text of 1..{MAX_MODULE_NAME} characters)")
    return value


def check_calibration(settings, where: str, field: str) -> dict:
    """Calibration settings recorded in a plan, by the recipe's own schema and bounds."""
    from pydantic import ValidationError

    from compressor.recipe import Calibration, describe_validation_error

    _need_object(where, field, settings, "an object with text, samples, seq_len and seed")
    missing = [k for k in Calibration.model_fields if k not in settings]
    if missing:
        raise CompressorError(f"{where}: {field} lacks {missing}")
    try:
        Calibration.model_validate(settings, strict=True)  # a plan is read as it is: "32" is not 32
    except ValidationError as exc:
        raise CompressorError(describe_validation_error(exc, where, Calibration, field)) from None
    return settings


def validate_plan(plan, where: str = "plan") -> dict:
    """Checks a plan on its own: what `apply` reads, with its types, ranges and cross-references."""
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT or not isinstance(plan.get("layers"), list):
        raise CompressorError(f"{where}: not a plan (expected a JSON object with format {PLAN_FORMAT!r} and 'layers')")
    layers = plan["layers"]
    if not 0 < len(layers) <= MAX_LAYERS:
        raise CompressorError(f"{where}: layers has {len(layers)} entries; allowed: 1..{MAX_LAYERS}")
    for i, d in enumerate(layers):
        if not isinstance(d, dict) or not _is_int(d.get("layer")) or d.get("layer") != i:
            raise CompressorError(f"{where}: layers[{i}] must be an object with \"layer\": {i}")
        for kind in UNIT_KINDS:
            if not isinstance(d.get(kind), str) or d.get(kind) not in DECISIONS + ("absent",):
                raise _bad(where, f"layers[{i}].{kind}", d.get(kind), "keep, remove, absent")
    if plan.get("model") is not None:
        _need_object(where, "model", plan["model"], "an object describing the source model, or null")
    _validate_sparse_tokens(plan, where)
    validate_sharing(plan, where)
    _validate_quantization(plan, where)
    return plan


def _validate_sparse_tokens(plan: dict, where: str) -> None:
    spec = plan.get("sparse_tokens")
    if spec is None or spec == {}:
        return
    _need_object(where, "sparse_tokens", spec, "an object with the filter's settings, or null")
    missing = [k for k in SPARSE_SETTINGS if k not in spec]
    if missing:
        raise CompressorError(f"{where}: sparse_tokens lacks {missing}")
    _need_choice(where, "sparse_tokens.method", spec["method"], SPARSE_METHODS)
    layer = spec["filter_layer"]
    if not _is_int(layer) or not 0 <= layer < len(plan["layers"]) or plan["layers"][layer]["attention"] != "keep":
        raise CompressorError(f"{where}: sparse_tokens.filter_layer {shorten(layer, 40)} must be a layer whose "
                              f"attention the plan keeps")
    keep = _need_int(where, "sparse_tokens.keep_tokens", spec["keep_tokens"], 2, MAX_PROMPT_TOKENS)
    first = _need_int(where, "sparse_tokens.keep_first", spec["keep_first"], 0, keep)
    last = _need_int(where, "sparse_tokens.keep_last", spec["keep_last"], 1, keep)
    if first + last > keep:
        raise CompressorError(f"{where}: sparse_tokens: keep_first + keep_last ({first + last}) exceeds keep_tokens "
                              f"({keep})")
    width = spec["pool_width"]
    if not _is_int(width) or not 1 <= width <= 1025 or width % 2 == 0:
        raise _bad(where, "sparse_tokens.pool_width", width, "an odd integer 1..1025")


def validate_sharing(plan: dict, where: str) -> None:
    from compressor.transforms.share import PROJECTIONS, unit_of

    spec = plan.get("sharing")
    if spec is None:
        return
    _need_object(where, "sharing", spec, "an object with the sharing groups, or null")
    groups = _need_list(where, "sharing.groups", spec.get("groups"), "a list of groups")
    seen, bases, shared = set(), set(), 0
    for i, group in enumerate(groups):
        at = f"sharing.groups[{i}]"
        _need_object(where, at, group, "an object with projection, layers and rank")
        projection = _need_choice(where, f"{at}.projection", group.get("projection"), PROJECTIONS)
        layers = group.get("layers")
        if not isinstance(layers, list) or not layers or not all(_is_int(x) for x in layers) or \
                any(b <= a for a, b in zip(layers, layers[1:])):
            raise _bad(where, f"{at}.layers", layers, "a non-empty list of layer indices in increasing order")
        rank = group.get("rank")
        if rank is None:
            continue  # left dense
        _need_int(where, f"{at}.rank", rank, 1, MAX_RANK)
        shared += 1
        if "residual_rank" not in group:
            raise CompressorError(f"{where}: {at} lacks 'residual_rank' (0: none)")
        if group["residual_rank"] is not None:
            _need_int(where, f"{at}.residual_rank", group["residual_rank"], 0, MAX_RANK)
        basis = group.get("basis")
        if not isinstance(basis, str) or not re.fullmatch(rf"{projection}_g[0-9]{{1,6}}", basis):
            raise _bad(where, f"{at}.basis", basis, f"a basis name {projection}_gN (N a number)")
        if basis in bases:
            raise CompressorError(f"{where}: {at}: basis {basis!r} is used by two groups")
        bases.add(basis)
        kind = unit_of(projection)
        for layer in layers:
            if not 0 <= layer < len(plan["layers"]) or plan["layers"][layer][kind] != "keep":
                raise CompressorError(f"{where}: {at}: layer {shorten(layer, 20)} does not keep its {kind} unit, so "
                                      f"its {projection} cannot be shared")
            if (layer, projection) in seen:
                raise CompressorError(f"{where}: {at}: {projection} of layer {layer} is in two groups")
            seen.add((layer, projection))
    if shared:
        fit = _need_choice(where, "sharing.fit", spec.get("fit"), SHARE_FITS)
        if fit == "activation":
            check_calibration(spec.get("calibration"), where, "sharing.calibration")


def _check_format(where: str, field: str, record, allow_keep: bool = False) -> None:
    _need_object(where, field, record, "an object with bits, group_size and symmetric")
    bits = record.get("bits")
    if allow_keep and bits == "keep":
        return
    missing = [k for k in ("bits", "group_size", "symmetric") if k not in record]
    if missing:
        raise CompressorError(f"{where}: {field} lacks {missing}")
    _need_choice(where, f"{field}.bits", bits, PLAN_BITS + (("keep",) if allow_keep else ()))
    _need_choice(where, f"{field}.group_size", record.get("group_size"), PLAN_GROUP_SIZES)
    _need_choice(where, f"{field}.symmetric", record.get("symmetric"), (True, False))


def _validate_quantization(plan: dict, where: str) -> None:
    spec = plan.get("quantization")
    if spec is None or spec == {}:
        return
    _need_object(where, "quantization", spec, "an object with the quantization section, or null")
    method = _need_choice(where, "quantization.method", spec.get("method"), QUANT_METHODS)
    _need_number(where, "quantization.damp", spec.get("damp"), 0, 100, low_open=True)
    _need_choice(where, "quantization.act_order", spec.get("act_order"), (True, False))
    if "hessian_tokens" in spec:
        _need_choice(where, "quantization.hessian_tokens", spec["hessian_tokens"], HESSIAN_TOKENS)
    linears = _need_object(where, "quantization.linears", spec.get("linears"),
                           "an object mapping module names to {bits, group_size, symmetric}")
    if len(linears) > MAX_PLAN_ENTRIES:
        raise CompressorError(f"{where}: quantization.linears has {len(linears)} entries; allowed: at most "
                              f"{MAX_PLAN_ENTRIES}")
    for name, record in linears.items():
        field = f"quantization.linears[{shorten(name, 60)}]"
        _need_name(where, field, name)
        _check_format(where, field, record)
    _check_format(where, "quantization.embedding", spec.get("embedding"), allow_keep=True)
    exact = _need_list(where, "quantization.exact_weights", spec.get("exact_weights", []),
                       "a list of {module, row, column}")
    for i, item in enumerate(exact):
        at = f"quantization.exact_weights[{i}]"
        _need_object(where, at, item, "an object with module, row and column")
        module = item.get("module")
        if not isinstance(module, str) or module not in linears:
            raise _bad(where, f"{at}.module", module, "one of the modules in quantization.linears")
        _need_int(where, f"{at}.row", item.get("row"), 0, MAX_PLAN_ENTRIES * 1000)
        _need_int(where, f"{at}.column", item.get("column"), 0, MAX_PLAN_ENTRIES * 1000)
    _need_int(where, "quantization.predicted_tensor_bytes", spec.get("predicted_tensor_bytes"), 0, MAX_BYTES)
    if method == "gptq":
        check_calibration(spec.get("calibration"), where, "quantization.calibration")


def load_plan(path: str | Path) -> dict:
    """A plan file (at most PLAN_MAX_BYTES of UTF-8 JSON, see compressor.safe_load), validated."""
    from compressor.safe_load import PLAN_MAX_BYTES, read_json

    plan = read_json(path, "plan", PLAN_MAX_BYTES)
    validate_plan(plan, str(path))
    loaded = PlanFile(plan)
    loaded.where = str(path)
    return loaded


def _linear_shapes(model) -> dict[str, tuple[int, int]]:
    from compressor.transforms.quantize_model import layer_linears

    return {name: tuple(module.weight.shape) for layer in range(len(model.model.layers))
            for name, module in layer_linears(model, layer)}


def check_plan_for_model(plan: dict, model, where: str | None = None) -> None:
    """Checks a valid plan against the model `apply` loaded, before any long work: the layer count,
    the units it keeps, the projections it shares (dense, of one shape, ranks within reach), the
    linears it quantizes (modules that exist after its removal and sharing, group sizes dividing
    their input widths), the exact weights (inside their matrices) and the calibration lengths."""
    from compressor.modeling import FactoredLinear
    from compressor.transforms.prune import remove_units
    from compressor.transforms.share import dense_projection, full_rank, module_name

    where = where or getattr(plan, "where", "plan")
    config = model.config
    if len(plan["layers"]) != config.num_hidden_layers:
        raise CompressorError(f"{where}: layers has {len(plan['layers'])} entries but the model has "
                              f"{config.num_hidden_layers} layers (a plan applies to the model it was made for)")
    for i, decision in enumerate(plan["layers"]):
        for kind, present in (("attention", config.has_attention(i)), ("mlp", config.has_mlp(i))):
            if decision[kind] == "keep" and not present:
                raise CompressorError(f"{where}: layers[{i}].{kind} is 'keep' but the model has no {kind} unit in "
                                      f"layer {i}; allowed: absent")
    context = getattr(config, "max_position_embeddings", None)
    sharing, quantization = plan.get("sharing") or {}, plan.get("quantization") or {}
    for field, section, used in (("sharing.calibration", sharing, shared_groups(plan) and sharing.get("fit") == "activation"),
                                 ("quantization.calibration", quantization, quantization.get("method") == "gptq")):
        if used and context and section["calibration"]["seq_len"] > context:
            raise CompressorError(f"{where}: {field}.seq_len is {section['calibration']['seq_len']}; allowed: at most "
                                  f"the model's context of {context} tokens")
    removed = remove_units(model, plan)  # cheap (no tensor is copied); its own checks name the plan
    shapes = _linear_shapes(removed)
    existing_bases = {g["basis"] for g in (removed.config.weight_sharing or [])}
    replaced = {}
    for i, group in enumerate((plan.get("sharing") or {}).get("groups") or []):
        if group.get("rank") is None:
            continue
        at, projection, layers, rank = f"sharing.groups[{i}]", group["projection"], group["layers"], group["rank"]
        group_shapes = set()
        for layer in layers:
            module = dense_projection(removed, layer, projection)
            if isinstance(module, FactoredLinear):
                raise CompressorError(f"{where}: {at}: {projection} of layer {layer} is already factored in this model "
                                      "(a shared artifact); share the original model instead")
            group_shapes.add(tuple(module.weight.shape))
        if len(group_shapes) > 1:
            raise CompressorError(f"{where}: {at}: the {projection} of layers {layers} have different shapes "
                                  f"{sorted(group_shapes)}; a group shares one shape")
        out_features, in_features = group_shapes.pop()
        most = full_rank(in_features, out_features, len(layers))
        if rank > most:
            raise _bad(where, f"{at}.rank", rank, f"1..{most} for {len(layers)} layers of {projection} "
                                                   f"({out_features} x {in_features})")
        residual = group.get("residual_rank") or 0
        if residual > min(in_features, out_features):
            raise _bad(where, f"{at}.residual_rank", residual, f"0..{min(in_features, out_features)}")
        if group["basis"] in existing_bases:
            raise CompressorError(f"{where}: {at}: basis {group['basis']!r} already exists in this model")
        shapes[f"model.shared_bases.{group['basis']}"] = (rank, in_features)
        for layer in layers:
            name = module_name(layer, projection)
            shapes.pop(name)
            replaced[name] = at
            shapes[f"{name}.coefficients"] = (out_features, rank)
            if residual:
                shapes[f"{name}.residual_down"] = (residual, in_features)
                shapes[f"{name}.residual_up"] = (out_features, residual)
    if not quantization:
        return
    for name, record in quantization["linears"].items():
        field = f"quantization.linears[{shorten(name, 60)}]"
        if name not in shapes:
            raise CompressorError(f"{where}: {field}: {_why_missing(name, plan, replaced)}")
        group_size, width = record["group_size"], shapes[name][1]
        if group_size is not None and width % group_size:
            allowed = [g for g in PLAN_GROUP_SIZES if g is None or width % g == 0]
            raise _bad(where, f"{field}.group_size", group_size,
                       f"{', '.join('null' if g is None else str(g) for g in allowed)} (input width {width})")
    embedding = quantization["embedding"]
    hidden = removed.model.embed_tokens.weight.shape[1]
    if embedding["bits"] != "keep" and embedding["group_size"] is not None and hidden % embedding["group_size"]:
        allowed = [g for g in PLAN_GROUP_SIZES if g is None or hidden % g == 0]
        raise _bad(where, "quantization.embedding.group_size", embedding["group_size"],
                   f"{', '.join('null' if g is None else str(g) for g in allowed)} (embedding width {hidden})")
    for i, item in enumerate(quantization.get("exact_weights", [])):
        rows, columns = shapes[item["module"]]
        if item["row"] >= rows or item["column"] >= columns:
            raise CompressorError(f"{where}: quantization.exact_weights[{i}]: row {item['row']}, column "
                                  f"{item['column']} is outside {item['module']} ({rows} x {columns}); allowed: "
                                  f"row 0..{rows - 1}, column 0..{columns - 1}")


def _why_missing(name: str, plan: dict, replaced: dict) -> str:
    if name in replaced:
        return (f"this projection is shared by {replaced[name]}; quantize its .coefficients and the group's "
                "basis instead")
    match = re.fullmatch(r"model\.layers\.(\d+)\.(self_attn|mlp)\..+", name)
    if match and int(match.group(1)) < len(plan["layers"]):
        layer, kind = int(match.group(1)), "attention" if match.group(2) == "self_attn" else "mlp"
        if plan["layers"][layer][kind] != "keep":
            return f"layers[{layer}].{kind} is {plan['layers'][layer][kind]!r}, so this module does not exist"
    return ("not a linear of the model after the plan's removal and sharing; allowed: module names such as "
            "model.layers.0.self_attn.q_proj or model.shared_bases.q_proj_g0")



# --- analyses: what the planner reads, checked before planning ---------------------------------

def validate_analysis(recipe: Recipe, analysis, where: str = "analysis") -> None:
    """Checks the parts of an analysis that planning `recipe` reads (an analysis.json edited, cut
    short or not written by `compress analyze` gives one error naming the field)."""
    if not isinstance(analysis, dict):
        raise CompressorError(f"{where}: not an analysis (expected a JSON object written by `compress analyze`, "
                              f"got {type(analysis).__name__})")
    if analysis.get("format") is not None and analysis["format"] != ANALYSIS_FORMAT:
        raise _bad(where, "format", analysis["format"], f"{ANALYSIS_FORMAT!r} (an analysis.json written by "
                                                       "`compress analyze`)")
    layers = analysis.get("layers")
    if not isinstance(layers, list) or not 0 < len(layers) <= MAX_LAYERS:
        raise CompressorError(f"{where}: not an analysis (expected 'layers': a list of 1..{MAX_LAYERS} layer records "
                              "written by `compress analyze`)")
    n = len(layers)
    for i, entry in enumerate(layers):
        if not isinstance(entry, dict) or not _is_int(entry.get("layer")) or entry["layer"] != i:
            raise CompressorError(f"{where}: layers[{i}] must be an object with \"layer\": {i}")
        for kind in UNIT_KINDS:
            unit = entry.get(kind)
            if unit is not None and (not isinstance(unit, dict) or not unit):
                raise _bad(where, f"layers[{i}].{kind}", unit, "an object with the unit's measurements, or null "
                                                               "(no such unit)")
    if analysis.get("model") is not None:
        _need_object(where, "model", analysis["model"], "an object describing the model, or null")
    if recipe.remove is not None:
        _validate_removal_records(recipe.remove, analysis, where)
    if recipe.sparse_tokens is not None and recipe.sparse_tokens.filter_layer == "auto" and \
            analysis.get("filter_probe") is not None:
        probe = _need_object(where, "filter_probe", analysis["filter_probe"], "the filter-layer probe's record")
        _need_int(where, "filter_probe.cases", probe.get("cases"), 0, MAX_PLAN_ENTRIES)
        rows = _need_list(where, "filter_probe.layers", probe.get("layers"), "a non-empty list of {layer, recall}",
                          nonempty=True)
        for j, row in enumerate(rows):
            _need_object(where, f"filter_probe.layers[{j}]", row, "an object with layer and recall")
            _need_int(where, f"filter_probe.layers[{j}].layer", row.get("layer"), 0, n - 1)
            _need_number(where, f"filter_probe.layers[{j}].recall", row.get("recall"), 0, 1)
    if recipe.quantize is not None and analysis.get("quantization") is not None:
        _validate_inventory(recipe.quantize, analysis, where)
    if recipe.share is not None and analysis.get("sharing") is not None:
        record = _need_object(where, "sharing", analysis["sharing"], "the sharing analysis's record")
        if "key" not in record:
            raise CompressorError(f"{where}: sharing lacks its 'key' (the settings it was measured for)")
        if not sharing_pending(recipe, analysis):
            _validate_sharing_record(record, n, where)


def _validate_removal_records(removal: Removal, analysis: dict, where: str) -> None:
    layers = analysis["layers"]
    if removal.method == "similarity":
        for i, entry in enumerate(layers):
            for kind in UNIT_KINDS:
                if entry.get(kind) is not None:
                    _need_number(where, f"layers[{i}].{kind}.redundancy", entry[kind].get("redundancy"))
        return
    searches = _need_list(where, "removal_searches", analysis.get("removal_searches", []), "a list of recorded searches")
    for j, search in enumerate(searches):
        at = f"removal_searches[{j}]"
        _need_object(where, at, search, "a recorded search")
        quotas = _need_object(where, f"{at}.quotas", search.get("quotas"), "an object of unit counts per kind")
        for kind, count in quotas.items():
            _need_choice(where, f"{at}.quotas key", kind, UNIT_KINDS + ("any",))
            _need_int(where, f"{at}.quotas.{kind}", count, 0, MAX_UNITS)
        order = _need_list(where, f"{at}.order", search.get("order"), "a list of {layer, unit, score} steps")
        for k, step in enumerate(order):
            _need_object(where, f"{at}.order[{k}]", step, "an object with layer, unit and score")
            layer = _need_int(where, f"{at}.order[{k}].layer", step.get("layer"), 0, len(layers) - 1)
            unit = _need_choice(where, f"{at}.order[{k}].unit", step.get("unit"), UNIT_KINDS)
            _need_number(where, f"{at}.order[{k}].score", step.get("score"))
            if layers[layer].get(unit) is None:
                raise CompressorError(f"{where}: {at}.order[{k}] removes layer {layer}'s {unit}, which the analysis's "
                                      "layers do not have")


def _need_shape(where: str, field: str, shape) -> tuple[int, int]:
    if not isinstance(shape, list) or len(shape) != 2 or not all(_is_int(x) and 0 < x < 1 << 31 for x in shape):
        raise _bad(where, field, shape, "[rows, columns], two positive integers")
    return shape[0], shape[1]


def _validate_inventory(quantize: Quantize, analysis: dict, where: str) -> None:
    inventory = _need_object(where, "quantization", analysis["quantization"], "the quantization inventory")
    n = len(analysis["layers"])
    linears = _need_list(where, "quantization.linears", inventory.get("linears"),
                         "a non-empty list of {name, layer, unit, shape}", nonempty=True)
    shapes = {}
    for j, linear in enumerate(linears):
        at = f"quantization.linears[{j}]"
        _need_object(where, at, linear, "an object with name, layer, unit and shape")
        name = _need_name(where, f"{at}.name", linear.get("name"))
        if name in shapes:
            raise CompressorError(f"{where}: {at}: {shorten(name, 60)} is listed twice")
        _need_int(where, f"{at}.layer", linear.get("layer"), 0, n - 1)
        _need_choice(where, f"{at}.unit", linear.get("unit"), UNIT_KINDS)
        shapes[name] = _need_shape(where, f"{at}.shape", linear.get("shape"))
    _need_shape(where, "quantization.embedding_shape", inventory.get("embedding_shape"))
    _need_int(where, "quantization.other_tensor_bytes", inventory.get("other_tensor_bytes"), 0, MAX_BYTES)
    if inventory.get("sensitivity") is not None:
        measured = _need_object(where, "quantization.sensitivity", inventory["sensitivity"], "the measured sensitivity")
        bits = measured.get("bits", [])
        if not isinstance(bits, list) or not all(isinstance(b, (int, str)) for b in bits):
            raise _bad(where, "quantization.sensitivity.bits", bits, "a list of widths")
    if quantize.protect.outliers == "none":
        return
    candidates = _need_list(where, "super_weight_candidates", analysis.get("super_weight_candidates", []),
                            "a list of {layer, row, column, weight, output_peak}")
    for j, c in enumerate(candidates):
        at = f"super_weight_candidates[{j}]"
        _need_object(where, at, c, "an object with layer, row, column, weight and output_peak")
        layer = _need_int(where, f"{at}.layer", c.get("layer"), 0, n - 1)
        row = _need_int(where, f"{at}.row", c.get("row"), 0, 1 << 31)
        column = _need_int(where, f"{at}.column", c.get("column"), 0, 1 << 31)
        _need_number(where, f"{at}.weight", c.get("weight"))
        _need_number(where, f"{at}.output_peak", c.get("output_peak"))
        shape = shapes.get(f"model.layers.{layer}.mlp.down_proj")
        if shape is not None and (row >= shape[0] or column >= shape[1]):
            raise CompressorError(f"{where}: {at}: row {row}, column {column} is outside layer {layer}'s down_proj "
                                  f"({shape[0]} x {shape[1]})")
    if quantize.protect.outliers == "pin":
        for i, entry in enumerate(analysis["layers"]):
            massive = entry.get("massive_activations")
            if massive is not None:
                _need_object(where, f"layers[{i}].massive_activations", massive, "an object with count")


def _validate_sharing_record(record: dict, n: int, where: str) -> None:
    from compressor.transforms.share import full_rank

    projections = _need_object(where, "sharing.projections", record.get("projections"),
                               "an object of {shape} per projection")
    groups = _need_list(where, "sharing.groups", record.get("groups"), "a list of groups")
    for j, group in enumerate(groups):
        at = f"sharing.groups[{j}]"
        _need_object(where, at, group, "an object with projection, layers and cost")
        projection = group.get("projection")
        if not isinstance(projection, str) or not isinstance(projections.get(projection), dict):
            raise _bad(where, f"{at}.projection", projection, f"one of {', '.join(map(str, projections)) or '(none)'}")
        out_features, in_features = _need_shape(where, f"sharing.projections.{projection}.shape",
                                                projections[projection].get("shape"))
        layers = group.get("layers")
        if not isinstance(layers, list) or not layers or not all(_is_int(x) and 0 <= x < n for x in layers) or \
                any(b <= a for a, b in zip(layers, layers[1:])):
            raise _bad(where, f"{at}.layers", layers, f"a non-empty increasing list of layer indices 0..{n - 1}")
        need = full_rank(in_features, out_features, len(layers)) + 1
        cost = group.get("cost")
        if not isinstance(cost, list) or len(cost) < need or not all(_is_number(c) for c in cost):
            raise _bad(where, f"{at}.cost", cost, f"a list of at least {need} finite numbers (one per rank 0..{need - 1})")
        if group.get("layer_costs") is not None:
            per_layer = full_rank(in_features, out_features, 1) + 1
            curves = group["layer_costs"]
            if not isinstance(curves, list) or len(curves) != len(layers) or not all(
                    isinstance(c, list) and len(c) >= per_layer and all(_is_number(x) for x in c) for c in curves):
                raise _bad(where, f"{at}.layer_costs", curves, f"{len(layers)} lists of at least {per_layer} finite numbers")
    _need_int(where, "sharing.other_tensor_bytes", record.get("other_tensor_bytes"), 0, MAX_BYTES)
    _need_int(where, "sharing.bytes_per_parameter", record.get("bytes_per_parameter"), 1, 8)


def check_measured_after_removal(analysis: dict, decisions: list[dict], where: str, section: str) -> None:
    """The sharing record and the quantization inventory are measured on the model after the plan's
    removals; one measured for another removal would share or quantize units that are gone (or
    leave kept units out): refused, with what to run."""
    from compressor.transforms.share import unit_of

    again = "it was measured for another removal; run `compress analyze --recipe RECIPE` again"
    if section == "sharing":
        for j, group in enumerate(analysis["sharing"]["groups"]):
            kind = unit_of(group["projection"])
            for layer in group["layers"]:
                if decisions[layer][kind] != "keep":
                    raise CompressorError(f"{where}: sharing.groups[{j}] groups the {group['projection']} of layer "
                                          f"{layer}, whose {kind} unit this plan does not keep; {again}")
        return
    measured = set()
    for j, linear in enumerate(analysis["quantization"]["linears"]):
        layer, kind = linear["layer"], linear["unit"]
        if decisions[layer][kind] != "keep":
            raise CompressorError(f"{where}: quantization.linears[{j}] ({shorten(linear['name'], 60)}) belongs to "
                                  f"layer {layer}'s {kind} unit, which this plan does not keep; {again}")
        measured.add((layer, kind))
    for d in decisions:
        for kind in UNIT_KINDS:
            if d[kind] == "keep" and (d["layer"], kind) not in measured:
                raise CompressorError(f"{where}: quantization.linears has no linear of layer {d['layer']}'s {kind} "
                                      f"unit, which this plan keeps; {again}")


def check_costs_recorded(quantize: Quantize, analysis: dict, units: list[dict], widths: list[int],
                         sensitivity: dict | None) -> None:
    """What option_costs reads for the recipe's `allocate`: a finite cost per unit and width."""
    where = "analysis"
    layers = analysis["layers"]
    if quantize.allocate == "sensitivity":
        scores = _need_object(where, "quantization.sensitivity.scores", sensitivity, "an object of costs per unit")
        for unit in units:
            row = scores.get(unit["key"])
            if not isinstance(row, dict) or not all(_is_number(row.get(str(b))) for b in widths):
                raise _bad(where, f"quantization.sensitivity.scores[{unit['key']!r}]", row,
                           f"an object with a finite cost for each width {widths}")
    elif quantize.allocate in ("lim", "zd"):
        for unit in units:
            entry = layers[unit["layer"]]
            if unit["unit"] is None:
                field, value = f"layers[{unit['layer']}].{quantize.allocate}", entry.get(quantize.allocate)
            else:
                key = "redundancy" if quantize.allocate == "lim" else "zd"
                field, value = f"layers[{unit['layer']}].{unit['unit']}.{key}", (entry.get(unit["unit"]) or {}).get(key)
            _need_number(where, field, value)
