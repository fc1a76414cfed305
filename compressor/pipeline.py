"""The whole run as plain functions: load -> layer report -> stages (measure, decide, apply) -> export
-> evaluate -> report.

`compress(recipe, model, out)` is what `compress --recipe` calls. It builds the base layer report
once, then runs every stage the recipe names (compressor.stages, in order: removal, sparse-token
filter, sharing, quantization): measure on the model the earlier stages produced, decide, apply.
`analyze` stops after the last measurement, `make_plan` runs only the decide steps on a saved
analysis, `apply_plan_to_source` only the apply steps of a saved plan. Nothing is measured, built
or fitted twice.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

import torch

from compressor import stages
from compressor.analysis.collect import analyze_layers, super_weight_candidates
from compressor.analysis.removal import removal_sensitivity
from compressor.analysis.render import heatmap
from compressor.artifact import (check_destination, read_json, require_free_space, staged_folder, updating_in_place,
                                 write_json)
from compressor.data import default_evaluation_text
from compressor.errors import CompressorError
from compressor.evaluate import evaluate_model
from compressor.execution.offload import SpillFolder, is_offloaded, offload_of, stored_state
from compressor.manifest import verify_manifest
from compressor.serving import removed_units, require_source
from compressor.sources import LoadedModel, load_model
from compressor.plan import ANALYSIS_FORMAT, check_plan_for_model, empty_plan, validate_analysis
from compressor.placement import resolve as resolve_placement
from compressor.process import peak_rss_mb, quiet_transformers
from compressor.recipe import Recipe, TensorRT, check_name, default, load_recipe, recipe_yaml
from compressor.report import artifact_report, quantization_summary as summary_of_quantization, report_markdown
from compressor.runtime import load
from compressor.stages import equalization, quantization
from compressor.stages.run import Applied, Run
from exporters.onnx import DEFAULT_TOLERANCE, require
from exporters.onnx.files import DECODER_FILE, SPARSE_FILE
from exporters.safetensors import read_model, write_model
from exporters.tensorrt.build import Profiles, library_module


def layer_report(loaded: LoadedModel, recipe: Recipe, run: Run) -> dict:
    """The base LayerReport every stage reads: one instrumented pass (redundancy, block influence,
    outliers, weight statistics), and each unit's removal sensitivity when the recipe asks for it."""
    model, settings = loaded.model, recipe.calibration
    windows = run.calibration(settings.model_dump())
    weight_stats = []
    layers = analyze_layers(model, windows.input_ids, run.batch_size, run.quiet, weight_stats)
    for entry, stats in zip(layers, weight_stats):
        for kind in ("attention", "mlp"):
            if entry[kind] is not None:
                entry[kind].update(stats[kind])
        entry["zd"] = stats.get("zd")
    analysis = {"format": ANALYSIS_FORMAT,
                "model": dict(loaded.info, num_hidden_layers=model.config.num_hidden_layers,
                              hidden_size=model.config.hidden_size, parameters=sum(p.numel() for p in model.parameters())),
                "calibration": windows.record, "layers": layers,
                "super_weight_candidates": super_weight_candidates(layers), "removal_searches": []}
    if recipe.analysis.removal_sensitivity:
        removal = recipe.remove
        probe = (windows.input_ids[: removal.search_samples, : removal.search_seq_len] if removal is not None
                 else windows.input_ids[:8, :256])
        for (layer, kind), js in removal_sensitivity(model, probe, run.batch_size, run.quiet).items():
            layers[layer][kind]["removal_js"] = js
    return analysis


def decide(stage, recipe: Recipe, analysis: dict, plan: dict, where: str = "analysis") -> None:
    """One stage's decide step on a checked analysis; its entries go into `plan`."""
    validate_analysis(recipe, analysis, where)
    plan.update(stage.decide(recipe, analysis, plan))


