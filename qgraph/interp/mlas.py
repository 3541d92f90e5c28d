"""ORT's float32 transcendental kernels (MLAS, x86-64 FMA3 code path), transcribed in NumPy so the
interpreter's Sigmoid, Tanh and Erf agree with ONNX Runtime bit for bit.

Why bother for float ops: in a dynamically quantized model (DynamicQuantizeLinear after a
SiLU, say) one ulp of difference in a Sigmoid moves the dynamic scale, which flips integer
values downstream; with these transcriptions those integer tensors match ORT exactly.

Each kernel is a rational (or polynomial) approximation evaluated in float32 with fused
multiply-adds (``vfmadd…ps``). :func:`fma` computes ``round32(a·b + c)``: the product of two
float32 is exact in float64 and the sum is rounded once to float64 and once to float32; that
double rounding can differ from a true FMA only when the float64 sum lands exactly on a float32
rounding midpoint, which the tests against ORT have not met.

Sources (microsoft/onnxruntime, onnxruntime/core/mlas/lib): logistic.cpp and
x86_64/LogisticKernelFma3.S, tanh.cpp and x86_64/TanhKernelFma3.S, erf.cpp and
x86_64/ErfKernelFma3.S.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


def fma(a, b, c) -> np.ndarray:
    """float32 fused multiply-add ``round32(a * b + c)`` (see the module docstring)."""
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(F32)


def _horner(x2, coeffs):
    """Horner evaluation with FMAs: ``fma(…fma(fma(x2, c0, c1), x2, c2)…, x2, cn)``."""
    acc = fma(x2, F32(coeffs[0]), F32(coeffs[1]))
    for c in coeffs[2:]:
        acc = fma(acc, x2, F32(c))
    return acc


#: Elements per chunk of the in-place kernels: their float64 scratch stays in L2.
_CHUNK = 1 << 14


class _Scratch:
    """Per-chunk work arrays of the in-place kernels: float64 arrays holding float32 values
    (the exact products of an FMA are formed there) and float32 ones (where each FMA rounds),
    allocated once per call, or per process for small calls (a recurrent step)."""

    def __init__(self, n):
        self.n = n
        self.f64 = [np.empty(n, np.float64) for _ in range(3)]
        self.f32 = [np.empty(n, F32) for _ in range(3)]

    def view(self, m):
        return [a[:m] for a in self.f64], [a[:m] for a in self.f32]


_SMALL_SCRATCH = _Scratch(1 << 12)


def _scratch(n: int) -> _Scratch:
    """Work arrays for ``min(n, _CHUNK)`` elements; calls on small arrays (recurrent gates, one
    image's pooled features) share one set instead of allocating six arrays each time."""
    m = min(n, _CHUNK)
    return _SMALL_SCRATCH if m <= _SMALL_SCRATCH.n else _Scratch(m)


def _round32(a64, t32):
    """``a64 = float64(float32(a64))`` in place: the rounding of an FMA's float64 result."""
    np.copyto(t32, a64, casting="unsafe")
    np.copyto(a64, t32)


def _horner_into(acc, x2, coeffs, t32):
    """``acc`` (float64, holding a float32 value when done… except for the last rounding, left to
    the caller) receives the polynomial in ``x2`` (float64 holding float32 values) by Horner's rule
    with FMAs: ``fma(…fma(fma(x2, c0, c1), x2, c2)…, x2, cn)``. Each product of two float32
    values is exact in float64, each sum is rounded once there and once to float32 (``t32``)."""
    np.multiply(x2, coeffs[0], out=acc)
    acc += coeffs[1]
    for c in coeffs[2:]:
        _round32(acc, t32)
        acc *= x2
        acc += c


def _rational(x, bound, p_coeffs, q_coeffs, epilogue):
    """``epilogue((v·P(v²)) / Q(v²))`` on ``v = clamp(x, ±bound)`` (NaN propagates), evaluated a
    cache-sized chunk at a time with FMAs; the float32 operations are exactly MLAS's. The
    coefficients are the float32 constants, as Python floats."""
    x = np.ascontiguousarray(x, F32)
    flat = x.reshape(-1)
    out = np.empty_like(flat)
    scratch = _scratch(flat.size)
    for s in range(0, flat.size, _CHUNK):
        v = np.clip(flat[s:s + _CHUNK], -bound, bound, out=out[s:s + _CHUNK])
        (x2, p64, q64), (t, p, q) = scratch.view(v.size)
        np.multiply(v, v, out=t)
        np.copyto(x2, t)
        _horner_into(p64, x2, p_coeffs, t)
        _horner_into(q64, x2, q_coeffs, t)
        np.copyto(p, p64, casting="unsafe")
        np.copyto(q, q64, casting="unsafe")
        p *= v
        np.divide(p, q, out=v)
        epilogue(v)
    return out.reshape(x.shape)


def _logistic_epilogue(y):
    y += F32(0.5)
    np.maximum(y, F32(0), out=y)  # NaN propagates, as vmaxps with y as its second operand


# MlasLogisticConstants (Eigen's coefficients): clamp range, alpha_9..alpha_1, beta_10..beta_0.
_LOGISTIC_RANGE = F32(18.0)
_LOGISTIC_P = (4.37031012579801e-11, 1.15627324459942e-07, 6.08574864600143e-05, 8.51377133304701e-03,
               2.48287947061529e-01)
_LOGISTIC_Q = (6.10247389755681e-13, 5.76102136993427e-09, 6.29106785017040e-06, 1.70198817374094e-03,
               1.16817656904453e-01, 9.93151921023180e-01)
_LOGISTIC_P32, _LOGISTIC_Q32 = ([float(F32(c)) for c in cs] for cs in (_LOGISTIC_P, _LOGISTIC_Q))


def logistic(x: np.ndarray) -> np.ndarray:
    """MlasComputeLogistic: ``v = clamp(x, ±18)``, ``p/q + 0.5`` with p odd of degree 9 and q even
    of degree 10 in v, clamped below at 0 (NaN propagates)."""
    return _rational(x, _LOGISTIC_RANGE, _LOGISTIC_P32, _LOGISTIC_Q32, _logistic_epilogue)


# MlasTanhConstants (Eigen's coefficients): clamp range, alpha_13..alpha_1, beta_6..beta_0.
_TANH_RANGE = F32(9.0)
_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
           1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)
