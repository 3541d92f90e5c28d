"""Element-wise kernels beyond arithmetic (ONNX domain): comparisons and logic, Where, CastLike,
Mean, Erf/Gelu, trigonometric functions, and the activation functions exporters emit
(HardSigmoid, HardSwish, Elu, Selu, Celu, PRelu, Softplus, Softsign, Mish, …).

Exactness against ORT 1.19 (CPU), float32:
- comparisons, logic, Where, Sign, PRelu, HardSigmoid, HardSwish, ThresholdedRelu, Shrink,
  Softsign, Relu-like selections: the same IEEE operations in the same order — bit-exact;
- Erf (and Gelu's erf): MLAS's erff transcribed (:mod:`qgraph.interp.mlas`) — bit-exact;
- exp/log based functions (Elu, Selu, Celu, Softplus, Mish, trigonometric): evaluated in
  float64 and rounded once (≤ 0.5 ulp from the true value); ORT uses Eigen's vectorized
  exp/log (≤ ~2 ulp), so they agree to a few ulp.
"""

from __future__ import annotations

import math

import numpy as np

from qgraph.interp import mlas
from qgraph.interp.ops_basic import cast_array
from qgraph.interp.registry import register

F32 = np.float32


def _attr_f(ctx, name, default, dtype):
    return np.asarray(ctx.attr(name, default), dtype=dtype)


def _f64(fn):
    """Kernel computing ``fn`` in float64 and rounding once to the input's float type."""
    def k(ctx, x):
        return fn(ctx, x.astype(np.float64)).astype(x.dtype)
    k.__doc__ = fn.__doc__
    return k


# --------------------------------------------------------------------------- comparison / logic
_COMPARE = {"Equal": np.equal, "Greater": np.greater, "Less": np.less, "GreaterOrEqual": np.greater_equal,
            "LessOrEqual": np.less_equal}
_LOGIC = {"And": np.logical_and, "Or": np.logical_or, "Xor": np.logical_xor}
_BITWISE = {"BitwiseAnd": np.bitwise_and, "BitwiseOr": np.bitwise_or, "BitwiseXor": np.bitwise_xor}

for _op, _fn in _COMPARE.items():
    register(_op)(lambda ctx, a, b, _fn=_fn: _fn(a, b))
for _op, _fn in _LOGIC.items():
    register(_op)(lambda ctx, a, b, _fn=_fn: _fn(a, b))
for _op, _fn in _BITWISE.items():
    register(_op)(lambda ctx, a, b, _fn=_fn: _fn(a, b).astype(np.result_type(a, b)))


@register("Not")
def not_(ctx, x):
    return np.logical_not(x)


@register("BitwiseNot")
def bitwise_not(ctx, x):
    return np.invert(x)


@register("Where")
def where(ctx, cond, x, y):
    """``x`` where ``cond`` else ``y``, with multidirectional broadcasting."""
    return np.where(cond, x, y).astype(np.result_type(x, y))


@register("IsNaN")
def isnan(ctx, x):
    return np.isnan(x)


@register("IsInf")
def isinf(ctx, x):
    """±inf tests, each side switched by ``detect_positive`` / ``detect_negative``."""
    pos, neg = ctx.attr("detect_positive", 1), ctx.attr("detect_negative", 1)
    return (np.isposinf(x) & bool(pos)) | (np.isneginf(x) & bool(neg))


@register("Sign")
def sign(ctx, x):
    return np.sign(x).astype(x.dtype)


@register("CastLike")
def cast_like(ctx, x, like):
    """Cast to ``like``'s element type, with Cast's conversion rules."""
    if like.dtype.kind not in "biuf" or x.dtype.kind not in "biuf":
        raise ctx.error(f"cast from {x.dtype} to {like.dtype} is not supported (numeric and boolean types only)")
    return x if x.dtype == like.dtype else cast_array(x, like.dtype)


@register("Mean")
def mean(ctx, *xs):
    """Element-wise mean of the inputs (broadcast): their sum in order, divided by the count."""
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return (out / np.asarray(len(xs), out.dtype)).astype(np.result_type(*xs))


# --------------------------------------------------------------------------- transcendental
@register("Erf")
def erf(ctx, x):
    """float32: ORT's MlasComputeErf, bit for bit; float64: the same algorithm's accuracy is not
    enough, so it is refused."""
    if x.dtype != F32:
        raise ctx.error(f"input type {x.dtype} is not supported (float32 only)")
    return mlas.erf(x)


@register("Gelu")
def gelu(ctx, x):
    """approximate='none': ``0.5·x·(1 + erf(x/√2))`` — as ORT: ``t = x · float32(1/√2)``, MLAS erf,
    then ``0.5·x·(erf + 1)`` in float32; 'tanh': ``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`` in
    ORT's factored float32 form."""
    if x.dtype != F32:
        raise ctx.error(f"input type {x.dtype} is not supported (float32 only)")
    approx = ctx.attr("approximate", "none")
    if approx == "none":
        e = mlas.erf(x * F32(1 / math.sqrt(2)))
        return F32(0.5) * x * (e + F32(1))
    if approx == "tanh":  # ORT: inner = x·(√(2/π) + 0.044715·√(2/π)·x²), MLAS tanh, then 0.5·x·(t + 1)
        alpha = math.sqrt(2 / math.pi)
        inner = x * (F32(alpha) + F32(0.044715 * alpha) * x * x)
        return F32(0.5) * x * (mlas.tanh(inner) + F32(1))
    raise ctx.error(f"approximate={approx!r} is not supported")


