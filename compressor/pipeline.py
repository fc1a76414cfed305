"""The whole run as plain functions: load -> analyze -> plan -> apply -> export -> evaluate -> report.

`compress(recipe, model, out)` is what `compress --recipe` calls; the steps are also public so
that the CLI's sub-commands and the benchmarks reuse them.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from compressor.analysis.collect import analyze_layers, super_weight_candidates, weight_statistics
from compressor.analysis.quantization import quantization_inventory, quantization_sensitivity
from compressor.analysis.removal import greedy_removal_order, removal_sensitivity
from compressor.analysis.render import heatmap
from compressor.artifact import check_destination, require_free_space, staged_folder, updating_in_place, write_json
from compressor.data import calibration_windows, default_evaluation_text
from compressor.errors import CompressorError
from compressor.evaluate import evaluate_model
from compressor.manifest import verify_manifest
from compressor.models.sources import LoadedModel, load_model
from compressor.plan import (filter_probe_pending, make_plan, removable_candidates, removal_quotas, required_units,
                             search_key)
from compressor.recipe import Recipe, check_name, load_recipe, recipe_yaml
from compressor.report import artifact_report, report_markdown
from compressor.transforms.prune import remove_units

ANALYSIS_FORMAT = "compressor-analysis/1"


def quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def analyze(loaded: LoadedModel, recipe: Recipe, quiet: bool = False, reuse: dict | None = None) -> dict:
    """The LayerReport: one instrumented pass, plus the costlier scores the recipe asks for.

    `reuse`, when given, receives what the same run's apply step can use again (the calibration
    second moments of weight sharing) under "sharing_moments"."""
    model, settings = loaded.model, recipe.calibration
    windows = calibration_windows(loaded.tokenizer, settings.text, settings.samples, settings.seq_len, settings.seed)
    started = time.perf_counter()
    rss_before = peak_rss_mb()
    layers = analyze_layers(model, windows.input_ids, recipe.analysis.batch_size, quiet)
    for entry, stats in zip(layers, weight_statistics(model)):
        for kind in ("attention", "mlp"):
            if entry[kind] is not None:
                entry[kind].update(stats[kind])
        entry["zd"] = stats.get("zd")
    analysis = {"format": ANALYSIS_FORMAT,
                "model": dict(loaded.info, num_hidden_layers=model.config.num_hidden_layers,
                              hidden_size=model.config.hidden_size, parameters=sum(p.numel() for p in model.parameters())),
                "calibration": windows.record, "layers": layers,
                "super_weight_candidates": super_weight_candidates(layers), "removal_searches": []}
    removal = recipe.remove
    search_windows = None
    if removal is not None:
        search_windows = windows.input_ids[: removal.search_samples, : removal.search_seq_len]
    if recipe.analysis.removal_sensitivity:
        probe = search_windows if search_windows is not None else windows.input_ids[:8, :256]
        for (layer, kind), js in removal_sensitivity(model, probe, recipe.analysis.batch_size, quiet).items():
            layers[layer][kind]["removal_js"] = js
    if removal is not None and removal.method in ("iterative", "finercut"):
        analysis["removal_searches"].append(
            removal_search(model, analysis, removal, search_windows, recipe.analysis.batch_size, quiet,
                           required_units(recipe)))
    probe_pending = recipe.sparse_tokens is not None and filter_probe_pending(recipe, analysis)
    if recipe.quantize is not None or recipe.share is not None or probe_pending:
        # Measured on the model each later step will see: after the plan's removals (and, for the
        # quantizer, after sharing).
        after_removal = remove_units(model, make_plan(recipe, analysis))
        if probe_pending:
            from compressor.analysis.filter_probe import filter_layer_probe

            analysis["filter_probe"] = filter_layer_probe(after_removal, loaded.tokenizer, recipe.sparse_tokens,
                                                          settings.text, quiet)
        target = after_removal
        if recipe.share is not None:
            from compressor.analysis.sharing import sharing_analysis

            analysis["sharing"], moments = sharing_analysis(after_removal, recipe.share, recipe.calibration,
                                                            windows.input_ids, recipe.analysis.batch_size, quiet)
            if reuse is not None:
                reuse["sharing_moments"] = moments
            if recipe.quantize is not None:
                target = apply_sharing(after_removal, loaded.tokenizer, make_plan(recipe, analysis), moments, quiet)
        if recipe.quantize is not None:
            analysis["quantization"] = quantization_analysis(target, recipe, windows.input_ids, quiet)
    analysis["cost"] = {"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb(),
                        "peak_rss_before_mb": rss_before, "threads": torch.get_num_threads()}
    return analysis


def apply_sharing(model, tokenizer, plan: dict, moments: dict | None = None, quiet: bool = False):
    """The model with the plan's shared groups factored (a new model; `model` is left as it was).
    The activation fit measures the calibration second moments unless the run already has them."""
    from compressor.plan import shared_groups
    from compressor.transforms.share import input_second_moments, share_weights

    groups = shared_groups(plan)
    if not groups:
        return model
    spec = plan["sharing"]
    if spec["fit"] == "activation" and moments is None:
        settings = spec["calibration"]
        windows = calibration_windows(tokenizer, settings["text"], settings["samples"], settings["seq_len"],
                                      settings["seed"]).input_ids
        wanted = {(layer, g["projection"]) for g in groups for layer in g["layers"]}
        moments = input_second_moments(model, windows, 4, wanted, quiet)
    return share_weights(model, groups, spec["fit"], moments, quiet)


def quantization_analysis(model, recipe: Recipe, calibration: torch.Tensor, quiet: bool) -> dict:
    inventory = quantization_inventory(model)
    if recipe.quantize.allocate == "sensitivity":
        inventory["sensitivity"] = quantization_sensitivity(model, recipe.quantize, calibration,
                                                            recipe.analysis.batch_size, quiet)
    return inventory


def apply_quantization(model, tokenizer, plan: dict, quiet: bool = False) -> dict:
    """Quantizes `model` in place as the plan says; returns the codes (module name -> QuantizedWeight)."""
    from compressor.transforms.quantize import QuantFormat
    from compressor.transforms.quantize_model import quantize_model

    spec = plan["quantization"]
    formats = {name: QuantFormat(r["bits"], r["group_size"], r["symmetric"]) for name, r in spec["linears"].items()}
    keep_exact = {}
    for item in spec.get("exact_weights", []):
        weight = model.get_submodule(item["module"]).weight
        mask = keep_exact.setdefault(item["module"], torch.zeros(weight.shape, dtype=torch.bool))
        mask[item["row"], item["column"]] = True
    embedding = spec["embedding"]
    embedding_format = None if embedding["bits"] == "keep" else QuantFormat(
        embedding["bits"], embedding["group_size"], embedding["symmetric"])
    calibration = None
    if spec["method"] == "gptq":
        settings = spec["calibration"]
        calibration = calibration_windows(tokenizer, settings["text"], settings["samples"],
                                          settings["seq_len"], settings["seed"]).input_ids
    return quantize_model(model, formats, spec["method"], calibration, damp=spec["damp"], act_order=spec["act_order"],
                          keep_exact=keep_exact, embedding=embedding_format,
                          token_weighting=spec.get("hessian_tokens", "equal"), quiet=quiet)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def removal_search(model, analysis: dict, removal, windows, batch_size: int, quiet: bool,
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
    from compressor.analysis.removal import units_switched_off

    order = []
    for kind in kinds_with_quota:
        removed = [(s["layer"], s["unit"]) for s in order]
        with units_switched_off(model, removed):
            order += greedy_removal_order(model, windows, [u for u in candidates if u[1] == kind], quotas[kind],
                                          method, batch_size, quiet)
    return order


def write_analysis(analysis: dict, folder: Path) -> None:
    write_json(folder / "analysis.json", analysis)
    heatmap(analysis, folder / "analysis.png")


def evaluation_text(recipe: Recipe) -> str:
    return default_evaluation_text() if recipe.evaluate.text == "auto" else recipe.evaluate.text


def original_metrics(loaded: LoadedModel, recipe: Recipe, quiet: bool) -> dict:
    """The original model's metrics; it is saved to a temporary folder to measure size and speed."""
    from exporters.safetensors import write_model

    with tempfile.TemporaryDirectory(prefix="compressor-original-") as tmp:
        write_model(loaded.model, None, tmp)
        return evaluate_model(loaded.model, loaded.tokenizer, recipe.evaluate, evaluation_text(recipe), tmp, quiet)


