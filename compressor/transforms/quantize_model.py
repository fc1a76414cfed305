"""Applies a plan's bit widths to a compressed model: round-to-nearest, or GPTQ layer by layer.

GPTQ runs the calibration windows through the decoder one layer at a time: each layer receives the
outputs of the already-quantized layers before it, its linears' input Hessians are summed with
hooks, its linears are quantized, and the layer is run again to give the next layer its inputs.
Only one layer's activations and Hessians are held at a time.

The model's weights are replaced by their dequantized values (so the in-memory model is exactly
the stored one); the codes are returned for the exporter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.execution.layerwise import embedded_batches, placement_of, rotary_and_mask, run_block, run_layer  # noqa: F401 (run_layer: re-exported)
from compressor.execution.offload import offload_of, placed
from compressor.modeling import FactoredLinear
from compressor.models.adapters import ATTENTION_LINEARS, MLP_LINEARS
from compressor.progress import progress
from compressor.recipe import CALIBRATED_METHODS, DEFAULT_BATCH_SIZE, QUANT_METHODS, Quantize, SignRound, default
from compressor.transforms.gram import GramAccumulator
from compressor.transforms.quantize import QuantFormat, QuantizedWeight, gptq_quantize, rtn_quantize
from compressor.transforms.signround import refine_layer

# GPTQ quantizes a layer's linears in this order, measuring each step's inputs with the earlier
# steps already quantized ("true sequential"): o_proj sees the attention output of quantized
# q/k/v, down_proj the activations of quantized gate/up.
SEQUENTIAL_STEPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
EMBEDDING = "model.embed_tokens"


def layer_linears(model, layer: int) -> list[tuple[str, torch.nn.Linear]]:
    """(module name, module) of the linears present in a decoder layer, attention first.

    A projection factored by weight sharing contributes its leaf linears: the shared basis (listed
    with the first layer of its group, which quantizes it), the layer's coefficients, and any
    low-rank residual."""
    block = model.model.layers[layer]
    found = []
    for unit_name, unit, names in (("self_attn", block.self_attn, ATTENTION_LINEARS), ("mlp", block.mlp, MLP_LINEARS)):
        if unit is None:
            continue
        for short in names:
            module, name = getattr(unit, short), f"model.layers.{layer}.{unit_name}.{short}"
            if not isinstance(module, FactoredLinear):
                found.append((name, module))
                continue
            group = model.config.sharing_group(layer, short)
            if group["layers"][0] == layer:
                found.append((f"model.shared_bases.{module.basis_key}", module.basis))
            found.append((f"{name}.coefficients", module.coefficients))
            if module.residual_down is not None:
                found += [(f"{name}.residual_down", module.residual_down), (f"{name}.residual_up", module.residual_up)]
    return found


def projection_of(name: str) -> str:
    """The projection a linear belongs to: `q_proj` for q_proj itself, its coefficients, residual or
    shared basis (`model.shared_bases.q_proj_g0`)."""
    parts = name.split(".")
    if parts[1] == "shared_bases":
        return parts[2].rsplit("_g", 1)[0]
    return parts[4]


def unit_of_linear(name: str) -> str:
    return "attention" if projection_of(name) in ATTENTION_LINEARS else "mlp"


def reads_factor_output(name: str) -> bool:
    """Coefficients and residual up-projections read another factor's output, so GPTQ quantizes
    them after that factor (and sees its quantization error)."""
    return name.endswith((".coefficients", ".residual_up"))


def set_weight(module: torch.nn.Module, quantized: QuantizedWeight) -> None:
    """A new parameter, never a copy into the old one: the old tensor may be shared with the
    source model (removal builds the compressed model on the source's tensors)."""
    module.weight = torch.nn.Parameter(quantized.dequantize().to(module.weight.dtype), requires_grad=False)


def quantize_embedding(model, fmt: QuantFormat, clip: str = default(Quantize, "clip")) -> QuantizedWeight:
    """Round-to-nearest, groups along the hidden dimension (a row is one token's vector). An embedding
    kept in a narrower stored precision (an offloaded bfloat16 source) is widened to the compute one
    first, so its dequantized values are what a fully loaded model holds."""
    embedding = model.model.embed_tokens
    dtype = placement_of(model)[1]
    if embedding.weight.dtype != dtype:
        embedding.weight = torch.nn.Parameter(embedding.weight.to(dtype), requires_grad=False)
    quantized = rtn_quantize(embedding.weight.data, fmt, clip=clip)
    set_weight(model.model.embed_tokens, quantized)
    return quantized


@torch.no_grad()
def accumulate_hessians(model, layer: int, hidden: list[torch.Tensor], wanted: list[str],
                        token_weighting: str = default(Quantize, "hessian_tokens")) -> dict[str, torch.Tensor]:
    """X^T X / n of the inputs of each wanted linear of `layer`, with `hidden` the layer's input
    batches (a shared basis sees this layer's input only).

    `equal` scales every token's input to unit norm first. Plain X^T X (`raw`) is dominated by the
    few tokens carrying massive activations (attention sinks, delimiters: norms hundreds of times
    the median), and GPTQ then fits those few tokens at the expense of all others; on the
    embedded model that made GPTQ worse than round-to-nearest."""
    block = model.model.layers[layer]
    modules = dict(layer_linears(model, layer))
    gram = GramAccumulator(torch.float32, token_weighting)
    hooks = [modules[name].register_forward_pre_hook(gram.pre_hook(name)) for name in wanted]
    try:
        cos, sin, mask = rotary_and_mask(model, hidden[0].shape[1])
        for h in hidden:
            block(h, cos, sin, mask, None)
    finally:
        for handle in hooks:
            handle.remove()
    return {name: gram.mean(name) for name in wanted}


@torch.no_grad()
def embedded_inputs(model, ids: torch.Tensor, batch_size: int):
    """The first layer's input batches (a HiddenStates)."""
    return embedded_batches(model, ids, batch_size)


@dataclass(frozen=True)
class StoredCodes:
    """A QuantizedWeight whose tensors wait in an offloaded model's spill folder (a layer-by-layer
    run keeps no layer's codes in memory): the exporter reads them one weight at a time."""

    fmt: QuantFormat
    tensors: dict  # field of QuantizedWeight -> StoredTensor

    @property
    def exact_count(self) -> int:
        stored = self.tensors.get("exact_index")
        return 0 if stored is None else stored.numel()

    def load(self) -> QuantizedWeight:
        fields = {field: stored.load() for field, stored in self.tensors.items()}
        return QuantizedWeight(fields["codes"], fields["scale"], fields.get("zero_point"), self.fmt,
                               fields.get("exact_index"), fields.get("exact_value"))


def spill_codes(model, results: dict[str, QuantizedWeight]) -> dict[str, StoredCodes]:
    """An offloaded model's new codes written to its spill folder (and its quantized weights read from
    them from now on); a resident model's kept as they are."""
    offload = offload_of(model)
    if offload is None:
        return results
    tensors = {}
    for name, weight in results.items():
        for field in ("codes", "scale", "zero_point", "exact_index", "exact_value"):
            value = getattr(weight, field)
            if value is not None:
                tensors[f"codes:{name}:{field}"] = value
    offload.replace(tensors)
    stored = {name: StoredCodes(weight.fmt, {field: offload.stored[f"codes:{name}:{field}"]
                                             for field in ("codes", "scale", "zero_point", "exact_index", "exact_value")
                                             if getattr(weight, field) is not None})
              for name, weight in results.items()}
    # Later placements of the layer dequantize these codes (the same values set_weight gave it),
    # so no float copy of a quantized weight is written.
    offload.derived.update({f"{name}.weight": codes for name, codes in stored.items()})
    return stored


def quantize_layer_linears(model, layer: int, formats: dict[str, QuantFormat], method: str,
                           hessians: dict[str, torch.Tensor] | None, keep_exact: dict[str, torch.Tensor],
                           damp: float, act_order: bool, clip: str = default(Quantize, "clip")) -> dict[str, QuantizedWeight]:
    """Quantizes the linears of one layer named in `formats` and writes them into the model."""
    results = {}
    for name, module in layer_linears(model, layer):
        fmt = formats.get(name)
        if fmt is None:
            continue
        mask = keep_exact.get(name)
        if method == "gptq":
            results[name] = gptq_quantize(module.weight.data, hessians[name], fmt, damp=damp, act_order=act_order,
                                          keep_exact=mask, clip=clip)
        else:
            results[name] = rtn_quantize(module.weight.data, fmt, keep_exact=mask, clip=clip)
        set_weight(module, results[name])
    return results


def sequential_steps(wanted: list[str]) -> list[list[str]]:
    """GPTQ's order within a layer: the steps of SEQUENTIAL_STEPS, each split so that factors reading
    another factor's output come after it."""
    steps = []
    for step in SEQUENTIAL_STEPS:
        names = [name for name in wanted if projection_of(name) in step]
        steps += [part for part in ([n for n in names if not reads_factor_output(n)],
                                    [n for n in names if reads_factor_output(n)]) if part]
    return steps


@torch.no_grad()
def quantize_model(model, formats: dict[str, QuantFormat], method: str = "gptq", calibration: torch.Tensor | None = None,
                   batch_size: int = DEFAULT_BATCH_SIZE, damp: float = default(Quantize, "damp"),
                   act_order: bool = default(Quantize, "act_order"),
                   keep_exact: dict[str, torch.Tensor] | None = None, embedding: QuantFormat | None = None,
                   token_weighting: str = default(Quantize, "hessian_tokens"),
                   clip: str = default(Quantize, "clip"), signround: dict | None = None,
                   quiet: bool = False) -> dict[str, QuantizedWeight]:
    """Quantizes the decoder linears named in `formats` (and the embedding when given) in place.

    `keep_exact` maps a linear to a boolean mask of weights left exact (stored apart). `signround`
    (method signround): its steps and learning rate (compressor.recipe.SignRound).
    """
    if method not in QUANT_METHODS:
        raise ValueError(f"quantization method must be one of {QUANT_METHODS}, got {method!r}")
    if method in CALIBRATED_METHODS and calibration is None:
        raise ValueError(f"{method} needs calibration token windows")
    keep_exact = keep_exact or {}
    results: dict[str, QuantizedWeight] = {}
    # The float model's activations, the targets of learned rounding: taken before the embedding
    # is quantized.
    reference = embedded_inputs(model, calibration, batch_size) if method == "signround" else None
    if embedding is not None:  # first, so that GPTQ calibrates the layers on the quantized embedding
        results[EMBEDDING] = quantize_embedding(model, embedding, clip)
    layers = range(len(model.model.layers))
    hidden = embedded_inputs(model, calibration, batch_size) if method in CALIBRATED_METHODS else None
    for layer in progress(layers, f"quantizing ({method})", quiet):
        wanted = [name for name, _ in layer_linears(model, layer) if name in formats]
        layer_results = {}
        with placed(model, layer) as block:
            if method == "rtn":
                layer_results = quantize_layer_linears(model, layer, formats, method, None, keep_exact, damp, act_order,
                                                       clip)
            else:
                # The float layer's outputs on float inputs, before its weights are quantized.
                targets = run_block(model, block, reference) if reference is not None else None
                originals = ({name: module.weight.data for name, module in layer_linears(model, layer)}
                             if targets is not None else None)
                for names in sequential_steps(wanted):
                    hessians = accumulate_hessians(model, layer, hidden, names, token_weighting)
                    step_formats = {name: formats[name] for name in names}
                    layer_results.update(quantize_layer_linears(model, layer, step_formats, "gptq", hessians,
                                                                keep_exact, damp, act_order, clip))
                if targets is not None:
                    if layer_results:
                        layer_results = _refine(model, layer, block, hidden, targets, originals, layer_results,
                                                signround)
                    reference = targets
                hidden = run_block(model, block, hidden)
        results.update(spill_codes(model, layer_results))
    return results


def _refine(model, layer: int, block, hidden, targets, originals: dict, quantized: dict, settings: dict | None) -> dict:
    """Learned rounding of one layer's GPTQ solution (compressor.transforms.signround), written into the model."""
    settings = settings or {}
    modules = {name: module for name, module in layer_linears(model, layer) if name in quantized}
    rotary = rotary_and_mask(model, hidden[0].shape[1])
    refined, _ = refine_layer(block, rotary, list(hidden), list(targets), originals, quantized, modules,
                              settings.get("steps", default(SignRound, "steps")), settings.get("learning_rate"),
                              settings.get("windows", default(SignRound, "windows")), seed=layer)
    for name, module in modules.items():
        set_weight(module, refined[name])
    return refined
