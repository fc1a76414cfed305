"""The retrieval probe that places the sparse-token filter: which layers' selections keep a planted needle.

Needles are planted in calibration text (never the evaluation text) at evenly spread depths. One
pass over each probe prompt scores every prompt token at every layer that has attention, exactly as
the filter would there, and records whether the top-k selection keeps all of the needle's number.
The filter layer is the earliest layer whose selection recovers at least `min_recall` of the
needles: earlier is cheaper, since layers up to the filter run over the whole prompt.
"""

from __future__ import annotations

import torch

from compressor.data import load_text
from compressor.errors import CompressorError
from compressor.execution.hidden import carried
from compressor.execution.layerwise import embed, placement_of
from compressor.execution.offload import placed
from compressor.needles import build_cases, even_depths
from compressor.progress import progress
from compressor.transforms.sparse_tokens import SparseTokenSettings, select_positions, token_scores


@torch.no_grad()
def filter_layer_probe(model, tokenizer, sparse, calibration_text: str, quiet: bool = False) -> dict:
    """Per layer, the fraction of probe needles its selection recovers (`sparse` is the recipe's
    SparseTokens section); the sparse-token stage picks the layer from this record."""
    probe = sparse.probe
    limit = model.config.max_position_embeddings
    if probe.tokens > limit:
        raise CompressorError(f"sparse_tokens.probe.tokens: {probe.tokens} exceeds the model's context of {limit} tokens")
    cases = build_cases(tokenizer, load_text(calibration_text), [probe.tokens], even_depths(probe.samples), 1, probe.seed)
    layers = model.config.attention_layers()
    recovered = {layer: 0 for layer in layers}
    kept_fraction = {layer: 0.0 for layer in layers}
    inner = model.model
    device = placement_of(model)[0]
    # One layer at a time over every case (its weights placed once), each case's hidden states carried.
    hidden = carried((embed(model, case.input_ids[None]) for case in cases), device)
    for layer in progress(range(max(layers) + 1), "filter-layer probe", quiet):
        out = hidden.empty_like()
        with placed(model, layer):
            for case, h in zip(cases, hidden):
                ids = case.input_ids[None]
                mask = torch.ones_like(ids, device=device)
                positions = torch.arange(ids.shape[1], device=device)[None]
                if layer in recovered:
                    a, b = case.answer_span
                    settings = SparseTokenSettings(sparse.method, layer, sparse.keep_tokens, sparse.keep_first,
                                                   sparse.keep_last, sparse.pool_width)
                    scores = token_scores(model, h, positions, mask, layer, sparse.pool_width)
                    kept = set(select_positions(scores, mask, settings)[0].tolist())
                    share = sum(p in kept for p in range(a, b)) / (b - a)
                    kept_fraction[layer] += share / len(cases)
                    recovered[layer] += share == 1.0
                out.append(inner.run_layers(h, positions, mask, None, layer, layer + 1))
        hidden = out
    return {
        "method": "needle retrieval of the filter's own selection",
        "cases": len(cases), "tokens": probe.tokens, "depths": [c.depth for c in cases], "seed": probe.seed,
        "text": calibration_text, "keep_tokens": sparse.keep_tokens,
        "layers": [{"layer": layer, "recall": recovered[layer] / len(cases),
                    "answer_tokens_kept": kept_fraction[layer]} for layer in layers],
    }
