"""ONNX export of an artifact folder: `onnx/model.onnx` (the decoder with an explicit KV cache),
`onnx/prefill_sparse.onnx` when the plan has a sparse-token filter, their weights in one shared
external-data file `onnx/weights.data`, and `onnx/export.json` (what was written and how it was
checked). The file names live in `exporters.onnx.files`; importing them from here still works for
callers written before it.

The graphs are exported by torch's dynamo exporter from `graph_module` (built from the compressed
model, so removed units have no tensors), with dynamic batch and sequence axes. Quantized weights are
then written from the artifact's own codes (`quantized_graph`). Before anything is kept, the
exported graphs run on a probe input in ONNX Runtime and their logits are compared with the torch
model's; a difference above the tolerance fails the export with the figure. The folder is staged
inside the artifact and swapped into place at the end (`compressor.artifact.staging_beside`, as a
whole artifact is), so a failed or killed export never leaves a half-written `onnx/`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import onnx
import torch

from compressor.artifact import staging_beside
from compressor.errors import CompressorError
from compressor.transforms.sparse_tokens import (SparseTokenSettings, check_settings, decode_step, full_prefill,
                                                 sparse_prefill)
from exporters.onnx import DEFAULT_TOLERANCE, attention_op, token_filter
from exporters.onnx.files import DECODER_FILE, MANIFEST_FILE, ONNX_DIR, SPARSE_FILE, WEIGHTS_FILE
from exporters.onnx.graph_module import DecoderGraph, SparsePrefillGraph, kv_names
from exporters.onnx.loader import MATMUL_ACCURACY, OnnxDecoder
from exporters.onnx.quantized_graph import rewrite_quantized
from exporters.safetensors import read_model, read_quantized_weights

OPSET = 21
IR_VERSION = 10  # onnx 1.23 writes IR 14 by default, newer than ONNX Runtime 1.30 accepts


class ExportValidationError(CompressorError):
    """The exported graph's logits differ from the torch model's by more than the tolerance."""


def _dynamo_export(module, args, input_names, output_names, dynamic_shapes, translations=None,
                   optimize: bool = False) -> onnx.ModelProto:
    """torch.onnx.export(dynamo=True). Without `optimize`, weights stay the named initializers read
    through Transpose nodes (torch's optimizer would fold each transpose into a new, renamed
    initializer and store a tied embedding twice); ONNX Runtime folds them in memory at load."""
    # The exporter warns that torchvision's ops cannot be registered: this model has none.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(module, tuple(args), None, dynamo=True, optimize=optimize,
                                        opset_version=OPSET, input_names=input_names, output_names=output_names,
                                        dynamic_shapes=tuple(dynamic_shapes), verbose=False,
                                        custom_translation_table=translations or {})
        except Exception as exc:
            raise CompressorError(f"ONNX export failed in torch.onnx.export (dynamo): {_summary(exc)}") from exc
    proto = program.model_proto
    proto.ir_version = IR_VERSION
    for node in proto.graph.node:  # the exporter's per-node stack traces: most of the file otherwise
        del node.metadata_props[:]
        node.doc_string = ""
    return proto


def _summary(exc: Exception) -> str:
    """The informative line of a torch.onnx error (its 'Exception summary'), else its first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("## Exception summary") and i + 1 < len(lines):
            return lines[i + 1][:300]
    return lines[0][:300] if lines else type(exc).__name__


