"""Weight quantization (GPTQ or round-to-nearest) with one width per layer or unit under a size budget.

measure: the inventory of quantizable tensors and, for `allocate: sensitivity`, each unit's
measured sensitivity per width (compressor.analysis.quantization), on the model after removal and
sharing. decide: the widths, the exact multiple-choice knapsack optimum under the budget
(compressor.bit_allocation), and the super weights kept exactly. apply: the codes, by the plan's
method on the plan's calibration windows (the model's weights become their quantized values).
"""

from __future__ import annotations

import copy
import math

import torch

from compressor.analysis.quantization import (EMBEDDING_KEY, measured_group_sizes, option_label,
                                              quantization_inventory, quantization_options, quantization_sensitivity,
                                              sensitivity_key)
from compressor.bit_allocation import allocation_units, option_costs, solve_knapsack, unit_bytes
from compressor.errors import CompressorError, MissingRecord, shorten
from compressor.plan import UNIT_KINDS, bad_value, need_number, need_object
from compressor.recipe import CALIBRATED_METHODS, Quantize, Recipe
from compressor.stages.run import Applied, Run
from compressor.transforms.quantize import QuantFormat, exact_bytes, recipe_format, stored_bytes
from compressor.transforms.quantize_model import quantize_model

SECTION, PART, RECORD = "quantize", "quantization", "quantization"


def measure(model, recipe: Recipe, analysis: dict, run: Run) -> dict:
    record = quantization_inventory(model)
    check_group_size(recipe.quantize, record)
    check_budget_reachable(recipe.quantize, record)  # before the sensitivity's minutes, not after
    if recipe.quantize.allocate == "sensitivity":
        windows = run.calibration(recipe.calibration.model_dump()).input_ids
        record["sensitivity"] = quantization_sensitivity(model, recipe.quantize, windows, run.batch_size, run.quiet)
    return record


# --- decide -------------------------------------------------------------------------------------

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
    """Every listed group size divides the input width of every tensor it may quantize."""
    widths = {shape[1] for shape in (lin["shape"] for lin in inventory["linears"])}
    if quantize.embeddings != "keep":
        widths.add(inventory["embedding_shape"][1])
    for group in quantize.group_sizes:
        bad = [] if group == "channel" else sorted(w for w in widths if w % group)
        if bad:
            allowed = [g for g in (32, 64, 128) if all(w % g == 0 for w in widths)] + ["channel"]
            raise CompressorError(f"quantize.group_size: {group} does not divide the input width "
                                  f"{bad[0]} of this model's quantized tensors; allowed here: {allowed}")


def embedding_frame(quantize: Quantize, inventory: dict) -> tuple[dict, int]:
    """(the embedding's record, its weights counted in an avg_bits budget) when its width is fixed or
    kept; an allocated embedding's record is {"bytes": 0} (its bytes are one knapsack item)."""
    vocab, hidden = inventory["embedding_shape"]
    if quantize.embeddings == "auto":
        return {"bytes": 0}, vocab * hidden
    if quantize.embeddings == "keep":
        return {"bits": "keep", "bytes": vocab * hidden * inventory.get("embedding_element_bytes", 4)}, 0
    fmt = recipe_format(quantize, quantize.embeddings)
    return dict(format_record(fmt), bytes=stored_bytes(vocab, hidden, fmt)), 0


def unreachable_budget(quantize: Quantize, smallest: int, fixed: int, weights: int) -> CompressorError:
    """The error for a budget below the smallest choice (`smallest` knapsack bytes beside `fixed`)."""
    if quantize.budget.avg_bits is not None:
        return CompressorError(
            f"quantize.budget.avg_bits: {quantize.budget.avg_bits} is below the smallest feasible "
            f"{math.ceil(8000 * smallest / weights) / 1000:.3f} bits per weight for widths {quantize.bits} with group "
            f"size {quantize.group_size} (scales included) and the pinned layers")
    return CompressorError(
        f"quantize.budget.bytes: {quantize.budget.bytes} is below the smallest feasible {smallest + fixed} bytes "
        f"for widths {quantize.bits} with group size {quantize.group_size}, embedding {quantize.embeddings} "
        f"and the pinned layers")


def budget_capacity(quantize: Quantize, fixed: int, weights: int) -> int:
    """Bytes the knapsack may fill: avg_bits over the allocated weights, or the byte budget less the
    tensors outside it."""
    if quantize.budget.avg_bits is not None:
        return math.floor(quantize.budget.avg_bits * weights / 8)
    return quantize.budget.bytes - fixed


