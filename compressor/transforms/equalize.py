"""Activation-aware equalization (AWQ, "Activation-aware Weight Quantization"): per input channel
scales s folded exactly into the model before rounding, so that the channels that carry large
activations get more of each group's quantization range.

For linears W that read x (after an RMSNorm, an up projection or the value projection), the model
computes W x = (W diag(s)) (diag(s)^-1 x): the columns of W are multiplied by s and the op that
produces x divides its output channels by s. The float model is unchanged (up to rounding); only
what the quantizer sees changes. s = mean|x|^alpha (normalized to a geometric mean of 1), and
alpha is searched on a grid per group of linears: the alpha whose round-to-nearest quantization of
W diag(s) gives the smallest output error ||X W^T - (X diag(s)^-1) Q(W diag(s))^T|| on
calibration activations (alpha 0 is s = 1, so the search never picks a worse proxy than none).

Groups per decoder layer: input_layernorm -> q, k, v; post_attention_layernorm -> gate, up;
up -> down; v -> o (with grouped-query attention, the query heads that read one key/value head
share its scales). Layers on disk, and projections factored by weight sharing, are refused.
"""

from __future__ import annotations

import copy

import torch

from compressor.errors import CompressorError
from compressor.execution.layerwise import embedded_batches, run_block
from compressor.execution.offload import is_offloaded, placed
from compressor.progress import progress
from compressor.transforms.quantize import QuantFormat, rtn_quantize

GRID = 20


def _linear(module) -> torch.nn.Linear:
    if not isinstance(module, torch.nn.Linear):
        raise CompressorError("equalization: a projection is factored by weight sharing; equalize before sharing "
                              "or without it")
    return module


def groups_of(block) -> list[dict]:
    """The layer's equalization groups: name, the linears that read x, and how x's producer is scaled."""
    found = []
    attn, mlp = block.self_attn, block.mlp
    if attn is not None:
        found.append({"name": "attention_input", "readers": [attn.q_proj, attn.k_proj, attn.v_proj],
                      "producer": ("norm", block.input_layernorm), "tap": attn.q_proj})
        repeat = attn.num_heads // attn.num_kv_heads
        found.append({"name": "value_output", "readers": [attn.o_proj], "producer": ("rows", attn.v_proj),
                      "tap": attn.o_proj, "kv_groups": repeat, "head_dim": attn.head_dim})
    if mlp is not None:
        found.append({"name": "mlp_input", "readers": [mlp.gate_proj, mlp.up_proj],
                      "producer": ("norm", block.post_attention_layernorm), "tap": mlp.gate_proj})
        found.append({"name": "down_input", "readers": [mlp.down_proj], "producer": ("rows", mlp.up_proj),
                      "tap": mlp.down_proj})
    return found


def _channel_scales(mean_abs: torch.Tensor, alpha: float, group: dict) -> torch.Tensor:
    """s for x's channels: mean|x|^alpha, shared over the query heads of one kv head, geometric mean 1."""
    x = mean_abs.double().clamp(min=1e-8)
    if "kv_groups" in group and group["kv_groups"] > 1:
        d, g = group["head_dim"], group["kv_groups"]
        x = x.view(-1, g, d).mean(1, keepdim=True).expand(-1, g, d).reshape(-1)
    s = x ** alpha
    return (s / torch.exp(torch.log(s).mean())).float()


def _error(readers, inputs: torch.Tensor, s: torch.Tensor, fmt: QuantFormat) -> float:
    total = 0.0
    scaled = inputs / s
    for linear in readers:
        weight = linear.weight.float()
        quantized = rtn_quantize(weight * s, fmt).dequantize().float()
        total += float(((inputs @ weight.T - scaled @ quantized.T) ** 2).sum())
    return total


def _fold(group: dict, s: torch.Tensor) -> None:
    kind, producer = group["producer"]
    kept = s
    if kind == "rows" and "kv_groups" in group and group["kv_groups"] > 1:
        d, g = group["head_dim"], group["kv_groups"]
        kept = s.view(-1, g, d)[:, 0].reshape(-1)  # one scale per value channel
    with torch.no_grad():
        for linear in group["readers"]:
            linear.weight = torch.nn.Parameter(linear.weight * s.to(linear.weight.dtype), requires_grad=False)
        if kind == "norm":
            producer.weight = torch.nn.Parameter(producer.weight / kept.to(producer.weight.dtype), requires_grad=False)
        else:
            producer.weight = torch.nn.Parameter(producer.weight / kept.to(producer.weight.dtype)[:, None],
                                                 requires_grad=False)
            if producer.bias is not None:
                producer.bias = torch.nn.Parameter(producer.bias / kept.to(producer.bias.dtype), requires_grad=False)


