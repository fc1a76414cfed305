"""The whole `compress` run on tiny random models of every supported family.

Each family is compressed once (module-scoped) with a small similarity recipe; the Llama model is
also compressed with a FinerCut recipe. The artifacts are then checked file by file, weight by
weight and logit by logit against the in-memory pruned model.
"""

from __future__ import annotations

import json

import pytest
import torch

import compressor
from compressor.cli import main as cli_main
from compressor.sources import load_model
from compressor.pipeline import apply_plan_to_source, compress
from compressor.plan import load_plan
from compressor.recipe import parse_recipe
from compressor.report import compare
from compressor.transforms.prune import remove_units
from conftest import FAMILIES
from exporters.safetensors import MODEL_FILE, write_model
from helpers import tensor_bytes

NUM_LAYERS = 6
ARTIFACT_FILES = ("config.json", MODEL_FILE, "tokenizer.json", "tokenizer_config.json", "recipe.yaml", "plan.json",
                  "analysis.json", "analysis.png", "report.json", "report.md")
EVALUATE = {"text": "embedded", "windows": 2, "seq_len": 64,
            "speed": {"prompt_tokens": 16, "new_tokens": 4, "repeats": 1}}
CALIBRATION = {"samples": 4, "seq_len": 64}


def similarity_recipe(name: str, compare_original: bool = True):
    # Each evaluation measures speed in a fresh process (seconds each), so the original model is
    # evaluated for the Llama runs only.
    return parse_recipe({"name": name, "calibration": CALIBRATION,
                         "remove": {"method": "similarity", "attention": 2},
                         "evaluate": dict(EVALUATE, compare_original=compare_original)})


def finercut_recipe(name: str):
    return parse_recipe({"name": name, "calibration": CALIBRATION,
                         "remove": {"method": "finercut", "any": 3, "search_samples": 2, "search_seq_len": 32},
                         "evaluate": EVALUATE})


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_model_folder):
    """(family, method) -> artifact folder, compressed on first use."""
    built = {}
    root = tmp_path_factory.mktemp("artifacts")

    def get(family: str, method: str = "similarity"):
        if (family, method) not in built:
            name = f"{family}-{method}"
            recipe = similarity_recipe(name, family == "llama") if method == "similarity" else finercut_recipe(name)
            out = compress(recipe, str(tiny_model_folder[family]), root / f"{family}-{method}", quiet=True,
                           log=lambda m: None)
            built[(family, method)] = out
        return built[(family, method)]

    return get


def read_json(path):
    return json.loads(path.read_text())


def removed_units(plan: dict) -> set[tuple[int, str]]:
    return {(d["layer"], kind) for d in plan["layers"] for kind in ("attention", "mlp") if d[kind] == "remove"}


def unit_prefixes(layer: int, kind: str) -> tuple[str, ...]:
    """A unit's weights include its own pre-norm: removing the unit removes the norm too."""
    if kind == "attention":
        return (f"model.layers.{layer}.self_attn.", f"model.layers.{layer}.input_layernorm.")
    return (f"model.layers.{layer}.mlp.", f"model.layers.{layer}.post_attention_layernorm.")


def unit_bytes(model, units) -> int:
    prefixes = tuple(p for layer, kind in units for p in unit_prefixes(layer, kind))
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.startswith(prefixes))


def probe_ids() -> torch.Tensor:
    return torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(11))


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def logits(model) -> torch.Tensor:
    return logits_of(model, probe_ids())



def no_ops(config: dict) -> list[dict]:
    """config.json's block_configs as {attention: {no_op}, ffn: {no_op}}, whatever its form adds
    (the Nemotron-NAS form adds replace_with_linear, n_heads_in_group, intermediate_size)."""
    return [{kind: {"no_op": block[kind]["no_op"]} for kind in ("attention", "ffn")} for block in config["block_configs"]]

