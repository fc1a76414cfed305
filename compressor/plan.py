"""The file formats of plans and analyses: what plan.json and analysis.json hold, read and checked.

A plan says, layer by layer, whether each attention and MLP unit is kept or removed, and why, then
one part per stage (compressor.stages): `removal`, `sparse_tokens`, `sharing`, `quantization`.
`layers` is authoritative: a user may edit plan.json (flip "keep" to "remove") and `apply` does
exactly what it says. An analysis holds the base layer report (`layers`, `super_weight_candidates`,
`model`, `calibration`) and one record per stage (`removal_searches`, `filter_probe`, `sharing`,
`quantization`).

validate_plan checks a plan on its own (types, ranges, cross-references between its sections);
check_plan_for_model checks it against the loaded model (layer count, units, module names and
shapes) before the long work of `apply` starts; validate_analysis checks the parts of an analysis
that planning a recipe reads. Each raises one CompressorError naming the file and the field.
Fields that are only informational (notes, costs, reasons) are not checked.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from pydantic import ValidationError

from compressor.analysis.sharing import sharing_key
from compressor.errors import CompressorError, shorten
from compressor.modeling import FactoredLinear
from compressor.recipe import (CALIBRATED_METHODS, MAX_BYTES, MAX_LAYERS, MAX_RANK, MAX_UNITS, MAX_WINDOWS, QUANT_BITS,
                               QUANT_METHODS, SPARSE_METHODS, Calibration, Quantize, Recipe, Removal,
                               describe_validation_error, sparse_settings_problem)
from compressor.safe_load import PLAN_MAX_BYTES, read_json
from compressor.serving import SERVE_TARGETS
from compressor.transforms.prune import remove_units
from compressor.transforms.quantize_model import layer_linears
from compressor.models.adapters import PROJECTIONS
from compressor.transforms.share import dense_projection, full_rank, module_name, unit_of
from compressor.transforms.sparse_tokens import SETTINGS as SPARSE_SETTINGS

PLAN_FORMAT = "compressor-plan/1"
ANALYSIS_FORMAT = "compressor-analysis/1"
UNIT_KINDS = ("attention", "mlp")
DECISIONS = ("keep", "remove")


def empty_plan(recipe_name: str, analysis: dict, serve: list[str] = ()) -> dict:
    """The plan before any stage decides: every unit the analysis found kept. `serve`, the recipe's
    serving targets, is kept in the plan (when there are any) so that applying it checks them."""
    layers = analysis["layers"]
    decisions = [{"layer": e["layer"], "attention": "keep" if e.get("attention") else "absent",
                  "mlp": "keep" if e.get("mlp") else "absent", "notes": ""} for e in layers]
    plan = {"format": PLAN_FORMAT, "recipe": recipe_name, "model": analysis.get("model", {}),
            "num_hidden_layers": len(layers), "removal": None, "layers": decisions}
    if serve:
        plan["serve"] = list(serve)
    return plan

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


def shared_groups(plan: dict) -> list[dict]:
    """The plan's groups that share a basis (a group left dense is not one)."""
    return [g for g in ((plan.get("sharing") or {}).get("groups") or []) if g.get("rank")]


# --- plan files: everything `apply` reads, checked before any work ------------------------------
#
# validate_plan checks a plan on its own (types, ranges, cross-references between its sections);
# check_plan_for_model checks it against the loaded model (layer count, units, module names and
# shapes) before the long work of `apply` starts. Both raise one CompressorError naming the file
# and the field. Fields that are only informational (notes, costs, reasons) are not checked.

PLAN_BITS = QUANT_BITS
PLAN_GROUP_SIZES = (32, 64, 128, None)
HESSIAN_TOKENS = ("equal", "raw")
CLIPS = ("minmax", "search")
SHARE_FITS = ("activation", "weight")
MAX_PLAN_ENTRIES = 1_000_000
MAX_MODULE_NAME = 200


class PlanFile(dict):
    """A plan read from a file: a plain dict that also remembers the file (`where`), so that the
    checks made later, against the model, name it."""

    where = "plan"