def _statistics(model, block, hidden, groups: list[dict], tokens: int):
    """Per group, mean |x| over every calibration token and the first `tokens` rows of x; and the
    layer's output batches (the next layer's input)."""
    sums = {id(g["tap"]): None for g in groups}
    counts = {id(g["tap"]): 0 for g in groups}
    samples: dict[int, list[torch.Tensor]] = {id(g["tap"]): [] for g in groups}

    def hook(module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        key = id(module)
        total = x.abs().sum(0, dtype=torch.float64)
        sums[key] = total if sums[key] is None else sums[key] + total
        counts[key] += x.shape[0]
        held = sum(t.shape[0] for t in samples[key])
        if held < tokens:
            samples[key].append(x[: tokens - held].clone())

    handles = [g["tap"].register_forward_pre_hook(hook) for g in groups]
    try:
        out = run_block(model, block, hidden)
    finally:
        for handle in handles:
            handle.remove()
    means = [(sums[id(g["tap"])] / counts[id(g["tap"])]).float() for g in groups]
    return means, [torch.cat(samples[id(g["tap"])]) if samples[id(g["tap"])] else None for g in groups], out


def _each_layer(model, calibration: torch.Tensor, batch_size: int, what: str, quiet: bool, visit) -> None:
    """visit(layer, block, groups, hidden) -> the next layer's input, for each placed decoder layer."""
    if is_offloaded(model):
        raise CompressorError("equalization runs on models held in memory (weights: memory)")
    hidden = embedded_batches(model, calibration, batch_size)
    for layer in progress(range(len(model.model.layers)), what, quiet):
        with placed(model, layer) as block:
            groups = groups_of(block)
            for group in groups:
                for linear in group["readers"]:
                    _linear(linear)
            hidden = visit(layer, block, groups, hidden)


@torch.no_grad()
def search_alphas(model, calibration: torch.Tensor, fmt: QuantFormat, batch_size: int, tokens: int = 2048,
                  grid: int = GRID, quiet: bool = False) -> list[dict]:
    """The alpha of every group (searched as the module docstring says) with the proxy errors at
    alpha 0 and at the chosen alpha. The model is not changed: each layer's folds are tried on a
    copy of it, group after group in fold order."""
    records = []

    def visit(layer, block, groups, hidden):
        means, samples, out = _statistics(model, block, hidden, groups, tokens)
        trial = copy.deepcopy(block)
        for group, trial_group, mean_abs, inputs in zip(groups, groups_of(trial), means, samples):
            base = _error(trial_group["readers"], inputs, torch.ones_like(mean_abs), fmt)
            best = (base, 0.0, None)
            for k in range(1, grid):
                s = _channel_scales(mean_abs, k / grid, group)
                error = _error(trial_group["readers"], inputs, s, fmt)
                if error < best[0]:
                    best = (error, k / grid, s)
            if best[2] is not None:
                _fold(trial_group, best[2])
            records.append({"layer": layer, "group": group["name"], "alpha": best[1], "error": best[0],
                            "error_unscaled": base})
        return out

    _each_layer(model, calibration, batch_size, "equalization search", quiet, visit)
    return records


@torch.no_grad()
def fold_alphas(model, calibration: torch.Tensor, alphas: list[dict], batch_size: int, quiet: bool = False) -> int:
    """Folds the scales of the planned alphas (search_alphas' records: layer, group, alpha) into the
    model in place, from the same calibration statistics; returns the number of groups scaled."""
    wanted = {(a["layer"], a["group"]): a["alpha"] for a in alphas}
    folded = 0

    def visit(layer, block, groups, hidden):
        nonlocal folded
        means, _, out = _statistics(model, block, hidden, groups, 0)
        for group, mean_abs in zip(groups, means):
            alpha = wanted.get((layer, group["name"]), 0.0)
            if alpha > 0:
                _fold(group, _channel_scales(mean_abs, alpha, group))
                folded += 1
        return out

    _each_layer(model, calibration, batch_size, "equalization", quiet, visit)
    return folded
