"""The recipe schema: strict keys and types, clear messages, YAML loading and round-tripping."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from compressor.errors import CompressorError
from compressor.recipe import Recipe, load_recipe, parse_recipe, recipe_yaml

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def error_of(data, where: str = "recipe") -> str:
    with pytest.raises(CompressorError) as info:
        parse_recipe(data, where)
    return str(info.value)


# ---- unknown keys ------------------------------------------------------------------------------

def test_unknown_top_level_key_names_it_and_lists_allowed_keys():
    message = error_of({"name": "x", "remov": {"attention": 1}})
    assert message.startswith("recipe: ")
    assert "unknown key 'remov'" in message
    allowed = message.split("allowed here: ", 1)[1].split(", ")
    assert allowed == ["name", "description", "model", "calibration", "analysis", "remove", "quantize",
                       "sparse_tokens", "share", "evaluate", "export"]


def test_unknown_nested_key_names_the_dotted_path_and_the_allowed_keys_there():
    message = error_of({"remove": {"methd": "x"}})
    assert "unknown key 'remove.methd'" in message
    allowed = message.split("allowed here: ", 1)[1].split(", ")
    assert allowed == ["method", "attention", "mlp", "any", "protect", "search_samples", "search_seq_len"]


@pytest.mark.parametrize("data, path, allowed", [
    ({"remove": {"protect": {"frist": 1}}}, "remove.protect.frist", ["first", "last"]),
    ({"evaluate": {"speed": {"tokens": 1}}}, "evaluate.speed.tokens", ["prompt_tokens", "new_tokens", "repeats"]),
    ({"calibration": {"sample": 4}}, "calibration.sample", ["text", "samples", "seq_len", "seed"]),
    ({"analysis": {"sensitivity": True}}, "analysis.sensitivity", ["removal_sensitivity", "batch_size"]),
])
def test_unknown_deeply_nested_keys(data, path, allowed):
    message = error_of(data)
    assert f"unknown key '{path}'" in message
    assert message.split("allowed here: ", 1)[1].split(", ") == allowed


def test_the_where_prefix_is_used():
    message = error_of({"bogus": 1}, where="my/recipe.yaml")
    assert message.startswith("my/recipe.yaml: unknown key 'bogus'")


# ---- wrong types and bad literals --------------------------------------------------------------

def test_wrong_type_names_the_field_and_the_bad_value():
    message = error_of({"calibration": {"samples": "many"}})
    assert "calibration.samples" in message
    assert "'many'" in message
    assert "integer" in message


def test_wrong_type_of_a_budget_names_the_field_and_value():
    message = error_of({"remove": {"attention": "lots"}})
    assert "remove.attention" in message
    assert "'lots'" in message
    # The union's internal branch tags (int/float) are not part of the field path.
    assert "remove.attention.int" not in message
    assert "remove.attention.float" not in message


def test_bad_literal_names_the_allowed_methods():
    message = error_of({"remove": {"method": "magic"}})
    assert "remove.method" in message
    assert "'magic'" in message
    for method in ("similarity", "iterative", "finercut"):
        assert f"'{method}'" in message


def test_bad_export_format_names_the_allowed_one():
    message = error_of({"export": ["tensorrt"]})
    assert "export.0" in message
    assert "'tensorrt'" in message
    assert "'safetensors'" in message and "'onnx'" in message


@pytest.mark.parametrize("data, field", [
    ({"calibration": {"samples": 0}}, "calibration.samples"),
    ({"calibration": {"seq_len": 4}}, "calibration.seq_len"),
    ({"remove": {"attention": -1}}, "remove.attention"),
    ({"remove": {"protect": {"first": -1}}}, "remove.protect.first"),
    ({"evaluate": {"windows": 0}}, "evaluate.windows"),
    ({"evaluate": {"speed": {"repeats": 0}}}, "evaluate.speed.repeats"),
])
def test_out_of_range_values_name_the_field(data, field):
    message = error_of(data)
    assert field in message
    assert "greater than or equal" in message


def test_several_errors_are_all_reported_in_one_line():
    message = error_of({"calibration": {"samples": "many"}, "colour": "red"})
    assert "calibration.samples" in message
    assert "unknown key 'colour'" in message
    assert "\n" not in message


def test_top_level_must_be_a_mapping():
    message = error_of(["name", "x"])
    assert message == "recipe: expected a mapping of recipe keys at the top level, got list"


def test_empty_document_gives_the_defaults():
    assert parse_recipe(None) == Recipe()
    assert parse_recipe(None).remove is None


def test_valid_values_are_kept():
    recipe = parse_recipe({"name": "r", "calibration": {"samples": 3, "seq_len": 16, "seed": 7},
                           "remove": {"method": "finercut", "mlp": 0.25, "any": 2, "protect": {"first": 2, "last": 0}}})
    assert recipe.calibration.samples == 3 and recipe.calibration.seq_len == 16 and recipe.calibration.seed == 7
    assert recipe.remove.method == "finercut"
    assert recipe.remove.mlp == 0.25 and isinstance(recipe.remove.mlp, float)
    assert recipe.remove.any == 2 and isinstance(recipe.remove.any, int)
    assert recipe.remove.attention == 0
    assert (recipe.remove.protect.first, recipe.remove.protect.last) == (2, 0)


# ---- loading files -----------------------------------------------------------------------------

def test_malformed_yaml_reports_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\ncalibration:\n  samples: 2\n  seq_len: [1, 2\nremove: {method: similarity}\n")
    with pytest.raises(CompressorError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"{path}: malformed YAML at line 5")
    assert "\n" not in message


def test_malformed_yaml_tab_indent_reports_line_2(tmp_path):
    path = tmp_path / "tabs.yaml"
    path.write_text("name: x\n\tcalibration: {}\n")
    with pytest.raises(CompressorError, match=r"malformed YAML at line 2, column 1"):
        load_recipe(path)


def test_missing_recipe_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(CompressorError) as info:
        load_recipe(path)
    assert str(info.value) == f"recipe not found: {path}"


def test_a_folder_is_not_a_recipe(tmp_path):
    with pytest.raises(CompressorError, match="recipe not found"):
        load_recipe(tmp_path)


def test_schema_errors_from_a_file_name_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\nremove: {methd: x}\n")
    with pytest.raises(CompressorError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}: unknown key 'remove.methd'")


def test_empty_file_loads_as_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing but a comment\n")
    assert load_recipe(path) == Recipe()


def test_shipped_recipes_are_found():
    assert {p.name for p in RECIPES} >= {"analyze-only.yaml", "balanced.yaml", "finercut-aggressive.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert recipe.description
    assert recipe.calibration.text == "embedded"  # never the evaluation text


def test_shipped_recipe_values():
    balanced = load_recipe(next(p for p in RECIPES if p.name == "balanced.yaml"))
    assert balanced.remove.method == "similarity"
    assert (balanced.remove.attention, balanced.remove.mlp, balanced.remove.any) == (1, 0, 0)
    assert balanced.export == ["safetensors", "onnx"]
    finercut = load_recipe(next(p for p in RECIPES if p.name == "finercut-aggressive.yaml"))
    assert finercut.remove.method == "finercut" and finercut.remove.any == 8
    analyze_only = load_recipe(next(p for p in RECIPES if p.name == "analyze-only.yaml"))
    assert analyze_only.remove is None and analyze_only.analysis.removal_sensitivity is True


# ---- round trip --------------------------------------------------------------------------------

@pytest.mark.parametrize("data", [
    {},
    {"name": "frac", "remove": {"attention": 0.25, "mlp": 1, "any": 0.1}},
    {"name": "fc", "description": "d", "model": "some/model", "calibration": {"text": "x.jsonl", "samples": 3},
     "remove": {"method": "finercut", "any": 4, "protect": {"first": 0, "last": 2}, "search_samples": 2},
     "evaluate": {"text": "embedded", "windows": 2, "speed": {"repeats": 1}, "compare_original": False}},
])
def test_recipe_yaml_round_trips(data):
    recipe = parse_recipe(data)
    text = recipe_yaml(recipe)
    again = parse_recipe(yaml.safe_load(text))
    assert again == recipe
    assert again.model_dump() == recipe.model_dump()
    # Budget types survive too (a fraction stays a fraction, a count stays a count).
    if recipe.remove is not None:
        for kind in ("attention", "mlp", "any"):
            assert type(getattr(again.remove, kind)) is type(getattr(recipe.remove, kind))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_round_trip(path, tmp_path):
    recipe = load_recipe(path)
    saved = tmp_path / "recipe.yaml"
    saved.write_text(recipe_yaml(recipe))
    assert load_recipe(saved) == recipe