_TANH_P32, _TANH_Q32 = ([float(F32(c)) for c in cs] for cs in (_TANH_P, _TANH_Q))


def tanh(x: np.ndarray) -> np.ndarray:
    """MlasComputeTanh: ``v = clamp(x, ±9)``, ``p/q`` with p odd of degree 13, q even of degree 6."""
    return _rational(x, _TANH_RANGE, _TANH_P32, _TANH_Q32, lambda y: None)


# MlasErfConstants: Norbert Juffa's faithfully rounded erff, with a polynomial in |x|² below the
# split and 1 - exp(-poly(|x|)) above it (MLAS's own expf, range-reduced by 2^round(x/ln2)).
_ERF_RANGE, _ERF_SPLIT = F32(3.925), F32(0.921875)
_ERF_SMALL = (-5.99104969e-4, 4.99339588e-3, -2.67667342e-2, 1.12818025e-1, -3.76124859e-1, 1.28379151e-1)
_ERF_BIG = (1.72948930e-5, -3.83208680e-4, 3.88393435e-3, -2.42545605e-2, 1.06777847e-1, 6.34846687e-1,
            1.28717512e-1)
_EXP_LOWER, _EXP_LOG2E, _EXP_C = F32(-88.3762626647949), F32(1.44269504088896341), F32(1.25829120e+7)
_EXP_LN2_HI, _EXP_LN2_LO = F32(-6.93145752e-1), F32(-1.42860677e-6)
_EXP_P = (1.38319808e-3, 8.37550033e-3, 4.16689515e-2, 1.66664466e-1, 4.99999851e-1, 1.0, 1.0)
_ERF_SMALL32, _ERF_BIG32, _EXP_P32 = ([float(F32(c)) for c in cs] for cs in (_ERF_SMALL, _ERF_BIG, _EXP_P))