def write_report(folder: Path, name: str, metrics: dict, original: dict | None, plan: dict | None) -> dict:
    report = artifact_report(name, metrics, original, plan)
    write_json(folder / "report.json", report)
    (folder / "report.md").write_text(report_markdown(report))
    return report


def compress(recipe: Recipe | str | Path, model: str | None = None, out: str | Path | None = None,
             force: bool = False, quiet: bool = False, log=print) -> Path:
    """Runs every step of a recipe and returns the artifact folder. The destination is claimed
    before any work (see compressor.artifact) and published whole at the end."""
    from exporters.safetensors import write_model

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    quiet_transformers()
    if out is None:
        try:
            check_name(recipe.name)  # it becomes a path: out/NAME
        except ValueError as exc:
            raise CompressorError(f"recipe name: {exc}") from None
    out = check_destination(out or Path("out") / recipe.name, force)
    check_source_apart(model or recipe.model, out)
    if "onnx" in recipe.export:
        from exporters.onnx import require

        require()  # before the analysis, not after it
    with staged_folder(out, force) as staging:
        source = model or recipe.model
        log(f"loading model: {source}" + (" (the first use converts the embedded GGUF file: about 20 s)"
                                          if source == "embedded" else ""))
        loaded = load_model(source, quiet=True)
        require_free_space(staging, smallest_artifact_bytes(loaded.model, recipe), "the smallest artifact this recipe "
                           "can make")
        log(f"analyzing: {recipe.calibration.samples} calibration windows x {recipe.calibration.seq_len} tokens "
            f"from '{recipe.calibration.text}'")
        reuse: dict = {}
        analysis = analyze(loaded, recipe, quiet, reuse)
        plan = make_plan(recipe, analysis)
        removed = (plan.get("removal") or {}).get("removed", [])
        log(f"plan: remove {len(removed)} units" + (": " + ", ".join(f"{u['layer']}.{u['unit']}" for u in removed) if removed else ""))
        if plan.get("sparse_tokens"):
            sparse = plan["sparse_tokens"]
            log(f"plan: sparse tokens, {sparse['method']} at layer {sparse['filter_layer']} ({sparse['reason']})")
        compressed = remove_units(loaded.model, plan)
        if plan.get("sharing"):
            log(sharing_summary(plan["sharing"]))
            compressed = apply_sharing(compressed, loaded.tokenizer, plan, reuse.get("sharing_moments"), quiet)
        require_free_space(staging, planned_artifact_bytes(compressed, plan, recipe.export), "this plan's artifact")
        quantized = None
        if plan.get("quantization"):
            log(quantization_summary(plan["quantization"]))
            quantized = apply_quantization(compressed, loaded.tokenizer, plan, quiet)
        write_model(compressed, loaded.tokenizer, staging, quantized)
        if "onnx" in recipe.export:
            from exporters.onnx.export import export_artifact as export_onnx

            export_onnx(staging, log=log, name=out)
        (staging / "recipe.yaml").write_text(recipe_yaml(recipe))
        write_json(staging / "plan.json", plan)
        write_analysis(analysis, staging)
        log("evaluating compressed model")
        metrics = evaluate_model(compressed, loaded.tokenizer, recipe.evaluate, evaluation_text(recipe),
                                 staging, quiet)
        original = None
        if recipe.evaluate.compare_original:
            log("evaluating original model")
            original = original_metrics(loaded, recipe, quiet)
        write_report(staging, recipe.name, metrics, original, plan)
    return out


