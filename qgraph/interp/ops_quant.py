"""Quantized kernels of the ONNX domain: QuantizeLinear, DequantizeLinear,
DynamicQuantizeLinear, ConvInteger, MatMulInteger, QLinearConv, QLinearMatMul.

All follow ORT 1.19's CPU kernels bit for bit (see qgraph.quant for the rounding rules): the
int32 accumulators are exact (float64 BLAS on zero-point-shifted operands), QLinear outputs use
ORT's float32 requantization (multiplier ``(x_scale * w_scale) / y_scale`` in float32).
"""

from __future__ import annotations

import numpy as np

from qgraph import quant
from qgraph.quant import storage_range as qlimits  # saturation range of a storage dtype
from qgraph.interp.ops_nn import conv_geometry, conv_program, conv_weights
from qgraph.interp.registry import MS_DOMAIN, register

_SUPPORTED_Q = (np.int8, np.uint8, np.int16, np.uint16)


def _scalar(v, default=0):
    return default if v is None else np.asarray(v).reshape(-1)[0]


def _axis_params(ctx, x, scale, zp):
    """Per-tensor or per-axis (opset >= 13) parameters; blocked quantization is refused."""
    if ctx.attr("block_size", 0):
        raise ctx.error("blocked quantization (block_size) is not supported")
    if np.asarray(scale).size == 1:
        return None
    return ctx.attr("axis", 1) % x.ndim


@register("QuantizeLinear", "", MS_DOMAIN)
def quantize_linear(ctx, x, scale, zp=None):
    """y = saturate(round_half_even(x / scale) + zp); ORT divides in float32 (MLAS)."""
    if zp is not None:
        dtype = zp.dtype.type
    else:
        to = ctx.attr("output_dtype", 0)
        dtype = np.uint8 if not to else np.dtype(__import__("onnx").helper.tensor_dtype_to_np_dtype(to)).type
    if dtype not in _SUPPORTED_Q:
        raise ctx.error(f"output type {np.dtype(dtype).name} is not supported (int8/uint8/int16/uint16)")
    if x.dtype != np.float32:
        raise ctx.error(f"input type {x.dtype} is not supported (float32 only)")
    axis = _axis_params(ctx, x, scale, zp)
    z = np.zeros(np.asarray(scale).shape, np.int32) if zp is None else zp
    qmin, qmax = qlimits(dtype)
    return quant.quantize(x, scale, z, qmin, qmax, axis=axis, dtype=dtype)


@register("DequantizeLinear", "", MS_DOMAIN)
def dequantize_linear(ctx, x, scale, zp=None):
    """y = float32(x - zp) * scale (per tensor or per axis); int32 input takes no zero point."""
    if x.dtype.type not in _SUPPORTED_Q + (np.int32,):
        raise ctx.error(f"input type {x.dtype} is not supported")
    if np.asarray(scale).dtype != np.float32:
        raise ctx.error(f"scale type {np.asarray(scale).dtype} is not supported (float32 only)")
    axis = _axis_params(ctx, x, scale, zp)
    z = np.zeros(np.asarray(scale).shape, np.int32) if zp is None else zp
    return quant.dequantize(x, scale, z, axis=axis)


@register("DynamicQuantizeLinear")
def dynamic_quantize_linear(ctx, x):
    """uint8 quantization over [min(x, 0), max(x, 0)]: scale = (max - min) / 255 in float32,
    zp = round_half_even(clamp(0 - min / scale, 0, 255)) (ORT GetQuantizationParameter)."""
    q, scale, zp = dynamic_quantize_rows(x.reshape(1, -1))
    return q.reshape(x.shape), scale.reshape(()), zp.reshape(())


def dynamic_quantize_rows(x):
    """DynamicQuantizeLinear of each row of a 2-D+ array on its own range (a recurrent step
    quantizes each direction's state so): (uint8 codes, float32 scales, uint8 zero points)."""
    flat = x.reshape(x.shape[0], -1)
    f0 = np.float32(0)
    if flat.shape[1]:
        lo = np.minimum(flat.min(axis=1), f0)
        hi = np.maximum(flat.max(axis=1), f0)
    else:
        lo = hi = np.zeros(flat.shape[0], np.float32)
    scale = np.where(hi == lo, np.float32(1), (hi - lo) / np.float32(255)).astype(np.float32)
    zpf = (f0 - lo / scale).astype(np.float32)
    zp = quant.round_half_even(np.clip(zpf, f0, np.float32(255))).astype(np.uint8)
    return quant.quantize(x, scale, zp, 0, 255, axis=0, dtype=np.uint8), scale, zp


# --------------------------------------------------------------------------- accumulators
#: float32 BLAS is exact while every partial sum stays below 2^24; float64 below 2^53.
_F32_EXACT = float(2 ** 24)


