"""The toolkit's ONNX graphs rewritten into the form TensorRT's ONNX parser accepts.

Each rewrite is exact (the same values reach every node; tests compare ONNX Runtime's logits before
and after) and runs on the exported graph as it is written (`exporters.onnx`):

- `inline_attention`: the `compressor.Rotary` and `compressor.CachedAttention` nodes
  (`exporters.onnx.attention_op`) become their standard-op bodies, so that the rewrites below and
  the 16-bit pass see every product and the KV cache's concatenations as plain nodes.
- `fold_constants`: subgraphs of constants (the exporter's Reshape(Constant, Constant) of a
  ReduceMean's axes, cast and concatenated shape pieces) become initializers: TensorRT needs such
  inputs as build-time constants. Only exact operations are folded (data movement, integer and
  comparison arithmetic); nothing in floating point is evaluated here.
- `codes_into_dequantize`: a quantized linear's `Transpose(codes) -> DequantizeLinear` becomes the
  codes stored transposed, feeding DequantizeLinear directly (TensorRT allows a quantized constant
  only right before its DQ); the same for the scales.
- `dequantized_gathers`: a quantized embedding's `Gather(codes), Gather(scales) -> DQ` becomes the
  embedding dequantized once at preparation (float32, exactly DequantizeLinear's products) and
  gathered: TensorRT has no gather of quantized rows.
- `int8_blocks_as_int4_pairs`: 8-bit codes in blocks of 64 or 128 (TensorRT's INT8 is per tensor or
  per channel) become two int4 halves and a per-block offset, c = 16 h + l' + 8: the same products,
  about 8.5 bits a weight in the engine (plus the two halves' scales).
- `int8_blocks_to_float`: the remaining 8-bit codes in blocks (other block sizes; the tied head,
  which reads the embedding's float table) become float32 weights, exactly DequantizeLinear's
  products, at four bytes a weight.
- `two_bit_into_int4`: ONNX Runtime's 2-bit `MatMulNBits` (a contrib op TensorRT does not have)
  becomes int4-container codes -> DequantizeLinear -> MatMul, the same values.
- `check_quantized`: what TensorRT cannot take is refused with the reason (`PreparationError`):
  negative scales that a sign flip cannot make positive (every group whose largest weight is
  positive under the signed convention: quantize with `quantize.scales: positive` for TensorRT),
  non-zero zero points (asymmetric formats), and block sizes TensorRT's INT4 block quantization
  does not take. Nothing unprepared is shipped.

`prepare(model)` runs them in order and returns the rewritten graph and a record of what each did.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, inliner, numpy_helper
from onnx.reference import ReferenceEvaluator

from compressor.errors import CompressorError
from exporters.onnx.fused_attention import DOMAIN, OP_TYPE, ROTARY_OP
from exporters.onnx.quantized_graph import CONTRIB_DOMAIN, int4_tensor

# Operations folded when every input is a constant: data movement and integer / boolean
# arithmetic, whose results do not depend on how they are computed.
EXACT_OPS = {"Constant", "Reshape", "Cast", "Concat", "Unsqueeze", "Squeeze", "Identity", "Gather", "Slice",
             "Transpose", "Range", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And",
             "Or", "Where", "Expand", "ConstantOfShape", "Neg", "Abs", "Size"}
INTEGER_OPS = {"Add", "Sub", "Mul", "Div", "Mod", "Max", "Min"}  # folded only on integer inputs
FOLD_LIMIT = 1 << 20  # bytes: larger constant results stay computed in the graph
# TensorRT's INT4 weight-only block quantization takes these block sizes.
INT4_BLOCKS = (64, 128)


class PreparationError(CompressorError):
    """The graph holds something TensorRT cannot take and that no exact rewrite changes."""


class Graph:
    """Lookups over a graph that the rewrites keep current."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.graph = model, model.graph
        self.initializers = {t.name: t for t in self.graph.initializer}

    def producer(self) -> dict[str, onnx.NodeProto]:
        return {out: node for node in self.graph.node for out in node.output}

    def consumers(self) -> dict[str, list[onnx.NodeProto]]:
        found: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                found.setdefault(name, []).append(node)
        for output in self.graph.output:
            found.setdefault(output.name, []).append(None)
        return found

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.initializers[name])

    def add(self, tensor: onnx.TensorProto) -> None:
        if tensor.name in self.initializers:
            self.remove(tensor.name)
        self.graph.initializer.append(tensor)
        self.initializers[tensor.name] = tensor

    def remove(self, name: str) -> None:
        tensor = self.initializers.pop(name)
        self.graph.initializer.remove(tensor)

    def drop_unused(self) -> None:
        """Nodes whose outputs nobody reads (repeatedly), then initializers nobody reads."""
        while True:
            used = {name for node in self.graph.node for name in node.input} | {o.name for o in self.graph.output}
            dead = [node for node in self.graph.node if not any(out in used for out in node.output)]
            if not dead:
                break
            for node in dead:
                self.graph.node.remove(node)
        for name in [n for n in self.initializers if n not in used]:
            self.remove(name)


