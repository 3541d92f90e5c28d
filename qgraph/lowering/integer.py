"""Target `integer`: only integer tensors between the input QuantizeLinear and the output
DequantizeLinear (integer-only NPUs/MCUs, linger's fixed point).

    acc = ConvInteger | MatMulInteger (x, w, x_zp, w_zp)  + bias_int32          (int32)
    y   = clip(((acc · M0 + 2^(n-1)) − mod) / 2^n + zp_y, qmin, qmax)           (int64 → 8 bit)

with ``M0 · 2^-n ≈ s_x·s_w/s_y`` (quant.quantize_multiplier; round half up, one rounding:
quant.requantize_fixed_point). Emitted, bit for bit, as the cheapest form that fits: int32
``clip((acc·p + r) / q)`` where the accumulator's bound lets int32 hold it (quant.division_steps:
every conv of the zoo), else int64 steps with an unsigned BitShift (quant.fixed_point_steps),
else the Mod/Div chain (quant.requantize_fixed_point_onnx_form).

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
- both, when their inputs are uint8 codes: a 65536-entry table of that rule indexed by
  ``256·a + b`` (tables.emit_pair_table), five int32 passes instead of the arithmetic's nine-plus;
- depthwise convolutions: ORT's ConvInteger runs an im2col and a GEMM per image and group, slowest
  on small maps; where the map is small, one matrix per channel over the flattened map
  (depthwise_as_matrix, batched MatMulInteger), else where it is narrow, the padded row windows
  side by side times one banded matrix per channel (depthwise_as_band), else a grouped ConvInteger
  with a few channels per group (depthwise_as_grouped) — all exact, the zero point where no tap is;
- average pools: an int32 ReduceSum (global) or a depthwise ConvInteger of ones (windowed,
  unpadded) minus ``count·zp``, multiplier ``s_x / (count·s_y)``; a global pool of a map whose
  size is known only at run time divides by the count taken from its shape, in int64
  (quant.mean_requant);
- unary elementwise ops (Sigmoid, LeakyRelu, Tanh, …): a 256-entry Gather table;
- Relu/Clip: a Clip on the uint8 output (see patterns);
- MaxPool of at least 5x5 at stride 1: a pool over rows, then over columns (separable_max_pools).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from qgraph import quant
from qgraph.graph import QModel
from qgraph.idioms import SHAPE_SOURCES, Declined
from qgraph.lowering import qlinear
from qgraph.lowering.float_output import convinteger_weight, lower_to_float
from qgraph.quant import shared_shift_multipliers
from qgraph.lowering.patterns import (DEQUANTIZE, QUANTIZE, QInput, Quantizer, Site, clamp_bounds, const,
                                      finish_site, read_quantizer, var)
from qgraph.lowering.tables import emit_channel_tables, emit_pair_table, emit_table

_ONNX_TYPES = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8, "int32": TensorProto.INT32,
               "int64": TensorProto.INT64}


# -- emitters ---------------------------------------------------------------------------------

def _channel_shaped(value, channel_shape) -> np.ndarray:
    value = np.asarray(value)
    return value.reshape(channel_shape) if value.size > 1 else value.reshape(())


def emit_requantize(model: QModel, acc: gs.Tensor, multiplier, out_q: Quantizer, out: gs.Tensor,
                    name: str, channel_shape=(-1,), *, bias=None, acc_bound=None, bounds=None,
                    fixed_point=None) -> None:
    """Emit the fixed-point requantization of the integer accumulator ``acc`` plus the int32
    `bias` into `out` on `out_q`'s grid, clipped to `bounds` (a folded activation's codes) or the
    storage range: quant.fixed_point_steps, with `acc_bound` the largest ``|acc|`` per channel
    (None: unknown; the accumulator is then clipped first). An int32 `acc` with a bound takes the
    int32 division form where one fits (quant.division_steps); an int64 `acc` (a sum of scaled
    terms) is taken as it is; `fixed_point` = (m0, shift) gives the multiplier in fixed point."""
    m0, shift = fixed_point or quant.quantize_multiplier(np.asarray(multiplier, np.float64))
    qlo, qhi = bounds if bounds is not None else (out_q.qmin, out_q.qmax)
    zp = out_q.scalar_zero_point()
    if acc.dtype == np.int32:
        division = quant.division_steps(m0, shift, zp, qlo, qhi, out_q.dtype, bias, acc_bound)
        if division is not None:
            return _emit_division(model, acc, division, out_q, out, name, channel_shape)
    steps = quant.fixed_point_steps(m0, shift, zp, qlo, qhi, out_q.dtype, bias, acc_bound)
    if steps is None:
        return _emit_mod_div(model, acc, m0, shift, zp, (qlo, qhi), out_q, out, name, channel_shape, bias)

    def constant(label, value, dtype):
        return const(model, f"{name}_{label}", _channel_shaped(np.asarray(value, dtype), channel_shape))

    value = acc
    if steps.acc_lo is not None:
        if np.unique(steps.acc_lo).size == 1 and np.unique(steps.acc_hi).size == 1:
            clipped = var(model, f"{name}_acc_clipped", np.int32)
            model.add_node("Clip", [value, constant("acc_lo", steps.acc_lo[0], np.int32),
                                    constant("acc_hi", steps.acc_hi[0], np.int32)], [clipped], f"{name}_acc_clip")
            value = clipped
        else:
            for op, bound in (("Max", steps.acc_lo), ("Min", steps.acc_hi)):
                clipped = var(model, f"{name}_acc_{op.lower()}", np.int32)
                model.add_node(op, [value, constant(f"acc_{op.lower()}", bound, np.int32)], [clipped],
                               f"{name}_acc_{op.lower()}")
                value = clipped
    if value.dtype != np.int64:
        wide = var(model, f"{name}_wide", np.int64)
        model.add_node("Cast", [value], [wide], f"{name}_wide", {"to": TensorProto.INT64})
        value = wide
    if np.any(steps.multiplier != 1):
        scaled = var(model, f"{name}_scaled", np.int64)
        model.add_node("Mul", [value, constant("multiplier", steps.multiplier, np.int64)], [scaled], f"{name}_scale")
        value = scaled
    shifted_in = var(model, f"{name}_offset", np.int64)
    model.add_node("Add", [value, constant("offset", steps.offset, np.int64)], [shifted_in], f"{name}_offset")
    unsigned = var(model, f"{name}_unsigned", np.uint64)
    model.add_node("Cast", [shifted_in], [unsigned], f"{name}_unsigned", {"to": TensorProto.UINT64})
    shifted = var(model, f"{name}_shifted", np.uint64)
    model.add_node("BitShift", [unsigned, constant("shift", steps.shift, np.uint64)], [shifted], f"{name}_shift",
                   {"direction": "RIGHT"})
    _clip_and_narrow(model, shifted, np.uint64, steps.clip, out_q, out, name)


def _clip_and_narrow(model, value, dtype, clip, out_q, out, name) -> None:
    """Clip `value` (of `dtype`) to the codes' [lo, hi] when `clip` is given, then Cast it to storage."""
    if clip is not None:
        clipped = var(model, f"{name}_clipped", dtype)
        model.add_node("Clip", [value, const(model, f"{name}_lo", dtype(clip[0])),
                                const(model, f"{name}_hi", dtype(clip[1]))], [clipped], f"{name}_clip")
        value = clipped
    model.add_node("Cast", [value], [out], f"{name}_narrow", {"to": _ONNX_TYPES[out_q.dtype.name]})