def smallest_artifact_bytes(model, recipe: Recipe) -> int:
    """A lower bound on the artifact's bytes, known before the analysis: half the parameters (the most
    a removal could leave out, and more) at the smallest width the recipe allows."""
    parameters = sum(p.numel() for p in model.parameters())
    bits = min(recipe.quantize.bits) if recipe.quantize is not None else 8 * model.dtype.itemsize
    return int(parameters * bits / 8 * 0.5)


def check_source_apart(source: str | None, out: Path) -> None:
    """The artifact may not be written over, inside or around the model folder it is made from."""
    if not source or not Path(source).exists():
        return
    source_path = Path(os.path.abspath(source))
    if source_path == out or source_path.is_relative_to(out) or out.is_relative_to(source_path):
        raise CompressorError(f"--out {out} overlaps the model source {source_path}; write the artifact "
                              "to a folder of its own")


def planned_artifact_bytes(model, plan: dict, export: list[str]) -> int:
    """What the plan's artifact will take on disk (tensors; an ONNX export stores them again). Known
    from the plan when it quantizes or shares, else from the model after removal."""
    spec = plan.get("quantization") or plan.get("sharing")
    if spec and isinstance(spec.get("predicted_tensor_bytes"), int):
        tensors = int(spec["predicted_tensor_bytes"])
    else:
        seen, tensors = set(), 0
        for tensor in model.state_dict().values():
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                tensors += tensor.numel() * tensor.element_size()
    return int(tensors * (2.1 if "onnx" in export else 1.0))


