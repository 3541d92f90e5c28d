"""com.microsoft's dynamic-quantization matmuls (what onnxruntime.quantization.quantize_dynamic and
ORT's graph fusions produce): DynamicQuantizeMatMul and MatMulIntegerToFloat.

Both are ``float32(acc) · float32(a_scale · b_scale) (+ bias)`` on the exact int32 accumulator
``(A - a_zp)·(B - b_zp)`` — MLAS's QGEMM with its scale/bias output processor
(contrib_ops/cpu/quantization/dynamic_quantize_matmul.cc). DynamicQuantizeMatMul first quantizes
the float A to uint8 with DynamicQuantizeLinear's parameters over all of A.
"""

from __future__ import annotations

import numpy as np

from qgraph.interp.ops_quant import dynamic_quantize_linear, matmul_accumulate, memoized_matmul_weights
from qgraph.interp.registry import MS_DOMAIN, register


def _scaled(ctx, acc, a_scale, b_scale, bias):
    a_scale = np.asarray(a_scale, np.float32)
    if a_scale.size != 1:
        raise ctx.error("A's scale must be a scalar (per-tensor)")
    mult = np.float32(a_scale.reshape(())) * np.asarray(b_scale, np.float32).reshape(-1)
    y = acc.astype(np.float32) * (mult if mult.size > 1 else mult.reshape(()))
    if bias is not None:
        y += np.asarray(bias, np.float32)
    return y


def _b_zero_point(ctx, b_zp):
    if b_zp is None:
        return None
    z = np.asarray(b_zp)
    if z.size > 1 and z.ndim > 1:
        raise ctx.error("B's zero point must be a scalar or one per column")
    return z.reshape(-1) if z.size > 1 else z.reshape(())


@register("DynamicQuantizeMatMul", MS_DOMAIN)
def dynamic_quantize_matmul(ctx, a, b, b_scale, b_zp=None, bias=None):
    """``Y = float32(acc) · (a_scale · b_scale) + bias`` with A (float32) quantized to uint8 by
    DynamicQuantizeLinear's rule; B uint8/int8 with a per-tensor or per-column scale and zero
    point."""
    if a.dtype != np.float32:
        raise ctx.error(f"A type {a.dtype} is not supported (float32)")
    q, a_scale, a_zp = dynamic_quantize_linear(ctx, a)
    b_zp = _b_zero_point(ctx, b_zp)
    acc = matmul_accumulate(q, a_zp, b, b_zp, memoized_matmul_weights(ctx, q, b, b_zp, 1, 3))
    return _scaled(ctx, acc, a_scale, b_scale, bias)


@register("MatMulIntegerToFloat", MS_DOMAIN)
def matmul_integer_to_float(ctx, a, b, a_scale, b_scale, a_zp=None, b_zp=None, bias=None):
    """``Y = float32((A - a_zp)·(B - b_zp)) · (a_scale · b_scale) + bias``; A uint8/int8 per-tensor,
    B per-tensor or per-column."""
    if a_zp is not None and np.asarray(a_zp).size != 1:
        raise ctx.error("A's zero point must be a scalar (per-tensor)")
    b_zp = _b_zero_point(ctx, b_zp)
    acc = matmul_accumulate(a, None if a_zp is None else np.asarray(a_zp).reshape(()), b, b_zp,
                            memoized_matmul_weights(ctx, a, b, b_zp, 1, 5))
    return _scaled(ctx, acc, a_scale, b_scale, bias)
