"""Element-wise, reduction and shape kernels (ONNX domain). Float kernels compute in the input's
dtype; integer arithmetic wraps like C and integer Div truncates toward zero, as in ORT."""

from __future__ import annotations

import math

import numpy as np
import onnx

from qgraph import quant
from qgraph.interp import mlas
from qgraph.interp.registry import MS_DOMAIN, np_dtype, register


def _ints(v):
    return [int(a) for a in np.asarray(v).reshape(-1)]


# --------------------------------------------------------------------------- arithmetic
@register("Add")
def add(ctx, a, b):
    """A + B with numpy broadcasting; integers wrap."""
    return np.add(a, b, dtype=np.result_type(a, b))


@register("Sub")
def sub(ctx, a, b):
    """A - B; integers wrap."""
    return np.subtract(a, b, dtype=np.result_type(a, b))


@register("Mul")
def mul(ctx, a, b):
    """A * B; integers wrap."""
    return np.multiply(a, b, dtype=np.result_type(a, b))


def _pow2_exponents(b):
    """log2 of a signed-integer divisor whose entries are all positive powers of two, else None
    (the integer lowering divides by 2^n; shifts are exact and far faster than int division)."""
    if b.dtype.kind != "i" or b.size == 0 or b.min() <= 0 or np.any(b & (b - 1)):
        return None
    return np.log2(b.astype(np.float64)).astype(b.dtype)


@register("Div")
def div(ctx, a, b):
    """A / B. Integer division truncates toward zero (C++ semantics, as ORT), not floor.
    For divisors 2^k: trunc(a / 2^k) = (a + (2^k - 1 if a < 0 else 0)) >> k (arithmetic shift)."""
    if np.issubdtype(a.dtype, np.integer):
        k = ctx.once("pow2", lambda: _pow2_exponents(b), 1)
        if k is not None and a.dtype == b.dtype:
            bias = (a >> (a.dtype.itemsize * 8 - 1)) & (b - 1)  # 2^k - 1 where a < 0, else 0
            bias += a
            return np.right_shift(bias, k, out=bias)
        q = np.abs(a.astype(np.int64)) // np.abs(b.astype(np.int64))
        return (q * (np.sign(a) * np.sign(b))).astype(a.dtype)
    return np.divide(a, b, dtype=a.dtype)


@register("Mod")
def mod(ctx, a, b):
    """fmod=0: integer remainder with the divisor's sign (Python %); fmod=1: C fmod.
    For fmod=0 and divisors 2^k: a mod 2^k = a & (2^k - 1) (two's complement)."""
    if ctx.attr("fmod", 0):
        return np.fmod(a, b).astype(a.dtype)
    if np.issubdtype(a.dtype, np.integer) and a.dtype == b.dtype:
        if ctx.once("pow2", lambda: _pow2_exponents(b), 1) is not None:
            return np.bitwise_and(a, b - 1)
    return np.mod(a, b).astype(a.dtype)


@register("Pow")
def pow_(ctx, a, b):
    """A ** B, result in A's dtype."""
    if np.issubdtype(a.dtype, np.integer):
        return np.power(a.astype(np.float64), b.astype(np.float64)).astype(a.dtype)
    return np.power(a, b.astype(a.dtype) if np.issubdtype(b.dtype, np.integer) else b).astype(a.dtype)


@register("BitShift")
def bitshift(ctx, x, y):
    """Unsigned shifts; direction LEFT or RIGHT."""
    if ctx.attr("direction") == "LEFT":
        return np.left_shift(x, y).astype(x.dtype)
    return np.right_shift(x, y).astype(x.dtype)


