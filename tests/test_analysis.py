"""The analysis metrics on tiny converted models, checked against hand computations.

The hand computations run on the transformers model (eager attention, its own hidden states and
unit outputs), so they do not share code with the instrumented pass they check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from compressor.analysis.collect import (MASSIVE_ABSOLUTE, MASSIVE_RELATIVE_TO_MEDIAN, analyze_layers,
                                         super_weight_candidates, weight_statistics)
from compressor.analysis.removal import greedy_removal_order, present_units, removal_sensitivity
from compressor.models.adapters import to_compressed
from conftest import build_tiny_hf_model

NUM_LAYERS = 6
DEAD_ATTENTION_LAYER = 3  # o_proj zeroed: the unit is a no-op
SUPER_LAYER, SUPER_ROW, SUPER_COLUMN, SUPER_VALUE = 2, 5, 7, 500.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def windows(samples: int = 6, seq_len: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (samples, seq_len), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hand_metrics(hf, ids: torch.Tensor) -> list[dict]:
    """Per-layer redundancies, block influence, sink share and layer outputs from the transformers
    model (eager attention), computed directly from the definitions."""
    hf.set_attn_implementation("eager")
    captured = {}
    hooks = []
    for i, layer in enumerate(hf.model.layers):
        hooks.append(layer.self_attn.register_forward_hook(
            lambda m, a, out, i=i: captured.__setitem__(("attn", i), out[0])))
        hooks.append(layer.mlp.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(("mlp", i), out)))
    try:
        out = hf(ids, output_attentions=True, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    result = []
    for i in range(len(hf.model.layers)):
        x = out.hidden_states[i].double()
        mid = x + captured[("attn", i)].double()
        y = mid + captured[("mlp", i)].double()
        probs = out.attentions[i].double()
        result.append({
            "attention": float(F.cosine_similarity(x, mid, dim=-1).mean()),
            "mlp": float(F.cosine_similarity(mid, y, dim=-1).mean()),
            "block_influence": 1.0 - float(F.cosine_similarity(x, y, dim=-1).mean()),
            "sink_share": float(probs[..., 1:, 0].mean()),
            "output": y,
        })
    return result


@pytest.fixture(scope="module")
def dead_unit_case():
    """A tiny Llama whose layer-3 attention writes nothing, with its analysis and hand metrics."""
    hf = build_tiny_hf_model("llama")
    with torch.no_grad():
        hf.model.layers[DEAD_ATTENTION_LAYER].self_attn.o_proj.weight.zero_()
    model = to_compressed(hf)
    ids = windows()
    return {"hf": hf, "model": model, "ids": ids, "layers": analyze_layers(model, ids, batch_size=4, quiet=True),
            "hand": hand_metrics(hf, ids)}


def test_zeroed_o_proj_gives_redundancy_one_and_zero_removal_cost(dead_unit_case):
    layers = dead_unit_case["layers"]
    assert [e["layer"] for e in layers] == list(range(NUM_LAYERS))
    assert abs(layers[DEAD_ATTENTION_LAYER]["attention"]["redundancy"] - 1.0) < 1e-6
    for e in layers:
        if e["layer"] != DEAD_ATTENTION_LAYER:
            assert e["attention"]["redundancy"] < 0.999, e
        assert e["mlp"]["redundancy"] < 0.999, e
    js = removal_sensitivity(dead_unit_case["model"], dead_unit_case["ids"], batch_size=4, quiet=True)
    assert set(js) == {(i, k) for i in range(NUM_LAYERS) for k in ("attention", "mlp")}
    assert abs(js[(DEAD_ATTENTION_LAYER, "attention")]) < 1e-9
    others = [v for unit, v in js.items() if unit != (DEAD_ATTENTION_LAYER, "attention")]
    assert min(others) > 1e-5
    # The search switched every unit back on.
    assert all(layer.attention_enabled and layer.mlp_enabled for layer in dead_unit_case["model"].model.layers)


def test_redundancy_block_influence_and_sink_share_match_hand_computation(dead_unit_case):
    for e, hand in zip(dead_unit_case["layers"], dead_unit_case["hand"]):
        assert e["attention"]["redundancy"] == pytest.approx(hand["attention"], abs=1e-5)
        assert e["mlp"]["redundancy"] == pytest.approx(hand["mlp"], abs=1e-5)
        assert e["block_influence"] == pytest.approx(hand["block_influence"], abs=1e-5)
        assert e["attention"]["sink_share"] == pytest.approx(hand["sink_share"], abs=1e-5)
        assert e["max_abs_activation"] == pytest.approx(float(hand["output"].abs().max()), rel=1e-5)


def test_block_influence_and_sink_share_are_in_range(dead_unit_case):
    for e in dead_unit_case["layers"]:
        assert 0.0 < e["block_influence"] < 2.0
        assert 0.0 <= e["attention"]["sink_share"] <= 1.0
    # The dead attention leaves the layer to its MLP alone: same cosine as the MLP unit's.
    dead = dead_unit_case["layers"][DEAD_ATTENTION_LAYER]
    assert dead["block_influence"] == pytest.approx(1.0 - dead["mlp"]["redundancy"], abs=1e-6)


def test_finercut_greedy_order_takes_the_no_op_unit_first(dead_unit_case):
    model, ids = dead_unit_case["model"], dead_unit_case["ids"]
    candidates = [(i, k) for i in range(1, NUM_LAYERS - 1) for k in ("attention", "mlp")]
    order = greedy_removal_order(model, ids, candidates, steps=3, criterion="finercut", batch_size=4, quiet=True)
    assert len(order) == 3
    assert (order[0]["layer"], order[0]["unit"]) == (DEAD_ATTENTION_LAYER, "attention")
    assert order[0]["js_divergence"] == order[0]["score"]
    assert abs(order[0]["score"]) < 1e-9
    # Later steps cost something, each at least as much as the step before (cumulative removals).
    assert 1e-5 < order[1]["score"] <= order[2]["score"]
    assert len({(s["layer"], s["unit"]) for s in order}) == 3
    # The second step is the cheapest single removal once the dead unit is gone; with the dead unit
    # a no-op, that equals the cheapest single removal among the remaining candidates.
    js = removal_sensitivity(model, ids, batch_size=4, quiet=True)
    rest = {u: v for u, v in js.items() if u in candidates and u != (DEAD_ATTENTION_LAYER, "attention")}
    cheapest = min(rest, key=rest.get)
    assert (order[1]["layer"], order[1]["unit"]) == cheapest
    assert order[1]["score"] == pytest.approx(rest[cheapest], rel=1e-4, abs=1e-9)
    assert all(layer.attention_enabled and layer.mlp_enabled for layer in model.model.layers)
    assert present_units(model) == [(i, k) for i in range(NUM_LAYERS) for k in ("attention", "mlp")]


@pytest.fixture(scope="module")
def super_weight_case():
    """A planted super weight: intermediate channel 7 of layer 2 spikes (its gate and up rows are
    scaled up) and down_proj[5, 7] = 500 turns the spike into a massive hidden-state channel 5."""
    hf = build_tiny_hf_model("llama")
    with torch.no_grad():
        mlp = hf.model.layers[SUPER_LAYER].mlp
        mlp.gate_proj.weight[SUPER_COLUMN] *= 12.0
        mlp.up_proj.weight[SUPER_COLUMN] *= 12.0
        mlp.down_proj.weight[SUPER_ROW, SUPER_COLUMN] = SUPER_VALUE
    model = to_compressed(hf)
    ids = windows(samples=6, seq_len=32, seed=1)
    return {"hf": hf, "model": model, "ids": ids, "layers": analyze_layers(model, ids, batch_size=4, quiet=True),
            "hand": hand_metrics(hf, ids)}


def hand_massive(output: torch.Tensor) -> tuple[int, set]:
    """Count and channels of |a| > 100 and > 1000 x the median |a| of each sample's hidden state."""
    count, channels = 0, set()
    for sample in output.abs().numpy():
        median = np.median(sample)
        hits = (sample > MASSIVE_ABSOLUTE) & (sample > MASSIVE_RELATIVE_TO_MEDIAN * median)
        count += int(hits.sum())
        channels |= set(np.nonzero(hits)[1].tolist())
    return count, channels


