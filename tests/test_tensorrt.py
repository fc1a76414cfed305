"""TensorRT engines from the artifact's ONNX export (exporters.tensorrt).

- Every preparation rewrite leaves ONNX Runtime's outputs within 1e-4 of the exported graph (both
  run with graph optimizations off, so each DequantizeLinear -> MatMul is computed as written; the
  rewrites are exact and measure 0 here), on tiny artifacts of each kind: original, removal-only,
  mixed 2/4/8-bit, 2/3-bit, sparse-token (both graphs, padded and unpadded prompts), shared weights.
  An 8-bit artifact's linears become int4 pairs (8 bits a weight), not float.
- float16 products (the engines' default precision): every MatMul takes 16-bit inputs and the KV
  cache is 16-bit; ONNX Runtime's logits stay within 5e-3 of the float32 graph (logits of about
  +-2.5 here) and the filter selects the same tokens. bfloat16 graphs only build (ONNX Runtime's CPU
  cannot run them).
- What TensorRT cannot take is refused with the reason: signed (negative) scales, zero points,
  4-bit blocks other than 64 / 128; `quantize.scales: positive` gives positive scales.
- Where TensorRT for RTX is installed: engines build from each kind (`compress export tensorrt` and
  `export: [tensorrt]`), the manifest's SHA-256 match the engines, and polygraphy reports every node
  of each prepared graph supported. Where it is not, those tests skip and say so.
- `backend="tensorrt"` without engines, or without a CUDA GPU, is one clear error. No engine is run
  here: that needs a CUDA GPU with a TensorRT runtime.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.cli import main
from compressor.pipeline import compress
from compressor.transforms.quantize import QuantFormat, rtn_quantize

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from exporters.tensorrt.build import MANIFEST, sha256  # noqa: E402 (needs nothing optional)
from exporters.tensorrt.export import prepared_graph  # noqa: E402
from exporters.tensorrt.precision import sixteen_bit_products  # noqa: E402
from exporters.tensorrt.prepare import PreparationError, prepare  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
NO_RTX = "TensorRT for RTX is not installed (pip install 'compressor[tensorrt-rtx]')"
POSITIVE = {"group_size": 64, "scales": "positive"}
KINDS = {
    "original": {},
    "removal": {"remove": {"method": "similarity", "attention": 1, "mlp": 1}},
    "mixed": {"remove": {"method": "similarity", "attention": 1},
              "quantize": dict(POSITIVE, method="gptq", bits=[2, 4, 8], budget={"avg_bits": 4.0}, allocate="lim",
                               embeddings=8)},
    "low-bit": {"quantize": dict(POSITIVE, method="rtn", bits=[2, 3], budget={"avg_bits": 2.6}, allocate="lim",
                                 embeddings="keep")},
    "8-bit": {"quantize": dict(POSITIVE, method="rtn", bits=[4, 8], budget={"avg_bits": 6.6}, allocate="lim",
                               embeddings="keep")},
    "sparse": {"remove": {"method": "similarity", "attention": 1, "protect": {"first": 0, "last": 0}},
               "sparse_tokens": {"method": "promptdistill", "filter_layer": 1, "keep_tokens": 96, "keep_last": 8},
               "quantize": dict(POSITIVE, method="rtn", bits=[4], budget={"avg_bits": 4.6}, embeddings="keep")},
    "shared": {"share": {"projections": ["q_proj", "k_proj"], "reduction": 0.2, "group_size": 2, "rank_multiple": 8}},
    "signed": {"quantize": {"method": "rtn", "bits": [4], "group_size": 64, "budget": {"avg_bits": 4.6}}},
    "asymmetric": {"quantize": dict(POSITIVE, method="rtn", bits=[4], symmetric=False, budget={"avg_bits": 4.6})},
    "group-32": {"quantize": {"method": "rtn", "bits": [4], "group_size": 32, "scales": "positive",
                              "budget": {"avg_bits": 4.6}}},
}
REFUSED = {"signed": r"scales are negative .* quantize with scales: positive",
           "asymmetric": r"non-zero zero points .* symmetric: true",
           "group-32": r"4-bit block size 32; TensorRT's INT4 block quantization takes 64 or 128"}
EVALUATE = {"windows": 1, "seq_len": 32, "compare_original": False,
            "speed": {"prompt_tokens": 8, "new_tokens": 2, "repeats": 1}}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_model_folder):
    root = tmp_path_factory.mktemp("tensorrt")
    built = {}

    def get(kind: str) -> Path:
        if kind not in built:
            recipe = root / f"{kind}.yaml"
            recipe.write_text(json.dumps(dict({"name": kind, "calibration": {"samples": 4, "seq_len": 32},
                                               "evaluate": EVALUATE, "export": ["safetensors", "onnx"]}, **KINDS[kind])))
            built[kind] = compress(recipe, str(tiny_model_folder["llama"]), root / kind, quiet=True, log=lambda m: None)
        return built[kind]

    return get


def feeds(session, batch: int = 2, new: int = 5, past: int = 3, prompt: int = 120, padded: bool = False) -> dict:
    """Inputs for either graph: the decoder (new tokens after `past` cached ones) or the sparse prefill."""
    rng = np.random.default_rng(0)
    names = {i.name for i in session.get_inputs()}
    if "past_key_values.0.key" not in names and "position_ids" not in names:  # the sparse prefill graph
        mask = np.ones((batch, prompt), np.int64)
        if padded:
            mask[0, :17] = 0
        return {"input_ids": rng.integers(1, 500, (batch, prompt)).astype(np.int64), "attention_mask": mask}
    out = {}
    for item in session.get_inputs():
        if item.name == "input_ids":
            out[item.name] = rng.integers(1, 500, (batch, new)).astype(np.int64)
        elif item.name == "attention_mask":
            out[item.name] = np.ones((batch, past + new), np.int64)
        elif item.name == "position_ids":
            out[item.name] = np.tile(np.arange(past, past + new), (batch, 1)).astype(np.int64)
        elif item.name == "logits_index":
            out[item.name] = np.arange(new).astype(np.int64)
        else:
            shape = [batch if d == "batch" else past if isinstance(d, str) else d for d in item.shape]
            out[item.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def outputs(model, **kwargs) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds(session, **kwargs))


def graphs(folder: Path) -> list[Path]:
    return sorted((folder / "onnx").glob("*.onnx"))


@pytest.mark.parametrize("kind", ["original", "removal", "mixed", "8-bit", "low-bit", "sparse", "shared"])
def test_preparation_leaves_onnx_runtime_outputs_equal(artifact, kind):
    folder = artifact(kind)
    for graph in graphs(folder):
        exported = onnx.load(str(graph))
        prepared = copy.deepcopy(exported)
        record = prepare(prepared)
        assert record["folded_constants"] > 0
        if kind in ("mixed", "low-bit"):
            assert record["two_bit_into_int4"] > 0 and record["quantized"]["int4_block"] > 0
        if kind == "8-bit":  # 8-bit linears stay 8-bit: int4 pairs, no float copies
            assert record["int8_blocks_as_int4_pairs"] > 0 and record["int8_blocks_to_float"] == 0
            assert not any(t.data_type == onnx.TensorProto.INT8 for t in prepared.graph.initializer)
        cases = [{}, {"padded": True}] if graph.name == "prefill_sparse.onnx" else [{}, {"past": 0, "new": 7}]
        for case in cases:
            before, after = outputs(exported, **case), outputs(prepared, **case)
            assert len(before) == len(after)
            for x, y in zip(before, after):
                assert x.shape == y.shape
                difference = float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max()) if x.size else 0.0
                assert difference <= 1e-4, (graph.name, case, difference)


HALF_TOLERANCE = 5e-3  # float16 products against the float32 graph: the logits' largest difference


def _sixteen_bit_inputs_only(model) -> bool:
    """Whether every MatMul reads 16-bit tensors: a Cast to float16, a float16 initializer, a
    DequantizeLinear with float16 scales, or another product (or a Transpose of one of those)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    halves = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}

    def sixteen(name: str) -> bool:
        node = producers.get(name)
        if name in halves:
            return True
        if node is None:
            return False
        if node.op_type == "Cast":
            return node.attribute[0].i == onnx.TensorProto.FLOAT16
        if node.op_type == "DequantizeLinear":
            return node.input[1] in halves
        return node.op_type in ("MatMul", "Transpose") and all(sixteen(i) for i in node.input[:1])

    return all(sixteen(n.input[0]) and sixteen(n.input[1]) for n in model.graph.node if n.op_type == "MatMul")