_TRIG = {"Sin": np.sin, "Cos": np.cos, "Tan": np.tan, "Asin": np.arcsin, "Acos": np.arccos, "Atan": np.arctan,
         "Sinh": np.sinh, "Cosh": np.cosh, "Asinh": np.arcsinh, "Acosh": np.arccosh, "Atanh": np.arctanh}
for _op, _fn in _TRIG.items():
    register(_op)(_f64(lambda ctx, x, _fn=_fn: _fn(x)))


# --------------------------------------------------------------------------- activations
@register("HardSigmoid")
def hard_sigmoid(ctx, x):
    """``max(0, min(1, alpha·x + beta))`` (alpha 0.2, beta 0.5), multiply then add in x's type."""
    a, b = _attr_f(ctx, "alpha", 0.2, x.dtype), _attr_f(ctx, "beta", 0.5, x.dtype)
    return np.clip(x * a + b, np.zeros((), x.dtype), np.ones((), x.dtype))


@register("HardSwish")
def hard_swish(ctx, x):
    """``x · HardSigmoid(x; alpha=1/6, beta=0.5)`` — the spec's function body, which ORT runs."""
    a, b = np.asarray(1 / 6, x.dtype), np.asarray(0.5, x.dtype)
    return x * np.clip(x * a + b, np.zeros((), x.dtype), np.ones((), x.dtype))


@register("PRelu")
def prelu(ctx, x, slope):
    """``x`` where ``x >= 0`` else ``slope·x`` (slope broadcast to x)."""
    return np.where(x < 0, x * slope.astype(x.dtype), x).astype(x.dtype)


@register("ThresholdedRelu")
def thresholded_relu(ctx, x):
    """``x`` where ``x > alpha`` (default 1) else 0."""
    return np.where(x > _attr_f(ctx, "alpha", 1.0, x.dtype), x, np.zeros((), x.dtype))


@register("Shrink")
def shrink(ctx, x):
    """``x + bias`` below ``-lambd``, ``x - bias`` above ``lambd``, 0 between."""
    lambd, bias = ctx.attr("lambd", 0.5), ctx.attr("bias", 0.0)
    if np.issubdtype(x.dtype, np.integer):
        xf = x.astype(np.float64)
        return np.where(xf < -lambd, xf + bias, np.where(xf > lambd, xf - bias, 0)).astype(x.dtype)
    lo, b = np.asarray(lambd, x.dtype), np.asarray(bias, x.dtype)
    return np.where(x < -lo, x + b, np.where(x > lo, x - b, np.zeros((), x.dtype))).astype(x.dtype)


@register("Softsign")
def softsign(ctx, x):
    """``x / (1 + |x|)``, computed as ORT's functor does: ``x · (1 / (1 + |x|))`` in x's type."""
    one = np.ones((), x.dtype)
    return x * (one / (one + np.abs(x)))


@register("Elu")
def elu(ctx, x):
    """``x`` for x ≥ 0 else ``alpha·(exp(x) - 1)`` (alpha 1), in x's type as ORT's functor (and the
    ONNX reference) computes it — exp, subtract, multiply — so the cancellation near 0 is theirs."""
    alpha = _attr_f(ctx, "alpha", 1.0, x.dtype)
    return np.where(x >= 0, x, alpha * (np.exp(x) - np.ones((), x.dtype)))


@register("Selu")
def selu(ctx, x):
    """``gamma·x`` for x > 0 else ``gamma·(alpha·exp(x) - alpha)``, in x's type (ORT's functor)."""
    alpha = _attr_f(ctx, "alpha", 1.67326319217681884765625, x.dtype)
    gamma = _attr_f(ctx, "gamma", 1.05070102214813232421875, x.dtype)
    return np.where(x > 0, gamma * x, gamma * (alpha * np.exp(x) - alpha))


@register("Celu")
def celu(ctx, x):
    """The spec's function body in x's type: ``max(0, x) + min(0, alpha·(exp(x/alpha) - 1))``."""
    alpha = _attr_f(ctx, "alpha", 1.0, x.dtype)
    zero = np.zeros((), x.dtype)
    return np.maximum(zero, x) + np.minimum(zero, alpha * (np.exp(x / alpha) - np.ones((), x.dtype)))


@register("Softplus")
@_f64
def softplus(ctx, x):
    """``log(1 + exp(x))``, evaluated without overflow."""
    return np.logaddexp(0.0, x)


@register("Mish")
def mish(ctx, x):
    """``x · tanh(softplus(x))``: softplus rounded once to x's type, then Tanh as the Tanh kernel
    (ORT runs the spec's function body: Softplus, Tanh, Mul)."""
    sp = np.logaddexp(0.0, x.astype(np.float64)).astype(x.dtype)
    return x * (mlas.tanh(sp) if x.dtype == F32 else np.tanh(sp))