@pytest.fixture(scope="module")
def full_export_bytes(tmp_path_factory, tiny_model_folder):
    """family -> tensor bytes of the source converted and exported with nothing removed."""
    sizes = {}

    def get(family):
        if family not in sizes:
            folder = tmp_path_factory.mktemp(f"full-{family}")
            write_model(load_model(str(tiny_model_folder[family])).model, None, folder)
            sizes[family] = tensor_bytes(folder / MODEL_FILE)
        return sizes[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_artifact_folder_contents_and_plan(artifacts, family):
    folder = artifacts(family)
    for name in ARTIFACT_FILES:
        assert (folder / name).is_file(), name
        assert (folder / name).stat().st_size > 0, name
    assert not [p.name for p in folder.parent.iterdir() if ".partial-" in p.name]

    plan = read_json(folder / "plan.json")
    assert plan["format"] == "compressor-plan/1" and plan["num_hidden_layers"] == NUM_LAYERS
    removed = removed_units(plan)
    assert len(removed) == 2 and all(kind == "attention" for _, kind in removed)
    assert {(u["layer"], u["unit"]) for u in plan["removal"]["removed"]} == removed
    assert all(1 <= layer <= NUM_LAYERS - 2 for layer, _ in removed)  # protect first 1, last 1
    # Similarity: the two most redundant attention units among layers 1..4.
    analysis = read_json(folder / "analysis.json")
    assert analysis["format"] == "compressor-analysis/1" and len(analysis["layers"]) == NUM_LAYERS
    redundancy = {e["layer"]: e["attention"]["redundancy"] for e in analysis["layers"][1:-1]}
    assert {layer for layer, _ in removed} == set(sorted(redundancy, key=redundancy.get)[-2:])

    config = read_json(folder / "config.json")
    # Removed sub-layers: the Nemotron-NAS form where vLLM's class can express the model (Llama);
    # the toolkit's form for Qwen2 (q/k/v biases only), Qwen3 (q/k norms) and a windowed Mistral.
    source = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
              "mistral": "MistralForCausalLM"}[family]
    if family == "llama":
        assert config["model_type"] == "nemotron-nas" and config["architectures"] == ["DeciLMForCausalLM"]
        assert config["compressor_artifact"] == {"form": "nemotron-nas", "source_architecture": source}
    else:
        assert config["model_type"] == "compressor_decoder" and config["architectures"] == ["CompressedForCausalLM"]
        assert config["source_architecture"] == source
    assert no_ops(config) == [
        {"attention": {"no_op": (i, "attention") in removed}, "ffn": {"no_op": (i, "mlp") in removed}}
        for i in range(NUM_LAYERS)]

    recipe_text = (folder / "recipe.yaml").read_text()
    assert f"name: {family}-similarity" in recipe_text and "method: similarity" in recipe_text
    report = read_json(folder / "report.json")
    assert report["name"] == f"{family}-similarity"
    assert {(u["layer"], u["unit"]) for u in report["removed_units"]} == removed
    assert report["compressed"]["perplexity_text"]["windows"] == 2
    assert report["compressed"]["speed"]["prompt_tokens"] == 16
    compressed_model = compressor.load(folder).model
    assert report["compressed"]["parameters"] == sum(p.numel() for p in compressed_model.parameters())
    assert report["compressed"]["weights_bytes"] == (folder / MODEL_FILE).stat().st_size
    assert report["compressed"]["speed"]["new_tokens"] == 4
    markdown = (folder / "report.md").read_text()
    assert f"| {family}-similarity |" in markdown
    if family == "llama":
        assert report["original"]["parameters"] - report["compressed"]["parameters"] == \
            2 * (2 * 64 * 64 + 2 * 32 * 64 + 64)  # q, o: 64x64; k, v: 32x64; input_layernorm
        assert "| original |" in markdown
    else:
        assert report["original"] is None and "| original |" not in markdown


