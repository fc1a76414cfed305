"""Tensor-level checks of mixed-bit quantization, with numbers.

- The compressed-tensors `pack-quantized` layout round-trips exactly (codes, scales, zero points,
  exact-weight corrections) for every width x group size x symmetry, and `stored_bytes` /
  `exact_bytes` predict the packed tensors' bytes exactly.
- Round-to-nearest: codes in range, float16 scales, error at most half a scale step.
- GPTQ beats round-to-nearest on a real layer of the embedded model (layer 2, q_proj and
  down_proj), measured as the in-sample output error trace((W - Q) H (W - Q)^T).
- Weights kept exactly (`keep_exact`) come back bit for bit and do not inflate their group's scale.
- The multiple-choice knapsack solver equals brute force.
- `quantization_config` / `formats_from_config` round-trip a mix of formats.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from compressor.bit_allocation import solve_knapsack
from compressor.errors import CompressorError
from compressor.transforms.quantize import (
    QuantFormat, QuantizedWeight, code_range, exact_bytes, gptq_quantize, group_parameters, quantize_with, rtn_quantize,
    stored_bytes)
from exporters.quantized_layout import formats_from_config, pack_weight, quantization_config, unpack_weight

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128, None)
FORMATS = [QuantFormat(b, g, s) for b, g, s in itertools.product(BITS, GROUP_SIZES, (True, False))]
# in_features a multiple of 128; out_features not a multiple of 32 (zero points pack along it);
# in_features not a multiple of every group size (round-to-nearest pads the last group).
SHAPES = [(96, 256), (40, 256), (40, 96)]


def fmt_id(fmt: QuantFormat) -> str:
    return fmt.label()


def random_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """Rows of different magnitudes, one all-zero row and one all-positive row (edge cases of the
    min-max statistics: the smallest scale, and an asymmetric zero point at the code limit)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g) * torch.rand(out_features, 1, generator=g) * 0.2
    weight[1] = 0.0
    weight[2] = weight[2].abs()
    return weight


def assert_same_quantized(a: QuantizedWeight, b: QuantizedWeight) -> None:
    assert torch.equal(a.codes, b.codes)
    assert a.scale.dtype == b.scale.dtype and torch.equal(a.scale, b.scale)
    if a.zero_point is None:
        assert b.zero_point is None
    else:
        assert torch.equal(a.zero_point.to(torch.int8), b.zero_point.to(torch.int8))
    assert torch.equal(a.dequantize(), b.dequantize())


# ---------------------------------------------------------------------------------------------
# Packing: exact round trip and exact byte counts


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_id)
def test_pack_unpack_round_trip_is_exact(shape, fmt):
    quantized = rtn_quantize(random_weight(*shape), fmt)
    tensors = pack_weight("model.layers.0.mlp.down_proj", quantized)
    assert tensors["model.layers.0.mlp.down_proj.weight_packed"].dtype == torch.int32
    assert tensors["model.layers.0.mlp.down_proj.weight_shape"].tolist() == list(shape)
    assert ("model.layers.0.mlp.down_proj.weight_zero_point" in tensors) == (not fmt.symmetric)
    assert "model.layers.0.mlp.down_proj.exact_index" not in tensors

    back = unpack_weight("model.layers.0.mlp.down_proj", tensors, fmt)
    assert back.codes.shape == quantized.codes.shape
    assert_same_quantized(back, quantized)


@pytest.mark.parametrize("fmt", [QuantFormat(2, 32, True), QuantFormat(3, 64, False), QuantFormat(8, None, True)],
                         ids=fmt_id)
def test_pack_unpack_round_trip_keeps_exact_weights(fmt):
    weight = random_weight(40, 256)
    mask = torch.zeros_like(weight, dtype=torch.bool)
    mask[3, 5] = mask[39, 255] = True
    weight[3, 5] = 50 * weight.abs().max()
    quantized = rtn_quantize(weight, fmt, keep_exact=mask)
    tensors = pack_weight("w", quantized)
    assert tensors["w.exact_index"].dtype == torch.int64 and tensors["w.exact_index"].tolist() == [3 * 256 + 5, 39 * 256 + 255]
    assert tensors["w.exact_value"].dtype == torch.float32
    back = unpack_weight("w", tensors, fmt)
    assert_same_quantized(back, quantized)
    assert torch.equal(back.dequantize()[mask], weight[mask])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_id)
