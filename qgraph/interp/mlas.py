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
    """Per-chunk work arrays of the in-place kernels (one float64 square, one float64 and two
    float32 temporaries), allocated once per call."""

    def __init__(self, n):
        self.x2 = np.empty(n, np.float64)
        self.t64 = np.empty(n, np.float64)
        self.p = np.empty(n, F32)
        self.q = np.empty(n, F32)

    def view(self, m):
        return self.x2[:m], self.t64[:m], self.p[:m], self.q[:m]


def _horner_into(acc, x2, coeffs, t64):
    """In-place :func:`_horner`: ``acc`` (float32) receives the polynomial in ``x2`` (float64
    holding float32 values); ``t64`` is scratch."""
    np.multiply(x2, coeffs[0], out=t64)
    np.add(t64, coeffs[1], out=acc, casting="unsafe")  # float64 sum, rounded once to float32
    for c in coeffs[2:]:
        np.multiply(acc, x2, out=t64)
        np.add(t64, c, out=acc, casting="unsafe")


def _rational(x, bound, p_coeffs, q_coeffs, epilogue):
    """``epilogue((v·P(v²)) / Q(v²))`` on ``v = clamp(x, ±bound)`` (NaN propagates), evaluated a
    cache-sized chunk at a time with FMAs; the float32 operations are exactly MLAS's. The
    coefficients are the float32 constants, as Python floats."""
    x = np.ascontiguousarray(x, F32)
    flat = x.reshape(-1)
    out = np.empty_like(flat)
    scratch = _Scratch(min(flat.size, _CHUNK))
    for s in range(0, flat.size, _CHUNK):
        v = np.clip(flat[s:s + _CHUNK], -bound, bound, out=out[s:s + _CHUNK])
        x2, t64, p, q = scratch.view(v.size)
        np.multiply(v, v, out=q)
        np.copyto(x2, q)
        _horner_into(p, x2, p_coeffs, t64)
        _horner_into(q, x2, q_coeffs, t64)
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


def erf(x: np.ndarray) -> np.ndarray:
    """MlasComputeErf (ErfKernelFma3.S): on ``a = min(|x|, 3.925)``, ``a + a·p(a²)`` below 0.921875,
    else ``1 - exp(-(a + a·q(a)))``; the sign of x is copied onto the result. (ORT 1.19 clamps at
    3.925, measured; later MLAS sources clamp at 3.725.)"""
    x = np.asarray(x, F32)
    sign = np.signbit(x)
    a = np.minimum(np.abs(x), _ERF_RANGE)
    big = a >= _ERF_SPLIT
    small = fma(_horner(a * a, _ERF_SMALL), a, a)
    ab = np.where(big, a, F32(0))
    r = fma(_horner(ab, _ERF_BIG), ab, ab)
    e = np.maximum(-r, _EXP_LOWER)
    n = fma(_EXP_LOG2E, e, _EXP_C) - _EXP_C  # round(e / ln 2) by the 1.5·2^23 trick
    f = fma(n, _EXP_LN2_LO, fma(n, _EXP_LN2_HI, e))
    p = F32(_EXP_P[0])
    for c in _EXP_P[1:]:
        p = fma(p, f, F32(c))
    y = F32(1) - p * np.ldexp(F32(1), n.astype(np.int32)).astype(F32)
    y = np.where(big, y, small)
    return np.where(sign, -y, y).astype(F32)
