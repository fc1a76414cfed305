"""Cross-layer weight sharing: the fits, the factored model, the planner, and the pipeline.

- Fits on random matrices: exact at full rank (both fits, with and without residual), error that
  never falls as the rank drops, the planner's cost curve equal to the fitted per-layer errors, the activation fit beating the weight fit on its own objective,
  the least-squares refit beating the unrefit whitened basis, group size 1 equal to truncated SVD.
- The factored model: a shared artifact reloads (compressor.load and transformers) to the
  in-memory logits, holds exactly the tensor bytes the plan predicts, stores each basis once and no
  dense matrix for a shared projection, and its config's sharing map round-trips.
- The planner: groups (adjacent and by similarity), ranks within the budget, infeasible budgets.
- Composition: removal + sharing + GPTQ quantization reloads to the in-memory logits.
"""

from __future__ import annotations


import pytest
import torch

import compressor
from compressor.errors import CompressorError
from compressor.modeling import FactoredLinear
from compressor.analysis.sharing import share_groups
from compressor.stages.sharing import plan_sharing
from compressor.recipe import Share, parse_recipe
from helpers import relative_error
from compressor.transforms.share import (FITS, fit_shared, full_rank, rank_for_budget,
                                         shared_parameters)
from exporters.safetensors import MODEL_FILE
from helpers import tensor_bytes
from test_quantize_pipeline import CALIBRATION, EVALUATE, auto_load, compress_capturing, logits, max_diff, read_json

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_group(layers: int = 3, out_features: int = 12, in_features: int = 10, seed: int = 0):
    """Related weights (a common part plus a per-layer part) and input second moments with a few
    strong directions, as calibration inputs have."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(out_features, in_features, generator=g)
    weights = [common + 0.5 * torch.randn(out_features, in_features, generator=g) for _ in range(layers)]
    hessians = []
    for _ in range(layers):
        x = torch.randn(200, in_features, generator=g) * torch.logspace(1, -1, in_features)
        hessians.append(x.T @ x / 200)
    return weights, hessians


# ---------------------------------------------------------------------------------------------
# The fits


@pytest.mark.parametrize("fit", FITS)
@pytest.mark.parametrize("shape", [(12, 10), (4, 10)])
def test_full_rank_reconstructs_exactly(fit, shape):
    weights, hessians = random_group(3, *shape)
    rank = full_rank(shape[1], shape[0], 3)
    result = fit_shared(weights, rank, fit, hessians)
    for i, w in enumerate(weights):
        assert torch.allclose(result.reconstruct(i), w.double(), atol=1e-8)


@pytest.mark.parametrize("fit", FITS)
def test_residual_at_full_rank_is_exact(fit):
    weights, hessians = random_group()
    result = fit_shared(weights, 3, fit, hessians, residual_rank=10)
    for i, w in enumerate(weights):
        assert torch.allclose(result.reconstruct(i), w.double(), atol=1e-8)


@pytest.mark.parametrize("fit", FITS)
def test_error_never_falls_as_the_rank_drops(fit):
    weights, hessians = random_group()
    measure = hessians if fit == "activation" else None
    errors = [relative_error(weights, fit_shared(weights, rank, fit, hessians), measure) for rank in range(10, 0, -1)]
    assert errors[0] < 1e-12
    assert all(later >= earlier - 1e-12 for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] > 0.1


def test_activation_fit_has_the_lower_activation_error():
    weights, hessians = random_group()
    for rank in (2, 4, 6):
        by_activation = relative_error(weights, fit_shared(weights, rank, "activation", hessians), hessians)
        by_weight = relative_error(weights, fit_shared(weights, rank, "weight"), hessians)
        assert by_activation < by_weight


def test_least_squares_refit_improves_on_the_whitened_basis_alone():
    """Per-layer refit on each layer's own inputs beats coefficients taken from the joint SVD."""
    from compressor.transforms.share import whitening

    weights, hessians = random_group()
    rank = 4
    refit = fit_shared(weights, rank, "activation", hessians)
    stack = torch.cat([w.double().T for w in weights], dim=1)
    s, s_inv = whitening(sum(hessians) / 3)
    u, sigma, vh = torch.linalg.svd(s.T @ stack, full_matrices=False)
    joint = [(s_inv.T @ u[:, :rank] @ (sigma[:rank, None] * vh[:rank])[:, i * 12:(i + 1) * 12]) for i in range(3)]
    joint_error = sum(float(torch.einsum("io,ij,jo->", w.double().T - j, h.double(), w.double().T - j))
                      for w, j, h in zip(weights, joint, hessians))
    refit_error = sum(float(torch.einsum("oi,ij,oj->", w.double() - refit.reconstruct(i), h.double(),
                                         w.double() - refit.reconstruct(i)))
                      for i, (w, h) in enumerate(zip(weights, hessians)))
    assert refit_error < joint_error