def quantization_summary(spec: dict) -> str:
    from compressor.report import quantization_summary as summary_of

    summary = summary_of({"quantization": spec})
    widths = ", ".join(f"{n} x {b}-bit" for b, n in sorted(summary["units_per_width"].items(), key=lambda kv: int(kv[0])))
    return (f"plan: quantize ({summary['method']}, allocate by {summary['allocate']}): {widths}; "
            f"{summary['avg_bits']:.3f} bits per linear weight, embedding {summary['embedding_bits']}, "
            f"{len(summary['exact_weights'])} weights kept exact; "
            f"predicted {summary['predicted_tensor_bytes'] / 1e6:.1f} MB")


def sharing_summary(spec: dict) -> str:
    shared = [g for g in spec["groups"] if g.get("rank")]
    return (f"plan: share {', '.join(spec['projections'])} ({spec['fit']} fit, {spec['grouping']} groups): "
            f"{len(shared)} shared bases, {len(spec['groups']) - len(shared)} groups left dense; "
            f"{spec['achieved_reduction']:.1%} fewer of these parameters "
            f"({spec['dense_parameters'] / 1e6:.2f}M -> {spec['parameters'] / 1e6:.2f}M)")


def apply_plan_to_source(plan: dict, source: str, out: str | Path, force: bool, quiet: bool = False) -> Path:
    from compressor.plan import check_plan_for_model
    from exporters.safetensors import write_model

    quiet_transformers()
    check_source_apart(source, check_destination(out, force))
    with staged_folder(out, force) as staging:
        loaded = load_model(source, quiet=True)
        check_plan_for_model(plan, loaded.model)  # names, shapes and ranks against this model, before any work
        removed = remove_units(loaded.model, plan)
        require_free_space(staging, planned_artifact_bytes(removed, plan, []), "this plan's artifact")
        compressed = apply_sharing(removed, loaded.tokenizer, plan, quiet=quiet)
        quantized = apply_quantization(compressed, loaded.tokenizer, plan, quiet) if plan.get("quantization") else None
        write_model(compressed, loaded.tokenizer, staging, quantized)
        write_json(staging / "plan.json", dict(plan, model=dict(plan.get("model") or {}, source=source)))
    return Path(os.path.abspath(out))