def make_plan(recipe: Recipe, analysis: dict, where: str = "analysis") -> dict:
    """The plan of `recipe` from a saved analysis: the decide steps alone. A stage whose record the
    analysis lacks stops it with MissingRecord (one line naming the stage)."""
    validate_analysis(recipe, analysis, where)
    plan = empty_plan(recipe.name, analysis, recipe.serve)
    for stage in stages.named_by(recipe):
        plan.update(stage.decide(recipe, analysis, plan))  # the analysis is whole: checked once above
    return plan


def run_stages(loaded: LoadedModel, recipe: Recipe, run: Run, log=print, measure_only: bool = False,
               before_quantizing=None) -> tuple[dict, dict | None, Applied | None]:
    """The layer report, then every stage of the recipe in order: measure on the model the earlier
    stages produced, decide, apply. Returns (analysis, plan, the applied model and codes); with
    `measure_only`, stops after the last measurement and returns (analysis, None, None).
    `before_quantizing(model, plan)` runs once the whole plan is known, before the codes are made."""
    started, rss_before = time.perf_counter(), peak_rss_mb()
    analysis = layer_report(loaded, recipe, run)
    seconds = {"layer_report": time.perf_counter() - started}
    plan = empty_plan(recipe.name, analysis, recipe.serve)
    named = stages.named_by(recipe)
    applied = Applied(loaded.model)
    for stage in stages.STAGES:
        if measure_only and not named:
            break
        record = None
        if stage in named:
            named.remove(stage)
            clock = time.perf_counter()
            record = stage.measure(applied.model, recipe, analysis, run)
            seconds[f"{stage.PART}.measure"] = time.perf_counter() - clock
            if record is not None:
                analysis[stage.RECORD] = record
            if measure_only and not named:
                break
            decide(stage, recipe, analysis, plan)
            log_decision(stage, plan, log)
        if stage is quantization and before_quantizing is not None:
            before_quantizing(applied.model, plan)
        clock = time.perf_counter()
        applied = stage.apply(applied.model, plan, run, record)
        if stage in stages.named_by(recipe):
            seconds[f"{stage.PART}.apply"] = time.perf_counter() - clock
    analysis["cost"] = dict(run_cost(started, rss_before, loaded.model), stage_seconds=seconds)
    return (analysis, None, None) if measure_only else (analysis, plan, applied)


