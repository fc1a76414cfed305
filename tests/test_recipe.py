"""The recipe schema: strict keys and types, clear messages, YAML loading and round-tripping."""

from __future__ import annotations

import time
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
                       "sparse_tokens", "share", "equalize", "evaluate", "export", "onnx", "tensorrt", "max_shard_bytes", "serve", "device",
                       "compute_dtype", "weights"]


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
    message = error_of({"export": ["gguf"]})
    assert "export.0" in message
    assert "'gguf'" in message
    assert "'safetensors'" in message and "'onnx'" in message and "'tensorrt'" in message


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
    message = error_of({"calibration": {"samples": "many", "colour": "red"}})
    assert "calibration.samples" in message
    assert "unknown key 'calibration.colour'" in message
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


# ---- names, limits and hostile files ------------------------------------------------------------

@pytest.mark.parametrize("name", ["/some/folder", "..", ".", "", "a/b", "a\\b", ".hidden", "-x", "x" * 101, "two words",
                                  "new\nline", "nul\x00", "ünïcode", " lead"])
def test_a_name_is_one_safe_path_component(name):
    message = error_of({"name": name})
    assert message.startswith("recipe: name: ") and "is not a recipe name" in message
    assert "letters, digits, '.', '_' and '-'" in message and "\n" not in message


@pytest.mark.parametrize("name", ["balanced", "my-recipe_2.v1", "R", "x" * 100, "0"])
def test_good_names_are_kept(name):
    assert parse_recipe({"name": name}).name == name


def test_a_recipe_built_by_code_keeps_any_name():
    # The evaluation of an artifact folder without recipe.yaml names its recipe after the folder.
    assert Recipe(name="").name == "" and Recipe(name="my artifact").name == "my artifact"


@pytest.mark.parametrize("data, field", [
    ({"quantize": {"budget": {"avg_bits": float("inf")}}}, "quantize.budget.avg_bits"),
    ({"quantize": {"budget": {"avg_bits": float("nan")}}}, "quantize.budget.avg_bits"),
    ({"quantize": {"damp": float("nan")}}, "quantize.damp"),
    ({"share": {"reduction": float("nan")}}, "share.reduction"),
    ({"remove": {"attention": float("inf")}}, "remove.attention"),
])
def test_floats_must_be_finite(data, field):
    message = error_of(data)
    assert f"{field}: " in message and "finite number" in message


@pytest.mark.parametrize("data, field", [
    ({"calibration": {"samples": 10**9}}, "calibration.samples"),
    ({"calibration": {"seq_len": 10**7}}, "calibration.seq_len"),
    ({"calibration": {"seed": 2**70}}, "calibration.seed"),
    ({"calibration": {"seed": -1}}, "calibration.seed"),
    ({"analysis": {"batch_size": 10**9}}, "analysis.batch_size"),
    ({"quantize": {"budget": {"avg_bits": 1e308}}}, "quantize.budget.avg_bits"),
    ({"quantize": {"budget": {"bytes": 10**30}}}, "quantize.budget.bytes"),
    ({"quantize": {"sensitivity_samples": 10**9}}, "quantize.sensitivity_samples"),
    ({"remove": {"any": 10**12}}, "remove.any"),
    ({"sparse_tokens": {"keep_tokens": 10**9}}, "sparse_tokens.keep_tokens"),
    ({"share": {"residual_rank": 10**9}}, "share.residual_rank"),
    ({"evaluate": {"speed": {"new_tokens": 10**9}}}, "evaluate.speed.new_tokens"),
    ({"evaluate": {"needles": {"lengths": [0]}}}, "evaluate.needles.lengths.0"),
])
def test_absurd_sizes_are_refused(data, field):
    message = error_of(data)
    assert f"{field}: input should be" in message


def test_too_many_calibration_tokens_are_refused():
    message = error_of({"calibration": {"samples": 65536, "seq_len": 131072}})
    assert message.startswith("recipe: calibration: samples x seq_len is 8589934592 tokens; allowed: at most")


def test_paths_may_not_hold_control_characters():
    assert "calibration.text: must not contain control characters" in error_of({"calibration": {"text": "a\nb"}})