def _emit_division(model, acc, steps: quant.DivisionSteps, out_q, out, name, channel_shape) -> None:
    """quant.DivisionSteps: int32 Mul, Add, Div (each left out where it is the identity), Clip, Cast."""
    value = acc
    if steps.acc_clip is not None:
        clipped = var(model, f"{name}_acc_clipped", np.int32)
        model.add_node("Clip", [value, const(model, f"{name}_acc_lo", np.int32(-steps.acc_clip)),
                                const(model, f"{name}_acc_hi", np.int32(steps.acc_clip))], [clipped], f"{name}_acc_clip")
        value = clipped
    for op, constant, identity in (("Mul", steps.multiplier, 1), ("Add", steps.offset, 0), ("Div", steps.divisor, 1)):
        if np.all(constant == identity):
            continue
        label = f"{name}_{op.lower()}"
        result = var(model, label, np.int32)
        c = const(model, f"{label}_c", _channel_shaped(np.asarray(constant, np.int32), channel_shape))
        model.add_node(op, [value, c], [result], label)
        value = result
    _clip_and_narrow(model, value, np.int32, steps.clip, out_q, out, name)


def _emit_mod_div(model, acc, m0, shift, zp, bounds, out_q, out, name, channel_shape, bias) -> None:
    """quant.requantize_fixed_point_onnx_form: the general form, where no int64 form of
    fixed_point_steps fits (multipliers below about 2^-22)."""
    if bias is not None:
        biased = var(model, f"{name}_acc_bias", acc.dtype)
        model.add_node("Add", [acc, const(model, f"{name}_bias", _channel_shaped(np.asarray(bias, acc.dtype),
                                                                                channel_shape))],
                       [biased], f"{name}_bias")
        acc = biased
    steps = quant.requantize_fixed_point_onnx_form(m0, shift, np.int64(zp), *bounds)
    value = acc
    for k, (op, constant, attrs) in enumerate(steps):
        last = k == len(steps) - 1
        target = out if last else var(model, f"{name}_r{k}", np.int64)
        label = f"{name}_{op.lower()}{k}"
        if op == "Cast":
            if attrs["to"] == "int64" and value.dtype == np.int64:
                continue
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
    """Change grids with integers only: ``(x − zx) · s_x/s_y`` in fixed point, plus zp_y — for
    8-bit codes a 256-entry table of that rule (tables.emit_table: one lookup where the
    arithmetic took nine ops)."""
    m0, shift = quant.quantize_multiplier(quant.requant_multiplier(x.quantizer.scale, 1.0, out_q.scale))
    codes = quant.all_codes(x.quantizer.dtype).astype(np.int64) - x.quantizer.scalar_zero_point()
    table = quant.requantize_fixed_point(codes, m0, shift, out_q.scalar_zero_point(), out_q.qmin, out_q.qmax,
                                         dtype=out_q.dtype)
    emit_table(model, x, table, out, name)


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


def _weight_multiplier(x: QInput, w: QInput, out_q: Quantizer) -> np.ndarray:
    return quant.requant_multiplier(x.quantizer.scale, w.quantizer.scale, out_q.scale)