def export_artifact(folder: Path, fmt: str, tolerance: float | None = None, log=print) -> Path:
    """Writes an export of an existing artifact folder (inside it); returns the export's folder."""
    if fmt != "onnx":
        raise CompressorError(f"export format {fmt!r} is not supported; allowed: onnx")
    from exporters.onnx import require

    require()
    from exporters.onnx import DEFAULT_TOLERANCE
    from exporters.onnx.export import export_artifact as export_onnx

    if not (folder / "config.json").is_file():
        raise CompressorError(f"{folder}: not an artifact folder (needs config.json and model.safetensors)")
    with updating_in_place(folder) as folder:
        verify_manifest(folder, skip=("onnx/",))  # an export of damaged weights would inherit the damage
        return export_onnx(folder, DEFAULT_TOLERANCE if tolerance is None else tolerance, log=log)


def evaluate_artifact(folder: Path, recipe_path: str | None, with_original: bool, quiet: bool = False,
                      log=print) -> dict:
    """Evaluates an artifact in place and (re)writes its report.json and report.md."""
    from compressor.artifact import read_json
    from compressor.runtime import load

    quiet_transformers()
    if not folder.is_dir():
        raise CompressorError(f"artifact folder not found: {folder}")
    with updating_in_place(folder):  # no other run publishes here while this one reads and writes
        artifact = load(folder)  # checks the manifest
        saved_recipe = folder / "recipe.yaml"
        recipe_path = recipe_path or (saved_recipe if saved_recipe.is_file() else None)
        recipe = load_recipe(recipe_path) if recipe_path else Recipe(name=Path(os.path.abspath(folder)).name)
        log(f"evaluating {folder}")
        metrics = evaluate_model(artifact.model, artifact.tokenizer, recipe.evaluate, evaluation_text(recipe),
                                 folder, quiet)
        original = None
        plan = read_json(folder / "plan.json", "plan") if (folder / "plan.json").is_file() else None
        source = ((plan or {}).get("model") or {}).get("source")
        if with_original and source:
            log(f"evaluating original model: {source}")
            original = original_metrics(load_model(source, quiet=True), recipe, quiet)
        return write_report(folder, recipe.name, metrics, original, plan)


def verify_artifact(folder: Path, update: bool = False) -> str:
    """`compress verify`: every file against the manifest, then config and weights against each
    other (and the ONNX export's files); with `update`, the structural checks and a new manifest."""
    if not folder.is_dir():
        raise CompressorError(f"artifact folder not found: {folder}")
    if not folder.is_dir():
        raise CompressorError(f"artifact folder not found: {folder}")
    if update:
        with updating_in_place(folder):  # checks under the lock; the manifest is written on leaving
            layers = _check_artifact_structure(folder)
        return f"{folder}: config and weights consistent ({layers} layers); manifest.json written anew"
    figures = verify_manifest(folder)
    layers = _check_artifact_structure(folder)
    return (f"{folder}: verified {figures['files']} files, {figures['bytes'] / 1e6:.1f} MB against manifest.json "
            f"(SHA-256, {figures['seconds']:.2f} s); config and weights consistent ({layers} layers)")


def _check_artifact_structure(folder: Path) -> int:
    """config.json against the weights, the JSON files, the ONNX export's files; returns the layer count."""
    from compressor.artifact import read_json
    from exporters.safetensors import read_model

    model, _ = read_model(folder)
    for name in ("plan.json", "analysis.json", "report.json", "onnx/export.json"):
        if (folder / name).is_file():
            read_json(folder / name, name)
    onnx_dir = folder / "onnx"
    if onnx_dir.is_dir():
        from exporters.onnx import require

        require()
        from exporters.onnx.export import DECODER_FILE, SPARSE_FILE
        from exporters.onnx.loader import check_files

        for graph in (DECODER_FILE, SPARSE_FILE):
            if graph == DECODER_FILE or (onnx_dir / graph).is_file():
                check_files(onnx_dir, graph)
    return model.config.num_hidden_layers
