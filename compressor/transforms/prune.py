"""Sub-layer removal: rebuild the model without the units a plan's layer table removes.

The result is a new CompressedForCausalLM whose `block_configs` mark removed units as no-ops;
their modules, weights and KV-cache slots do not exist.
"""

from __future__ import annotations

from compressor.errors import CompressorError
from compressor.execution.offload import with_config
from compressor.modeling import CompressedForCausalLM, config_with
from compressor.transforms.share import unit_of


def block_configs(plan: dict) -> list[dict]:
    """The config.json `block_configs` a plan implies (a unit already absent stays absent)."""
    return [{"attention": {"no_op": d["attention"] != "keep"}, "ffn": {"no_op": d["mlp"] != "keep"}}
            for d in plan["layers"]]


def remove_units(model: CompressedForCausalLM, plan: dict) -> CompressedForCausalLM:
    if len(plan["layers"]) != model.config.num_hidden_layers:
        raise CompressorError(
            f"plan has {len(plan['layers'])} layers but the model has {model.config.num_hidden_layers}")
    for i, decision in enumerate(plan["layers"]):
        for kind, present in (("attention", model.config.has_attention(i)), ("mlp", model.config.has_mlp(i))):
            if decision[kind] == "keep" and not present:
                raise CompressorError(f"plan keeps layers[{i}].{kind} but the model has no such unit")
    changes = {"block_configs": block_configs(plan)}
    if model.config.weight_sharing:
        # A shared basis stays for the layers that keep the projection's unit (none left: it goes).
        kept = []
        for group in model.config.weight_sharing:
            layers = [layer for layer in group["layers"] if plan["layers"][layer][unit_of(group["projection"])] == "keep"]
            if layers:
                kept.append(dict(group, layers=layers))
        changes["weight_sharing"] = kept or None
    # Tensors of removed units are simply not taken (load ignores keys the new model lacks).
    return with_config(model, config_with(model.config, **changes), "removal")
