"""Writes the toolkit's own quantization codes into an exported ONNX graph (no re-quantization).

The exported graph first holds every weight as a float initializer named as in the artifact
(`NAME.weight`), read by `Transpose -> MatMul` (a linear, or the tied output head) or by `Gather`
(the embedding). For each quantized weight this module replaces the float initializer by:

- 3- to 8-bit codes: `NAME.weight_codes` (int4, or int8 for 5, 6 and 8 bits and for the embedding,
  since ONNX Runtime's Gather has no int4), `NAME.weight_scale` (float32 [out, groups]; the float16
  scale widened exactly) and `NAME.weight_zero_point` when asymmetric, read by
  `Transpose -> DequantizeLinear(axis 0, block_size = group size) -> MatMul`, which ONNX Runtime
  fuses into `MatMulNBits`. 3-bit codes ride in int4 containers. One scale per row is written in
  power-of-two blocks repeating it (`onnx_blocks`), so that the fusion applies.
- 2-bit codes with a power-of-two group of at least 16: `MatMulNBits(bits=2)` (ONNX Runtime's
  contrib domain), codes offset to unsigned and packed four to a byte. Other 2-bit formats ride in
  int4 containers like 3-bit.
- The embedding: `Gather` of its code rows and scale rows, then a block-wise `DequantizeLinear`.
  The tied output head reads the same codes initializer, so a shared weight is stored once.
- Weights kept exactly (super weights): a sparse correction beside the MatMul,
  `y += Gather(x, NAME.exact_columns) @ NAME.exact_delta`.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from compressor.errors import CompressorError
from compressor.transforms.quantize import QuantizedWeight

CONTRIB_DOMAIN = "com.microsoft"
CHANNEL_BLOCK = 128  # the block a per-channel weight is written in, where its width allows


def _matmul_nbits_ok(weight: QuantizedWeight) -> bool:
    size = weight.fmt.group_size
    return weight.fmt.bits == 2 and size is not None and size >= 16 and size & (size - 1) == 0


def int4_tensor(name: str, values: np.ndarray, signed: bool = True) -> onnx.TensorProto:
    """An int4 (or uint4) initializer: two values per byte, the first in the low nibble (ONNX's
    layout), an odd count padded."""
    flat = values.astype(np.int16).flatten() & 0x0F
    if flat.size % 2:
        flat = np.append(flat, 0)
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
    return helper.make_tensor(name, TensorProto.INT4 if signed else TensorProto.UINT4, values.shape,
                              packed.tobytes(), raw=True)


def _int_tensor(name: str, values: torch.Tensor, bits: int) -> onnx.TensorProto:
    """Signed codes as an int4 (bits <= 4) or int8 initializer."""
    array = values.to(torch.int8).numpy()
    return int4_tensor(name, array) if bits <= 4 else numpy_helper.from_array(array, name)


def _pack_unsigned(values: np.ndarray, bits: int) -> np.ndarray:
    """Packs unsigned codes along the last axis, first value in the lowest bits (MatMulNBits order)."""
    per_byte = 8 // bits
    values = values.astype(np.uint8).reshape(*values.shape[:-1], -1, per_byte)
    packed = np.zeros(values.shape[:-1], dtype=np.uint8)
    for j in range(per_byte):
        packed |= values[..., j] << (bits * j)
    return packed


class _Rewriter:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.before: dict[int, list[onnx.NodeProto]] = {}  # node position -> nodes inserted before it
        self.after: dict[int, list[onnx.NodeProto]] = {}
        self.replaced: dict[int, list[onnx.NodeProto]] = {}  # node position -> its replacement
        self.new_initializers: list[onnx.TensorProto] = []
        self.removed_initializers: set[str] = set()
        self.counter = 0
        self.uses_contrib = False

    def unique(self, base: str) -> str:
        self.counter += 1
        return f"{base}_{self.counter}"

    def consumers(self, tensor: str) -> list[int]:
        return [i for i, node in enumerate(self.graph.node) if tensor in node.input]

    def finish(self) -> None:
        nodes = []
        for i, node in enumerate(self.graph.node):
            nodes += self.before.get(i, [])
            nodes += self.replaced.get(i, [node])
            nodes += self.after.get(i, [])
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        kept = [t for t in self.graph.initializer if t.name not in self.removed_initializers]
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept + self.new_initializers)
        if self.uses_contrib and not any(o.domain == CONTRIB_DOMAIN for o in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))


def rewrite_quantized(model: onnx.ModelProto, quantized: dict[str, QuantizedWeight]) -> dict[str, str]:
    """Rewrites `model` in place; returns module name -> how its weight is stored in the graph."""
    rewriter = _Rewriter(model)
    initializers = {t.name for t in model.graph.initializer}
    storage = {}
    for name, weight in quantized.items():
        tensor = f"{name}.weight"
        if tensor not in initializers:
            raise CompressorError(f"ONNX export: the graph has no initializer {tensor} for quantized weight {name}")
        storage[name] = _rewrite_weight(rewriter, name, weight)
        rewriter.removed_initializers.add(tensor)
    rewriter.finish()
    return storage


def onnx_blocks(weight: QuantizedWeight) -> tuple[int, np.ndarray, torch.Tensor | None]:
    """(block size, float32 scales [out, blocks], zero points [out, blocks] or None) of a weight's
    DequantizeLinear. One scale per row over a width that is not a power of two (576, 1536) is
    written as power-of-two blocks that repeat the row's scale, the same dequantized values: ONNX
    Runtime fuses DequantizeLinear -> MatMul into MatMulNBits only for power-of-two blocks (of 16 to
    a few hundred; 128 at most here), and would otherwise dequantize the whole matrix every step."""
    scale, zero = weight.scale.float(), weight.zero_point
    in_features = weight.codes.shape[1]
    if weight.fmt.group_size is not None:
        return weight.fmt.group_size, scale.numpy(), zero
    block = min(in_features & -in_features, CHANNEL_BLOCK)  # the largest power of two dividing the width
    if block < 16 or block == in_features:
        return in_features, scale.numpy(), zero
    repeat = in_features // block
    return block, scale.repeat_interleave(repeat, dim=1).numpy(), \
        None if zero is None else zero.repeat_interleave(repeat, dim=1)


def _rewrite_weight(rw: _Rewriter, name: str, weight: QuantizedWeight) -> str:
    tensor = f"{name}.weight"
    users = rw.consumers(tensor)
    gathers = [i for i in users if rw.graph.node[i].op_type == "Gather"]
    transposes = [i for i in users if rw.graph.node[i].op_type == "Transpose"]
    others = sorted(set(users) - set(gathers) - set(transposes))
    if others:
        ops = sorted({rw.graph.node[i].op_type for i in others})
        raise CompressorError(f"ONNX export: {tensor} is read by {ops}; only Gather and Transpose->MatMul are handled")
    if gathers and weight.exact_index is not None:
        raise CompressorError(f"ONNX export: {name} keeps exact weights and is gathered; not supported")
    matmuls = []
    for i in transposes:
        output = rw.graph.node[i].output[0]
        perm = [a.ints for a in rw.graph.node[i].attribute if a.name == "perm"]
        if perm and list(perm[0]) != [1, 0]:
            raise CompressorError(f"ONNX export: {tensor} is transposed with perm {list(perm[0])}")
        readers = rw.consumers(output)
        if any(rw.graph.node[j].op_type != "MatMul" or rw.graph.node[j].input[1] != output for j in readers):
            raise CompressorError(f"ONNX export: the transposed {tensor} is read by something other than MatMul")
        matmuls += readers
        rw.replaced[i] = []  # the Transpose of the float weight goes away
    fmt = weight.fmt
    group, scale_values, zero_values = onnx_blocks(weight)
    scale = numpy_helper.from_array(scale_values, f"{name}.weight_scale")
    if _matmul_nbits_ok(weight) and not gathers:
        _matmul_nbits(rw, name, weight, matmuls)
        kind = f"MatMulNBits bits=2 block {group}"
    else:
        container = 8 if fmt.bits > 4 or gathers else 4
        rw.new_initializers += [_int_tensor(f"{name}.weight_codes", weight.codes, container), scale]
        dq_inputs = [f"{name}.weight_codes", f"{name}.weight_scale"]
        if zero_values is not None:
            rw.new_initializers.append(_int_tensor(f"{name}.weight_zero_point", zero_values, container))
            dq_inputs.append(f"{name}.weight_zero_point")
        for j in matmuls:
            transposed = []
            nodes = []
            for source in dq_inputs:
                target = rw.unique(f"{source}_t")
                nodes.append(helper.make_node("Transpose", [source], [target], perm=[1, 0]))
                transposed.append(target)
            dequantized = rw.unique(f"{name}.weight_dequantized")
            nodes.append(helper.make_node("DequantizeLinear", transposed, [dequantized], axis=0, block_size=group))
            rw.before.setdefault(j, []).extend(nodes)
            rw.graph.node[j].input[1] = dequantized
        for i in gathers:
            node = rw.graph.node[i]
            ids, output = node.input[1], node.output[0]
            nodes, gathered = [], []
            for source in dq_inputs:
                target = rw.unique(f"{source}_rows")
                nodes.append(helper.make_node("Gather", [source, ids], [target], axis=0))
                gathered.append(target)
            nodes.append(helper.make_node("DequantizeLinear", gathered, [output], axis=-1, block_size=group))
            rw.replaced[i] = nodes
        kind = f"int{container} codes{'' if fmt.bits == container else f' ({fmt.bits}-bit)'}, " \
               f"block {group}{', zero point' if weight.zero_point is not None else ''}"
    if weight.exact_index is not None:
        _exact_correction(rw, name, weight, matmuls)
        kind += f", {weight.exact_index.numel()} exact"
    return kind


def _matmul_nbits(rw: _Rewriter, name: str, weight: QuantizedWeight, matmuls: list[int]) -> None:
    bits, group = weight.fmt.bits, weight.fmt.group_size
    out_features, in_features = weight.codes.shape
    blocks = -(-in_features // group)
    offset = 1 << (bits - 1)
    unsigned = np.full((out_features, blocks * group), offset, dtype=np.uint8)
    unsigned[:, :in_features] = (weight.codes.to(torch.int16) + offset).numpy().astype(np.uint8)
    packed = _pack_unsigned(unsigned.reshape(out_features, blocks, group), bits)
    inputs = [f"{name}.weight_packed", f"{name}.weight_scale"]
    rw.new_initializers += [numpy_helper.from_array(packed, inputs[0]),
                            numpy_helper.from_array(weight.scale.float().flatten().numpy(), inputs[1])]
    if weight.zero_point is not None:
        zero = (weight.zero_point.to(torch.int16) + offset).numpy().astype(np.uint8)
        pad = (-blocks) % (8 // bits)
        zero = np.concatenate([zero, np.full((out_features, pad), offset, np.uint8)], axis=1)
        rw.new_initializers.append(numpy_helper.from_array(_pack_unsigned(zero, bits), f"{name}.weight_zero_point"))
        inputs.append(f"{name}.weight_zero_point")
    for j in matmuls:
        node = rw.graph.node[j]
        rw.replaced[j] = [helper.make_node("MatMulNBits", [node.input[0], *inputs], list(node.output),
                                           domain=CONTRIB_DOMAIN, K=in_features, N=out_features, bits=bits,
                                           block_size=group)]
    rw.uses_contrib = True


def _exact_correction(rw: _Rewriter, name: str, weight: QuantizedWeight, matmuls: list[int]) -> None:
    """y += x[..., columns] @ delta, delta[j, row_j] = exact_j - dequantized_j."""
    out_features, in_features = weight.codes.shape
    plain = QuantizedWeight(weight.codes, weight.scale, weight.zero_point, weight.fmt)
    flat = weight.exact_index.long()
    delta_values = weight.exact_value.float() - plain.dequantize().view(-1)[flat]
    rows, columns = flat // in_features, flat % in_features
    delta = torch.zeros(flat.numel(), out_features)
    delta[torch.arange(flat.numel()), rows] = delta_values
    rw.new_initializers += [numpy_helper.from_array(columns.numpy().astype(np.int64), f"{name}.exact_columns"),
                            numpy_helper.from_array(delta.numpy(), f"{name}.exact_delta")]
    for j in matmuls:
        node = rw.replaced.get(j, [rw.graph.node[j]])[-1]
        x, y = node.input[0], node.output[0]
        quantized_out = rw.unique(f"{name}.quantized_output")
        node.output[0] = quantized_out
        picked, correction = rw.unique(f"{name}.exact_inputs"), rw.unique(f"{name}.exact_correction")
        rw.after.setdefault(j, []).extend([
            helper.make_node("Gather", [x, f"{name}.exact_columns"], [picked], axis=-1),
            helper.make_node("MatMul", [picked, f"{name}.exact_delta"], [correction]),
            helper.make_node("Add", [quantized_out, correction], [y]),
        ])