def lower_conv(model: QModel, site: Site) -> None:
    node = site.node
    x, w = _uint8_activation(site, 0), qlinear.weight(site, 1)
    if site.float_output:
        return lower_to_float(model, site, x, w)
    (w_u8, wz), channels, channel_shape = convinteger_weight(w)
    bias = qlinear.int32_bias(site, 2, x, w, channels)
    name = node.name

    bound = quant.accumulator_bound(w_u8, wz, x.quantizer.zero_point, x.quantizer.dtype)
    spatial = _static_dims(node.inputs[0], [2, 3]) if w_u8.ndim == 4 else None
    matrix = depthwise_as_matrix(w_u8, wz, dict(node.attrs), spatial) if spatial else None
    width = _static_dims(node.inputs[0], [3]) if w_u8.ndim == 4 and matrix is None else None
    height = _static_dims(node.inputs[0], [2]) if width else None
    band = depthwise_as_band(w_u8, wz, dict(node.attrs), width[0], height[0] if height else None) if width else None
    kernel_height = w_u8.shape[2] if w_u8.ndim == 4 else None
    w_u8, attrs = depthwise_as_grouped(w_u8, wz, dict(node.attrs))

    def build(out):
        xz = const(model, f"{name}_x_zero_point", np.asarray(x.quantizer.zero_point, np.uint8))
        wzc = const(model, f"{name}_w_zero_point", np.asarray(wz))
        if matrix is not None:
            acc = _emit_depthwise_matmul(model, x.tensor, matrix, xz, wzc, spatial, name)
        elif band is not None:
            acc = _emit_depthwise_band(model, x.tensor, band, xz, wzc, kernel_height, node.attrs, name)
        else:
            acc = var(model, f"{name}_acc", np.int32)
            model.add_node("ConvInteger", [x.tensor, const(model, f"{name}_w_u8", w_u8), xz, wzc], [acc], name, attrs)
        emit_requantize(model, acc, _weight_multiplier(x, w, site.out_q), site.out_q, out, f"{name}_requant",
                        channel_shape, bias=bias, acc_bound=bound, bounds=clamp_bounds(site))

    finish_site(model, site, build, clamped=True)