def test_group_of_one_is_truncated_svd():
    weights, _ = random_group(1)
    result = fit_shared(weights, 4, "weight")
    u, sigma, vh = torch.linalg.svd(weights[0].double(), full_matrices=False)
    best = (u[:, :4] * sigma[:4]) @ vh[:4]
    assert torch.allclose(result.reconstruct(0), best, atol=1e-10)


@pytest.mark.parametrize("fit", FITS)
def test_cost_curve_equals_the_fitted_per_layer_errors(fit):
    """The planner's cost at rank r is the sum of each layer's relative error of the actual fit."""
    from compressor.transforms.share import cost_curve, damped

    weights, hessians = random_group()
    curve = cost_curve(weights, fit, hessians)
    assert len(curve) == 11 and curve[0] == pytest.approx(3.0) and curve[10] == pytest.approx(0.0, abs=1e-8)
    for rank in (1, 4, 7):
        result = fit_shared(weights, rank, fit, hessians)
        total = 0.0
        for i, w in enumerate(weights):
            h = damped(hessians[i]) if fit == "activation" else torch.eye(10, dtype=torch.float64)
            delta = w.double() - result.reconstruct(i)
            total += float(torch.einsum("oi,ij,oj->", delta, h, delta) / torch.einsum("oi,ij,oj->", w.double(), h,
                                                                                       w.double()))
        assert curve[rank] == pytest.approx(total, rel=1e-6)


def test_rank_for_budget_is_the_largest_fitting_multiple():
    for kept in (0.5, 0.8, 0.9):
        rank = rank_for_budget(576, 192, 4, kept, multiple=32)
        assert rank % 32 == 0
        assert shared_parameters(576, 192, 4, rank) <= kept * 4 * 576 * 192
        assert shared_parameters(576, 192, 4, rank + 32) > kept * 4 * 576 * 192


def test_bad_fit_arguments_are_refused():
    weights, hessians = random_group()
    with pytest.raises(ValueError, match="rank must be in 1..10"):
        fit_shared(weights, 11, "weight")
    with pytest.raises(ValueError, match="one input second moment per layer"):
        fit_shared(weights, 2, "activation", hessians[:1])
    with pytest.raises(ValueError, match="one shape"):
        fit_shared([weights[0], weights[1][:, :5]], 2, "weight")


# ---------------------------------------------------------------------------------------------
# Grouping


def test_adjacent_groups_are_consecutive_runs():
    layers = [0, 1, 2, 4, 5, 6, 7]
    assert share_groups(layers, [], "adjacent", 3) == [[0, 1, 2], [4, 5, 6], [7]]


def test_similarity_groups_follow_the_similar_blocks():
    # Layers 0-1 alike, 2-5 alike, 6-7 alike: three groups of about 3 should cut at the edges.
    blocks = [0, 0, 1, 1, 1, 1, 2, 2]
    similarity = [[0.9 if a == b else 0.2 for b in blocks] for a in blocks]
    assert share_groups(list(range(8)), similarity, "similarity", 3) == [[0, 1], [2, 3, 4, 5], [6, 7]]


# ---------------------------------------------------------------------------------------------
# The pipeline on a tiny model


SHARE = {"projections": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
         "reduction": 0.3, "group_size": 3, "rank_multiple": 8}


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model_folder):
    recipe = {"name": "shared", "calibration": CALIBRATION, "share": SHARE, "evaluate": EVALUATE}
    return compress_capturing(recipe, tiny_model_folder["llama"], tmp_path_factory.mktemp("shared") / "artifact")