def test_planted_super_weight_is_reported(super_weight_case):
    layers, hand = super_weight_case["layers"], super_weight_case["hand"]
    # Before the planted layer nothing is massive.
    for e in layers[:SUPER_LAYER]:
        assert e["massive_activations"]["count"] == 0
        assert e["massive_activations"]["top"] == []
        assert e["max_abs_activation"] < MASSIVE_ABSOLUTE
    entry = layers[SUPER_LAYER]
    count, channels = hand_massive(hand[SUPER_LAYER]["output"])
    assert count > 0 and channels == {SUPER_ROW}
    massive = entry["massive_activations"]
    assert massive["count"] == count
    assert massive["top"] and all(r["channel"] == SUPER_ROW for r in massive["top"])
    assert massive["top"][0]["value"] == pytest.approx(float(hand[SUPER_LAYER]["output"].abs().max()), rel=1e-5)
    assert massive["top"][0]["times_median"] > MASSIVE_RELATIVE_TO_MEDIAN
    assert entry["top_channels"][0]["channel"] == SUPER_ROW
    down = entry["mlp"]["down_proj"]
    assert down["input_peak_channel"] == SUPER_COLUMN
    assert down["output_peak_channel"] == SUPER_ROW
    assert down["weight_at_peaks"] == [SUPER_ROW, SUPER_COLUMN]
    assert down["weight_value"] == SUPER_VALUE
    assert down["output_peak"] > MASSIVE_ABSOLUTE
    # The residual stream carries the spike on: later layers still see channel 5 as massive.
    for e in layers[SUPER_LAYER + 1:]:
        assert e["massive_activations"]["count"] > 0
        assert e["massive_activations"]["top"][0]["channel"] == SUPER_ROW

    candidates = super_weight_candidates(layers)
    assert len(candidates) == 1
    found = candidates[0]
    assert (found["layer"], found["row"], found["column"]) == (SUPER_LAYER, SUPER_ROW, SUPER_COLUMN)
    assert found["weight"] == SUPER_VALUE
    assert found["output_peak"] == down["output_peak"] and found["input_peak"] == down["input_peak"]