def _variadic(fn):
    def k(ctx, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out.astype(np.result_type(*xs))
    return k


register("Max")(_variadic(np.maximum))
register("Min")(_variadic(np.minimum))
register("Sum")(_variadic(np.add))


# Elementwise float ops that are exactly the NumPy ufunc of the same name.
_UNARY_UFUNCS = {"Sqrt": np.sqrt, "Floor": np.floor, "Ceil": np.ceil, "Abs": np.abs, "Neg": np.negative,
                 "Exp": np.exp, "Log": np.log}
for _op, _ufunc in _UNARY_UFUNCS.items():
    register(_op)(lambda ctx, x, _ufunc=_ufunc: _ufunc(x))


@register("Reciprocal")
def reciprocal(ctx, x):
    return (np.ones((), x.dtype) / x).astype(x.dtype)


@register("Round")
def round_(ctx, x):
    """Round half to even."""
    return quant.round_half_even(x)


@register("Relu")
def relu(ctx, x):
    return np.maximum(x, np.zeros((), x.dtype))


@register("Sigmoid")
def sigmoid(ctx, x):
    """1 / (1 + exp(-x)). float32: ORT's rational approximation (MlasComputeLogistic), bit for
    bit — it differs from the true value by up to a few ulp, and a dynamically quantized model
    downstream of a Sigmoid is only bit-exact with the same rounding. Other types: float64,
    rounded once."""
    if x.dtype == np.float32:
        return mlas.logistic(x)
    x64 = x.astype(np.float64)
    return (0.5 * (1.0 + np.tanh(0.5 * x64))).astype(x.dtype)


@register("Tanh")
def tanh(ctx, x):
    """float32: ORT's rational approximation (MlasComputeTanh), bit for bit; else NumPy's tanh."""
    return mlas.tanh(x) if x.dtype == np.float32 else np.tanh(x)


@register("LeakyRelu")
def leaky_relu(ctx, x):
    alpha = np.asarray(ctx.attr("alpha", 0.01), dtype=x.dtype)
    return np.where(x >= 0, x, x * alpha).astype(x.dtype)


@register("Clip")
def clip(ctx, x, lo=None, hi=None):
    """Clamp; bounds are attributes before opset 11 and optional inputs after."""
    if ctx.opset < 11:
        lo, hi = ctx.attr("min"), ctx.attr("max")
    out = x
    if lo is not None:
        out = np.maximum(out, np.asarray(lo, dtype=x.dtype))
    if hi is not None:
        out = np.minimum(out, np.asarray(hi, dtype=x.dtype), out=out if out is not x and out.ndim else None)
    return np.asarray(out)


@register("Softmax")
def softmax(ctx, x):
    """Opset >= 13: along ``axis`` (default -1); before: over the 2-D flattening at ``axis`` (default 1)."""
    if ctx.opset >= 13:
        axis = ctx.attr("axis", -1)
        m = np.max(x, axis=axis, keepdims=True)
        e = np.exp(x - m)
        return (e / np.sum(e, axis=axis, keepdims=True)).astype(x.dtype)
    axis = ctx.attr("axis", 1) % x.ndim
    shape = x.shape
    x2 = x.reshape(int(np.prod(shape[:axis])), -1)
    e = np.exp(x2 - x2.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).reshape(shape).astype(x.dtype)


@register("Identity")
def identity(ctx, x):
    return x


@register("Dropout")
def dropout(ctx, x, ratio=None, training_mode=None):
    """Inference only: identity (and an all-true mask)."""
    if training_mode is not None and bool(np.asarray(training_mode)):
        raise ctx.error("training_mode=True is not supported (inference only)")
    return x, np.ones(x.shape, dtype=bool)


def cast_array(x, to) -> np.ndarray:
    """C-style conversion to numpy dtype ``to`` (float→int truncates toward zero), as ORT."""
    if np.issubdtype(to, np.integer) and np.issubdtype(x.dtype, np.floating):
        return np.trunc(x).astype(to)
    return x.astype(to)


@register("Cast")
def cast(ctx, x):
    """C-style conversion (float→int truncates). Numeric and boolean types only."""
    code = ctx.attr("to")
    if code not in _CASTABLE or x.dtype.kind not in "biuf":
        name = onnx.TensorProto.DataType.Name(code) if code in onnx.TensorProto.DataType.values() else code
        raise ctx.error(f"cast from {x.dtype} to {name} is not supported (numeric and boolean types only)")
    return cast_array(x, np_dtype(code))


#: ONNX element types Cast may produce: NumPy's own numeric and boolean types (not strings,
#: complex, bfloat16, float8 or int4, which NumPy would only store in a wider carrier type).
_CASTABLE = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BOOL,
             onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
             onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}


@register("Constant")
def constant(ctx):
    for name in ("value", "sparse_value"):
        if name in ctx.attrs:
            return np.asarray(ctx.attr(name))
    kinds = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64,
             "value_ints": np.int64}
    for name, dt in kinds.items():
        if name in ctx.attrs:
            return np.asarray(ctx.attr(name), dtype=dt)
    raise ctx.error("no supported value attribute")


@register("ConstantOfShape")
def constant_of_shape(ctx, shape):
    v = ctx.attr("value")
    v = np.zeros(1, np.float32) if v is None else v
    return np.full(_ints(shape), v.reshape(-1)[0], dtype=v.dtype)


# --------------------------------------------------------------------------- reductions
def _reduce_axes(ctx, axes_input):
    if ctx.opset >= 18 or axes_input is not None:
        axes = None if axes_input is None else _ints(axes_input)
    else:
        axes = ctx.attr("axes")
    if not axes:
        return None
    return tuple(axes)


