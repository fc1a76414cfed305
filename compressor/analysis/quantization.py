"""What the planner needs to allocate bit widths: the inventory of quantizable tensors, and the
measured sensitivity of each allocation unit to quantization.

Sensitivity of a unit at a width (and at each group size, where the recipe lists several): the KL
divergence KL(original || quantized) of the final next-token distributions, with only that unit
quantized (by the recipe's own method: GPTQ with Hessians from the unquantized model, or
round-to-nearest) and every other weight exact. Layers are visited one at a time; a unit in layer
l reruns only layers l..L-1 from cached inputs.
Sensitivity is measured with min-max group ranges and, for `method: signround`, with GPTQ: it
ranks widths; `clip: search` and the refinement only change how the chosen widths are rounded, so a
plan of either reuses an analysis measured without them.
For `embeddings: auto`, the token embedding is measured the same way (round-to-nearest, as it is
quantized; a tied output head reads the same table), rerunning the whole model.
"""

from __future__ import annotations

import torch

from compressor.analysis.removal import Scorer
from compressor.analysis.tensor_bytes import other_tensor_bytes
from compressor.bit_allocation import allocation_units
from compressor.progress import progress
from compressor.recipe import sensitivity_method
from compressor.transforms.quantize import recipe_format
from compressor.execution.layerwise import run_block
from compressor.execution.offload import placed
from compressor.transforms.quantize_model import (
    EMBEDDING, accumulate_hessians, embedded_inputs, layer_linears, quantize_embedding, unit_of_linear,
    quantize_layer_linears)

EMBEDDING_KEY = "embedding"  # the embedding's entry among the sensitivity scores


def quantization_options(quantize) -> list[tuple[int, int | str]]:
    """(bits, group size) of every option a unit may take: each width at each of the recipe's group
    sizes, by width, then by group size as listed."""
    return [(bits, group) for bits in quantize.bits for group in quantize.group_sizes]


def option_label(bits: int, group_size: int | str, primary: int | str) -> str:
    """Key of an option's sensitivity score: the width alone at the primary group size (so an
    analysis of one group size reads as before), else width/group, e.g. "5/channel", "4/g32"."""
    if group_size == primary:
        return str(bits)
    return f"{bits}/{group_size if group_size == 'channel' else f'g{group_size}'}"


def measured_group_sizes(measured: dict) -> list:
    """The group sizes a recorded sensitivity covers (the primary first)."""
    return list(measured.get("group_sizes") or [measured.get("group_size")])


def sensitivity_key(quantize) -> dict:
    """What a recorded sensitivity measurement must match to be reused by a plan (the primary group
    size; the further ones and the widths need only be among those measured)."""
    key = {"method": sensitivity_method(quantize.method), "group_size": quantize.group_sizes[0],
           "symmetric": quantize.symmetric,
           "granularity": quantize.granularity, "samples": quantize.sensitivity_samples,
           "seq_len": quantize.sensitivity_seq_len, "damp": quantize.damp, "act_order": quantize.act_order,
           "hessian_tokens": quantize.hessian_tokens}
    if quantize.scales == "positive":  # absent for signed scales: earlier analyses still match
        key["scales"] = "positive"
    return key


def quantization_inventory(model) -> dict:
    """Shapes of the decoder linears, the embedding, and the bytes of every other stored tensor."""
    linears = []
    for layer in range(len(model.model.layers)):
        for name, module in layer_linears(model, layer):
            linears.append({"name": name, "layer": layer, "unit": unit_of_linear(name),
                            "shape": list(module.weight.shape)})
    other = other_tensor_bytes(model, {f"{lin['name']}.weight" for lin in linears} | {f"{EMBEDDING}.weight"})
    embedding = model.model.embed_tokens.weight
    # A kept embedding is stored in its own precision (a layer-by-layer run keeps a bfloat16 one so).
    return {"linears": linears, "embedding_shape": list(embedding.shape), "embedding_element_bytes": embedding.element_size(),
            "other_tensor_bytes": other, "tied_embeddings": bool(model.config.tie_word_embeddings)}


@torch.no_grad()
def quantization_sensitivity(model, quantize, calibration: torch.Tensor, batch_size: int, quiet: bool = False) -> dict:
    """KL divergence per allocation unit and width; the record says how it was measured."""
    windows = calibration[: quantize.sensitivity_samples, : quantize.sensitivity_seq_len]
    scorer = Scorer(model, windows, batch_size, measure="kl")
    scorer.cache_layer_inputs()
    scores: dict[str, dict[str, float]] = {}
    if quantize.embeddings == "auto":
        scores[EMBEDDING_KEY] = embedding_sensitivity(model, quantize, scorer)
    inventory = quantization_inventory(model)
    units = allocation_units(inventory["linears"], quantize.granularity)
    method = sensitivity_method(quantize.method)
    options, primary = quantization_options(quantize), quantize.group_sizes[0]
    hidden = embedded_inputs(model, calibration, batch_size) if method == "gptq" else None
    layers = range(len(model.model.layers))
    for layer in progress(layers, "quantization sensitivity", quiet):
        layer_units = [u for u in units if u["layer"] == layer]
        names = [name for u in layer_units for name in u["linears"]]
        # Placed for the whole step: the scorer's reruns from this layer see its quantized weights.
        with placed(model, layer) as block:
            if names:
                hessians = (accumulate_hessians(model, layer, hidden, names, quantize.hessian_tokens)
                            if hidden is not None else None)
                originals = {name: module.weight for name, module in layer_linears(model, layer)}
                for unit in layer_units:
                    scores[unit["key"]] = {}
                    for bits, group in options:
                        fmt = recipe_format(quantize, bits, group)
                        formats = {name: fmt for name in unit["linears"]}
                        quantize_layer_linears(model, layer, formats, method, hessians, {}, quantize.damp,
                                               quantize.act_order)
                        scores[unit["key"]][option_label(bits, group, primary)] = scorer.divergence(start_layer=layer)
                        _restore(model, layer, originals)
            if hidden is not None:
                hidden = run_block(model, block, hidden)
    record = dict(sensitivity_key(quantize), bits=list(quantize.bits), measure="kl", scores=scores)
    if len(quantize.group_sizes) > 1:
        record["group_sizes"] = quantize.group_sizes
    return record


def embedding_sensitivity(model, quantize, scorer: Scorer) -> dict[str, float]:
    """KL divergence with only the embedding quantized, per option of the recipe (a tied head has no
    weight of its own: the logits read the same quantized table)."""
    embedding = model.model.embed_tokens
    original = embedding.weight
    costs = {}
    try:
        for bits, group in quantization_options(quantize):
            quantize_embedding(model, recipe_format(quantize, bits, group))
            costs[option_label(bits, group, quantize.group_sizes[0])] = scorer.divergence(start_layer=0)
            embedding.weight = original
    finally:
        embedding.weight = original
    return costs


def _restore(model, layer: int, originals: dict[str, torch.nn.Parameter]) -> None:
    for name, module in layer_linears(model, layer):
        module.weight = originals[name]