def test_no_super_weight_candidates_in_the_plain_model(dead_unit_case):
    assert super_weight_candidates(dead_unit_case["layers"]) == []
    assert all(e["massive_activations"]["count"] == 0 for e in dead_unit_case["layers"])


def hand_zd(mats: list[torch.Tensor]) -> float:
    flat = np.concatenate([m.detach().double().numpy().ravel() for m in mats])
    z = (flat - flat.mean()) / flat.std(ddof=1)
    return float((z > 1).mean())


def test_zd_matches_hand_computation():
    model = to_compressed(build_tiny_hf_model("llama"))
    stats = weight_statistics(model)
    assert len(stats) == NUM_LAYERS
    for layer, entry in zip(model.model.layers, stats):
        attn = [getattr(layer.self_attn, n).weight for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        mlp = [getattr(layer.mlp, n).weight for n in ("gate_proj", "up_proj", "down_proj")]
        n_attn = sum(m.numel() for m in attn)
        n_all = n_attn + sum(m.numel() for m in mlp)
        # float32 vs float64 z-scores may disagree on a weight or two sitting on z == 1.
        assert entry["attention"]["zd"] == pytest.approx(hand_zd(attn), abs=2.5 / n_attn)
        assert entry["mlp"]["zd"] == pytest.approx(hand_zd(mlp), abs=2.5 / n_all)
        assert entry["zd"] == pytest.approx(hand_zd(attn + mlp), abs=2.5 / n_all)
        # Normal weights: about 15.9 % above one standard deviation.
        assert 0.14 < entry["attention"]["zd"] < 0.18


def test_zd_exact_on_constructed_weights():
    """MLP weights all zero except k ones: mean k/N, every one has z > 1, every zero z < 0."""
    model = to_compressed(build_tiny_hf_model("llama"))
    mlp = model.model.layers[1].mlp
    k = 37
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(mlp, name).weight.zero_()
        mlp.up_proj.weight.view(-1)[:k] = 1.0
    n = sum(getattr(mlp, name).weight.numel() for name in ("gate_proj", "up_proj", "down_proj"))
    entry = weight_statistics(model)[1]["mlp"]
    assert entry["zd"] == pytest.approx(k / n, rel=1e-6)
    mean, std = k / n, np.sqrt(k * (n - k) / (n * (n - 1)))
    assert entry["weight_max_z"] == pytest.approx((1 - mean) / std, rel=1e-5)


MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from conftest import build_tiny_hf_model
    from compressor.analysis.collect import analyze_layers
    from compressor.models.adapters import to_compressed

    samples = int(sys.argv[1])
    model = to_compressed(build_tiny_hf_model("llama", hidden_size=512, intermediate_size=1024,
                                              num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4))
    ids = torch.randint(0, 512, (samples, 256), generator=torch.Generator().manual_seed(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    layers = analyze_layers(model, ids, batch_size=4, quiet=True)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({{"before_kb": before, "peak_kb": after, "layers": len(layers)}}))
""")


def test_analysis_memory_does_not_grow_with_sample_count(tmp_path):
    script = tmp_path / "measure.py"
    script.write_text(MEMORY_SCRIPT.format(tests=str(Path(__file__).parent)))
    # A fixed mmap threshold stops glibc from tuning it on the fly: large blocks are then mapped and
    # unmapped as they are allocated and freed, so the peak resident set tracks the live memory
    # (with the adaptive threshold the peak wanders by +-20 MiB from run to run).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    growth = {}
    for samples in (4, 32):
        done = subprocess.run([sys.executable, str(script), str(samples)], capture_output=True, text=True,
                              timeout=300, cwd=str(Path(__file__).parent.parent), env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["layers"] == 4
        growth[samples] = (result["peak_kb"] - result["before_kb"]) * 1024
    # Keeping even one hidden state per sample and layer would add 28 x 4 x 512 KiB = 56 MiB here.
    margin = max(0.15 * growth[4], 30 * 2**20)
    assert growth[32] <= growth[4] + margin, (growth[4] / 2**20, growth[32] / 2**20)
