"""The sparse-token filter through `compress`: plan, config.json, loading, per-call override, CLI, probe."""

from __future__ import annotations

import json

import pytest
import torch

import compressor
from compressor.stages.sparse_tokens import choose_filter_layer
from compressor.cli import main as cli_main
from compressor.errors import CompressorError
from compressor.needles import NEEDLE, QUESTION, build_cases, even_depths
from compressor.pipeline import compress
from compressor.recipe import parse_recipe
from compressor.transforms.sparse_tokens import SparseTokenSettings, full_prefill, sparse_prefill

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EVALUATE = {"text": "embedded", "windows": 2, "seq_len": 64, "compare_original": False,
            "speed": {"prompt_tokens": 16, "new_tokens": 4, "repeats": 1},
            "needles": {"text": "embedded", "lengths": [300], "depths": 2, "per_cell": 1, "max_new_tokens": 4}}
SPARSE = {"method": "promptdistill", "keep_tokens": 96, "keep_last": 8,
          "probe": {"samples": 3, "tokens": 400, "min_recall": 0.5}}


def recipe(name: str, **sparse):
    return parse_recipe({"name": name, "calibration": {"samples": 4, "seq_len": 64},
                         "remove": {"method": "similarity", "attention": 2, "protect": {"first": 0, "last": 0}},
                         "sparse_tokens": dict(SPARSE, **sparse), "evaluate": EVALUATE})


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_model_folder):
    root = tmp_path_factory.mktemp("sparse")
    built = {}

    def get(kind: str):
        if kind not in built:
            layer = {"auto": "auto", "fixed": 1, "quantized": 3}[kind]
            r = recipe(f"sparse-{kind}", filter_layer=layer)
            if kind == "quantized":
                r = parse_recipe(dict(r.model_dump(), quantize={"method": "rtn", "bits": [4], "group_size": 32,
                                                                "budget": {"avg_bits": 4.6}}))
            built[kind] = compress(r, str(tiny_model_folder["llama"]), root / kind, quiet=True, log=lambda m: None)
        return built[kind]

    return get


def long_prompt(tokenizer, tokens: int = 300) -> str:
    case = build_cases(tokenizer, compressor.data.embedded_text(), [tokens], [0.5], 1, seed=3)[0]
    return tokenizer.decode(case.input_ids)


