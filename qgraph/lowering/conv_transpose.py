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
against the ones ORT puts around its NHWC QLinearConv.

The rewrite happens on the QDQ graph before lowering: the 1×1 Conv reads the same dequantized input and the same integer weights (re-laid out, per-channel scales
repeated with them), its output gets a copy of the ConvTranspose's output quantizer (after the
Relu/Clip that followed it, which is elementwise and moves before the shuffle), and the
shuffle then runs on the integer codes. Every product and sum is the ConvTranspose's own, so
the lowered model computes what the QDQ model means; the Conv rules of each target then lower
the 1×1 Conv (QLinearConv, or ConvInteger and the integer requantization).

Every other 2-D ConvTranspose (overlapping kernels, padding, output padding, dilation, groups)
is the stride-1 Conv of the zero-inserted input with the flipped, transposed kernel:

    ConvTranspose(x, W; s, d, p_b, p_e, o) = Conv(zeros_between(x, s), W'; stride 1, dilation d,
                                                 pads d(k-1) - p_b, d(k-1) - p_e + o)
    W'[g·C_out/g + j, i, u, v] = W[g·C_in/g + i, j, k_h-1-u, k_w-1-v]

(zeros_between puts s-1 zeros after every input pixel along each axis; padding that comes out
negative is a Slice). On the codes a zero is x's zero point, which dequantizes to exactly 0.0,
so the zero insertion (Unsqueeze → Pad with the zero point → Reshape) runs on the integer
tensor and the Conv, with the same integer weights re-laid out, lowers by the Conv rules. It
does s_h·s_w times the MACs of the ConvTranspose (the zeros are multiplied); the kernel =
stride form above does none. ConvTransposes with output_shape or auto_pad SAME, with a computed
weight or bias, or of another rank stay float with the reason.
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
            if _kernel_equals_stride(model, node):
                _as_pointwise_conv(model, node, x_dq)
            else:
                _as_zero_inserted_conv(model, node, x_dq)
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


def _kernel_equals_stride(model: QModel, node: gs.Node) -> bool:
    """The pointwise form applies: kernel = stride, one group, no padding, dilation or output padding."""
    w_dq = model.producer(node.inputs[1]) if len(node.inputs) > 1 else None
    codes = QModel.constant_value(w_dq.inputs[0]) if w_dq is not None and w_dq.op == DEQUANTIZE else None
    if codes is None or codes.ndim != 4:
        return False
    attrs = node.attrs
    neutral = all(all(v == n for v in attrs.get(key, [])) for key, n in
                  (("pads", 0), ("dilations", 1), ("output_padding", 0)))
    return (neutral and int(attrs.get("group", 1)) == 1 and list(attrs.get("strides", [1, 1])) == list(codes.shape[2:])
            and not attrs.get("output_shape"))