def _shifted(v, zp, dtype, axis=None):
    """v - zp in ``dtype`` (exact for 8/16-bit integers); zp per-tensor or along ``axis``."""
    f = v.astype(dtype)
    if zp is None:
        return f
    z = np.asarray(zp).astype(dtype)
    if z.size == 1:
        f -= z.reshape(())
        return f
    shape = [1] * v.ndim
    shape[axis] = z.size
    f -= z.reshape(shape)
    return f


def _gemm_dtype(x, x_zp, w, w_zp):
    """float32 if the largest possible |partial sum| of a conv output channel is below 2^24
    (then BLAS is exact in any summation order), else float64 (exact below 2^53). ``x_zp`` None
    bounds |x - x_zp| by the full width of x's type (a zero point not known in advance)."""
    if not w.size:
        return np.float32
    lo, hi = qlimits(x.dtype)
    if x_zp is None:
        xmax = hi - lo
    else:
        xz = np.asarray(x_zp).astype(np.int64).reshape(-1)
        xmax = int(np.max(np.maximum(np.abs(hi - xz), np.abs(lo - xz))))
    wz = np.asarray(0 if w_zp is None else w_zp).astype(np.int64).reshape(-1)
    wz = wz.reshape((-1,) + (1,) * (w.ndim - 1)) if wz.size > 1 else wz.reshape(())
    row_sums = np.abs(w.astype(np.int64) - wz).reshape(w.shape[0], -1).sum(axis=1)
    return np.float32 if float(row_sums.max()) * xmax < _F32_EXACT else np.float64


def conv_accumulate_program(ctx, x, x_zp, w, w_zp, epilogue=None, out_dtype=np.int32):
    """``run(x)``: the exact conv accumulator of (x - x_zp) * (w - w_zp) (padding counts as x_zp),
    (N, M, *out), for inputs of x's shape. BLAS yields it as float32/float64 exact integers, a
    chunk of images at a time; ``epilogue(acc, dt)`` (default: conversion to int32) turns each
    chunk into the ``out_dtype`` result. The shifted weight matrix and the accumulator type depend
    only on w, w_zp and x's dtype (and x_zp when it is a constant), so a compiled plan computes
    them once, also when x_zp comes from a DynamicQuantizeLinear."""
    strides, dilations, pads = conv_geometry(ctx, x.shape, w.shape)
    group = ctx.attr("group", 1)
    w_at, zp_at, wz_at = _conv_const_inputs(ctx)
    zp_known = x_zp is None or ctx.is_const(zp_at)

    def prepare():
        dt = _gemm_dtype(x, np.zeros((), np.int64) if x_zp is None else (x_zp if zp_known else None), w, w_zp)
        return dt, conv_weights(_shifted(w, w_zp, dt, axis=0), group, dt)

    dt, wmat = ctx.once(("conv", x.dtype.str, zp_known), prepare, w_at, wz_at)
    shift = None if x_zp is None else dt(np.asarray(x_zp).reshape(-1)[0])
    if epilogue is None:
        def chunk_epilogue(acc):
            return acc.astype(np.int32)
    else:
        def chunk_epilogue(acc):
            return epilogue(acc, dt)
    return conv_program(x.shape, wmat, w.shape, group, strides, dilations, pads, shift=shift, dtype=dt,
                        epilogue=chunk_epilogue, out_dtype=out_dtype)


def _conv_const_inputs(ctx):
    """Positions of (w, x_zp, w_zp) among the node's inputs."""
    return (3, 2, 5) if ctx.node.op_type == "QLinearConv" else (1, 2, 3)


def matmul_weights(a_dtype, b, b_zp) -> tuple[type, np.ndarray]:
    """(float type, B - b_zp in it), exact for any A of ``a_dtype`` and any zero point of A:
    float32 when no partial sum of a row of A with a column of B can reach 2^24 (BLAS is then
    exact in any order and moves half the bytes), else float64 (exact below 2^53)."""
    bz = None if b_zp is None else np.asarray(b_zp)
    if bz is not None and bz.size > 1:
        bz = bz.reshape(bz.shape if bz.ndim == b.ndim else (-1,))
    shifted = b.astype(np.int64) - (0 if bz is None else bz.astype(np.int64))
    lo, hi = qlimits(a_dtype)
    column_sums = np.abs(shifted).sum(axis=-2) if b.ndim >= 2 else np.abs(shifted)
    dt = np.float32 if float(column_sums.max(initial=0)) * (hi - lo) < _F32_EXACT else np.float64
    return dt, shifted.astype(dt)


def matmul_accumulate(a, a_zp, b, b_zp, weights=None):
    """Exact int32 matmul accumulator; b_zp may be per column (last axis of B). ``weights``:
    :func:`matmul_weights` of B, when a kernel memoized them."""
    dt, bf = weights if weights is not None else matmul_weights(a.dtype, b, b_zp)
    return np.matmul(_shifted(a, a_zp, dt), bf).astype(np.int32)


