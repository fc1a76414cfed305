"""Layer-major runs: every stage that runs the model builds on these.

A run embeds its token batches, then takes the decoder layers in order, placing each on the device
(compressor.execution.offload), running it over every batch and releasing it before the next one;
the hidden states between layers are a HiddenStates (spilled to disk above a budget); the output
head is the model's own (in vocabulary chunks when its matrix is large). Each batch sees exactly the
operations the whole-model forward gives it, in the same order, so results equal that forward's.
"""

from __future__ import annotations

import torch

from compressor.execution.hidden import HiddenStates
from compressor.execution.offload import offload_of, placed
from compressor.modeling import causal_mask


def placement_of(model):
    """(device, dtype) the model computes in: the offload's, else its final norm's."""
    offload = offload_of(model)
    if offload is not None:
        return offload.placement.device, offload.placement.dtype
    weight = model.model.norm.weight
    return weight.device, weight.dtype


def rotary_and_mask(model, tokens: int):
    """cos, sin and mask for a batch of `tokens` unpadded positions starting at 0."""
    device, dtype = placement_of(model)
    positions = torch.arange(tokens, device=device)[None]
    cos, sin = model.model.rotary(positions, dtype)
    return cos, sin, causal_mask(None, tokens, device)


@torch.no_grad()
def embed(model, ids: torch.Tensor) -> torch.Tensor:
    """The embedding rows of `ids`, in the compute precision on the device."""
    device, dtype = placement_of(model)
    rows = model.model.embed_tokens(ids.to(model.model.embed_tokens.weight.device))
    return rows.to(device=device, dtype=dtype)


@torch.no_grad()
def embedded_batches(model, ids: torch.Tensor, batch_size: int) -> HiddenStates:
    device, _ = placement_of(model)
    states = HiddenStates(device)
    for batch in ids.split(batch_size):
        states.append(embed(model, batch))
    return states


@torch.no_grad()
def run_block(model, block, hidden: HiddenStates) -> HiddenStates:
    """One placed decoder layer over every batch."""
    out = hidden.empty_like()
    if len(hidden):
        cos, sin, mask = rotary_and_mask(model, hidden[0].shape[1])
        for h in hidden:
            out.append(block(h, cos, sin, mask, None))
    return out


@torch.no_grad()
def run_layer(model, layer: int, hidden: HiddenStates) -> HiddenStates:
    """Decoder layer `layer`, placed on the device for the call, over every batch."""
    with placed(model, layer) as block:
        return run_block(model, block, hidden)


@torch.no_grad()
def run_layers(model, hidden: HiddenStates, start: int = 0, stop: int | None = None,
               keep_inputs: list | None = None) -> HiddenStates:
    """Hidden states after layers start..stop-1; with `keep_inputs`, each layer's inputs are appended to it."""
    stop = len(model.model.layers) if stop is None else stop
    for layer in range(start, stop):
        if keep_inputs is not None:
            keep_inputs.append(hidden)
        with placed(model, layer) as block:
            hidden = run_block(model, block, hidden)
    return hidden


@torch.no_grad()
def final_log_probs(model, h: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities (float32) of hidden states after the last layer."""
    return torch.log_softmax(model.output_logits(model.model.norm(h)).float(), dim=-1)
