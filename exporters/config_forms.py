"""config.json of an artifact in the form compressor.serving picks, and that form read back.

- standard: the source family's own config (LlamaForCausalLM / llama, MistralForCausalLM / mistral,
  Qwen2ForCausalLM / qwen2, Qwen3ForCausalLM / qwen3), for transformers and vLLM without this package;
- nemotron-nas: DeciLMForCausalLM with Nemotron-NAS block_configs (`no_op`, `replace_with_linear`,
  `n_heads_in_group`, `intermediate_size` per unit) and `configuration_decilm.py` beside it, named in
  `auto_map`, for vLLM (trust_remote_code=True runs that config class; it has no modeling code);
- toolkit: the CompressedConfig as it is (CompressedForCausalLM / compressor_decoder), as before.

The two standard forms carry `compressor_artifact` ({"form", "source_architecture"}), a key other
readers ignore, which tells the toolkit's loader the folder is one of its artifacts. Every form reads
back (`compressed_config`) as the same CompressedConfig; a standard form is written only after it
has been read back through transformers' own config class and the family adapter and found equal.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig

from compressor.errors import CompressorError, one_line
from compressor.modeling import CompressedConfig, NemotronNasConfig, config_with
from compressor.models.adapters import LlamaFamilyAdapter
from compressor.models.config_checks import check_artifact_config, check_dimensions
from compressor.serving import config_form, require_targets

MARKER = "compressor_artifact"
FAMILY_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                "Qwen3ForCausalLM": "qwen3"}
NEMOTRON_ARCHITECTURE = "DeciLMForCausalLM"
CONFIG_CLASS_FILE = "configuration_decilm.py"
SHIPPED = Path(__file__).parent / "shipped"
# The fields a standard form must reproduce when read back (everything the model computes with).
COMPARED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_frequency_scaling",
                   "max_position_embeddings", "attention_bias", "attention_output_bias", "mlp_bias", "qk_norm",
                   "attention_window", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
                   "source_architecture", "block_configs")


def _rope(config: CompressedConfig) -> dict:
    scaling = config.rope_frequency_scaling
    fields = {"rope_theta": config.rope_theta,
              "rope_parameters": dict(scaling or {"rope_type": "default"}, rope_theta=config.rope_theta)}
    if scaling:
        fields["rope_scaling"] = dict(scaling)  # what readers of the older convention look for
    return fields


def _shared_fields(config: CompressedConfig) -> dict:
    fields = {key: getattr(config, key) for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
        "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")}
    fields.update(_rope(config))
    dtype = getattr(config, "dtype", None)
    fields["dtype"] = str(dtype).replace("torch.", "") if dtype is not None else "float32"
    fields["use_cache"] = True
    quantization = getattr(config, "quantization_config", None)
    if quantization:
        fields["quantization_config"] = quantization
    return fields


def _family_fields(config: CompressedConfig, family: str) -> dict:
    no_window = {"use_sliding_window": False, "sliding_window": None, "max_window_layers": config.num_hidden_layers}
    if family == "LlamaForCausalLM":
        return {"attention_bias": config.attention_bias, "mlp_bias": config.mlp_bias}
    if family == "MistralForCausalLM":
        return {"sliding_window": config.attention_window}
    if family == "Qwen2ForCausalLM":
        return no_window
    return dict(no_window, attention_bias=config.attention_bias)  # Qwen3


def standard_config(config: CompressedConfig) -> dict:
    family = config.source_architecture
    data = {"architectures": [family], "model_type": FAMILY_TYPES[family], **_shared_fields(config),
            **_family_fields(config, family), MARKER: {"form": "standard", "source_architecture": family}}
    _check_reads_back(config, data)
    return data


def nemotron_config(config: CompressedConfig) -> dict:
    heads_in_group = config.num_attention_heads // config.num_key_value_heads
    blocks = []
    for layer in range(config.num_hidden_layers):
        attention, mlp = config.has_attention(layer), config.has_mlp(layer)
        blocks.append({
            "attention": {"no_op": not attention, "replace_with_linear": False,
                          "n_heads_in_group": heads_in_group if attention else None},
            "ffn": {"no_op": not mlp, "replace_with_linear": False,
                    "intermediate_size": config.intermediate_size if mlp else None}})
    data = {"architectures": [NEMOTRON_ARCHITECTURE], "model_type": NemotronNasConfig.model_type,
            "auto_map": {"AutoConfig": f"{Path(CONFIG_CLASS_FILE).stem}.DeciLMConfig"},
            **_shared_fields(config), "attention_bias": config.attention_bias, "mlp_bias": config.mlp_bias,
            # A Mistral window no shorter than the context (vLLM's class has none; it changes nothing).
            "attention_window": config.attention_window, "block_configs": blocks,
            MARKER: {"form": "nemotron-nas", "source_architecture": config.source_architecture}}
    _check_reads_back(config, data)
    return data


def artifact_config(config: CompressedConfig) -> tuple[str, dict | None, dict[str, str]]:
    """(form, config.json data, extra files name -> text). The data is None for the toolkit form,
    which the config's own save_pretrained writes."""
    form = config_form(config)
    if form == "standard":
        return form, standard_config(config), {}
    if form == "nemotron-nas":
        return form, nemotron_config(config), {CONFIG_CLASS_FILE: (SHIPPED / CONFIG_CLASS_FILE).read_text()}
    return form, None, {}