@pytest.mark.parametrize("kind", ["mixed", "8-bit", "sparse"])
def test_float16_products_stay_within_their_tolerance(artifact, kind):
    folder = artifact(kind)
    for graph in graphs(folder):
        full = onnx.load(str(graph))
        prepare(full)
        half = copy.deepcopy(full)
        record = sixteen_bit_products(half, "float16")
        assert record["matmuls"] > 0 and _sixteen_bit_inputs_only(half)
        cache = [v for v in half.graph.input if v.name.startswith("past_key_values.")] + \
                [v for v in half.graph.output if v.name.startswith("present.")]
        assert cache and all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for v in cache)
        assert record["cache_tensors"] == len(cache)
        for case in ([{}, {"padded": True}] if graph.name == "prefill_sparse.onnx" else [{}, {"past": 0, "new": 7}]):
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            sessions = [ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
                        for m in (full, half)]
            given = feeds(sessions[0], **case)
            types = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(int64)": np.int64}
            before = sessions[0].run(None, given)
            after = sessions[1].run(None, {i.name: given[i.name].astype(types[i.type]) for i in sessions[1].get_inputs()})
            names = [o.name for o in sessions[0].get_outputs()]
            logits = float(np.abs(before[0] - after[0].astype(np.float32)).max())
            assert logits <= HALF_TOLERANCE, (graph.name, case, logits)
            if "selected" in names:  # the filter's choice: float32 scores of 16-bit products' queries and keys
                k = names.index("selected")
                assert np.array_equal(before[k], after[k]), (graph.name, case)