def memoized_matmul_weights(ctx, a, b, b_zp, b_at: int, bz_at: int):
    """:func:`matmul_weights`, computed once per plan when B and its zero point are constants."""
    return ctx.once(("matmul_weights", a.dtype.str), lambda: matmul_weights(a.dtype, b, b_zp), b_at, bz_at)


@register("ConvInteger")
def conv_integer(ctx, x, w, x_zp=None, w_zp=None):
    """int32 Y = conv(x - x_zp, w - w_zp); w_zp per tensor or per output channel. The program is
    memoized per input shape and x_zp value (a dynamic zero point takes one of 256 values)."""
    if x_zp is not None and np.asarray(x_zp).size != 1:
        raise ctx.error("x_zero_point must be a scalar (per-tensor), as in ORT")
    zp = None if x_zp is None else int(np.asarray(x_zp).reshape(()))
    return ctx.once(("program", x.shape, x.dtype.str, zp), lambda: conv_accumulate_program(ctx, x, x_zp, w, w_zp),
                    1, 3)(x)


@register("MatMulInteger")
def matmul_integer(ctx, a, b, a_zp=None, b_zp=None):
    """int32 Y = (A - a_zp) @ (B - b_zp); b_zp per tensor or per column."""
    return matmul_accumulate(a, a_zp, b, b_zp, memoized_matmul_weights(ctx, a, b, b_zp, 1, 3))


@register("QLinearConv", "", MS_DOMAIN)
def qlinear_conv(ctx, x, xs, xzp, w, ws, wzp, ys, yzp, b=None):
    """Spec: y = saturate(round((xs*ws/ys) * (conv(x - xzp, w - wzp) + b)) + yzp).
    ORT: multiplier (xs * ws) / ys in float32, then MlasRequantizeOutput (float32 product,
    clamp, round half to even, + yzp). Bias and requantization run per chunk of images, on the
    accumulator while it is in cache; everything but the input is decided once per input shape."""
    if ctx.attr("channels_last", 0):
        raise ctx.error("channels_last=1 is not supported")
    return ctx.once(("program", x.shape, x.dtype.str),
                    lambda: _qlinear_conv_program(ctx, x, xs, xzp, w, ws, wzp, ys, yzp, b), *range(1, 9))(x)


def _qlinear_conv_program(ctx, x, xs, xzp, w, ws, wzp, ys, yzp, b):
    bshape = (1, -1, 1) + (1,) * (x.ndim - 3)
    small_b = b is None or np.abs(b.astype(np.int64)).max(initial=0) < 2 ** 24
    bias32 = None if b is None else b.astype(np.float32).reshape(bshape)
    bias_i = None if b is None else b.astype(np.int32).reshape(bshape)
    mult = quant.ort_requant_multiplier(xs, ws, ys)
    mult = mult.reshape(bshape) if mult.size > 1 else mult.reshape(())
    dtype = np.asarray(yzp).dtype.type if yzp is not None else x.dtype.type
    zp = _scalar(yzp)
    qmin, qmax = qlimits(dtype)

    def requantize(acc, dt):
        if dt == np.float32 and small_b:
            # |acc| < 2^24 and |b| < 2^24: one float32 rounding of acc + b, exactly ORT's
            # int32 add followed by cvtdq2ps.
            if bias32 is not None:
                acc += bias32
        else:
            acc = acc.astype(np.int32)
            if bias_i is not None:
                acc += bias_i
        return quant.requantize_float(acc, mult, zp, qmin, qmax, dtype=dtype, overwrite=True)

    return conv_accumulate_program(ctx, x, xzp, w, wzp, epilogue=requantize, out_dtype=dtype)


@register("QLinearMatMul", "", MS_DOMAIN)
def qlinear_matmul(ctx, a, as_, azp, b, bs, bzp, ys, yzp):
    """Spec: y = saturate(round((as*bs/ys) * ((a - azp) @ (b - bzp))) + yzp). ORT: as
    QLinearConv (float32 multiplier per column of B, MlasRequantizeOutput)."""
    if np.asarray(as_).dtype != np.float32 or np.asarray(bs).dtype != np.float32:
        raise ctx.error("only float32 scales are supported")
    dt, bf = memoized_matmul_weights(ctx, a, b, bzp, 3, 5)
    acc = np.matmul(_shifted(a, azp, dt), bf)
    if dt != np.float32:
        acc = acc.astype(np.int32)  # a float32 accumulator is already the exact int32 value
    mult = quant.ort_requant_multiplier(as_, bs, ys)
    mult = mult.reshape(mult.shape if mult.ndim == b.ndim else (-1,)) if mult.size > 1 else mult.reshape(())
    dtype = np.asarray(yzp).dtype.type
    qmin, qmax = qlimits(dtype)
    return quant.requantize_float(acc, mult, _scalar(yzp), qmin, qmax, dtype=dtype, overwrite=True)