def test_a_huge_bad_value_is_quoted_short():
    message = error_of({"calibration": {"text": ["x" * 1000] * 100_000}, "export": "y" * 1_000_000})
    assert len(message) < 400 and "calibration.text" in message and "..." in message


def test_many_errors_fit_one_short_line():
    message = error_of({f"unknown{i}": i for i in range(200)})
    assert len(message) < 400 and message.endswith("more")


def test_a_huge_unknown_key_is_quoted_short():
    message = error_of({"k" * 100_000: 1})
    assert message.startswith("recipe: unknown key ''kkkk") and len(message) < 300


def write(tmp_path, content: bytes) -> Path:
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    return path


def load_error(path) -> str:
    with pytest.raises(CompressorError) as info:
        load_recipe(path)
    return str(info.value)


def test_a_recipe_that_is_not_utf8(tmp_path):
    path = write(tmp_path, "name: caf\xe9\n".encode("latin-1"))
    assert load_error(path) == f"{path}: not UTF-8 text (byte 0xe9 at offset 9); a recipe must be UTF-8"


def test_a_byte_order_mark_is_fine(tmp_path):
    assert load_recipe(write(tmp_path, b"\xef\xbb\xbfname: bom\n")).name == "bom"


def test_deep_nesting_is_refused_not_a_recursion_error(tmp_path):
    path = write(tmp_path, b"description: " + b"[" * 50_000 + b"]" * 50_000 + b"\n")
    assert load_error(path).startswith(f"{path}: YAML refused at line 1, column 45: nested more than 32 levels deep")


def test_an_alias_bomb_in_a_typed_field_is_refused_at_once(tmp_path):
    bomb = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    bomb += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path = write(tmp_path, ("\n".join(bomb) + "\ncalibration: {samples: *a8}\n").encode())
    started = time.perf_counter()
    message = load_error(path)
    assert time.perf_counter() - started < 2
    assert "YAML refused" in message and "more than 50000 values once its aliases are expanded" in message


def test_a_recursive_alias_is_refused(tmp_path):
    assert "refers to a node that contains it" in load_error(write(tmp_path, b"calibration: &c {samples: *c}\n"))


def test_a_file_over_the_size_limit_is_refused_before_reading(tmp_path):
    from compressor.safe_load import RECIPE_MAX_BYTES

    path = write(tmp_path, b"name: big\n# " + b"y" * RECIPE_MAX_BYTES + b"\n")
    assert load_error(path) == f"{path}: {RECIPE_MAX_BYTES + 13} bytes, more than the {RECIPE_MAX_BYTES} bytes a recipe may have"


def test_a_repeated_key_is_refused(tmp_path):
    path = write(tmp_path, b"name: a\nremove: {attention: 1}\nname: b\n")
    assert load_error(path) == f"{path}: malformed YAML at line 3, column 1: found the key 'name' twice"


@pytest.mark.parametrize("content, expected", [
    (b"name: 2001-13-45\n", "cannot read the value '2001-13-45': month must be in 1..12"),
    (b"calibration: {samples: " + b"9" * 5000 + b"}\n", "cannot read the value '9999"),
    (b"name: !!python/object/apply:os.system ['true']\n", "could not determine a constructor"),
    (b"name: a\n---\nname: b\n", "expected a single document in the stream but found another document"),
    (b"name: a\x00b\n", "unacceptable character #x0000"),
])
def test_values_yaml_cannot_build_are_errors_at_their_place(tmp_path, content, expected):
    message = load_error(write(tmp_path, content))
    assert "malformed YAML" in message and expected in message and "\n" not in message


def test_merge_keys_and_aliases_still_work(tmp_path):
    recipe = load_recipe(write(tmp_path, b"calibration: {<<: {samples: &n 3, seq_len: 16}, seed: 4}\n"
                                         b"evaluate: {windows: *n}\n"))
    assert (recipe.calibration.samples, recipe.calibration.seq_len, recipe.calibration.seed) == (3, 16, 4)
    assert recipe.evaluate.windows == 3
