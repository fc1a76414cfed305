"""Load-time rewrite for ONNX Runtime on CPU: each `compressor.CachedAttention` and `compressor.Rotary`
node (see `exporters.onnx.attention_op`) becomes ONNX Runtime's fused `com.microsoft` kernel,
GroupQueryAttention and RotaryEmbedding.

At one token a step, the nodes' bodies (about 30 small nodes a layer: reshapes, transposes, splits,
the cache concatenations, the products, the mask and the softmax) cost more in per-node overhead than
in arithmetic; the fused kernels do each in one call.

- GroupQueryAttention takes the node's own inputs: queries, keys and values in the projections'
  layout, past keys and values (batch, kv heads, past, dim) and the additive mask as its
  `attention_bias`. With every row's `seqlens_k` set to the whole buffer (past + seq - 1), its
  causal mask lets query i see keys 0 .. past + i, which is the body's causal part; left padding
  and a sliding window stay in the additive mask.
- RotaryEmbedding reads cos and sin from a table by position id. The step's own (batch, seq, dim / 2)
  cos and sin, flattened to (batch x seq, dim / 2), are that table, and token (b, s) reads row
  b x seq + s: each token gets its own angles, whatever its position (left padding) or the model's
  RoPE scaling.

The artifact keeps the standard graph; this runs on the in-memory graph before the session is made,
as `int8_split` does. Imports onnx only (no torch), like the loader.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from exporters.onnx.quantized_graph import CONTRIB_DOMAIN

DOMAIN = "compressor"
OP_TYPE = "CachedAttention"
ROTARY_OP = "Rotary"
VERSION = 1


def has_fusable_nodes(model: onnx.ModelProto) -> bool:
    """Whether the graph holds `compressor.CachedAttention` or `compressor.Rotary` nodes."""
    return any(node.op_type in (OP_TYPE, ROTARY_OP) and node.domain == DOMAIN for node in model.graph.node)


def _attribute(node: onnx.NodeProto, name: str):
    return helper.get_attribute_value(next(a for a in node.attribute if a.name == name))


def _int64(name: str, value: int) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name + "_value", TensorProto.INT64, [], [value]))


def fuse_nodes(model: onnx.ModelProto, mask_input: str = "attention_mask") -> int:
    """Replaces every `compressor.CachedAttention` node by `com.microsoft.GroupQueryAttention` and
    every `compressor.Rotary` by `com.microsoft.RotaryEmbedding` (CPU, float32), in place; returns
    how many nodes were replaced. `seqlens_k` and `total_sequence_length` are computed once from the
    graph input `mask_input` (batch, past + seq), the rotary tables once per cos / sin pair."""
    ours = [node for node in model.graph.node if node.domain == DOMAIN and node.op_type in (OP_TYPE, ROTARY_OP)]
    if not ours:
        return 0
    n = helper.make_node
    prefix = "fused_attention."
    total, seqlens = prefix + "total_sequence_length", prefix + "seqlens_k"
    added = [
        n("Constant", [], [prefix + "zero_1d"], value_ints=[0]),
        n("Constant", [], [prefix + "minus_one_1d"], value_ints=[-1]),
        _int64(prefix + "zero", 0), _int64(prefix + "one", 1),
        n("Shape", [mask_input], [prefix + "mask_shape"]),
        n("Gather", [prefix + "mask_shape", prefix + "zero"], [prefix + "batch"]),
        n("Gather", [prefix + "mask_shape", prefix + "one"], [prefix + "total_64"]),
        n("Cast", [prefix + "total_64"], [total], to=TensorProto.INT32),
        n("Sub", [prefix + "total_64", prefix + "one"], [prefix + "last_64"]),
        n("Unsqueeze", [prefix + "batch", prefix + "zero_1d"], [prefix + "batch_1d"]),
        n("Expand", [prefix + "last_64", prefix + "batch_1d"], [prefix + "seqlens_64"]),
        n("Cast", [prefix + "seqlens_64"], [seqlens], to=TensorProto.INT32),
    ]
    before = {id(ours[0]): added}  # nodes to insert before a node: what it is the first to read
    tables: dict[tuple[str, str], tuple[str, str, str]] = {}

    def rotary_inputs(node, cos: str, sin: str) -> tuple[str, str, str]:
        """(position ids, cos table, sin table) for one pair of (batch, seq, dim / 2) inputs."""
        if (cos, sin) not in tables:
            p = f"{prefix}rotary{len(tables)}."
            before.setdefault(id(node), []).extend([
                n("Shape", [cos], [p + "shape"], start=0, end=2),  # (batch, seq)
                n("ReduceProd", [p + "shape"], [p + "rows_1d"], keepdims=1),
                n("Squeeze", [p + "rows_1d"], [p + "rows"]),
                n("Range", [prefix + "zero", p + "rows", prefix + "one"], [p + "row_ids"]),
                n("Reshape", [p + "row_ids", p + "shape"], [p + "position_ids"]),
                n("Shape", [cos], [p + "half"], start=2, end=3),
                n("Concat", [prefix + "minus_one_1d", p + "half"], [p + "table_shape"], axis=0),
                n("Reshape", [cos, p + "table_shape"], [p + "cos_table"]),
                n("Reshape", [sin, p + "table_shape"], [p + "sin_table"]),
            ])
            tables[(cos, sin)] = (p + "position_ids", p + "cos_table", p + "sin_table")
        return tables[(cos, sin)]

    fused = {}
    for node in ours:
        if node.op_type == OP_TYPE:
            query, key, value, past_key, past_value, mask = node.input
            fused[id(node)] = n("GroupQueryAttention",
                                [query, key, value, past_key, past_value, seqlens, total, "", "", "", mask],
                                list(node.output), name=node.name, domain=CONTRIB_DOMAIN,
                                num_heads=_attribute(node, "num_heads"), kv_num_heads=_attribute(node, "kv_num_heads"),
                                scale=_attribute(node, "scale"))
        else:
            x, cos, sin = node.input
            positions, cos_table, sin_table = rotary_inputs(node, cos, sin)
            fused[id(node)] = n("RotaryEmbedding", [x, positions, cos_table, sin_table], list(node.output),
                                name=node.name, domain=CONTRIB_DOMAIN, interleaved=0)
    rewritten = []
    for node in model.graph.node:
        rewritten.extend(before.get(id(node), []))
        rewritten.append(fused.get(id(node), node))
    del model.graph.node[:]
    model.graph.node.extend(rewritten)
    kept = [f for f in model.functions if not (f.domain == DOMAIN and f.name in (OP_TYPE, ROTARY_OP))]
    del model.functions[:]
    model.functions.extend(kept)
    if not any(o.domain == CONTRIB_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    return len(ours)