def test_a_tied_table_is_held_once_in_sixteen_bits():
    """Gather(table) and MatMul(x, Transpose(table)) (a tied head): one float16 table for both."""
    from onnx import helper

    rng = np.random.default_rng(0)
    table = rng.standard_normal((40, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
         helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0]),
         helper.make_node("MatMul", ["rows", "table_t"], ["logits"])], "tied",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [3, 40])],
        [onnx.numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    half = copy.deepcopy(model)
    sixteen_bit_products(half, "float16")
    assert [(t.name, t.data_type) for t in half.graph.initializer] == [("table_float16", onnx.TensorProto.FLOAT16)]
    ids = np.array([0, 7, 39], np.int64)
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
           for m in (model, half)]
    assert float(np.abs(run[0] - run[1]).max()) <= 2e-2  # |logit| up to about 10: float16 rounding


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_what_tensorrt_cannot_take_is_refused_with_the_reason(artifact, kind):
    with pytest.raises(PreparationError, match=REFUSED[kind]):
        prepare(onnx.load(str(artifact(kind) / "onnx" / "model.onnx")))


def test_positive_scales_are_positive_and_clip_nothing():
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    signed = rtn_quantize(weight, QuantFormat(4, 64))
    positive = rtn_quantize(weight, QuantFormat(4, 64, positive_scales=True))
    assert (signed.scale < 0).any() and (positive.scale > 0).all()
    step = positive.scale.float().repeat_interleave(64, dim=1)
    assert float(((positive.dequantize() - weight).abs() / step).max()) <= 0.5 + 1e-3
    assert int(positive.codes.min()) >= -8 and int(positive.codes.max()) <= 7


@pytest.mark.skipif(not HAS_RTX, reason=NO_RTX)
@pytest.mark.parametrize("kind", ["original", "removal", "mixed", "8-bit", "low-bit", "sparse", "shared"])
def test_engines_build_with_tensorrt_rtx(artifact, kind, capsys):
    folder = artifact(kind)
    assert main(["export", "tensorrt", str(folder), "--sequence", "1,16,256", "--past", "0,16,256", "--quiet"]) == 0
    manifest = json.loads((folder / "tensorrt" / MANIFEST).read_text())
    expected = {f"{graph.stem}.engine" for graph in graphs(folder)}
    assert set(manifest["engines"]) == expected and manifest["library"] == "tensorrt_rtx"
    for engine, info in manifest["engines"].items():
        assert info["sha256"] == sha256(folder / "tensorrt" / engine) and info["bytes"] > 0
    assert (folder / "tensorrt" / manifest["timing_cache"]).stat().st_size > 0
    assert manifest["profiles"]["sequence"] == [1, 16, 256]
    assert (manifest["token_selection"] is not None) == (kind == "sparse")
    print(kind, {engine: (info["bytes"], round(info["build_seconds"], 1)) for engine, info in manifest["engines"].items()})


