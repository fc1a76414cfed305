"""The torch modules that are exported to ONNX, built from the compressed model and its plan.

`DecoderGraph` is one step of the decoder with an explicit KV cache: inputs `input_ids` (batch, seq),
`attention_mask` (batch, past + seq; 1 for real tokens, 0 for left padding), `position_ids`
(batch, seq), `logits_index` (which of the seq positions get logits), and for every layer that keeps
its attention unit `past_key_values.L.key` / `.value` (batch, kv heads, past, head dim); outputs
`logits` (batch, len(logits_index), vocab) and `present.L.key` / `.value`. Removed units have no
module, so they have no tensors and no cache entries. The same graph serves prefill (past = 0) and
decoding (seq = 1).

`SparsePrefillGraph` is the prompt's prefill with the sparse-token filter in the graph (see
`compressor.transforms.sparse_tokens`): inputs `input_ids`, `attention_mask`; outputs the last
token's `logits`, the kept prompt positions `selected`, the position of the next token
`next_positions`, and `present.L.key` / `.value` of the kept tokens, ready for `DecoderGraph`.

Both read the compressed model's own modules (so parameter names are the artifact's tensor names)
and compute what its layers compute, in a form that exports to few ONNX nodes, because at one token
per step ONNX Runtime's time goes mostly to per-node overhead: RMSNorm as x / sqrt(mean(x^2) + eps)
(which ONNX Runtime fuses into SimplifiedLayerNormalization), RoPE's rotate-half as a product with a
constant signed permutation (exact), grouped-query attention by broadcasting queries over their kv
head instead of repeating keys and values, and one additive mask built once for all layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from compressor.transforms.sparse_tokens import filter_query_keys


def kv_names(config) -> list[tuple[str, str]]:
    """(past input, present output) names, keys then values, for every layer that keeps attention."""
    names = []
    for layer in config.attention_layers():
        for kind in ("key", "value"):
            names.append((f"past_key_values.{layer}.{kind}", f"present.{layer}.{kind}"))
    return names


class ExplicitCache:
    """The KVCache interface over tensors given as graph inputs; collects the present tensors."""

    def __init__(self, past: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.past = past or {}
        self.present: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key, value, slot, *args, **kwargs):
        if slot in self.past:
            key = torch.cat([self.past[slot][0], key], dim=-2)
            value = torch.cat([self.past[slot][1], value], dim=-2)
        self.present[slot] = (key, value)
        return key, value


def rotate_half_matrix(head_dim: int) -> torch.Tensor:
    """R with x @ R == rotate_half(x) == cat(-x2, x1)."""
    half = head_dim // 2
    rotation = torch.zeros(head_dim, head_dim)
    rotation[half:, :half] = -torch.eye(half)
    rotation[:half, half:] = torch.eye(half)
    return rotation


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """compressor.modeling.RMSNorm (float32 models) in the form ONNX Runtime fuses."""
    return norm.weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))


def additive_mask(attention_mask: torch.Tensor, queries: int, window: int | None) -> torch.Tensor:
    """(batch, 1, 1, queries, keys) float: 0 where a query may attend, -inf elsewhere."""
    allowed = attention_mask_4d(attention_mask, queries)
    if window is not None:
        keys = attention_mask.shape[1]
        q_pos = torch.arange(queries, device=attention_mask.device)[:, None] + (keys - queries)
        allowed = allowed & ((q_pos - torch.arange(keys, device=attention_mask.device)[None, :]) < window)
    zeros = torch.zeros(allowed.shape, dtype=torch.float32, device=attention_mask.device)
    return zeros.masked_fill(~allowed, float("-inf"))[:, :, None]


def attention(attn, x, cos, sin, rotation, mask, cache):
    """compressor.modeling.Attention.forward without repeated keys and values."""
    b, t, _ = x.shape
    heads, kv_heads, dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(b, t, heads, dim)
    k = attn.k_proj(x).view(b, t, kv_heads, dim)
    v = attn.v_proj(x).view(b, t, kv_heads, dim).transpose(1, 2)
    if attn.q_norm is not None:
        q, k = rms_norm(attn.q_norm, q), rms_norm(attn.k_norm, k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    q = q * cos + (q @ rotation) * sin
    k = k * cos + (k @ rotation) * sin
    if cache is not None:
        k, v = cache.update(k, v, attn.cache_index)
    q = q.reshape(b, kv_heads, heads // kv_heads, t, dim)  # query head h reads kv head h // groups
    scores = (q @ k[:, :, None].transpose(-1, -2)) * (1.0 / math.sqrt(dim)) + mask
    out = scores.softmax(-1) @ v[:, :, None]
    return attn.o_proj(out.reshape(b, heads, t, dim).transpose(1, 2).reshape(b, t, heads * dim))


def decoder_layer(layer, h, cos, sin, rotation, mask, cache):
    if layer.self_attn is not None:
        h = h + attention(layer.self_attn, rms_norm(layer.input_layernorm, h), cos, sin, rotation, mask, cache)
    if layer.mlp is not None:
        h = h + layer.mlp(rms_norm(layer.post_attention_layernorm, h))
    return h


def attention_mask_4d(attention_mask: torch.Tensor, queries: int) -> torch.Tensor:
    """(batch, 1, queries, keys) boolean: the last `queries` positions see their past and no padding
    (a fully padded query row sees itself, as in `compressor.modeling.causal_mask`)."""
    keys = attention_mask.shape[1]
    q_pos = torch.arange(queries, device=attention_mask.device)[:, None] + (keys - queries)
    k_pos = torch.arange(keys, device=attention_mask.device)[None, :]
    allowed = (k_pos <= q_pos)[None, None] & attention_mask.bool()[:, None, None, :]
    return allowed | (k_pos == q_pos)[None, None]


class _Body(nn.Module):
    """Holds the compressed model's modules under the artifact's names (`model.*`, `lm_head`)."""

    def __init__(self, causal_lm):
        super().__init__()
        self.config = causal_lm.config
        self.model = causal_lm.model
        self.lm_head = causal_lm.lm_head
        self.slots = {layer: slot for slot, layer in enumerate(self.config.attention_layers())}
        self.register_buffer("rotation", rotate_half_matrix(self.config.head_dim), persistent=False)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        h = rms_norm(self.model.norm, h)
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return h @ weight.t()

    def run(self, h, position_ids, attention_mask, cache, start=0, stop=None):
        cos, sin = self.model.rotary(position_ids, h.dtype)
        mask = additive_mask(attention_mask, h.shape[1], self.config.attention_window)
        for layer in self.model.layers[start:stop]:
            h = decoder_layer(layer, h, cos, sin, self.rotation, mask, cache)
        return h

    def flat_present(self, cache: ExplicitCache) -> list[torch.Tensor]:
        out = []
        for layer in self.config.attention_layers():
            out.extend(cache.present[self.slots[layer]])
        return out


class DecoderGraph(_Body):
    def forward(self, input_ids, attention_mask, position_ids, logits_index, *past):
        slots = [self.slots[layer] for layer in self.config.attention_layers()]
        cache = ExplicitCache({slot: (past[2 * i], past[2 * i + 1]) for i, slot in enumerate(slots)})
        h = self.run(self.model.embed_tokens(input_ids), position_ids, attention_mask, cache)
        logits = self.logits(h.index_select(1, logits_index))
        return (logits, *self.flat_present(cache))


def select_tokens_reference(query: torch.Tensor, keys: torch.Tensor, attention_mask: torch.Tensor, keep_tokens: int,
                            keep_first: int, keep_last: int, pool_width: int) -> torch.Tensor:
    """The filter's selection, as `sparse_tokens.token_scores` + `select_positions` compute it, for
    rows that all hold more than `keep_tokens` real tokens: (batch, keep_tokens) indices into the
    padded prompt, increasing. `query` is the last token's (batch, heads, 1, dim) after RoPE, `keys`
    (batch, kv heads, tokens, dim) after RoPE."""
    groups = query.shape[1] // keys.shape[1]
    if groups > 1:
        keys = keys.repeat_interleave(groups, dim=1)
    logits = (query.float() @ keys.float().transpose(-1, -2)).squeeze(2) / math.sqrt(query.shape[-1])
    real = attention_mask.bool()
    logits = logits.masked_fill(~real[:, None, :], float("-inf"))
    scores = logits.softmax(-1).sum(1)
    if pool_width > 1:
        scores = F.avg_pool1d(scores[:, None], kernel_size=pool_width, stride=1, padding=pool_width // 2)[:, 0]
    rank = attention_mask.long().cumsum(-1) - 1  # index among the row's real tokens
    count = attention_mask.long().sum(-1, keepdim=True)
    forced = real & ((rank < keep_first) | (rank >= count - keep_last))
    scores = scores.masked_fill(forced, float("inf")).masked_fill(~real, float("-inf"))
    top = torch.topk(scores, keep_tokens, dim=-1).indices
    return torch.sort(top, dim=-1).values


class SparsePrefillGraph(_Body):
    """The prompt's prefill through the sparse-token filter (every row longer than keep_tokens)."""

    def __init__(self, causal_lm, settings):
        super().__init__(causal_lm)
        self.settings = settings

    def select(self, h, positions, attention_mask):
        """The filter layer's selection: `compressor.SelectTokens` in the graph."""
        s = self.settings
        q, k = filter_query_keys(self, h, positions, s.filter_layer)
        return torch.ops.compressor.select_tokens(q, k, attention_mask, s.keep_tokens, s.keep_first, s.keep_last,
                                                  s.pool_width)

    def forward(self, input_ids, attention_mask):
        s = self.settings
        r = s.filter_layer
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        h = self.model.embed_tokens(input_ids)
        if s.method == "gemfilter":
            h = self.run(h, positions, attention_mask, None, 0, r)
            selected = self.select(h, positions, attention_mask)
            kept_ids = input_ids.gather(1, selected)
            kept_mask = torch.ones_like(kept_ids)
            cache = ExplicitCache()
            h = self.run(self.model.embed_tokens(kept_ids), (kept_mask.cumsum(-1) - 1), kept_mask, cache)
            next_positions = kept_mask.sum(-1)
        else:
            early = ExplicitCache()
            h = self.run(h, positions, attention_mask, early, 0, r)
            selected = self.select(h, positions, attention_mask)
            h = self.run(h, positions, attention_mask, early, r, r + 1)
            h = h.gather(1, selected[:, :, None].expand(-1, -1, h.shape[-1]))
            kept_positions = positions.gather(1, selected)
            kept_mask = torch.ones_like(selected)
            past = {}
            for slot, (key, value) in early.present.items():
                index = selected[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[-1])
                past[slot] = (key.gather(2, index), value.gather(2, index))
            cache = ExplicitCache()
            h = self.run(h, kept_positions, kept_mask, cache, r + 1, None)
            cache.present = {**past, **cache.present}
            next_positions = attention_mask.sum(-1)
        logits = self.logits(h[:, -1:])[:, -1]
        return (logits, selected, next_positions, *self.flat_present(cache))