@pytest.mark.parametrize("family", FAMILIES)
def test_artifact_logits_equal_in_memory_pruned_model_exactly(artifacts, tiny_model_folder, family):
    folder = artifacts(family)
    plan = read_json(folder / "plan.json")
    expected = logits(remove_units(load_model(str(tiny_model_folder[family])).model, plan))

    artifact = compressor.load(folder)
    assert artifact.plan == plan
    assert float((logits(artifact.model) - expected).abs().max()) == 0.0

    import transformers

    auto = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(auto).__name__ == ("NemotronNasForCausalLM" if family == "llama" else "CompressedForCausalLM")
    assert float((logits(auto) - expected).abs().max()) == 0.0
    # Greedy decoding: the artifact's own KV-cache loop, transformers' generate and a no-cache
    # argmax loop agree token for token.
    prompt = probe_ids()[:1, :12]
    reference = prompt
    for _ in range(6):
        reference = torch.cat([reference, logits_of(auto, reference)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert artifact.generate_ids(prompt, max_new_tokens=6, stop_token_ids=[]) == reference[0, 12:].tolist()
    with torch.no_grad():
        generated = auto.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert generated.tolist() == reference.tolist()
    # The removed units exist in neither model.
    for model in (artifact.model, auto):
        names = [n for n, _ in model.named_parameters()]
        for layer, kind in removed_units(plan):
            assert not [n for n in names if n.startswith(unit_prefixes(layer, kind))]


@pytest.mark.parametrize("family", FAMILIES)
def test_removed_weights_absent_and_bytes_saved_exactly(artifacts, full_export_bytes, tiny_model_folder, family):
    folder = artifacts(family)
    plan = read_json(folder / "plan.json")
    removed = removed_units(plan)
    full = full_export_bytes(family)
    pruned = tensor_bytes(folder / MODEL_FILE)
    prefixes = tuple(p for layer, kind in removed for p in unit_prefixes(layer, kind))
    gone = {name for name in full if name.startswith(prefixes)}
    assert len(gone) == 2 * (5 if family != "qwen3" else 7) + 2 * (3 if family == "qwen2" else 0)
    assert set(pruned) == set(full) - gone
    source = load_model(str(tiny_model_folder[family])).model
    assert sum(full.values()) - sum(pruned.values()) == unit_bytes(source, removed)
    assert sum(full.values()) - sum(pruned.values()) == sum(full[name] for name in gone)


def test_finercut_recipe_removes_the_recorded_search_prefix(artifacts, tiny_model_folder):
    folder = artifacts("llama", "finercut")
    analysis = read_json(folder / "analysis.json")
    searches = analysis["removal_searches"]
    assert len(searches) == 1
    search = searches[0]
    assert search["method"] == "finercut" and search["search_samples"] == 2 and search["search_seq_len"] == 32
    assert search["quotas"] == {"attention": 0, "mlp": 0, "any": 3}
    steps = [(s["layer"], s["unit"]) for s in search["order"]]
    assert len(steps) == 3 and len(set(steps)) == 3
    assert all(1 <= layer <= NUM_LAYERS - 2 for layer, _ in steps)
    scores = [s["score"] for s in search["order"]]
    assert scores == sorted(scores) and scores[0] > 0

    plan = read_json(folder / "plan.json")
    removed = removed_units(plan)
    assert removed == set(steps)
    assert [(u["layer"], u["unit"]) for u in plan["removal"]["removed"]] == steps
    config = read_json(folder / "config.json")
    assert no_ops(config) == [
        {"attention": {"no_op": (i, "attention") in removed}, "ffn": {"no_op": (i, "mlp") in removed}}
        for i in range(NUM_LAYERS)]
    expected = logits(remove_units(load_model(str(tiny_model_folder["llama"])).model, plan))
    assert float((logits(compressor.load(folder).model) - expected).abs().max()) == 0.0


@pytest.mark.parametrize("family", ("llama", "qwen2"))
def test_edited_plan_removes_exactly_the_flipped_unit(artifacts, tiny_model_folder, tmp_path, family):
    folder = artifacts(family)
    plan = load_plan(folder / "plan.json")
    before = removed_units(plan)
    layer = next(d["layer"] for d in plan["layers"][1:] if d["mlp"] == "keep")
    plan["layers"][layer]["mlp"] = "remove"
    source = str(tiny_model_folder[family])
    out = apply_plan_to_source(plan, source, tmp_path / "edited", force=False, quiet=True)

    wanted = before | {(layer, "mlp")}
    config = read_json(out / "config.json")
    assert no_ops(config) == [
        {"attention": {"no_op": (i, "attention") in wanted}, "ffn": {"no_op": (i, "mlp") in wanted}}
        for i in range(NUM_LAYERS)]
    written_plan = read_json(out / "plan.json")
    assert written_plan["layers"][layer]["mlp"] == "remove"
    assert written_plan["model"]["source"] == source

    original_bytes = tensor_bytes(folder / MODEL_FILE)
    edited_bytes = tensor_bytes(out / MODEL_FILE)
    assert set(edited_bytes) == {n for n in original_bytes if not n.startswith(unit_prefixes(layer, "mlp"))}
    source_model = load_model(source).model
    assert sum(original_bytes.values()) - sum(edited_bytes.values()) == unit_bytes(source_model, [(layer, "mlp")])

    expected = logits(remove_units(source_model, plan))
    edited = compressor.load(out).model
    assert edited.model.layers[layer].mlp is None
    assert float((logits(edited) - expected).abs().max()) == 0.0


def test_report_compares_artifacts_with_an_original_row(artifacts, capsys):
    first, second = artifacts("llama"), artifacts("llama", "finercut")
    table = compare([str(first), str(second)])
    rows = [line for line in table.split("\n\n")[0].splitlines()
            if line.startswith("| ") and not line.startswith("| variant")]
    names = [row.split("|")[1].strip() for row in rows]
    assert names == ["original", "llama-similarity", "llama-finercut"]
    params = {row.split("|")[1].strip(): row.split("|")[3].strip() for row in rows}
    for folder, name in ((first, "llama-similarity"), (second, "llama-finercut")):
        report = read_json(folder / "report.json")
        assert params[name] == f"{report['compressed']['parameters'] / 1e6:.2f}"
        assert report["compressed"]["parameters"] == sum(p.numel() for p in compressor.load(folder).model.parameters())
    original = read_json(first / "report.json")["original"]
    assert params["original"] == f"{original['parameters'] / 1e6:.2f}"
    assert "ppl ratio" in table.splitlines()[0]

    assert cli_main(["report", str(first), str(second)]) == 0
    printed = capsys.readouterr().out
    assert "| original |" in printed and "| llama-similarity |" in printed and "| llama-finercut |" in printed


def test_an_artifact_can_be_compressed_further(tiny_model_folder, tmp_path):
    first = compress(parse_recipe({"name": "first", "calibration": {"samples": 2, "seq_len": 32},
                                   "remove": {"method": "similarity", "attention": 1},
                                   "evaluate": {"text": "embedded", "windows": 1, "seq_len": 32,
                                                "speed": {"prompt_tokens": 8, "new_tokens": 2, "repeats": 1},
                                                "compare_original": False}}),
                     str(tiny_model_folder["llama"]), tmp_path / "first", quiet=True, log=lambda m: None)
    second = compress(parse_recipe({"name": "second", "calibration": {"samples": 2, "seq_len": 32},
                                    "remove": {"method": "similarity", "mlp": 1},
                                    "evaluate": {"text": "embedded", "windows": 1, "seq_len": 32,
                                                 "speed": {"prompt_tokens": 8, "new_tokens": 2, "repeats": 1},
                                                 "compare_original": False}}),
                      str(first), tmp_path / "second", quiet=True, log=lambda m: None)
    first_plan = json.loads((first / "plan.json").read_text())
    second_plan = json.loads((second / "plan.json").read_text())
    gone = [u["layer"] for u in first_plan["removal"]["removed"]]
    # The attention removed by the first run stays absent; the second run removes one MLP more.
    assert [second_plan["layers"][i]["attention"] for i in gone] == ["absent"]
    assert [u["unit"] for u in second_plan["removal"]["removed"]] == ["mlp"]
    config = json.loads((second / "config.json").read_text())
    assert sum(b["attention"]["no_op"] for b in config["block_configs"]) == 1
    assert sum(b["ffn"]["no_op"] for b in config["block_configs"]) == 1