def check_budget_reachable(quantize: Quantize, inventory: dict) -> None:
    """Refuses a budget that even the narrowest option of every unit exceeds (pinned layers and exact
    weights aside, which only the plan knows)."""
    formats = [recipe_format(quantize, b, g) for b, g in quantization_options(quantize)]
    units = allocation_units(inventory["linears"], quantize.granularity)
    smallest = sum(min(unit_bytes(u, f) for f in formats) for u in units)
    embedding, embedding_weights = embedding_frame(quantize, inventory)
    if quantize.embeddings == "auto":
        smallest += min(stored_bytes(*inventory["embedding_shape"], f) for f in formats)
    fixed = inventory["other_tensor_bytes"] + embedding["bytes"]
    weights = sum(u["weights"] for u in units) + embedding_weights
    if smallest > budget_capacity(quantize, fixed, weights):
        raise unreachable_budget(quantize, smallest, fixed, weights)


def check_measured_after_removal(inventory: dict, decisions: list[dict], where: str = "analysis") -> None:
    """The inventory is measured on the model after the plan's removals; one measured for another
    removal would quantize units that are gone (or leave kept units out): refused, with what to run."""
    again = "it was measured for another removal; run `compress analyze --recipe RECIPE` again"
    measured = set()
    for j, linear in enumerate(inventory["linears"]):
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


def check_costs_recorded(quantize: Quantize, analysis: dict, units: list[dict], labels: list[str],
                         sensitivity: dict | None) -> None:
    """What option_costs reads for the recipe's `allocate`: a finite cost per unit and option."""
    where = "analysis"
    layers = analysis["layers"]
    if quantize.allocate == "sensitivity":
        scores = need_object(where, "quantization.sensitivity.scores", sensitivity, "an object of costs per unit")
        for unit in units:
            row = scores.get(unit["key"])
            if not isinstance(row, dict) or not all(isinstance(row.get(k), (int, float)) and
                                                    not isinstance(row.get(k), bool) and
                                                    math.isfinite(row.get(k)) for k in labels):
                raise bad_value(where, f"quantization.sensitivity.scores[{unit['key']!r}]", row,
                                f"an object with a finite cost for each of {labels}")
    elif quantize.allocate in ("lim", "zd"):
        for unit in units:
            entry = layers[unit["layer"]]
            if unit["unit"] is None:
                key = "block_influence" if quantize.allocate == "lim" else "zd"
                field, value = f"layers[{unit['layer']}].{key}", entry.get(key)
            else:
                key = "redundancy" if quantize.allocate == "lim" else "zd"
                field, value = f"layers[{unit['layer']}].{unit['unit']}.{key}", (entry.get(unit["unit"]) or {}).get(key)
            need_number(where, field, value)


def format_record(fmt: QuantFormat) -> dict:
    record = {"bits": fmt.bits, "group_size": fmt.group_size, "symmetric": fmt.symmetric}
    if fmt.positive_scales:  # absent for signed scales: plans written before the option read the same
        record["scales"] = "positive"
    return record


def record_format(record: dict) -> QuantFormat:
    """The format a plan's record names (format_record's inverse)."""
    return QuantFormat(record["bits"], record["group_size"], record["symmetric"], record.get("scales") == "positive")