def bad_value(where: str, field: str, value, allowed: str) -> CompressorError:
    return CompressorError(f"{where}: {field} is {shorten(value, 60)}; allowed: {allowed}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def _need_int(where: str, field: str, value, low: int, high: int) -> int:
    if not _is_int(value) or not low <= value <= high:
        raise bad_value(where, field, value, f"an integer {low}..{high}")
    return value


def need_number(where: str, field: str, value, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    ok = is_number(value) and (low is None or (value > low if low_open else value >= low)) and \
        (high is None or value <= high)
    if not ok:
        bounds = ([f"{'>' if low_open else '>='} {low}"] if low is not None else []) + \
            ([f"<= {high}"] if high is not None else [])
        raise bad_value(where, field, value, " ".join(["a finite number", " and ".join(bounds)]).strip())
    return value


def _need_choice(where: str, field: str, value, allowed: tuple):
    # Types matter: 4.0 is not the width 4, true is not 1.
    if not any(type(value) is type(a) and value == a for a in allowed):
        raise bad_value(where, field, value, ", ".join("null" if a is None else json.dumps(a) for a in allowed))
    return value


def need_object(where: str, field: str, value, what: str) -> dict:
    if not isinstance(value, dict):
        raise bad_value(where, field, value, what)
    return value


def _need_list(where: str, field: str, value, what: str, nonempty: bool = False) -> list:
    if not isinstance(value, list) or (nonempty and not value) or len(value) > MAX_PLAN_ENTRIES:
        raise bad_value(where, field, value, what)
    return value


def _need_name(where: str, field: str, value) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_MODULE_NAME or not value.isprintable():
        raise bad_value(where, field, value, f"a module name (text of 1..{MAX_MODULE_NAME} characters)")
    return value


def check_calibration(settings, where: str, field: str) -> dict:
    """Calibration settings recorded in a plan, by the recipe's own schema and bounds."""
    need_object(where, field, settings, "an object with text, samples, seq_len and seed")
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
                raise bad_value(where, f"layers[{i}].{kind}", d.get(kind), "keep, remove, absent")
    if plan.get("model") is not None:
        need_object(where, "model", plan["model"], "an object describing the source model, or null")
    serve = plan.get("serve")
    if serve is not None and (not isinstance(serve, list) or not all(t in SERVE_TARGETS for t in serve)):
        raise bad_value(where, "serve", serve, f"a list of {', '.join(SERVE_TARGETS)}")
    _validate_sparse_tokens(plan, where)
    validate_sharing(plan, where)
    _validate_equalization(plan, where)
    _validate_quantization(plan, where)
    return plan


EQUALIZATION_GROUPS = ("attention_input", "value_output", "mlp_input", "down_input")


def _validate_equalization(plan: dict, where: str) -> None:
    spec = plan.get("equalization")
    if spec is None or spec == {}:
        return
    need_object(where, "equalization", spec, "an object with the equalization's alphas, or null")
    _need_choice(where, "equalization.method", spec.get("method"), ("awq",))
    check_calibration(spec.get("calibration"), where, "equalization.calibration")
    samples = spec.get("samples")
    if not _is_int(samples) or not 1 <= samples <= spec["calibration"]["samples"]:
        raise bad_value(where, "equalization.samples", samples,
                        f"an integer 1..{spec['calibration']['samples']} (the calibration's samples)")
    groups = spec.get("groups")
    if not isinstance(groups, list) or len(groups) > 4 * len(plan["layers"]):
        raise bad_value(where, "equalization.groups", groups, f"a list of at most {4 * len(plan['layers'])} groups")
    for i, group in enumerate(groups):
        field = f"equalization.groups[{i}]"
        need_object(where, field, group, "an object with layer, group and alpha")
        layer = group.get("layer")
        if not _is_int(layer) or not 0 <= layer < len(plan["layers"]):
            raise bad_value(where, f"{field}.layer", layer, f"a layer index 0..{len(plan['layers']) - 1}")
        _need_choice(where, f"{field}.group", group.get("group"), EQUALIZATION_GROUPS)
        need_number(where, f"{field}.alpha", group.get("alpha"), 0, 1, low_open=True)


def _validate_sparse_tokens(plan: dict, where: str) -> None:
    spec = plan.get("sparse_tokens")
    if spec is None or spec == {}:
        return
    need_object(where, "sparse_tokens", spec, "an object with the filter's settings, or null")
    missing = [k for k in SPARSE_SETTINGS if k not in spec]
    if missing:
        raise CompressorError(f"{where}: sparse_tokens lacks {missing}")
    _need_choice(where, "sparse_tokens.method", spec["method"], SPARSE_METHODS)
    layer = spec["filter_layer"]
    if not _is_int(layer) or not 0 <= layer < len(plan["layers"]) or plan["layers"][layer]["attention"] != "keep":
        raise CompressorError(f"{where}: sparse_tokens.filter_layer {shorten(layer, 40)} must be a layer whose "
                              f"attention the plan keeps")
    problem = sparse_settings_problem(spec["keep_tokens"], spec["keep_first"], spec["keep_last"], spec["pool_width"])
    if problem:
        raise CompressorError(f"{where}: sparse_tokens: {problem}")


def validate_sharing(plan: dict, where: str) -> None:
    spec = plan.get("sharing")
    if spec is None:
        return
    need_object(where, "sharing", spec, "an object with the sharing groups, or null")
    groups = _need_list(where, "sharing.groups", spec.get("groups"), "a list of groups")
    seen, bases, shared = set(), set(), 0
    for i, group in enumerate(groups):
        at = f"sharing.groups[{i}]"
        need_object(where, at, group, "an object with projection, layers and rank")
        projection = _need_choice(where, f"{at}.projection", group.get("projection"), PROJECTIONS)
        layers = group.get("layers")
        if not isinstance(layers, list) or not layers or not all(_is_int(x) for x in layers) or \
                any(b <= a for a, b in zip(layers, layers[1:])):
            raise bad_value(where, f"{at}.layers", layers, "a non-empty list of layer indices in increasing order")
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
            raise bad_value(where, f"{at}.basis", basis, f"a basis name {projection}_gN (N a number)")
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
    need_object(where, field, record, "an object with bits, group_size and symmetric")
    bits = record.get("bits")
    if allow_keep and bits == "keep":
        return
    missing = [k for k in ("bits", "group_size", "symmetric") if k not in record]
    if missing:
        raise CompressorError(f"{where}: {field} lacks {missing}")
    _need_choice(where, f"{field}.bits", bits, PLAN_BITS + (("keep",) if allow_keep else ()))
    _need_choice(where, f"{field}.group_size", record.get("group_size"), PLAN_GROUP_SIZES)
    _need_choice(where, f"{field}.symmetric", record.get("symmetric"), (True, False))
    if "scales" in record:
        _need_choice(where, f"{field}.scales", record["scales"], ("signed", "positive"))


def _validate_quantization(plan: dict, where: str) -> None:
    spec = plan.get("quantization")
    if spec is None or spec == {}:
        return
    need_object(where, "quantization", spec, "an object with the quantization section, or null")
    method = _need_choice(where, "quantization.method", spec.get("method"), QUANT_METHODS)
    need_number(where, "quantization.damp", spec.get("damp"), 0, 100, low_open=True)
    _need_choice(where, "quantization.act_order", spec.get("act_order"), (True, False))
    if "hessian_tokens" in spec:
        _need_choice(where, "quantization.hessian_tokens", spec["hessian_tokens"], HESSIAN_TOKENS)
    if "clip" in spec:
        _need_choice(where, "quantization.clip", spec["clip"], CLIPS)
    linears = need_object(where, "quantization.linears", spec.get("linears"),
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
        need_object(where, at, item, "an object with module, row and column")
        module = item.get("module")
        if not isinstance(module, str) or module not in linears:
            raise bad_value(where, f"{at}.module", module, "one of the modules in quantization.linears")
        _need_int(where, f"{at}.row", item.get("row"), 0, MAX_PLAN_ENTRIES * 1000)
        _need_int(where, f"{at}.column", item.get("column"), 0, MAX_PLAN_ENTRIES * 1000)
    _need_int(where, "quantization.predicted_tensor_bytes", spec.get("predicted_tensor_bytes"), 0, MAX_BYTES)
    if method == "signround":
        rounding = need_object(where, "quantization.signround", spec.get("signround"), "an object with steps")
        _need_int(where, "quantization.signround.steps", rounding.get("steps"), 1, 10_000)
        _need_int(where, "quantization.signround.windows", rounding.get("windows", 1), 1, MAX_WINDOWS)
        if rounding.get("learning_rate") is not None:
            need_number(where, "quantization.signround.learning_rate", rounding["learning_rate"], 0, 1, low_open=True)
    if method in CALIBRATED_METHODS:
        check_calibration(spec.get("calibration"), where, "quantization.calibration")


def load_plan(path: str | Path) -> dict:
    """A plan file (at most PLAN_MAX_BYTES of UTF-8 JSON, see compressor.safe_load), validated."""
    plan = read_json(path, "plan", PLAN_MAX_BYTES)
    validate_plan(plan, str(path))
    loaded = PlanFile(plan)
    loaded.where = str(path)
    return loaded


def _linear_shapes(model) -> dict[str, tuple[int, int]]:
    return {name: tuple(module.weight.shape) for layer in range(len(model.model.layers))
            for name, module in layer_linears(model, layer)}


def check_plan_for_model(plan: dict, model, where: str | None = None) -> None:
    """Checks a valid plan against the model `apply` loaded, before any long work: the layer count,
    the units it keeps, the projections it shares (dense, of one shape, ranks within reach), the
    linears it quantizes (modules that exist after its removal and sharing, group sizes dividing
    their input widths), the exact weights (inside their matrices) and the calibration lengths."""
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
                                 ("quantization.calibration", quantization, quantization.get("method") in CALIBRATED_METHODS)):
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
            raise bad_value(where, f"{at}.rank", rank, f"1..{most} for {len(layers)} layers of {projection} "
                                                   f"({out_features} x {in_features})")
        residual = group.get("residual_rank") or 0
        if residual > min(in_features, out_features):
            raise bad_value(where, f"{at}.residual_rank", residual, f"0..{min(in_features, out_features)}")
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
            raise bad_value(where, f"{field}.group_size", group_size,
                       f"{', '.join('null' if g is None else str(g) for g in allowed)} (input width {width})")
    embedding = quantization["embedding"]
    hidden = removed.model.embed_tokens.weight.shape[1]
    if embedding["bits"] != "keep" and embedding["group_size"] is not None and hidden % embedding["group_size"]:
        allowed = [g for g in PLAN_GROUP_SIZES if g is None or hidden % g == 0]
        raise bad_value(where, "quantization.embedding.group_size", embedding["group_size"],
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
        raise bad_value(where, "format", analysis["format"], f"{ANALYSIS_FORMAT!r} (an analysis.json written by "
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
                raise bad_value(where, f"layers[{i}].{kind}", unit, "an object with the unit's measurements, or null "
                                                               "(no such unit)")
    if analysis.get("model") is not None:
        need_object(where, "model", analysis["model"], "an object describing the model, or null")
    if recipe.remove is not None:
        _validate_removal_records(recipe.remove, analysis, where)
    if recipe.sparse_tokens is not None and recipe.sparse_tokens.filter_layer == "auto" and \
            analysis.get("filter_probe") is not None:
        probe = need_object(where, "filter_probe", analysis["filter_probe"], "the filter-layer probe's record")
        _need_int(where, "filter_probe.cases", probe.get("cases"), 0, MAX_PLAN_ENTRIES)
        rows = _need_list(where, "filter_probe.layers", probe.get("layers"), "a non-empty list of {layer, recall}",
                          nonempty=True)
        for j, row in enumerate(rows):
            need_object(where, f"filter_probe.layers[{j}]", row, "an object with layer and recall")
            _need_int(where, f"filter_probe.layers[{j}].layer", row.get("layer"), 0, n - 1)
            need_number(where, f"filter_probe.layers[{j}].recall", row.get("recall"), 0, 1)
    if recipe.quantize is not None and analysis.get("quantization") is not None:
        _validate_inventory(recipe.quantize, analysis, where)
    if recipe.share is not None and analysis.get("sharing") is not None:
        record = need_object(where, "sharing", analysis["sharing"], "the sharing analysis's record")
        if "key" not in record:
            raise CompressorError(f"{where}: sharing lacks its 'key' (the settings it was measured for)")
        if record["key"] == sharing_key(recipe.share, recipe.calibration):
            _validate_sharing_record(record, n, where)


def _validate_removal_records(removal: Removal, analysis: dict, where: str) -> None:
    layers = analysis["layers"]
    if removal.method == "similarity":
        for i, entry in enumerate(layers):
            for kind in UNIT_KINDS:
                if entry.get(kind) is not None:
                    need_number(where, f"layers[{i}].{kind}.redundancy", entry[kind].get("redundancy"))
        return
    searches = _need_list(where, "removal_searches", analysis.get("removal_searches", []), "a list of recorded searches")
    for j, search in enumerate(searches):
        at = f"removal_searches[{j}]"
        need_object(where, at, search, "a recorded search")
        quotas = need_object(where, f"{at}.quotas", search.get("quotas"), "an object of unit counts per kind")
        for kind, count in quotas.items():
            _need_choice(where, f"{at}.quotas key", kind, UNIT_KINDS + ("any",))
            _need_int(where, f"{at}.quotas.{kind}", count, 0, MAX_UNITS)
        order = _need_list(where, f"{at}.order", search.get("order"), "a list of {layer, unit, score} steps")
        for k, step in enumerate(order):
            need_object(where, f"{at}.order[{k}]", step, "an object with layer, unit and score")
            layer = _need_int(where, f"{at}.order[{k}].layer", step.get("layer"), 0, len(layers) - 1)
            unit = _need_choice(where, f"{at}.order[{k}].unit", step.get("unit"), UNIT_KINDS)
            need_number(where, f"{at}.order[{k}].score", step.get("score"))
            if layers[layer].get(unit) is None:
                raise CompressorError(f"{where}: {at}.order[{k}] removes layer {layer}'s {unit}, which the analysis's "
                                      "layers do not have")


def _need_shape(where: str, field: str, shape) -> tuple[int, int]:
    if not isinstance(shape, list) or len(shape) != 2 or not all(_is_int(x) and 0 < x < 1 << 31 for x in shape):
        raise bad_value(where, field, shape, "[rows, columns], two positive integers")
    return shape[0], shape[1]


def _validate_inventory(quantize: Quantize, analysis: dict, where: str) -> None:
    inventory = need_object(where, "quantization", analysis["quantization"], "the quantization inventory")
    n = len(analysis["layers"])
    linears = _need_list(where, "quantization.linears", inventory.get("linears"),
                         "a non-empty list of {name, layer, unit, shape}", nonempty=True)
    shapes = {}
    for j, linear in enumerate(linears):
        at = f"quantization.linears[{j}]"
        need_object(where, at, linear, "an object with name, layer, unit and shape")
        name = _need_name(where, f"{at}.name", linear.get("name"))
        if name in shapes:
            raise CompressorError(f"{where}: {at}: {shorten(name, 60)} is listed twice")
        _need_int(where, f"{at}.layer", linear.get("layer"), 0, n - 1)
        _need_choice(where, f"{at}.unit", linear.get("unit"), UNIT_KINDS)
        shapes[name] = _need_shape(where, f"{at}.shape", linear.get("shape"))
    _need_shape(where, "quantization.embedding_shape", inventory.get("embedding_shape"))
    if "embedding_element_bytes" in inventory:
        _need_choice(where, "quantization.embedding_element_bytes", inventory["embedding_element_bytes"], (1, 2, 4, 8))
    _need_int(where, "quantization.other_tensor_bytes", inventory.get("other_tensor_bytes"), 0, MAX_BYTES)
    if inventory.get("sensitivity") is not None:
        measured = need_object(where, "quantization.sensitivity", inventory["sensitivity"], "the measured sensitivity")
        bits = measured.get("bits", [])
        if not isinstance(bits, list) or not all(isinstance(b, (int, str)) for b in bits):
            raise bad_value(where, "quantization.sensitivity.bits", bits, "a list of widths")
    if quantize.protect.outliers == "none":
        return
    candidates = _need_list(where, "super_weight_candidates", analysis.get("super_weight_candidates", []),
                            "a list of {layer, row, column, weight, output_peak}")
    for j, c in enumerate(candidates):
        at = f"super_weight_candidates[{j}]"
        need_object(where, at, c, "an object with layer, row, column, weight and output_peak")
        layer = _need_int(where, f"{at}.layer", c.get("layer"), 0, n - 1)
        row = _need_int(where, f"{at}.row", c.get("row"), 0, 1 << 31)
        column = _need_int(where, f"{at}.column", c.get("column"), 0, 1 << 31)
        need_number(where, f"{at}.weight", c.get("weight"))
        need_number(where, f"{at}.output_peak", c.get("output_peak"))
        shape = shapes.get(f"model.layers.{layer}.mlp.down_proj")
        if shape is not None and (row >= shape[0] or column >= shape[1]):
            raise CompressorError(f"{where}: {at}: row {row}, column {column} is outside layer {layer}'s down_proj "
                                  f"({shape[0]} x {shape[1]})")
    if quantize.protect.outliers == "pin":
        for i, entry in enumerate(analysis["layers"]):
            massive = entry.get("massive_activations")
            if massive is not None:
                need_object(where, f"layers[{i}].massive_activations", massive, "an object with count")


def _validate_sharing_record(record: dict, n: int, where: str) -> None:
    projections = need_object(where, "sharing.projections", record.get("projections"),
                               "an object of {shape} per projection")
    groups = _need_list(where, "sharing.groups", record.get("groups"), "a list of groups")
    for j, group in enumerate(groups):
        at = f"sharing.groups[{j}]"
        need_object(where, at, group, "an object with projection, layers and cost")
        projection = group.get("projection")
        if not isinstance(projection, str) or not isinstance(projections.get(projection), dict):
            raise bad_value(where, f"{at}.projection", projection, f"one of {', '.join(map(str, projections)) or '(none)'}")
        out_features, in_features = _need_shape(where, f"sharing.projections.{projection}.shape",
                                                projections[projection].get("shape"))
        layers = group.get("layers")
        if not isinstance(layers, list) or not layers or not all(_is_int(x) and 0 <= x < n for x in layers) or \
                any(b <= a for a, b in zip(layers, layers[1:])):
            raise bad_value(where, f"{at}.layers", layers, f"a non-empty increasing list of layer indices 0..{n - 1}")
        need = full_rank(in_features, out_features, len(layers)) + 1
        cost = group.get("cost")
        if not isinstance(cost, list) or len(cost) < need or not all(is_number(c) for c in cost):
            raise bad_value(where, f"{at}.cost", cost, f"a list of at least {need} finite numbers (one per rank 0..{need - 1})")
        if group.get("layer_costs") is not None:
            per_layer = full_rank(in_features, out_features, 1) + 1
            curves = group["layer_costs"]
            if not isinstance(curves, list) or len(curves) != len(layers) or not all(
                    isinstance(c, list) and len(c) >= per_layer and all(is_number(x) for x in c) for c in curves):
                raise bad_value(where, f"{at}.layer_costs", curves, f"{len(layers)} lists of at least {per_layer} finite numbers")
    _need_int(where, "sharing.other_tensor_bytes", record.get("other_tensor_bytes"), 0, MAX_BYTES)
    _need_int(where, "sharing.bytes_per_parameter", record.get("bytes_per_parameter"), 1, 8)
