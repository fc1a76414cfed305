"""Mixed-bit allocation: one width per allocation unit (a layer, or an attention / MLP unit) under a
size budget, as a multiple-choice knapsack solved exactly.

Each unit offers one option per candidate width: its stored bytes (packed codes, scales, zero
points; `compressor.transforms.quantize.stored_bytes`) and a cost. The solver picks one option
per unit minimizing the summed cost with the summed bytes within the capacity, by dynamic
programming over reachable byte totals that keeps only Pareto-optimal states (a state with more
bytes and no lower cost can never lead to a better solution), so the answer is the exact optimum.

Costs by `allocate`:
- `sensitivity`: the measured KL divergence of the final next-token distributions when only that
  unit is quantized at that width (summed over units as if independent);
- `lim` / `zd`: importance x weights x 4^-bits, importance being the Layer-Wise Quantization
  paper's LIM score (-cos(input, output) of the layer or unit, taken as 1 - cos so that it is
  positive: the layer report's block influence, or a unit's 1 - redundancy) or ZD score (share of
  weights with |z| > 1), normalized to mean 1: quantization noise energy scales as 4^-bits;
- `uniform`: weights x 4^-bits, every unit equally important.
"""

from __future__ import annotations

import math

from compressor.errors import CompressorError
from compressor.transforms.quantize import stored_bytes

MAX_STATES = 2_000_000


def solve_knapsack(items: list[list[tuple[int, float]]], capacity: int) -> tuple[list[int], int, float] | None:
    """Exact multiple-choice knapsack: items[i] lists (bytes, cost) options; returns (chosen option
    index per item, total bytes, total cost), or None when no choice fits the capacity.
    Ties in cost go to the smaller total, then to the earlier option."""
    states: dict[int, float] = {0: 0.0}
    back: list[dict[int, tuple[int, int]]] = []
    for options in items:
        best: dict[int, tuple[float, int, int]] = {}
        for total, cost in states.items():
            for index, (size, option_cost) in enumerate(options):
                new_total = total + size
                if new_total > capacity:
                    continue
                new_cost = cost + option_cost
                held = best.get(new_total)
                if held is None or new_cost < held[0]:
                    best[new_total] = (new_cost, total, index)
        if not best:
            return None
        frontier: dict[int, tuple[int, int]] = {}
        states = {}
        lowest = math.inf
        for total in sorted(best):
            cost, previous, index = best[total]
            if cost < lowest:
                lowest = cost
                states[total] = cost
                frontier[total] = (previous, index)
        if len(states) > MAX_STATES:
            raise CompressorError(f"bit allocation: more than {MAX_STATES} distinct sizes; use fewer widths or units")
        back.append(frontier)
    end = min(states, key=lambda t: (states[t], t))
    choices = []
    total = end
    for frontier in reversed(back):
        previous, index = frontier[total]
        choices.append(index)
        total = previous
    return choices[::-1], end, states[end]


def unit_importance(analysis_layers: list[dict], key: tuple[int, str | None], score: str) -> float:
    """LIM or ZD importance of a layer (unit None) or of one of its units. LIM (-cos(input, output))
    is ranked as 1 - cos: the layer's block influence, the unit's 1 - redundancy."""
    layer, unit = key
    entry = analysis_layers[layer]
    if score == "lim":
        if unit is None:
            return float(entry["block_influence"])
        return 1.0 - float(entry[unit]["redundancy"])
    if score == "zd":
        source = entry if unit is None else entry[unit]
        return float(source["zd"])
    raise ValueError(score)


def option_costs(units: list[dict], options: list[tuple[int, object]], labels: list[str], allocate: str,
                 analysis_layers: list[dict], sensitivity: dict | None) -> list[list[float]]:
    """Cost of each unit at each option, (bits, group size) keyed by `labels` among the measured
    sensitivities (see the module docstring; the noise models ignore the group size)."""
    if allocate == "sensitivity":
        if sensitivity is None:
            raise CompressorError("allocate: sensitivity needs the quantization sensitivity in the analysis")
        return [[max(0.0, float(sensitivity[u["key"]][k])) for k in labels] for u in units]
    widths = [b for b, _ in options]
    if allocate == "uniform":
        importance = [1.0] * len(units)
    else:
        importance = [unit_importance(analysis_layers, (u["layer"], u["unit"]), allocate) for u in units]
        mean = sum(importance) / len(importance)
        importance = [max(i, 0.0) / mean if mean > 0 else 1.0 for i in importance]
    return [[imp * u["weights"] * 4.0 ** -b for b in widths] for imp, u in zip(importance, units)]


def unit_key(layer: int, unit: str | None) -> str:
    return str(layer) if unit is None else f"{layer}.{unit}"


def allocation_units(linears: list[dict], granularity: str) -> list[dict]:
    """Groups the decoder linears into allocation units: per layer, or per attention / MLP unit."""
    units: dict[tuple, dict] = {}
    for linear in linears:
        unit = None if granularity == "layer" else linear["unit"]
        entry = units.setdefault((linear["layer"], unit or ""), {
            "key": unit_key(linear["layer"], unit), "layer": linear["layer"], "unit": unit, "linears": [],
            "shapes": [], "weights": 0})
        entry["linears"].append(linear["name"])
        entry["shapes"].append(linear["shape"])
        entry["weights"] += linear["shape"][0] * linear["shape"][1]
    return list(units.values())


def unit_bytes(unit: dict, fmt) -> int:
    return sum(stored_bytes(out_features, in_features, fmt) for out_features, in_features in unit["shapes"])