def _nbytes(tensor: onnx.TensorProto) -> int:
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    return count * max(1, helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize)


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attribute in node.attribute:
        if attribute.name == "value":
            return numpy_helper.to_array(attribute.t)
        if attribute.name == "value_int":
            return np.array(attribute.i, dtype=np.int64)
        if attribute.name == "value_ints":
            return np.array(list(attribute.ints), dtype=np.int64)
        if attribute.name == "value_float":
            return np.array(attribute.f, dtype=np.float32)
        if attribute.name == "value_floats":
            return np.array(list(attribute.floats), dtype=np.float32)
    return None


def fold_constants(model: onnx.ModelProto) -> int:
    """Replaces exact constant subgraphs by initializers (in place); returns the nodes folded."""
    g = Graph(model)
    known: dict[str, np.ndarray] = {}
    folded: list[onnx.NodeProto] = []

    def value(name: str) -> np.ndarray | None:
        if name in known:
            return known[name]
        tensor = g.initializers.get(name)
        if tensor is not None and _nbytes(tensor) <= FOLD_LIMIT:
            known[name] = numpy_helper.to_array(tensor)
            return known[name]
        return None

    for node in list(g.graph.node):
        if node.op_type == "Constant" and not node.domain:
            result = _constant_value(node)
            if result is None:
                continue
            outputs = [result]
        elif node.domain or node.op_type not in EXACT_OPS | INTEGER_OPS:
            continue
        else:
            inputs = [value(name) if name else None for name in node.input]
            if any(v is None for name, v in zip(node.input, inputs) if name):
                continue
            if node.op_type in INTEGER_OPS and not all(np.issubdtype(v.dtype, np.integer) for v in inputs if v is not None):
                continue
            if node.op_type == "Cast" and not np.issubdtype(inputs[0].dtype, np.integer):
                continue  # a float cast rounds: leave it to the graph
            outputs = ReferenceEvaluator(node).run(None, {name: v for name, v in zip(node.input, inputs) if name})
            if any(np.asarray(o).nbytes > FOLD_LIMIT for o in outputs):
                continue
        for name, result in zip(node.output, outputs):
            known[name] = np.asarray(result)
        folded.append(node)
    if not folded:
        return 0
    readers = g.consumers()
    removed = {id(node) for node in folded}
    for node in folded:
        for name in node.output:
            if any(reader is None or id(reader) not in removed for reader in readers.get(name, [])):
                g.add(numpy_helper.from_array(known[name], name))
    kept = [node for node in g.graph.node if id(node) not in removed]
    del g.graph.node[:]
    g.graph.node.extend(kept)
    g.drop_unused()
    return len(folded)


def _transposed_constant(g: Graph, producers: dict, name: str) -> str | None:
    """The initializer `name` is a Transpose([1, 0]) of, else None."""
    node = producers.get(name)
    if node is None or node.op_type != "Transpose" or node.input[0] not in g.initializers:
        return None
    perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
    if perm and perm[0] != [1, 0]:
        return None
    return node.input[0]


