"""Architecture adapters: the only place that knows model families.

An adapter turns a transformers model of its family into the toolkit's `CompressedForCausalLM`
(config fields and weight names). Everything downstream (analysis, planning, removal, export) works
on that one model class, whose decoder layers expose `self_attn` / `mlp` units (either may be
absent), their norms, and the linears named in ATTENTION_LINEARS and MLP_LINEARS. Llama, Mistral,
Qwen2, Qwen3 and SmolLM (a Llama) share one adapter, since they share the weight layout; another
family is added as one more adapter here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.errors import CompressorError
from compressor.modeling import CompressedConfig, CompressedForCausalLM, build_with_weights

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_LINEARS + MLP_LINEARS


def _rope_settings(hf_config) -> tuple[float, dict | None]:
    """RoPE base and scaling, read from transformers 5 (`rope_parameters`) or 4 (`rope_theta`)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    theta = params.pop("rope_theta", None) or getattr(hf_config, "rope_theta", None) or 10000.0
    scaling = params or dict(getattr(hf_config, "rope_scaling", None) or {})
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(theta), scaling


@dataclass(frozen=True)
class LlamaFamilyAdapter:
    architecture: str

    def compressed_config(self, hf_config) -> CompressedConfig:
        family = self.architecture
        theta, scaling = _rope_settings(hf_config)
        window = None
        if family == "MistralForCausalLM":
            window = getattr(hf_config, "sliding_window", None)
        elif family in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and getattr(hf_config, "use_sliding_window", False):
            raise CompressorError(
                f"{family} with use_sliding_window=true is not supported; only full-attention Qwen models are"
            )
        qkv_bias = {"Qwen2ForCausalLM": True}.get(family, bool(getattr(hf_config, "attention_bias", False)))
        out_bias = False if family == "Qwen2ForCausalLM" else bool(getattr(hf_config, "attention_bias", False))
        act = getattr(hf_config, "hidden_act", "silu")
        if act != "silu":
            raise CompressorError(f"{family} with hidden_act={act!r} is not supported; allowed: silu")
        return CompressedConfig(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_hidden_layers=hf_config.num_hidden_layers,
            num_attention_heads=hf_config.num_attention_heads,
            num_key_value_heads=getattr(hf_config, "num_key_value_heads", None),
            head_dim=getattr(hf_config, "head_dim", None),
            rms_norm_eps=hf_config.rms_norm_eps,
            rope_theta=theta,
            rope_frequency_scaling=scaling,
            max_position_embeddings=hf_config.max_position_embeddings,
            attention_bias=qkv_bias,
            attention_output_bias=out_bias,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            qk_norm=family == "Qwen3ForCausalLM",
            attention_window=window,
            source_architecture=family,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            bos_token_id=getattr(hf_config, "bos_token_id", None),
            eos_token_id=getattr(hf_config, "eos_token_id", None),
            pad_token_id=getattr(hf_config, "pad_token_id", None),
        )

    def convert_state_dict(self, state_dict: dict, config: CompressedConfig) -> dict:
        """Weight names are shared by the family; drop buffers and the tied head."""
        out = {k: v for k, v in state_dict.items() if "rotary_emb" not in k}
        if config.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        return out


SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)


def adapter_for(hf_config) -> LlamaFamilyAdapter:
    archs = list(getattr(hf_config, "architectures", None) or [])
    model_type = getattr(hf_config, "model_type", "")
    by_type = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "compressor_decoder": "CompressedForCausalLM"}
    for arch in archs + [by_type.get(model_type, "")]:
        if arch in SUPPORTED_ARCHITECTURES or arch == "CompressedForCausalLM":
            return LlamaFamilyAdapter(arch)
    name = archs[0] if archs else model_type or "unknown"
    raise CompressorError(
        f"unsupported architecture {name!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)} (SmolLM is a Llama)"
    )


def to_compressed(hf_model: torch.nn.Module) -> CompressedForCausalLM:
    """The family model rebuilt as an uncompressed CompressedForCausalLM with the same weights."""
    adapter = adapter_for(hf_model.config)
    config = adapter.compressed_config(hf_model.config)
    state = {k: v.float() for k, v in adapter.convert_state_dict(hf_model.state_dict(), config).items()}
    return build_with_weights(config, state, f"conversion from {adapter.architecture}")
