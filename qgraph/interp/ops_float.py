"""Float kernels with reductions inside (ONNX domain): LogSoftmax, Hardmax, LayerNormalization,
InstanceNormalization, GroupNormalization, MeanVarianceNormalization, LRN, Einsum, the
reductions ReduceL1/L2/LogSum/LogSumExp/Prod/SumSquare, LpPool/GlobalLpPool and Det.

Statistics (means, variances, sums) are accumulated in float64 and every output is rounded
once to the input's type. ORT accumulates in float32 in its own summation order (Eigen/MLAS), so
results agree to a few float32 ulp — more where a variance cancels (large mean, small spread).
LayerNormalization is the exception: ORT's one-pass kernel, transcribed (its docstring).
"""

from __future__ import annotations

import numpy as np

from qgraph.interp.ops_basic import _reduction
from qgraph.interp.registry import register


def _axis(ctx, x, default):
    return ctx.attr("axis", default) % x.ndim


# --------------------------------------------------------------------------- softmax family
def _log_softmax64(x64, axis):
    m = np.max(x64, axis=axis, keepdims=True)
    z = x64 - m
    return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))


def _flat2d_apply(ctx, x, fn):
    """Opset < 13 softmax semantics: ``fn`` over the rows of x flattened to 2-D at ``axis`` (default 1)."""
    axis = _axis(ctx, x, 1)
    x2 = x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)
    return fn(x2, 1).reshape(x.shape)


@register("LogSoftmax")
def log_softmax(ctx, x):
    """``x - max - log(Σ exp(x - max))`` along ``axis`` (opset >= 13, default -1) or over the 2-D
    flattening at ``axis`` (before, default 1)."""
    x64 = x.astype(np.float64)
    if ctx.opset >= 13:
        return _log_softmax64(x64, _axis(ctx, x, -1)).astype(x.dtype)
    return _flat2d_apply(ctx, x64, _log_softmax64).astype(x.dtype)


def _hardmax(x, axis):
    idx = np.argmax(x, axis=axis)
    return (np.expand_dims(idx, axis) == np.arange(x.shape[axis]).reshape(
        (-1,) + (1,) * (x.ndim - 1 - axis))).astype(x.dtype)


@register("Hardmax")
def hardmax(ctx, x):
    """1 at the first maximum along ``axis`` (opset >= 13) or per flattened row (before), else 0."""
    if ctx.opset >= 13:
        return _hardmax(x, _axis(ctx, x, -1))
    return _flat2d_apply(ctx, x, _hardmax)


# --------------------------------------------------------------------------- normalization
def _moments(x64, axes):
    mean = np.mean(x64, axis=axes, keepdims=True)
    var = np.mean(np.square(x64 - mean), axis=axes, keepdims=True)
    return mean, var


@register("LayerNormalization")
def layer_normalization(ctx, x, scale, bias=None):
    """``(x - mean) / sqrt(var + epsilon) · scale + bias`` over the axes from ``axis`` (default -1)
    to the last; optional outputs Mean and InvStdDev (keepdims shape, float32 stash type).

    As ORT computes it (layer_norm_impl.cc; its SkipLayerNormalization fusion alike), not in
    float64: per row one sequential pass summing x and x·x in the compute type (float32, or
    float64 for float64 input), ``mean = Σx/n``, ``d = sqrt(Σx²/n − mean² + ε)``, ``y = (x − mean)
    / d · scale + bias``, every operation rounded in that type. That one-pass variance cancels when
    the mean is large next to the spread — an exported transformer's LayerNorm can lose a few
    hundred ulp in ORT — and the interpreter now loses the same ones."""
    axis = _axis(ctx, x, -1)
    compute = np.float64 if x.dtype == np.float64 else np.float32
    n = int(np.prod(x.shape[axis:], dtype=np.int64))
    rows = x.reshape(-1, n).astype(compute, copy=False)
    total = np.add.accumulate(rows, axis=1, dtype=compute)[:, -1:]    # sequential, as ORT's loop
    squares = np.add.accumulate(rows * rows, axis=1, dtype=compute)[:, -1:]
    count = compute(n)
    mean = total / count
    with np.errstate(invalid="ignore"):   # a variance cancelled below zero: NaN, as ORT's sqrtf gives
        deviation = np.sqrt(squares / count - mean * mean + compute(np.float32(ctx.attr("epsilon", 1e-5))))
    y = (rows - mean) / deviation * scale.reshape(1, n).astype(compute)
    if bias is not None:
        y += bias.reshape(1, n).astype(compute)
    stats_shape = x.shape[:axis] + (1,) * (x.ndim - axis)
    stash = np.float32 if ctx.attr("stash_type", 1) == 1 else np.float64
    inverse = compute(1) / deviation
    return (y.reshape(x.shape).astype(x.dtype), mean.reshape(stats_shape).astype(stash),
            inverse.reshape(stats_shape).astype(stash))


@register("InstanceNormalization")
def instance_normalization(ctx, x, scale, bias):
    """Per (image, channel): ``(x - mean) / sqrt(var + epsilon) · scale[c] + bias[c]`` over the
    spatial axes."""
    eps = ctx.attr("epsilon", 1e-5)
    x64 = x.astype(np.float64)
    mean, var = _moments(x64, tuple(range(2, x.ndim)))
    shp = (1, -1) + (1,) * (x.ndim - 2)
    y = (x64 - mean) / np.sqrt(var + eps) * scale.astype(np.float64).reshape(shp) + bias.astype(np.float64).reshape(shp)
    return y.astype(x.dtype)