def _int_initializer(name: str, values: np.ndarray, data_type: int) -> onnx.TensorProto:
    if data_type in (TensorProto.INT4, TensorProto.UINT4):
        return int4_tensor(name, values.astype(np.int16), signed=data_type == TensorProto.INT4)
    return numpy_helper.from_array(values, name)


def codes_into_dequantize(model: onnx.ModelProto) -> int:
    """DequantizeLinear inputs that are Transpose(initializer) become transposed initializers."""
    g = Graph(model)
    producers = g.producer()
    made: dict[str, str] = {}
    count = 0
    for node in g.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        for position, name in enumerate(node.input):
            source = _transposed_constant(g, producers, name) if name else None
            if source is None:
                continue
            if source not in made:
                tensor = g.initializers[source]
                target = f"{source}_transposed"
                array = np.ascontiguousarray(g.array(source).T)
                if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4):
                    g.add(_int_initializer(target, array, tensor.data_type))
                else:
                    g.add(numpy_helper.from_array(array, target))
                made[source] = target
            node.input[position] = made[source]
            count += 1
    g.drop_unused()
    return count


def _dequantized(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int, block: int) -> np.ndarray:
    """DequantizeLinear's float32 products: (codes - zero) * scale, the scale repeated over blocks."""
    repeat = (lambda a: np.repeat(a, block, axis=axis)[tuple(slice(0, n) for n in codes.shape)]) if block else \
        (lambda a: a)
    values = codes.astype(np.float32)
    if zero is not None:
        values = values - repeat(zero.astype(np.float32))
    return values * repeat(scale.astype(np.float32))


def _attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def dequantized_gathers(model: onnx.ModelProto) -> int:
    """Gather(codes, ids), Gather(scales, ids)[, Gather(zeros, ids)] -> DQ becomes Gather(float rows)."""
    g = Graph(model)
    producers = g.producer()
    count = 0
    for node in list(g.graph.node):
        if node.op_type != "DequantizeLinear":
            continue
        gathers = [producers.get(name) for name in node.input if name]
        if not gathers or any(p is None or p.op_type != "Gather" or p.input[0] not in g.initializers for p in gathers):
            continue
        ids = {p.input[1] for p in gathers}
        if len(ids) != 1 or any(_attribute(p, "axis", 0) != 0 for p in gathers):
            continue
        arrays = [g.array(p.input[0]) for p in gathers]
        axis = _attribute(node, "axis", 1) % arrays[0].ndim
        block = _attribute(node, "block_size", 0)
        zero = arrays[2] if len(arrays) > 2 else None
        table = f"{gathers[0].input[0]}_dequantized"
        if table not in g.initializers:
            g.add(numpy_helper.from_array(_dequantized(arrays[0], arrays[1], zero, axis, block), table))
        position = list(g.graph.node).index(node)
        g.graph.node.remove(node)
        g.graph.node.insert(position, helper.make_node("Gather", [table, ids.pop()], list(node.output), axis=0,
                                                       name=f"{node.name or table}_gather"))
        count += 1
    g.drop_unused()
    return count