def _as_zero_inserted_conv(model: QModel, node: gs.Node, x_dq: gs.Node) -> None:
    weight, w_dq = _integer_weight(model, node)
    attrs = node.attrs
    if attrs.get("output_shape") or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID", b"NOTSET", b"VALID"):
        raise Declined("ConvTranspose with output_shape or auto_pad SAME has no integer form yet")
    groups = int(attrs.get("group", 1))
    channels_in, per_group_out, kh, kw = weight.shape
    if channels_in % groups:
        raise Declined(f"its weight has {channels_in} input channels, not a multiple of group {groups}")
    strides = [int(v) for v in attrs.get("strides", [1, 1])]
    dilations = [int(v) for v in attrs.get("dilations", [1, 1])]
    pads = [int(v) for v in attrs.get("pads", [0, 0, 0, 0])]
    extra = [int(v) for v in attrs.get("output_padding", [0, 0])]
    if len(node.inputs) > 2 and node.inputs[2].name and QModel.constant_value(node.inputs[2]) is None:
        raise Declined("its bias is not a constant")
    w_q, x_q = read_quantizer(w_dq), read_quantizer(x_dq)
    if w_q is None or x_q is None:
        raise Declined("its input or weight quantizer has computed parameters")
    if x_q.per_channel:
        raise Declined("its input has a per-channel quantizer (the inserted zeros need one zero point)")
    if w_q.per_channel and w_q.scale.size != per_group_out:
        raise Declined(f"its weight quantizer has {w_q.scale.size} scales for {per_group_out} output channels per group")

    name = node.name
    # W (C_in, C_out/g, kh, kw) → W' (C_out, C_in/g, kh, kw), flipped in space
    flipped = (weight.reshape(groups, channels_in // groups, per_group_out, kh, kw).transpose(0, 2, 1, 3, 4)
               .reshape(groups * per_group_out, channels_in // groups, kh, kw)[:, :, ::-1, ::-1])
    scale = np.tile(w_q.scale, groups) if w_q.per_channel else w_q.scale
    zero_point = np.tile(w_q.zero_point, groups) if w_q.per_channel else w_q.zero_point
    w_float = var(model, f"{name}_flipped_w", np.float32)
    model.add_node(DEQUANTIZE, [const(model, f"{name}_flipped_w_q", np.ascontiguousarray(flipped)),
                                const(model, f"{name}_flipped_w_scale", scale),
                                const(model, f"{name}_flipped_w_zero_point", zero_point)],
                   [w_float], f"{name}_flipped_w_dq", {"axis": 0} if w_q.per_channel else {})

    # Conv padding; the zero insertion already adds s-1 zeros after the last pixel
    span = [dilations[0] * (kh - 1), dilations[1] * (kw - 1)]
    begin = [span[0] - pads[0], span[1] - pads[1]]
    end = [span[0] - pads[2] + extra[0] - (strides[0] - 1), span[1] - pads[3] + extra[1] - (strides[1] - 1)]
    codes = _zeros_between(model, name, x_dq.inputs[0], x_q, strides)
    crop_begin, crop_end = [max(0, -b) for b in begin], [max(0, -e) for e in end]
    if any(crop_begin) or any(crop_end):
        cropped = var(model, f"{name}_cropped", codes.dtype)
        model.add_node("Slice", [codes, const(model, f"{name}_crop_start", np.array(crop_begin, np.int64)),
                                 const(model, f"{name}_crop_end", np.array([-c if c else np.iinfo(np.int64).max
                                                                           for c in crop_end], np.int64)),
                                 const(model, f"{name}_crop_axes", np.array([2, 3], np.int64))],
                       [cropped], f"{name}_crop")
        codes = cropped
    x_float = var(model, f"{name}_zero_inserted", np.float32)
    model.add_node(DEQUANTIZE, [codes, *x_dq.inputs[1:]], [x_float], f"{name}_zero_inserted_dq", dict(x_dq.attrs))
    inputs = [x_float, w_float] + ([node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2].name else [])
    conv_pads = [max(0, v) for v in begin] + [max(0, v) for v in end]
    y = node.outputs[0]
    node.outputs.clear()
    model.add_node("Conv", inputs, [y], f"{name}_as_conv",
                   {"kernel_shape": [kh, kw], "dilations": dilations, "group": groups, "pads": conv_pads})


def _zeros_between(model: QModel, name: str, codes: gs.Tensor, x_q, strides: list[int]) -> gs.Tensor:
    """(N, C, H, W) codes → (N, C, H·s_h, W·s_w) with s-1 zero-point codes after every pixel along
    each axis (Unsqueeze → Pad → Reshape, sizes read at run time); `codes` itself when s = 1."""
    if strides == [1, 1]:
        return codes
    sh, sw = strides
    dtype = x_q.dtype
    gaps = var(model, f"{name}_gaps", dtype)
    model.add_node("Unsqueeze", [codes, const(model, f"{name}_gap_axes", np.array([3, 5], np.int64))], [gaps],
                   f"{name}_gaps")
    padded = var(model, f"{name}_gaps_filled", dtype)
    model.add_node("Pad", [gaps, const(model, f"{name}_gap_pads", np.array([0] * 6 + [0, 0, 0, sh - 1, 0, sw - 1], np.int64)),
                           const(model, f"{name}_gap_value", np.asarray(x_q.zero_point, dtype).reshape(()))],
                   [padded], f"{name}_gaps_filled", {"mode": "constant"})
    spatial = _spatial_size(model, f"{name}_codes", codes)
    target = _shape_of_4d(model, f"{name}_spread", [0, 0], spatial, [sh, sw])
    spread = var(model, f"{name}_spread", dtype)
    model.add_node("Reshape", [padded, target], [spread], f"{name}_spread")
    return spread


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
    spatial = _spatial_size(model, f"{name}_in", shape_of)
    merge_target = _shape_of_4d(model, f"{name}_merge", [0], spatial, [kh, kw], tail=[channels])
    merged = var(model, f"{name}_merged_nhwc", planes.dtype)
    model.add_node("Reshape", [interleaved, merge_target], [merged], f"{name}_merge")
    model.add_node("Transpose", [merged], [out], f"{name}_to_nchw", {"perm": [0, 3, 1, 2]})


def _spatial_size(model: QModel, base: str, of: gs.Tensor) -> gs.Tensor:
    """[H, W] of the 4-D tensor `of`, read at run time (Shape → Slice)."""
    shape = var(model, f"{base}_shape", np.int64)
    model.add_node("Shape", [of], [shape], f"{base}_shape")
    spatial = var(model, f"{base}_hw", np.int64)
    model.add_node("Slice", [shape, const(model, f"{base}_hw_start", np.array([2], np.int64)),
                             const(model, f"{base}_hw_end", np.array([4], np.int64))], [spatial], f"{base}_hw")
    return spatial


def _shape_of_4d(model: QModel, base: str, head: list[int], spatial: gs.Tensor,
                 factor: list[int] | None = None, tail: list[int] = ()) -> gs.Tensor:
    """A Reshape target: `head` (0 copies the input's dimension), [H, W] times `factor`, `tail`."""
    if factor is not None:
        grown = var(model, f"{base}_hw", np.int64)
        model.add_node("Mul", [spatial, const(model, f"{base}_factor", np.array(factor, np.int64))], [grown],
                       f"{base}_hw")
        spatial = grown
    parts = [const(model, f"{base}_head", np.array(head, np.int64)), spatial]
    if tail:
        parts.append(const(model, f"{base}_tail", np.array(tail, np.int64)))
    target = var(model, f"{base}_target", np.int64)
    model.add_node("Concat", parts, [target], f"{base}_target", {"axis": 0})
    return target
