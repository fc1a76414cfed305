"""Artifacts that serving stacks load as they are: config.json forms, `serve:` targets, the report.

- The form follows what the artifact holds (compressor.serving): the family's own class when
  nothing was removed or shared, Nemotron-NAS when sub-layers were removed, the toolkit's otherwise
  (weights kept exactly, a quantized embedding, asymmetric weights, sharing, a sparse-token filter).
- Plain transformers, in a subprocess that never imports `compressor`, loads a quantize-only artifact
  (with compressed-tensors) and an unchanged one (with compressed-tensors made unimportable), with
  the logits of `compressor.load`; so do the family classes of Llama, Mistral, Qwen2 and Qwen3.
- The Nemotron-NAS form holds the fields vLLM reads, its shipped config class builds it without the
  toolkit, and another Nemotron-NAS model's folder is refused by name.
- `serve:` keeps a recipe to what its targets run, refuses what it cannot keep to, and is checked
  again when the artifact is written (an edited plan).
- Artifacts written before the forms existed (tests/data, made by the code of that time) still load
  to the logits recorded then.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import compressor
from compressor.errors import CompressorError
from compressor.manifest import write_manifest
from compressor.modeling import config_with
from compressor.models.adapters import to_compressed
from compressor.pipeline import compress, verify_artifact
from compressor.recipe import parse_recipe
from compressor.report import compare, serving_summary
from compressor.serving import config_form, stack_support
from compressor.sources import load_model
from compressor.stages.removal import removable_candidates, required_units
from compressor.transforms.prune import remove_units
from compressor.transforms.quantize import QuantFormat, rtn_quantize
from compressor.transforms.quantize_model import EMBEDDING, quantize_embedding, set_weight
from conftest import FAMILIES, build_tiny_hf_model
from exporters.config_forms import CONFIG_CLASS_FILE, compressed_config
from exporters.safetensors import write_model
from helpers import decoder_linears

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OLD_ARTIFACTS = Path(__file__).parent / "data" / "artifacts-before-serving-forms"
EVALUATE = {"text": "embedded", "windows": 1, "seq_len": 32,
            "speed": {"prompt_tokens": 8, "new_tokens": 2, "repeats": 1}, "compare_original": False}
CALIBRATION = {"samples": 2, "seq_len": 64}
QUANTIZE_4BIT = {"method": "rtn", "bits": [4], "group_size": 32, "allocate": "uniform", "budget": {"avg_bits": 5.0}}
PROBE = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(5))


def layer_plan(layers: int, attention=(), mlp=()) -> dict:
    return {"layers": [{"layer": i, "attention": "remove" if i in attention else "keep",
                        "mlp": "remove" if i in mlp else "keep"} for i in range(layers)]}


def quantize_linears(model, fmt=QuantFormat(4, 32)) -> dict:
    quantized = {}
    for name, module in decoder_linears(model):
        quantized[name] = rtn_quantize(module.weight.data, fmt)
        set_weight(module, quantized[name])
    return quantized


def written(model, tokenizer, folder: Path, quantized=None) -> Path:
    write_model(model, tokenizer, folder, quantized)
    write_manifest(folder)
    return folder


@torch.no_grad()
def toolkit_logits(folder: Path) -> torch.Tensor:
    return compressor.load(folder).model(PROBE).logits


# --- forms --------------------------------------------------------------------------------------

def tiny(family="llama"):
    return to_compressed(build_tiny_hf_model(family))


def formats_config(config, formats: dict):
    """A config whose quantization_config targets `formats` (module -> (bits, symmetric))."""
    groups = {f"g{i}": {"targets": [name], "weights": {"num_bits": bits, "symmetric": symmetric}}
              for i, (name, (bits, symmetric)) in enumerate(formats.items())}
    config = config_with(config)
    config.quantization_config = {"config_groups": groups}
    return config


def test_form_and_stacks_follow_what_the_artifact_holds():
    llama = tiny().config
    removed = remove_units(tiny(), layer_plan(6, attention=(2,))).config
    cases = {
        "unchanged": (llama, "standard", {"transformers": True, "vllm": True}),
        "removed": (removed, "nemotron-nas", {"transformers": False, "vllm": True}),
        "exact weights": (config_with(llama, exact_weights={"model.layers.1.mlp.down_proj": 1}), "toolkit",
                          {"transformers": False, "vllm": False}),
        "quantized embedding": (formats_config(llama, {EMBEDDING: (8, True)}), "toolkit",
                                {"transformers": False, "vllm": False}),
        "asymmetric": (formats_config(llama, {"model.layers.0.mlp.up_proj": (4, False)}), "toolkit",
                       {"transformers": False, "vllm": False}),
        "2-bit": (formats_config(llama, {"model.layers.0.mlp.up_proj": (2, True)}), "standard",
                  {"transformers": True, "vllm": False}),
        "shared": (config_with(llama, weight_sharing=[{"projection": "q_proj", "layers": [0, 1], "rank": 8,
                                                      "basis": "b0"}]), "toolkit", {"vllm": False}),
        "sparse filter": (config_with(llama, sparse_tokens={"method": "gemfilter"}), "toolkit", {"vllm": False}),
        "qwen3 removed": (remove_units(tiny("qwen3"), layer_plan(6, mlp=(3,))).config, "toolkit", {"vllm": False}),
        "layer 0 attention removed": (remove_units(tiny(), layer_plan(6, attention=(0,))).config, "nemotron-nas",
                                      {"vllm": False}),
        "layer 0 emptied": (remove_units(tiny(), layer_plan(6, attention=(0,), mlp=(0,))).config, "nemotron-nas",
                            {"vllm": True}),
    }
    for name, (config, form, loads) in cases.items():
        assert config_form(config) == form, name
        support = stack_support(config, has_onnx=False)
        assert support["toolkit"].loads and not support["onnxruntime"].loads, name
        for stack, expected in loads.items():
            assert support[stack].loads is expected, (name, stack, support[stack])
            assert expected or support[stack].notes, (name, stack)  # a "no" always says why


def test_each_family_unchanged_is_written_in_its_own_form_and_loads_with_its_class(tokenizer, tmp_path):
    for family in FAMILIES:
        folder = written(tiny(family), tokenizer, tmp_path / family)
        data = json.loads((folder / "config.json").read_text())
        hf = build_tiny_hf_model(family)
        assert data["architectures"] == [type(hf).__name__] and data["model_type"] == hf.config.model_type
        verify_artifact(folder)
        plain = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert type(plain) is type(hf)
        with torch.no_grad():
            torch.testing.assert_close(plain(PROBE).logits, toolkit_logits(folder), atol=1e-5, rtol=0)
            torch.testing.assert_close(plain(PROBE).logits, hf(PROBE).logits, atol=1e-5, rtol=0)


def test_the_standard_form_keeps_llama3_rope_scaling(tokenizer, tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    hf = build_tiny_hf_model("llama", rope_parameters=dict(scaling, rope_theta=5e5))
    model = to_compressed(hf)
    assert model.config.rope_frequency_scaling == scaling and model.config.rope_theta == 5e5
    folder = written(model, tokenizer, tmp_path / "llama3")
    assert compressor.load(folder).model.config.rope_frequency_scaling == scaling
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    long_probe = torch.randint(0, 512, (1, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(plain(long_probe).logits, hf(long_probe).logits, atol=1e-5, rtol=0)


# --- plain transformers in a process that never imports the toolkit -----------------------------

PLAIN_SCRIPT = """
import json, sys
block = sys.argv[2] == "block-compressed-tensors"
if block:
    import importlib.abc
    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "compressed_tensors":
                raise ImportError("compressed_tensors is not installed here")
    sys.meta_path.insert(0, Refuse())
import torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = torch.tensor(json.loads(sys.argv[3]))
with torch.no_grad():
    logits = model(ids).logits
print(json.dumps({"class": type(model).__name__, "logits": logits.tolist(),
                  "compressor": any(m.split(".")[0] in ("compressor", "exporters") for m in sys.modules),
                  "compressed_tensors": "compressed_tensors" in sys.modules}))
"""


def plain_transformers(folder: Path, block_compressed_tensors: bool = False) -> dict:
    mode = "block-compressed-tensors" if block_compressed_tensors else "-"
    done = subprocess.run([sys.executable, "-c", PLAIN_SCRIPT, str(folder), mode, json.dumps(PROBE.tolist())],
                          capture_output=True, text=True, timeout=300, cwd=folder)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def compressed_folder(tiny_model_folder, tmp_path, name: str, sections: dict) -> Path:
    recipe = parse_recipe(dict(sections, name=name, calibration=CALIBRATION, evaluate=EVALUATE))
    return compress(recipe, str(tiny_model_folder["llama"]), tmp_path / name, quiet=True, log=lambda m: None)


def test_a_quantize_only_artifact_loads_in_plain_transformers(tiny_model_folder, tmp_path):
    folder = compressed_folder(tiny_model_folder, tmp_path, "q4", {"quantize": QUANTIZE_4BIT,
                                                                  "serve": ["transformers", "vllm"]})
    data = json.loads((folder / "config.json").read_text())
    assert data["architectures"] == ["LlamaForCausalLM"] and data["quantization_config"]["format"] == "pack-quantized"
    result = plain_transformers(folder)
    assert result["class"] == "LlamaForCausalLM" and not result["compressor"] and result["compressed_tensors"]
    torch.testing.assert_close(torch.tensor(result["logits"]), toolkit_logits(folder), atol=1e-5, rtol=0)
    report = json.loads((folder / "report.json").read_text())["serving"]
    assert report["form"] == "standard"
    assert {s: e["loads"] for s, e in report["stacks"].items()} == {
        "toolkit": True, "onnxruntime": False, "transformers": True, "vllm": True}


def test_five_and_six_bit_widths_load_in_plain_transformers(tiny_model_folder, tmp_path):
    wide = dict(QUANTIZE_4BIT, bits=[5, 6], budget={"avg_bits": 6.0})
    folder = compressed_folder(tiny_model_folder, tmp_path, "q56", {"quantize": wide, "serve": ["transformers"]})
    groups = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted(g["weights"]["num_bits"] for g in groups.values()) == [5, 6]
    result = plain_transformers(folder)
    assert result["class"] == "LlamaForCausalLM" and result["compressed_tensors"]
    torch.testing.assert_close(torch.tensor(result["logits"]), toolkit_logits(folder), atol=1e-5, rtol=0)
    with pytest.raises(CompressorError, match="vLLM has kernels for 4 and 8 bits"):
        compressed_folder(tiny_model_folder, tmp_path, "q56v", {"quantize": wide, "serve": ["vllm"]})


def test_an_unchanged_artifact_loads_in_plain_transformers_without_compressed_tensors(tiny_model_folder, tmp_path):
    folder = compressed_folder(tiny_model_folder, tmp_path, "same", {})
    result = plain_transformers(folder, block_compressed_tensors=True)
    assert result["class"] == "LlamaForCausalLM" and not result["compressor"] and not result["compressed_tensors"]
    torch.testing.assert_close(torch.tensor(result["logits"]), toolkit_logits(folder), atol=1e-5, rtol=0)


def test_quantized_weights_are_what_plain_transformers_computes_with(tokenizer, tmp_path):
    """Guards the test above: the 4-bit logits differ from the float model's, so equality means the
    packed codes were read (not a float copy)."""
    model = tiny()
    with torch.no_grad():
        before = model(PROBE).logits
    folder = written(model, tokenizer, tmp_path / "q", quantize_linears(model))
    assert float((toolkit_logits(folder) - before).abs().max()) > 1e-3


# --- the Nemotron-NAS form ----------------------------------------------------------------------

def test_the_nemotron_form_holds_what_vllm_reads(tokenizer, tmp_path):
    model = remove_units(tiny(), layer_plan(6, attention=(1, 3), mlp=(4,)))
    folder = written(model, tokenizer, tmp_path / "nas", quantize_linears(model))
    data = json.loads((folder / "config.json").read_text())
    assert data["architectures"] == ["DeciLMForCausalLM"] and data["model_type"] == "nemotron-nas"
    assert data["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig"}
    assert (folder / CONFIG_CLASS_FILE).is_file()
    verify_artifact(folder)  # the manifest covers the config class file; config and weights agree
    assert data["rope_parameters"] == {"rope_type": "default", "rope_theta": model.config.rope_theta}
    blocks = data["block_configs"]
    assert blocks[1]["attention"] == {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None}
    assert blocks[0]["attention"] == {"no_op": False, "replace_with_linear": False, "n_heads_in_group": 2}
    assert blocks[4]["ffn"]["no_op"] and blocks[0]["ffn"] == {"no_op": False, "replace_with_linear": False,
                                                              "intermediate_size": 128}
    assert isinstance(AutoModelForCausalLM.from_pretrained(folder), compressor.CompressedForCausalLM)
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(folder)(PROBE).logits, toolkit_logits(folder),
                               atol=1e-6, rtol=0)
    # The shipped config class builds the config without the toolkit, with attribute access per block.
    script = ("import sys, transformers; c = transformers.AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True);"
              "b = c.block_configs; print(type(c).__name__, b[1].attention.no_op, b[0].attention.n_heads_in_group,"
              " b[0].ffn.intermediate_size, hasattr(b[0].ffn, 'ffn_mult'), 'compressor' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, timeout=300,
                          cwd=folder)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["DeciLMConfig", "True", "2", "128", "False", "False"]


@pytest.mark.parametrize("family, overrides", [("llama", {"attention_bias": True}),
                                               ("mistral", {"sliding_window": 1024})])
def test_the_nemotron_form_reads_back_biases_and_a_window_that_covers_the_context(tokenizer, tmp_path, family,
                                                                                   overrides):
    model = remove_units(to_compressed(build_tiny_hf_model(family, **overrides)), layer_plan(6, attention=(2,)))
    folder = written(model, tokenizer, tmp_path / family)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "nemotron-nas"
    loaded = compressor.load(folder).model
    for key in ("attention_bias", "attention_output_bias", "attention_window"):
        assert getattr(loaded.config, key) == getattr(model.config, key), key
    with torch.no_grad():
        torch.testing.assert_close(loaded(PROBE).logits, model(PROBE).logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(folder)(PROBE).logits, model(PROBE).logits,
                                   atol=1e-6, rtol=0)


def test_another_nemotron_model_is_refused_by_name(tokenizer, tmp_path):
    folder = written(remove_units(tiny(), layer_plan(6, attention=(1,))), tokenizer, tmp_path / "nas")
    data = json.loads((folder / "config.json").read_text())
    data["block_configs"][2]["ffn"] = {"no_op": False, "replace_with_linear": False, "ffn_mult": 1.3}
    with pytest.raises(CompressorError, match=r"block_configs\[2\] has a per-layer MLP width"):
        compressed_config(data, "config.json")
    data["block_configs"][2]["ffn"] = {"no_op": False, "replace_with_linear": True, "intermediate_size": 128}
    with pytest.raises(CompressorError, match="replace_with_linear"):
        compressed_config(data, "config.json")


# --- serve: targets -----------------------------------------------------------------------------

@pytest.mark.parametrize("sections, message", [
    ({"share": {}}, "cannot be met with a share section"),
    ({"sparse_tokens": {}}, "cannot be met with a sparse_tokens section"),
    ({"remove": {"attention": 1}, "serve": ["transformers"]}, "has no class for a model with removed sub-layers"),
    ({"quantize": {"bits": [2, 3]}}, r"quantize.bits \[2, 3\]: vLLM has kernels for 4 and 8 bits"),
    ({"quantize": {"symmetric": False}}, "needs quantize.symmetric: true"),
    ({"quantize": {"protect": {"outliers": "keep"}}}, "protect.outliers: keep"),
    ({"quantize": {"embeddings": 8}}, "quantize.embeddings: 8"),
])
def test_serve_refuses_what_its_targets_cannot_run(sections, message):
    with pytest.raises(CompressorError, match=message) as error:
        parse_recipe(dict({"serve": ["vllm"]}, **sections), "r.yaml")
    assert "\n" not in str(error.value) and str(error.value).startswith("r.yaml: ")


def test_serve_keeps_the_recipe_to_what_vllm_runs():
    recipe = parse_recipe({"serve": ["vllm", "vllm"], "remove": {"attention": 1, "protect": {"first": 0}},
                           "quantize": {"bits": [2, 3, 4, 8]}})
    assert recipe.serve == ["vllm"]
    assert recipe.quantize.bits == [4, 8] and recipe.quantize.embeddings == "keep"
    assert recipe.quantize.protect.outliers == "pin"
    # Layer 0's attention is never a removal candidate (vLLM cannot start its residual on an MLP).
    analysis = {"layers": [{"layer": i, "attention": {}, "mlp": {}} for i in range(4)]}
    assert (0, "attention") in required_units(recipe)
    candidates = removable_candidates(analysis, recipe.remove.protect, required_units(recipe))
    assert (0, "attention") not in candidates and (0, "mlp") in candidates
    # Saved and read again, the kept-to recipe is valid as it stands.
    assert parse_recipe(recipe.model_dump(mode="json")).quantize == recipe.quantize


def test_a_plan_that_breaks_a_target_is_refused_before_anything_is_written(tokenizer, tmp_path):
    model = remove_units(tiny(), layer_plan(6, attention=(0,)))
    with pytest.raises(CompressorError, match="serve: \\[vllm\\] cannot be met by this plan: vLLM: layer 0 runs its "
                                              "MLP with no attention"):
        write_model(model, tokenizer, tmp_path / "a", quantize_linears(model), serve=["vllm"])
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    model = tiny()
    quantized = quantize_linears(model, QuantFormat(2, 32))
    with pytest.raises(CompressorError, match="2-bit weights"):
        write_model(model, tokenizer, tmp_path / "b", quantized, serve=["vllm"])


def test_serve_refuses_a_source_vllm_cannot_express_before_any_work(tiny_model_folder, tmp_path):
    recipe = parse_recipe({"serve": ["vllm"], "remove": {"attention": 1}, "calibration": CALIBRATION,
                           "evaluate": EVALUATE})
    with pytest.raises(CompressorError, match="cannot be met for this model, which has q/k norms"):
        compress(recipe, str(tiny_model_folder["qwen3"]), tmp_path / "out", quiet=True, log=lambda m: None)


# --- report -------------------------------------------------------------------------------------

def test_compare_says_which_stacks_load_each_artifact(tokenizer, tmp_path):
    folders = {"plain": written(tiny(), tokenizer, tmp_path / "plain"),
               "removed": written(remove_units(tiny(), layer_plan(6, attention=(2,))), tokenizer, tmp_path / "removed")}
    model = tiny()
    quantized = quantize_linears(model)
    quantized[EMBEDDING] = quantize_embedding(model, QuantFormat(8, 32))
    folders["embedding"] = written(model, tokenizer, tmp_path / "embedding", quantized)
    for folder in folders.values():
        (folder / "report.json").write_text(json.dumps({"name": folder.name, "compressed": {
            "weights_bytes": 1, "parameters": 1, "perplexity": 2.0, "perplexity_text": {"source": "t", "windows": 1,
                                                                                        "seq_len": 8},
            "speed": {"prefill_seconds": 1, "decode_tokens_per_second": 1, "peak_rss_mb": 1, "prompt_tokens": 1,
                      "new_tokens": 1, "repeats": 1}}}))
    table = compare([str(f) for f in folders.values()])
    assert "| plain | standard | yes | no | yes | yes |" in table
    assert "| removed | nemotron-nas | yes | no | no | yes |" in table
    assert "| embedding | toolkit | yes | no | no | no |" in table
    assert "embedding, vLLM: an embedding quantized to 8 bits" in table
    assert serving_summary(folders["removed"])["stacks"]["vllm"]["notes"][0].startswith("trust_remote_code=True")


# --- sources and old artifacts ------------------------------------------------------------------

def test_an_artifact_in_the_standard_form_is_read_as_an_artifact_when_compressed_again(tokenizer, tmp_path):
    folder = written(tiny(), tokenizer, tmp_path / "plain")
    (folder / "tokenizer.json").write_text((folder / "tokenizer.json").read_text() + " ")
    with pytest.raises(CompressorError, match="tokenizer.json"):  # the manifest is checked: an artifact
        load_model(str(folder))


@pytest.mark.parametrize("name", ("unchanged", "removed-quantized"))
def test_artifacts_written_before_the_forms_load_as_before(name):
    folder = OLD_ARTIFACTS / name
    assert json.loads((folder / "config.json").read_text())["model_type"] == "compressor_decoder"
    reference = json.loads((OLD_ARTIFACTS / f"{name}.reference.json").read_text())
    ids = torch.tensor([reference["input_ids"]])
    expected = torch.tensor(reference["logits"])
    verify_artifact(folder)
    with torch.no_grad():
        torch.testing.assert_close(compressor.load(folder).model(ids).logits[0], expected, atol=1e-5, rtol=0)
        auto = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert type(auto) is compressor.CompressedForCausalLM
        torch.testing.assert_close(auto(ids).logits[0], expected, atol=1e-5, rtol=0)
    summary = serving_summary(folder)
    assert summary["form"] == "toolkit" and not summary["stacks"]["transformers"]["loads"]
    if name == "unchanged":
        assert "written before" in summary["stacks"]["transformers"]["notes"][0]
