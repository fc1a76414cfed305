"""The instrumented analysis pass: per-layer and per-unit metrics from hooks, in bounded memory.

For each decoder layer with input X, attention output X_a = X + Attn(LN(X)) and layer output
Y = X_a + MLP(LN(X_a)):
- attention / MLP redundancy: mean token cosine of a unit's input and output (LLM-Drop); near 1
  means the unit barely changes the residual stream.
- block influence (ShortGPT): 1 - mean cos(X, Y); LIM (Layer-wise Quantization): -mean cos(X, Y).
- ZD: share of a unit's weights whose z-score exceeds 1 (from the weights alone).
- activation outliers of Y: max |a|, massive activations (|a| > 100 and > 1000x the median |a| of
  that hidden state) with sample, position and channel, and per-channel peaks.
- down_proj spikes: the largest input and output activation and the weight joining them, the
  super-weight candidate.
- attention-sink share: attention mass that queries (after the first) put on the first token.
Only running sums and per-channel maxima are kept, so memory does not grow with the sample count.
"""

from __future__ import annotations

import heapq

import torch
import torch.nn.functional as F

from compressor.execution.layerwise import embedded_batches, rotary_and_mask
from compressor.execution.offload import placed
from compressor.modeling import projection_weight
from compressor.models.adapters import ATTENTION_LINEARS, MLP_LINEARS
from compressor.progress import progress
from compressor.recipe import DEFAULT_BATCH_SIZE

MASSIVE_ABSOLUTE = 100.0
MASSIVE_RELATIVE_TO_MEDIAN = 1000.0
TOP_RECORDS = 5


def z_share(weights: list[torch.Tensor]) -> tuple[float, float]:
    """ZD score (share of weights with z > 1) and the largest |z| over the given matrices."""
    flat = torch.cat([w.detach().float().flatten() for w in weights])
    z = (flat - flat.mean()) / flat.std()
    return float((z > 1).float().mean()), float(z.abs().max())


def layer_weight_statistics(layer) -> dict:
    """ZD and the largest weight z-score of each unit of one (placed) decoder layer, and the layer's ZD."""
    entry = {}
    parts = []
    for unit_name, unit, names in (("attention", layer.self_attn, ATTENTION_LINEARS), ("mlp", layer.mlp, MLP_LINEARS)):
        if unit is None:
            continue
        mats = [projection_weight(getattr(unit, n)) for n in names]
        parts += mats
        zd, max_z = z_share(mats)
        entry[unit_name] = {"zd": zd, "weight_max_z": max_z}
    if parts:
        entry["zd"] = z_share(parts)[0]
    return entry


def weight_statistics(model) -> list[dict]:
    stats = []
    for index in range(len(model.model.layers)):
        with placed(model, index) as layer:
            stats.append(layer_weight_statistics(layer))
    return stats


class _LayerAccumulator:
    def __init__(self, hidden: int):
        self.tokens = 0
        self.attention_cos = 0.0
        self.mlp_cos = 0.0
        self.layer_cos = 0.0
        self.max_abs = 0.0
        self.channel_peak = torch.zeros(hidden)  # on the CPU: peaks are collected there
        self.massive_count = 0
        self.massive_top: list = []  # min-heap of (value, sample, position, channel, ratio)
        self.sink_mass = 0.0
        self.sink_rows = 0
        self.down_in = (0.0, -1)  # largest down_proj input |x|: value, channel
        self.down_in_where = (-1, -1)  # sample, position
        self.down_out = (0.0, -1)  # largest down_proj output |y|: value, channel
        self.down_out_where = (-1, -1)
        self.down_pair = None  # the input channel peaking at the token of the output peak


def _cos_sum(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).sum())


@torch.no_grad()
def analyze_layers(model, windows: torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE, quiet: bool = False,
                   weight_stats: list | None = None) -> list[dict]:
    """Runs the instrumented pass over `windows` (samples, seq_len) and returns per-layer metrics,
    one decoder layer at a time over every batch. With `weight_stats`, each layer's
    layer_weight_statistics is appended to it while the layer is placed."""
    config = model.config
    layers = model.model.layers
    state = {"sample": 0, "inputs": {}, "mids": {}}
    hidden = embedded_batches(model, windows, batch_size)
    results = []
    for i in progress(range(len(layers)), "analysis pass", quiet):
        a = _LayerAccumulator(config.hidden_size)
        with placed(model, i) as layer:
            handles = _instrument(layer, i, a, state)
            try:
                out = hidden.empty_like()
                if len(hidden):
                    cos, sin, mask = rotary_and_mask(model, hidden[0].shape[1])
                for b, h in enumerate(hidden):
                    state["sample"] = b * batch_size
                    out.append(layer(h, cos, sin, mask, None))
            finally:
                for h in handles:
                    h.remove()
                if layer.self_attn is not None:
                    layer.self_attn.probability_observer = None
            results.append(_layer_entry(i, layer, a))
            if weight_stats is not None:
                weight_stats.append(layer_weight_statistics(layer))
        hidden = out
    return results


