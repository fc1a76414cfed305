"""End to end on the real embedded model (SmolLM2-135M-Instruct): quality bound, exact reload,
exact size accounting, loading through transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

import compressor
from compressor.data import WIKITEXT_RELATIVE, default_evaluation_text, evaluation_windows
from compressor.evaluate import perplexity
from compressor.sources import load_model
from compressor.pipeline import compress
from compressor.process import quiet_transformers
from compressor.recipe import parse_recipe
from compressor.transforms.prune import remove_units
from helpers import tensor_bytes

pytestmark = pytest.mark.integration

RECIPE = {
    "name": "integration",
    "calibration": {"text": "embedded", "samples": 8, "seq_len": 256, "seed": 0},
    "remove": {"method": "similarity", "attention": 2, "mlp": 1, "protect": {"first": 1, "last": 1}},
    "evaluate": {"text": "embedded", "windows": 2, "seq_len": 256,
                 "speed": {"prompt_tokens": 64, "new_tokens": 4, "repeats": 1}, "compare_original": False},
}


@pytest.fixture(scope="module")
def embedded():
    quiet_transformers()
    return load_model("embedded", quiet=True)


@pytest.fixture(scope="module")
def artifact(embedded, tmp_path_factory):
    out = tmp_path_factory.mktemp("integration") / "artifact"
    return compress(parse_recipe(RECIPE), "embedded", out, quiet=True, log=lambda m: None)


def test_original_perplexity_on_wikitext(embedded):
    text = default_evaluation_text()
    if not text.endswith(str(WIKITEXT_RELATIVE)):
        pytest.skip("WikiText-2 test (shared/data/wikitext-2-raw/wiki.test.raw) is not beside the project")
    windows = evaluation_windows(embedded.tokenizer, text, 16, 512)
    # Measured 36.08 with this setup (16 windows x 512 tokens, fp32).
    assert 35.5 < perplexity(embedded.model, windows.input_ids, quiet=True) < 36.7


def test_reload_reproduces_logits_exactly(embedded, artifact):
    plan = compressor.load(artifact).plan
    in_memory = remove_units(embedded.model, plan)
    reloaded = compressor.load(artifact)
    ids = evaluation_windows(embedded.tokenizer, "embedded", 1, 128).input_ids
    with torch.no_grad():
        expected = in_memory(ids).logits
        assert torch.equal(reloaded.model(ids).logits, expected)
        auto = transformers.AutoModelForCausalLM.from_pretrained(artifact)
        # Sub-layers removed from a Llama: the Nemotron-NAS form, read with the toolkit's class.
        assert type(auto).__name__ == "NemotronNasForCausalLM"
        assert json.loads((Path(artifact) / "config.json").read_text())["model_type"] == "nemotron-nas"
        assert torch.equal(auto(ids).logits, expected)


def test_artifact_is_smaller_by_exactly_the_removed_weights(embedded, artifact, tmp_path):
    plan = compressor.load(artifact).plan
    removed = plan["removal"]["removed"]
    assert [u["unit"] for u in removed].count("attention") == 2 and [u["unit"] for u in removed].count("mlp") == 1
    embedded.model.save_pretrained(tmp_path / "original")
    original = tensor_bytes(tmp_path / "original" / "model.safetensors")
    compressed = tensor_bytes(Path(artifact) / "model.safetensors")
    prefixes = [f"model.layers.{u['layer']}.{'self_attn' if u['unit'] == 'attention' else 'mlp'}." for u in removed]
    prefixes += [f"model.layers.{u['layer']}.{'input_layernorm' if u['unit'] == 'attention' else 'post_attention_layernorm'}."
                 for u in removed]
    gone = {name for name in original if name.startswith(tuple(prefixes))}
    assert set(original) - set(compressed) == gone
    # per removed attention unit: q, k, v, o and its norm; per MLP unit: gate, up, down and its norm
    config = embedded.model.config
    h, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    attention_bytes = 4 * (2 * h * h + 2 * h * kv + h)
    mlp_bytes = 4 * (3 * h * config.intermediate_size + h)
    assert sum(original.values()) - sum(compressed.values()) == 2 * attention_bytes + mlp_bytes


def test_generation_through_the_runtime_matches_transformers(artifact):
    art = compressor.load(artifact)
    prompt = "The capital of France is"
    ids = torch.tensor([art.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    ours = art.generate_ids(ids, max_new_tokens=12)
    hf = art.model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    assert ours == hf[: len(ours)] and len(ours) > 0
    assert art.generate(prompt, max_new_tokens=12) == art.tokenizer.decode(ours, skip_special_tokens=True)


def test_report_files_describe_the_run(artifact):
    report = compressor.load(artifact).report
    assert report["compressed"]["perplexity_text"]["windows"] == 2
    assert report["compressed"]["weights_bytes"] == (Path(artifact) / "model.safetensors").stat().st_size
    assert (Path(artifact) / "analysis.png").stat().st_size > 10_000


QUANTIZE_RECIPE = {
    "name": "integration-quantized",
    "calibration": {"text": "embedded", "samples": 4, "seq_len": 256, "seed": 0},
    "quantize": {"method": "rtn", "bits": [4, 8], "group_size": 64, "budget": {"avg_bits": 5.0},
                 "allocate": "lim", "embeddings": 8},
    "evaluate": {"text": "embedded", "windows": 1, "seq_len": 128,
                 "speed": {"prompt_tokens": 32, "new_tokens": 4, "repeats": 1}, "compare_original": False},
}


@pytest.fixture(scope="module")
def quantized_artifact(embedded, tmp_path_factory):
    out = tmp_path_factory.mktemp("integration-quantized") / "artifact"
    return compress(parse_recipe(QUANTIZE_RECIPE), "embedded", out, quiet=True, log=lambda m: None)


def test_quantized_artifact_has_the_planned_size_and_reloads_in_both_loaders(quantized_artifact):
    import json
    import struct

    folder = Path(quantized_artifact)
    plan = json.loads((folder / "plan.json").read_text())["quantization"]
    assert plan["budget"]["avg_bits"] <= 5.0 and {u["bits"] for u in plan["units"]} <= {4, 8}
    # The super weights the analysis found are stored apart, exactly.
    assert plan["exact_weights"] and all(w["module"].endswith("mlp.down_proj") for w in plan["exact_weights"])
    data = (folder / "model.safetensors").read_bytes()
    header = 8 + struct.unpack("<Q", data[:8])[0]
    assert len(data) == header + plan["predicted_tensor_bytes"]
    art = compressor.load(folder)
    ids = torch.tensor([art.tokenizer("The capital of France is Paris. The capital of Italy is")["input_ids"]])
    with torch.no_grad():
        ours = art.model(ids).logits
        auto = transformers.AutoModelForCausalLM.from_pretrained(folder)(ids).logits
    assert (ours - auto).abs().max() < 1e-4
    for item in plan["exact_weights"]:
        weight = art.model.get_submodule(item["module"]).weight
        assert float(weight.detach()[item["row"], item["column"]]) == item["weight"]


def test_eight_bit_weights_stay_within_one_percent_of_the_original_perplexity(embedded):
    import copy

    from compressor.transforms.quantize import QuantFormat
    from compressor.transforms.quantize_model import quantize_model
    from helpers import decoder_linears

    text = default_evaluation_text()
    if not text.endswith(str(WIKITEXT_RELATIVE)):
        pytest.skip("WikiText-2 test (shared/data/wikitext-2-raw/wiki.test.raw) is not beside the project")
    windows = evaluation_windows(embedded.tokenizer, text, 16, 512).input_ids
    model = copy.deepcopy(embedded.model)
    quantize_model(model, {name: QuantFormat(8, 64) for name, _ in decoder_linears(model)}, "rtn",
                   embedding=QuantFormat(8, 64), quiet=True)
    # Measured 36.08 for the original with this setup.
    assert perplexity(model, windows, quiet=True) < 36.08 * 1.01


@pytest.mark.parametrize("method", ("gemfilter", "promptdistill"))
def test_sparse_tokens_retrieve_a_needle_like_full_attention(embedded, method):
    """A 2048-token needle prompt (the benchmark's case 10: WikiText-2 haystack, depth 0.5): full
    attention and both filters at layer 21 (the layer the long-context recipe's probe picks for
    this model) answer with the planted number."""
    from compressor.data import load_text
    from compressor.evaluate import needle_suite
    from compressor.needles import build_cases, even_depths
    from compressor.transforms.sparse_tokens import SparseTokenSettings

    text = default_evaluation_text()
    if not text.endswith(str(WIKITEXT_RELATIVE)):
        pytest.skip("WikiText-2 test (shared/data/wikitext-2-raw/wiki.test.raw) is not beside the project")
    case = build_cases(embedded.tokenizer, load_text(text), [2048], even_depths(5), 4, seed=0)[10]
    settings = SparseTokenSettings(method, 21, keep_tokens=1024, keep_first=1, keep_last=32)
    full = needle_suite(embedded.model, embedded.tokenizer, [case], None, 10, quiet=True)[0]
    sparse = needle_suite(embedded.model, embedded.tokenizer, [case], settings, 10, quiet=True)[0]
    assert full["correct"], full
    assert sparse["correct"] and sparse["answer_tokens_kept"] == 1.0, sparse


SHARE_RECIPE = {
    "name": "integration-shared",
    "calibration": {"text": "embedded", "samples": 8, "seq_len": 256, "seed": 0},
    "share": {"projections": ["q_proj", "k_proj", "v_proj", "o_proj"], "reduction": 0.2},
    "evaluate": {"text": "embedded", "windows": 1, "seq_len": 128,
                 "speed": {"prompt_tokens": 32, "new_tokens": 4, "repeats": 1}, "compare_original": False},
}


@pytest.fixture(scope="module")
def shared_artifact(embedded, tmp_path_factory):
    out = tmp_path_factory.mktemp("integration-shared") / "artifact"
    return Path(compress(parse_recipe(SHARE_RECIPE), "embedded", out, quiet=True, log=lambda m: None))


def test_shared_artifact_is_smaller_by_the_plan_and_shares_real_bases(shared_artifact):
    import json

    plan = json.loads((shared_artifact / "plan.json").read_text())["sharing"]
    assert 0.2 <= plan["achieved_reduction"] < 0.21
    assert plan["parameters_in_shared_groups"] > 0
    assert sum(tensor_bytes(shared_artifact / "model.safetensors").values()) == plan["predicted_tensor_bytes"]
    shared = [g for g in plan["groups"] if g["rank"] and len(g["layers"]) > 1]
    assert shared and all(g["rank"] < 576 for g in shared)


def test_shared_artifact_keeps_perplexity_and_reloads_in_both_loaders(embedded, shared_artifact):
    text = default_evaluation_text()
    if not text.endswith(str(WIKITEXT_RELATIVE)):
        pytest.skip("WikiText-2 test (shared/data/wikitext-2-raw/wiki.test.raw) is not beside the project")
    art = compressor.load(shared_artifact)
    windows = evaluation_windows(embedded.tokenizer, text, 4, 512).input_ids
    # Measured 35.67 (the original: 30.23 on these 4 windows); 20 % fewer attention parameters.
    assert perplexity(art.model, windows, quiet=True) < 37.5
    ids = windows[:1, :64]
    with torch.no_grad():
        auto = transformers.AutoModelForCausalLM.from_pretrained(shared_artifact)(ids).logits
        assert (art.model(ids).logits - auto).abs().max() < 1e-4


def _onnx_parity(folder: Path, prompts: list[str], new_tokens: int) -> float:
    """Exports `folder` to ONNX; returns the largest |logit difference| from the torch model on the
    prompts after checking that greedy generations are identical."""
    from compressor.pipeline import export_artifact

    export_artifact(folder, "onnx", log=lambda m: None)  # keeps the artifact's manifest true
    torch_art = compressor.load(folder)
    onnx_art = compressor.load(folder, backend="onnxruntime", threads=2)
    worst = 0.0
    for prompt in prompts:
        ids = torch.tensor([torch_art.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            reference = torch_art.model(ids).logits
        worst = max(worst, float((torch.from_numpy(onnx_art.onnx.logits(ids.numpy())) - reference).abs().max()))
        assert (onnx_art.generate_ids(ids, new_tokens, stop_token_ids=[])
                == torch_art.generate_ids(ids, new_tokens, stop_token_ids=[]))
    return worst


PROMPTS = ["The capital of France is Paris. The capital of Italy is",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "In 1969, the first humans landed on the Moon. The mission was called"]


def test_onnx_export_of_a_removal_plan_matches_torch(artifact):
    assert _onnx_parity(Path(artifact), PROMPTS, 32) < 1e-4


def test_onnx_export_of_a_mixed_bit_plan_with_exact_weights_matches_torch(quantized_artifact):
    import json

    folder = Path(quantized_artifact)
    # Measured 4.6e-4 on the third prompt, 8e-5 on the others: this model's super weight drives
    # activations to ~25,000, where fp32 rounding differs between kernels. Against a float64 copy of
    # the model, torch fp32 is 6.9e-5 away there and ONNX Runtime 4.0e-4 (2.0e-4 without the 8-bit
    # split into 4-bit halves). Greedy generations are identical all the same.
    assert _onnx_parity(folder, PROMPTS, 32) < 1e-3
    stored = json.loads((folder / "onnx" / "export.json").read_text())["quantized_weights"]
    assert any(kind.endswith("exact") for kind in stored.values())
    assert {kind.split(" codes")[0] for kind in stored.values()} == {"int4", "int8"}