def test_plan_meets_the_reduction_and_lists_groups(shared):
    spec = read_json(shared.folder / "plan.json")["sharing"]
    assert spec["parameters"] <= 0.7 * spec["dense_parameters"]
    assert spec["achieved_reduction"] == pytest.approx(1 - spec["parameters"] / spec["dense_parameters"], abs=1e-6)
    ranked = [g for g in spec["groups"] if g["rank"]]
    assert ranked and all(g["rank"] % 8 == 0 for g in ranked)
    covered = sorted((layer, g["projection"]) for g in spec["groups"] for layer in g["layers"])
    assert covered == sorted((layer, p) for layer in range(6) for p in SHARE["projections"])


def test_artifact_holds_the_predicted_bytes_and_no_dense_shared_matrix(shared):
    plan = read_json(shared.folder / "plan.json")
    sizes = tensor_bytes(shared.folder / MODEL_FILE)
    assert sum(sizes.values()) == plan["sharing"]["predicted_tensor_bytes"]
    for group in plan["sharing"]["groups"]:
        if not group["rank"]:
            continue
        assert f"model.shared_bases.{group['basis']}.weight" in sizes
        for layer in group["layers"]:
            unit = "self_attn" if group["projection"] in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            name = f"model.layers.{layer}.{unit}.{group['projection']}"
            assert f"{name}.weight" not in sizes
            assert f"{name}.coefficients.weight" in sizes


def test_in_memory_model_runs_the_factored_form(shared):
    factored = [m for m in shared.model.modules() if isinstance(m, FactoredLinear)]
    assert factored
    ids = {id(m.basis) for m in factored}
    assert len(ids) == len(shared.model.config.weight_sharing)
    predicted = read_json(shared.folder / "plan.json")["sharing"]["predicted_tensor_bytes"]
    assert 4 * sum(p.numel() for p in shared.model.parameters()) == predicted


def test_reload_equals_in_memory_logits(shared):
    expected = logits(shared.model)
    assert max_diff(logits(compressor.load(shared.folder).model), expected) < 1e-5
    assert max_diff(logits(auto_load(shared.folder)), expected) < 1e-5


def test_sharing_map_round_trips(shared):
    plan = read_json(shared.folder / "plan.json")
    config = read_json(shared.folder / "config.json")
    expected = [{k: g[k] for k in ("projection", "layers", "rank", "residual_rank", "basis")}
                for g in plan["sharing"]["groups"] if g["rank"]]
    assert config["weight_sharing"] == expected
    assert compressor.load(shared.folder).model.config.weight_sharing == expected


def test_plan_json_apply_reproduces_the_artifact(shared, tmp_path, tiny_model_folder):
    from compressor.pipeline import apply_plan_to_source

    out = apply_plan_to_source(read_json(shared.folder / "plan.json"), str(tiny_model_folder["llama"]),
                               tmp_path / "applied", force=False, quiet=True)
    assert max_diff(logits(compressor.load(out).model), logits(shared.model)) < 1e-5


@pytest.fixture(scope="module")
def shared_removed_quantized(tmp_path_factory, tiny_model_folder):
    recipe = {"name": "composed", "calibration": CALIBRATION, "remove": {"attention": 1, "mlp": 1},
              "share": dict(SHARE, reduction=0.2, group_size=2),
              "quantize": {"method": "gptq", "bits": [4, 8], "group_size": 32, "allocate": "uniform",
                           "budget": {"avg_bits": 6.0}},
              "evaluate": EVALUATE}
    return compress_capturing(recipe, tiny_model_folder["llama"], tmp_path_factory.mktemp("composed") / "artifact")


def test_composed_plan_shares_only_kept_units_and_quantizes_the_factors(shared_removed_quantized):
    plan = read_json(shared_removed_quantized.folder / "plan.json")
    removed = {(u["layer"], u["unit"]) for u in plan["removal"]["removed"]}
    for group in plan["sharing"]["groups"]:
        unit = "attention" if group["projection"] in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        assert not any((layer, unit) in removed for layer in group["layers"])
        assert group["rank"] is None or group["rank"] % 32 == 0  # coefficient inputs fit the group size
    quantized = set(shared_removed_quantized.quantized)
    bases = {f"model.shared_bases.{g['basis']}" for g in plan["sharing"]["groups"] if g["rank"]}
    assert bases and bases <= quantized
    assert any(name.endswith(".coefficients") for name in quantized)


