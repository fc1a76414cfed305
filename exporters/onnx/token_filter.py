"""The sparse-token filter as one ONNX node: `compressor.SelectTokens`, with a FunctionProto body.

The node takes the filter layer's last-token query and all keys (after RoPE) and the prompt's
attention mask, and returns the kept prompt positions (batch, keep_tokens), increasing. Its body is
made of standard ops (MatMul, Softmax, ReduceSum, Conv for the average pool, CumSum, Where, TopK),
so ONNX Runtime inlines and runs it as is, and TensorRT can map the same node to a plugin.

In torch the node is the custom op `compressor::select_tokens`, whose implementation is
`graph_module.select_tokens_reference` (the selection of `sparse_tokens.select_positions`); the
exporter translates it to the node, and `add_function` puts the body into the model.
"""

from __future__ import annotations

import math

import onnx
import torch
from onnx import TensorProto, defs, helper

from exporters.onnx.attention_op import ref_attribute
from exporters.onnx.graph_module import select_tokens_reference

DOMAIN = "compressor"
OP_TYPE = "SelectTokens"
VERSION = 1
ATTRIBUTES = ("keep_tokens", "keep_first", "keep_last", "pool_width", "kv_groups")


@torch.library.custom_op("compressor::select_tokens", mutates_args=())
def select_tokens(query: torch.Tensor, keys: torch.Tensor, attention_mask: torch.Tensor, keep_tokens: int,
                  keep_first: int, keep_last: int, pool_width: int) -> torch.Tensor:
    return select_tokens_reference(query, keys, attention_mask, keep_tokens, keep_first, keep_last, pool_width)


@select_tokens.register_fake
def _select_tokens_shape(query, keys, attention_mask, keep_tokens, keep_first, keep_last, pool_width):
    return query.new_empty((query.shape[0], keep_tokens), dtype=torch.long)


def _schema():
    param = defs.OpSchema.FormalParameter
    attr = defs.OpSchema.Attribute
    return defs.OpSchema(
        OP_TYPE, DOMAIN, VERSION,
        inputs=[param("query", "T"), param("keys", "T"), param("attention_mask", "tensor(int64)")],
        outputs=[param("selected", "tensor(int64)")],
        type_constraints=[("T", ["tensor(float)"], "float queries and keys")],
        attributes=[attr(name, defs.OpSchema.AttrType.INT, name) for name in ATTRIBUTES])


def translation_table(kv_groups: int) -> dict:
    """The dynamo exporter's translation of the custom op into the `compressor.SelectTokens` node."""
    # onnxscript is optional and needed only to export: imported where it is used.
    from onnxscript import values

    node = values.Op(values.Opset(DOMAIN, VERSION), OP_TYPE, _schema())

    def translate(query, keys, attention_mask, keep_tokens: int, keep_first: int, keep_last: int, pool_width: int):
        return node(query, keys, attention_mask, keep_tokens=keep_tokens, keep_first=keep_first,
                    keep_last=keep_last, pool_width=pool_width, kv_groups=kv_groups)

    return {torch.ops.compressor.select_tokens.default: translate}