@pytest.mark.skipif(not HAS_RTX, reason=NO_RTX)
@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
def test_engines_build_in_the_other_precisions(artifact, precision):
    folder = artifact("mixed")
    assert main(["export", "tensorrt", str(folder), "--precision", precision, "--sequence", "1,16,256",
                 "--past", "0,16,256", "--quiet"]) == 0
    manifest = json.loads((folder / "tensorrt" / MANIFEST).read_text())
    assert manifest["precision"] == precision
    record = manifest["engines"]["model.engine"]["preparation"]["activations"]
    assert record["precision"] == precision and (record["matmuls"] > 0) == (precision != "float32")


@pytest.mark.skipif(not HAS_RTX or importlib.util.find_spec("polygraphy") is None, reason=NO_RTX + " or polygraphy")
@pytest.mark.parametrize("kind, precision", [("mixed", "float16"), ("mixed", "float32"), ("sparse", "float16")])
def test_polygraphy_reports_every_node_supported(artifact, kind, precision, tmp_path):
    for graph in graphs(artifact(kind)):
        target = tmp_path / graph.name
        prepared_graph(graph, target, precision=precision)
        done = subprocess.run([str(Path(sys.executable).parent / "polygraphy"), "inspect", "capability", str(target)],
                              capture_output=True, text=True, env=dict(os.environ, POLYGRAPHY_USE_TENSORRT_RTX="1"))
        assert done.returncode == 0, done.stderr[-2000:]
        assert "Graph is fully supported by TensorRT" in done.stdout + done.stderr


@pytest.mark.skipif(not HAS_RTX, reason=NO_RTX)
def test_recipe_export_tensorrt_writes_engines_and_bad_input_is_one_line(tmp_path, tiny_model_folder, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "r", "calibration": {"samples": 2, "seq_len": 32}, "evaluate": EVALUATE,
                                  "export": ["tensorrt"], "tensorrt": {"sequence": [1, 8, 64], "past": [0, 8, 64]},
                                  "quantize": dict(POSITIVE, method="rtn", bits=[4], budget={"avg_bits": 4.6})}))
    out = compress(recipe, str(tiny_model_folder["llama"]), tmp_path / "out", quiet=True, log=lambda m: None)
    assert (out / "onnx" / "model.onnx").is_file() and (out / "tensorrt" / "model.engine").is_file()
    assert main(["verify", str(out)]) == 0
    capsys.readouterr()
    assert main(["export", "tensorrt", str(out), "--batch", "2,1,4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tensorrt.batch: must be [min, opt, max]" in err[0]
    signed = tmp_path / "signed.yaml"  # refused before any work, not after the compression
    signed.write_text(recipe.read_text().replace('"scales": "positive", ', ""))
    assert main(["--recipe", str(signed), "--model", str(tiny_model_folder["llama"]), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "export: tensorrt cannot take quantize.scales: signed" in err[0]
    assert not (tmp_path / "s").exists()


def test_tensorrt_backend_without_engines_or_gpu_is_one_clear_error(artifact):
    import compressor
    from compressor.errors import CompressorError

    folder = artifact("original")
    if not (folder / "tensorrt").is_dir():
        with pytest.raises(CompressorError, match=r"no TensorRT engines .*`compress export tensorrt "):
            compressor.load(folder, backend="tensorrt", verify=False)
    if not HAS_RTX:
        pytest.skip(NO_RTX + ": no engines to load")
    if not (folder / "tensorrt").is_dir():
        assert main(["export", "tensorrt", str(folder), "--sequence", "1,16,256", "--past", "0,16,256", "--quiet"]) == 0
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: running the engines is not covered by this CPU test")
    with pytest.raises(CompressorError, match=r"backend 'tensorrt' needs a CUDA GPU"):
        compressor.load(folder, backend="tensorrt", verify=False)
