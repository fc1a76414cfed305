"""Sub-layer removal: rebuild the model without the units a plan removes.

The result is a new CompressedForCausalLM whose `block_configs` mark removed units as no-ops;
their modules, weights and KV-cache slots do not exist.
"""

from __future__ import annotations

from compressor.errors import CompressorError
from compressor.modeling import CompressedConfig, CompressedForCausalLM, build_with_weights
from compressor.plan import block_configs, sparse_settings


def remove_units(model: CompressedForCausalLM, plan: dict) -> CompressedForCausalLM:
    config_dict = model.config.to_dict()
    if len(plan["layers"]) != model.config.num_hidden_layers:
        raise CompressorError(
            f"plan has {len(plan['layers'])} layers but the model has {model.config.num_hidden_layers}")
    for i, decision in enumerate(plan["layers"]):
        for kind, present in (("attention", model.config.has_attention(i)), ("mlp", model.config.has_mlp(i))):
            if decision[kind] == "keep" and not present:
                raise CompressorError(f"plan keeps layers[{i}].{kind} but the model has no such unit")
    config_dict["block_configs"] = block_configs(plan)
    if config_dict.get("weight_sharing"):
        # A shared basis stays for the layers that keep the projection's unit (none left: it goes).
        from compressor.transforms.share import unit_of

        kept = []
        for group in config_dict["weight_sharing"]:
            layers = [layer for layer in group["layers"] if plan["layers"][layer][unit_of(group["projection"])] == "keep"]
            if layers:
                kept.append(dict(group, layers=layers))
        config_dict["weight_sharing"] = kept or None
    if plan.get("sparse_tokens"):
        config_dict["sparse_tokens"] = sparse_settings(plan)
    config = CompressedConfig(**{k: v for k, v in config_dict.items() if k not in ("model_type", "transformers_version")})
    if config.sparse_tokens:
        from compressor.transforms.sparse_tokens import SparseTokenSettings, check_settings

        check_settings(SparseTokenSettings.from_dict(config.sparse_tokens), config, "plan sparse_tokens")
    # Tensors of removed units are simply not taken (load ignores keys the new model lacks).
    return build_with_weights(config, model.state_dict(), "removal")