def test_composed_artifact_reloads_to_the_in_memory_logits(shared_removed_quantized):
    expected = logits(shared_removed_quantized.model)
    assert max_diff(logits(compressor.load(shared_removed_quantized.folder).model), expected) < 1e-4
    assert max_diff(logits(auto_load(shared_removed_quantized.folder, dtype=torch.float32)), expected) < 1e-4


def test_composed_artifact_holds_the_predicted_bytes(shared_removed_quantized):
    plan = read_json(shared_removed_quantized.folder / "plan.json")
    sizes = tensor_bytes(shared_removed_quantized.folder / MODEL_FILE)
    assert sum(sizes.values()) == plan["quantization"]["predicted_tensor_bytes"]


# ---------------------------------------------------------------------------------------------
# The planner on hand-made analysis records


def record(group_cost, layer_costs, shape=(8, 8), layers=(0, 1)):
    return {"projections": {"q_proj": {"layers": list(layers), "shape": list(shape), "similarity": []}},
            "groups": [{"projection": "q_proj", "layers": list(layers), "cost": group_cost, "layer_costs": layer_costs}],
            "other_tensor_bytes": 1000, "bytes_per_parameter": 4}


def linear_curve(full: int, scale: float, layers: int = 1) -> list[float]:
    """A convex cost curve (error falls fastest at low rank, as singular values do)."""
    return [layers * scale * (1 - r / full) ** 2 for r in range(full + 1)]


def test_planner_shares_where_sharing_costs_less():
    # Two 8x8 layers (128 parameters), 25 % fewer: shared rank 4 costs 8*4 + 2*4*8 = 96 parameters.
    spec = plan_sharing(Share(projections=["q_proj"], reduction=0.25, rank_multiple=1),
                        record(linear_curve(8, 0.1, 2), [linear_curve(8, 1.0), linear_curve(8, 1.0)]))
    (group,) = spec["groups"]
    assert group["layers"] == [0, 1] and group["rank"] == 4 and group["parameters"] == 96
    assert spec["parameters"] <= 0.75 * 128 and spec["predicted_tensor_bytes"] == 1000 + 4 * spec["parameters"]


def test_planner_falls_back_to_a_basis_per_layer_where_that_costs_less():
    spec = plan_sharing(Share(projections=["q_proj"], reduction=0.25, rank_multiple=1, per_layer_fallback=True),
                        record(linear_curve(8, 1.0, 2), [linear_curve(8, 0.01), linear_curve(8, 0.01)]))
    assert [g["layers"] for g in spec["groups"]] == [[0], [1]]
    # Best per-layer choice for 96 parameters: one layer dense (64), the other at rank 2 (32), cost
    # (6/8)^2 = 0.5625 x 0.01, against (5/8)^2 x 2 for rank 3 each.
    assert sorted(g["rank"] or 0 for g in spec["groups"]) == [0, 2]
    assert all("per-layer fallback" in g["note"] for g in spec["groups"]) and spec["parameters"] == 96
    assert spec["parameters_in_shared_groups"] == 0
    without = plan_sharing(Share(projections=["q_proj"], reduction=0.25, rank_multiple=1, per_layer_fallback=False),
                           record(linear_curve(8, 1.0, 2), [linear_curve(8, 0.01), linear_curve(8, 0.01)]))
    assert [g["layers"] for g in without["groups"]] == [[0, 1]]


def test_planner_refuses_an_unreachable_reduction():
    with pytest.raises(CompressorError, match=r"share.reduction: 0.9 is out of reach; .* at most 0.6"):
        plan_sharing(Share(projections=["q_proj"], reduction=0.9, rank_multiple=2),
                     record(linear_curve(8, 0.1, 2), [linear_curve(8, 1.0), linear_curve(8, 1.0)]))


def test_recipe_refuses_repeated_projections_and_a_bad_reduction():
    with pytest.raises(CompressorError, match="projections must not repeat"):
        parse_recipe({"share": {"projections": ["q_proj", "q_proj"]}})
    with pytest.raises(CompressorError, match="share.reduction: input should be less than 1"):
        parse_recipe({"share": {"reduction": 1.0}})
    with pytest.raises(CompressorError, match="unknown key 'share.rank'"):
        parse_recipe({"share": {"rank": 8}})


