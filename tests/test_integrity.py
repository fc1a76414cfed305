"""Self-verifying artifacts and strict loading: every damage to an artifact or a model source is one
clean error, never a model that loads and computes something else.

The corruption sweep flips bytes in and truncates every file of a quantized artifact with an ONNX
export; the edit cases change config.json or the weights in ways that keep the files well formed,
and are checked with the manifest skipped (verify=False) and after `compress verify --update`, so
the structural checks alone must catch them.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import compressor
from compressor import cli
from compressor.errors import CompressorError
from compressor.manifest import MANIFEST_FILE, artifact_files, verify_manifest
from exporters.safetensors import MODEL_FILE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECIPE = """\
name: integrity
calibration: {text: embedded, samples: 2, seq_len: 32, seed: 0}
analysis: {batch_size: 2}
remove: {method: similarity, attention: 1, protect: {first: 1, last: 1}}
quantize: {method: rtn, bits: [4, 8], group_size: 32, budget: {avg_bits: 6}, allocate: lim}
evaluate: {text: embedded, windows: 2, seq_len: 64, speed: {prompt_tokens: 16, new_tokens: 4, repeats: 1},
           compare_original: false}
export: [safetensors, onnx]
"""


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_model_folder) -> Path:
    """A tiny artifact with a removed attention unit, 4/8-bit weights and an ONNX export."""
    root = tmp_path_factory.mktemp("integrity")
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE)
    out = root / "artifact"
    assert cli.main(["--recipe", str(recipe), "--model", str(tiny_model_folder["llama"]), "--out", str(out),
                     "--quiet"]) == 0
    return out


def copy(folder: Path, target: Path) -> Path:
    return Path(shutil.copytree(folder, target))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("compress: error: "), err
    assert "Traceback" not in err[0] and "internal error" not in err[0]
    return err[0]


def test_manifest_lists_every_file_and_a_clean_artifact_verifies(artifact, capsys):
    manifest = json.loads((artifact / MANIFEST_FILE).read_text())
    files = artifact_files(artifact)
    assert sorted(manifest["files"]) == sorted(files)
    assert {"config.json", MODEL_FILE, "plan.json", "onnx/model.onnx", "onnx/weights.data",
            "onnx/export.json", "tokenizer.json"} <= set(files)
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == (artifact / name).stat().st_size
    figures = verify_manifest(artifact)
    assert figures["files"] == len(files)
    assert cli.main(["verify", str(artifact)]) == 0
    assert "verified" in capsys.readouterr().out


def _damages(size: int):
    """(label, edit of the file's bytes): flips at the start, middle and end, and truncations."""
    for where in sorted({0, size // 2, max(size - 1, 0)}):
        yield f"flip@{where}", lambda data, w=where: data[:w] + bytes([data[w] ^ 0x01]) + data[w + 1:]
    yield "truncate-half", lambda data: data[: len(data) // 2]
    yield "empty", lambda data: b""


def test_every_byte_flip_and_truncation_of_every_file_is_refused(artifact, tmp_path, capsys):
    counts = {"cases": 0, "clean_errors": 0}
    damaged = copy(artifact, tmp_path / "damaged")
    for name in artifact_files(artifact):
        original = (artifact / name).read_bytes()
        for label, edit in _damages(len(original)):
            (damaged / name).write_bytes(edit(original))
            counts["cases"] += 1
            backend = "onnxruntime" if name.startswith("onnx/") else "torch"
            with pytest.raises(CompressorError, match=rf"{name.split('/')[-1]}: .*(SHA-256|manifest says)"):
                compressor.load(damaged, backend=backend)
            assert cli.main(["verify", str(damaged)]) == 2
            one_error_line(capsys)
            counts["clean_errors"] += 1
            # Without the manifest a damaged file either still loads (the damage is in data the
            # checks cannot judge, such as a weight's low bits) or is one clean error: nothing else.
            try:
                compressor.load(damaged, backend=backend, verify=False)
                counts["loaded_unverified"] = counts.get("loaded_unverified", 0) + 1
            except CompressorError:
                counts["refused_unverified"] = counts.get("refused_unverified", 0) + 1
        (damaged / name).write_bytes(original)
    print(f"corruption sweep: {counts['cases']} cases, {counts['clean_errors']} clean errors, 0 loaded; "
          f"with verify=False {counts.get('refused_unverified', 0)} clean errors, "
          f"{counts.get('loaded_unverified', 0)} loaded, 0 tracebacks")
    assert counts["cases"] == counts["clean_errors"] >= 5 * len(artifact_files(artifact)) - 3
    verify_manifest(damaged)  # restored: clean again


def test_an_unlisted_file_and_a_missing_manifest_are_refused(artifact, tmp_path):
    extra = copy(artifact, tmp_path / "extra")
    (extra / "generation_config.json").write_text('{"do_sample": true}')
    with pytest.raises(CompressorError, match=r"'generation_config.json' is not in manifest.json"):
        compressor.load(extra)
    bare = copy(artifact, tmp_path / "bare")
    (bare / MANIFEST_FILE).unlink()
    with pytest.raises(CompressorError, match=r"no manifest.json.*verify=False"):
        compressor.load(bare)
    assert compressor.load(bare, verify=False).model is not None
    (bare / MANIFEST_FILE).write_text("[1, 2]")
    with pytest.raises(CompressorError, match=r"manifest.json: not a manifest of this toolkit"):
        compressor.load(bare)


def _header(path: Path) -> tuple[dict, bytes, int]:
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + length]), data[8 + length:], length


def _write_header(path: Path, header: dict, body: bytes, length: int) -> None:
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    path.write_bytes(struct.pack("<Q", length) + text + b" " * (length - len(text)) + body)


def test_swapped_data_offsets_load_only_without_the_manifest(artifact, tmp_path):
    swapped = copy(artifact, tmp_path / "swapped")
    header, body, length = _header(swapped / MODEL_FILE)
    norms = [k for k in header if k.endswith("layernorm.weight")][:2]
    header[norms[0]]["data_offsets"], header[norms[1]]["data_offsets"] = \
        header[norms[1]]["data_offsets"], header[norms[0]]["data_offsets"]
    _write_header(swapped / MODEL_FILE, header, body, length)
    with pytest.raises(CompressorError, match="model.safetensors: content does not match its SHA-256"):
        compressor.load(swapped)
    # The file is well formed, so only the hash can tell: without it the swap loads.
    model = compressor.load(swapped, verify=False).model
    assert not torch.equal(model.get_parameter(norms[0]), compressor.load(artifact).model.get_parameter(norms[0]))


def test_an_extra_onnx_node_is_refused(artifact, tmp_path):
    import onnx

    edited = copy(artifact, tmp_path / "extra-node")
    graph = edited / "onnx" / "model.onnx"
    proto = onnx.load(str(graph), load_external_data=False)
    logits = proto.graph.output[0].name
    proto.graph.node.append(onnx.helper.make_node("Identity", [logits], ["logits_again"]))
    proto.graph.output.append(onnx.helper.make_tensor_value_info("logits_again", onnx.TensorProto.FLOAT, None))
    onnx.save(proto, str(graph))
    with pytest.raises(CompressorError, match="model.onnx: .*(SHA-256|manifest says)"):
        compressor.load(edited, backend="onnxruntime")


# Edits that keep every file well formed: the structural checks must refuse them on their own.
def _edit_config(change):
    def edit(folder: Path):
        config = json.loads((folder / "config.json").read_text())
        change(config)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


def _edit_weights(change):
    def edit(folder: Path):
        state = load_file(str(folder / MODEL_FILE))
        change(state)
        save_file(state, str(folder / MODEL_FILE), metadata={"format": "pt"})
    return edit


def _first_group(config) -> dict:
    return next(iter(config["quantization_config"]["config_groups"].values()))


def _set_width(config):
    group = _first_group(config)
    group["weights"]["num_bits"] = 8 if group["weights"]["num_bits"] == 4 else 4


def _set_group(config):
    _first_group(config)["weights"]["group_size"] = 64


def _kept_unit_no_op(config):
    kept = next(i for i, b in enumerate(config["block_configs"]) if not b["attention"]["no_op"])
    config["block_configs"][kept]["attention"]["no_op"] = True


def _no_as_string(config):
    config["block_configs"][1]["ffn"]["no_op"] = "no"


def _drop_layer(config):
    config["num_hidden_layers"] -= 1
    config["block_configs"].pop()


def _nan_scale(state):
    name = next(k for k in state if k.endswith(".weight_scale"))
    state[name] = state[name].clone()
    state[name][0, 0] = float("nan")


def _nan_norm(state):
    name = next(k for k in state if k.endswith("norm.weight"))
    state[name] = torch.full_like(state[name], float("nan"))


def _extra_tensor(state):
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(2, 2)


def _missing_tensor(state):
    state.pop(next(k for k in state if k.endswith("mlp.down_proj.weight_scale")))


def _wrong_shape_codes(state):
    name = next(k for k in state if k.endswith(".weight_packed"))
    state[name] = state[name][:, :-1].contiguous()


EDITS = {
    "quantization width edited": (_edit_config(_set_width), r"has shape|weight_shape"),
    "quantization group size edited": (_edit_config(_set_group), r"has shape"),
    "present unit marked no_op": (_edit_config(_kept_unit_no_op), r"not explained by config.json|targets .* not a linear"),
    "no_op given as \"no\"": (_edit_config(_no_as_string), r"no_op\": true or false, got \{'no_op': 'no'\}"),
    "layer dropped from the config": (_edit_config(_drop_layer), r"not explained by config.json|targets .* not a linear"),
    "rms_norm_eps -1": (_edit_config(lambda c: c.update(rms_norm_eps=-1)), r"rms_norm_eps must be a number in \(0, 1\)"),
    "num_hidden_layers 1e6": (_edit_config(lambda c: c.update(num_hidden_layers=1e6)), r"num_hidden_layers must be an integer"),
    "unsupported rope type": (_edit_config(lambda c: c.update(rope_frequency_scaling={"rope_type": "yarn"})),
                              r"rope_type 'yarn' is not supported"),
    "config.json a list": (lambda f: (f / "config.json").write_text("[]"), r"expected a JSON object"),
    "config.json empty": (lambda f: (f / "config.json").write_text(""), r"not valid JSON"),
    "NaN scale": (_edit_weights(_nan_scale), r"holds NaN or infinite values"),
    "all-NaN norm": (_edit_weights(_nan_norm), r"holds NaN or infinite values"),
    "unexplained tensor": (_edit_weights(_extra_tensor), r"extra.weight' is not explained"),
    "missing tensor": (_edit_weights(_missing_tensor), r"weight_scale is missing"),
    "codes of the wrong shape": (_edit_weights(_wrong_shape_codes), r"has shape"),
    "exact_weights naming no module": (_edit_config(lambda c: c.update(exact_weights={"model.nope": 2})),
                                       r"cannot build|not explained|is missing"),
    "weight_sharing group out of range": (_edit_config(lambda c: c.update(weight_sharing=[
        {"projection": "q_proj", "layers": [99], "rank": 8, "basis": "q_proj_g0"}])), r"weight_sharing\[0\].layers"),
    "sparse_tokens filter on a removed layer": (_edit_config(lambda c: c.update(sparse_tokens={
        "method": "promptdistill", "filter_layer": next(i for i, b in enumerate(c["block_configs"])
                                                         if b["attention"]["no_op"]),
        "keep_tokens": 64, "keep_first": 1, "keep_last": 8, "pool_width": 5})), r"has no attention unit"),
    "tokenizer.json damaged": (lambda f: (f / "tokenizer.json").write_text("{\"version\": "), r"tokenizer files cannot be read"),
    "plan.json damaged": (lambda f: (f / "plan.json").write_text("{"), r"plan.json: not valid JSON"),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_config_and_weights_disagreeing_are_refused_without_the_manifest(artifact, tmp_path, case, capsys):
    edit, message = EDITS[case]
    folder = copy(artifact, tmp_path / "edited")
    edit(folder)
    with pytest.raises(CompressorError, match=message):
        compressor.load(folder, verify=False)
    with pytest.raises(CompressorError, match=r"(SHA-256|manifest says)"):
        compressor.load(folder)
    # Re-signing the edited files is refused too: --update checks config and weights first.
    assert cli.main(["verify", str(folder), "--update"]) == 2
    one_error_line(capsys)
    assert json.loads((folder / MANIFEST_FILE).read_text()) == json.loads((artifact / MANIFEST_FILE).read_text())


def test_onnx_export_manifest_damaged_is_one_error(artifact, tmp_path):
    folder = copy(artifact, tmp_path / "export-json")
    (folder / "onnx" / "export.json").write_text("{not json")
    with pytest.raises(CompressorError, match=r"export.json: not valid JSON"):
        compressor.load(folder, backend="onnxruntime", verify=False)


def test_update_accepts_a_deliberate_edit_that_keeps_the_artifact_consistent(artifact, tmp_path, capsys):
    folder = copy(artifact, tmp_path / "re-signed")
    report = json.loads((folder / "report.json").read_text())
    report["note"] = "reviewed"
    (folder / "report.json").write_text(json.dumps(report))
    assert cli.main(["verify", str(folder)]) == 2
    one_error_line(capsys)
    assert cli.main(["verify", str(folder), "--update"]) == 0
    assert cli.main(["verify", str(folder)]) == 0
    assert compressor.load(folder).report["note"] == "reviewed"


def test_eval_and_export_keep_the_manifest_true(artifact, tmp_path):
    folder = copy(artifact, tmp_path / "updated")
    assert cli.main(["eval", str(folder), "--no-original", "--quiet"]) == 0
    verify_manifest(folder)
    shutil.rmtree(folder / "onnx")
    assert cli.main(["export", "onnx", str(folder), "--quiet"]) == 0
    verify_manifest(folder)
    assert (folder / "onnx" / "model.onnx").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_damaged_artifact_given_as_a_source_is_refused(artifact, tmp_path, capsys):
    folder = copy(artifact, tmp_path / "source")
    data = bytearray((folder / MODEL_FILE).read_bytes())
    data[-10] ^= 0x10
    (folder / MODEL_FILE).write_bytes(bytes(data))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("export: [safetensors, onnx]", "export: [safetensors]"))
    assert cli.main(["--recipe", str(recipe), "--model", str(folder), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "SHA-256" in one_error_line(capsys)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# Model sources: transformers folders and GGUF files


def _source(tiny_model_folder, tmp_path) -> Path:
    return copy(tiny_model_folder["llama"], tmp_path / "source")


def _source_config(folder: Path, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _analyze(folder, tmp_path, capsys) -> str:
    assert cli.main(["analyze", "--model", str(folder), "--out", str(tmp_path / "a"), "--samples", "1",
                     "--seq-len", "16", "--quiet"]) == 2
    assert not (tmp_path / "a").exists()
    return one_error_line(capsys)


def test_source_with_more_layers_in_config_than_in_weights(tiny_model_folder, tmp_path, capsys):
    folder = _source(tiny_model_folder, tmp_path)
    _source_config(folder, num_hidden_layers=8)
    assert "config.json and the weights disagree" in _analyze(folder, tmp_path, capsys)


def test_source_with_fewer_layers_in_config_than_in_weights(tiny_model_folder, tmp_path, capsys):
    folder = _source(tiny_model_folder, tmp_path)
    _source_config(folder, num_hidden_layers=5)
    assert "is not explained by config.json" in _analyze(folder, tmp_path, capsys)


@pytest.mark.parametrize("changes, message", [
    ({"num_hidden_layers": 1e6}, "num_hidden_layers must be an integer in 1..1024, got 1000000.0"),
    ({"num_hidden_layers": 10 ** 6}, "num_hidden_layers must be an integer in 1..1024"),
    ({"hidden_size": -64}, "hidden_size must be an integer"),
    ({"rms_norm_eps": -1}, "rms_norm_eps must be a number in (0, 1)"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn' is not supported"),
    ({"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads"),
])
def test_source_config_values_are_checked_before_any_allocation(tiny_model_folder, tmp_path, capsys, changes, message):
    folder = _source(tiny_model_folder, tmp_path)
    _source_config(folder, **changes)
    assert message in _analyze(folder, tmp_path, capsys)


def test_source_with_non_finite_or_mis_shaped_weights(tiny_model_folder, tmp_path, capsys):
    folder = _source(tiny_model_folder, tmp_path)
    state = load_file(str(folder / MODEL_FILE))
    name = next(k for k in state if k.endswith("mlp.up_proj.weight"))
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(folder / MODEL_FILE), metadata={"format": "pt"})
    assert "holds NaN or infinite values" in _analyze(folder, tmp_path, capsys)
    state[name] = torch.zeros(state[name].shape[0], state[name].shape[1] + 1)
    save_file(state, str(folder / MODEL_FILE), metadata={"format": "pt"})
    line = _analyze(folder, tmp_path, capsys)
    assert "up_proj" in line and ("shape" in line or "disagree" in line)


@pytest.mark.parametrize("content, message", [
    (b"", "config.json: not valid JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b"{\"model_type\": ", "not valid JSON"),
    (b"\xff\xfe\x00", "not UTF-8"),
])
def test_source_config_that_is_not_a_json_object(tiny_model_folder, tmp_path, capsys, content, message):
    folder = _source(tiny_model_folder, tmp_path)
    (folder / "config.json").write_bytes(content)
    assert message in _analyze(folder, tmp_path, capsys)


@pytest.mark.parametrize("keep", [0, 7, 100, "half"])
def test_source_safetensors_corrupt_truncated_or_empty(tiny_model_folder, tmp_path, capsys, keep):
    folder = _source(tiny_model_folder, tmp_path)
    data = (folder / MODEL_FILE).read_bytes()
    (folder / MODEL_FILE).write_bytes(data[: len(data) // 2 if keep == "half" else keep])
    assert "not a readable safetensors file" in _analyze(folder, tmp_path, capsys)


def test_source_tokenizer_damaged(tiny_model_folder, tmp_path, capsys):
    folder = _source(tiny_model_folder, tmp_path)
    (folder / "tokenizer.json").write_text("{\"model\": ")
    assert "tokenizer files cannot be read" in _analyze(folder, tmp_path, capsys)


def test_gguf_cut_short(tmp_path, capsys):
    from compressor.sources import embedded_gguf_path

    try:
        gguf = embedded_gguf_path()
    except CompressorError:
        pytest.skip("the embedded model package is not installed")
    with open(gguf, "rb") as handle:
        head = handle.read(64)
    for size, name in ((64, "cut.gguf"), (0, "empty.gguf")):
        path = tmp_path / name
        path.write_bytes(head[:size])
        assert "could not read the GGUF file" in _analyze(path, tmp_path, capsys)


def test_eval_of_a_hand_edited_plan_reports_without_the_summary_it_cannot_make(artifact, tmp_path, capsys):
    folder = copy(artifact, tmp_path / "edited-plan")
    plan = json.loads((folder / "plan.json").read_text())
    del plan["quantization"]["units"]  # informational: apply never reads it
    (folder / "plan.json").write_text(json.dumps(plan))
    assert cli.main(["verify", str(folder), "--update", "--quiet"]) == 0
    assert cli.main(["eval", str(folder), "--no-original", "--quiet"]) == 0
    report = json.loads((folder / "report.json").read_text())
    assert report["quantization"] is None
    assert report["summaries_skipped"][0].startswith("quantization: plan.json lacks what the summary reads")
    assert "Summary left out, quantization" in capsys.readouterr().out
    verify_manifest(folder)