def function_proto(opset: int) -> onnx.FunctionProto:
    """The body: scores = avgpool(sum over heads of softmax(q k^T / sqrt(d))), first/last tokens forced,
    top keep_tokens, sorted by position. The 1/sqrt(d) scale is computed from the key's last dim."""
    n = helper.make_node
    f32 = TensorProto.FLOAT
    nodes = [
        ref_attribute("kv_groups", "groups"), ref_attribute("keep_tokens", "k_scalar"), ref_attribute("keep_first", "first"),
        ref_attribute("keep_last", "last"), ref_attribute("pool_width", "width"),
        n("Constant", [], ["zero_minus_one"], value_ints=[0, -1]),
        n("Constant", [], ["zero"], value_ints=[0]),
        n("Constant", [], ["axis0"], value_ints=[0]),
        n("Constant", [], ["axes12"], value_ints=[1, 2]),
        n("Constant", [], ["one_one"], value_ints=[1, 1]),
        n("Constant", [], ["neg_inf"], value=helper.make_tensor("neg_inf_value", f32, [], [-math.inf])),
        n("Constant", [], ["pos_inf"], value=helper.make_tensor("pos_inf_value", f32, [], [math.inf])),
        n("Constant", [], ["one_f"], value=helper.make_tensor("one_value", f32, [], [1.0])),
        n("Constant", [], ["one_i"], value=helper.make_tensor("one_i_value", TensorProto.INT64, [], [1])),
        n("Constant", [], ["axis1"], value=helper.make_tensor("axis1_value", TensorProto.INT64, [], [1])),
        # query (b, heads, 1, d) -> (b, kv heads, groups, d): query head h reads kv head h // groups.
        n("Unsqueeze", ["groups", "axis0"], ["groups_1d"]),
        n("Concat", ["zero_minus_one", "groups_1d", "zero"], ["query_shape"], axis=0),
        n("Reshape", ["query", "query_shape"], ["query_grouped"]),
        n("Transpose", ["keys"], ["keys_t"], perm=[0, 1, 3, 2]),
        n("MatMul", ["query_grouped", "keys_t"], ["dots"]),  # (b, kv heads, groups, tokens)
        n("Shape", ["keys"], ["head_dim_1d"], start=3, end=4),
        n("Cast", ["head_dim_1d"], ["head_dim_f"], to=f32),
        n("Sqrt", ["head_dim_f"], ["sqrt_d"]),
        n("Div", ["dots", "sqrt_d"], ["logits"]),
        n("Cast", ["attention_mask"], ["real"], to=TensorProto.BOOL),
        n("Unsqueeze", ["real", "axes12"], ["real_4d"]),
        n("Where", ["real_4d", "logits", "neg_inf"], ["masked"]),
        n("Softmax", ["masked"], ["probs"], axis=-1),
        n("ReduceSum", ["probs", "axes12"], ["head_sum"], keepdims=0),  # (b, tokens)
        # Average pool of odd width, zero padded, divided by the full width (torch avg_pool1d).
        n("Unsqueeze", ["head_sum", "axis1_1d"], ["pool_in"]),
        n("Unsqueeze", ["width", "axis0"], ["width_1d"]),
        n("Concat", ["one_one", "width_1d"], ["kernel_shape"], axis=0),
        n("Cast", ["width"], ["width_f"], to=f32),
        n("Div", ["one_f", "width_f"], ["tap"]),
        n("Expand", ["tap", "kernel_shape"], ["kernel"]),
        n("Conv", ["pool_in", "kernel"], ["pooled_3d"], auto_pad="SAME_UPPER"),
        n("Squeeze", ["pooled_3d", "axis1_1d"], ["pooled"]),
        # Rank of each token among the row's real tokens (left padding); force the first and last.
        n("CumSum", ["attention_mask", "axis1"], ["count_so_far"]),
        n("Sub", ["count_so_far", "one_i"], ["rank"]),
        n("ReduceSum", ["attention_mask", "axis1_1d"], ["count"], keepdims=1),
        n("Sub", ["count", "last"], ["last_start"]),
        n("Less", ["rank", "first"], ["is_first"]),
        n("GreaterOrEqual", ["rank", "last_start"], ["is_last"]),
        n("Or", ["is_first", "is_last"], ["edge"]),
        n("And", ["edge", "real"], ["forced"]),
        n("Where", ["forced", "pos_inf", "pooled"], ["scores_forced"]),
        n("Where", ["real", "scores_forced", "neg_inf"], ["scores"]),
        n("Unsqueeze", ["k_scalar", "axis0"], ["k"]),
        n("TopK", ["scores", "k"], ["top_values", "top_indices"], axis=-1, largest=1, sorted=1),
        n("TopK", ["top_indices", "k"], ["selected", "order"], axis=-1, largest=0, sorted=1),
    ]
    nodes.insert(0, n("Constant", [], ["axis1_1d"], value_ints=[1]))
    return helper.make_function(DOMAIN, OP_TYPE, ["query", "keys", "attention_mask"], ["selected"], nodes,
                                [helper.make_opsetid("", opset)], attributes=list(ATTRIBUTES))


def add_function(model: onnx.ModelProto, opset: int) -> None:
    """Adds the body of `compressor.SelectTokens` (once) and the domain's opset import."""
    if any(f.domain == DOMAIN and f.name == OP_TYPE for f in model.functions):
        return
    model.functions.append(function_proto(opset))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, VERSION))