def decoder_proto(model, optimize: bool = False) -> onnx.ModelProto:
    config = model.config
    graph = DecoderGraph(model).eval()
    batch, seq, past, total, kept = (torch.export.Dim("batch"), torch.export.Dim("sequence"),
                                     torch.export.Dim("past_sequence"), torch.export.Dim("total_sequence"),
                                     torch.export.Dim("logits"))
    b, t, p = 2, 3, 4
    kv_shape = (b, config.num_key_value_heads, p, config.head_dim)
    names = kv_names(config)
    args = [torch.ones(b, t, dtype=torch.long), torch.ones(b, p + t, dtype=torch.long),
            torch.arange(p, p + t).expand(b, t).contiguous(), torch.arange(t)]
    args += [torch.zeros(kv_shape) for _ in names]
    shapes = [{0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, {0: kept}]
    shapes.append(tuple({0: batch, 2: past} for _ in names))  # the *past varargs
    proto = _dynamo_export(graph, args, ["input_ids", "attention_mask", "position_ids", "logits_index",
                                         *[n for n, _ in names]],
                           ["logits", *[n for _, n in names]], shapes, attention_op.translation_table(), optimize=optimize)
    attention_op.add_functions(proto, OPSET)
    return proto


def sparse_proto(model, settings) -> onnx.ModelProto:
    config = model.config
    graph = SparsePrefillGraph(model, settings).eval()
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", min=settings.keep_tokens + 1)
    n = settings.keep_tokens + 8
    args = [torch.ones(2, n, dtype=torch.long), torch.ones(2, n, dtype=torch.long)]
    groups = config.num_attention_heads // config.num_key_value_heads
    proto = _dynamo_export(graph, args, ["input_ids", "attention_mask"],
                           ["logits", "selected", "next_positions", *[n for _, n in kv_names(config)]],
                           [{0: batch, 1: seq}, {0: batch, 1: seq}], token_filter.translation_table(groups))
    token_filter.add_function(proto, OPSET)
    return proto


def _save_shared(protos: dict[str, onnx.ModelProto], folder: Path) -> None:
    """Saves the graphs with every initializer above 1 kB in one external-data file, written once:
    the first graph writes it, the others point at the same offsets for the same tensors."""
    first_name, first = next(iter(protos.items()))
    onnx.save_model(first, str(folder / first_name), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=WEIGHTS_FILE, size_threshold=1024)
    stored = {t.name: t for t in onnx.load(str(folder / first_name), load_external_data=False).graph.initializer
              if t.data_location == onnx.TensorProto.EXTERNAL}
    for name, proto in list(protos.items())[1:]:
        for tensor in proto.graph.initializer:
            twin = stored.get(tensor.name)
            if twin is None:
                continue
            if len(tensor.raw_data) != int({e.key: e.value for e in twin.external_data}["length"]):
                raise CompressorError(f"ONNX export: initializer {tensor.name} differs between graphs")
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            tensor.external_data.extend(twin.external_data)
        onnx.save_model(proto, str(folder / name))


def _probe_ids(config, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (1, length), generator=generator)


def validate(model, folder: Path, tolerance: float, name: str | Path) -> dict:
    """Runs the exported graphs in ONNX Runtime on probe inputs against the torch model; returns the
    largest logit differences, or raises ExportValidationError."""
    decoder = OnnxDecoder(folder, threads=None, matmul_accuracy="fp32")
    config = model.config
    ids = _probe_ids(config, 24)
    with torch.no_grad():
        reference = model(ids).logits[0]
    figures = {"prompt_logits": float((torch.from_numpy(decoder.logits(ids.numpy())[0]) - reference).abs().max())}
    state = full_prefill(model, ids)
    onnx_state = decoder.prefill(ids.numpy())
    token = torch.tensor([int(state.logits.argmax(-1))])
    with torch.no_grad():
        step = decode_step(model, token, state)[0]
    onnx_step = decoder.decode(token.numpy(), onnx_state)[0]
    figures["decode_logits"] = float((torch.from_numpy(onnx_step) - step).abs().max())
    if decoder.has_sparse_prefill:
        settings = SparseTokenSettings.from_dict(config.sparse_tokens)
        long_ids = _probe_ids(config, settings.keep_tokens + 64, seed=1)
        torch_state = sparse_prefill(model, long_ids, settings)
        sparse_state = decoder.prefill(long_ids.numpy(), sparse=True)
        figures["sparse_prefill_logits"] = float((torch.from_numpy(sparse_state.logits[0]) - torch_state.logits[0])
                                                 .abs().max())
        figures["sparse_selection_equal"] = bool(torch_state.selected[0].tolist() == sparse_state.selected[0].tolist())
    figures["tolerance"] = tolerance
    worst = max(v for k, v in figures.items() if k.endswith("_logits"))
    if worst > tolerance or figures.get("sparse_selection_equal") is False:
        what = (f"max |logit difference| {worst:.3g} > tolerance {tolerance:g}" if worst > tolerance
                else "the graph's sparse-token selection differs from the torch model's")
        raise ExportValidationError(f"ONNX export of {name} failed validation: {what} "
                                    f"({', '.join(f'{k} {v:.3g}' for k, v in figures.items() if k.endswith('_logits'))}); "
                                    "nothing was written")
    return figures


def int8_figures(model, folder: Path) -> dict:
    """The largest logit differences from the torch model with int8 activations (what a recorded
    `matmul_accuracy: int8` runs): reported, not checked against the tolerance, which holds for fp32."""
    decoder = OnnxDecoder(folder, threads=None, matmul_accuracy="int8")
    ids = _probe_ids(model.config, 24)
    with torch.no_grad():
        reference = model(ids).logits[0]
    return {"prompt_logits": float((torch.from_numpy(decoder.logits(ids.numpy())[0]) - reference).abs().max())}


def export_artifact(folder: str | Path, tolerance: float = DEFAULT_TOLERANCE, log=print,
                    name: str | Path | None = None, matmul_accuracy: str = "fp32") -> Path:
    """Writes `folder/onnx/` for an artifact folder (replacing an earlier export); returns its path.
    `name` is how messages call the artifact (compress exports into its staging folder); the caller
    holds the artifact's claim (compressor.artifact.staged_folder or updating_in_place).
    `matmul_accuracy` (recipe.OnnxExport) is recorded in the manifest as the compute the loader uses
    when its caller names none; the graphs are validated in fp32 either way."""
    if matmul_accuracy not in MATMUL_ACCURACY:
        raise CompressorError(f"ONNX export: matmul_accuracy {matmul_accuracy!r} is not one of "
                              f"{', '.join(MATMUL_ACCURACY)}")
    folder = Path(folder)
    name = name or folder
    model, _ = read_model(folder, with_tokenizer=False)
    model.restore_exact_weights()
    quantized = read_quantized_weights(folder, config=model.config)  # the codes, as stored
    config = model.config
    log(f"exporting {name} to ONNX (dynamo, opset {OPSET}): decoder graph with "
        f"{len(config.attention_layers())} KV-cache layers")
    protos = {DECODER_FILE: decoder_proto(model)}
    if getattr(config, "sparse_tokens", None):
        settings = SparseTokenSettings.from_dict(config.sparse_tokens, f"{folder / 'config.json'} sparse_tokens")
        check_settings(settings, config)
        log(f"exporting the sparse-token prefill graph ({settings.method} at layer {settings.filter_layer})")
        protos[SPARSE_FILE] = sparse_proto(model, settings)
    storage = {}
    for proto in protos.values():
        storage = rewrite_quantized(proto, quantized)
    target = folder / ONNX_DIR
    with staging_beside(target) as staging:
        _save_shared(protos, staging)
        log("validating the exported graphs in ONNX Runtime against the torch model")
        figures = validate(model, staging, tolerance, name)
        if matmul_accuracy == "int8":
            figures["int8"] = int8_figures(model, staging)
        manifest = {
            "graphs": {graph_file: {"inputs": [i.name for i in p.graph.input], "outputs": [o.name for o in p.graph.output]}
                       for graph_file, p in protos.items()},
            "weights_file": WEIGHTS_FILE, "opset": OPSET, "ir_version": IR_VERSION,
            "quantized_weights": storage, "validation": figures, "matmul_accuracy": matmul_accuracy,
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": _ort_version()},
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    int8 = (f"; recorded compute int8, prompt logits within {figures['int8']['prompt_logits']:.2e}"
            if "int8" in figures else "")
    log(f"ONNX export written: {Path(name) / ONNX_DIR} (max |logit difference| vs torch "
        f"{max(v for k, v in figures.items() if k.endswith('_logits')):.2e} in fp32{int8})")
    return target


def _ort_version() -> str:
    import onnxruntime  # optional: imported where it is used, as in the loader

    return onnxruntime.__version__
