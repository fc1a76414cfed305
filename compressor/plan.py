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

from compressor.errors import CompressorError
from compressor.recipe import Recipe, Removal

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


def removable_candidates(analysis: dict, protect) -> list[tuple[int, str]]:
    layers = analysis["layers"]
    n = len(layers)
    protected = set(range(min(protect.first, n))) | set(range(max(n - protect.last, 0), n))
    return [(entry["layer"], kind) for entry in layers if entry["layer"] not in protected
            for kind in UNIT_KINDS if entry.get(kind) is not None]


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


def search_key(removal: Removal, quotas: dict[str, int]) -> dict:
    """What a recorded greedy search must match to be reused by a plan."""
    return {"method": removal.method, "quotas": quotas,
            "protect": removal.protect.model_dump(),
            "search_samples": removal.search_samples, "search_seq_len": removal.search_seq_len}


def _search_covers(search: dict, wanted: dict) -> bool:
    if any(search.get(k) != wanted[k] for k in ("method", "protect", "search_samples", "search_seq_len")):
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
    removal = recipe.remove
    if removal is None:
        return plan
    quotas = removal_quotas(removal, num_layers)
    candidates = removable_candidates(analysis, removal.protect)
    check_budget(quotas, candidates, num_layers, removal.protect)
    if removal.method == "similarity":
        ordered = sorted(candidates, key=lambda u: -layers[u[0]][u[1]]["redundancy"])
        chosen = fill_quotas(ordered, quotas)
        reasons = {u: f"{u[1]} redundancy {layers[u[0]][u[1]]['redundancy']:.4f} (rank {ordered.index(u) + 1} "
                      f"of {len(ordered)} candidates)" for u in chosen}
    else:
        wanted = search_key(removal, quotas)
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
    return plan


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
    return plan


def save_plan(plan: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(plan, indent=2) + "\n")


def load_plan(path: str | Path) -> dict:
    from compressor.artifact import read_json

    return validate_plan(read_json(Path(path), "plan"), str(path))