def test_stored_bytes_equal_packed_tensor_bytes(shape, fmt):
    weight = random_weight(*shape)
    tensors = pack_weight("w", rtn_quantize(weight, fmt))
    assert stored_bytes(*shape, fmt) == sum(t.numel() * t.element_size() for t in tensors.values())

    mask = torch.zeros_like(weight, dtype=torch.bool)
    mask[0, 0] = mask[5, 7] = mask[-1, -1] = True
    with_exact = pack_weight("w", rtn_quantize(weight, fmt, keep_exact=mask))
    assert stored_bytes(*shape, fmt) + exact_bytes(3) == \
        sum(t.numel() * t.element_size() for t in with_exact.values())


# ---------------------------------------------------------------------------------------------
# Round-to-nearest


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_id)
def test_rtn_codes_in_range_scales_float16_and_error_within_half_a_step(shape, fmt):
    weight = random_weight(*shape)
    quantized = rtn_quantize(weight, fmt)
    qmin, qmax = code_range(fmt.bits)
    assert (qmin, qmax) == (-(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1)
    groups = fmt.groups(shape[1])

    assert quantized.codes.dtype == torch.int8 and quantized.codes.shape == shape
    assert int(quantized.codes.min()) >= qmin and int(quantized.codes.max()) <= qmax
    assert quantized.scale.dtype == torch.float16 and quantized.scale.shape == (shape[0], groups)
    assert bool((quantized.scale != 0).all())
    if not fmt.symmetric:
        assert bool((quantized.scale > 0).all())
    if fmt.symmetric:
        assert quantized.zero_point is None
    else:
        zero = quantized.zero_point
        assert zero.dtype == torch.int8 and zero.shape == (shape[0], groups)
        assert int(zero.min()) >= qmin and int(zero.max()) <= qmax

    width = fmt.width(shape[1])
    scale = quantized.scale.float().abs().repeat_interleave(width, dim=1)[:, :shape[1]]
    error = (weight - quantized.dequantize()).abs()
    inside = (quantized.codes > qmin) & (quantized.codes < qmax)
    assert bool(inside.any())
    assert bool((error[inside] <= scale[inside] / 2 * (1 + 1e-6) + 1e-7).all()), \
        float((error - scale / 2)[inside].max())
    if fmt.symmetric:
        # The group's largest-magnitude weight sits on the most negative code: exact but for the
        # float16 rounding of the scale (relative 2^-11 over 2^(b-1) steps). A weight of the other
        # sign can reach one code past the largest positive one, so it is at most one step away.
        slack = 1.0 + -qmin * 2.0 ** -11
        assert bool((error <= slack * scale * (1 + 1e-6) + 1e-7).all())
        magnitude = weight.abs().view(shape[0], -1, width) if shape[1] % width == 0 else None
        if magnitude is not None:
            top2 = magnitude.topk(2, dim=-1)
            # Leave out tied extremes, and groups so small that the scale sits at its floor (2^-14).
            unique = ((top2.values[..., 0] - top2.values[..., 1]) > 1e-6) & \
                (quantized.scale.float().abs() > 2.0 ** -14 * 1.001)
            largest_error = error.view(shape[0], -1, width).gather(-1, top2.indices[..., :1]).squeeze(-1)
            bound = -qmin * 2.0 ** -11 * quantized.scale.float().abs() * (1 + 1e-3) + 1e-9
            assert bool(unique.any()) and bool((largest_error <= bound)[unique].all())
    # The all-zero row is exactly zero.
    assert bool((quantized.dequantize()[1] == 0).all())


# ---------------------------------------------------------------------------------------------
# GPTQ on a real layer of the embedded model


@pytest.fixture(scope="module")
def layer2_hessians(one_torch_thread):
    """Weights and input Hessians (X^T X / n) of layer 2's q_proj and down_proj, from 8 calibration
    windows of 256 tokens run through layers 0 and 1."""
    from compressor.data import calibration_windows
    from compressor.sources import load_model
    from compressor.transforms.quantize_model import accumulate_hessians, embedded_inputs, run_layer

    loaded = load_model("embedded", quiet=True)
    model = loaded.model
    ids = calibration_windows(loaded.tokenizer, "embedded", 8, 256, 0).input_ids
    hidden = embedded_inputs(model, ids, 4)
    for layer in (0, 1):
        hidden = run_layer(model, layer, hidden)
    names = ["model.layers.2.self_attn.q_proj", "model.layers.2.mlp.down_proj"]
    hessians = accumulate_hessians(model, 2, hidden, names)
    weights = {name: model.get_submodule(name).weight.data.clone() for name in names}
    return weights, hessians


def output_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    delta = (weight - dequantized).double()
    return float(torch.trace(delta @ hessian.double() @ delta.T))


@pytest.mark.integration
@pytest.mark.parametrize("bits", (3, 4))
@pytest.mark.parametrize("name", ("model.layers.2.self_attn.q_proj", "model.layers.2.mlp.down_proj"))
def test_gptq_beats_rtn_on_layer_output_error(layer2_hessians, name, bits):
    weights, hessians = layer2_hessians
    weight, hessian = weights[name], hessians[name]
    assert hessian.shape == (weight.shape[1], weight.shape[1])
    fmt = QuantFormat(bits, 64, True)
    before = weight.clone()

    rtn = output_error(weight, rtn_quantize(weight, fmt).dequantize(), hessian)
    gptq = gptq_quantize(weight, hessian, fmt)
    ordered = gptq_quantize(weight, hessian, fmt, act_order=True)
    assert torch.equal(weight, before)  # the input weight is not modified
    qmin, qmax = code_range(bits)
    for result in (gptq, ordered):
        assert result.scale.dtype == torch.float16 and result.scale.shape == (weight.shape[0], weight.shape[1] // 64)
        assert int(result.codes.min()) >= qmin and int(result.codes.max()) <= qmax

    gptq_error = output_error(weight, gptq.dequantize(), hessian)
    ordered_error = output_error(weight, ordered.dequantize(), hessian)
    assert rtn > 0
    assert gptq_error < 0.8 * rtn, (gptq_error, rtn)
    assert ordered_error < 0.8 * rtn, (ordered_error, rtn)


@pytest.mark.parametrize("fmt", [QuantFormat(3, 64, True), QuantFormat(4, 64, True), QuantFormat(4, 64, True, True),
                                 QuantFormat(4, 32, False)], ids=fmt_id)
def test_clip_search_never_rounds_a_group_worse_than_minmax_and_follows_importance(fmt):
    g = torch.Generator().manual_seed(fmt.bits)
    groups = torch.randn(200, fmt.group_size, generator=g) ** 3  # heavy tails: shrinking the range pays
    importance = torch.rand(fmt.group_size, generator=g) + 0.01
    importance[:4] = 100.0

    def errors(scale, zero):
        _, dequantized = quantize_with(groups, scale, zero, fmt.bits)
        return ((groups - dequantized) ** 2 * importance).sum(-1)

    minmax = errors(*group_parameters(groups, fmt))
    scale, zero = group_parameters(groups, fmt, clip="search", importance=importance)
    searched = errors(scale, zero)
    assert scale.dtype == torch.float16 and bool((searched <= minmax).all())
    assert float(searched.sum()) < 0.9 * float(minmax.sum())
    # The heavily weighted columns are rounded at least as well as with equal importance.
    plain = group_parameters(groups, fmt, clip="search")
    heavy = lambda p: float(((groups - quantize_with(groups, *p, fmt.bits)[1])[:, :4] ** 2).sum())  # noqa: E731
    assert heavy((scale, zero)) <= heavy(plain)
    with pytest.raises(ValueError, match="clip must be 'minmax' or 'search'"):
        group_parameters(groups, fmt, clip="mse")


@pytest.mark.integration
@pytest.mark.parametrize("bits", (3, 4))
def test_gptq_with_clip_search_lowers_layer_output_error(layer2_hessians, bits):
    """Summed over q_proj and down_proj, with act_order (the default). On the embedded model the
    search lowers each linear's output error by about 10 % at 3 bits and 0-6 % at 4 bits."""
    weights, hessians = layer2_hessians
    fmt = QuantFormat(bits, 64, True)
    minmax = searched = 0.0
    for name, weight in weights.items():
        minmax += output_error(weight, gptq_quantize(weight, hessians[name], fmt, act_order=True).dequantize(),
                               hessians[name])
        searched += output_error(weight, gptq_quantize(weight, hessians[name], fmt, act_order=True,
                                                       clip="search").dequantize(), hessians[name])
    assert searched < minmax, (searched, minmax)


# ---------------------------------------------------------------------------------------------
# Weights kept exactly


def random_hessian(in_features: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * in_features, in_features, generator=g) * (torch.rand(in_features, generator=g) + 0.1)
    return x.T @ x / x.shape[0]


@pytest.mark.parametrize("symmetric", (True, False), ids=("sym", "asym"))
@pytest.mark.parametrize("method", ("rtn", "gptq", "gptq-act-order"))
def test_keep_exact_restores_weights_and_leaves_group_scale_alone(method, symmetric):
    fmt = QuantFormat(4, 64, symmetric)
    weight = random_weight(64, 256, seed=3)
    outlier, plain = (5, 70), (20, 3)
    weight[outlier] = 50 * weight.abs().max()
    mask = torch.zeros_like(weight, dtype=torch.bool)
    mask[outlier] = mask[plain] = True
    zeroed = weight.clone()
    zeroed[outlier] = 0.0
    hessian = random_hessian(256)

    def run(w, keep_exact):
        if method == "rtn":
            return rtn_quantize(w, fmt, keep_exact=keep_exact)
        return gptq_quantize(w, hessian, fmt, act_order=method == "gptq-act-order", keep_exact=keep_exact)

    kept = run(weight, mask)
    deq = kept.dequantize()
    assert deq[outlier].item() == weight[outlier].item()
    assert deq[plain].item() == weight[plain].item()
    assert torch.equal(deq[mask], weight[mask])
    assert kept.exact_index.tolist() == [5 * 256 + 70, 20 * 256 + 3]
    assert kept.exact_value.dtype == torch.float32

    # The outlier's group gets the scale it would have with the outlier zeroed.
    group = outlier[1] // 64
    if method == "rtn":
        reference = rtn_quantize(zeroed, fmt)  # no mask: plain min-max statistics without the outlier
    else:
        reference = run(zeroed, mask)
    assert kept.scale[outlier[0], group].item() == reference.scale[outlier[0], group].item()
    # Other groups of the outlier's row may differ by one float16 step under GPTQ: the error fed
    # forward from the kept weight is (updated - exact), computed beside 50x larger values.
    assert torch.allclose(kept.scale.float(), reference.scale.float(), rtol=2e-3, atol=0)
    assert (kept.scale != reference.scale).sum() <= 1
    # ... while without the mask the outlier would blow that scale up.
    unmasked = rtn_quantize(weight, fmt)
    assert abs(unmasked.scale[outlier[0], group].item()) > 10 * abs(kept.scale[outlier[0], group].item())


# ---------------------------------------------------------------------------------------------
# Knapsack


def brute_force(items, capacity):
    best = None
    for choice in itertools.product(*[range(len(options)) for options in items]):
        size = sum(items[i][c][0] for i, c in enumerate(choice))
        if size > capacity:
            continue
        cost = sum(items[i][c][1] for i, c in enumerate(choice))
        if best is None or (cost, size) < (best[1], best[0]):
            best = (size, cost)
    return best


def random_case(rng: random.Random, integer_costs: bool):
    items = []
    for _ in range(rng.randint(3, 5)):
        items.append([(rng.randint(1, 30), float(rng.randint(0, 6)) if integer_costs else rng.uniform(0.0, 10.0))
                      for _ in range(rng.randint(2, 4))])
    smallest = sum(min(s for s, _ in options) for options in items)
    largest = sum(max(s for s, _ in options) for options in items)
    capacity = rng.randint(max(0, smallest - 10), largest + 5)
    return items, capacity


@pytest.mark.parametrize("integer_costs", (False, True), ids=("float-costs", "tied-costs"))
def test_solve_knapsack_equals_brute_force(integer_costs):
    rng = random.Random(1234 + integer_costs)
    infeasible = feasible = 0
    for _ in range(40):
        items, capacity = random_case(rng, integer_costs)
        expected = brute_force(items, capacity)
        solution = solve_knapsack(items, capacity)
        if expected is None:
            assert solution is None, (items, capacity)
            infeasible += 1
            continue
        feasible += 1
        choices, total, cost = solution
        assert len(choices) == len(items)
        assert all(0 <= c < len(options) for c, options in zip(choices, items))
        chosen_bytes = sum(items[i][c][0] for i, c in enumerate(choices))
        chosen_cost = sum(items[i][c][1] for i, c in enumerate(choices))
        assert chosen_bytes == total <= capacity
        assert abs(chosen_cost - cost) <= 1e-12
        assert abs(cost - expected[1]) <= 1e-12, (items, capacity, solution, expected)
        if integer_costs:  # ties in cost go to the smaller total
            assert total == expected[0], (items, capacity, solution, expected)
    assert infeasible >= 3 and feasible >= 30


def test_solve_knapsack_edge_cases():
    assert solve_knapsack([[(1, 1.0), (2, 1.0)]], 5) == ([0], 1, 1.0)  # a tie goes to the smaller total
    assert solve_knapsack([[(3, 0.0)], [(4, 0.0)]], 6) is None
    assert solve_knapsack([[(3, 2.0), (1, 5.0)], [(4, 1.0), (2, 3.0)]], 6) == ([0, 1], 5, 5.0)
    assert solve_knapsack([[(3, 2.0), (1, 5.0)], [(4, 1.0), (2, 3.0)]], 100) == ([0, 0], 7, 3.0)


# ---------------------------------------------------------------------------------------------
# quantization_config


def test_quantization_config_round_trips_mixed_formats():
    import compressed_tensors

    formats = {
        "model.layers.0.self_attn.q_proj": QuantFormat(2, 32, True),
        "model.layers.0.self_attn.k_proj": QuantFormat(2, 32, True),
        "model.layers.10.mlp.down_proj": QuantFormat(4, 64, False),
        "model.layers.2.mlp.down_proj": QuantFormat(4, 64, True),
        "model.layers.2.mlp.up_proj": QuantFormat(3, 128, True),
        "model.layers.1.mlp.gate_proj": QuantFormat(8, None, True),
        "model.embed_tokens": QuantFormat(8, 64, True),
    }
    config = quantization_config(formats, ["lm_head"])
    assert config["format"] == "pack-quantized"
    assert config["quantization_status"] == "compressed"
    assert config["ignore"] == ["lm_head"]
    assert config["version"] == compressed_tensors.__version__
    groups = config["config_groups"]
    assert len(groups) == len(set(formats.values())) == 6
    assert all(group["format"] == "pack-quantized" for group in groups.values())
    assert sorted(t for group in groups.values() for t in group["targets"]) == sorted(formats)
    channel = next(g for g in groups.values() if g["weights"]["num_bits"] == 8 and g["weights"]["group_size"] is None)
    assert channel["weights"]["strategy"] == "channel"
    assert formats_from_config(config) == formats

    regex = {"config_groups": {"g": {"targets": ["re:.*proj"], "weights": channel["weights"]}}}
    with pytest.raises(CompressorError, match="only exact module names"):
        formats_from_config(regex)
