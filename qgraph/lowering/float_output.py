"""Compute ops that read integers and write float (no integer op reads their output: a head
before float post-processing). Both targets use one integer form:

    acc = ConvInteger | MatMulInteger (x_q, w_q, z_x, z_w) + b_int32          (int32, exact)
    y   = float32(acc) · (s_x · s_w)              (Cast and Mul: a DequantizeLinear, per channel)

with ``b_int32 = round(b / (s_x·s_w))`` (quant.quantize_bias). ORT 1.19 runs ConvInteger only
for uint8 × uint8 with one weight zero point, so int8 weights are stored shifted (q + 128,
zero point + 128: the same real values, quant.int8_as_uint8). Versus the QDQ model, which adds
a float bias to a float sum, the only difference is the bias rounded to the accumulator's grid
and float32 rounding of the sum; `qgraph diff` compares such outputs as float tensors.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from qgraph import quant
from qgraph.graph import QModel
from qgraph.idioms import Declined
from qgraph.lowering.patterns import QInput, Site, const, var


def lower_to_float(model: QModel, site: Site, x: QInput, w: QInput) -> None:
    """Rewrite a float-output Conv/Gemm/MatMul site (integer activation `x`, weight `w`; for a
    MatMul `w` may be a second activation, as in attention scores before a float Softmax)."""
    node = site.node
    name = node.name
    if x.quantizer.dtype != np.uint8:
        raise Declined(f"input '{x.tensor.name}' is {x.quantizer.dtype.name}; the integer accumulation "
                       "takes uint8 activations")
    if w.const is None:
        return _activation_product(model, site, x, w)
    if node.op == "Conv":
        weight, channels, channel_shape = convinteger_weight(w)
    else:
        weight = _matmul_weight(node, w)
        channels = weight[0].shape[1]
        channel_shape = (channels,)
    scale = np.broadcast_to(quant.bias_scale(x.quantizer.scale, w.quantizer.scale), (channels,)).astype(np.float32)
    bias = None
    if node.op in ("Conv", "Gemm") and len(site.inputs) > 2 and site.inputs[2] is not None:
        value = site.inputs[2]
        if isinstance(value, QInput):
            if value.const is None:
                raise Declined("the bias is not constant")
            value = value.quantizer.dequantize(value.const, axis=0)
        bias = quant.quantize_bias(np.asarray(value, np.float32).reshape(-1), x.quantizer.scale,
                                   np.broadcast_to(w.quantizer.scale, (channels,)))
    out = node.outputs[0]
    node.outputs.clear()
    acc = var(model, f"{name}_acc", np.int32)
    if node.op == "Conv":
        w_u8, wz = weight
        model.add_node("ConvInteger", [x.tensor, const(model, f"{name}_w_u8", w_u8),
                                       const(model, f"{name}_x_zero_point", x.quantizer.zero_point),
                                       const(model, f"{name}_w_zero_point", wz)], [acc], name, dict(node.attrs))
    else:
        w_q, wz = weight
        model.add_node("MatMulInteger", [x.tensor, const(model, f"{name}_w_km", w_q),
                                         const(model, f"{name}_x_zero_point", x.quantizer.zero_point),
                                         const(model, f"{name}_w_zero_point", wz)], [acc], name)
    if bias is not None:
        biased = var(model, f"{name}_acc_bias", np.int32)
        model.add_node("Add", [acc, const(model, f"{name}_bias_int32", bias.reshape(channel_shape))], [biased],
                       f"{name}_bias")
        acc = biased
    _to_float(model, acc, scale if np.any(scale != scale[0]) else scale[0], channel_shape, out, name)


def _to_float(model: QModel, acc, scale, channel_shape, out, name: str) -> None:
    """``out = float32(acc) · scale``, per channel or per tensor. This is what DequantizeLinear of
    an int32 tensor computes; written as Cast and Mul because ORT 1.19's QDQ propagation moves
    an int32 DequantizeLinear below a following Reshape by inserting a QuantizeLinear without a
    zero point — a uint8 one — which saturates the accumulator."""
    wide = var(model, f"{name}_acc_float", np.float32)
    model.add_node("Cast", [acc], [wide], f"{name}_to_float", {"to": TensorProto.FLOAT})
    scale = np.asarray(scale, np.float32)
    scale = scale.reshape(channel_shape) if scale.size > 1 else scale.reshape(())
    model.add_node("Mul", [wide, const(model, f"{name}_acc_scale", scale)], [out], f"{name}_scale")


def _activation_product(model: QModel, site: Site, a: QInput, b: QInput) -> None:
    """``DQ(MatMulInteger(a_q, b_q, z_a, z_b), s_a · s_b)`` for a MatMul of two activations."""
    if a.quantizer.per_channel or b.quantizer.per_channel:
        raise Declined("a MatMul of two activations needs per-tensor quantizers")
    name = site.node.name
    out = site.node.outputs[0]
    site.node.outputs.clear()
    acc = var(model, f"{name}_acc", np.int32)
    model.add_node("MatMulInteger", [a.tensor, b.tensor, const(model, f"{name}_a_zp", a.quantizer.zero_point),
                                     const(model, f"{name}_b_zp", b.quantizer.zero_point)], [acc], name)
    _to_float(model, acc, quant.bias_scale(a.quantizer.scale, b.quantizer.scale), (1,), out, name)


def convinteger_weight(w: QInput):
    """((uint8 weight, its scalar zero point), output channels, per-channel broadcast shape) for
    ORT's ConvInteger, which takes uint8 weights and one w_zero_point (int8 codes shift by 128)."""
    zps = np.unique(w.quantizer.zero_point)
    if zps.size != 1:
        raise Declined("per-channel weight zero points differ; ORT's ConvInteger takes one w_zero_point")
    if w.quantizer.dtype == np.int8:
        w_u8, wz = quant.int8_as_uint8(w.const), quant.int8_as_uint8(zps[0])
    else:
        w_u8, wz = w.const, np.uint8(zps[0])
    channels = w.const.shape[0]
    return (w_u8, np.asarray(wz)), channels, (channels,) + (1,) * (w.const.ndim - 2)


def _matmul_weight(node, w: QInput):
    """A Gemm/MatMul weight as [K, M] (what MatMulInteger multiplies by), with per-column zero points."""
    if node.op == "Gemm":
        attrs = node.attrs
        if float(attrs.get("alpha", 1.0)) != 1.0 or float(attrs.get("beta", 1.0)) != 1.0 or attrs.get("transA", 0):
            raise Declined("Gemm with alpha/beta != 1 or transA is not lowered")
        w_km = w.const.T if attrs.get("transB", 0) else w.const
    else:
        if w.const.ndim != 2:
            raise Declined("MatMul with a weight of rank other than 2 is not lowered")
        w_km = w.const
    w_km = np.ascontiguousarray(w_km)
    zp = w.quantizer.zero_point
    zp = np.broadcast_to(zp, (w_km.shape[1],)).copy() if zp.ndim else zp
    return (w_km, zp)