def _reduction(np_fn, empty=None):
    def k(ctx, x, axes=None):
        ax = _reduce_axes(ctx, axes)
        if ax is None and ctx.attr("noop_with_empty_axes", 0):
            return x
        keep = bool(ctx.attr("keepdims", 1))
        if x.size == 0 and empty is not None:  # the reduction's identity element
            ident = empty(x.dtype)
            return np_fn(x, axis=ax, keepdims=keep, initial=ident).astype(x.dtype)
        if np.issubdtype(x.dtype, np.floating):
            return np_fn(x.astype(np.float64), axis=ax, keepdims=keep).astype(x.dtype)
        return np_fn(x, axis=ax, keepdims=keep).astype(x.dtype)
    return k


register("ReduceMean")(_reduction(np.mean))
register("ReduceSum")(_reduction(np.sum))
def _lowest(dt):
    return -np.inf if np.issubdtype(dt, np.floating) else np.iinfo(dt).min


def _highest(dt):
    return np.inf if np.issubdtype(dt, np.floating) else np.iinfo(dt).max


register("ReduceMax")(_reduction(np.max, _lowest))
register("ReduceMin")(_reduction(np.min, _highest))


# --------------------------------------------------------------------------- shapes
@register("Shape")
def shape(ctx, x):
    start, end = ctx.attr("start", 0), ctx.attr("end")
    return np.asarray(x.shape[start:end], dtype=np.int64)


@register("Size")
def size(ctx, x):
    return np.asarray(x.size, dtype=np.int64)


@register("Reshape")
def reshape(ctx, x, shape):
    """0 copies the input dim (unless allowzero=1); -1 is inferred."""
    s = _ints(shape)
    if not ctx.attr("allowzero", 0):
        s = [x.shape[i] if d == 0 else d for i, d in enumerate(s)]
    return x.reshape(s)


@register("Flatten")
def flatten(ctx, x):
    axis = ctx.attr("axis", 1)
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@register("Transpose")
def transpose(ctx, x):
    perm = ctx.attr("perm")
    return np.ascontiguousarray(np.transpose(x, perm))


@register("Concat", "", MS_DOMAIN)
def concat(ctx, *xs):
    return np.concatenate([x for x in xs if x is not None], axis=ctx.attr("axis"))


@register("Gather")
def gather(ctx, x, indices):
    axis = ctx.attr("axis", 0) % x.ndim
    idx = np.where(indices < 0, indices + x.shape[axis], indices)
    return np.take(x, idx, axis=axis)


@register("Unsqueeze")
def unsqueeze(ctx, x, axes=None):
    ax = _ints(axes) if ctx.opset >= 13 else ctx.attr("axes")
    nd = x.ndim + len(ax)
    return np.expand_dims(x, tuple(sorted(a % nd for a in ax)))


@register("Squeeze")
def squeeze(ctx, x, axes=None):
    ax = (None if axes is None else _ints(axes)) if ctx.opset >= 13 else ctx.attr("axes")
    if not ax:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(a % x.ndim for a in ax))


@register("Expand")
def expand(ctx, x, shape):
    out_shape = np.broadcast_shapes(x.shape, tuple(_ints(shape)))
    return np.broadcast_to(x, out_shape).copy()


@register("Slice")
def slice_(ctx, x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = list(range(len(starts))) if axes is None else [a % x.ndim for a in _ints(axes)]
    steps = [1] * len(starts) if steps is None else _ints(steps)
    sl = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        sl[a] = slice(s, e, st)
    return x[tuple(sl)].copy()


@register("Pad")
def pad(ctx, x, pads=None, value=None, axes=None):
    """Constant, edge and reflect modes."""
    mode = ctx.attr("mode", "constant")
    p = _ints(pads) if ctx.opset >= 11 else ctx.attr("pads")
    ax = list(range(x.ndim)) if axes is None else [a % x.ndim for a in _ints(axes)]
    width = [(0, 0)] * x.ndim
    for i, a in enumerate(ax):
        width[a] = (p[i], p[i + len(ax)])
    if any(b < 0 or e < 0 for b, e in width):
        raise ctx.error("negative pads are not supported")
    if mode == "constant":
        v = ctx.attr("value", 0.0) if ctx.opset < 11 else (0 if value is None else np.asarray(value).reshape(-1)[0])
        # np.pad's constant mode, without its per-call overhead (22 us against 5 on a 25K uint8 map)
        out = np.empty(tuple(n + b + e for n, (b, e) in zip(x.shape, width)), x.dtype)
        out[...] = v
        out[tuple(slice(b, b + n) for n, (b, _) in zip(x.shape, width))] = x
        return out
    return np.pad(x, width, mode={"edge": "edge", "reflect": "reflect", "wrap": "wrap"}[mode])
