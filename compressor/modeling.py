"""The heterogeneous compressed decoder: a Llama-family causal LM whose per-layer shape comes from config.json.

Every layer may keep or drop its attention unit and its MLP unit (`block_configs`, the DeciLM /
Nemotron-NAS convention). A dropped unit has no module, no weights and no KV-cache slot, so the
savings are real. The same class serves Llama, Mistral, Qwen2 (q/k/v bias) and Qwen3 (q/k norms);
which family it came from is recorded in `source_architecture` only.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from compressor.errors import CompressorError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# An output head matrix above this many bytes is multiplied in row chunks of at most this size.
HEAD_CHUNK_BYTES = 256 << 20


class CompressedConfig(PretrainedConfig):
    model_type = "compressor_decoder"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 256,
        intermediate_size: int = 512,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        rope_frequency_scaling: dict | None = None,
        max_position_embeddings: int = 2048,
        attention_bias: bool = False,
        attention_output_bias: bool = False,
        mlp_bias: bool = False,
        qk_norm: bool = False,
        attention_window: int | None = None,
        hidden_act: str = "silu",
        block_configs: list | None = None,
        source_architecture: str | None = None,
        exact_weights: dict | None = None,
        sparse_tokens: dict | None = None,
        weight_sharing: list | None = None,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_frequency_scaling = rope_frequency_scaling
        self.max_position_embeddings = max_position_embeddings
        self.attention_bias = attention_bias
        self.attention_output_bias = attention_output_bias
        self.mlp_bias = mlp_bias
        self.qk_norm = qk_norm
        self.attention_window = attention_window
        self.hidden_act = hidden_act
        if block_configs is None:
            block_configs = [
                {"attention": {"no_op": False}, "ffn": {"no_op": False}} for _ in range(num_hidden_layers)
            ]
        if len(block_configs) != num_hidden_layers:
            raise ValueError(
                f"block_configs has {len(block_configs)} entries but num_hidden_layers is {num_hidden_layers}"
            )
        self.block_configs = block_configs
        self.source_architecture = source_architecture
        # Module name -> count of weights kept exactly beside a quantized matrix (see exact_index).
        self.exact_weights = exact_weights
        # Sparse-token filter for long prompts (compressor.transforms.sparse_tokens), or None.
        self.sparse_tokens = sparse_tokens
        # Cross-layer weight sharing (compressor.transforms.share): one entry per shared basis,
        # {"projection", "layers", "rank", "residual_rank", "basis"}; None when nothing is shared.
        self.weight_sharing = weight_sharing
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def has_attention(self, layer: int) -> bool:
        return not self.block_configs[layer]["attention"]["no_op"]

    def has_mlp(self, layer: int) -> bool:
        return not self.block_configs[layer]["ffn"]["no_op"]

    def attention_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.has_attention(i)]

    def sharing_group(self, layer: int, projection: str) -> dict | None:
        """The weight-sharing entry that factors this layer's projection, or None (dense)."""
        for group in self.weight_sharing or []:
            if group["projection"] == projection and layer in group["layers"]:
                return group
        return None



class NemotronNasConfig(CompressedConfig):
    """config.json in vLLM's Nemotron-NAS (DeciLM) form, which artifacts with removed sub-layers are
    written in (exporters.config_forms), read as the CompressedConfig it describes.

    Registered for model_type "nemotron-nas" on `import compressor`, so transformers builds this
    class from such a folder without running the config code shipped in it. A folder of another
    Nemotron-NAS model (per-layer head counts or MLP widths, linear replacements) is refused by name."""

    model_type = "nemotron-nas"

    def __init__(self, rope_parameters: dict | None = None, rope_scaling: dict | None = None, **kwargs):
        # The family form's RoPE fields, as compressor.models.adapters reads them from a source.
        params = dict(rope_parameters or rope_scaling or {})
        theta = params.pop("rope_theta", None)
        if theta is not None:
            kwargs["rope_theta"] = theta
        if params.get("rope_type", params.get("type", "default")) != "default":
            kwargs.setdefault("rope_frequency_scaling", params)
        # DeciLM has one attention bias switch for q/k/v and o (vLLM's bias_o_proj = attention_bias).
        kwargs.setdefault("attention_output_bias", kwargs.get("attention_bias", False))
        blocks = kwargs.get("block_configs")
        if blocks is not None:
            kwargs["block_configs"] = [_compressor_block(block, i, kwargs) for i, block in enumerate(blocks)]
        super().__init__(**kwargs)