def depthwise_as_grouped(w_u8: np.ndarray, wz, attrs: dict) -> tuple[np.ndarray, dict]:
    """A depthwise ConvInteger (one input channel per group) as a grouped one with a few channels per
    group, its weights block-diagonal with the zero point off the diagonal (those terms are exactly
    0): ORT's ConvInteger runs an im2col and a GEMM per group, and one output row per GEMM is its
    slowest case. 8 channels per group for 3×3 kernels, 4 for 5×5 (ORT 1.19, 15²–120² maps, batch
    1 and 8: 1.3–3x faster than one per group); other convolutions are returned as they are."""
    channels, per_group = w_u8.shape[:2]
    if per_group != 1 or attrs.get("group", 1) != channels or channels < 2:
        return w_u8, attrs
    taps = int(np.prod(w_u8.shape[2:]))
    size = 8 if taps <= 9 else 4 if taps <= 25 else 2
    while channels % size:
        size //= 2
    if size < 2:
        return w_u8, attrs
    grouped = np.full((channels, size) + w_u8.shape[2:], np.asarray(wz).reshape(()), np.uint8)
    grouped[np.arange(channels), np.arange(channels) % size] = w_u8[:, 0]
    return grouped, {**attrs, "group": channels // size}


#: depthwise_as_matrix applies where a map has at most this many pixels per kernel tap (the dense
#: product's extra work) and its matrices take at most DEPTHWISE_MATRIX_MAX_BYTES; past
#: DEPTHWISE_MATRIX_CHEAP_PIXELS_PER_TAP only where the output has at most
#: DEPTHWISE_MATRIX_SMALL_OUTPUT pixels (whose grouped ConvInteger runs GEMMs too small to be fast).
#: At batch 1 the product is one matrix-vector product per channel, about 5 GMAC/s in ORT 1.19
#: against the grouped form's ~3 on the useful products, so the extra work costs there (one
#: thread, 5x5, time per batch at 1 / 8, matrix against grouped: 128x3x40 342 / 757 against
#: 132 / 1000 µs, 256x2x40 316 / 965 against 163 / 1359; 7x7 and smaller maps, or 128x14x14 at
#: stride 2, run faster as matrices at both batches or on average).
DEPTHWISE_MATRIX_MAX_PIXELS_PER_TAP = 8
DEPTHWISE_MATRIX_CHEAP_PIXELS_PER_TAP = 3
DEPTHWISE_MATRIX_SMALL_OUTPUT = 64
DEPTHWISE_MATRIX_MAX_BYTES = 2 << 20


def depthwise_as_matrix(w_u8: np.ndarray, wz, attrs: dict, spatial) -> tuple[np.ndarray, tuple[int, int]] | None:
    """A depthwise 2-D convolution of an ``H×W`` map as one matrix per channel: ``acc[n, c, o] =
    Σ_i (A_c[o, i] − w_zp) · (x[n, c, i] − x_zp)`` over the flattened map, ``A_c[o, i]`` the weight
    of the tap joining input pixel i to output pixel o and ``w_zp`` where none does (those terms are
    exactly 0, as ConvInteger's padding with x_zp is). Returns ``(A [C, Ho·Wo, H·W], (Ho, Wo))``, or
    None where it does not pay: ORT's grouped ConvInteger runs an im2col and a GEMM per image and
    group, slowest on small maps and batches (ORT 1.19, one thread, batch 8, 128×14×14, 5×5: 2.4 ms
    against 0.4 for the matrices), while the dense product does H·W/taps times the work."""
    channels, per_group = w_u8.shape[:2]
    if per_group != 1 or attrs.get("group", 1) != channels or channels < 2 \
            or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    (h, w), (kh, kw) = spatial, w_u8.shape[2:]
    if h * w > DEPTHWISE_MATRIX_MAX_PIXELS_PER_TAP * kh * kw:
        return None
    sh, sw = attrs.get("strides", [1, 1])
    dh, dw = attrs.get("dilations", [1, 1])
    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
    ho, wo = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1, (w + left + right - dw * (kw - 1) - 1) // sw + 1
    if ho < 1 or wo < 1 or channels * h * w * ho * wo > DEPTHWISE_MATRIX_MAX_BYTES:
        return None
    if h * w > DEPTHWISE_MATRIX_CHEAP_PIXELS_PER_TAP * kh * kw and ho * wo > DEPTHWISE_MATRIX_SMALL_OUTPUT:
        return None
    oy, ox, ty, tx = np.meshgrid(np.arange(ho), np.arange(wo), np.arange(kh), np.arange(kw), indexing="ij")
    iy, ix = oy * sh - top + ty * dh, ox * sw - left + tx * dw
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    matrix = np.full((channels, ho * wo, h * w), np.asarray(wz).reshape(()), np.uint8)
    matrix[:, (oy * wo + ox)[inside], (iy * w + ix)[inside]] = w_u8[:, 0, ty[inside], tx[inside]]
    return matrix, (ho, wo)


def _emit_depthwise_matmul(model, x, matrix, xz, wz, spatial, name) -> gs.Tensor:
    """depthwise_as_matrix's product, the batch as the GEMM's columns (one matrix per channel, not
    one per image and channel): x as [C, H·W, N], MatMulInteger [C, Ho·Wo, N], back to
    [N, C, Ho, Wo]."""
    (a, (ho, wo)), channels = matrix, matrix[0].shape[0]

    def step(op, inputs, label, dtype, **attrs):
        out = var(model, f"{name}_{label}", dtype)
        model.add_node(op, inputs, [out], f"{name}_{label}" if op != "MatMulInteger" else name, attrs)
        return out

    def shape(label, dims):
        return const(model, f"{name}_{label}", np.array(dims, np.int64))
    rows = step("Reshape", [x, shape("flat_shape", [0, channels, spatial[0] * spatial[1]])], "flat", np.uint8)
    columns = step("Transpose", [rows], "columns", np.uint8, perm=[1, 2, 0])
    acc = step("MatMulInteger", [const(model, f"{name}_matrix", a), columns, wz, xz], "acc_columns", np.int32)
    images = step("Transpose", [acc], "acc_images", np.int32, perm=[2, 0, 1])
    return step("Reshape", [images, shape("acc_shape", [0, channels, ho, wo])], "acc", np.int32)


#: depthwise_as_band applies to maps at most this many pixels wide per kernel column, and where
#: the height is static, with at least DEPTHWISE_BAND_MIN_ROWS output rows: each row window is a
#: GEMM of that many rows per image and channel, and a few rows run slower than the grouped
#: ConvInteger (one thread, batch 1 / 8: 128x3x40 5x5 213 / 1612 µs against 132 / 1000, 64x6x40
#: 3x3 119 / 845 against 88 / 626; 256x7x7 5x5 269 / 1518 against 497 / 2534).
DEPTHWISE_BAND_MAX_WIDTH_PER_TAP = 16
DEPTHWISE_BAND_MIN_ROWS = 7


def depthwise_as_band(w_u8: np.ndarray, wz, attrs: dict, width: int, height: int | None = None) -> np.ndarray | None:
    """A depthwise 2-D convolution (vertical stride 1) as one banded matrix per channel over a
    window of ``kh`` padded rows: ``acc[n, c, oy, o] = Σ_i (win[n, c, oy, i] − x_zp) · (B_c[i, o] −
    w_zp)``, ``win`` the rows ``oy + dy·dh`` (dy < kh) of the input padded with x_zp, side by side
    (``i = dy·Wp + column``), ``B_c[dy·Wp + column, o]`` the tap joining them to output column o and
    w_zp elsewhere (exactly 0). Needs only the width static. Returns ``B [C, kh·Wp, Wo]``, or None
    where it does not pay (a width past DEPTHWISE_BAND_MAX_WIDTH_PER_TAP·kw: the product does
    Wp/kw times the work; ORT 1.19, one thread, 128×20×20, 5×5: grouped ConvInteger 0.43 ms, this
    0.12; batch 8: 6.1 against 1.3)."""
    channels, per_group = w_u8.shape[:2]
    if per_group != 1 or attrs.get("group", 1) != channels or channels < 2 \
            or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or attrs.get("strides", [1, 1])[0] != 1:
        return None
    kh, kw = w_u8.shape[2:]
    if width > DEPTHWISE_BAND_MAX_WIDTH_PER_TAP * kw:
        return None
    sw, dw = attrs.get("strides", [1, 1])[1], attrs.get("dilations", [1, 1])[1]
    pads = attrs.get("pads", [0, 0, 0, 0])
    padded = width + pads[1] + pads[3]
    wo = (padded - dw * (kw - 1) - 1) // sw + 1
    if wo < 1:
        return None
    if height is not None:
        dh = attrs.get("dilations", [1, 1])[0]
        if height + pads[0] + pads[2] - dh * (kh - 1) < DEPTHWISE_BAND_MIN_ROWS:
            return None
    dy, ox, tx = np.meshgrid(np.arange(kh), np.arange(wo), np.arange(kw), indexing="ij")
    band = np.full((channels, kh * padded, wo), np.asarray(wz).reshape(()), np.uint8)
    band[:, (dy * padded + ox * sw + tx * dw).ravel(), ox.ravel()] = w_u8[:, 0, dy.ravel(), tx.ravel()]
    return band


def _emit_depthwise_band(model, x, band, xz, wz, kernel_height: int, attrs, name) -> gs.Tensor:
    """depthwise_as_band's product: Pad with x_zp, the row windows (Slice; the ends count from the
    bottom, so the height may be dynamic) side by side (Concat), one MatMulInteger per image and
    channel against B (batch dimensions broadcast)."""
    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
    dh = attrs.get("dilations", [1, 1])[0]

    def c64(label, values):
        return const(model, f"{name}_{label}", np.array(values, np.int64))

    padded = var(model, f"{name}_padded", np.uint8)
    model.add_node("Pad", [x, c64("pads", [0, 0, top, left, 0, 0, bottom, right]), xz], [padded], f"{name}_pad")
    rows = []
    for dy in range(kernel_height):
        from_bottom = dh * (kernel_height - 1 - dy)
        row = var(model, f"{name}_rows{dy}", np.uint8)
        model.add_node("Slice", [padded, c64(f"rows{dy}_start", [dy * dh]),
                                 c64(f"rows{dy}_end", [-from_bottom if from_bottom else np.iinfo(np.int64).max]),
                                 c64("rows_axis", [2])], [row], f"{name}_rows{dy}")
        rows.append(row)
    windows = var(model, f"{name}_windows", np.uint8)
    model.add_node("Concat", rows, [windows], f"{name}_windows", {"axis": 3})
    acc = var(model, f"{name}_acc", np.int32)
    model.add_node("MatMulInteger", [windows, const(model, f"{name}_band", band), xz, wz], [acc], name)
    return acc


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
        depth = _static_dims(node.inputs[0], [len(node.inputs[0].shape or ()) - 1])
        bound = None if depth is None else depth[0] * _code_reach(x) * _code_reach(w)

        def build_act(out):
            acc = var(model, f"{name}_acc", np.int32)
            model.add_node("MatMulInteger", [x.tensor, w.tensor,
                                             const(model, f"{name}_a_zp", x.quantizer.zero_point),
                                             const(model, f"{name}_b_zp", w.quantizer.zero_point)], [acc], name)
            emit_requantize(model, acc, ratio, site.out_q, out, f"{name}_requant", acc_bound=bound,
                            bounds=clamp_bounds(site))

        finish_site(model, site, build_act, clamped=True)
        return
    w_km = np.ascontiguousarray(qlinear.gemm_weight_mk(node, w.const).T)
    channels = w_km.shape[1]
    bias = qlinear.int32_bias(site, 2, x, w, channels) if node.op == "Gemm" else None
    wz = w.quantizer.zero_point
    wz = np.broadcast_to(wz, (channels,)).copy() if wz.ndim else wz

    bound = quant.accumulator_bound(w_km, wz, x.quantizer.zero_point, x.quantizer.dtype, axis=1)

    def build(out):
        acc = var(model, f"{name}_acc", np.int32)
        model.add_node("MatMulInteger", [x.tensor, const(model, f"{name}_w_km", w_km),
                                         const(model, f"{name}_x_zero_point", x.quantizer.zero_point),
                                         const(model, f"{name}_w_zero_point", wz)], [acc], name)
        emit_requantize(model, acc, _weight_multiplier(x, w, site.out_q), site.out_q, out, f"{name}_requant",
                        (channels,), bias=bias, acc_bound=bound, bounds=clamp_bounds(site))

    finish_site(model, site, build, clamped=True)


def lower_add(model: QModel, site: Site) -> None:
    """``y = round_half_up((Ka·(a − za) + Kb·(b − zb)) / 2^n) + zp`` with Ka, Kb on one shift
    (quant.shared_shift_multipliers): a table of every pair of uint8 codes, else the codes scaled in
    int64, the zero points folded into the requantization's offset."""
    a, b = _uint8_activation(site, 0), qlinear.activation(site, 1)
    k, n = shared_shift_multipliers([quant.requant_multiplier(a.quantizer.scale, 1.0, site.out_q.scale),
                                     quant.requant_multiplier(b.quantizer.scale, 1.0, site.out_q.scale)])
    if n < 1 or n > 62:
        raise Declined(f"Add scales too far apart for a 64-bit fixed-point sum (shift {n})")
    name = site.node.name
    centering = -int(k[0]) * a.quantizer.scalar_zero_point() - int(k[1]) * b.quantizer.scalar_zero_point()
    bound = sum(int(kx) * max(abs(x.quantizer.qmin), abs(x.quantizer.qmax)) for x, kx in ((a, k[0]), (b, k[1])))

    if b.quantizer.dtype == np.uint8:
        codes = quant.all_codes(np.uint8).astype(np.int64)
        total = int(k[0]) * codes[:, None] + int(k[1]) * codes[None, :] + centering
        return _lower_as_pair_table(model, site, a, b, total, np.int32(1), np.int32(n - 31))

    def build(out):
        terms = []
        for i, (x, kx) in enumerate(((a, k[0]), (b, k[1]))):
            wide = var(model, f"{name}_in{i}_wide", np.int64)
            model.add_node("Cast", [x.tensor], [wide], f"{name}_in{i}_wide", {"to": TensorProto.INT64})
            scaled = var(model, f"{name}_in{i}_scaled", np.int64)
            model.add_node("Mul", [wide, const(model, f"{name}_k{i}", np.array(kx, np.int64))], [scaled],
                           f"{name}_scale{i}")
            terms.append(scaled)
        total = var(model, f"{name}_sum", np.int64)
        model.add_node("Add", terms, [total], name)
        emit_requantize(model, total, None, site.out_q, out, f"{name}_requant", bias=np.int64(centering),
                        acc_bound=bound, bounds=clamp_bounds(site), fixed_point=(np.int32(1), np.int32(n - 31)))

    finish_site(model, site, build, clamped=True)


def lower_mul(model: QModel, site: Site) -> None:
    a, b = _uint8_activation(site, 0), qlinear.activation(site, 1)
    ratio = quant.requant_multiplier(a.quantizer.scale, b.quantizer.scale, site.out_q.scale)
    name = site.node.name
    if b.quantizer.dtype == np.uint8:
        codes = quant.all_codes(np.uint8).astype(np.int64)
        prod = (codes[:, None] - a.quantizer.scalar_zero_point()) * (codes[None, :] - b.quantizer.scalar_zero_point())
        return _lower_as_pair_table(model, site, a, b, prod, *quant.quantize_multiplier(ratio))

    def build(out):
        prod = var(model, f"{name}_acc", np.int32)
        model.add_node("Mul", [emit_centered(model, a, f"{name}_a"), emit_centered(model, b, f"{name}_b")],
                       [prod], name)
        emit_requantize(model, prod, ratio, site.out_q, out, f"{name}_requant",
                        acc_bound=_code_reach(a) * _code_reach(b), bounds=clamp_bounds(site))

    finish_site(model, site, build, clamped=True)


def _lower_as_pair_table(model: QModel, site: Site, a: QInput, b: QInput, acc: np.ndarray, m0, shift) -> None:
    """The site as one lookup of its two uint8 codes (tables.emit_pair_table): the requantization
    rule on every accumulator of the 256×256 `acc`, clipped to the folded activation — what
    emit_requantize's steps compute for them."""
    q = site.out_q
    qlo, qhi = clamp_bounds(site) or (q.qmin, q.qmax)
    y = quant.requantize_fixed_point(acc, m0, shift, q.scalar_zero_point(), q.qmin, q.qmax, dtype=np.int64)
    table = np.clip(y, qlo, qhi).astype(q.dtype)
    finish_site(model, site, lambda out: emit_pair_table(model, a, b, table, out, f"{site.node.name}_table"),
                clamped=True)


def _code_reach(x: QInput) -> int:
    """The largest ``|q − zp|`` of `x`'s codes."""
    zp = x.quantizer.scalar_zero_point()
    return max(zp - x.quantizer.qmin, x.quantizer.qmax - zp)


def _static_dims(tensor: gs.Tensor, axes) -> list[int] | None:
    shape = tensor.shape
    if shape is None:
        return None
    dims = [shape[a] if a < len(shape) else None for a in axes]
    return dims if all(isinstance(d, (int, np.integer)) and d > 0 for d in dims) else None


def lower_global_average_pool(model: QModel, site: Site) -> None:
    """An int32 ReduceSum of the codes, requantized with the count of the spatial size: a constant
    multiplier when the size is static, else the count from the run-time shape
    (quant.mean_requant, exact up to quant.MEAN_MAX_COUNT elements per channel)."""
    x = _uint8_activation(site, 0)
    rank = len(site.node.inputs[0].shape or ())
    if rank < 3:
        raise Declined("GlobalAveragePool needs a known rank of at least 3")
    spatial = _static_dims(site.node.inputs[0], range(2, rank))
    name = site.node.name
    zx = x.quantizer.scalar_zero_point()

    def total_of():
        wide = var(model, f"{name}_wide", np.int32)
        model.add_node("Cast", [x.tensor], [wide], f"{name}_cast", {"to": TensorProto.INT32})
        total = var(model, f"{name}_sum", np.int32)
        model.add_node("ReduceSum", [wide, const(model, f"{name}_axes", np.arange(2, rank, dtype=np.int64))],
                       [total], name, {"keepdims": 1})
        return total

    if spatial is None:
        return _lower_mean_of_runtime_count(model, site, x, rank, total_of)
    count = int(np.prod(spatial))
    ratio = quant.requant_multiplier(x.quantizer.scale, 1.0, site.out_q.scale, divisor=count)

    def build(out):
        emit_requantize(model, total_of(), ratio, site.out_q, out, f"{name}_requant",
                        bias=np.int64(-count * zx),
                        acc_bound=count * max(abs(x.quantizer.qmin), abs(x.quantizer.qmax)), bounds=clamp_bounds(site))

    finish_site(model, site, build, clamped=True)


def _lower_mean_of_runtime_count(model: QModel, site: Site, x: QInput, rank: int, total_of) -> None:
    """``y = clip(floor((T·M + count·C) / (count·2^n)) − k + zp_y)`` in int64 with ``count`` the
    product of the run-time spatial dimensions (Shape → Slice → ReduceProd): quant.MeanRequant."""
    name = site.node.name
    rule = quant.mean_requant(quant.requant_multiplier(x.quantizer.scale, 1.0, site.out_q.scale),
                              x.quantizer.scalar_zero_point(), x.quantizer.qmax)
    qlo, qhi = clamp_bounds(site) or (site.out_q.qmin, site.out_q.qmax)

    def step(op, inputs, label, dtype=np.int64, attrs=None):
        out = var(model, f"{name}_{label}", dtype)
        model.add_node(op, inputs, [out], f"{name}_{label}", attrs or {})
        return out

    def c64(label, value):
        return const(model, f"{name}_{label}", np.array(value, np.int64))

    def build(out):
        shape = step("Shape", [x.tensor], "shape")
        dims = step("Slice", [shape, c64("first_spatial", [2]), c64("end_spatial", [rank])], "spatial")
        count = step("ReduceProd", [dims], "count", attrs={"keepdims": 0})
        total = step("Cast", [total_of()], "sum_wide", attrs={"to": TensorProto.INT64})
        scaled = step("Mul", [total, c64("m", rule.multiplier)], "scaled")
        offset = step("Mul", [count, c64("c", rule.offset)], "offset")
        numerator = step("Add", [scaled, offset], "numerator")
        denominator = step("Mul", [count, c64("two_n", 1 << rule.shift)], "denominator")
        floor = step("Div", [numerator, denominator], "floor")
        shifted = step("Add", [floor, c64("zp_minus_k", site.out_q.scalar_zero_point() - rule.base)], "shifted")
        clipped = step("Clip", [shifted, c64("qlo", qlo), c64("qhi", qhi)], "clipped")
        model.add_node("Cast", [clipped], [out], f"{name}_narrow",
                       {"to": _ONNX_TYPES[np.dtype(site.out_q.dtype).name]})

    finish_site(model, site, build, clamped=True)


def lower_average_pool(model: QModel, site: Site) -> None:
    """A depthwise ConvInteger of ones (padding reads the zero point: a padded tap adds 0, as the
    float pool's 0.0 does), requantized with the multiplier ``s_x / (count·s_y)``. ``count`` is
    the kernel size, or, for a padded pool with count_include_pad=0 or a ceil-mode pool's last
    windows, the taps inside the image at each output position (:func:`_pool_counts`): one
    int32 division form per distinct count, laid out over the output positions."""
    x = _uint8_activation(site, 0)
    attrs = site.node.attrs
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise Declined(f"AveragePool with auto_pad={attrs['auto_pad']} is not lowered; export explicit pads")
    channels = _static_dims(site.node.inputs[0], [1])
    if channels is None:
        raise Declined("dynamic shape: AveragePool needs a static channel count")
    kernel = list(attrs["kernel_shape"])
    if any(d != 1 for d in attrs.get("dilations", [1] * len(kernel))):
        raise Declined("dilated AveragePool is not lowered")
    strides = list(attrs.get("strides", [1] * len(kernel)))
    pads = list(attrs.get("pads", [0] * 2 * len(kernel)))
    counts, end_pads = _pool_counts(site, kernel, strides, pads)
    name = site.node.name
    conv_attrs = {"group": channels[0], "kernel_shape": kernel, "strides": strides,
                  "pads": pads[:len(kernel)] + end_pads}
    bounds = clamp_bounds(site)
    by_position = None if np.unique(counts).size == 1 else _division_by_count(counts, x, site.out_q, bounds)

    def build(out):
        acc = var(model, f"{name}_acc", np.int32)
        ones = np.ones([channels[0], 1] + kernel, np.uint8)
        model.add_node("ConvInteger", [x.tensor, const(model, f"{name}_ones", ones),
                                       const(model, f"{name}_x_zero_point", x.quantizer.zero_point),
                                       const(model, f"{name}_w_zero_point", np.uint8(0))], [acc], name, conv_attrs)
        if by_position is not None:
            return _emit_division(model, acc, by_position, site.out_q, out, f"{name}_requant", counts.shape)
        count = int(counts.reshape(-1)[0])
        ratio = quant.requant_multiplier(x.quantizer.scale, 1.0, site.out_q.scale, divisor=count)
        emit_requantize(model, acc, ratio, site.out_q, out, f"{name}_requant", acc_bound=count * _code_reach(x),
                        bounds=bounds)

    finish_site(model, site, build, clamped=True)


def _pool_counts(site: Site, kernel, strides, pads) -> tuple[np.ndarray, list[int]]:
    """(the divisor at each output position, the end pads ConvInteger needs): taps inside the
    image (count_include_pad=0), else the kernel size; a ceil-mode pool's last window, which
    overhangs the padded input, gets that overhang as extra end padding (zero-point taps)."""
    nd = len(kernel)
    rank = nd + 2
    x_dims = _static_dims(site.node.inputs[0], range(2, rank))
    y_dims = _static_dims(site.node.outputs[0], range(2, rank))
    plain = not any(pads) and not site.node.attrs.get("ceil_mode", 0)
    if plain:
        return np.array(int(np.prod(kernel))), [0] * nd
    if x_dims is None or y_dims is None:
        raise Declined("padded or ceil-mode AveragePool needs static spatial dims (its divisor varies "
                       "per position); fix the input size before lowering")
    per_axis, end_pads = [], []
    for size, out, k, s, begin, end in zip(x_dims, y_dims, kernel, strides, pads[:nd], pads[nd:]):
        start = np.arange(out) * s - begin
        end_pads.append(end + max(0, (out - 1) * s + k - (size + begin + end)))
        inside = np.clip(start + k, 0, size) - np.clip(start, 0, size)
        per_axis.append(inside)
    if site.node.attrs.get("count_include_pad", 0):
        return np.full(y_dims, int(np.prod(kernel))), end_pads
    counts = per_axis[0]
    for inside in per_axis[1:]:
        counts = np.multiply.outer(counts, inside)
    if counts.min() < 1:
        raise Declined("an AveragePool window lies wholly in the padding (no element to average)")
    return counts, end_pads


def _division_by_count(counts: np.ndarray, x: QInput, out_q: Quantizer, bounds) -> quant.DivisionSteps:
    """The int32 division form (quant.DivisionSteps) of a requantization whose divisor differs per
    output position: each distinct count's (p, r, q), laid out over the positions (constants of
    the output's spatial shape, broadcast over batch and channels)."""
    distinct, index = np.unique(counts, return_inverse=True)
    ratios = np.array([quant.requant_multiplier(x.quantizer.scale, 1.0, out_q.scale, divisor=int(c))[()]
                       for c in distinct])
    m0, shift = quant.quantize_multiplier(ratios)
    qlo, qhi = bounds if bounds is not None else (out_q.qmin, out_q.qmax)
    steps = quant.division_steps(m0, shift, out_q.scalar_zero_point(), qlo, qhi, out_q.dtype,
                                 acc_bound=[int(c) * _code_reach(x) for c in distinct])
    if steps is None:
        raise Declined("no int32 division form for this AveragePool's divisors")
    at = index.reshape(-1)
    return dataclasses.replace(steps, multiplier=steps.multiplier[at], offset=steps.offset[at],
                               divisor=steps.divisor[at])


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


def lower_pad(model: QModel, site: Site) -> None:
    qlinear.lower_pad(model, site, requantize=requantize_integer)


def lower_prelu(model: QModel, site: Site) -> None:
    """A PRelu with one slope per channel as a table per channel, ``Q_y(PRelu_c(DQ_x(q)))`` in
    float32 as the QDQ model computes it (tables.emit_channel_tables)."""
    x = qlinear.activation(site, 0)
    slopes = qlinear.prelu_slopes(site, x)
    codes = quant.all_codes(x.quantizer.dtype)
    values = x.quantizer.dequantize(codes).astype(np.float32)[None, :]
    activated = np.where(values < 0, values * slopes[:, None], values).astype(np.float32)
    tables = site.out_q.quantize(activated).astype(site.out_q.dtype)
    finish_site(model, site, lambda out: emit_channel_tables(model, x, tables, out, site.node.name))


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
    "Pad": lower_pad,
    "PRelu": lower_prelu,
    **{op: lower_moving for op in qlinear.MOVING_OPS},
    **{op: qlinear.lower_unary_table for op in qlinear.UNARY_TABLE_OPS},
}


