"""A layer's RoPE and its cached grouped-query attention as one ONNX node each, `compressor.Rotary`
and `compressor.CachedAttention`, with FunctionProto bodies of standard ops.

`Rotary` takes queries or keys in the projections' layout (batch, seq, heads x head dim) and the
step's cos and sin of one half (batch, seq, head dim / 2); it returns them rotated (rotate-half
form). `CachedAttention` takes a layer's queries and keys after RoPE and its values in the same
layout, the layer's past keys and values (batch, kv heads, past, head dim) and the step's additive
mask (batch, 1, seq, past + seq); it returns the attention output (batch, seq, heads x head dim)
and the present keys and values (the past with this step's appended). Query head h reads kv head
h // (heads / kv heads), as in `graph_module.cached_attention_reference`.

Every ONNX runtime inlines the bodies and computes what the torch model computes; ONNX Runtime's
CPU loader runs the nodes as its own fused kernels instead (`exporters.onnx.fused_attention`).

In torch the nodes are the custom ops `compressor::rotary` and `compressor::cached_attention`
(`graph_module.rotary`, `graph_module.cached_attention`, implemented by the `_reference` functions
beside them); the exporter translates them into the nodes and `add_functions` puts the bodies into
the model.
"""

from __future__ import annotations

import onnx
import torch
from onnx import defs, helper

from exporters.onnx import graph_module  # noqa: F401  (registers the custom ops compressor::rotary, ::cached_attention)
from exporters.onnx.fused_attention import DOMAIN, OP_TYPE, ROTARY_OP, VERSION

INT, FLOAT = defs.OpSchema.AttrType.INT, defs.OpSchema.AttrType.FLOAT


def _schema(name: str, inputs: list[str], outputs: list[str], attributes: dict):
    param = defs.OpSchema.FormalParameter
    return defs.OpSchema(name, DOMAIN, VERSION, inputs=[param(i, "T") for i in inputs],
                         outputs=[param(o, "T") for o in outputs],
                         type_constraints=[("T", ["tensor(float)"], "float activations and cache")],
                         attributes=[defs.OpSchema.Attribute(a, kind, a) for a, kind in attributes.items()])


def translation_table() -> dict:
    """The dynamo exporter's translations of the custom ops into the two nodes."""
    # onnxscript is optional and needed only to export: imported where it is used.
    from onnxscript import values

    def op(name, inputs, outputs, attributes):
        return values.Op(values.Opset(DOMAIN, VERSION), name, _schema(name, inputs, outputs, attributes))

    attention = op(OP_TYPE, ["query", "key", "value", "past_key", "past_value", "mask"],
                   ["output", "present_key", "present_value"], {"num_heads": INT, "kv_num_heads": INT, "scale": FLOAT})
    rotate = op(ROTARY_OP, ["input", "cos", "sin"], ["output"], {"num_heads": INT})

    def translate_attention(query, key, value, past_key, past_value, mask, num_heads: int, kv_num_heads: int,
                            scale: float):
        return attention(query, key, value, past_key, past_value, mask, num_heads=num_heads,
                         kv_num_heads=kv_num_heads, scale=scale)

    def translate_rotary(x, cos, sin, num_heads: int):
        return rotate(x, cos, sin, num_heads=num_heads)

    return {torch.ops.compressor.cached_attention.default: translate_attention,
            torch.ops.compressor.rotary.default: translate_rotary}


def ref_attribute(name: str, output: str, kind: str = "value_int") -> onnx.NodeProto:
    """A Constant node whose value is the function attribute `name` (kind: value_int or value_float)."""
    node = helper.make_node("Constant", [], [output])
    attribute_type = onnx.AttributeProto.INT if kind == "value_int" else onnx.AttributeProto.FLOAT
    node.attribute.append(onnx.AttributeProto(name=kind, ref_attr_name=name, type=attribute_type))
    return node


def _shape_constants() -> list[onnx.NodeProto]:
    """The axes and shape pieces both bodies use: axis0, axis2, zero_zero, minus_one, zero_zero_minus_one."""
    values = {"axis0": [0], "axis2": [2], "zero_zero": [0, 0], "minus_one": [-1], "zero_zero_minus_one": [0, 0, -1]}
    return [helper.make_node("Constant", [], [name], value_ints=v) for name, v in values.items()]


