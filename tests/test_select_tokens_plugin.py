"""The SelectTokens TensorRT plugin (exporters/tensorrt/plugin/).

- Its arithmetic (select_tokens.cuh, the functions its CUDA kernels call), built for the CPU,
  selects exactly what the torch path selects (`token_scores` + `select_positions`) from a tiny
  model's filter layer: unpadded and left-padded prompts, one to four query heads per key head.
  Rows with no more real tokens than keep_tokens keep all of them.
- Where nvcc is installed: the kernels compile for every target architecture.
- Where nvcc and TensorRT's C++ headers are found (TENSORRT_INCLUDE_DIR): the plugin library builds,
  TensorRT for RTX registers it, and the sparse prefill engine builds with the SelectTokens node in
  the plugin (`token_selection: plugin`), recorded in the manifest with the library's SHA-256.
- `token_selection: plugin` without that toolchain is one clear error, before any work.
- Where a CUDA GPU is present: the kernels' selection on the GPU equals `select_positions`.
Tests that need what is missing skip and say what.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from compressor.cli import main
from compressor.models.adapters import to_compressed
from compressor.transforms.sparse_tokens import SparseTokenSettings, filter_query_keys, select_positions, token_scores
from conftest import build_tiny_hf_model
from exporters.tensorrt.plugin import (ARCHITECTURES, Toolchain, build_device_library, build_host_library,
                                       compile_kernels, device_select, find_nvcc, find_toolchain, host_select)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NVCC = find_nvcc()
TOOLCHAIN = find_toolchain()
HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
FILTER_LAYER = 1


@pytest.fixture(scope="module")
def host_library(tmp_path_factory):
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler (c++) to build the plugin's arithmetic for the CPU")
    return build_host_library(tmp_path_factory.mktemp("plugin") / "host.so")


def filter_inputs(family: str, lengths: list[int], seed: int, **overrides):
    """A tiny model's filter-layer query and keys for left-padded random prompts, their mask, and
    the torch path's scores."""
    model = to_compressed(build_tiny_hf_model(family, seed=seed, **overrides))
    width = max(lengths)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 512, (len(lengths), width), generator=generator)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        h = model.model.run_layers(model.model.embed_tokens(ids), positions, mask, None, 0, FILTER_LAYER)
        q, k = filter_query_keys(model, h, positions, FILTER_LAYER)
    return model, h, positions, mask, q, k


CASES = [  # family, config overrides (query heads per key head), prompt lengths, keep, first, last, pool
    ("llama", {}, [150], 40, 1, 4, 5),
    ("llama", {}, [150, 97, 61], 40, 2, 8, 3),
    ("qwen2", {}, [200, 200], 64, 0, 1, 1),
    ("llama", {"num_key_value_heads": 4}, [120, 80], 32, 1, 4, 5),
    ("llama", {"num_key_value_heads": 1}, [130, 31, 90], 48, 4, 4, 7),  # a row shorter than keep_tokens
]


@pytest.mark.parametrize("family, overrides, lengths, keep, first, last, pool", CASES)
def test_the_plugins_arithmetic_selects_what_the_torch_path_selects(host_library, family, overrides, lengths, keep,
                                                                     first, last, pool):
    model, h, positions, mask, q, k = filter_inputs(family, lengths, seed=len(lengths), **overrides)
    settings = SparseTokenSettings("promptdistill", FILTER_LAYER, keep, first, last, pool)
    scores = token_scores(model, h, positions, mask, FILTER_LAYER, pool)
    expected = select_positions(scores, mask, settings)
    got = host_select(host_library, q.numpy(), k.numpy(), mask.numpy(), keep, first, last, pool)
    assert got.shape == (len(lengths), keep)
    for row, (want, chosen) in enumerate(zip(expected, got)):
        assert np.all(np.diff(chosen) > 0), f"row {row}: positions not increasing"
        real = chosen[mask[row].numpy()[chosen] == 1]
        assert real.tolist() == want.tolist(), f"row {row}"
        if int(mask[row].sum()) > keep:
            assert len(real) == keep


@pytest.mark.skipif(NVCC is None, reason="no CUDA compiler (nvcc): the kernels cannot be compiled here")
def test_the_kernels_compile_for_every_target_architecture(tmp_path):
    # nvcc fails (CompressorError) when any architecture's code does not compile.
    one = compile_kernels(tmp_path / "one.o", NVCC, ARCHITECTURES[:1]).stat().st_size
    every = compile_kernels(tmp_path / "every.o", NVCC).stat().st_size
    assert every > one * (len(ARCHITECTURES) - 1) / 2  # one cubin per architecture inside


