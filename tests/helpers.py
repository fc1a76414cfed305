"""Helpers only the tests use: a greedy decoder over the toolkit's prefill, a fit's relative error,
every decoder linear of a model, the bytes of every tensor in a safetensors file."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from compressor.transforms.quantize_model import layer_linears
from compressor.transforms.share import SharedFit
from exporters.safetensors import DTYPE_BYTES
from compressor.transforms.sparse_tokens import Prefill, SparseTokenSettings, full_prefill, greedy_continue, sparse_prefill


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, settings: SparseTokenSettings | None = None,
                    attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Prefill]:
    """Greedy continuation of a (left-padded) batch: (batch, max_new_tokens) token ids and the state
    after them (its logits are those that followed the last decoded token)."""
    state = (sparse_prefill(model, input_ids, settings, attention_mask) if settings is not None
             else full_prefill(model, input_ids, attention_mask))
    return greedy_continue(model, state, max_new_tokens), state


def relative_error(weights: list[torch.Tensor], fit: SharedFit, hessians: list[torch.Tensor] | None = None) -> float:
    """sum_i ||X_i (W_i - W~_i)^T||^2 / sum_i ||X_i W_i^T||^2 (plain Frobenius without hessians)."""
    error = total = 0.0
    for i, w in enumerate(weights):
        w = w.detach().double()
        delta = w - fit.reconstruct(i)
        if hessians is None:
            error += float(delta.pow(2).sum())
            total += float(w.pow(2).sum())
        else:
            h = hessians[i].double()
            error += float(torch.einsum("oi,ij,oj->", delta, h, delta))
            total += float(torch.einsum("oi,ij,oj->", w, h, w))
    return error / total


def decoder_linears(model) -> list[tuple[str, torch.nn.Linear]]:
    return [item for layer in range(len(model.model.layers)) for item in layer_linears(model, layer)]


def tensor_bytes(path: str | Path) -> dict[str, int]:
    """Bytes of every tensor stored in a safetensors file (the data section, header excluded)."""
    sizes = {}
    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():
            sl = handle.get_slice(name)
            count = 1
            for d in sl.get_shape():
                count *= d
            sizes[name] = count * DTYPE_BYTES[sl.get_dtype()]
    return sizes
