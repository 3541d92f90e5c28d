"""ConvTranspose in the quantized region, rewritten as an integer-friendly Conv.

A 2-D ConvTranspose whose kernel equals its stride (s_h × s_w, no padding, dilation or output
padding, one group: the FPN/U-Net/DB-head upsampler) writes every output pixel from exactly one
input pixel:

    y[n, o, h·s_h + i, w·s_w + j] = b[o] + Σ_c x[n, c, h, w] · W[c, o, i, j]

which is a 1×1 Conv with s_h·s_w·O output channels, ``W'[(i·s_w + j)·O + o, c] = W[c, o, i, j]``
and ``b'`` = b tiled, followed by a pixel shuffle in channels-last order: Transpose to NHWC,
Reshape to (N, H, W, s_h, s_w·O), Transpose of the W and s_h axes, Reshape to
(N, H·s_h, W·s_w, O), Transpose back to NCHW. ORT has no integer DepthToSpace, and the NCHW
shuffle (Reshape → 6-D Transpose → Reshape) moves one byte at a time: 25x slower on an 8×256×80×80
uint8 map (77 ms against 3 ms on one thread), and 17 of the 88 ms of the DB text detector at
batch 8. In NHWC the transpose moves rows of s_w·O bytes, and the outer Transposes cancel
against the ones ORT puts around its NHWC QLinearConv. The rewrite happens on the QDQ graph before lowering: the 1×1 Conv
reads the same dequantized input and the same integer weights (re-laid out, per-channel scales
repeated with them), its output gets a copy of the ConvTranspose's output quantizer (after the
Relu/Clip that followed it, which is elementwise and moves before the shuffle), and the
shuffle then runs on the integer codes. Every product and sum is the ConvTranspose's own, so
the lowered model computes what the QDQ model means; the Conv rules of each target then lower
the 1×1 Conv (QLinearConv, or ConvInteger and the integer requantization).

Other ConvTransposes (overlapping kernels, padding, groups) stay float with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qgraph.graph import QModel
from qgraph.idioms import CLAMPS, Declined
from qgraph.lowering.patterns import DEQUANTIZE, QUANTIZE, const, read_quantizer, var


def rewrite_conv_transposes(model: QModel) -> tuple[int, dict[str, str]]:
    """Rewrite every eligible ConvTranspose reading a dequantized input; returns (count,
    {node name: why not} for the others that read one)."""
    count, declined = 0, {}
    for node in list(model.graph.nodes):
        if node.op != "ConvTranspose":
            continue
        x_dq = model.producer(node.inputs[0])
        if x_dq is None or x_dq.op != DEQUANTIZE:
            continue                          # float ConvTranspose outside the integer region
        try:
            _as_pointwise_conv(model, node, x_dq)
        except Declined as why:
            declined[node.name] = why.reason
            continue
        count += 1
    if count:
        model.cleanup()
    return count, declined


def _as_pointwise_conv(model: QModel, node: gs.Node, x_dq: gs.Node) -> None:
    weight, w_dq = _integer_weight(model, node)
    channels_in, channels_out, kh, kw = weight.shape
    attrs = node.attrs
    if int(attrs.get("group", 1)) != 1:
        raise Declined("grouped ConvTranspose has no integer form yet (only group 1)")
    strides = list(attrs.get("strides", [1, 1]))
    if strides != [kh, kw]:
        raise Declined(f"ConvTranspose with kernel {[kh, kw]} != stride {strides} (overlapping outputs) "
                       "has no integer form yet")
    for name, neutral in (("pads", 0), ("dilations", 1), ("output_padding", 0)):
        if any(v != neutral for v in attrs.get(name, [])):
            raise Declined(f"ConvTranspose with {name} {list(attrs[name])} has no integer form yet")
    if attrs.get("output_shape") or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID", b"NOTSET", b"VALID"):
        raise Declined("ConvTranspose with output_shape or auto_pad SAME has no integer form yet")
    taps = kh * kw
    bias = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        bias = QModel.constant_value(node.inputs[2])
        if bias is None:
            raise Declined("its bias is not a constant")
    quantizer = read_quantizer(w_dq)
    if quantizer is None:
        raise Declined("its weight quantizer has computed parameters")

    name = node.name
    pointwise = weight.transpose(2, 3, 1, 0).reshape(taps * channels_out, channels_in, 1, 1)
    per_channel = quantizer.per_channel
    scale = np.tile(quantizer.scale, taps) if per_channel else quantizer.scale
    zero_point = np.tile(quantizer.zero_point, taps) if per_channel else quantizer.zero_point
    w_float = var(model, f"{name}_pointwise_w", np.float32)
    model.add_node(DEQUANTIZE, [const(model, f"{name}_pointwise_w_q", pointwise),
                                const(model, f"{name}_pointwise_w_scale", scale),
                                const(model, f"{name}_pointwise_w_zero_point", zero_point)],
                   [w_float], f"{name}_pointwise_w_dq", {"axis": 0} if per_channel else {})
    inputs = [node.inputs[0], w_float]
    if bias is not None:
        inputs.append(const(model, f"{name}_pointwise_b", np.tile(np.asarray(bias, np.float32).reshape(-1), taps)))
    planes = var(model, f"{name}_planes", np.float32)
    model.add_node("Conv", inputs, [planes], f"{name}_pointwise", {"kernel_shape": [1, 1]})

    y = node.outputs[0]
    node.outputs.clear()
    chain, quantize = _activation_then_quantizer(model, y)
    source = planes
    if quantize is not None:
        # the activation moves before the shuffle, and the output grid onto the planes
        for act in chain:
            moved = var(model, f"{act.name}_planes", np.float32)
            model.add_node(act.op, [source, *act.inputs[1:]], [moved], f"{act.name}_planes", dict(act.attrs))
            source = moved
        codes = var(model, f"{name}_planes_q", read_quantizer(quantize).dtype)
        model.add_node(QUANTIZE, [source, *quantize.inputs[1:]], [codes], f"{name}_planes_q", dict(quantize.attrs))
        source = var(model, f"{name}_planes_dq", np.float32)
        model.add_node(DEQUANTIZE, [codes, *quantize.inputs[1:]], [source], f"{name}_planes_dq",
                       dict(quantize.attrs))
        shuffled = var(model, f"{name}_shuffled", np.float32)
        quantize.inputs[0] = shuffled
        for act in chain:
            act.outputs.clear()
    else:
        shuffled = y
    _pixel_shuffle(model, name, source, x_dq.inputs[0], channels_out, kh, kw, shuffled)


def _integer_weight(model: QModel, node: gs.Node) -> tuple[np.ndarray, gs.Node]:
    """The constant integer weight (C_in, C_out, kh, kw) behind the ConvTranspose's DequantizeLinear."""
    w_dq = model.producer(node.inputs[1]) if len(node.inputs) > 1 else None
    weight = QModel.constant_value(w_dq.inputs[0]) if w_dq is not None and w_dq.op == DEQUANTIZE else None
    if weight is None:
        raise Declined("its weight is not a constant integer tensor behind a DequantizeLinear")
    if weight.ndim != 4:
        raise Declined(f"only 2-D ConvTranspose has an integer form (weight of rank {weight.ndim})")
    return weight, w_dq