def _compressor_block(block: dict, layer: int, fields: dict) -> dict:
    """One Nemotron-NAS block_configs entry as the toolkit's {attention: {no_op}, ffn: {no_op}}."""
    heads = fields.get("num_attention_heads", 1)
    group = heads // (fields.get("num_key_value_heads") or heads)
    attention, ffn = block.get("attention") or {}, block.get("ffn") or {}
    problems = []
    if attention.get("replace_with_linear") or ffn.get("replace_with_linear"):
        problems.append("replace_with_linear")
    if not attention.get("no_op") and attention.get("n_heads_in_group", group) != group:
        problems.append(f"n_heads_in_group {attention.get('n_heads_in_group')} (the model's is {group})")
    width = ffn.get("intermediate_size", fields.get("intermediate_size"))
    if not ffn.get("no_op") and ("ffn_mult" in ffn or width != fields.get("intermediate_size")):
        problems.append("a per-layer MLP width")
    if problems:
        raise ValueError(f"block_configs[{layer}] has {', '.join(problems)}: not a Nemotron-NAS model this toolkit "
                         "wrote (it builds uniform layers that keep or drop whole units)")
    return {"attention": {"no_op": attention.get("no_op")}, "ffn": {"no_op": ffn.get("no_op")}}


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # at least float32
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inverse_frequencies(config: CompressedConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_frequency_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        # Llama 3.1 frequency-dependent scaling: long wavelengths divided by `factor`, short kept,
        # a smooth blend in between.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        middle = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv_freq = torch.where(middle, blended, inv_freq)
    return inv_freq.float()


class RotaryEmbedding(nn.Module):
    # The frequencies are derived from the config on first use, not kept as a buffer: a buffer would
    # be left uninitialized when transformers builds the model on the meta device before loading.
    def __init__(self, config: CompressedConfig):
        super().__init__()
        self.config = config
        self._inv_freq = None

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        if self._inv_freq is None or self._inv_freq.device != position_ids.device:
            self._inv_freq = rope_inverse_frequencies(self.config).to(position_ids.device)
        freqs = position_ids[..., None].float() * self._inv_freq
        angles = torch.cat([freqs, freqs], dim=-1)
        return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Keys and values of the layers that keep attention, indexed by their cache slot."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx in self.keys:
            key = torch.cat([self.keys[layer_idx], key], dim=-2)
            value = torch.cat([self.values[layer_idx], value], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value

    def get_seq_length(self, layer_idx: int | None = None) -> int:
        if not self.keys:
            return 0
        layer = layer_idx if layer_idx in self.keys else next(iter(self.keys))
        return self.keys[layer].shape[-2]


class FactoredLinear(nn.Module):
    """A projection stored as a shared basis and this layer's coefficients: y = (x B) C (+ x P Q) + b.

    The basis is a module of the model (`model.shared_bases[key]`, an in -> rank linear), held here
    by reference only, so it is stored once however many layers read it."""

    def __init__(self, bases: nn.ModuleDict, group: dict, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.basis_key = group["basis"]
        self._bases = [bases]  # a list: not registered as a submodule (the model owns the basis)
        self.in_features, self.out_features = in_features, out_features
        self.coefficients = nn.Linear(group["rank"], out_features, bias=bias)
        residual = group.get("residual_rank") or 0
        if residual:
            self.residual_down = nn.Linear(in_features, residual, bias=False)
            self.residual_up = nn.Linear(residual, out_features, bias=False)
        else:
            self.residual_down = self.residual_up = None

    @property
    def basis(self) -> nn.Linear:
        return self._bases[0][self.basis_key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.coefficients(self.basis(x))
        if self.residual_down is not None:
            y = y + self.residual_up(self.residual_down(x))
        return y

    @property
    def bias(self):
        return self.coefficients.bias

    def dense_weight(self) -> torch.Tensor:
        """The equivalent out x in matrix (for analysis and export checks; the model never builds it)."""
        weight = self.coefficients.weight @ self.basis.weight
        if self.residual_down is not None:
            weight = weight + self.residual_up.weight @ self.residual_down.weight
        return weight


def projection_weight(module: nn.Module) -> torch.Tensor:
    """A projection's out x in matrix, dense or factored."""
    return module.dense_weight() if isinstance(module, FactoredLinear) else module.weight


def make_linear(config: CompressedConfig, bases: nn.ModuleDict | None, layer: int, projection: str,
                in_features: int, out_features: int, bias: bool) -> nn.Module:
    group = config.sharing_group(layer, projection)
    if group is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return FactoredLinear(bases, group, in_features, out_features, bias)


class Attention(nn.Module):
    def __init__(self, config: CompressedConfig, layer_idx: int, cache_index: int, bases: nn.ModuleDict | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        # Slot in an external (transformers) cache: layers without attention take none.
        self.cache_index = cache_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = config.attention_window
        bias = config.attention_bias
        hidden, kv = config.hidden_size, self.num_kv_heads * self.head_dim
        self.q_proj = make_linear(config, bases, layer_idx, "q_proj", hidden, self.num_heads * self.head_dim, bias)
        self.k_proj = make_linear(config, bases, layer_idx, "k_proj", hidden, kv, bias)
        self.v_proj = make_linear(config, bases, layer_idx, "v_proj", hidden, kv, bias)
        self.o_proj = make_linear(config, bases, layer_idx, "o_proj", self.num_heads * self.head_dim, hidden,
                                  config.attention_output_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        # Set by the analysis pass: when not None, attention probabilities are computed explicitly
        # and this callable receives them (batch, heads, queries, keys).
        self.probability_observer = None

    def forward(self, x, cos, sin, mask, cache):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.cache_index)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        keys = k.shape[-2]
        layer_mask = mask(keys) if callable(mask) else mask
        # None: no padding, and the queries are the whole sequence or one new token, so plain
        # causality is the whole mask and SDPA's is_causal (a much faster kernel on CPU) serves.
        causal = layer_mask is None and t > 1
        if layer_mask is None and (self.window is not None or self.probability_observer is not None):
            layer_mask, causal = causal_only_mask(t, keys, x.device), False
        if self.window is not None:
            layer_mask = layer_mask & window_mask(t, keys, self.window, x.device)
        if self.probability_observer is not None:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            scores = scores.masked_fill(~layer_mask, torch.finfo(scores.dtype).min)
            probs = scores.softmax(-1)
            self.probability_observer(probs)
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=layer_mask, is_causal=causal)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def window_mask(queries: int, keys: int, window: int, device) -> torch.Tensor:
    q_pos = torch.arange(keys - queries, keys, device=device)[:, None]
    k_pos = torch.arange(keys, device=device)[None, :]
    return (q_pos - k_pos) < window


class MLP(nn.Module):
    def __init__(self, config: CompressedConfig, layer_idx: int = 0, bases: nn.ModuleDict | None = None):
        super().__init__()
        bias, hidden, inner = config.mlp_bias, config.hidden_size, config.intermediate_size
        self.gate_proj = make_linear(config, bases, layer_idx, "gate_proj", hidden, inner, bias)
        self.up_proj = make_linear(config, bases, layer_idx, "up_proj", hidden, inner, bias)
        self.down_proj = make_linear(config, bases, layer_idx, "down_proj", inner, hidden, bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm residual layer; either unit may be absent (then it is the identity)."""

    def __init__(self, config: CompressedConfig, layer_idx: int, cache_index: int, bases: nn.ModuleDict | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        eps = config.rms_norm_eps
        if config.has_attention(layer_idx):
            self.input_layernorm = RMSNorm(config.hidden_size, eps)
            self.self_attn = Attention(config, layer_idx, cache_index, bases)
        else:
            self.input_layernorm = self.self_attn = None
        if config.has_mlp(layer_idx):
            self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
            self.mlp = MLP(config, layer_idx, bases)
        else:
            self.post_attention_layernorm = self.mlp = None
        # Analysis switches a unit off temporarily to measure what its removal costs; the artifact
        # itself never carries a switched-off unit (removal deletes it).
        self.attention_enabled = True
        self.mlp_enabled = True

    def forward(self, h, cos, sin, mask, cache):
        if self.self_attn is not None and self.attention_enabled:
            h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache)
        if self.mlp is not None and self.mlp_enabled:
            h = h + self.mlp(self.post_attention_layernorm(h))
        return h


class CompressedPreTrainedModel(PreTrainedModel):
    config_class = CompressedConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        # Through torch.nn.init: transformers 5.0 runs this after loading and skips loaded weights
        # only for initializers it can intercept there (`.data.normal_()` re-randomized them).
        std = getattr(self.config, "initializer_range", 0.02)
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            return  # a packed quantized weight: restored from its codes, nothing to initialize
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class CompressedModel(CompressedPreTrainedModel):
    def __init__(self, config: CompressedConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # Bases shared across layers (weight sharing), each stored once; None when nothing is shared.
        self.shared_bases = shared_bases(config)
        cache_slots = {layer: slot for slot, layer in enumerate(config.attention_layers())}
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, cache_slots.get(i, -1), self.shared_bases) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, start_layer: int = 0, cache=None, **kwargs):
        """`inputs_embeds` with `start_layer` > 0 resumes from that layer's input hidden states. The
        cache (a KVCache or a transformers Cache) may come as `past_key_values` or as `cache`."""
        cache = cache_argument(past_key_values, cache)
        if inputs_embeds is None:
            # The embedding may be kept in its stored precision (a layer-by-layer run): rows are cast.
            h = self.embed_tokens(input_ids).to(self.norm.weight.dtype)
        else:
            h = inputs_embeds
        b, t = h.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = default_positions(attention_mask, b, t, past, h.device)
        h = self.run_layers(h, position_ids, attention_mask, cache, start_layer)
        return self.norm(h)

    def run_layers(self, h, position_ids, attention_mask, cache, start: int = 0, stop: int | None = None):
        """Hidden states after layers start..stop-1 (no final norm); the sparse-token prefill runs
        the model in pieces with this."""
        cos, sin = self.rotary(position_ids, h.dtype)
        mask = causal_mask(attention_mask, h.shape[1], h.device)
        for layer in self.layers[start:stop]:
            h = layer(h, cos, sin, mask, cache)
        return h


# transformers 5.0 passes the KV cache to forward as `past_key_values` and reads it back from the
# output's `past_key_values`; later 5.x releases pass it as `cache` (generation/utils.py,
# prepare_inputs_for_generation: `model_inputs["cache"] = cache`) and read `outputs["cache"]`, the
# output classes' field being renamed to match. forward accepts both names and fills whichever field
# the installed output class has (the old name there would only be renamed, with a warning).
OUTPUT_CACHE_FIELD = ("cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
                      else "past_key_values")


def cache_argument(past_key_values, cache):
    """The one cache given under either name (None when neither is)."""
    if cache is None:
        return past_key_values
    if past_key_values is not None and past_key_values is not cache:
        raise ValueError("two different caches given, as past_key_values and as cache; pass one")
    return cache


def projection_in_features(config: CompressedConfig, projection: str) -> int:
    if projection == "o_proj":
        return config.num_attention_heads * config.head_dim
    return config.intermediate_size if projection == "down_proj" else config.hidden_size


def shared_bases(config: CompressedConfig) -> nn.ModuleDict | None:
    if not config.weight_sharing:
        return None
    return nn.ModuleDict({group["basis"]: nn.Linear(projection_in_features(config, group["projection"]),
                                                    group["rank"], bias=False)
                          for group in config.weight_sharing})


def default_positions(attention_mask, batch: int, tokens: int, past: int, device) -> torch.Tensor:
    if attention_mask is not None:
        # Left padding: positions count real tokens only.
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -tokens:]
    return torch.arange(past, past + tokens, device=device)[None].expand(batch, tokens)


def causal_only_mask(queries: int, keys: int, device) -> torch.Tensor:
    """(1, 1, queries, keys): the last `queries` positions of a `keys`-long sequence see their past."""
    q_pos = torch.arange(keys - queries, keys, device=device)[:, None]
    return (torch.arange(keys, device=device)[None, :] <= q_pos)[None, None]


def causal_mask(attention_mask, queries: int, device):
    """Returns a function of the key length giving a (batch|1, 1, queries, keys) boolean mask, or
    None when causality alone is the mask (no padding; queries are all keys, or a single new one)."""
    padded = attention_mask is not None and not bool(attention_mask.bool().all())

    def build(keys: int) -> torch.Tensor | None:
        if not padded and (queries == keys or queries == 1):
            return None
        allowed = causal_only_mask(queries, keys, device)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, -keys:].bool()
            # A fully padded query row would give NaN; let it see itself.
            q_pos = torch.arange(keys - queries, keys, device=device)[:, None]
            allowed = allowed | (torch.arange(keys, device=device)[None, :] == q_pos)[None, None]
        return allowed

    return build


class CompressedForCausalLM(CompressedPreTrainedModel, GenerationMixin):
    """A tied output head is not a module: logits use the embedding matrix itself, so a quantized
    embedding (stored packed, with no `weight` until it is unpacked) serves both ends unchanged."""

    def __init__(self, config: CompressedConfig):
        super().__init__(config)
        self.model = CompressedModel(config)
        tied = config.tie_word_embeddings
        self.lm_head = None if tied else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        for name, count in (getattr(config, "exact_weights", None) or {}).items():
            linear = self.get_submodule(name)
            linear.register_buffer("exact_index", torch.zeros(count, dtype=torch.int64))
            linear.register_buffer("exact_value", torch.zeros(count, dtype=torch.float32))
        self._exact_weights_restored = False
        self.post_init()

    def output_logits(self, h: torch.Tensor) -> torch.Tensor:
        """One product when the head matrix is small and in h's precision; else row chunks cast on the
        way (a layer-by-layer run keeps a large embedding in its stored precision: no full-size copy)."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if weight.dtype == h.dtype and weight.device == h.device and \
                weight.numel() * weight.element_size() <= HEAD_CHUNK_BYTES:
            return F.linear(h, weight)
        rows = max(1, HEAD_CHUNK_BYTES // (weight.shape[1] * h.element_size()))
        return torch.cat([F.linear(h, chunk.to(device=h.device, dtype=h.dtype)) for chunk in weight.split(rows)],
                         dim=-1)

    @torch.no_grad()
    def restore_exact_weights(self) -> None:
        """Writes the weights kept exactly (super weights stored apart from a quantized matrix) back
        into their dequantized matrices. Runs on the first forward, after any unpacking."""
        for name in getattr(self.config, "exact_weights", None) or {}:
            linear = self.get_submodule(name)
            if parametrize.is_parametrized(linear, "weight"):
                continue  # a weight kept packed (exporters.packed) applies them each time it is dequantized
            linear.weight.view(-1)[linear.exact_index] = linear.exact_value.to(linear.weight.dtype)
        self._exact_weights_restored = True

    def ensure_exact_weights(self) -> None:
        """restore_exact_weights once, before the first use of the weights."""
        if not self._exact_weights_restored:
            self.restore_exact_weights()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, labels=None, inputs_embeds=None, logits_to_keep: int = 0, cache=None, **kwargs):
        """The cache may come as `past_key_values` (the toolkit, transformers 5.0) or as `cache`
        (later transformers); it is returned under the output field the installed transformers reads."""
        self.ensure_exact_weights()
        cache = cache_argument(past_key_values, cache)
        if use_cache and cache is None:
            cache = KVCache()
        h = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.output_logits(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{OUTPUT_CACHE_FIELD: cache if use_cache else None})



class NemotronNasForCausalLM(CompressedForCausalLM):
    """The toolkit's model class for a Nemotron-NAS form artifact (AutoModelForCausalLM after `import compressor`)."""

    config_class = NemotronNasConfig


def config_with(config: CompressedConfig, **changes) -> CompressedConfig:
    """A copy of `config` with the given fields changed (a transform's new model gets a new config)."""
    data = dict(config.to_dict(), **changes)
    return CompressedConfig(**{k: v for k, v in data.items() if k not in ("model_type", "transformers_version")})


def build_with_weights(config: CompressedConfig, state: dict, origin: str, attach=None) -> CompressedForCausalLM:
    """A model of `config` holding the given tensors (no copy, no random initialization).
    `attach(model)`, when given, places the weights that `state` does not hold (packed ones)."""
    with torch.device("meta"):
        model = CompressedForCausalLM(config)
    model.load_state_dict(state, strict=False, assign=True)
    if attach is not None:
        attach(model)
    model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CompressorError(f"weights missing after {origin}: {missing[:5]}")
    return model.eval()
