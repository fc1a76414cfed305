"""ONNX export and the onnxruntime backend on tiny random models: parity with torch, graph contents
(KV only for attention layers, codes as written, shared weights once), the sparse-token node, export
validation, and the bad cases (no export, corrupted graph, missing or truncated external data)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import compressor
from compressor.cli import main as cli_main
from compressor.errors import CompressorError
from compressor.pipeline import compress
from compressor.recipe import parse_recipe
from exporters.onnx.export import (DECODER_FILE, SPARSE_FILE, WEIGHTS_FILE, ExportValidationError, export_artifact)
from exporters.onnx.loader import CPU, CUDA, OnnxDecoder, choose_providers, session_options

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EVALUATE = {"text": "embedded", "windows": 1, "seq_len": 64, "compare_original": False,
            "speed": {"prompt_tokens": 16, "new_tokens": 2, "repeats": 1}}
BASE = {"calibration": {"samples": 4, "seq_len": 64}, "evaluate": EVALUATE, "export": ["safetensors", "onnx"]}
REMOVE = {"method": "similarity", "attention": 2, "mlp": 1, "protect": {"first": 0, "last": 0}}
PLANS = {
    "original": ("llama", {}),
    "removal": ("llama", {"remove": REMOVE}),
    "mixed": ("llama", {"remove": dict(REMOVE, mlp=0, attention=1),
                        "quantize": {"method": "gptq", "bits": [2, 3, 4, 8], "group_size": 32,
                                     "budget": {"avg_bits": 4.5}, "embeddings": 8}}),
    "asymmetric": ("llama", {"quantize": {"method": "rtn", "bits": [2, 4], "group_size": 32, "symmetric": False,
                                          "budget": {"avg_bits": 3.6}, "embeddings": 4}}),
    "sparse": ("llama", {"remove": dict(REMOVE, mlp=0),
                         "quantize": {"method": "rtn", "bits": [4], "group_size": 32, "budget": {"avg_bits": 4.6}},
                         "sparse_tokens": {"method": "promptdistill", "keep_tokens": 96, "keep_last": 8,
                                           "filter_layer": 3}}),
    "gemfilter": ("llama", {"sparse_tokens": {"method": "gemfilter", "keep_tokens": 96, "keep_last": 8,
                                              "filter_layer": 2}}),
    "shared": ("llama", {"share": {"projections": ["q_proj", "k_proj", "v_proj", "o_proj"], "reduction": 0.2,
                                   "group_size": 3, "rank_multiple": 8},
                         "quantize": {"method": "rtn", "bits": [4, 8], "group_size": 32, "budget": {"avg_bits": 6.0}}}),
    # 5- and 6-bit codes (int8 containers), the embedding at 6 bits.
    "wide": ("llama", {"quantize": {"method": "rtn", "bits": [5, 6], "group_size": 32, "allocate": "uniform",
                                    "budget": {"avg_bits": 6.0}, "embeddings": 6}}),
    "qwen2": ("qwen2", {"remove": dict(REMOVE, mlp=0)}),  # q/k/v bias, untied head
    "qwen3": ("qwen3", {}),  # q/k norms
    "mistral": ("mistral", {}),  # sliding window
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_model_folder):
    root = tmp_path_factory.mktemp("onnx")
    built = {}

    def get(name: str) -> Path:
        if name not in built:
            family, sections = PLANS[name]
            recipe = parse_recipe(dict(BASE, name=name, **sections))
            built[name] = compress(recipe, str(tiny_model_folder[family]), root / name, quiet=True,
                                   log=lambda m: None)
        return built[name]

    return get


def prompts(tokenizer, count=5, tokens=40):
    text = compressor.data.embedded_text()
    ids = tokenizer(text[:60_000], add_special_tokens=False)["input_ids"]
    step = len(ids) // (count + 1)
    return [torch.tensor([ids[i * step: i * step + tokens]]) for i in range(count)]


@pytest.mark.parametrize("name", list(PLANS))
def test_onnx_matches_torch_logits_and_greedy_generations(artifacts, tokenizer, name):
    folder = artifacts(name)
    torch_art = compressor.load(folder)
    onnx_art = compressor.load(folder, backend="onnxruntime", threads=1)
    assert onnx_art.backend == "onnxruntime" and onnx_art.model is None
    long = name in ("sparse", "gemfilter")
    for ids in prompts(tokenizer, 5, 160 if long else 40):
        if not long:
            with torch.no_grad():
                reference = torch_art.model(ids).logits
            assert (torch.from_numpy(onnx_art.onnx.logits(ids.numpy())) - reference).abs().max() < 1e-4
        assert onnx_art.generate_ids(ids, 64, stop_token_ids=[]) == torch_art.generate_ids(ids, 64, stop_token_ids=[])
    validation = json.loads((folder / "onnx" / "export.json").read_text())["validation"]
    assert max(v for k, v in validation.items() if k.endswith("_logits")) < 1e-4


@pytest.mark.parametrize("name", ["sparse", "gemfilter"])
def test_sparse_prefill_graph_selects_exactly_like_torch(artifacts, tokenizer, name):
    from compressor.transforms.sparse_tokens import SparseTokenSettings, sparse_prefill

    folder = artifacts(name)
    torch_art = compressor.load(folder)
    decoder = OnnxDecoder(folder / "onnx", threads=1)
    settings = SparseTokenSettings.from_dict(torch_art.config.sparse_tokens)
    for ids in prompts(tokenizer, 5, 200):
        reference = sparse_prefill(torch_art.model, ids, settings)
        state = decoder.prefill(ids.numpy(), sparse=True)
        assert state.selected[0].tolist() == reference.selected[0].tolist()
        assert len(state.selected[0]) == settings.keep_tokens
        assert (torch.from_numpy(state.logits) - reference.logits).abs().max() < 1e-4
        # Decoding goes on from the kept tokens' cache with the original positions.
        token = torch_art.generate_ids(ids, 6, stop_token_ids=[])
        assert compressor.load(folder, backend="onnxruntime").generate_ids(ids, 6, stop_token_ids=[]) == token
    art = compressor.load(folder, backend="onnxruntime")
    text = tokenizer.decode(prompts(tokenizer, 1, 200)[0][0])
    assert art.select(text) == torch_art.select(text)


def test_padded_batch_matches_torch(artifacts, tokenizer):
    folder = artifacts("mixed")
    model = compressor.load(folder).model
    decoder = OnnxDecoder(folder / "onnx", threads=1)
    a, b = prompts(tokenizer, 2, 30)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 10, dtype=torch.long), b[:, :20]], 1)])
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
    got = torch.from_numpy(decoder.logits(ids.numpy(), mask.numpy()))
    assert (got[0] - reference[0]).abs().max() < 1e-4
    assert (got[1, 10:] - reference[1, 10:]).abs().max() < 1e-4


def test_sampling_scoring_and_stop_tokens_match_torch(artifacts, tokenizer):
    folder = artifacts("mixed")
    torch_art, onnx_art = compressor.load(folder), compressor.load(folder, backend="onnxruntime")
    text = tokenizer.decode(prompts(tokenizer, 1, 40)[0][0])
    for seed in (0, 1):
        kwargs = dict(max_new_tokens=24, do_sample=True, temperature=0.8, top_k=20, seed=seed)
        assert onnx_art.generate(text, **kwargs) == torch_art.generate(text, **kwargs)
    greedy = torch_art.generate_ids(prompts(tokenizer, 1, 40)[0], 10, stop_token_ids=[])
    stop = greedy[3]
    cut = onnx_art.generate_ids(prompts(tokenizer, 1, 40)[0], 10, stop_token_ids=[stop])
    assert cut == greedy[:greedy.index(stop)]
    a, b = torch_art.score(text), onnx_art.score(text)
    assert a["tokens"] == b["tokens"] and math.isclose(a["nll"], b["nll"], rel_tol=1e-5)


def _graph(folder: Path, name: str = DECODER_FILE) -> onnx.ModelProto:
    return onnx.load(str(folder / "onnx" / name), load_external_data=False)


def test_graph_has_kv_only_for_attention_layers_and_no_tensors_for_removed_units(artifacts):
    folder = artifacts("removal")
    config = compressor.load(folder).config
    proto = _graph(folder)
    inputs = [i.name for i in proto.graph.input]
    kept = config.attention_layers()
    assert len(kept) == config.num_hidden_layers - 2
    assert inputs == ["input_ids", "attention_mask", "position_ids", "logits_index",
                      *[f"past_key_values.{layer}.{kind}" for layer in kept for kind in ("key", "value")]]
    assert [o.name for o in proto.graph.output][1:] == [f"present.{layer}.{kind}" for layer in kept
                                                       for kind in ("key", "value")]
    names = {t.name for t in proto.graph.initializer}
    removed = json.loads((folder / "plan.json").read_text())["removal"]["removed"]
    for unit in removed:
        prefix = f"model.layers.{unit['layer']}.{'self_attn' if unit['unit'] == 'attention' else 'mlp'}."
        assert not any(n.startswith(prefix) for n in names)
    # Weight names are the artifact's; the tied embedding is one initializer.
    assert "model.layers.0.mlp.down_proj.weight" in names or 0 in [u["layer"] for u in removed]
    assert [n for n in names if "embed_tokens" in n] == ["model.embed_tokens.weight"]
    assert proto.ir_version == 10 and {o.domain or "": o.version for o in proto.opset_import}[""] == 21
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert isinstance(dims["input_ids"][0], str) and isinstance(dims["input_ids"][1], str)


def test_quantized_weights_are_the_artifact_codes_and_fuse_into_matmulnbits(artifacts, tmp_path):
    import onnxruntime as ort
    from onnx import numpy_helper

    from exporters.safetensors import read_quantized_weights

    folder = artifacts("mixed")
    quantized = read_quantized_weights(folder)
    proto = onnx.load(str(folder / "onnx" / DECODER_FILE))
    tensors = {t.name: t for t in proto.graph.initializer}
    bits = {w.fmt.bits for w in quantized.values()}
    assert bits == {2, 3, 4, 8}
    for name, weight in quantized.items():
        assert f"{name}.weight" not in tensors
        if weight.fmt.bits == 2:
            assert tensors[f"{name}.weight_packed"].data_type == onnx.TensorProto.UINT8
            continue
        codes = tensors[f"{name}.weight_codes"]
        gathered = name == "model.embed_tokens"
        expected = onnx.TensorProto.INT8 if weight.fmt.bits == 8 or gathered else onnx.TensorProto.INT4
        assert codes.data_type == expected
        values = numpy_helper.to_array(codes).astype(np.int8)
        assert np.array_equal(values, weight.codes.numpy())  # the codes as written, not re-quantized
        assert np.array_equal(numpy_helper.to_array(tensors[f"{name}.weight_scale"]), weight.scale.float().numpy())
        if expected == onnx.TensorProto.INT4:
            assert len(codes.raw_data) == math.ceil(weight.codes.numel() / 2)
    # The embedding is gathered from its codes, and the tied head reads the same initializer.
    readers = [n.op_type for n in proto.graph.node if "model.embed_tokens.weight_codes" in n.input]
    assert sorted(readers) == ["Gather", "Transpose"]
    assert any(n.op_type == "MatMulNBits" and n.domain == "com.microsoft" and
               {a.name: a.i for a in n.attribute}["bits"] == 2 for n in proto.graph.node)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(folder / "onnx" / DECODER_FILE), options, providers=[CPU])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    fused = [n for n in optimized.graph.node if n.op_type == "MatMulNBits"]
    assert len(fused) == len(quantized)  # every quantized linear and the tied head
    producers = {o: n.op_type for n in optimized.graph.node for o in n.output}
    assert not any(n.op_type == "MatMul" and producers.get(n.input[1]) == "DequantizeLinear"
                   for n in optimized.graph.node)


def test_five_and_six_bit_codes_ride_in_int8_containers(artifacts):
    from onnx import numpy_helper

    from exporters.safetensors import read_quantized_weights

    folder = artifacts("wide")
    quantized = read_quantized_weights(folder)
    assert {w.fmt.bits for w in quantized.values()} == {5, 6}
    assert quantized["model.embed_tokens"].fmt.bits == 6
    tensors = {t.name: t for t in onnx.load(str(folder / "onnx" / DECODER_FILE)).graph.initializer}
    for name, weight in quantized.items():
        codes = tensors[f"{name}.weight_codes"]
        assert codes.data_type == onnx.TensorProto.INT8
        assert np.array_equal(numpy_helper.to_array(codes), weight.codes.numpy())
        low, high = -(1 << (weight.fmt.bits - 1)), (1 << (weight.fmt.bits - 1)) - 1
        assert int(weight.codes.min()) >= low and int(weight.codes.max()) <= high


def test_exact_weights_are_restored_by_a_sparse_correction(tmp_path):
    """A super weight kept exactly beside its 4-bit matrix: the graph adds x[col] * delta to y[row]."""
    import onnxruntime as ort
    from onnx import helper

    from compressor.transforms.quantize import QuantFormat, rtn_quantize
    from exporters.onnx.quantized_graph import rewrite_quantized

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 24, bias=False)
    with torch.no_grad():
        linear.weight[5, 17] = 9.0
    keep = torch.zeros(24, 64, dtype=torch.bool)
    keep[5, 17] = True
    quantized = rtn_quantize(linear.weight.data, QuantFormat(4, 32), keep_exact=keep)
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 64])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 24])
    graph = helper.make_graph([helper.make_node("Transpose", ["lin.weight"], ["w_t"], perm=[1, 0]),
                               helper.make_node("MatMul", ["x", "w_t"], ["y"])], "g", [x], [y],
                              [onnx.numpy_helper.from_array(linear.weight.detach().numpy(), "lin.weight")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    storage = rewrite_quantized(proto, {"lin": quantized})
    assert storage["lin"].endswith("1 exact")
    session = ort.InferenceSession(proto.SerializeToString(), session_options(), providers=[CPU])
    inputs = torch.randn(3, 64)
    got = torch.from_numpy(session.run(None, {"x": inputs.numpy()})[0])
    expected = inputs @ quantized.dequantize().T
    assert quantized.dequantize()[5, 17] == 9.0
    assert (got - expected).abs().max() < 1e-4


@pytest.mark.parametrize("bits, symmetric", [(4, True), (8, True), (4, False)])
def test_one_scale_per_row_over_a_width_of_576_fuses_into_matmulnbits_with_the_same_values(tmp_path, bits, symmetric):
    """Per-channel weights are written in blocks of 64 repeating each row's scale: ONNX Runtime fuses
    a block of 576 (not a power of two) into nothing and would dequantize the matrix every step."""
    import onnxruntime as ort
    from onnx import helper

    from compressor.transforms.quantize import QuantFormat, rtn_quantize
    from exporters.onnx.quantized_graph import rewrite_quantized

    torch.manual_seed(0)
    weight = torch.randn(40, 576)
    quantized = rtn_quantize(weight, QuantFormat(bits, None, symmetric))
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 576])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 40])
    graph = helper.make_graph([helper.make_node("Transpose", ["lin.weight"], ["w_t"], perm=[1, 0]),
                               helper.make_node("MatMul", ["x", "w_t"], ["y"])], "g", [x], [y],
                              [onnx.numpy_helper.from_array(weight.numpy(), "lin.weight")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    storage = rewrite_quantized(proto, {"lin": quantized})
    assert "block 64" in storage["lin"]
    options = session_options()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=[CPU])
    assert [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node] == ["MatMulNBits"]
    inputs = torch.randn(3, 576)
    got = torch.from_numpy(session.run(None, {"x": inputs.numpy()})[0])
    expected = inputs @ quantized.dequantize().T
    assert (got - expected).abs().max() < 1e-3 * expected.abs().max()


def test_a_shared_basis_is_one_initializer(artifacts):
    folder = artifacts("shared")
    config = compressor.load(folder).config
    proto = _graph(folder)
    names = [t.name for t in proto.graph.initializer]
    for group in config.weight_sharing:
        if group["rank"]:
            stored = [n for n in names if n.startswith(f"model.shared_bases.{group['basis']}.")]
            assert len(stored) in (2, 1) and len(set(stored)) == len(stored)  # codes + scale, or a float matrix
            readers = [n for n in proto.graph.node if any(i in stored for i in n.input)]
            assert len(readers) >= len(group["layers"])  # every layer of the group reads the same tensor


def test_sparse_node_is_one_custom_domain_node_with_a_standard_op_body(artifacts):
    folder = artifacts("sparse")
    proto = _graph(folder, SPARSE_FILE)
    nodes = [n for n in proto.graph.node if n.domain == "compressor"]
    assert [n.op_type for n in nodes] == ["SelectTokens"]
    attributes = {a.name: a.i for a in nodes[0].attribute}
    assert attributes == {"keep_tokens": 96, "keep_first": 1, "keep_last": 8, "pool_width": 5, "kv_groups": 2}
    (function,) = [f for f in proto.functions if f.domain == "compressor"]
    ops = {n.op_type for n in function.node}
    assert {"TopK", "Softmax", "MatMul", "Conv", "CumSum"} <= ops and all(n.domain == "" for n in function.node)
    # Both graphs read one external-data file: weights are stored once.
    locations = {e.value for g in (proto, _graph(folder)) for t in g.graph.initializer for e in t.external_data
                 if e.key == "location"}
    assert locations == {WEIGHTS_FILE}
    assert sorted(p.name for p in (folder / "onnx").iterdir()) == sorted([DECODER_FILE, "export.json", SPARSE_FILE,
                                                                          WEIGHTS_FILE])


@pytest.mark.parametrize("name", ["mixed", "mistral", "qwen3"])
def test_cached_attention_node_runs_as_the_fused_kernel_with_the_same_logits(artifacts, tokenizer, name, monkeypatch):
    from exporters.onnx import loader
    from exporters.onnx.loader import _cpu_graph

    monkeypatch.setattr(loader, "CACHE_HEADROOM", 2)  # the in-place cache grows during the steps below

    folder = artifacts(name)
    proto = _graph(folder)
    nodes = [n.op_type for n in proto.graph.node if n.domain == "compressor"]
    layers = compressor.load(folder).config.attention_layers()
    assert nodes == ["Rotary", "Rotary", "CachedAttention"] * len(layers)
    bodies = {f.name: f for f in proto.functions if f.domain == "compressor"}
    assert {"Softmax", "MatMul", "Concat"} <= {n.op_type for n in bodies["CachedAttention"].node}
    assert {"Split", "Mul", "Sub", "Concat"} <= {n.op_type for n in bodies["Rotary"].node}
    assert all(n.domain == "" for f in bodies.values() for n in f.node)
    rewritten, external, fused = _cpu_graph(folder / "onnx" / DECODER_FILE, proto, False, True)
    graph = onnx.load_from_string(rewritten)
    assert external and fused and not graph.functions
    contrib = [n.op_type for n in graph.graph.node if n.domain == "com.microsoft"]
    assert (contrib.count("GroupQueryAttention"), contrib.count("RotaryEmbedding")) == (len(layers), 2 * len(layers))
    # A left-padded batch, prefill then decoding steps: the fused kernel and the inlined body agree.
    decoders = [OnnxDecoder(folder / "onnx", threads=1, fused_attention=f) for f in (True, False)]
    a, b = prompts(tokenizer, 2, 30)
    ids = np.concatenate([a.numpy(), np.concatenate([np.zeros((1, 10), np.int64), b[:, :20].numpy()], 1)])
    mask = np.ones_like(ids)
    mask[1, :10] = 0
    states = [d.prefill(ids, mask) for d in decoders]
    assert np.abs(states[0].logits - states[1].logits).max() < 1e-4
    capacities = set()
    for _ in range(6):
        tokens = states[1].logits.argmax(-1)
        steps = [d.decode(tokens, state) for d, state in zip(decoders, states)]
        assert np.abs(steps[0] - steps[1]).max() < 1e-4
        assert [c.shape for c in states[0].cache] == [c.shape for c in states[1].cache]
        assert max(np.abs(x - y).max() for x, y in zip(states[0].cache, states[1].cache)) < 1e-4
        capacities.add(states[0].buffers.arrays[0].shape[2])
    # The fused decoder wrote its cache in place, into buffers that grew by doubling: 31 + 2, then 66.
    assert decoders[0].in_place_cache and not decoders[1].in_place_cache and states[1].buffers is None
    assert capacities == {33, 66}


def test_selection_reference_equals_the_torch_selection_on_padded_rows():
    from compressor.transforms.sparse_tokens import SparseTokenSettings, select_positions
    from exporters.onnx.graph_module import select_tokens_reference

    torch.manual_seed(1)
    scores = torch.rand(3, 60)
    mask = torch.ones(3, 60, dtype=torch.long)
    mask[1, :7] = 0
    mask[2, :30] = 0
    # The reference computes its scores from q and k; feed it keys whose softmax gives `scores` back.
    query = torch.ones(3, 1, 1, 1)
    keys = scores.log()[:, None, :, None]
    got = select_tokens_reference(query, keys, mask, 20, 2, 4, 1)
    probs = scores.masked_fill(~mask.bool(), 0) / scores.masked_fill(~mask.bool(), 0).sum(-1, keepdim=True)
    expected = select_positions(probs, mask, SparseTokenSettings("promptdistill", 0, 20, 2, 4, 1))
    for row, kept in zip(got, expected):
        assert row.tolist() == kept.tolist()


def test_export_validation_fails_with_the_figure_and_writes_nothing(artifacts, monkeypatch):
    from exporters.onnx import quantized_graph

    folder = artifacts("mixed")
    before = sorted(p.name for p in (folder / "onnx").iterdir())
    with pytest.raises(ExportValidationError, match=r"max \|logit difference\| .* > tolerance 1e-12"):
        export_artifact(folder, tolerance=1e-12, log=lambda m: None)
    real = quantized_graph._int_tensor
    monkeypatch.setattr(quantized_graph, "_int_tensor", lambda name, values, bits: real(name, -values.clamp(-7, 7), bits))
    with pytest.raises(ExportValidationError, match=r"max \|logit difference\| \d"):
        export_artifact(folder, log=lambda m: None)
    # The earlier export is untouched and no partial folder is left behind.
    assert sorted(p.name for p in (folder / "onnx").iterdir()) == before
    assert not [p for p in folder.iterdir() if p.name.startswith(".onnx")]


def test_export_removes_what_a_killed_export_left(artifacts, tmp_path):
    """Like a whole artifact's claim: staging folders of a killed export are removed, and an export it
    had set aside between its two renames is put back before the new one replaces it."""
    folder = _copy(artifacts("original"), tmp_path / "killed")
    (folder / ".onnx.partial-dead1234").mkdir()
    (folder / ".onnx.partial-dead1234" / WEIGHTS_FILE).write_bytes(b"0" * 1000)
    (folder / "onnx").rename(folder / ".onnx.old-4242")  # killed between the renames of its swap
    other = folder / ".onnx.partial-x.partial-abcd1234"  # not the staging of onnx/: left alone
    other.mkdir()
    export_artifact(folder, log=lambda m: None)
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".onnx")) == [other.name]
    assert (folder / "onnx" / DECODER_FILE).is_file()
    assert compressor.load(folder, backend="onnxruntime", verify=False).backend == "onnxruntime"


def test_backend_auto_and_the_onnxruntime_backend_without_an_export(artifacts, tmp_path, tiny_model_folder):
    folder = artifacts("original")
    assert compressor.load(folder, backend="auto").backend == "onnxruntime"
    plain = compress(parse_recipe(dict(BASE, name="plain", export=["safetensors"])), str(tiny_model_folder["llama"]),
                     tmp_path / "plain", quiet=True, log=lambda m: None)
    assert not (plain / "onnx").exists()
    assert compressor.load(plain, backend="auto").backend == "torch"
    with pytest.raises(CompressorError, match=r"no ONNX export \(onnx/model.onnx not found\).*compress export onnx"):
        compressor.load(plain, backend="onnxruntime")
    with pytest.raises(CompressorError, match="backend 'trt' is not available; allowed: torch, onnxruntime, tensorrt"):
        compressor.load(plain, backend="trt")


def _copy(folder: Path, target: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, target))


def test_corrupted_graph_and_missing_or_truncated_external_data_fail_clearly(artifacts, tmp_path):
    """The manifest refuses each damage first; without it (verify=False) the loader's own checks do."""
    folder = artifacts("removal")
    broken = _copy(folder, tmp_path / "corrupted")
    (broken / "onnx" / DECODER_FILE).write_bytes(b"\x08\x07garbage" * 100)
    with pytest.raises(CompressorError, match=r"model.onnx: 900 bytes, the manifest says \d+"):
        compressor.load(broken, backend="onnxruntime")
    with pytest.raises(CompressorError, match=r"model.onnx: not a readable ONNX model"):
        compressor.load(broken, backend="onnxruntime", verify=False)
    missing = _copy(folder, tmp_path / "missing")
    (missing / "onnx" / WEIGHTS_FILE).unlink()
    with pytest.raises(CompressorError, match=r"onnx/weights.data is listed in manifest.json but missing"):
        compressor.load(missing, backend="onnxruntime")
    with pytest.raises(CompressorError, match=r"external-data file .*weights.data is missing"):
        compressor.load(missing, backend="onnxruntime", verify=False)
    short = _copy(folder, tmp_path / "short")
    data = short / "onnx" / WEIGHTS_FILE
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(CompressorError, match=r"weights.data: 1000 bytes, the manifest says"):
        compressor.load(short, backend="onnxruntime")
    with pytest.raises(CompressorError, match=r"weights.data: external data is truncated"):
        compressor.load(short, backend="onnxruntime", verify=False)