@pytest.mark.skipif(not isinstance(TOOLCHAIN, Toolchain) or not HAS_RTX,
                    reason=f"the plugin cannot be built here: {TOOLCHAIN if isinstance(TOOLCHAIN, str) else ''}"
                           f"{'' if HAS_RTX else ' TensorRT for RTX is not installed'}")
def test_the_sparse_prefill_engine_builds_with_the_plugin(tmp_path, tiny_model_folder, capsys):
    from exporters.tensorrt.build import MANIFEST, sha256

    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "name": "r", "calibration": {"samples": 2, "seq_len": 32},
        "evaluate": {"windows": 1, "seq_len": 32, "compare_original": False,
                     "speed": {"prompt_tokens": 8, "new_tokens": 2, "repeats": 1}},
        "sparse_tokens": {"method": "promptdistill", "filter_layer": 1, "keep_tokens": 96, "keep_last": 8},
        "export": ["tensorrt"], "tensorrt": {"token_selection": "plugin", "sequence": [1, 16, 256], "past": [0, 16, 256]}}))
    out = main(["--recipe", str(recipe), "--model", str(tiny_model_folder["llama"]), "--out", str(tmp_path / "out"),
                "--quiet"])
    assert out == 0, capsys.readouterr().err
    folder = tmp_path / "out" / "tensorrt"
    manifest = json.loads((folder / MANIFEST).read_text())
    plugin = manifest["plugin"]
    assert plugin["name"] == "SelectTokens" and plugin["sha256"] == sha256(folder / plugin["library"])
    assert manifest["token_selection"].startswith("SelectTokens plugin")
    sparse = manifest["engines"]["prefill_sparse.engine"]
    assert sparse["preparation"]["plugin_nodes"] == 1 and sparse["plugin_layers"] == 1
    assert manifest["engines"]["model.engine"]["plugin_layers"] == 0
    assert sparse["sha256"] == sha256(folder / "prefill_sparse.engine")
    assert "plugin_nodes" not in manifest["engines"]["model.engine"]["preparation"]
    assert main(["verify", str(tmp_path / "out")]) == 0
    print({engine: (info["bytes"], round(info["seconds"], 1)) for engine, info in manifest["engines"].items()})


def test_token_selection_plugin_without_the_toolchain_is_one_clear_error(tmp_path, tiny_model_folder, capsys,
                                                                         monkeypatch):
    monkeypatch.setenv("TENSORRT_INCLUDE_DIR", str(tmp_path / "no-headers"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "name": "r", "sparse_tokens": {"method": "promptdistill", "filter_layer": 1, "keep_tokens": 96},
        "export": ["tensorrt"], "tensorrt": {"token_selection": "plugin"}}))
    if not HAS_RTX:
        pytest.skip("TensorRT for RTX is not installed: the export is refused before the plugin is considered")
    assert main(["--recipe", str(recipe), "--model", str(tiny_model_folder["llama"]), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "token_selection: plugin cannot be built" in err[0], err
    assert ("NvInferRuntime.h" in err[0]) if NVCC else ("nvcc" in err[0])
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not torch.cuda.is_available() or NVCC is None,
                    reason="needs a CUDA GPU and nvcc to run the plugin's kernels")
@pytest.mark.parametrize("half", [False, True])
def test_the_kernels_on_the_gpu_select_what_the_torch_path_selects(tmp_path, half):
    major, minor = torch.cuda.get_device_capability()
    library = build_device_library(tmp_path / "device.so", NVCC, (f"{major}{minor}",))
    for family, overrides, lengths, keep, first, last, pool in CASES:
        model, h, positions, mask, q, k = filter_inputs(family, lengths, seed=len(lengths), **overrides)
        settings = SparseTokenSettings("promptdistill", FILTER_LAYER, keep, first, last, pool)
        expected = select_positions(token_scores(model, h, positions, mask, FILTER_LAYER, pool), mask, settings)
        dtype = torch.float16 if half else torch.float32
        got = device_select(library, q.cuda().to(dtype), k.cuda().to(dtype), mask.cuda(), keep, first, last, pool).cpu()
        for row, want in enumerate(expected):
            chosen = got[row]
            real = chosen[mask[row][chosen] == 1]
            if half:  # float16 inputs round the scores: near-ties may order differently
                overlap = len(set(real.tolist()) & set(want.tolist())) / len(want)
                assert overlap >= 0.9, (family, row, overlap)
            else:
                assert real.tolist() == want.tolist(), (family, row)
