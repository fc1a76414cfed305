"""Checks of a model's config.json before anything is built from it.

A config is data from outside: a dimension of 1e6 layers, a negative epsilon or a block_configs entry
that says "no" instead of false must be one clear error, found before any memory is allocated, not a
hang, a traceback, or a model that quietly computes something else. The same checks serve model
sources (transformers folders) and the toolkit's own artifacts, which add block_configs, weight
sharing, kept weights and the sparse-token filter.
"""

from __future__ import annotations

import math
import re

from compressor.errors import CompressorError, shorten
from compressor.models.adapters import PROJECTIONS

# Far above any released decoder (Llama 3.1 405B: 126 layers, hidden 16384, vocab 128256), far below
# what would make building the model on the meta device (or an error message) take minutes.
DIMENSION_LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 20,
                    "num_hidden_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024,
                    "head_dim": 1 << 12, "max_position_embeddings": 1 << 24}
REQUIRED_DIMENSIONS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
ROPE_TYPES = ("default", "linear", "llama3")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_dimensions(config: dict, where: str) -> None:
    """The shape fields: integers within DIMENSION_LIMITS, heads consistent, epsilon and RoPE sane."""
    for key, limit in DIMENSION_LIMITS.items():
        if key not in config or config[key] is None:
            if key in REQUIRED_DIMENSIONS:
                raise CompressorError(f"{where}: {key} is missing; a decoder config needs {', '.join(REQUIRED_DIMENSIONS)}")
            continue
        value = config[key]
        if not _is_int(value) or not 1 <= value <= limit:
            raise CompressorError(f"{where}: {key} must be an integer in 1..{limit}, got {shorten(value)}")
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if heads % kv:
        raise CompressorError(f"{where}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})")
    if not config.get("head_dim") and config["hidden_size"] % heads:
        raise CompressorError(f"{where}: hidden_size ({config['hidden_size']}) is not divisible by "
                              f"num_attention_heads ({heads}) and no head_dim is given")
    eps = config.get("rms_norm_eps", 1e-6)
    if not _positive_number(eps) or eps >= 1:
        raise CompressorError(f"{where}: rms_norm_eps must be a number in (0, 1), got {shorten(eps)}")
    rope = dict(config.get("rope_parameters") or {}) if isinstance(config.get("rope_parameters"), dict) else {}
    theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
    if not _positive_number(theta):
        raise CompressorError(f"{where}: rope_theta must be a positive number, got {shorten(theta)}")
    for key in ("rope_parameters", "rope_scaling", "rope_frequency_scaling"):
        scaling = config.get(key)
        if scaling is None:
            continue
        if not isinstance(scaling, dict):
            raise CompressorError(f"{where}: {key} must be an object, got {shorten(scaling)}")
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise CompressorError(f"{where}: {key}.rope_type {shorten(rope_type)} is not supported; "
                                  f"supported: {', '.join(ROPE_TYPES)}")
        for field in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if field in scaling and not _positive_number(scaling[field]):
                raise CompressorError(f"{where}: {key}.{field} must be a positive number, got {shorten(scaling[field])}")
        if rope_type == "llama3":
            missing = [f for f in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                       if f not in scaling]
            if missing:
                raise CompressorError(f"{where}: {key} of rope_type llama3 lacks {', '.join(missing)}")
        if rope_type == "linear" and "factor" not in scaling:
            raise CompressorError(f"{where}: {key} of rope_type linear lacks factor")


def estimated_parameters(config: dict, tied: bool = True) -> int:
    """Parameters of a Llama-family decoder with this config's dimensions (the weight matrices and
    norms; biases and q/k norms are small and left out, so this is a lower bound)."""
    hidden, inner, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    attention = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2
    per_layer = attention + 3 * hidden * inner + 2 * hidden
    embedding = config["vocab_size"] * hidden
    return embedding * (1 if tied else 2) + layers * per_layer + hidden


def _bool(value) -> bool:
    return isinstance(value, bool)


def check_artifact_config(config: dict, where: str) -> None:
    """An artifact's config.json: the dimensions, plus the toolkit's own per-layer fields."""
    check_dimensions(config, where)
    layers = config["num_hidden_layers"]
    blocks = config.get("block_configs")
    if blocks is not None:
        if not isinstance(blocks, list) or len(blocks) != layers:
            raise CompressorError(f"{where}: block_configs must be a list of {layers} entries (num_hidden_layers), "
                                  f"got {shorten(blocks)}")
        for i, block in enumerate(blocks):
            for kind in ("attention", "ffn"):
                unit = block.get(kind) if isinstance(block, dict) else None
                if not isinstance(unit, dict) or not _bool(unit.get("no_op")):
                    raise CompressorError(f"{where}: block_configs[{i}].{kind} must be an object with \"no_op\": "
                                          f"true or false, got {shorten(unit)}")
    for key in ("attention_bias", "attention_output_bias", "mlp_bias", "qk_norm", "tie_word_embeddings"):
        if key in config and not _bool(config[key]):
            raise CompressorError(f"{where}: {key} must be true or false, got {shorten(config[key])}")
    window = config.get("attention_window")
    if window is not None and (not _is_int(window) or window < 1):
        raise CompressorError(f"{where}: attention_window must be null or an integer >= 1, got {shorten(window)}")
    exact = config.get("exact_weights")
    if exact is not None:
        if not isinstance(exact, dict) or not all(isinstance(k, str) and _is_int(v) and v > 0 for k, v in exact.items()):
            raise CompressorError(f"{where}: exact_weights must map module names to counts >= 1, got {shorten(exact)}")
    sharing = config.get("weight_sharing")
    if sharing is not None:
        _check_sharing(sharing, config, where)
    for key in ("sparse_tokens", "quantization_config"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise CompressorError(f"{where}: {key} must be an object or null, got {shorten(config[key])}")


def _check_sharing(sharing, config: dict, where: str) -> None:
    layers = config["num_hidden_layers"]
    if not isinstance(sharing, list):
        raise CompressorError(f"{where}: weight_sharing must be a list of groups, got {shorten(sharing)}")
    bases, taken = set(), set()
    for i, group in enumerate(sharing):
        at = f"{where}: weight_sharing[{i}]"
        if not isinstance(group, dict):
            raise CompressorError(f"{at} must be an object, got {shorten(group)}")
        projection, members, rank, basis = (group.get(k) for k in ("projection", "layers", "rank", "basis"))
        if projection not in PROJECTIONS:
            raise CompressorError(f"{at}.projection {shorten(projection)} is not one of {', '.join(PROJECTIONS)}")
        if (not isinstance(members, list) or not members
                or not all(_is_int(layer) and 0 <= layer < layers for layer in members)):
            raise CompressorError(f"{at}.layers must be a non-empty list of layer indices in 0..{layers - 1}, "
                                  f"got {shorten(members)}")
        if not _is_int(rank) or not 1 <= rank <= 1 << 16:
            raise CompressorError(f"{at}.rank must be an integer >= 1, got {shorten(rank)}")
        residual = group.get("residual_rank") or 0
        if not _is_int(residual) or residual < 0:
            raise CompressorError(f"{at}.residual_rank must be an integer >= 0, got {shorten(residual)}")
        if not isinstance(basis, str) or not re.fullmatch(r"\w{1,100}", basis) or basis in bases:
            raise CompressorError(f"{at}.basis must be a distinct name of letters, digits and _, got {shorten(basis)}")
        bases.add(basis)
        for layer in members:
            if (layer, projection) in taken:
                raise CompressorError(f"{at}: {projection} of layer {layer} is in two groups")
            taken.add((layer, projection))
