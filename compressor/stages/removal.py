"""Sub-layer removal: which attention and MLP units go (LLM-Drop similarity, iterative, FinerCut).

Methods share one quota rule: budgets per kind (`attention`, `mlp`) plus `any` (either kind);
candidates are taken in the method's order and a candidate is accepted while its own kind's
quota, or the `any` quota, has room. `similarity` orders by one-shot redundancy from the layer
report (LLM-Drop) and measures nothing more; `iterative` and `finercut` record a greedy search
(redundancy recomputed after each removal, or final-logit divergence), since finding it needs the
model. The plan's layer table is authoritative: apply removes exactly the units it marks (a user
may edit plan.json), so apply runs whether or not the recipe removes anything.
"""

from __future__ import annotations

import copy
import math

from compressor.analysis.removal import greedy_removal_order, units_switched_off
from compressor.errors import CompressorError, MissingRecord
from compressor.plan import UNIT_KINDS
from compressor.recipe import Recipe, Removal
from compressor.stages.run import Applied, Run
from compressor.transforms.prune import remove_units

SECTION, PART, RECORD = "remove", "removal", "removal_searches"


# --- measure ------------------------------------------------------------------------------------

def measure(model, recipe: Recipe, analysis: dict, run: Run) -> list[dict]:
    """The analysis's searches, with the greedy search this recipe needs added (similarity: none)."""
    searches = list(analysis.get(RECORD, []))
    removal = recipe.remove
    if removal.method in ("iterative", "finercut"):
        windows = run.calibration(recipe.calibration.model_dump()).input_ids
        windows = windows[: removal.search_samples, : removal.search_seq_len]
        searches.append(greedy_search(model, analysis, removal, windows, run.batch_size, run.quiet,
                                      required_units(recipe)))
    return searches


def greedy_search(model, analysis: dict, removal: Removal, windows, batch_size: int, quiet: bool,
                  required: set[tuple[int, str]] = frozenset()) -> dict:
    quotas = removal_quotas(removal, len(analysis["layers"]))
    candidates = removable_candidates(analysis, removal.protect, required)
    allowed = {k for k in ("attention", "mlp") if quotas[k] or quotas["any"]}
    candidates = [u for u in candidates if u[1] in allowed]
    steps = min(sum(quotas.values()), len(candidates))
    order = _quota_greedy(model, windows, candidates, quotas, steps, removal.method, batch_size, quiet)
    return dict(search_key(removal, quotas, required), order=order)


def _quota_greedy(model, windows, candidates, quotas, steps, method, batch_size, quiet):
    """Greedy search restricted to the kinds whose quota still has room (single-kind: one search)."""
    kinds_with_quota = [k for k in ("attention", "mlp") if quotas[k]]
    if quotas["any"] or len(kinds_with_quota) <= 1:
        return greedy_removal_order(model, windows, candidates, steps, method, batch_size, quiet)
    # Separate per-kind quotas: search each kind in turn, later ones given the earlier removals.
    order = []
    for kind in kinds_with_quota:
        removed = [(s["layer"], s["unit"]) for s in order]
        with units_switched_off(model, removed):
            order += greedy_removal_order(model, windows, [u for u in candidates if u[1] == kind], quotas[kind],
                                          method, batch_size, quiet)
    return order


# --- decide -------------------------------------------------------------------------------------

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
    """Units other parts of the recipe need: a fixed sparse-token filter layer's attention, and for
    `serve: [vllm]` layer 0's attention (vLLM's Nemotron-NAS forward cannot start on an MLP alone,
    see compressor.serving.vllm_layer_problem)."""
    required = set()
    sparse = recipe.sparse_tokens
    if sparse is not None and isinstance(sparse.filter_layer, int):
        required.add((sparse.filter_layer, "attention"))
    if "vllm" in recipe.serve:
        required.add((0, "attention"))
    return required


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


def decide(recipe: Recipe, analysis: dict, plan: dict) -> dict:
    """The removal section and the layer table with the removed units marked (and why)."""
    removal = recipe.remove
    required = required_units(recipe)
    layers = analysis["layers"]
    num_layers = len(layers)
    decisions = copy.deepcopy(plan["layers"])
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
        search = next((s for s in analysis.get(RECORD, []) if _search_covers(s, wanted)), None)
        if search is None:
            raise MissingRecord("removal", f"a {removal.method} search for this recipe's budgets and protect/search "
                                           "settings")
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
    part = {"method": removal.method, "quotas": quotas, "protect": removal.protect.model_dump(),
            "removed": [{"layer": u[0], "unit": u[1]} for u in chosen]}
    return {PART: part, "layers": decisions}


# --- apply --------------------------------------------------------------------------------------

def apply(model, plan: dict, run: Run, record=None) -> Applied:
    return Applied(remove_units(model, plan))
