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
(which ONNX Runtime fuses into SimplifiedLayerNormalization), grouped-query attention by broadcasting
queries over their kv head instead of repeating keys and values, and one additive mask built once
for all layers. In `DecoderGraph` each layer's RoPE and its attention over the cache are one node
each, `compressor.Rotary` and `compressor.CachedAttention` (`exporters.onnx.attention_op`), which
ONNX Runtime's CPU loader runs as its fused kernels.
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
    """The past keys and values given as graph inputs, by cache slot; collects the present ones."""

    def __init__(self, past: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.past = past or {}
        self.present: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """compressor.modeling.RMSNorm (float32 models) in the form ONNX Runtime fuses."""
    return norm.weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))


def additive_mask(attention_mask: torch.Tensor, queries: int, window: int | None) -> torch.Tensor:
    """(batch, 1, queries, keys) float: 0 where a query may attend, -inf elsewhere."""
    allowed = attention_mask_4d(attention_mask, queries)
    if window is not None:
        keys = attention_mask.shape[1]
        q_pos = torch.arange(queries, device=attention_mask.device)[:, None] + (keys - queries)
        allowed = allowed & ((q_pos - torch.arange(keys, device=attention_mask.device)[None, :]) < window)
    zeros = torch.zeros(allowed.shape, dtype=torch.float32, device=attention_mask.device)
    return zeros.masked_fill(~allowed, float("-inf"))


def cached_attention_reference(query, key, value, past_key, past_value, mask, num_heads: int, kv_num_heads: int,
                               scale: float):
    """Grouped-query attention over the past and this step: query, key, value (batch, seq, heads x
    dim) after RoPE, past (batch, kv heads, past, dim), mask (batch, 1, seq, past + seq) additive.
    Returns the output (batch, seq, heads x dim) and the present keys and values. Queries are
    broadcast over their kv head (query head h reads kv head h // groups) instead of repeating keys
    and values. `exporters.onnx.attention_op` makes this one ONNX node."""
    b, t, _ = query.shape
    q = query.view(b, t, kv_num_heads, num_heads // kv_num_heads, -1).permute(0, 2, 3, 1, 4)
    present_key = torch.cat([past_key, key.view(b, t, kv_num_heads, -1).transpose(1, 2)], dim=2)
    present_value = torch.cat([past_value, value.view(b, t, kv_num_heads, -1).transpose(1, 2)], dim=2)
    scores = (q @ present_key[:, :, None].transpose(-1, -2)) * scale + mask[:, :, None]
    out = scores.softmax(-1) @ present_value[:, :, None]  # (b, kv heads, groups, seq, dim)
    return out.permute(0, 3, 1, 2, 4).reshape(b, t, -1), present_key, present_value


@torch.library.custom_op("compressor::cached_attention", mutates_args=())
def cached_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                     past_value: torch.Tensor, mask: torch.Tensor, num_heads: int,
                     kv_num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return cached_attention_reference(query, key, value, past_key, past_value, mask, num_heads, kv_num_heads, scale)


@cached_attention.register_fake
def _cached_attention_shape(query, key, value, past_key, past_value, mask, num_heads, kv_num_heads, scale):
    b, t, _ = key.shape
    present = past_key.new_empty((b, kv_num_heads, past_key.shape[2] + t, past_key.shape[3]))
    return query.new_empty(query.shape), present, present.clone()


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> torch.Tensor:
    """RoPE (rotate-half form) on x (batch, seq, heads x dim) with cos and sin of one half (batch,
    seq, dim / 2), which `compressor.modeling.RotaryEmbedding` repeats for the other half:
    (x1 c - x2 s, x2 c + x1 s) for each head's halves x1, x2."""
    b, t, width = x.shape
    half = width // num_heads // 2
    x = x.view(b, t, num_heads, 2 * half)
    x1, x2 = x[..., :half], x[..., half:]  # static slices: TensorRT's parser refuses the exporter's Split
    c, s = cos[:, :, None], sin[:, :, None]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).reshape(b, t, -1)


@torch.library.custom_op("compressor::rotary", mutates_args=())
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> torch.Tensor:
    return rotary_reference(x, cos, sin, num_heads)


@rotary.register_fake
def _rotary_shape(x, cos, sin, num_heads):
    return x.new_empty(x.shape)


def attention(attn, x, cos, sin, mask, cache, fused: bool):
    """compressor.modeling.Attention.forward in the projections' layout (batch, seq, heads x dim):
    `rotary_reference` and `cached_attention_reference`, or, `fused`, their custom ops (one ONNX node
    each, see exporters.onnx.attention_op). `cos` and `sin` are one half's (batch, seq, dim / 2)."""
    b, t, _ = x.shape
    heads, kv_heads, dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q, k = attn.q_proj(x), attn.k_proj(x)
    if attn.q_norm is not None:
        q = rms_norm(attn.q_norm, q.view(b, t, heads, dim)).reshape(b, t, heads * dim)
        k = rms_norm(attn.k_norm, k.view(b, t, kv_heads, dim)).reshape(b, t, kv_heads * dim)
    rope = rotary if fused else rotary_reference
    q, k = rope(q, cos, sin, heads), rope(k, cos, sin, kv_heads)
    slot = attn.cache_index
    past = cache.past.get(slot) if cache is not None else None
    if past is None:
        empty = x.new_zeros((b, kv_heads, 0, dim))
        past = (empty, empty)
    core = cached_attention if fused else cached_attention_reference
    out, key, value = core(q, k, attn.v_proj(x), past[0], past[1], mask, heads, kv_heads, 1.0 / math.sqrt(dim))
    if cache is not None:
        cache.present[slot] = (key, value)
    return attn.o_proj(out)


def decoder_layer(layer, h, cos, sin, mask, cache, fused: bool = False):
    if layer.self_attn is not None:
        h = h + attention(layer.self_attn, rms_norm(layer.input_layernorm, h), cos, sin, mask, cache, fused)
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

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        h = rms_norm(self.model.norm, h)
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return h @ weight.t()

    # DecoderGraph's attention is the one-node `compressor.CachedAttention`; the sparse prefill's
    # stays plain ops (its later layers attend over the kept tokens, not the graph's mask input).
    fused_attention = False

    def run(self, h, position_ids, attention_mask, cache, start=0, stop=None):
        cos, sin = self.model.rotary(position_ids, h.dtype)  # (batch, 1, seq, dim): one half, repeated
        half = cos.shape[-1] // 2
        cos, sin = cos[:, 0, :, :half], sin[:, 0, :, :half]
        mask = additive_mask(attention_mask, h.shape[1], self.config.attention_window)
        for layer in self.model.layers[start:stop]:
            h = decoder_layer(layer, h, cos, sin, mask, cache, self.fused_attention)
        return h

    def flat_present(self, cache: ExplicitCache) -> list[torch.Tensor]:
        out = []
        for layer in self.config.attention_layers():
            out.extend(cache.present[self.slots[layer]])
        return out


class DecoderGraph(_Body):
    fused_attention = True

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