@register("GroupNormalization")
def group_normalization(ctx, x, scale, bias):
    """Channels split into ``num_groups`` groups normalized over (group channels, spatial); then
    ``· scale + bias`` per channel (opset 21) or per group (opset 18's form, told apart by the
    size of scale)."""
    g = ctx.attr("num_groups")
    eps = ctx.attr("epsilon", 1e-5)
    n, c = x.shape[:2]
    if c % g:
        raise ctx.error(f"{c} channels do not split into num_groups={g}")
    x64 = x.astype(np.float64).reshape((n, g, -1))
    mean, var = _moments(x64, (2,))
    y = ((x64 - mean) / np.sqrt(var + eps)).reshape(x.shape)
    s, b = scale.astype(np.float64).reshape(-1), bias.astype(np.float64).reshape(-1)
    if s.size == g and g != c:
        s, b = np.repeat(s, c // g), np.repeat(b, c // g)
    shp = (1, c) + (1,) * (x.ndim - 2)
    return (y * s.reshape(shp) + b.reshape(shp)).astype(x.dtype)


@register("MeanVarianceNormalization")
def mean_variance_normalization(ctx, x):
    """The spec's function body: ``(x - E[x]) / (sqrt(E[x²] - E[x]²) + 1e-9)`` over ``axes``
    (default [0, 2, 3])."""
    axes = tuple(a % x.ndim for a in ctx.attr("axes", [0, 2, 3]))
    x64 = x.astype(np.float64)
    mean = np.mean(x64, axis=axes, keepdims=True)
    var = np.mean(x64 * x64, axis=axes, keepdims=True) - mean * mean
    return ((x64 - mean) / (np.sqrt(var) + 1e-9)).astype(x.dtype)


@register("LRN")
def lrn(ctx, x):
    """Local response normalization across channels: ``x / (bias + alpha/size · Σ x²)^beta`` with
    the sum over channels ``c - ⌊(size-1)/2⌋ … c + ⌈(size-1)/2⌉``."""
    size = ctx.attr("size")
    alpha, beta, bias = ctx.attr("alpha", 1e-4), ctx.attr("beta", 0.75), ctx.attr("bias", 1.0)
    x64 = x.astype(np.float64)
    sq = np.square(x64)
    lo, hi = (size - 1) // 2, -(-(size - 1) // 2)
    c = x.shape[1]
    padded = np.pad(sq, [(0, 0), (lo, hi)] + [(0, 0)] * (x.ndim - 2))
    csum = np.concatenate([np.zeros_like(padded[:, :1]), np.cumsum(padded, axis=1)], axis=1)
    window = csum[:, size:size + c] - csum[:, :c]
    return (x64 / (bias + alpha / size * window) ** beta).astype(x.dtype)


# --------------------------------------------------------------------------- einsum
@register("Einsum")
def einsum(ctx, *xs):
    """numpy.einsum on the ``equation`` (BLAS-contracted; float results agree with ORT's to the
    summation-order rounding of a matmul)."""
    eq = ctx.attr("equation").replace(" ", "")
    return np.asarray(np.einsum(eq, *xs, optimize=len(xs) > 1)).astype(np.result_type(*xs))


# --------------------------------------------------------------------------- reductions
def _reducer(fn):
    def np_fn(x, axis=None, keepdims=True):
        return fn(x, axis, keepdims)
    return np_fn


register("ReduceL1")(_reduction(_reducer(lambda x, ax, kd: np.sum(np.abs(x), axis=ax, keepdims=kd))))
register("ReduceL2")(_reduction(_reducer(lambda x, ax, kd: np.sqrt(np.sum(np.square(x), axis=ax, keepdims=kd)))))
register("ReduceSumSquare")(_reduction(_reducer(lambda x, ax, kd: np.sum(np.square(x), axis=ax, keepdims=kd))))
register("ReduceProd")(_reduction(_reducer(lambda x, ax, kd: np.prod(x, axis=ax, keepdims=kd))))
register("ReduceLogSum")(_reduction(_reducer(lambda x, ax, kd: np.log(np.sum(x, axis=ax, keepdims=kd)))))


def _log_sum_exp(x, ax, kd):
    if x.size == 0:
        return np.log(np.sum(np.exp(x), axis=ax, keepdims=kd))
    m = np.max(x, axis=ax, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    s = np.log(np.sum(np.exp(x - m), axis=ax, keepdims=True)) + m
    return s if kd else np.squeeze(s, axis=ax)


register("ReduceLogSumExp")(_reduction(_reducer(_log_sum_exp)))


# --------------------------------------------------------------------------- pooling, linear algebra
@register("LpPool")
def lp_pool(ctx, x):
    """``(Σ_window |x|^p)^(1/p)`` over each window (p default 2); padding contributes 0."""
    from qgraph.interp.ops_nn import _pool_setup, _pooled

    p = ctx.attr("p", 2)
    kernel, strides, dil, pads, extra, outs = _pool_setup(ctx, x)
    nd = len(kernel)
    win = _pooled(np.abs(x.astype(np.float64)) ** p, kernel, strides, dil, pads, extra, outs, 0.0)
    return (win.sum(axis=tuple(range(-nd, 0))) ** (1.0 / p)).astype(x.dtype)


@register("GlobalLpPool")
def global_lp_pool(ctx, x):
    """``(Σ_spatial |x|^p)^(1/p)`` per (image, channel), keeping the spatial axes as 1."""
    p = ctx.attr("p", 2)
    axes = tuple(range(2, x.ndim))
    return (np.sum(np.abs(x.astype(np.float64)) ** p, axis=axes, keepdims=True) ** (1.0 / p)).astype(x.dtype)


@register("Det")
def det(ctx, x):
    """Determinant of the trailing square matrices (LU in float64, rounded once)."""
    return np.linalg.det(x.astype(np.float64)).astype(x.dtype)
