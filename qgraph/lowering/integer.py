"""Target `integer`: only integer tensors between the input QuantizeLinear and the output
DequantizeLinear (integer-only NPUs/MCUs, linger's fixed point).

    acc = ConvInteger | MatMulInteger (x, w, x_zp, w_zp)  + bias_int32          (int32)
    y   = clip(((acc · M0 + 2^(n-1)) − mod) / 2^n + zp_y, qmin, qmax)           (int64 → 8 bit)

with ``M0 · 2^-n ≈ s_x·s_w/s_y`` (quant.quantize_multiplier; round half up, one rounding:
quant.requantize_fixed_point, emitted with quant.requantize_fixed_point_onnx_form).

What ORT 1.19 CPU runs (probed with one-node models): ConvInteger only for uint8 × uint8 with a
scalar w_zero_point; MatMulInteger for u8×u8, u8×s8, s8×s8 with per-column b_zero_point;
Add/Sub/Mul/Div/Mod/Clip/Max/Min/ReduceSum on int32 and int64 (not on 8-bit types); Clip,
MaxPool, Resize, Transpose, Concat, Gather on int8 and uint8. Hence:

- every activation is stored as uint8: an int8 quantizer (q, zp) becomes (q + 128, zp + 128),
  the same real values and the same rounding (QuantizeLinear clamps before adding zp);
- int8 weights of a Conv become uint8 ``w + 128`` with w_zero_point ``zp + 128`` (all channels
  must share one zero point — symmetric weights do);
- residual Add: ``y = round((Ka·(a−za) + Kb·(b−zb)) / 2^n) + zp_y`` with Ka, Kb on one shift;
- Mul: ``(a−za)·(b−zb)`` in int32, multiplier ``s_a·s_b/s_y``;
- average pools: an int32 ReduceSum (global) or a depthwise ConvInteger of ones (windowed,
  unpadded) minus ``count·zp``, multiplier ``s_x / (count·s_y)``;
- unary elementwise ops (Sigmoid, LeakyRelu, Tanh, …): a 256-entry Gather table;
- Relu/Clip: a Clip on the uint8 output (see patterns).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from qgraph import quant
from qgraph.graph import QModel
from qgraph.idioms import SHAPE_SOURCES, Declined
from qgraph.lowering import qlinear
from qgraph.lowering.float_output import lower_to_float
from qgraph.quant import shared_shift_multipliers
from qgraph.lowering.patterns import (DEQUANTIZE, QUANTIZE, QInput, Quantizer, Site, const, finish_site,
                                      read_quantizer, var)

_ONNX_TYPES = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8, "int32": TensorProto.INT32,
               "int64": TensorProto.INT64}


# -- emitters ---------------------------------------------------------------------------------

def _channel_shaped(value, channel_shape) -> np.ndarray:
    value = np.asarray(value)
    return value.reshape(channel_shape) if value.size > 1 else value.reshape(())


def emit_requantize(model: QModel, acc: gs.Tensor, multiplier, out_q: Quantizer, out: gs.Tensor,
                    name: str, channel_shape=(-1,), steps=None) -> None:
    """Emit the fixed-point requantization of int32 ``acc`` into ``out`` (``out_q``'s grid).
    ``steps`` overrides the list from quant.requantize_fixed_point_onnx_form (e.g. for Add)."""
    if steps is None:
        m0, shift = quant.quantize_multiplier(np.asarray(multiplier, np.float64))
        steps = quant.requantize_fixed_point_onnx_form(m0, shift, out_q.zero_point.astype(np.int64),
                                                       out_q.qmin, out_q.qmax)
    value = acc
    for k, (op, constant, attrs) in enumerate(steps):
        last = k == len(steps) - 1
        target = out if last else var(model, f"{name}_r{k}", np.int64)
        label = f"{name}_{op.lower()}{k}"
        if op == "Cast":
            to = out_q.dtype.name if attrs["to"] in ("int8", "uint8") else attrs["to"]
            model.add_node("Cast", [value], [target], label, {"to": _ONNX_TYPES[to]})
        elif op == "SubMod":
            rem = var(model, f"{name}_rem{k}", np.int64)
            model.add_node("Mod", [value, const(model, f"{label}_d", _channel_shaped(constant, channel_shape))],
                           [rem], label, {"fmod": 0})
            model.add_node("Sub", [value, rem], [target], label + "_sub")
        elif op == "Clip":
            lo, hi = constant
            model.add_node("Clip", [value, const(model, f"{label}_lo", np.array(lo, np.int64)),
                                    const(model, f"{label}_hi", np.array(hi, np.int64))], [target], label)
        else:
            c = const(model, f"{label}_c", _channel_shaped(np.asarray(constant, np.int64), channel_shape))
            model.add_node(op, [value, c], [target], label)
        value = target


def emit_centered(model: QModel, x: QInput, name: str, dtype=np.int32) -> gs.Tensor:
    """``x − zp`` as int32 (or int64)."""
    wide = var(model, f"{name}_wide", dtype)
    model.add_node("Cast", [x.tensor], [wide], f"{name}_cast", {"to": _ONNX_TYPES[np.dtype(dtype).name]})
    centered = var(model, f"{name}_centered", dtype)
    zp = const(model, f"{name}_zp", np.array(-x.quantizer.scalar_zero_point(), dtype))
    model.add_node("Add", [wide, zp], [centered], f"{name}_center")
    return centered


def requantize_integer(model: QModel, x: QInput, out_q: Quantizer, out: gs.Tensor, name: str) -> None:
    """Change grids with integers only: ``(x − zx) · s_x/s_y`` in fixed point, plus zp_y."""
    acc = emit_centered(model, x, name)
    emit_requantize(model, acc, quant.requant_multiplier(x.quantizer.scale, 1.0, out_q.scale), out_q, out, name)


# -- preparation -------------------------------------------------------------------------------

def unsign_activations(model: QModel) -> int:
    """int8 activation quantizers (and their DequantizeLinear readers) become uint8 with zp + 128."""
    changed = 0
    for node in list(model.graph.nodes):
        if node.op != QUANTIZE or model.constant_value(node.inputs[0]) is not None:
            continue
        q = read_quantizer(node)
        out = node.outputs[0]
        if q is None or q.dtype != np.int8 or model.is_graph_output(out):
            continue
        readers = list(out.outputs)
        if any(r.op != DEQUANTIZE for r in readers):
            continue
        zp = const(model, f"{out.name}_zero_point_u8", quant.int8_as_uint8(q.zero_point))
        for n in [node, *readers]:
            n.inputs[2] = zp
        out.dtype = np.uint8
        changed += 1
    return changed


# -- rules -------------------------------------------------------------------------------------

def _uint8_activation(site: Site, i: int) -> QInput:
    x = qlinear.activation(site, i)
    if x.quantizer.dtype != np.uint8:
        raise Declined(f"input '{x.tensor.name}' is {x.quantizer.dtype.name}; the integer target stores "
                       "activations as uint8")
    return x


def _add_bias(model: QModel, acc: gs.Tensor, bias, channel_shape, name: str) -> gs.Tensor:
    if bias is None:
        return acc
    biased = var(model, f"{name}_acc_bias", np.int32)
    model.add_node("Add", [acc, const(model, f"{name}_bias_int32", bias.reshape(channel_shape))], [biased],
                   f"{name}_bias")
    return biased


def _weight_multiplier(x: QInput, w: QInput, out_q: Quantizer) -> np.ndarray:
    return quant.requant_multiplier(x.quantizer.scale, w.quantizer.scale, out_q.scale)


def lower_conv(model: QModel, site: Site) -> None:
    node = site.node
    x, w = _uint8_activation(site, 0), qlinear.weight(site, 1)
    if site.float_output:
        return lower_to_float(model, site, x, w)
    wzp = np.unique(w.quantizer.zero_point)
    if wzp.size != 1:
        raise Declined("per-channel weight zero points differ; ORT's ConvInteger takes one w_zero_point")
    if w.quantizer.dtype == np.int8:
        w_u8, wz = quant.int8_as_uint8(w.const), quant.int8_as_uint8(wzp[0])
    else:
        w_u8, wz = w.const, np.uint8(wzp[0])
    channels = w.const.shape[0]
    bias = qlinear.int32_bias(site, 2, x, w, channels)
    channel_shape = (channels,) + (1,) * (w.const.ndim - 2)
    name = node.name

    def build(out):
        acc = var(model, f"{name}_acc", np.int32)
        xz = const(model, f"{name}_x_zero_point", np.asarray(x.quantizer.zero_point, np.uint8))
        model.add_node("ConvInteger", [x.tensor, const(model, f"{name}_w_u8", w_u8), xz,
                                       const(model, f"{name}_w_zero_point", np.asarray(wz))],
                       [acc], name, dict(node.attrs))
        acc = _add_bias(model, acc, bias, channel_shape, name)
        emit_requantize(model, acc, _weight_multiplier(x, w, site.out_q), site.out_q, out, f"{name}_requant",
                        channel_shape)

    finish_site(model, site, build)


def lower_gemm(model: QModel, site: Site) -> None:
    node = site.node
    qlinear.check_gemm_form(node)
    x, w = _uint8_activation(site, 0), site.qin(1)
    if w is None:
        raise Declined("missing quantizer: input 1 is not dequantized")
    if site.float_output:
        return lower_to_float(model, site, x, w)
    name = node.name
    if w.const is None:  # activation × activation
        if w.quantizer.per_channel or w.quantizer.dtype != np.uint8:
            raise Declined(f"input '{w.tensor.name}' must be a per-tensor uint8 activation")
        ratio = quant.requant_multiplier(x.quantizer.scale, w.quantizer.scale, site.out_q.scale)

        def build_act(out):
            acc = var(model, f"{name}_acc", np.int32)
            model.add_node("MatMulInteger", [x.tensor, w.tensor,
                                             const(model, f"{name}_a_zp", x.quantizer.zero_point),
                                             const(model, f"{name}_b_zp", w.quantizer.zero_point)], [acc], name)
            emit_requantize(model, acc, ratio, site.out_q, out, f"{name}_requant")

        finish_site(model, site, build_act)
        return
    w_km = np.ascontiguousarray(qlinear.gemm_weight_mk(node, w.const).T)
    channels = w_km.shape[1]
    bias = qlinear.int32_bias(site, 2, x, w, channels) if node.op == "Gemm" else None
    wz = w.quantizer.zero_point
    wz = np.broadcast_to(wz, (channels,)).copy() if wz.ndim else wz

    def build(out):
        acc = var(model, f"{name}_acc", np.int32)
        model.add_node("MatMulInteger", [x.tensor, const(model, f"{name}_w_km", w_km),
                                         const(model, f"{name}_x_zero_point", x.quantizer.zero_point),
                                         const(model, f"{name}_w_zero_point", wz)], [acc], name)
        acc = _add_bias(model, acc, bias, (channels,), name)
        emit_requantize(model, acc, _weight_multiplier(x, w, site.out_q), site.out_q, out, f"{name}_requant",
                        (channels,))

    finish_site(model, site, build)


def lower_add(model: QModel, site: Site) -> None:
    a, b = _uint8_activation(site, 0), qlinear.activation(site, 1)
    k, n = shared_shift_multipliers([quant.requant_multiplier(a.quantizer.scale, 1.0, site.out_q.scale),
                                     quant.requant_multiplier(b.quantizer.scale, 1.0, site.out_q.scale)])
    if n < 1 or n > 62:
        raise Declined(f"Add scales too far apart for a 64-bit fixed-point sum (shift {n})")
    name = site.node.name
    steps = quant.requantize_fixed_point_onnx_form(np.int64(1), n - 31, site.out_q.zero_point.astype(np.int64),
                                                   site.out_q.qmin, site.out_q.qmax)
    assert steps[0][0] == "Cast" and steps[1][0] == "Mul"  # replaced below by the two-term sum

    def build(out):
        terms = []
        for i, (x, kx) in enumerate(((a, k[0]), (b, k[1]))):
            centered = emit_centered(model, x, f"{name}_in{i}", np.int64)
            scaled = var(model, f"{name}_in{i}_scaled", np.int64)
            model.add_node("Mul", [centered, const(model, f"{name}_k{i}", np.array(kx, np.int64))], [scaled],
                           f"{name}_scale{i}")
            terms.append(scaled)
        total = var(model, f"{name}_sum", np.int64)
        model.add_node("Add", terms, [total], name)
        emit_requantize(model, total, None, site.out_q, out, f"{name}_requant", steps=steps[2:])

    finish_site(model, site, build)


def lower_mul(model: QModel, site: Site) -> None:
    a, b = _uint8_activation(site, 0), qlinear.activation(site, 1)
    ratio = quant.requant_multiplier(a.quantizer.scale, b.quantizer.scale, site.out_q.scale)
    name = site.node.name

    def build(out):
        prod = var(model, f"{name}_acc", np.int32)
        model.add_node("Mul", [emit_centered(model, a, f"{name}_a"), emit_centered(model, b, f"{name}_b")],
                       [prod], name)
        emit_requantize(model, prod, ratio, site.out_q, out, f"{name}_requant")

    finish_site(model, site, build)


def _static_dims(tensor: gs.Tensor, axes) -> list[int] | None:
    shape = tensor.shape
    if shape is None:
        return None
    dims = [shape[a] if a < len(shape) else None for a in axes]
    return dims if all(isinstance(d, (int, np.integer)) and d > 0 for d in dims) else None


def lower_global_average_pool(model: QModel, site: Site) -> None:
    x = _uint8_activation(site, 0)
    rank = len(site.node.inputs[0].shape or ())
    spatial = _static_dims(site.node.inputs[0], range(2, rank)) if rank > 2 else None
    if spatial is None:
        raise Declined("dynamic shape: GlobalAveragePool needs static spatial dimensions")
    count = int(np.prod(spatial))
    ratio = quant.requant_multiplier(x.quantizer.scale, 1.0, site.out_q.scale, divisor=count)
    name = site.node.name

    def build(out):
        wide = var(model, f"{name}_wide", np.int32)
        model.add_node("Cast", [x.tensor], [wide], f"{name}_cast", {"to": TensorProto.INT32})
        total = var(model, f"{name}_sum", np.int32)
        model.add_node("ReduceSum", [wide, const(model, f"{name}_axes", np.arange(2, rank, dtype=np.int64))],
                       [total], name, {"keepdims": 1})
        acc = var(model, f"{name}_acc", np.int32)
        model.add_node("Add", [total, const(model, f"{name}_zp_sum", np.array(-count * x.quantizer.scalar_zero_point(),
                                                                                  np.int32))], [acc], f"{name}_center")
        emit_requantize(model, acc, ratio, site.out_q, out, f"{name}_requant")

    finish_site(model, site, build)


def lower_average_pool(model: QModel, site: Site) -> None:
    x = _uint8_activation(site, 0)
    attrs = site.node.attrs
    if any(attrs.get("pads", [0])) or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID") \
            or attrs.get("ceil_mode", 0):
        raise Declined("padded or ceil-mode AveragePool is not lowered (the divisor varies per position)")
    channels = _static_dims(site.node.inputs[0], [1])
    if channels is None:
        raise Declined("dynamic shape: AveragePool needs a static channel count")
    kernel = list(attrs["kernel_shape"])
    count = int(np.prod(kernel))
    ratio = quant.requant_multiplier(x.quantizer.scale, 1.0, site.out_q.scale, divisor=count)
    name = site.node.name
    conv_attrs = {"group": channels[0], "kernel_shape": kernel}
    if "strides" in attrs:
        conv_attrs["strides"] = attrs["strides"]

    def build(out):
        acc = var(model, f"{name}_acc", np.int32)
        ones = np.ones([channels[0], 1] + kernel, np.uint8)
        model.add_node("ConvInteger", [x.tensor, const(model, f"{name}_ones", ones),
                                       const(model, f"{name}_x_zero_point", x.quantizer.zero_point),
                                       const(model, f"{name}_w_zero_point", np.uint8(0))], [acc], name, conv_attrs)
        emit_requantize(model, acc, ratio, site.out_q, out, f"{name}_requant")

    finish_site(model, site, build)


def lower_concat(model: QModel, site: Site) -> None:
    acts = [_uint8_activation(site, i) for i in range(len(site.inputs))]
    name = site.node.name

    def build(out):
        parts = []
        for i, a in enumerate(acts):
            if a.quantizer.same_grid(site.out_q):
                parts.append(a.tensor)
                continue
            part = var(model, f"{name}_in{i}_requant", np.uint8)
            requantize_integer(model, a, site.out_q, part, f"{name}_in{i}")
            parts.append(part)
        model.add_node("Concat", parts, [out], name, {"axis": site.node.attrs["axis"]})

    finish_site(model, site, build)


def lower_moving(model: QModel, site: Site) -> None:
    qlinear.lower_moving(model, site, requantize=requantize_integer)


#: Tables stay in the model's layout: ConvInteger runs NCHW, ORT inserts no Transposes.
TABLES_CHANNELS_LAST = False

RULES = {
    "Conv": lower_conv,
    "Gemm": lower_gemm,
    "MatMul": lower_gemm,
    "Add": lower_add,
    "Mul": lower_mul,
    "GlobalAveragePool": lower_global_average_pool,
    "AveragePool": lower_average_pool,
    "Concat": lower_concat,
    **{op: lower_moving for op in qlinear.MOVING_OPS},
    **{op: qlinear.lower_unary_table for op in qlinear.UNARY_TABLE_OPS},
}


# -- checking ----------------------------------------------------------------------------------

def float_nodes(model: QModel) -> list[gs.Node]:
    """Nodes reading or writing a float tensor (constant parameters such as Resize scales aside),
    other than QuantizeLinear reading float and DequantizeLinear writing float (the boundary of
    the integer region). Needs inferred dtypes."""
    found = []
    for node in model.graph.nodes:
        if node.op in SHAPE_SOURCES:
            continue                     # reads a tensor's shape, not its values
        tensors = [t for t in (*node.inputs, *node.outputs) if isinstance(t, gs.Variable) and t.name]
        if node.op == QUANTIZE:
            tensors = [node.outputs[0]]
        elif node.op == DEQUANTIZE:
            tensors = [node.inputs[0]]
        if any(_is_float(t) for t in tensors):
            found.append(node)
    return found


def _is_float(tensor: gs.Tensor) -> bool:
    """Float, or of unknown type: the integer-only guarantee holds only for tensors proven integer."""
    dtype = tensor.values.dtype if isinstance(tensor, gs.Constant) else tensor.dtype
    if dtype is None:
        return True
    try:
        return not np.issubdtype(np.dtype(dtype), np.integer) and np.dtype(dtype) != np.bool_
    except TypeError:
        return True
