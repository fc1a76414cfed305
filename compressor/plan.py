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
import math
from pathlib import Path

from compressor.bit_allocation import allocation_units, option_costs, solve_knapsack, unit_bytes
from compressor.errors import CompressorError
from compressor.recipe import Quantize, Recipe, Removal, SparseTokens
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


def make_plan(recipe: Recipe, analysis: dict) -> dict:
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
        plan["sharing"] = dict(plan_sharing(recipe.share, analysis, recipe.quantize),
                               calibration=recipe.calibration.model_dump())
        for group in shared_groups(plan):
            for layer in group["layers"]:
                decisions[layer].setdefault("shared", {})[group["projection"]] = f"{group['basis']} rank {group['rank']}"
    if recipe.quantize is not None and not quantization_pending(analysis):
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


def validate_plan(plan, where: str = "plan") -> dict:
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT or not isinstance(plan.get("layers"), list):
        raise CompressorError(f"{where}: not a plan (expected a JSON object with format {PLAN_FORMAT!r} and 'layers')")
    for i, d in enumerate(plan["layers"]):
        if not isinstance(d, dict) or d.get("layer") != i:
            raise CompressorError(f"{where}: layers[{i}] must be an object with \"layer\": {i}")
        for kind in UNIT_KINDS:
            if d.get(kind) not in DECISIONS + ("absent",):
                raise CompressorError(f"{where}: layers[{i}].{kind} is {d.get(kind)!r}; allowed: keep, remove, absent")
    validate_sharing(plan, where)
    spec = plan.get("sparse_tokens")
    if spec:
        missing = [k for k in SPARSE_SETTINGS if k not in spec]
        if missing:
            raise CompressorError(f"{where}: sparse_tokens lacks {missing}")
        layer = spec["filter_layer"]
        if not isinstance(layer, int) or not 0 <= layer < len(plan["layers"]) or plan["layers"][layer]["attention"] != "keep":
            raise CompressorError(f"{where}: sparse_tokens.filter_layer {layer!r} must be a layer whose attention "
                                  f"the plan keeps")
    return plan


def save_plan(plan: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(plan, indent=2) + "\n")


def load_plan(path: str | Path) -> dict:
    from compressor.artifact import read_json

    return validate_plan(read_json(Path(path), "plan"), str(path))


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


def validate_sharing(plan: dict, where: str) -> None:
    from compressor.transforms.share import unit_of

    seen, bases = set(), set()
    for i, group in enumerate(shared_groups(plan)):
        at = f"{where}: sharing.groups[{i}]"
        projection, layers, rank = group.get("projection"), group.get("layers"), group.get("rank")
        if not isinstance(layers, list) or not layers or not isinstance(rank, int) or rank < 1:
            raise CompressorError(f"{at} needs a non-empty 'layers' list and a rank >= 1")
        if group.get("basis") in bases:
            raise CompressorError(f"{at}: basis {group.get('basis')!r} is used by two groups")
        bases.add(group.get("basis"))
        for layer in layers:
            kind = unit_of(projection)
            if not isinstance(layer, int) or not 0 <= layer < len(plan["layers"]) or plan["layers"][layer][kind] != "keep":
                raise CompressorError(f"{at}: layer {layer!r} does not keep its {kind} unit, so its {projection} "
                                      "cannot be shared")
            if (layer, projection) in seen:
                raise CompressorError(f"{at}: {projection} of layer {layer} is in two groups")
            seen.add((layer, projection))