def int8_blocks_as_int4_pairs(model: onnx.ModelProto) -> int:
    """8-bit codes in blocks of 64 or 128 feeding MatMuls become two int4 halves, still 8 bits a
    weight: a code c in [-128, 127] is 16 h + l' + 8 with h = c >> 4 and l' = (c & 15) - 8, both in
    [-8, 7], so x W = x DQ(h, 16 s) + x DQ(l', s) + (x summed over each block) (8 s). The last term's
    weights are one float per block (a K/block x N matrix). Returns the number of weights rewritten;
    the rest (other blocks, a tied head reading the dequantized embedding) go to int8_blocks_to_float."""
    g = Graph(model)
    consumers = g.consumers()
    replacements: dict[str, list[onnx.NodeProto]] = {}  # first output of a node -> the nodes in its place
    for node in g.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in g.initializers:
            continue
        codes_name, block = node.input[0], _attribute(node, "block_size", 0)
        if g.initializers[codes_name].data_type != TensorProto.INT8 or block not in INT4_BLOCKS:
            continue
        if f"{codes_name.removesuffix('_transposed')}_dequantized" in g.initializers:
            continue  # the tied head: it reads the float table the embedding's Gather needs anyway
        codes = g.array(codes_name)
        readers = consumers.get(node.output[0], [])
        zero = g.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        scale = g.array(node.input[1]).astype(np.float32)
        if (codes.ndim != 2 or _attribute(node, "axis", 1) % 2 != 0 or codes.shape[0] % block
                or (zero is not None and np.any(zero)) or np.any(scale <= 0) or not readers
                or any(r is None or r.op_type != "MatMul" or r.input[1] != node.output[0]
                       or r.input[0] == node.output[0] for r in readers)):
            continue
        wide = codes.astype(np.int16)
        stem = codes_name.removesuffix("_transposed")
        g.add(int4_tensor(f"{stem}_high", wide >> 4))
        g.add(int4_tensor(f"{stem}_low", (wide & 0x0F) - 8))
        g.add(numpy_helper.from_array(scale * 16, f"{stem}_high_scale"))
        g.add(numpy_helper.from_array(scale, f"{stem}_low_scale"))
        g.add(numpy_helper.from_array(scale * 8, f"{stem}_block_offset"))
        g.add(numpy_helper.from_array(np.array([codes.shape[0] // block, block], dtype=np.int64), f"{stem}_blocks"))
        for name, values in (("_start", [0]), ("_end", [-1]), ("_last_axis", [-1])):
            g.add(numpy_helper.from_array(np.array(values, dtype=np.int64), f"{stem}{name}"))
        replacements[node.output[0]] = []  # the DequantizeLinear goes; its halves go before the first reader
        halves = [helper.make_node("DequantizeLinear", [f"{stem}_high", f"{stem}_high_scale"], [f"{stem}_high_w"],
                                   axis=0, block_size=block),
                  helper.make_node("DequantizeLinear", [f"{stem}_low", f"{stem}_low_scale"], [f"{stem}_low_w"],
                                   axis=0, block_size=block)]
        for k, reader in enumerate(readers):
            x, y, tag = reader.input[0], reader.output[0], f"{stem}_{k}"
            replacements[y] = (halves if k == 0 else []) + [
                helper.make_node("MatMul", [x, f"{stem}_high_w"], [f"{tag}_high_y"]),
                helper.make_node("MatMul", [x, f"{stem}_low_w"], [f"{tag}_low_y"]),
                helper.make_node("Shape", [x], [f"{tag}_shape"]),
                helper.make_node("Slice", [f"{tag}_shape", f"{stem}_start", f"{stem}_end"], [f"{tag}_lead"]),
                helper.make_node("Concat", [f"{tag}_lead", f"{stem}_blocks"], [f"{tag}_blocked_shape"], axis=0),
                helper.make_node("Reshape", [x, f"{tag}_blocked_shape"], [f"{tag}_blocked"]),
                helper.make_node("ReduceSum", [f"{tag}_blocked", f"{stem}_last_axis"], [f"{tag}_block_sums"],
                                 keepdims=0),
                helper.make_node("MatMul", [f"{tag}_block_sums", f"{stem}_block_offset"], [f"{tag}_offset_y"]),
                helper.make_node("Add", [f"{tag}_high_y", f"{tag}_low_y"], [f"{tag}_halves_y"]),
                helper.make_node("Add", [f"{tag}_halves_y", f"{tag}_offset_y"], [y])]
    if replacements:
        nodes = [made for n in g.graph.node for made in replacements.get(n.output[0] if n.output else "", [n])]
        del g.graph.node[:]
        g.graph.node.extend(nodes)
        g.drop_unused()
    return sum(1 for made in replacements.values() if not made)


def int8_blocks_to_float(model: onnx.ModelProto) -> int:
    """8-bit codes in blocks (TensorRT's INT8 is per tensor or per channel) become float32 weights,
    exactly DequantizeLinear's products; a tied head reading an embedding dequantized for its
    Gather reads that table through a Transpose instead of a second copy."""
    g = Graph(model)
    count = 0
    for node in list(g.graph.node):
        if node.op_type != "DequantizeLinear" or node.input[0] not in g.initializers:
            continue
        if g.initializers[node.input[0]].data_type != TensorProto.INT8 or not _attribute(node, "block_size", 0):
            continue
        position = list(g.graph.node).index(node)
        g.graph.node.remove(node)
        table = f"{node.input[0].removesuffix('_transposed')}_dequantized"
        if node.input[0].endswith("_transposed") and table in g.initializers:
            g.graph.node.insert(position, helper.make_node("Transpose", [table], list(node.output), perm=[1, 0]))
        else:
            arrays = [g.array(name) if name else None for name in node.input]
            zero = arrays[2] if len(arrays) > 2 else None
            axis = _attribute(node, "axis", 1) % arrays[0].ndim
            g.add(numpy_helper.from_array(_dequantized(arrays[0], arrays[1], zero, axis,
                                                       _attribute(node, "block_size", 0)), node.output[0]))
        count += 1
    g.drop_unused()
    return count


def _unpack_unsigned(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    per_byte = 8 // bits
    values = np.stack([(packed >> (bits * j)) & ((1 << bits) - 1) for j in range(per_byte)], axis=-1)
    return values.reshape(*packed.shape[:-1], -1)[..., :count]


def two_bit_into_int4(model: onnx.ModelProto) -> int:
    """MatMulNBits(bits=2) becomes int4 codes -> DequantizeLinear(axis 0, block) -> MatMul."""
    g = Graph(model)
    count = 0
    for node in list(g.graph.node):
        if node.op_type != "MatMulNBits" or node.domain != CONTRIB_DOMAIN:
            continue
        bits, block = _attribute(node, "bits", 4), _attribute(node, "block_size", 0)
        rows, columns = _attribute(node, "N", 0), _attribute(node, "K", 0)
        if bits != 2:
            raise PreparationError(f"{node.name or node.output[0]}: MatMulNBits with {bits} bits is not prepared "
                                   "for TensorRT (only the 2-bit form the exporter writes)")
        blocks = -(-columns // block)
        offset = 1 << (bits - 1)
        packed = g.array(node.input[1])  # [N, blocks, block * bits / 8]
        codes = _unpack_unsigned(packed, bits, block).reshape(rows, blocks * block)[:, :columns].astype(np.int16) - offset
        scale = g.array(node.input[2]).reshape(rows, blocks)
        if len(node.input) > 3 and node.input[3]:
            zero = _unpack_unsigned(g.array(node.input[3]), bits, blocks).astype(np.int16) - offset
            if np.any(zero):
                raise PreparationError(f"{node.input[1]}: a non-zero zero point (asymmetric 2-bit); TensorRT takes "
                                       "symmetric weights only: quantize with symmetric: true")
        base = node.input[1].removesuffix("_packed")
        codes_name, scale_name, dequantized = f"{base}_codes_transposed", f"{base}_scale_transposed", f"{base}_dq"
        g.add(int4_tensor(codes_name, np.ascontiguousarray(codes.T)))
        g.add(numpy_helper.from_array(np.ascontiguousarray(scale.T.astype(np.float32)), scale_name))
        position = list(g.graph.node).index(node)
        g.graph.node.remove(node)
        g.graph.node.insert(position, helper.make_node("DequantizeLinear", [codes_name, scale_name], [dequantized],
                                                       axis=0, block_size=block))
        g.graph.node.insert(position + 1, helper.make_node("MatMul", [node.input[0], dequantized], list(node.output)))
        count += 1
    g.drop_unused()
    if not any(node.domain == CONTRIB_DOMAIN for node in g.graph.node):
        kept = [o for o in model.opset_import if o.domain != CONTRIB_DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    return count


def check_quantized(model: onnx.ModelProto) -> dict:
    """Refuses what TensorRT cannot take; returns what was found (counts per kind)."""
    g = Graph(model)
    found = {"int4_block": 0, "int8": 0}
    for node in g.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        codes_name, scale_name = node.input[0], node.input[1]
        if codes_name not in g.initializers:
            raise PreparationError(f"{node.name or node.output[0]}: DequantizeLinear reads {codes_name}, which is "
                                   "computed in the graph; TensorRT takes quantized constants only")
        where = codes_name.removesuffix("_transposed").removesuffix("_codes")
        if len(node.input) > 2 and node.input[2] and np.any(g.array(node.input[2])):
            raise PreparationError(f"{where}: non-zero zero points (an asymmetric format); TensorRT takes "
                                   "symmetric weights only: quantize with symmetric: true for a TensorRT export")
        scale = g.array(scale_name)
        if np.any(scale <= 0):
            share = float(np.mean(scale <= 0))
            raise PreparationError(f"{where}: {share:.0%} of its scales are negative (the signed symmetric "
                                   "convention), and flipping their sign needs the code +8, which int4 lacks; "
                                   "TensorRT takes positive scales only: quantize with scales: positive for a "
                                   "TensorRT export")
        data_type = g.initializers[codes_name].data_type
        block = _attribute(node, "block_size", 0)
        if data_type == TensorProto.INT4:
            if block and block not in INT4_BLOCKS:
                raise PreparationError(f"{where}: 4-bit block size {block}; TensorRT's INT4 block quantization "
                                       f"takes {' or '.join(map(str, INT4_BLOCKS))}: quantize with group_size 64 "
                                       "or 128 for a TensorRT export")
            found["int4_block"] += 1
        elif data_type == TensorProto.INT8:
            if block:
                raise PreparationError(f"{where}: 8-bit codes in blocks of {block}; TensorRT's INT8 is per tensor "
                                       "or per channel: quantize 8-bit weights with group_size: channel for a "
                                       "TensorRT export")
            found["int8"] += 1
        else:
            raise PreparationError(f"{where}: codes of ONNX type {TensorProto.DataType.Name(data_type)}; TensorRT "
                                   "takes int4 and int8")
    return found


def recipe_problem(quantize) -> str | None:
    """What in a recipe's quantize section the preparation would refuse (checked before any work)."""
    if quantize is None:
        return None
    if not quantize.symmetric:
        return "quantize.symmetric: false (zero points); TensorRT takes symmetric weights only"
    if quantize.scales != "positive":
        return "quantize.scales: signed (negative scales); TensorRT takes positive scales only: scales: positive"
    if quantize.group_size not in ("channel", *INT4_BLOCKS) and any(b <= 4 for b in quantize.bits):
        return (f"quantize.group_size: {quantize.group_size} at 4 bits or fewer; TensorRT's INT4 blocks are "
                f"{' or '.join(map(str, INT4_BLOCKS))}")
    return None


def inline_attention(model: onnx.ModelProto) -> int:
    """Replaces every `compressor.Rotary` / `compressor.CachedAttention` node by its function body, in
    place (the functions are dropped); returns how many nodes were inlined."""
    names = [(DOMAIN, OP_TYPE), (DOMAIN, ROTARY_OP)]
    count = sum(1 for n in model.graph.node if (n.domain, n.op_type) in names)
    if count:
        # The inliner works on a serialized copy: without the weights, so models past protobuf's 2 GB
        # limit inline too (it renames nothing that the initializers are read by).
        weights = list(model.graph.initializer)
        del model.graph.initializer[:]
        inlined = inliner.inline_selected_functions(model, names)
        inlined.graph.initializer.extend(weights)
        model.CopyFrom(inlined)
        kept = [f for f in model.functions if (f.domain, f.name) not in names]
        del model.functions[:]
        model.functions.extend(kept)
    return count


def prepare(model: onnx.ModelProto) -> dict:
    """Runs every rewrite on `model` in place, then the checks; returns what each did."""
    # Codes first (folding would turn each Transpose of codes into an anonymous constant), then the
    # rest of the constants.
    record = {"inlined_attention": inline_attention(model),
              "two_bit_into_int4": two_bit_into_int4(model),
              "codes_into_dequantize": codes_into_dequantize(model),
              "dequantized_gathers": dequantized_gathers(model),
              "int8_blocks_as_int4_pairs": int8_blocks_as_int4_pairs(model),
              "int8_blocks_to_float": int8_blocks_to_float(model),
              "folded_constants": fold_constants(model)}
    record["quantized"] = check_quantized(model)
    return record