def plan_quantization(quantize: Quantize, analysis: dict) -> dict:
    """Bit width (and group size) of every decoder linear: the exact knapsack optimum under the budget."""
    inventory = analysis[RECORD]
    widths = list(quantize.bits)
    check_group_size(quantize, inventory)
    primary = quantize.group_sizes[0]
    several = len(quantize.group_sizes) > 1
    # A unit's options: each width at each group size (one group size: one option per width).
    options = quantization_options(quantize)
    labels = [option_label(b, g, primary) for b, g in options]
    formats = [recipe_format(quantize, b, g) for b, g in options]
    units = allocation_units(inventory["linears"], quantize.granularity)
    exact, pinned = protected_outliers(quantize, analysis, {lin["name"] for lin in inventory["linears"]})
    sensitivity = None
    if quantize.allocate == "sensitivity":
        measured = inventory.get("sensitivity") or {}
        wanted = sensitivity_key(quantize)
        if ({k: measured.get(k) for k in wanted} != wanted or not set(widths) <= set(measured.get("bits", []))
                or not set(quantize.group_sizes) <= set(measured_group_sizes(measured))):
            raise MissingRecord("quantization", f"the quantization sensitivity for this recipe's method, group "
                                                f"sizes {quantize.group_sizes} and widths {widths}")
        sensitivity = measured["scores"]
        if quantize.embeddings == "auto" and not set(labels) <= set(sensitivity.get(EMBEDDING_KEY) or {}):
            raise MissingRecord("quantization", f"the embedding's quantization sensitivity at {labels} "
                                                "(embeddings: auto)")
    check_costs_recorded(quantize, analysis, units, labels, sensitivity)
    costs = option_costs(units, options, labels, quantize.allocate, analysis["layers"], sensitivity)
    top = [i for i, (b, _) in enumerate(options) if b == widths[-1]]  # a pinned unit's options
    items, offered = [], []
    for unit, unit_costs in zip(units, costs):
        allowed = top if unit["layer"] in pinned else range(len(options))
        offered.append(list(allowed))
        items.append([(unit_bytes(unit, formats[i]), unit_costs[i]) for i in allowed])
    vocab, hidden = inventory["embedding_shape"]
    embedding, embedding_weights = embedding_frame(quantize, inventory)
    weights = sum(u["weights"] for u in units) + embedding_weights
    allocated = quantize.embeddings == "auto"
    if allocated:  # one more knapsack item: the embedding at each option, costed by its sensitivity
        embedding_costs = [max(0.0, float(sensitivity[EMBEDDING_KEY][k])) for k in labels]
        items.append([(stored_bytes(vocab, hidden, f), c) for f, c in zip(formats, embedding_costs)])
    fixed = inventory["other_tensor_bytes"] + embedding["bytes"] + exact_bytes(len(exact))
    capacity = budget_capacity(quantize, fixed, weights)
    solution = solve_knapsack(items, capacity)
    if solution is None:
        raise unreachable_budget(quantize, sum(min(size for size, _ in options) for options in items), fixed, weights)
    choices, used, total_cost = solution
    if allocated:
        chosen = choices[-1]
        embedding = dict(format_record(formats[chosen]), bytes=items[-1][chosen][0], allocated=True,
                         costs=dict(zip(labels, embedding_costs)))
        choices, items = choices[:-1], items[:-1]
    unit_records, linears = [], {}
    for unit, unit_items, allowed, unit_costs, choice in zip(units, items, offered, costs, choices):
        option = allowed[choice]
        bits, group = options[option]
        record = {"key": unit["key"], "layer": unit["layer"], "unit": unit["unit"], "bits": bits,
                  **({"group_size": formats[option].group_size} if several else {}),
                  "bytes": unit_items[choice][0], "weights": unit["weights"], "pinned": pinned.get(unit["layer"]),
                  "costs": dict(zip(labels, unit_costs))}
        unit_records.append(record)
        for name in unit["linears"]:
            linears[name] = format_record(formats[option])
    return {
        "method": quantize.method, "damp": quantize.damp, "act_order": quantize.act_order,
        "hessian_tokens": quantize.hessian_tokens, "clip": quantize.clip,
        **({"signround": quantize.signround.model_dump()} if quantize.method == "signround" else {}),
        "allocate": quantize.allocate, "granularity": quantize.granularity, "widths": widths,
        **({"group_sizes": quantize.group_sizes} if several else {}),
        "budget": {"requested": quantize.budget.model_dump(exclude_none=True), "capacity_bytes": capacity,
                   "used_bytes": used, "avg_bits": 8 * used / weights, "summed_cost": total_cost},
        "predicted_tensor_bytes": fixed + used,
        "embedding": embedding, "exact_weights": exact, "units": unit_records, "linears": linears,
    }


def decide(recipe: Recipe, analysis: dict, plan: dict) -> dict:
    if analysis.get(RECORD) is None:
        raise MissingRecord("quantization", "inventory of quantizable tensors")
    decisions = copy.deepcopy(plan["layers"])
    check_measured_after_removal(analysis[RECORD], decisions)
    part = dict(plan_quantization(recipe.quantize, analysis), calibration=recipe.calibration.model_dump())
    for unit in part["units"]:
        kinds = UNIT_KINDS if unit["unit"] is None else (unit["unit"],)
        bits = decisions[unit["layer"]].setdefault("bits", {})
        bits.update({kind: unit["bits"] for kind in kinds if decisions[unit["layer"]][kind] == "keep"})
    return {PART: part, "layers": decisions}


# --- apply --------------------------------------------------------------------------------------

def apply(model, plan: dict, run: Run, record=None) -> Applied:
    """Quantizes `model` in place as the plan says; the codes are module name -> QuantizedWeight."""
    spec = plan.get(PART)
    if not spec:
        return Applied(model)
    formats = {name: record_format(r) for name, r in spec["linears"].items()}
    keep_exact = {}
    for item in spec.get("exact_weights", []):
        weight = model.get_submodule(item["module"]).weight
        mask = keep_exact.setdefault(item["module"], torch.zeros(weight.shape, dtype=torch.bool))
        mask[item["row"], item["column"]] = True
    embedding = spec["embedding"]
    embedding_format = None if embedding["bits"] == "keep" else record_format(embedding)
    calibration = run.calibration(spec["calibration"]).input_ids if spec["method"] in CALIBRATED_METHODS else None
    codes = quantize_model(model, formats, spec["method"], calibration, batch_size=run.batch_size, damp=spec["damp"],
                           act_order=spec["act_order"], keep_exact=keep_exact, embedding=embedding_format,
                           token_weighting=spec.get("hessian_tokens", "equal"), clip=spec.get("clip", "minmax"),
                           signround=spec.get("signround"), quiet=run.quiet)
    return Applied(model, codes)