def test_edited_plan_sharing_a_removed_unit_is_refused(shared):
    from compressor.plan import validate_plan

    plan = read_json(shared.folder / "plan.json")
    group = next(g for g in plan["sharing"]["groups"] if g["rank"])
    kind = "attention" if group["projection"] in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    plan["layers"][group["layers"][0]][kind] = "remove"
    with pytest.raises(CompressorError, match=f"does not keep its {kind} unit"):
        validate_plan(plan)


# ---------------------------------------------------------------------------------------------
# The command line


SHARE_RECIPE = """\
name: tiny-shared
calibration: {text: embedded, samples: 2, seq_len: 32, seed: 0}
share: {projections: [q_proj, o_proj], reduction: REDUCTION, group_size: 3, rank_multiple: 8}
evaluate: {text: embedded, windows: 2, seq_len: 64, speed: {prompt_tokens: 16, new_tokens: 4, repeats: 1},
           compare_original: false}
"""


def test_analyze_and_plan_commands_print_the_groups(capsys, tmp_path, tiny_model_folder):
    from test_cli_errors import run_cli

    recipe = tmp_path / "shared.yaml"
    recipe.write_text(SHARE_RECIPE.replace("REDUCTION", "0.3"))
    code, _, err = run_cli(capsys, ["analyze", "--model", tiny_model_folder["llama"], "--recipe", recipe,
                                    "--out", tmp_path / "analysis", "--quiet"])
    assert code == 0, err
    code, stdout, err = run_cli(capsys, ["plan", "--recipe", recipe, "--analysis", tmp_path / "analysis" / "analysis.json",
                                         "--out", tmp_path / "plan.json"])
    assert code == 0, err
    plan = read_json(tmp_path / "plan.json")
    assert "plan: share q_proj, o_proj (activation fit, similarity groups)" in stdout
    assert stdout.count("expected error") == len(plan["sharing"]["groups"])
    assert plan["sharing"]["achieved_reduction"] >= 0.3


def test_unreachable_reduction_is_one_error_line_and_writes_nothing(capsys, tmp_path, tiny_model_folder):
    from test_cli_errors import assert_nothing_written, assert_one_error_line, run_cli

    recipe = tmp_path / "shared.yaml"
    recipe.write_text(SHARE_RECIPE.replace("REDUCTION", "0.95"))
    out = tmp_path / "artifact"
    code, _, err = run_cli(capsys, ["--recipe", recipe, "--model", tiny_model_folder["llama"], "--out", out, "--quiet"])
    assert code == 2
    assert "share.reduction: 0.95 is out of reach" in assert_one_error_line(err)
    assert_nothing_written(out)


def test_removal_from_a_shared_model_drops_the_layer_from_its_group(shared):
    from compressor.transforms.prune import remove_units

    plan = read_json(shared.folder / "plan.json")
    group = next(g for g in plan["sharing"]["groups"] if g["rank"] and len(g["layers"]) > 1)
    kind = "attention" if group["projection"] in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    layer = group["layers"][0]
    plan["layers"][layer][kind] = "remove"
    smaller = remove_units(shared.model, plan)
    entry = next(g for g in smaller.config.weight_sharing if g["basis"] == group["basis"])
    assert entry["layers"] == group["layers"][1:]
    before, after = shared.model.state_dict(), smaller.state_dict()
    assert not any(name.startswith(f"model.layers.{layer}.{'self_attn' if kind == 'attention' else 'mlp'}.")
                   for name in after)
    assert all(torch.equal(before[name], tensor) for name, tensor in after.items())
    assert torch.isfinite(logits(smaller)).all()


def test_analysis_reads_a_factored_projection_as_its_equivalent_matrix(shared):
    from compressor.analysis.collect import weight_statistics
    from compressor.modeling import projection_weight

    module = next(m for m in shared.model.modules() if isinstance(m, FactoredLinear))
    ids = torch.randn(3, module.in_features)
    with torch.no_grad():
        assert torch.allclose(module(ids), torch.nn.functional.linear(ids, projection_weight(module), module.bias),
                              atol=1e-5)
    stats = weight_statistics(shared.model)
    assert len(stats) == 6 and all(0 < entry["zd"] < 1 for entry in stats)