def write_config(config: CompressedConfig, folder: Path, serve=()) -> str:
    """Writes config.json (and the config class file of the Nemotron-NAS form); returns the form.
    Refuses (before writing) a config that a `serve` target would not load."""
    require_targets(config, serve)
    form, data, files = artifact_config(config)
    if data is None:
        if not getattr(config, "architectures", None):
            config.architectures = ["CompressedForCausalLM"]  # what the model's own save_pretrained writes
        config.save_pretrained(folder)
    else:
        (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    for name, text in files.items():
        (folder / name).write_text(text)
    return form


def form_of(data: dict) -> str | None:
    """The form of a config.json's data, or None when it is not an artifact of this toolkit."""
    if data.get("model_type") == CompressedConfig.model_type:
        return "toolkit"
    marker = data.get(MARKER)
    if isinstance(marker, dict) and marker.get("form") in ("standard", "nemotron-nas"):
        return marker["form"]
    return None


def compressed_config(data: dict, where: str) -> CompressedConfig:
    """The CompressedConfig that a config.json's data describes, in any form."""
    form = form_of(data)
    if form is None:
        raise CompressorError(f"{where}: model_type is {data.get('model_type')!r} without the "
                              f"{MARKER!r} key: not an artifact written by this toolkit")
    try:
        if form == "toolkit":
            check_artifact_config(data, where)
            return CompressedConfig.from_dict(data)
        if form == "nemotron-nas":
            if data.get("model_type") != NemotronNasConfig.model_type:
                raise CompressorError(f"{where}: {MARKER}.form is nemotron-nas but model_type is "
                                      f"{data.get('model_type')!r}")
            check_artifact_config(data, where)
            fields = {k: v for k, v in data.items() if k not in ("architectures", "auto_map", MARKER)}
            fields["source_architecture"] = data[MARKER].get("source_architecture")
            return config_with(NemotronNasConfig(**fields))
        return _from_standard(data, where)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CompressorError(f"{where}: not a valid artifact config ({one_line(exc, 200)})") from None


def _from_standard(data: dict, where: str) -> CompressedConfig:
    family = (data.get(MARKER) or {}).get("source_architecture")
    if FAMILY_TYPES.get(family) != data.get("model_type") or data.get("architectures") != [family]:
        raise CompressorError(f"{where}: architectures {data.get('architectures')!r} and model_type "
                              f"{data.get('model_type')!r} do not match {MARKER}.source_architecture {family!r}")
    check_dimensions(data, where)
    fields = {k: v for k, v in data.items() if k not in ("architectures", "model_type", MARKER)}
    family_config = AutoConfig.for_model(data["model_type"], **fields)
    config = LlamaFamilyAdapter(family).compressed_config(family_config)
    if data.get("quantization_config"):
        config.quantization_config = data["quantization_config"]
    config.dtype = data.get("dtype", "float32")
    return config


def _check_reads_back(config: CompressedConfig, data: dict) -> None:
    back = compressed_config(json.loads(json.dumps(data)), "the written config.json")
    differ = [k for k in COMPARED_FIELDS if getattr(back, k) != getattr(config, k)]
    if differ:
        key = differ[0]
        raise CompressorError(f"config.json in the {data[MARKER]['form']} form reads back with {key} = "
                              f"{getattr(back, key)!r} instead of {getattr(config, key)!r}; this is a bug of the "
                              "toolkit, please report it")