# -- after the rules -----------------------------------------------------------------------------

def separable_max_pools(model: QModel) -> int:
    """Each 2-D MaxPool on 8-bit codes as a pool over rows, then one over columns: the maximum over
    a window is the maximum over its columns of the maximum over its rows, and ONNX's pads take no
    part in a maximum either way, so every code is unchanged. ORT 1.19 runs 8-bit MaxPool with its
    generic loop (about 1 ns per compare; MLAS's vectorized pool is float-only): k + k compares
    per output instead of k·k (YOLOX's SPP, 5x5, 9x9 and 13x13 on 192x13x13 uint8, one thread:
    8.7 ms -> 3.9 ms). Only stride-1 pools of at least 5x5: a strided pool's first pass computes s
    times the outputs (k·s + k compares against k·k), and ORT's k×1 pools compare slower than its
    k×k ones (measured, one thread: 3x3 stride 2 on 64x111x111 4.2 -> 7.2 ms split, SqueezeNet's
    pools; 5x5 stride 2 no gain; 3x3 stride 1 within ±15%). Plain pools only: dilations 1,
    ceil_mode 0, no auto_pad, one output. Returns the pools split."""
    split = 0
    for pool in [n for n in model.graph.nodes if n.op == "MaxPool"]:
        attrs = pool.attrs
        kernel = list(attrs.get("kernel_shape", []))
        x = pool.inputs[0]
        if (len(kernel) != 2 or min(kernel) < 5 or any(s != 1 for s in attrs.get("strides", [1, 1]))
                or len(pool.outputs) != 1 or x.dtype not in (np.uint8, np.int8)
                or attrs.get("ceil_mode", 0) or any(d != 1 for d in attrs.get("dilations", [1, 1]))
                or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET")
                or attrs.get("storage_order", 0)):
            continue
        top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
        rows = var(model, f"{pool.name}_rows", x.dtype)
        model.add_node("MaxPool", [x], [rows], f"{pool.name}_rows",
                       {"kernel_shape": [kernel[0], 1], "pads": [top, 0, bottom, 0], "strides": [1, 1]})
        pool.inputs[0] = rows
        pool.attrs = {"kernel_shape": [1, kernel[1]], "pads": [0, left, 0, right], "strides": [1, 1]}
        split += 1
    return split


