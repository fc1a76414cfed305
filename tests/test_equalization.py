"""Activation-aware equalization (AWQ) before quantization (`equalize:`).

- Folding the scales leaves the float model's logits within 2e-5 (Llama, Qwen2 with biases, and
  grouped-query attention down to one key/value head); the search does not change the model.
- Every searched group's proxy error (round-to-nearest output error on calibration activations) is
  at most its error without scales, and strictly lower for most groups.
- A compress run with `equalize` + `quantize` plans the alphas and writes an artifact that reloads,
  and `compress apply` of its plan writes the same bytes.
- Bad recipes and plans are one clear error each.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import compressor
from compressor.cli import main
from compressor.errors import CompressorError
from compressor.models.adapters import to_compressed
from compressor.plan import validate_plan
from compressor.recipe import parse_recipe
from compressor.transforms.equalize import fold_alphas, search_alphas
from compressor.transforms.quantize import QuantFormat
from conftest import build_tiny_hf_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("family, overrides", [("llama", {}), ("qwen2", {}), ("llama", {"num_key_value_heads": 1})])
def test_folding_keeps_the_model_and_the_search_changes_nothing(family, overrides):
    torch.manual_seed(0)
    model = to_compressed(build_tiny_hf_model(family, **overrides)).eval()
    ids = torch.randint(1, 500, (4, 64))
    with torch.no_grad():
        reference = model(ids).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = search_alphas(model, ids, QuantFormat(4, 32, True), batch_size=2, tokens=256, quiet=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(groups) == 4 * model.config.num_hidden_layers
    assert all(g["error"] <= g["error_unscaled"] for g in groups)
    assert sum(g["error"] < g["error_unscaled"] for g in groups) >= len(groups) // 2
    folded = fold_alphas(model, ids, groups, batch_size=2, quiet=True)
    assert folded == sum(g["alpha"] > 0 for g in groups)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert any(k.endswith("input_layernorm.weight") for k in changed)
    with torch.no_grad():
        assert float((model(ids).logits - reference).abs().max()) <= 2e-5


RECIPE = {"name": "eq", "calibration": {"samples": 4, "seq_len": 64},
          "equalize": {"samples": 2, "tokens": 128, "grid": 5},
          "quantize": {"method": "rtn", "bits": [4, 8], "group_size": 32, "allocate": "uniform",
                       "budget": {"avg_bits": 5.0}},
          "evaluate": {"text": "embedded", "windows": 1, "seq_len": 32, "compare_original": False,
                       "speed": {"prompt_tokens": 8, "new_tokens": 2, "repeats": 1}}}


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_run_plans_the_alphas_and_apply_reproduces_it(tiny_model_folder, tmp_path, capsys):
    recipe = tmp_path / "eq.yaml"
    recipe.write_text(json.dumps(RECIPE))
    source = str(tiny_model_folder["llama"])
    assert main(["--recipe", str(recipe), "--model", source, "--out", str(tmp_path / "a"), "--quiet"]) == 0
    plan = json.loads((tmp_path / "a" / "plan.json").read_text())
    spec = plan["equalization"]
    assert spec["method"] == "awq" and spec["groups"] and all(0 < g["alpha"] < 1 for g in spec["groups"])
    assert spec["searched_groups"] == 4 * plan["num_hidden_layers"]
    loaded = compressor.load(tmp_path / "a")
    with torch.no_grad():
        logits = loaded.model(torch.randint(1, 500, (1, 24))).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == loaded.model.config.vocab_size
    assert main(["apply", "--plan", str(tmp_path / "a" / "plan.json"), "--model", source, "--out",
                 str(tmp_path / "b"), "--quiet"]) == 0
    assert digest(tmp_path / "a" / "model.safetensors") == digest(tmp_path / "b" / "model.safetensors")


def test_bad_recipes_and_plans_are_one_clear_error():
    with pytest.raises(CompressorError, match="equalize: searches scales for the quantize section's format"):
        parse_recipe({"name": "x", "equalize": {}})
    with pytest.raises(CompressorError, match=r"equalize: cannot scale projections that share factors"):
        parse_recipe({"name": "x", "equalize": {}, "quantize": {}, "share": {"projections": ["q_proj"]}})
    plan = {"format": "compressor-plan-1", "layers": [{"layer": 0, "attention": "keep", "mlp": "keep"}],
            "equalization": {"method": "awq", "calibration": {"text": "embedded", "samples": 4, "seq_len": 64, "seed": 0},
                             "samples": 2, "groups": [{"layer": 0, "group": "mlp_input", "alpha": 1.5}]}}
    from compressor.plan import PLAN_FORMAT

    plan["format"] = PLAN_FORMAT
    with pytest.raises(CompressorError, match=r"equalization.groups\[0\].alpha"):
        validate_plan(plan)
    plan["equalization"]["groups"][0].update(alpha=0.5, group="lm_head")
    with pytest.raises(CompressorError, match=r"equalization.groups\[0\].group"):
        validate_plan(plan)
