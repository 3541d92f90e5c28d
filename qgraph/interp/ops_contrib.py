"""com.microsoft QLinear* kernels, modeled on ORT 1.19's x86-64 CPU implementation.

Where ORT's kernels differ from "dequantize, compute, requantize" the docstrings say how;
the rounding and saturation rules themselves come from qgraph.quant. ``_fma32`` emulates
a float32 fused multiply-add: the product of a small integer and a float32 is exact in
float64, so one float64 add and one rounding to float32 match the FMA except when the
addends' exponents differ by more than ~28 (not the case for quantization parameters).
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np

from qgraph import quant
from qgraph.interp.ops_nn import _pool_setup, _pooled
from qgraph.quant import storage_range as qlimits
from qgraph.interp.registry import MS_DOMAIN, register

F32 = np.float32


def _s(v, default=0):
    return default if v is None else np.asarray(v).reshape(-1)[0]


def _zp(v):
    return np.int32(_s(v, 0))


def _fma32(a, b, c):
    return (a.astype(np.float64) * np.float64(b) + np.asarray(c, dtype=np.float64)).astype(F32)


def _out_dtype(zp, like):
    return np.asarray(zp).dtype.type if zp is not None else like.dtype.type


# --------------------------------------------------------------------------- binary
def _scalar_side(a_shape, b_shape):
    """Which operand ORT's broadcaster treats as a per-span scalar: 'a', 'b' or None
    (both vary along the innermost non-trivial output axis)."""
    if int(np.prod(a_shape)) == 1:
        return "a"
    if int(np.prod(b_shape)) == 1:
        return "b"
    nd = max(len(a_shape), len(b_shape))
    a = (1,) * (nd - len(a_shape)) + tuple(a_shape)
    b = (1,) * (nd - len(b_shape)) + tuple(b_shape)
    for da, db in zip(reversed(a), reversed(b)):
        if max(da, db) == 1:
            continue
        if da == 1:
            return "a"
        if db == 1:
            return "b"
        return None
    return None


@register("QLinearAdd", MS_DOMAIN)
def qlinear_add(ctx, a, a_s, a_zp, b, b_s, b_zp, c_s, c_zp=None):
    """Spec: C = quantize(dequantize(A) + dequantize(B)). ORT (MlasQLinearAddKernelAvx2Helper):
    r_a = a_s/c_s, r_b = b_s/c_s, k = c_zp - (r_a·a_zp + r_b·b_zp) in float32, then
    C = saturate(round_half_even(fma(a, r_a, fma(b, r_b, k)))); a per-span scalar operand is
    folded into k first (k += a·r_a) before the single FMA of the other operand."""
    def params():
        ra = F32(F32(_s(a_s)) / F32(_s(c_s)))
        rb = F32(F32(_s(b_s)) / F32(_s(c_s)))
        za, zb, zc = _zp(a_zp), _zp(b_zp), _zp(c_zp)
        k = F32(F32(zc) - _fma32(np.asarray(F32(za)), ra, F32(rb * F32(zb))))
        dtype = _out_dtype(c_zp, a)
        return ra, rb, k, dtype, qlimits(dtype)

    ra, rb, k, dtype, (qmin, qmax) = ctx.once(("params", a.dtype.str), params, 1, 2, 4, 5, 6, 7)
    side = "same" if a.shape == b.shape else _scalar_side(a.shape, b.shape)
    if _pair_table_applies(ctx, a, b):
        table = ctx.once(("table", a.dtype.str, b.dtype.str, side), lambda: _pair_table(
            a.dtype, b.dtype, lambda ac, bc: _qlinear_add_values(ac, bc, ra, rb, k, side, dtype, qmin, qmax)),
            1, 2, 4, 5, 6, 7)
        return _pair_lookup(table, a, b)
    if side == "same":
        return _qlinear_add_same_shape(a, b, ra, rb, k, dtype, qmin, qmax)
    return _qlinear_add_values(a, b, ra, rb, k, side, dtype, qmin, qmax)


def _qlinear_add_values(a, b, ra, rb, k, side, dtype, qmin, qmax):
    """ORT's QLinearAdd arithmetic on codes ``a`` and ``b`` (broadcasting), for the operand
    ``side`` its broadcaster treats as a per-span scalar ('a', 'b', or None/'same' for neither)."""
    af, bf = a.astype(F32), b.astype(F32)
    shape = np.broadcast_shapes(a.shape, b.shape)
    if side == "a":
        kk = (k + af * ra).astype(F32)
        c = _fma32(np.broadcast_to(bf, shape), rb, kk)
    elif side == "b":
        kk = (k + bf * rb).astype(F32)
        c = _fma32(np.broadcast_to(af, shape), ra, kk)
    else:
        c = _fma32(af, ra, _fma32(bf, rb, k))
    return quant.saturate(quant.round_half_even(c), qmin, qmax, dtype)


def _pair_table_applies(ctx, a, b) -> bool:
    """Whether a binary QLinear op on 8-bit codes runs as a lookup in a table over all 256x256 code
    pairs: its scales and zero points are plan constants (the table is built once) and the
    output is large enough to repay the 65536 evaluations of building it."""
    return (a.dtype.itemsize == b.dtype.itemsize == 1 and all(ctx.is_const(i) for i in (1, 2, 4, 5, 6, 7))
            and max(a.size, b.size) >= 4096)


def _pair_table(a_dtype, b_dtype, values):
    """``values(a, b)`` (an elementwise function of the two codes) for every pair of 8-bit codes,
    flat, at index ``(a's bits << 8) | b's bits``."""
    bits = np.arange(256, dtype=np.uint8)
    table = values(bits.view(a_dtype).reshape(256, 1), bits.view(b_dtype).reshape(1, 256))
    return np.ascontiguousarray(table.reshape(-1))


def _pair_lookup(table, a, b):
    """``table[(a << 8) | b]`` over the broadcast shape of 8-bit code arrays ``a`` and ``b``: the
    binary op in three passes instead of a dozen float64 ones."""
    idx = np.empty(np.broadcast_shapes(a.shape, b.shape), np.uint16)
    np.left_shift(a.view(np.uint8), 8, out=idx, dtype=np.uint16)
    np.bitwise_or(idx, b.view(np.uint8), out=idx, dtype=np.uint16)
    return np.take(table, idx)


#: Elements per block of :func:`_qlinear_add_same_shape` (its float64 scratch stays in L2).
_ADD_BLOCK = 1 << 16


def _qlinear_add_same_shape(a, b, ra, rb, k, dtype, qmin, qmax):
    """``_fma32(a, ra, _fma32(b, rb, k))`` then round and saturate, a block at a time in reused
    buffers: the 8-bit codes convert to float64 inside the multiplies (exact products, as in
    :func:`_fma32`), each sum is rounded once to float32."""
    n = a.size
    out = np.empty(a.shape, dtype)
    af, bf, of = a.reshape(-1), b.reshape(-1), out.reshape(-1)
    step = min(n, _ADD_BLOCK)
    t64, inner32, outer32 = np.empty(step), np.empty(step, F32), np.empty(step, F32)
    ra64, rb64, k64 = np.float64(ra), np.float64(rb), np.float64(k)
    for s0 in range(0, n, step):
        m = min(step, n - s0)
        t, i32, o32 = t64[:m], inner32[:m], outer32[:m]
        np.multiply(bf[s0:s0 + m], rb64, out=t)
        t += k64
        i32[...] = t
        np.multiply(af[s0:s0 + m], ra64, out=t)
        t += i32
        o32[...] = t
        of[s0:s0 + m] = quant.saturate(quant.round_half_even(o32), qmin, qmax, dtype)
    return out


@register("QLinearMul", MS_DOMAIN)
def qlinear_mul(ctx, a, a_s, a_zp, b, b_s, b_zp, c_s, c_zp=None):
    """Spec: C = quantize(dequantize(A) * dequantize(B)). ORT (qlmul.cpp, SSE2):
    r = (a_s * b_s) / c_s in float32, C = saturate(round_half_even(float32((a-a_zp)(b-b_zp)) * r + c_zp))."""
    r = F32(quant.ort_requant_multiplier(_s(a_s), _s(b_s), _s(c_s)))
    dtype = _out_dtype(c_zp, a)
    qmin, qmax = qlimits(dtype)

    def values(ac, bc):
        prod = (ac.astype(np.int32) - _zp(a_zp)) * (bc.astype(np.int32) - _zp(b_zp))
        c = (prod.astype(F32) * r + F32(_zp(c_zp))).astype(F32)
        return quant.saturate(quant.round_half_even(c), qmin, qmax, dtype)

    if _pair_table_applies(ctx, a, b):
        return _pair_lookup(ctx.once(("table", a.dtype.str, b.dtype.str),
                                     lambda: _pair_table(a.dtype, b.dtype, values), 1, 2, 4, 5, 6, 7), a, b)
    return values(a, b)


# --------------------------------------------------------------------------- pooling
def _global_avg(x, x_s, x_zp, y_s, y_zp, axes, image_size, dtype):
    scale = F32(F32(_s(x_s)) / F32(F32(_s(y_s)) * F32(image_size)))
    acc = x.sum(axis=axes, keepdims=True, dtype=np.int64) - np.int64(_zp(x_zp)) * image_size
    qmin, qmax = qlimits(dtype)
    return quant.requantize_float(acc.astype(np.int32), scale, _zp(y_zp), qmin, qmax, dtype=dtype)


@register("QLinearGlobalAveragePool", MS_DOMAIN)
def qlinear_global_average_pool(ctx, x, x_s, x_zp, y_s, y_zp=None):
    """ORT (qlgavgpool.cpp): acc = Σx - x_zp·n (int32), multiplier x_s / (y_s · n) in float32,
    then the MlasRequantizeOutput rule (float32 product, round half to even, + y_zp)."""
    if ctx.attr("channels_last", 0):
        axes = tuple(range(1, x.ndim - 1))
    else:
        axes = tuple(range(2, x.ndim))
    n = int(np.prod([x.shape[a] for a in axes]))
    return _global_avg(x, x_s, x_zp, y_s, y_zp, axes, n, _out_dtype(y_zp, x))


@register("QLinearAveragePool", MS_DOMAIN)
def qlinear_average_pool(ctx, x, x_s, x_zp, y_s, y_zp=None):
    """ORT (qlinear_pool.cc): dequantize to float32 (x_s · (x - x_zp)), sum each window in
    float32 in row-major tap order, divide by the count, then
    saturate(nearbyint(avg / y_s + y_zp)) — the zero point is added *before* rounding.
    A kernel covering the whole unpadded image falls back to QLinearGlobalAveragePool."""
    if ctx.attr("channels_last", 0):
        raise ctx.error("channels_last=1 is not supported")
    kernel, strides, dil, pads, extra, outs = _pool_setup(ctx, x)
    if any(d != 1 for d in dil):
        raise ctx.error("dilations are not supported")
    nd = len(kernel)
    dtype = _out_dtype(y_zp, x)
    if list(x.shape[2:]) == list(kernel) and not any(pads):
        return _global_avg(x, x_s, x_zp, y_s, y_zp, tuple(range(2, x.ndim)), int(np.prod(kernel)), dtype)
    xf = (F32(_s(x_s)) * (x.astype(np.int32) - _zp(x_zp)).astype(F32)).astype(F32)
    win = _pooled(xf, kernel, strides, dil, pads, extra, outs, F32(0))
    total = np.zeros(win.shape[:-nd], F32)
    for tap in itertools.product(*(range(k) for k in kernel)):
        total += win[(Ellipsis,) + tap]
    ones = np.ones(x.shape[2:], F32)
    if ctx.attr("count_include_pad", 0):
        ones = np.pad(ones, [(pads[i], pads[i + nd]) for i in range(nd)], constant_values=1.0)
        cnt = _pooled(ones[None, None], kernel, strides, dil, [0] * 2 * nd, extra, outs, F32(0))
    else:
        cnt = _pooled(ones[None, None], kernel, strides, dil, pads, extra, outs, F32(0))
    avg = (total / cnt.sum(axis=tuple(range(-nd, 0))).astype(F32)).astype(F32)
    v = (avg / F32(_s(y_s)) + F32(_zp(y_zp))).astype(F32)
    qmin, qmax = qlimits(dtype)
    return quant.saturate(quant.round_half_even(v), qmin, qmax, dtype)


# --------------------------------------------------------------------------- lookup tables
def _lookup(x, table, dtype):
    """Apply a 256-entry table indexed by the code's value (quant.all_codes order); 8-bit codes
    index it by their bits, int8 ones in the table rotated by 128 (code -128 has bits 0x80)."""
    qmin = qlimits(dtype)[0]
    if x.dtype.itemsize == 1 and table.size == 256:
        return np.take(table if qmin == 0 else np.roll(table, qmin), x.view(np.uint8))
    return table[x.astype(np.int32) - qmin]


def _requant_table(dtype, x_s, x_zp, y_s, y_zp, fn):
    """ORT QlinearBuildLookupTable: f32(x_s · (code - x_zp)) → fn → MlasQuantizeLinear."""
    codes = quant.all_codes(dtype)
    deq = (F32(_s(x_s)) * (codes.astype(np.int32) - _zp(x_zp)).astype(F32)).astype(F32)
    qmin, qmax = qlimits(dtype)
    return quant.quantize(fn(deq), F32(_s(y_s)), _zp(y_zp), qmin, qmax, dtype=dtype)


@register("QLinearConcat", MS_DOMAIN)
def qlinear_concat(ctx, y_s, y_zp, *triples):
    """ORT (qlinear_concat.cc): an input with the output's scale and zero point is copied,
    any other is mapped through a 256-entry dequantize→QuantizeLinear table."""
    dtype = np.asarray(y_zp).dtype.type
    parts = []
    for i in range(0, len(triples), 3):
        x, xs, xzp = triples[i:i + 3]
        if F32(_s(xs)) == F32(_s(y_s)) and _zp(xzp) == _zp(y_zp):
            parts.append(x)
        else:
            table = ctx.once(("table", i), lambda: _requant_table(dtype, xs, xzp, y_s, y_zp, lambda v: v),
                             0, 1, i + 3, i + 4)
            parts.append(_lookup(x, table, dtype))
    return np.concatenate(parts, axis=ctx.attr("axis"))


@register("QLinearLeakyRelu", MS_DOMAIN)
def qlinear_leaky_relu(ctx, x, x_s, x_zp, y_s, y_zp=None):
    """ORT: table of v >= 0 ? v : alpha·v (float32) over dequantized codes, then QuantizeLinear."""
    alpha = F32(ctx.attr("alpha", 0.01))
    dtype = x.dtype.type
    table = ctx.once(("table", x.dtype.str), lambda: _requant_table(
        dtype, x_s, x_zp, y_s, y_zp, lambda v: np.where(v >= 0, v, (alpha * v).astype(F32))), 1, 2, 3, 4)
    return _lookup(x, table, dtype)


# MlasLogisticConstants (logistic.cpp): an odd/even rational approximation on [-18, 18].
_LOGISTIC_ALPHA = [F32(v) for v in (4.37031012579801e-11, 1.15627324459942e-07, 6.08574864600143e-05,
                                     8.51377133304701e-03, 2.48287947061529e-01)]
_LOGISTIC_BETA = [F32(v) for v in (6.10247389755681e-13, 5.76102136993427e-09, 6.29106785017040e-06,
                                    1.70198817374094e-03, 1.16817656904453e-01, 9.93151921023180e-01)]


def _round_f32(fr: Fraction) -> np.float32:
    """Correctly rounded (half to even) float32 of an exact rational."""
    f = F32(float(fr))
    best = f
    for g in (np.nextafter(f, F32(-np.inf)), np.nextafter(f, F32(np.inf))):
        dg, db = abs(Fraction(float(g)) - fr), abs(Fraction(float(best)) - fr)
        if dg < db or (dg == db and (g.view(np.int32) & 1) == 0):
            best = g
    return best


def _fma_exact(a, b, c) -> np.float32:
    return _round_f32(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c)))


def mlas_logistic_fma3(v: np.ndarray) -> np.ndarray:
    """MlasComputeLogistic as ORT runs it on AVX2 (FMA3 kernel): clamp to [-18, 18],
    p = x·poly(x²) and q = poly(x²) by Horner with fused multiply-adds, p / q + 0.5, clamp [0, 1]."""
    out = np.empty(v.shape, F32)
    for i, x in enumerate(v.reshape(-1)):
        x = F32(min(F32(18), max(F32(-18), F32(x))))
        x2 = F32(x * x)
        p = _LOGISTIC_ALPHA[0]
        for a in _LOGISTIC_ALPHA[1:]:
            p = _fma_exact(p, x2, a)
        p = F32(p * x)
        q = _LOGISTIC_BETA[0]
        for b in _LOGISTIC_BETA[1:]:
            q = _fma_exact(q, x2, b)
        r = F32(F32(p / q) + F32(0.5))
        out.reshape(-1)[i] = min(F32(1), max(F32(0), r))
    return out


@register("QLinearSigmoid", MS_DOMAIN)
def qlinear_sigmoid(ctx, x, x_s, x_zp, y_s, y_zp=None):
    """ORT: table of MlasComputeLogistic over dequantized codes, then QuantizeLinear."""
    dtype = x.dtype.type
    table = ctx.once(("table", x.dtype.str), lambda: _requant_table(dtype, x_s, x_zp, y_s, y_zp, mlas_logistic_fma3),
                     1, 2, 3, 4)
    return _lookup(x, table, dtype)


def _softmax_exp_table(x_scale, reduce_len: int, signed: bool) -> np.ndarray:
    """ORT's QlinearBuildLookupTableUint32 (float table): ``exp((i − 255 + shift)·s_x)`` in
    double, stored as float32, with ``shift = max(0, ln(FLT_MAX / D) − 5) / s_x`` keeping the
    sum of D entries finite; signed inputs index it by ``uint8(i − 128)``."""
    s = float(np.float32(np.asarray(x_scale).reshape(-1)[0]))
    ratio = np.float32(np.finfo(np.float32).max) / np.float32(reduce_len)     # float / size_t: float
    shift = max(0.0, float(np.log(np.float64(ratio))) - 5.0) / s
    values = np.exp((np.arange(256, dtype=np.float64) - 255 + shift) * s).astype(np.float32)
    if not signed:
        return values
    table = np.empty(256, np.float32)
    table[(np.arange(256) - 128) % 256] = values
    return table


@register("QLinearSoftmax", MS_DOMAIN)
def qlinear_softmax(ctx, x, x_s, x_zp, y_s, y_zp=None):
    """ORT's QLinearSoftmax (contrib_ops/cpu/quantization/qlinear_softmax.cc): per row, the
    codes shifted so the row's maximum indexes the table's last entry, ``Σ`` of the table values
    in float32 in order, ``y = nearbyint(t·floor(1/s_y) / Σ) + zp_y`` (uint8: saturated at 255;
    int8: ORT's own wrap, 255 becoming -1). opset < 13 rows are everything from `axis` on, opset
    ≥ 13 rows lie along `axis`; an absent `axis` is -1 in ORT 1.19 for both (not the spec's 1 for
    opset < 13: measured). x_zero_point takes no part."""
    opset = ctx.attr("opset", None)
    if opset is None:
        raise ctx.error("the 'opset' attribute is required (as in ORT)")
    axis = ctx.attr("axis", -1) % x.ndim     # ORT 1.19: -1 when absent, whatever the opset (measured)
    signed = x.dtype == np.int8
    if opset < 13:
        rows = x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)
    else:
        rows = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
    length = rows.shape[1]
    table = ctx.once(("table", length, x.dtype.str), lambda: _softmax_exp_table(x_s, length, signed), 1)
    wide = rows.astype(np.int32)
    top = wide.max(axis=1, keepdims=True)
    index = (wide + (127 - top if signed else 255 - top)) % 256        # uint8 arithmetic, as ORT
    t = table[index]
    total = np.cumsum(t, axis=1, dtype=np.float32)[:, -1:]              # sequential float32 sum
    y_scale = np.floor(np.float32(1) / np.float32(np.asarray(y_s).reshape(-1)[0]))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q = np.rint((t * y_scale) / total).astype(np.int64) + int(_zp(y_zp))
    q = np.where(q > 255, 255, q)
    out = (q.astype(np.uint8).view(np.int8) if signed else q.astype(np.uint8)).reshape(rows.shape)
    if opset < 13:
        return out.reshape(x.shape)
    moved = list(x.shape)
    moved.append(moved.pop(axis))
    return np.moveaxis(out.reshape(moved), -1, axis)