def skip_narrowing_casts(model: QModel) -> int:
    """Tables read int32 indices: where a requantization's int32 result (a Clip within the code
    range) is cast to uint8 only for a table to cast it back (``Clip → Cast(uint8) → [Flatten] →
    Cast(int32) → GatherElements``, and the ``256·a + b`` index of a pair table), the table reads
    the int32 result itself — the same values, two passes fewer. Returns the casts bypassed."""
    bypassed = 0
    for narrow in list(model.graph.nodes):
        if narrow.op != "Cast" or not narrow.outputs or narrow.attrs.get("to") not in (TensorProto.UINT8,
                                                                                       TensorProto.INT8):
            continue
        wide, codes = narrow.inputs[0], narrow.outputs[0]
        if wide.dtype != np.int32 or not _clipped_within(model, wide, narrow.attrs["to"]) \
                or model.is_graph_output(codes):
            continue
        for reader in list(codes.outputs):
            if reader.op == "Shape":
                reader.inputs[0] = wide
            elif reader.op == "Cast" and reader.attrs.get("to") == TensorProto.INT32:
                bypassed += _replace_uses(model, reader.outputs[0], wide)
            elif reader.op == "Flatten" and all(c.op == "Cast" and c.attrs.get("to") == TensorProto.INT32
                                                for c in reader.outputs[0].outputs):
                reader.inputs[0] = wide
                reader.outputs[0].dtype = np.int32
                for cast in list(reader.outputs[0].outputs):
                    bypassed += _replace_uses(model, cast.outputs[0], reader.outputs[0])
    if bypassed:
        model.cleanup()
    return bypassed


def _clipped_within(model: QModel, tensor: gs.Tensor, to: int) -> bool:
    """`tensor` is a Clip's output with constant bounds inside the storage range of type `to`."""
    clip = model.producer(tensor)
    if clip is None or clip.op != "Clip" or len(clip.inputs) < 3:
        return False
    lo, hi = (model.constant_value(t) for t in clip.inputs[1:3])
    qmin, qmax = quant.storage_range(np.uint8 if to == TensorProto.UINT8 else np.int8)
    return lo is not None and hi is not None and qmin <= int(lo) and int(hi) <= qmax


def _replace_uses(model: QModel, old: gs.Tensor, new: gs.Tensor) -> int:
    if model.is_graph_output(old):
        return 0
    for node in list(old.outputs):
        for i, t in enumerate(node.inputs):
            if t is old:
                node.inputs[i] = new
    return 1


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