def run_cost(started: float, rss_before: float, model) -> dict:
    """Wall time, peak resident memory, threads, where the model computed, and the device's peak
    memory on CUDA."""
    device = next(iter(model.model.norm.parameters())).device
    cost = {"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb(), "peak_rss_before_mb": rss_before,
            "threads": torch.get_num_threads(), "device": str(device),
            "weights": "disk" if is_offloaded(model) else "memory"}
    if device.type == "cuda":
        cost["peak_device_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return cost


def analyze(loaded: LoadedModel, recipe: Recipe, quiet: bool = False) -> dict:
    """The analysis `compress analyze` writes: the layer report and every stage's record (each
    measured on the model after the earlier stages' plan parts are applied)."""
    run = Run(loaded.tokenizer, recipe.analysis.batch_size, quiet)
    return run_stages(loaded, recipe, run, log=lambda message: None, measure_only=True)[0]


def analyze_source(source: str, recipe: Recipe, out: str | Path, quiet: bool = False) -> dict:
    """`compress analyze`: the source loaded as the recipe's device and weights say, then analyze."""
    loaded = load_model(source, quiet=True, weights=recipe.weights,
                        placement=resolve_placement(recipe.device, recipe.compute_dtype))
    spill = start_spill(loaded.model, Path(out))
    try:
        return analyze(loaded, recipe, quiet)
    finally:
        spill.close()


def log_decision(stage, plan: dict, log) -> None:
    part = plan.get(stage.PART)
    if stage.PART == "removal":
        removed = part["removed"]
        log(f"plan: remove {len(removed)} units" +
            (": " + ", ".join(f"{u['layer']}.{u['unit']}" for u in removed) if removed else ""))
    elif stage.PART == "sparse_tokens":
        log(f"plan: sparse tokens, {part['method']} at layer {part['filter_layer']} ({part['reason']})")
    elif stage.PART == "sharing":
        log(sharing_summary(part))
    elif stage.PART == "equalization":
        log(equalization.summary(part))
    elif stage.PART == "quantization":
        log(quantization_summary(part))


def write_analysis(analysis: dict, folder: Path) -> None:
    write_json(folder / "analysis.json", analysis)
    heatmap(analysis, folder / "analysis.png")


def evaluation_text(recipe: Recipe) -> str:
    return default_evaluation_text() if recipe.evaluate.text == "auto" else recipe.evaluate.text


def original_metrics(loaded: LoadedModel, recipe: Recipe, quiet: bool) -> dict:
    """The original model's metrics; it is saved to a temporary folder to measure size and speed."""
    with tempfile.TemporaryDirectory(prefix="compressor-original-") as tmp:
        write_model(loaded.model, None, tmp)
        return evaluate_model(loaded.model, loaded.tokenizer, recipe.evaluate, evaluation_text(recipe), tmp, quiet)


def write_report(folder: Path, name: str, metrics: dict, original: dict | None, plan: dict | None) -> dict:
    report = artifact_report(name, metrics, original, plan, folder)
    write_json(folder / "report.json", report)
    (folder / "report.md").write_text(report_markdown(report))
    return report


def compress(recipe: Recipe | str | Path, model: str | None = None, out: str | Path | None = None,
             force: bool = False, quiet: bool = False, log=print, device: str | None = None,
             weights: str | None = None) -> Path:
    """Runs every step of a recipe and returns the artifact folder. The destination is claimed
    before any work (see compressor.artifact) and published whole at the end. `device` and `weights`
    override the recipe's."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    quiet_transformers()
    placement = resolve_placement(device or recipe.device, recipe.compute_dtype)
    weights = weights or recipe.weights
    if out is None:
        try:
            check_name(recipe.name)  # it becomes a path: out/NAME
        except ValueError as exc:
            raise CompressorError(f"recipe name: {exc}") from None
    out = check_destination(out or Path("out") / recipe.name, force)
    check_source_apart(model or recipe.model, out)
    if {"onnx", "tensorrt"} & set(recipe.export):
        require()  # the optional ONNX packages: checked before the analysis, not after it
    if "tensorrt" in recipe.export:
        library_module(recipe.tensorrt.library)  # and TensorRT: one line now, not after the compression
        from exporters.tensorrt.prepare import recipe_problem  # optional dependency (imports onnx)

        problem = recipe_problem(recipe.quantize)
        if problem:
            raise CompressorError(f"export: tensorrt cannot take {problem}")
        if recipe.sparse_tokens is not None and recipe.tensorrt.token_selection == "plugin":
            from exporters.tensorrt.plugin import resolve_selection

            resolve_selection("plugin")  # the plugin's toolchain, before the compression
    with staged_folder(out, force) as staging, contextlib.ExitStack() as stack:
        source = model or recipe.model
        log(f"loading model: {source}" + (" (the first use converts the embedded GGUF file: about 20 s)"
                                          if source == "embedded" else ""))
        loaded = load_model(source, quiet=True, weights=weights, placement=placement)
        log(f"computing on {placement.describe()}; " + ("decoder layers read from disk one at a time"
                                                        if is_offloaded(loaded.model) else "weights in memory"))
        spill = start_spill(loaded.model, out)
        stack.callback(spill.close)
        require_source(loaded.model.config, recipe.serve, recipe.remove is not None or bool(removed_units(loaded.model.config)))
        require_free_space(staging, smallest_artifact_bytes(loaded.model, recipe), "the smallest artifact this recipe "
                           "can make")
        log(f"analyzing: {recipe.calibration.samples} calibration windows x {recipe.calibration.seq_len} tokens "
            f"from '{recipe.calibration.text}'")
        run = Run(loaded.tokenizer, recipe.analysis.batch_size, quiet)

        def check_space(model, plan):
            require_free_space(staging, planned_artifact_bytes(model, plan, recipe.export), "this plan's artifact")

        analysis, plan, compressed = run_stages(loaded, recipe, run, log, before_quantizing=check_space)
        write_model(compressed.model, loaded.tokenizer, staging, compressed.codes, recipe.serve, recipe.max_shard_bytes)
        if {"onnx", "tensorrt"} & set(recipe.export):
            from exporters.onnx.export import export_artifact as export_onnx  # optional dependency

            export_onnx(staging, log=log, name=out, matmul_accuracy=recipe.onnx.matmul_accuracy)
        if "tensorrt" in recipe.export:
            from exporters.tensorrt.export import export_artifact as export_tensorrt  # optional dependency (onnx)

            export_tensorrt(staging, tensorrt_profiles(recipe.tensorrt), recipe.tensorrt.library, log=log, name=out,
                            token_selection=recipe.tensorrt.token_selection, precision=recipe.tensorrt.precision)
        (staging / "recipe.yaml").write_text(recipe_yaml(recipe))
        write_json(staging / "plan.json", plan)
        write_analysis(analysis, staging)
        log("evaluating compressed model")
        metrics = evaluate_model(compressed.model, loaded.tokenizer, recipe.evaluate, evaluation_text(recipe),
                                 staging, quiet)
        original = None
        if recipe.evaluate.compare_original:
            log("evaluating original model")
            original = original_metrics(loaded, recipe, quiet)
        write_report(staging, recipe.name, metrics, original, plan)
    return out


def start_spill(model, out: Path) -> SpillFolder:
    """The folder an offloaded run writes changed tensors to: beside the artifact (the disk the user
    chose for it), removed when the run ends. A resident model gets one that stays unused."""
    spill = SpillFolder(str(Path(os.path.abspath(out)).parent))
    offload = offload_of(model)
    if offload is not None:
        offload.spill = spill
    return spill


def apply_plan(model, plan: dict, run: Run, before_quantizing=None) -> Applied:
    """Every stage's apply step on a checked plan, in order (what `compress apply` runs)."""
    applied = Applied(model)
    for stage in stages.STAGES:
        if stage is quantization and before_quantizing is not None:
            before_quantizing(applied.model, plan)
        applied = stage.apply(applied.model, plan, run)
    return applied


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
        for tensor in stored_state(model).values():
            resident = isinstance(tensor, torch.Tensor)
            if not resident or tensor.data_ptr() not in seen:  # a tensor shared by two names counts once
                if resident:
                    seen.add(tensor.data_ptr())
                tensors += tensor.numel() * tensor.element_size()
    # ONNX: the graphs' weights (1.1: a tied embedding may be stored apart); TensorRT: its engines too.
    return int(tensors * (1.0 + (1.1 if {"onnx", "tensorrt"} & set(export) else 0) + (1.1 if "tensorrt" in export else 0)))


def tensorrt_profiles(settings) -> Profiles:
    return Profiles(tuple(settings.batch), tuple(settings.sequence), tuple(settings.past))


def quantization_summary(spec: dict) -> str:
    summary = summary_of_quantization({"quantization": spec})
    widths = ", ".join(f"{n} x {b}-bit" for b, n in sorted(summary["units_per_width"].items(), key=lambda kv: int(kv[0])))
    if summary.get("units_per_group_size"):
        widths += " (" + ", ".join(f"{n} x {g}" for g, n in summary["units_per_group_size"].items()) + ")"
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


def apply_plan_to_source(plan: dict, source: str, out: str | Path, force: bool, quiet: bool = False,
                         max_shard_bytes: int = default(Recipe, "max_shard_bytes"), device: str = "auto",
                         weights: str = "auto") -> Path:
    quiet_transformers()
    placement = resolve_placement(device, "auto")
    check_source_apart(source, check_destination(out, force))
    with staged_folder(out, force) as staging, contextlib.ExitStack() as stack:
        loaded = load_model(source, quiet=True, weights=weights, placement=placement)
        stack.callback(start_spill(loaded.model, Path(out)).close)
        if is_offloaded(loaded.model) and plan.get("sharing"):
            raise CompressorError("plan sharing: does not run with the decoder layers on disk yet; allowed: "
                                  "--weights memory")
        check_plan_for_model(plan, loaded.model)  # names, shapes and ranks against this model, before any work
        removes = any("remove" in (d.get("attention"), d.get("mlp")) for d in plan["layers"])
        require_source(loaded.model.config, plan.get("serve") or [], removes or bool(removed_units(loaded.model.config)))

        def check_space(model, plan):
            require_free_space(staging, planned_artifact_bytes(model, plan, []), "this plan's artifact")

        compressed = apply_plan(loaded.model, plan, Run(loaded.tokenizer, quiet=quiet), check_space)
        write_model(compressed.model, loaded.tokenizer, staging, compressed.codes, plan.get("serve") or [],
                    max_shard_bytes)
        write_json(staging / "plan.json", dict(plan, model=dict(plan.get("model") or {}, source=source)))
    return Path(os.path.abspath(out))


def export_artifact(folder: Path, fmt: str, tolerance: float | None = None, log=print, tensorrt=None,
                    matmul_accuracy: str = "fp32") -> Path:
    """Writes an export of an existing artifact folder (inside it); returns the export's folder.
    `tensorrt` (a recipe's TensorRT section) sets the engines' library, token selection, precision and profiles;
    `matmul_accuracy` is the ONNX export's recorded compute (recipe.OnnxExport)."""
    if fmt not in ("onnx", "tensorrt"):
        raise CompressorError(f"export format {fmt!r} is not supported; allowed: onnx, tensorrt")
    require()
    if not (folder / "config.json").is_file():
        raise CompressorError(f"{folder}: not an artifact folder (needs config.json and model.safetensors or its shards)")
    if fmt == "tensorrt":
        from exporters.tensorrt.export import export_artifact as export_tensorrt  # optional dependency (onnx)

        settings = tensorrt or TensorRT()
        library_module(settings.library)
        with updating_in_place(folder) as folder:
            verify_manifest(folder, skip=("onnx/", "tensorrt/"))
            return export_tensorrt(folder, tensorrt_profiles(settings), settings.library, log=log,
                                   token_selection=settings.token_selection, precision=settings.precision)
    from exporters.onnx.export import export_artifact as export_onnx  # optional dependency (imports onnx)

    with updating_in_place(folder) as folder:
        verify_manifest(folder, skip=("onnx/", "tensorrt/"))  # an export of damaged weights would inherit the damage
        return export_onnx(folder, DEFAULT_TOLERANCE if tolerance is None else tolerance, log=log,
                           matmul_accuracy=matmul_accuracy)


def evaluate_artifact(folder: Path, recipe_path: str | None, with_original: bool, quiet: bool = False,
                      log=print) -> dict:
    """Evaluates an artifact in place and (re)writes its report.json and report.md."""
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
    model, _ = read_model(folder)
    for name in ("plan.json", "analysis.json", "report.json", "onnx/export.json"):
        if (folder / name).is_file():
            read_json(folder / name, name)
    onnx_dir = folder / "onnx"
    if onnx_dir.is_dir():
        require()
        # The ONNX code, imported only with an export to check: `import compressor` loads no
        # exporters.onnx module but the package and its files (tests/test_runtime_backends.py).
        from exporters.onnx.loader import check_files

        for graph in (DECODER_FILE, SPARSE_FILE):
            if graph == DECODER_FILE or (onnx_dir / graph).is_file():
                check_files(onnx_dir, graph)
    return model.config.num_hidden_layers
