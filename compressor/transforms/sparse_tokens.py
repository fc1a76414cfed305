"""Sparse-token attention for long prompts: an early filter layer picks the prompt tokens that matter.

The filter layer scores every prompt token by the attention the prompt's last token pays it
(after RoPE, grouped-query keys expanded, softmax per head, summed over heads, smoothed by a 1-D
average pool), and keeps the top-k in their original order, always including the first
`keep_first` tokens (the attention sink) and the last `keep_last` (the question).

- `gemfilter` (GemFilter, Shi et al. 2024): layers 0..r-1 run over the whole prompt with no cache,
  layer r only projects queries and keys for the scores, then the full model runs on the k kept
  tokens from layer 0, as a new prompt, and generation continues from there.
- `promptdistill` (PromptDistill, Jin et al. 2025): layers 0..r run over the whole prompt with a
  cache; the kept tokens' hidden states after layer r continue through layers r+1.. with their
  original positions, and the cache of layers 0..r is truncated to the kept tokens.

Prompts of at most k tokens run unchanged. Batches are left-padded; each row selects on its own.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

from compressor.errors import CompressorError
from compressor.execution.offload import placed
from compressor.modeling import KVCache, apply_rope, default_positions
from compressor.recipe import SPARSE_METHODS, SparseTokens, default, sparse_settings_problem

METHODS = SPARSE_METHODS


@dataclass(frozen=True)
class SparseTokenSettings:
    method: str
    filter_layer: int
    keep_tokens: int = default(SparseTokens, "keep_tokens")
    keep_first: int = default(SparseTokens, "keep_first")
    keep_last: int = default(SparseTokens, "keep_last")
    pool_width: int = default(SparseTokens, "pool_width")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "sparse_tokens") -> "SparseTokenSettings":
        allowed = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise CompressorError(f"{where}: unknown keys {unknown}; allowed: {', '.join(sorted(allowed))}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise CompressorError(f"{where}: {exc}") from None


# The filter's settings as config.json and plan.json carry them, in this order.
SETTINGS = tuple(f.name for f in fields(SparseTokenSettings))


def check_settings(settings: SparseTokenSettings, config, where: str = "sparse_tokens") -> None:
    """One clear error for settings the model cannot run."""
    if settings.method not in METHODS:
        raise CompressorError(f"{where}.method: {settings.method!r} is not a method; allowed: {', '.join(METHODS)}")
    layers = config.num_hidden_layers
    if not 0 <= settings.filter_layer < layers:
        raise CompressorError(f"{where}.filter_layer: {settings.filter_layer} is outside the model's layers 0..{layers - 1}")
    if not config.has_attention(settings.filter_layer):
        raise CompressorError(f"{where}.filter_layer: layer {settings.filter_layer} has no attention unit (removed); "
                              f"layers with attention: {config.attention_layers()}")
    if getattr(config, "attention_window", None) is not None:
        raise CompressorError(f"{where}: the model attends through a sliding window of {config.attention_window} "
                              "tokens, so the last token cannot score the whole prompt; the filter needs full attention")
    problem = sparse_settings_problem(settings.keep_tokens, settings.keep_first, settings.keep_last, settings.pool_width)
    if problem:
        raise CompressorError(f"{where}: {problem}")


@dataclass
class Prefill:
    """The state after a prompt: last-token logits, the cache, and what decoding needs to go on."""

    logits: torch.Tensor  # (batch, vocab), next-token logits at the prompt's end
    cache: KVCache
    attention_mask: torch.Tensor  # (batch, cached tokens): 1 for real tokens, 0 for left padding
    next_positions: torch.Tensor  # (batch,): the position id of the next token
    # Per row, the kept positions counted in the row's real (unpadded) prompt; None: all were kept.
    selected: list[torch.Tensor] | None = None


def filter_query_keys(model, hidden: torch.Tensor, position_ids: torch.Tensor, layer_index: int):
    """The filter layer's last-token query (batch, heads, 1, dim) and all keys (batch, kv heads,
    tokens, dim), after RoPE, from its input `hidden`. `model.model` is the decoder stack (the ONNX
    export's prefill graph calls this too, so both select from the same numbers)."""
    layer = model.model.layers[layer_index]
    attn = layer.self_attn
    if attn is None:
        raise CompressorError(f"filter layer {layer_index} has no attention unit")
    b, n, _ = hidden.shape
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x[:, -1:]).view(b, 1, attn.num_heads, attn.head_dim)
    k = attn.k_proj(x).view(b, n, attn.num_kv_heads, attn.head_dim)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = model.model.rotary(position_ids, hidden.dtype)
    q = apply_rope(q.transpose(1, 2), cos[:, :, -1:], sin[:, :, -1:])
    k = apply_rope(k.transpose(1, 2), cos, sin)
    return q, k