def rotary_function(opset: int) -> onnx.FunctionProto:
    """The body, as `graph_module.rotary_reference` computes it: each head's halves x1, x2 become
    (x1 c - x2 s, x2 c + x1 s)."""
    n = helper.make_node
    nodes = [
        ref_attribute("num_heads", "heads", "value_int"),
        *_shape_constants(),
        n("Unsqueeze", ["heads", "axis0"], ["heads_1d"]),
        n("Concat", ["zero_zero", "heads_1d", "minus_one"], ["heads_shape"], axis=0),
        n("Reshape", ["input", "heads_shape"], ["x"]),  # (b, seq, heads, d)
        n("Split", ["x"], ["x1", "x2"], axis=-1, num_outputs=2),
        n("Unsqueeze", ["cos", "axis2"], ["c"]),
        n("Unsqueeze", ["sin", "axis2"], ["s"]),
        n("Mul", ["x1", "c"], ["x1c"]),
        n("Mul", ["x2", "s"], ["x2s"]),
        n("Mul", ["x2", "c"], ["x2c"]),
        n("Mul", ["x1", "s"], ["x1s"]),
        n("Sub", ["x1c", "x2s"], ["first"]),
        n("Add", ["x2c", "x1s"], ["second"]),
        n("Concat", ["first", "second"], ["rotated"], axis=-1),
        n("Reshape", ["rotated", "zero_zero_minus_one"], ["output"]),
    ]
    return helper.make_function(DOMAIN, ROTARY_OP, ["input", "cos", "sin"], ["output"], nodes,
                                [helper.make_opsetid("", opset)], attributes=["num_heads"])


def attention_function(opset: int) -> onnx.FunctionProto:
    """The body, as `graph_module.cached_attention_reference` computes it: queries grouped by their kv
    head (b, kv heads, groups, seq, d), keys and values appended to the past, softmax(q k^T scale +
    mask) v, back to (b, seq, heads x d)."""
    n = helper.make_node
    nodes = [
        ref_attribute("kv_num_heads", "kv_heads", "value_int"),
        ref_attribute("num_heads", "heads", "value_int"),
        ref_attribute("scale", "scale_value", "value_float"),
        *_shape_constants(),
        n("Div", ["heads", "kv_heads"], ["groups"]),
        n("Unsqueeze", ["kv_heads", "axis0"], ["kv_heads_1d"]),
        n("Unsqueeze", ["groups", "axis0"], ["groups_1d"]),
        n("Concat", ["zero_zero", "kv_heads_1d", "groups_1d", "minus_one"], ["query_shape"], axis=0),
        n("Concat", ["zero_zero", "kv_heads_1d", "minus_one"], ["kv_shape"], axis=0),
        n("Reshape", ["query", "query_shape"], ["query_5d"]),
        n("Transpose", ["query_5d"], ["query_grouped"], perm=[0, 2, 3, 1, 4]),  # (b, kv heads, groups, seq, d)
        n("Reshape", ["key", "kv_shape"], ["key_4d"]),
        n("Transpose", ["key_4d"], ["key_heads"], perm=[0, 2, 1, 3]),
        n("Reshape", ["value", "kv_shape"], ["value_4d"]),
        n("Transpose", ["value_4d"], ["value_heads"], perm=[0, 2, 1, 3]),
        n("Concat", ["past_key", "key_heads"], ["present_key"], axis=2),
        n("Concat", ["past_value", "value_heads"], ["present_value"], axis=2),
        n("Unsqueeze", ["present_key", "axis2"], ["key_5d"]),
        n("Transpose", ["key_5d"], ["key_t"], perm=[0, 1, 2, 4, 3]),
        n("MatMul", ["query_grouped", "key_t"], ["dots"]),
        n("Mul", ["dots", "scale_value"], ["scaled"]),
        n("Unsqueeze", ["mask", "axis2"], ["mask_5d"]),
        n("Add", ["scaled", "mask_5d"], ["logits"]),
        n("Softmax", ["logits"], ["probs"], axis=-1),
        n("Unsqueeze", ["present_value", "axis2"], ["value_5d"]),
        n("MatMul", ["probs", "value_5d"], ["context"]),  # (b, kv heads, groups, seq, d)
        n("Transpose", ["context"], ["context_t"], perm=[0, 3, 1, 2, 4]),
        n("Reshape", ["context_t", "zero_zero_minus_one"], ["output"]),
    ]
    return helper.make_function(DOMAIN, OP_TYPE, ["query", "key", "value", "past_key", "past_value", "mask"],
                                ["output", "present_key", "present_value"], nodes, [helper.make_opsetid("", opset)],
                                attributes=["num_heads", "kv_num_heads", "scale"])


def add_functions(model: onnx.ModelProto, opset: int) -> None:
    """Adds the bodies of the nodes the graph uses (once each) and the domain's opset import."""
    used = {node.op_type for node in model.graph.node if node.domain == DOMAIN}
    bodies = {OP_TYPE: attention_function, ROTARY_OP: rotary_function}
    for name, body in bodies.items():
        if name in used and not any(f.domain == DOMAIN and f.name == name for f in model.functions):
            model.functions.append(body(opset))
    if used & set(bodies) and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, VERSION))