def test_fixed_filter_layer_keeps_its_attention_and_lands_in_config(artifacts):
    folder = artifacts("fixed")
    plan = json.loads((folder / "plan.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert plan["sparse_tokens"]["filter_layer"] == 1 and plan["sparse_tokens"]["chosen_by"] == "recipe"
    assert plan["layers"][1]["attention"] == "keep"
    assert "sparse-token filter" in plan["layers"][1]["notes"]
    assert config["sparse_tokens"] == {"method": "promptdistill", "filter_layer": 1, "keep_tokens": 96,
                                       "keep_first": 1, "keep_last": 8, "pool_width": 5}
    # Layer 1 attention is among the most redundant of this random model when not required (see
    # the auto artifact); here removal had to pass it by.
    removed = {(u["layer"], u["unit"]) for u in plan["removal"]["removed"]}
    assert (1, "attention") not in removed and len(removed) == 2


def test_auto_filter_layer_comes_from_the_probe(artifacts):
    folder = artifacts("auto")
    plan = json.loads((folder / "plan.json").read_text())
    spec = plan["sparse_tokens"]
    probe = spec["probe"]
    assert spec["chosen_by"] == "probe" and probe["cases"] == 3 and probe["tokens"] == 400
    layers_with_attention = [d["layer"] for d in plan["layers"] if d["attention"] == "keep"]
    assert [row["layer"] for row in probe["layers"]] == layers_with_attention
    assert all(0.0 <= row["recall"] <= 1.0 for row in probe["layers"])
    assert (spec["filter_layer"], spec["reason"]) == choose_filter_layer(probe, 0.5)
    analysis = json.loads((folder / "analysis.json").read_text())
    assert analysis["filter_probe"] == probe


def test_loaded_artifact_applies_the_filter_and_the_override_turns_it_off(artifacts, tokenizer):
    art = compressor.load(artifacts("fixed"))
    prompt = long_prompt(tokenizer)
    ids = art._encode(prompt, chat=False)
    assert ids.shape[1] > 96
    settings = SparseTokenSettings.from_dict(art.model.config.sparse_tokens)
    sparse = sparse_prefill(art.model, ids, settings)
    full = full_prefill(art.model, ids)
    with_filter = art.generate(prompt, max_new_tokens=6, return_selection=True)
    assert with_filter["selected_positions"] == sparse.selected[0].tolist()
    assert len(with_filter["selected_positions"]) == 96
    assert with_filter["text"] == art.tokenizer.decode(
        art.generate_ids(ids, max_new_tokens=6), skip_special_tokens=True)
    off = art.generate(prompt, max_new_tokens=6, sparse_tokens=False, return_selection=True)
    assert off["selected_positions"] is None
    first_full = art.tokenizer.decode([int(full.logits.argmax(-1))])
    assert off["text"].startswith(first_full.strip()[:1]) or off["text"] == ""
    # Short prompts run whole, with or without the filter.
    short = "def main():"
    assert art.generate(short, max_new_tokens=5) == art.generate(short, max_new_tokens=5, sparse_tokens=False)


def test_transformers_loader_ignores_the_filter_but_loads_the_config(artifacts):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(artifacts("fixed"))
    assert model.config.sparse_tokens["filter_layer"] == 1


def test_report_has_the_filter_and_needle_table(artifacts):
    folder = artifacts("fixed")
    report = json.loads((folder / "report.json").read_text())
    needles = report["compressed"]["needles"]
    assert needles["full"]["300"]["cases"] == 2 and needles["sparse"]["300"]["cases"] == 2
    assert 0.0 <= needles["sparse"]["300"]["accuracy"] <= 1.0
    text = (folder / "report.md").read_text()
    assert "Sparse-token filter: promptdistill at layer 1" in text and "| 300 | promptdistill |" in text


def test_cli_select_prints_the_kept_text(artifacts, tokenizer, tmp_path, capsys):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(long_prompt(tokenizer))
    assert cli_main(["select", str(artifacts("fixed")), "--prompt-file", str(prompt_file), "--positions"]) == 0
    out = capsys.readouterr().out
    assert "kept 96 of" in out and "[...]" in out and out.splitlines()[-1].startswith("positions: 0 ")
    assert cli_main(["select", str(artifacts("fixed")), "--prompt", "short prompt"]) == 0
    assert "the whole prompt runs" in capsys.readouterr().out
    assert cli_main(["select", str(artifacts("fixed")), "--prompt-file", str(tmp_path / "missing.txt")]) == 2
    assert "prompt file not found" in capsys.readouterr().err


def test_sparse_tokens_true_on_an_artifact_without_a_filter_is_an_error(tiny_model_folder, tmp_path):
    from compressor.runtime import Artifact
    from compressor.sources import load_model

    loaded = load_model(str(tiny_model_folder["llama"]), quiet=True)
    art = Artifact(tmp_path, loaded.model, loaded.tokenizer)
    with pytest.raises(CompressorError, match="has no sparse-token filter"):
        art.generate("hello", max_new_tokens=2, sparse_tokens=True)


@pytest.mark.parametrize("sparse, message", [
    ({"keep_first": 60, "keep_last": 40}, "exceeds keep_tokens"),
    ({"pool_width": 4}, "pool_width must be odd"),
    ({"filter_layer": -1}, "filter_layer must be 'auto' or a layer index"),
    ({"method": "snapkv"}, "sparse_tokens.method"),
    ({"probe": {"tokens": 90}}, "must exceed keep_tokens"),
])
def test_bad_recipe_sections_name_the_field(sparse, message):
    with pytest.raises(CompressorError, match=message):
        parse_recipe({"sparse_tokens": dict({"keep_tokens": 96}, **sparse)})


def test_filter_layer_outside_the_model_is_refused_before_work(tiny_model_folder, tmp_path):
    with pytest.raises(CompressorError, match="filter_layer: 9 is outside the model's layers 0..5"):
        compress(recipe("bad", filter_layer=9), str(tiny_model_folder["llama"]), tmp_path / "bad", quiet=True,
                 log=lambda m: None)
    assert not (tmp_path / "bad").exists()


def test_needle_cases_are_exact_and_reproducible(tokenizer):
    text = compressor.data.embedded_text()
    cases = build_cases(tokenizer, text, [200, 300], even_depths(3), 2, seed=7)
    assert len(cases) == 12 and [c.length for c in cases[:6]] == [200] * 6
    again = build_cases(tokenizer, text, [200, 300], even_depths(3), 2, seed=7)
    for case, same in zip(cases, again):
        assert torch.equal(case.input_ids, same.input_ids) and case.answer == same.answer
        assert case.input_ids.numel() == case.length
        a, b = case.answer_span
        assert tokenizer.decode(case.input_ids[a:b]).strip() == case.answer
        needle = tokenizer(NEEDLE.format(number=case.answer), add_special_tokens=False)["input_ids"]
        ids = case.input_ids.tolist()
        start = next(i for i in range(len(ids)) if ids[i:i + len(needle)] == needle)
        body = case.length - len(needle) - len(tokenizer(QUESTION, add_special_tokens=False)["input_ids"])
        assert start == round(case.depth * body)
    assert even_depths(5) == [0.05, 0.275, 0.5, 0.725, 0.95]
    with pytest.raises(CompressorError, match="fewer than the needle length"):
        build_cases(tokenizer, "short text", [200], [0.5], 1, 0)


@torch.no_grad()
def test_filter_on_a_removed_and_quantized_artifact_matches_the_reference(artifacts, tokenizer):
    from test_sparse_tokens import promptdistill_reference

    folder = artifacts("quantized")
    art = compressor.load(folder)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" in config and config["sparse_tokens"]["filter_layer"] == 3
    removed = [u["layer"] for u in json.loads((folder / "plan.json").read_text())["removal"]["removed"]]
    assert len(removed) == 2 and 3 not in removed
    assert art.model.model.layers[removed[0]].self_attn is None
    ids = art._encode(long_prompt(tokenizer), chat=False)
    settings = SparseTokenSettings.from_dict(art.model.config.sparse_tokens)
    state = sparse_prefill(art.model, ids, settings)
    kept = state.selected[0].tolist()
    token = int(state.logits.argmax(-1))
    from compressor.transforms.sparse_tokens import decode_step

    logits = decode_step(art.model, torch.tensor([token]), state)
    assert torch.allclose(logits, promptdistill_reference(art.model, ids, kept, token, 3), atol=1e-4)


def test_apply_of_a_saved_plan_reproduces_the_filter(artifacts, tiny_model_folder, tmp_path, tokenizer):
    from compressor.pipeline import apply_plan_to_source
    from compressor.plan import load_plan

    folder = artifacts("fixed")
    out = apply_plan_to_source(load_plan(folder / "plan.json"), str(tiny_model_folder["llama"]), tmp_path / "applied",
                               force=False, quiet=True)
    assert json.loads((out / "config.json").read_text())["sparse_tokens"] == \
        json.loads((folder / "config.json").read_text())["sparse_tokens"]
    prompt = long_prompt(tokenizer)
    first = compressor.load(folder).generate(prompt, max_new_tokens=5, return_selection=True)
    again = compressor.load(out).generate(prompt, max_new_tokens=5, return_selection=True)
    assert first == again