@torch.no_grad()
def token_scores(model, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                 layer_index: int, pool_width: int = default(SparseTokens, "pool_width")) -> torch.Tensor:
    """(batch, tokens) scores of every prompt token from the input `hidden` of layer `layer_index`:
    the last query's attention probabilities over all keys, summed over heads, average-pooled."""
    with placed(model, layer_index):  # a model with its layers on disk: this layer's weights for the call
        q, k = filter_query_keys(model, hidden, position_ids, layer_index)
    attn = model.model.layers[layer_index].self_attn
    groups = attn.num_heads // attn.num_kv_heads
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
    logits = (q.float() @ k.float().transpose(-1, -2)).squeeze(2) / math.sqrt(attn.head_dim)  # (b, heads, n)
    logits = logits.masked_fill(~attention_mask.bool()[:, None, :], float("-inf"))
    probs = logits.softmax(-1).sum(1)  # (b, n)
    if pool_width > 1:
        probs = F.avg_pool1d(probs[:, None], kernel_size=pool_width, stride=1, padding=pool_width // 2)[:, 0]
    return probs


def select_positions(scores: torch.Tensor, attention_mask: torch.Tensor, settings: SparseTokenSettings) -> list[torch.Tensor]:
    """Per row, the kept indices into the padded sequence, in increasing order."""
    kept = []
    for row_scores, row_mask in zip(scores, attention_mask.bool()):
        real = torch.nonzero(row_mask).flatten()
        if real.numel() <= settings.keep_tokens:
            kept.append(real)
            continue
        s = row_scores[real].clone()
        s[: settings.keep_first] = float("inf")
        s[-settings.keep_last:] = float("inf")
        top = torch.topk(s, settings.keep_tokens, sorted=False).indices
        kept.append(real[top.sort().values])
    return kept


def _left_pad(rows: list[torch.Tensor], pad_value=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks 1-D (or (len, ...)) rows of different lengths, padding on the left; returns (stack, mask)."""
    width = max(r.shape[0] for r in rows)
    out = rows[0].new_full((len(rows), width, *rows[0].shape[1:]), pad_value)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, width - r.shape[0]:] = r
        mask[i, width - r.shape[0]:] = 1
    return out, mask


@torch.no_grad()
def full_prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Prefill:
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    cache = KVCache()
    out = model(input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return Prefill(out.logits[:, -1], cache, attention_mask, attention_mask.sum(-1))


@torch.no_grad()
def sparse_prefill(model, input_ids: torch.Tensor, settings: SparseTokenSettings,
                   attention_mask: torch.Tensor | None = None) -> Prefill:
    """The prompt's prefill with the filter; unchanged when no row is longer than keep_tokens."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if int(attention_mask.sum(-1).max()) <= settings.keep_tokens:
        return full_prefill(model, input_ids, attention_mask)
    check_settings(settings, model.config)
    model.ensure_exact_weights()
    r = settings.filter_layer
    inner = model.model
    b, n = input_ids.shape
    positions = default_positions(attention_mask, b, n, 0, input_ids.device)
    h = inner.embed_tokens(input_ids)
    if settings.method == "gemfilter":
        h = inner.run_layers(h, positions, attention_mask, None, 0, r)
        scores = token_scores(model, h, positions, attention_mask, r, settings.pool_width)
        kept = select_positions(scores, attention_mask, settings)
        ids, mask = _left_pad([row[k] for row, k in zip(input_ids, kept)], pad_value=0)
        result = full_prefill(model, ids, mask)
    else:
        cache = KVCache()
        h = inner.run_layers(h, positions, attention_mask, cache, 0, r)
        scores = token_scores(model, h, positions, attention_mask, r, settings.pool_width)
        h = inner.run_layers(h, positions, attention_mask, cache, r, r + 1)
        kept = select_positions(scores, attention_mask, settings)
        h, mask = _left_pad([row[k] for row, k in zip(h, kept)])
        kept_positions, _ = _left_pad([row[k] for row, k in zip(positions, kept)])
        for slot in list(cache.keys):
            # (batch, kv heads, tokens, head dim): keep the selected tokens, re-padded on the left.
            for store in (cache.keys, cache.values):
                store[slot], _ = _left_pad([row[:, k].transpose(0, 1) for row, k in zip(store[slot], kept)])
                store[slot] = store[slot].transpose(1, 2).contiguous()
        h = inner.run_layers(h, kept_positions, mask, cache, r + 1, None)
        logits = model.output_logits(inner.norm(h[:, -1:]))[:, -1]
        result = Prefill(logits, cache, mask, attention_mask.sum(-1))
    real_starts = attention_mask.shape[1] - attention_mask.sum(-1)
    result.selected = [k - start for k, start in zip(kept, real_starts)]
    return result


@torch.no_grad()
def decode_step(model, tokens: torch.Tensor, state: Prefill) -> torch.Tensor:
    """Feeds one token per row after `state` (updated in place); returns the next-token logits."""
    state.attention_mask = torch.cat([state.attention_mask, torch.ones_like(state.attention_mask[:, :1])], dim=1)
    positions = state.next_positions[:, None]
    out = model(tokens.view(-1, 1), attention_mask=state.attention_mask, position_ids=positions,
                past_key_values=state.cache, use_cache=True)
    state.next_positions = state.next_positions + 1
    state.logits = out.logits[:, -1]
    return state.logits


@torch.no_grad()
def greedy_continue(model, state: Prefill, max_new_tokens: int) -> torch.Tensor:
    """(batch, max_new_tokens) greedy tokens after a prefill (`state` is advanced in place)."""
    tokens = []
    logits = state.logits
    for step in range(max_new_tokens):
        token = logits.argmax(-1)
        tokens.append(token)
        if step + 1 < max_new_tokens:
            logits = decode_step(model, token, state)
    return torch.stack(tokens, dim=1)


def kept_text(tokenizer, ids: list[int], kept: torch.Tensor, gap: str = " [...] ") -> str:
    """The prompt as the model saw it after the filter: kept spans joined by a gap marker."""
    kept = kept.tolist()
    spans, start = [], None
    for i, pos in enumerate(kept):
        if start is None:
            start = pos
        if i + 1 == len(kept) or kept[i + 1] != pos + 1:
            spans.append((start, pos + 1))
            start = None
    parts = [tokenizer.decode(ids[a:b]) for a, b in spans]
    text = gap.join(parts)
    if spans and spans[0][0] > 0:
        text = gap.lstrip() + text
    if spans and spans[-1][1] < len(ids):
        text = text + gap.rstrip()
    return text