def _activation_then_quantizer(model: QModel, y: gs.Tensor) -> tuple[list[gs.Node], gs.Node | None]:
    """The Relu/Clip chain read alone from `y` and the single QuantizeLinear after it, or ([], None)."""
    chain, tensor = [], y
    while len(tensor.outputs) == 1 and not model.is_graph_output(tensor):
        reader = tensor.outputs[0]
        if reader.op == QUANTIZE:
            return chain, reader
        if reader.op not in CLAMPS or any(t.name and QModel.constant_value(t) is None for t in reader.inputs[1:]):
            break
        chain.append(reader)
        tensor = reader.outputs[0]
    return [], None


def _pixel_shuffle(model: QModel, name: str, planes: gs.Tensor, shape_of: gs.Tensor, channels: int,
                   kh: int, kw: int, out: gs.Tensor) -> None:
    """(N, kh·kw·C, H, W), channels ordered (i, j, c), → (N, C, H·kh, W·kw) in NHWC (module
    docstring), with H and W read from `shape_of` (the input's codes) at run time, so dynamic
    sizes work."""
    nhwc = var(model, f"{name}_planes_nhwc", planes.dtype)
    model.add_node("Transpose", [planes], [nhwc], f"{name}_to_nhwc", {"perm": [0, 2, 3, 1]})
    split = var(model, f"{name}_split", planes.dtype)          # (N, H, W, kh, kw·C)
    model.add_node("Reshape", [nhwc, const(model, f"{name}_split_shape", np.array([0, 0, 0, kh, kw * channels],
                                                                                  np.int64))],
                   [split], f"{name}_split")
    interleaved = var(model, f"{name}_interleaved", planes.dtype)   # (N, H, kh, W, kw·C)
    model.add_node("Transpose", [split], [interleaved], f"{name}_interleave", {"perm": [0, 1, 3, 2, 4]})
    shape = var(model, f"{name}_in_shape", np.int64)
    model.add_node("Shape", [shape_of], [shape], f"{name}_in_shape")
    spatial = var(model, f"{name}_in_hw", np.int64)
    model.add_node("Slice", [shape, const(model, f"{name}_hw_start", np.array([2], np.int64)),
                             const(model, f"{name}_hw_end", np.array([4], np.int64))], [spatial], f"{name}_in_hw")
    grown = var(model, f"{name}_out_hw", np.int64)
    model.add_node("Mul", [spatial, const(model, f"{name}_stride", np.array([kh, kw], np.int64))], [grown],
                   f"{name}_out_hw")
    merge_target = var(model, f"{name}_merge_shape", np.int64)
    model.add_node("Concat", [const(model, f"{name}_merge_head", np.array([0], np.int64)), grown,
                              const(model, f"{name}_merge_tail", np.array([channels], np.int64))],
                   [merge_target], f"{name}_merge_shape", {"axis": 0})
    merged = var(model, f"{name}_merged_nhwc", planes.dtype)
    model.add_node("Reshape", [interleaved, merge_target], [merged], f"{name}_merge")
    model.add_node("Transpose", [merged], [out], f"{name}_to_nchw", {"perm": [0, 3, 1, 2]})