def test_cli_export_and_its_errors(artifacts, tmp_path, capsys):
    folder = _copy(artifacts("removal"), tmp_path / "again")
    import shutil

    shutil.rmtree(folder / "onnx")
    assert cli_main(["export", "onnx", str(folder), "--quiet"]) == 0
    assert "onnx export:" in capsys.readouterr().out
    assert (folder / "onnx" / DECODER_FILE).is_file()
    assert cli_main(["export", "onnx", str(tmp_path / "nowhere"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an artifact folder" in err[0]
    with pytest.raises(SystemExit):
        cli_main(["export", "gguf", str(folder)])  # not a format


def test_recorded_int8_compute_is_the_loaders_default(artifacts, tokenizer, tmp_path, capsys):
    """`--matmul-accuracy int8` (a recipe's onnx.matmul_accuracy) is written in the manifest and is what
    the loader computes in when its caller names none; the graphs are still validated in fp32."""
    import shutil

    folder = _copy(artifacts("wide"), tmp_path / "int8")
    shutil.rmtree(folder / "onnx")
    assert cli_main(["export", "onnx", str(folder), "--quiet", "--matmul-accuracy", "int8"]) == 0
    manifest = json.loads((folder / "onnx" / "export.json").read_text())
    assert manifest["matmul_accuracy"] == "int8"
    assert max(v for k, v in manifest["validation"].items() if k.endswith("_logits")) < 1e-4  # fp32 check
    ids = prompts(tokenizer, 1, 40)[0].numpy()
    recorded = OnnxDecoder(folder / "onnx", threads=1)
    assert recorded.matmul_accuracy == "int8"
    int8 = OnnxDecoder(folder / "onnx", threads=1, matmul_accuracy="int8").logits(ids)
    fp32 = OnnxDecoder(folder / "onnx", threads=1, matmul_accuracy="fp32").logits(ids)
    assert np.array_equal(recorded.logits(ids), int8)
    with torch.no_grad():
        reference = compressor.load(folder).model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(fp32 - reference).max() < 1e-4
    # int8 activations move the logits, by about what the export reported for its probe.
    difference = np.abs(int8 - reference).max()
    assert 1e-4 < difference < 20 * manifest["validation"]["int8"]["prompt_logits"]
    assert compressor.load(folder, backend="onnxruntime").onnx.matmul_accuracy == "int8"
    assert OnnxDecoder(artifacts("wide") / "onnx").matmul_accuracy == "fp32"  # nothing recorded: fp32
    with pytest.raises(SystemExit):
        cli_main(["export", "onnx", str(folder), "--matmul-accuracy", "int4"])
    capsys.readouterr()
    with pytest.raises(CompressorError, match="matmul_accuracy"):
        parse_recipe({"name": "x", "onnx": {"matmul_accuracy": "int4"}})


def test_recipe_export_list_is_validated():
    with pytest.raises(CompressorError, match="export"):
        parse_recipe({"name": "x", "export": ["tflite"]})
    assert parse_recipe({"name": "x", "export": ["safetensors", "onnx"]}).export == ["safetensors", "onnx"]


def test_provider_selection_prefers_cuda_when_the_gpu_build_is_installed():
    assert choose_providers([CUDA, CPU]) == [CUDA, CPU]
    assert choose_providers(["AzureExecutionProvider", CPU]) == [CPU]
    assert choose_providers([CUDA, CPU], [CPU]) == [CPU]
    with pytest.raises(CompressorError, match="not available in this onnxruntime build"):
        choose_providers([CPU], [CUDA])


def test_session_options_reach_onnxruntime(artifacts):
    folder = artifacts("original")
    decoder = OnnxDecoder(folder / "onnx", threads=1, optimization="basic")
    assert decoder.session.get_providers() == [CPU]
    with pytest.raises(CompressorError, match="graph optimization level 'fast'"):
        OnnxDecoder(folder / "onnx", optimization="fast")
    with pytest.raises(CompressorError, match="matmul_accuracy 'int3'"):
        OnnxDecoder(folder / "onnx", matmul_accuracy="int3")


@pytest.mark.parametrize("symmetric", [True, False])
def test_eight_bit_weights_split_into_exact_four_bit_halves(symmetric):
    """The fp32 loader reads 8-bit codes as 16 * high + low; the product equals the int8 one."""
    import onnxruntime as ort
    from onnx import helper

    from compressor.transforms.quantize import QuantFormat, rtn_quantize
    from exporters.onnx.int8_split import split_int8_matmuls
    from exporters.onnx.quantized_graph import rewrite_quantized

    torch.manual_seed(0)
    weight = torch.randn(40, 128)
    quantized = rtn_quantize(weight, QuantFormat(8, 64, symmetric))
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 128])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 40])
    graph = helper.make_graph([helper.make_node("Transpose", ["lin.weight"], ["w_t"], perm=[1, 0]),
                               helper.make_node("MatMul", ["x", "w_t"], ["y"])], "g", [x], [y],
                              [onnx.numpy_helper.from_array(weight.numpy(), "lin.weight")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    rewrite_quantized(proto, {"lin": quantized})
    assert split_int8_matmuls(proto) == 1
    assert [n.op_type for n in proto.graph.node if n.op_type == "MatMul"] == ["MatMul", "MatMul"]
    session = ort.InferenceSession(proto.SerializeToString(), session_options(), providers=[CPU])
    inputs = torch.randn(5, 128)
    got = torch.from_numpy(session.run(None, {"x": inputs.numpy()})[0])
    assert (got - inputs @ quantized.dequantize().T).abs().max() < 1e-4


def test_missing_onnx_packages_are_one_error_before_any_work(tiny_model_folder, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nexport: [safetensors, onnx]\n")
    code = cli_main(["--recipe", str(recipe), "--model", str(tiny_model_folder["llama"]), "--out",
                     str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "ONNX export needs onnxscript: pip install 'compressor[onnx]'" in err[0]
    assert not (tmp_path / "out").exists()