def erf(x: np.ndarray) -> np.ndarray:
    """MlasComputeErf (ErfKernelFma3.S): on ``a = min(|x|, 3.925)``, ``a + a·p(a²)`` below 0.921875,
    else ``1 - exp(-(a + a·q(a)))``; the sign of x is copied onto the result. (ORT 1.19 clamps at
    3.925, measured; later MLAS sources clamp at 3.725; NaN clamps to it, so erf(±NaN) = ±1 as in
    ORT.) The vector kernel computes both branches for every element and blends them; here each
    element of a cache-sized chunk goes through its own branch only, the same float32 operations.
    Both are >= 0 on a >= 0, so the sign of x is copied onto the result with copysign."""
    x = np.ascontiguousarray(x, F32)
    flat = x.reshape(-1)
    out = np.empty_like(flat)
    scratch = _scratch(flat.size)
    for s in range(0, flat.size, _CHUNK):
        xs = flat[s:s + _CHUNK]
        y = out[s:s + _CHUNK]
        a = np.abs(xs)
        np.fmin(a, _ERF_RANGE, out=a)  # NaN -> 3.925: vminps returns its second operand for NaN
        big = a >= _ERF_SPLIT
        n_big = int(np.count_nonzero(big))
        if n_big == 0:
            _erf_small(a, y, scratch)
        elif n_big == a.size:
            _erf_big(a, y, scratch)
        else:  # each branch on its own elements only: a third of the passes on GELU inputs
            for where, branch in ((np.flatnonzero(~big), _erf_small), (np.flatnonzero(big), _erf_big)):
                part = a.take(where)
                y.put(where, branch(part, scratch.view(part.size)[1][2], scratch))
        np.copysign(y, xs, out=y)
    return out.reshape(x.shape)


def _erf_small(a, y, scratch):
    """``fma(p(a²), a, a)`` into ``y``, the branch of ``a`` < 0.921875 (scratch: f64 0-1, f32 0)."""
    (a64, h64, _), (t, _, _) = scratch.view(a.size)
    np.multiply(a, a, out=t)
    np.copyto(a64, t)
    _horner_into(h64, a64, _ERF_SMALL32, t)
    np.copyto(y, h64, casting="unsafe")       # p(a²) in float32
    np.copyto(a64, a)
    np.multiply(y, a64, out=h64)
    h64 += a64
    np.copyto(y, h64, casting="unsafe")
    return y


def _erf_big(a, y, scratch):
    """``1 - exp(-r)`` with ``r = fma(q(a), a, a)`` into ``y``, the branch of ``a`` >= 0.921875;
    MLAS's expf, range-reduced by 2^round(x/ln2) (scratch: f64 0-2, f32 0-1)."""
    (a64, h64, b64), (t, ab, _) = scratch.view(a.size)
    np.copyto(b64, a)
    _horner_into(h64, b64, _ERF_BIG32, t)
    _round32(h64, t)
    h64 *= b64
    h64 += b64
    np.copyto(t, h64, casting="unsafe")       # r
    np.negative(t, out=t)
    np.maximum(t, _EXP_LOWER, out=t)          # e
    np.copyto(b64, t)                         # e, float64
    np.multiply(b64, float(_EXP_LOG2E), out=h64)
    h64 += float(_EXP_C)
    np.copyto(ab, h64, casting="unsafe")
    ab -= _EXP_C                              # n = round(e / ln 2), float32
    np.copyto(a64, ab)                        # n, float64
    np.multiply(a64, float(_EXP_LN2_HI), out=h64)
    h64 += b64
    _round32(h64, t)                          # fma(n, ln2_hi, e)
    np.multiply(a64, float(_EXP_LN2_LO), out=b64)
    h64 += b64
    _round32(h64, t)                          # f = fma(n, ln2_lo, …), float64
    _horner_into(b64, h64, _EXP_P32, t)
    np.copyto(t, b64, casting="unsafe")       # p
    scale = np.ldexp(F32(1), ab.astype(np.int32)).astype(F32)
    t *= scale
    np.subtract(F32(1), t, out=y)             # the big branch
    return y