def _instrument(layer, index: int, a: _LayerAccumulator, state: dict) -> list:
    """The hooks of one layer's pass: they add to `a`."""

    def layer_pre_hook(module, args):
        state["inputs"][index] = args[0]

    def attention_hook(module, args, output):
        x = state["inputs"][index]
        mid = x + output
        state["mids"][index] = mid
        a.attention_cos += _cos_sum(x, mid)

    def mlp_hook(module, args, output):
        x = state["mids"].get(index, state["inputs"][index])  # no attention output: the layer input
        a.mlp_cos += _cos_sum(x, x + output)

    def down_hook(module, args, output):
        x, y = args[0].abs(), output.abs()
        for b in range(x.shape[0]):
            xv, xi = x[b].max(-1)  # per token: peak and channel
            yv, yi = y[b].max(-1)
            t_in = int(xv.argmax())
            if float(xv[t_in]) > a.down_in[0]:
                a.down_in = (float(xv[t_in]), int(xi[t_in]))
                a.down_in_where = (state["sample"] + b, t_in)
            t_out = int(yv.argmax())
            if float(yv[t_out]) > a.down_out[0]:
                a.down_out = (float(yv[t_out]), int(yi[t_out]))
                a.down_out_where = (state["sample"] + b, t_out)
                a.down_pair = int(xi[t_out])

    def layer_hook(module, args, output):
        x = state["inputs"][index]
        a.layer_cos += _cos_sum(x, output)
        a.tokens += output.shape[0] * output.shape[1]
        mag = output.detach().abs().float()
        a.max_abs = max(a.max_abs, float(mag.max()))
        a.channel_peak = torch.maximum(a.channel_peak, mag.amax(dim=(0, 1)).cpu())
        for b in range(mag.shape[0]):
            median = float(mag[b].median())
            hits = (mag[b] > MASSIVE_ABSOLUTE) & (mag[b] > MASSIVE_RELATIVE_TO_MEDIAN * median)
            count = int(hits.sum())
            if not count:
                continue
            a.massive_count += count
            positions, channels = hits.nonzero(as_tuple=True)
            values = mag[b][positions, channels]
            for v, p, c in zip(values.tolist(), positions.tolist(), channels.tolist()):
                record = (v, state["sample"] + b, p, c, v / max(median, 1e-12))
                if len(a.massive_top) < TOP_RECORDS:
                    heapq.heappush(a.massive_top, record)
                elif v > a.massive_top[0][0]:
                    heapq.heapreplace(a.massive_top, record)
        state["inputs"].pop(index, None)
        state["mids"].pop(index, None)

    def sink_observer(probs):
        if probs.shape[-2] > 1:
            # Queries after the first: the first query can only attend to itself.
            a.sink_mass += float(probs[..., 1:, 0].sum())
            a.sink_rows += probs[..., 1:, 0].numel()

    handles = [layer.register_forward_pre_hook(layer_pre_hook), layer.register_forward_hook(layer_hook)]
    if layer.self_attn is not None:
        handles.append(layer.self_attn.register_forward_hook(attention_hook))
        layer.self_attn.probability_observer = sink_observer
    if layer.mlp is not None:
        handles.append(layer.mlp.register_forward_hook(mlp_hook))
        handles.append(layer.mlp.down_proj.register_forward_hook(down_hook))
    return handles


def _layer_entry(i: int, layer, a: _LayerAccumulator) -> dict:
    """One layer's metrics from its accumulator (the layer placed: the down_proj weight is read)."""
    tokens = max(a.tokens, 1)
    entry = {"layer": i, "attention": None, "mlp": None}
    if layer.self_attn is not None:
        entry["attention"] = {"redundancy": a.attention_cos / tokens,
                              "sink_share": a.sink_mass / max(a.sink_rows, 1)}
    if layer.mlp is not None:
        weight = projection_weight(layer.mlp.down_proj)
        row, col = a.down_out[1], a.down_pair
        entry["mlp"] = {
            "redundancy": a.mlp_cos / tokens,
            "down_proj": {
                "input_peak": a.down_in[0], "input_peak_channel": a.down_in[1],
                "input_peak_at": list(a.down_in_where),
                "output_peak": a.down_out[0], "output_peak_channel": a.down_out[1],
                "output_peak_at": list(a.down_out_where),
                "weight_at_peaks": [row, col], "weight_value": float(weight[row, col]) if col is not None else None,
            },
        }
    cos_layer = a.layer_cos / tokens
    top_channels = torch.topk(a.channel_peak, k=min(TOP_RECORDS, a.channel_peak.numel()))
    entry.update({
        "block_influence": 1.0 - cos_layer,
        "max_abs_activation": a.max_abs,
        "massive_activations": {
            "count": a.massive_count,
            "top": [{"value": v, "sample": s, "position": p, "channel": c, "times_median": r}
                    for v, s, p, c, r in sorted(a.massive_top, reverse=True)],
        },
        "top_channels": [{"channel": int(c), "peak": float(v)} for v, c in zip(top_channels.values, top_channels.indices)],
    })
    return entry


def super_weight_candidates(layers: list[dict]) -> list[dict]:
    """Layers whose down_proj creates a new massive activation: its output peak is massive, makes up
    most of the layer's largest activation, and that activation is more than twice anything in the
    residual stream before the layer. The super weight sits at the crossing of the input and output
    spike channels (Yu et al., "The Super Weight in Large Language Models")."""
    found = []
    previous_max = 0.0
    for entry in layers:
        down = (entry.get("mlp") or {}).get("down_proj")
        layer_max = entry["max_abs_activation"]
        if (down and down["output_peak"] > MASSIVE_ABSOLUTE and down["output_peak"] > 0.5 * layer_max
                and layer_max > 2 * previous_max):
            row, col = down["weight_at_peaks"]
            found.append({"layer": entry["layer"], "row": row, "column": col, "weight": down["weight_value"],
                          "input_peak": down["input_peak"], "output_peak": down["output_peak"]})
        previous_max = max(previous_max, layer_max)
    return found
