"""16-bit activations for TensorRT engines (`tensorrt.precision: float16 | bfloat16`).

TensorRT for RTX (like TensorRT 11) is strongly typed: each layer runs in the types its ONNX graph
gives it, so int4 and int8 weights run as W4A16 / W8A16 only when the graph's matrix products take
16-bit inputs. `sixteen_bit_products` rewrites a prepared graph so that:

- every MatMul (the linears, the attention products, the head) takes 16-bit inputs: quantized
  weights through a DequantizeLinear whose scales are 16-bit, float weights and the float embedding
  table stored in 16 bits, activations cast; its output is cast back to float32;
- the KV cache (past_key_values.* in, present.* out) is 16-bit, half the memory of float32;
- everything else stays float32: the residual stream, RMSNorm (x squared overflows float16 above
  256), rotary angles (float16 cannot hold position x frequency to a radian past 2048), softmax, and
  the token filter's scores.

float16 keeps 10 mantissa bits, bfloat16 7 with float32's range. The logits' distance from the
float32 graph is measured in tests/test_tensorrt.py (ONNX Runtime, float16; ONNX Runtime's CPU has no
bfloat16 matrix product, so bfloat16 graphs are only built here).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compressor.errors import CompressorError
from exporters.tensorrt.prepare import Graph

PRECISIONS = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
CACHE_INPUT, CACHE_OUTPUT = "past_key_values.", "present."


def _sixteen_bit_tensor(values: np.ndarray, name: str, data_type: int) -> onnx.TensorProto:
    values = np.ascontiguousarray(values, dtype=np.float32)
    if data_type == TensorProto.FLOAT16:
        return numpy_helper.from_array(values.astype(np.float16), name)
    # bfloat16: float32's top 16 bits, rounded to nearest even.
    bits = values.view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return helper.make_tensor(name, TensorProto.BFLOAT16, values.shape, rounded.tobytes(), raw=True)


def sixteen_bit_products(model: onnx.ModelProto, precision: str = "float16") -> dict:
    """Rewrites `model` in place (see the module's docstring); returns counts of what changed."""
    if precision not in PRECISIONS:
        raise CompressorError(f"tensorrt precision {precision!r}: allowed: {', '.join(PRECISIONS)}")
    data_type = PRECISIONS[precision]
    record = {"precision": precision, "matmuls": 0, "weights": 0, "casts": 0, "cache_tensors": 0}
    if data_type == TensorProto.FLOAT:
        return record
    g = Graph(model)
    producers = g.producer()
    sixteen: dict[str, str] = {}  # a float tensor -> its 16-bit twin
    # Keyed by a node's first output (protobuf gives no stable identity to a graph's nodes).
    before: dict[str, list[onnx.NodeProto]] = {}  # nodes to insert before that node
    after: dict[str, list[onnx.NodeProto]] = {}

    def cast(name: str, to: int, output: str) -> onnx.NodeProto:
        record["casts"] += 1
        return helper.make_node("Cast", [name], [output], to=to)

    def twin(name: str, reader: onnx.NodeProto) -> str:
        """The 16-bit version of `name`, made (once) before `reader` needs it."""
        if name in sixteen:
            return sixteen[name]
        target = f"{name}_{precision}"
        source = producers.get(name)
        if name in g.initializers and g.initializers[name].data_type == TensorProto.FLOAT:
            g.add(_sixteen_bit_tensor(g.array(name), target, data_type))
            record["weights"] += 1
        elif source is not None and source.op_type == "DequantizeLinear" and source.input[1] in g.initializers:
            scale = f"{source.input[1]}_{precision}"
            if scale not in g.initializers:
                g.add(_sixteen_bit_tensor(g.array(source.input[1]), scale, data_type))
            clone = onnx.NodeProto()
            clone.CopyFrom(source)
            clone.input[1], clone.output[0] = scale, target
            before.setdefault(reader.output[0], []).append(clone)
            record["weights"] += 1
        elif source is not None and source.op_type == "Transpose" and (
                source.input[0] in g.initializers or producers.get(source.input[0]) is not None
                and producers[source.input[0]].op_type == "DequantizeLinear"):
            inner = twin(source.input[0], reader)  # the tied head: the table transposed in 16 bits
            clone = onnx.NodeProto()
            clone.CopyFrom(source)
            clone.input[0], clone.output[0] = inner, target
            before.setdefault(reader.output[0], []).append(clone)
        else:
            before.setdefault(reader.output[0], []).append(cast(name, data_type, target))
        sixteen[name] = target
        return target

    for node in g.graph.node:
        if node.op_type != "MatMul":
            continue
        node.input[0], node.input[1] = twin(node.input[0], node), twin(node.input[1], node)
        output = node.output[0]
        node.output[0] = f"{output}_{precision}_product"
        sixteen[output] = node.output[0]  # a product read by another product (shared weights) stays 16-bit
        if output in before:
            before[node.output[0]] = before.pop(output)
        after.setdefault(node.output[0], []).append(cast(node.output[0], TensorProto.FLOAT, output))
        record["matmuls"] += 1

    # A float table the head now reads in 16 bits (the tied embedding) is gathered from its twin
    # too, each row cast to float32, so the engine holds one copy.
    added = [n for group in (*before.values(), *after.values()) for n in group]
    live = {i for n in (*g.graph.node, *added) for i in n.input} | {o.name for o in g.graph.output}
    readers = g.consumers()
    for name, target in sixteen.items():
        # Readers whose outputs nothing reads any more (a Transpose the head read before) do not count.
        gathers = [n for n in readers.get(name, []) if n is None or any(o in live for o in n.output)]
        if name in g.initializers and gathers and all(n is not None and n.op_type == "Gather" and n.input[0] == name
                                                      for n in gathers):
            for gather in gathers:
                gather.input[0] = target
                row = gather.output[0]
                gather.output[0] = f"{row}_{precision}_rows"
                if row in before:
                    before[gather.output[0]] = before.pop(row)
                after.setdefault(gather.output[0], []).append(cast(gather.output[0], TensorProto.FLOAT, row))

    # The KV cache in 16 bits at the graph's edges; the graph computes with it in float32.
    renamed: dict[str, str] = {}
    entry: list[onnx.NodeProto] = []
    for value in g.graph.input:
        if value.name.startswith(CACHE_INPUT) and value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = data_type
            renamed[value.name] = f"{value.name}_float32"
            entry.append(cast(value.name, TensorProto.FLOAT, renamed[value.name]))
            record["cache_tensors"] += 1
    for node in g.graph.node:
        for k, name in enumerate(node.input):
            if name in renamed:
                node.input[k] = renamed[name]
    exits: list[onnx.NodeProto] = []
    outputs = {o.name: o for o in g.graph.output}
    for name, value in outputs.items():
        if name.startswith(CACHE_OUTPUT) and value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = data_type
            inner = f"{name}_float32"
            for node in [*g.graph.node, *(n for group in (*before.values(), *after.values()) for n in group)]:
                for k, out in enumerate(node.output):
                    if out == name:
                        node.output[k] = inner
                for k, used in enumerate(node.input):
                    if used == name:
                        node.input[k] = inner
            exits.append(cast(inner, data_type, name))
            record["cache_tensors"] += 1

    nodes = entry[:]
    for node in g.graph.node:
        key = node.output[0] if node.output else ""
        nodes += before.get(key, []) + [node] + after.get(key, [])
    nodes += exits
    del g.graph.node[:]
    g.graph.node.extend(nodes)
    g.drop_unused()
    return record

