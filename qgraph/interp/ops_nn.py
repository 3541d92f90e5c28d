"""Convolution, pooling, GEMM and normalization kernels (ONNX domain), plus the shared
convolution core that the integer kernels reuse.

Conv works in NCHW throughout: im2col gathers the (zero-point-shifted) windows of the padded
input into ``(N, C·K, P)`` with one strided copy (runs of output columns are contiguous), and one
batched matmul with the ``(M, C·K)`` weight matrix yields ``(N, M, P)`` — already NCHW. Depthwise
convs skip im2col: one multiply-add per kernel tap over whole strided views. Integer callers
pass zero-point-shifted float operands: float32 when every partial sum is provably below 2^24,
float64 otherwise (below 2^53 for any 8-bit conv), so BLAS computes the integers exactly, in any
summation order.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from qgraph.interp.registry import register


# --------------------------------------------------------------------------- conv core
def conv_pads(ctx, in_spatial, kernel, strides, dilations) -> list[int]:
    """Explicit pads ``[b1, b2, ..., e1, e2, ...]`` honouring ``auto_pad``."""
    nd = len(kernel)
    auto = ctx.attr("auto_pad", "NOTSET")
    if auto == "NOTSET":
        return list(ctx.attr("pads", [0] * 2 * nd))
    if auto == "VALID":
        return [0] * 2 * nd
    begin, end = [], []
    for i in range(nd):
        out = -(-in_spatial[i] // strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - in_spatial[i])
        b = total // 2 if auto == "SAME_UPPER" else total - total // 2
        begin.append(b)
        end.append(total - b)
    return begin + end


def conv_geometry(ctx, x_shape, w_shape):
    nd = len(w_shape) - 2
    kernel = list(ctx.attr("kernel_shape", w_shape[2:]))
    strides = list(ctx.attr("strides", [1] * nd))
    dilations = list(ctx.attr("dilations", [1] * nd))
    pads = conv_pads(ctx, x_shape[2:], kernel, strides, dilations)
    return strides, dilations, pads


def _windows(x, kernel, strides, dilations):
    """View of shape (N, C, *out, *kernel) over an already padded x."""
    nd = len(kernel)
    ext = [(kernel[i] - 1) * dilations[i] + 1 for i in range(nd)]
    win = sliding_window_view(x, ext, axis=tuple(range(2, 2 + nd)))
    sl = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) \
        + tuple(slice(None, None, d) for d in dilations)
    return win[sl]


def _padded_shifted(x, pads, shift, dtype):
    """``x - shift`` in ``dtype``, zero-padded on the spatial axes: one conversion pass."""
    nd = x.ndim - 2
    if not any(pads):
        return _shift(x, shift, dtype)
    shape = x.shape[:2] + tuple(x.shape[2 + i] + pads[i] + pads[i + nd] for i in range(nd))
    xp = np.zeros(shape, dtype)
    inner = (slice(None), slice(None)) + tuple(slice(pads[i], pads[i] + x.shape[2 + i]) for i in range(nd))
    if shift is None:
        xp[inner] = x
    else:
        np.subtract(x, shift, out=xp[inner], dtype=dtype, casting="unsafe")
    return xp


def _shift(x, shift, dtype):
    if shift is None:
        return x if x.dtype == dtype else x.astype(dtype)
    return np.subtract(x, shift, dtype=dtype, casting="unsafe")


def _tap_views(xp, kernel, strides, dilations, out):
    """For each kernel tap (row-major), the strided view of padded xp that it multiplies."""
    nd = len(kernel)
    for tap in itertools.product(*(range(k) for k in kernel)):
        yield tap, xp[(slice(None), slice(None)) + tuple(
            slice(tap[i] * dilations[i], tap[i] * dilations[i] + strides[i] * (out[i] - 1) + 1, strides[i])
            for i in range(nd))]


def conv_out_shape(x_shape, kernel, strides, dilations, pads):
    nd = len(kernel)
    return tuple((x_shape[2 + i] + pads[i] + pads[i + nd] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1
                 for i in range(nd))


def is_depthwise(w_shape, group: int) -> bool:
    return group > 1 and w_shape[1] == 1 and w_shape[0] == group


class DepthwiseWeights(list):
    """Per-tap weight columns ``(C, 1, …, 1)`` of a depthwise conv, plus the per-channel weight
    maps of :func:`_depthwise_2d`, built once per image geometry."""

    def weight_maps(self, per: int, plane: int) -> list[np.ndarray]:
        maps = getattr(self, "_maps", None)
        if maps is None:
            maps = self._maps = {}
        key = (per, plane)
        if key not in maps:
            maps[key] = [np.repeat(np.tile(w.reshape(-1), per), plane) for w in self]
        return maps[key]


def conv_weights(w, group: int, dtype):
    """Weights in the form :func:`conv_core` consumes: ``(G, M/G, C/G·K)`` for a GEMM, or
    ``(C, 1, …, 1)`` columns per kernel tap for a depthwise conv."""
    kernel = w.shape[2:]
    if is_depthwise(w.shape, group):
        wk = w.reshape((w.shape[0],) + kernel).astype(dtype)
        nd = len(kernel)
        return DepthwiseWeights([np.ascontiguousarray(wk[(slice(None),) + tap]).reshape((-1,) + (1,) * nd)
                                 for tap in itertools.product(*(range(k) for k in kernel))])
    return np.ascontiguousarray(w.reshape(group, w.shape[0] // group, -1).astype(dtype))


def conv_core(x, wmat, w_shape, group: int, strides, dilations, pads, shift=None, dtype=np.float32):
    """Cross-correlation of ``x - shift`` (N, C, *S; padding counts as ``shift``, i.e. 0 after
    the shift) with weights prepared by :func:`conv_weights` from a ``w_shape`` tensor; computed
    in ``dtype``, returns (N, M, *out)."""
    kernel = tuple(w_shape[2:])
    nd = len(kernel)
    n, c = x.shape[:2]
    m = w_shape[0]
    out = conv_out_shape(x.shape, kernel, strides, dilations, pads)
    if isinstance(wmat, DepthwiseWeights):  # depthwise: y = sum over taps of x_tap * w_tap
        if nd == 2:
            return _depthwise_2d(x, wmat, kernel, strides, dilations, pads, out, shift, dtype)
        xp = _padded_shifted(x, pads, shift, dtype)
        y = np.empty((n, c) + out, dtype)
        tmp = np.empty_like(y)
        for k, (tap, view) in enumerate(_tap_views(xp, kernel, strides, dilations, out)):
            if k == 0:
                np.multiply(view, wmat[0], out=y)
            else:
                np.multiply(view, wmat[k], out=tmp)
                y += tmp
        return y
    p = math.prod(out)
    if all(k == 1 for k in kernel) and not any(pads) and all(s == 1 for s in strides):
        cols = _shift(x, shift, dtype).reshape(n, c, p)
    else:
        if any(pads):  # pad in x's own type with the value that the shift turns into 0
            fill = 0 if shift is None else shift
            shape = (n, c) + tuple(x.shape[2 + i] + pads[i] + pads[i + nd] for i in range(nd))
            xp = np.full(shape, fill, x.dtype)
            xp[(slice(None), slice(None)) + tuple(slice(pads[i], pads[i] + x.shape[2 + i]) for i in range(nd))] = x
        else:
            xp = x
        win = _windows(xp, kernel, strides, dilations)  # N, C, *out, *K
        win = win.transpose((0, 1) + tuple(range(2 + nd, 2 + 2 * nd)) + tuple(range(2, 2 + nd)))
        cols = np.empty(win.shape, dtype)
        if shift is None:
            np.copyto(cols, win, casting="unsafe")
        else:
            np.subtract(win, shift, out=cols, dtype=dtype, casting="unsafe")
        cols = cols.reshape(n, c * math.prod(kernel), p)
    if group == 1:
        y = np.matmul(wmat[0], cols)
    else:
        y = np.matmul(wmat, cols.reshape(n, group, -1, p))
    return y.reshape((n, m) + out)


#: Elements of one depthwise work chunk (a few images): small enough to stay in L2.
_DW_CHUNK = 1 << 16


def _depthwise_2d(x, wtaps, kernel, strides, dilations, pads, out, shift, dtype):
    """2-D depthwise conv on flattened images. The padded input is split into its stride phases
    (phase (a, b) holds rows a, a+s_h, … and columns b, b+s_w, …; one phase when the stride is
    1), each of shape (Hq, Wq). Output pixel (h, w) of tap (i, j) then reads phase
    ((i·d_h) mod s_h, (j·d_w) mod s_w) at (h + i·d_h div s_h, w + j·d_w div s_w): a constant
    offset in the flattened phase. So every tap is one contiguous multiply-add over a whole chunk
    of images, with the weight repeated per channel (a weight map); positions with w ≥ Wout or
    h ≥ Hout are computed as garbage and dropped, and no valid position reads past its image."""
    n, c = x.shape[:2]
    (sh, sw), (dh, dw) = strides, dilations
    hp, wp = x.shape[2] + pads[0] + pads[2], x.shape[3] + pads[1] + pads[3]
    hq, wq = -(-hp // sh), -(-wp // sw)
    xp = np.zeros((n, c, hq * sh, wq * sw), dtype)
    inner = (slice(None), slice(None), slice(pads[0], pads[0] + x.shape[2]), slice(pads[1], pads[1] + x.shape[3]))
    if shift is None:
        xp[inner] = x
    else:
        np.subtract(x, shift, out=xp[inner], dtype=dtype, casting="unsafe")
    if sh * sw > 1:
        phases = np.ascontiguousarray(xp.reshape(n, c, hq, sh, wq, sw).transpose(3, 5, 0, 1, 2, 4))
    else:
        phases = xp.reshape(1, 1, n, c, hq, wq)
    taps = [((i * dh) % sh, (j * dw) % sw, (i * dh) // sh * wq + (j * dw) // sw)
            for i in range(kernel[0]) for j in range(kernel[1])]
    image = c * hq * wq
    per = max(1, min(n, _DW_CHUNK // image))
    omax = max(t[2] for t in taps)
    maps = wtaps.weight_maps(per, hq * wq)
    y = np.empty((n, c, hq, wq), dtype)
    yf = y.reshape(-1)
    tmp = np.empty(per * image, dtype)
    flat = phases.reshape(sh, sw, -1)
    for start in range(0, n * image, per * image):
        t = min(per * image, n * image - start) - omax
        dst, scratch = yf[start:start + t], tmp[:t]
        for k, (a, b, o) in enumerate(taps):
            src = flat[a, b, start + o:start + o + t]
            if k == 0:
                np.multiply(src, maps[k][:t], out=dst)
            else:
                np.multiply(src, maps[k][:t], out=scratch)
                dst += scratch
    return np.ascontiguousarray(y[:, :, :out[0], :out[1]])


@register("Conv")
def conv(ctx, x, w, b=None):
    """Float convolution (groups, pads, strides, dilations, auto_pad), computed in x's dtype."""
    strides, dilations, pads = conv_geometry(ctx, x.shape, w.shape)
    group = ctx.attr("group", 1)
    wmat = ctx.once(("w", x.dtype), lambda: conv_weights(w, group, x.dtype), 1)
    y = conv_core(x, wmat, w.shape, group, strides, dilations, pads, dtype=x.dtype)
    if b is not None:
        y += b.reshape((1, -1) + (1,) * (y.ndim - 2)).astype(y.dtype)
    return y


@register("ConvTranspose")
def conv_transpose(ctx, x, w, b=None):
    """Transposed convolution by scattering one tap at a time (pads, output_padding,
    output_shape, auto_pad, groups, dilations)."""
    nd = x.ndim - 2
    n, c = x.shape[:2]
    group = ctx.attr("group", 1)
    kernel = list(ctx.attr("kernel_shape", w.shape[2:]))
    strides = list(ctx.attr("strides", [1] * nd))
    dil = list(ctx.attr("dilations", [1] * nd))
    opad = list(ctx.attr("output_padding", [0] * nd))
    m = w.shape[1] * group
    in_sp = x.shape[2:]
    full = [strides[i] * (in_sp[i] - 1) + opad[i] + (kernel[i] - 1) * dil[i] + 1 for i in range(nd)]
    out_shape = ctx.attr("output_shape")
    auto = ctx.attr("auto_pad", "NOTSET")
    if out_shape is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        target = list(out_shape)[-nd:] if out_shape is not None else [in_sp[i] * strides[i] for i in range(nd)]
        total = [full[i] - target[i] for i in range(nd)]
        if auto == "SAME_UPPER":
            pb = [t // 2 for t in total]
        else:
            pb = [t - t // 2 for t in total]
        pads = pb + [total[i] - pb[i] for i in range(nd)]
    elif auto == "VALID":
        pads = [0] * 2 * nd
    else:
        pads = list(ctx.attr("pads", [0] * 2 * nd))
    cg, mg = c // group, m // group
    y = np.zeros((n, m) + tuple(full), dtype=x.dtype)
    for g in range(group):
        xg = x[:, g * cg:(g + 1) * cg]
        wg = w[g * cg:(g + 1) * cg].astype(x.dtype)
        for tap in itertools.product(*(range(k) for k in kernel)):
            contrib = np.einsum("nc...,cm->nm...", xg, wg[(slice(None), slice(None)) + tap])
            sl = tuple(slice(tap[i] * dil[i], tap[i] * dil[i] + strides[i] * (in_sp[i] - 1) + 1, strides[i])
                       for i in range(nd))
            y[(slice(None), slice(g * mg, (g + 1) * mg)) + sl] += contrib
    if any(v < 0 for v in pads):  # a larger output_shape than the scatter covers: zeros
        y = np.pad(y, [(0, 0), (0, 0)] + [(max(0, -pads[i]), max(0, -pads[i + nd])) for i in range(nd)])
        full = list(y.shape[2:])
        pads = [max(0, v) for v in pads]
    crop = tuple(slice(pads[i], full[i] - pads[i + nd]) for i in range(nd))
    y = np.ascontiguousarray(y[(slice(None), slice(None)) + crop])
    if b is not None:
        y += b.reshape((1, -1) + (1,) * nd).astype(y.dtype)
    return y


# --------------------------------------------------------------------------- pooling
def _pool_setup(ctx, x):
    nd = x.ndim - 2
    kernel = list(ctx.attr("kernel_shape"))
    strides = list(ctx.attr("strides", [1] * nd))
    dil = list(ctx.attr("dilations", [1] * nd))
    ceil_mode = ctx.attr("ceil_mode", 0)
    auto = ctx.attr("auto_pad", "NOTSET")
    in_sp = x.shape[2:]
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = conv_pads(ctx, in_sp, kernel, strides, dil)
        outs = [-(-in_sp[i] // strides[i]) for i in range(nd)]
    else:
        pads = [0] * 2 * nd if auto == "VALID" else list(ctx.attr("pads", [0] * 2 * nd))
        outs = []
        for i in range(nd):
            eff = (kernel[i] - 1) * dil[i] + 1
            num = in_sp[i] + pads[i] + pads[i + nd] - eff
            o = (-(-num // strides[i]) if ceil_mode else num // strides[i]) + 1
            if ceil_mode and (o - 1) * strides[i] >= in_sp[i] + pads[i]:
                o -= 1
            outs.append(o)
    extra = [max(0, (outs[i] - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1
                 - (in_sp[i] + pads[i] + pads[i + nd])) for i in range(nd)]
    return kernel, strides, dil, pads, extra, outs


def _pooled(a, kernel, strides, dil, pads, extra, outs, fill):
    nd = len(kernel)
    width = [(0, 0)] * (a.ndim - nd) + [(pads[i], pads[i + nd] + extra[i]) for i in range(nd)]
    a = np.pad(a, width, constant_values=fill)
    win = _windows(a if a.ndim >= 2 + nd else a[None, None], kernel, strides, dil)
    sl = (Ellipsis,) + tuple(slice(0, o) for o in outs) + (slice(None),) * nd
    return win[sl]


@register("MaxPool")
def max_pool(ctx, x):
    """Max over windows; padding never wins. The Indices output is not supported."""
    if len(ctx.node.output) > 1 and ctx.node.output[1]:
        raise ctx.error("the Indices output is not supported")
    kernel, strides, dil, pads, extra, outs = _pool_setup(ctx, x)
    fill = -np.inf if np.issubdtype(x.dtype, np.floating) else np.iinfo(x.dtype).min
    win = _pooled(x, kernel, strides, dil, pads, extra, outs, fill)
    nd = len(kernel)
    return win.max(axis=tuple(range(-nd, 0))).astype(x.dtype)


@register("AveragePool")
def average_pool(ctx, x):
    """Mean over windows; count_include_pad=1 divides by the kernel size."""
    kernel, strides, dil, pads, extra, outs = _pool_setup(ctx, x)
    nd = len(kernel)
    axes = tuple(range(-nd, 0))
    s = _pooled(x.astype(np.float64), kernel, strides, dil, pads, extra, outs, 0.0).sum(axis=axes)
    ones = np.ones(x.shape[2:])
    if ctx.attr("count_include_pad", 0):
        cnt = np.float64(np.prod(kernel))  # every tap counts, ceil_mode overhang included (ONNX reference)
    else:
        cnt = _pooled(ones[None, None], kernel, strides, dil, pads, extra, outs, 0.0).sum(axis=axes)
    return (s / cnt).astype(x.dtype)


@register("GlobalAveragePool")
def global_average_pool(ctx, x):
    axes = tuple(range(2, x.ndim))
    return x.astype(np.float64).mean(axis=axes, keepdims=True).astype(x.dtype)


@register("GlobalMaxPool")
def global_max_pool(ctx, x):
    return x.max(axis=tuple(range(2, x.ndim)), keepdims=True)


# --------------------------------------------------------------------------- dense
@register("MatMul")
def matmul(ctx, a, b):
    return np.matmul(a, b)


@register("Gemm")
def gemm(ctx, a, b, c=None):
    """alpha · A' B' + beta · C with optional transposes."""
    if ctx.attr("transA", 0):
        a = a.T
    if ctx.attr("transB", 0):
        b = b.T
    y = np.matmul(a, b)
    alpha, beta = ctx.attr("alpha", 1.0), ctx.attr("beta", 1.0)
    if alpha != 1.0:
        y = y * np.asarray(alpha, dtype=y.dtype)
    if c is not None:
        y = y + (c if beta == 1.0 else c * np.asarray(beta, dtype=c.dtype))
    return y.astype(a.dtype)


@register("BatchNormalization")
def batch_normalization(ctx, x, scale, bias, mean, var):
    """Inference form: (x - mean) / sqrt(var + eps) * scale + bias, per channel (axis 1)."""
    if ctx.attr("training_mode", 0):
        raise ctx.error("training_mode=1 is not supported (inference only)")
    shp = (1, -1) + (1,) * (x.ndim - 2)
    eps = ctx.attr("epsilon", 1e-5)
    inv = (scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)).reshape(shp)
    y = (x - mean.reshape(shp)) * inv + bias.reshape(shp)
    return y.astype(x.dtype)


# --------------------------------------------------------------------------- resize
_COORD = {
    "half_pixel": lambda o, s, i, n: (o + 0.5) / s - 0.5,
    "pytorch_half_pixel": lambda o, s, i, n: (o + 0.5) / s - 0.5 if n > 1 else np.zeros_like(o),
    "asymmetric": lambda o, s, i, n: o / s,
    "align_corners": lambda o, s, i, n: o * (i - 1) / (n - 1) if n > 1 else np.zeros_like(o),
    "tf_half_pixel_for_nn": lambda o, s, i, n: (o + 0.5) / s,
}
_NEAREST = {
    "round_prefer_floor": lambda v: np.where(v - np.floor(v) == 0.5, np.floor(v), np.round(v)),
    "round_prefer_ceil": lambda v: np.where(v - np.floor(v) == 0.5, np.ceil(v), np.round(v)),
    "floor": np.floor,
    "ceil": np.ceil,
}


@register("Resize")
def resize(ctx, x, roi=None, scales=None, sizes=None):
    """Nearest-neighbour resize (all coordinate transformation and nearest modes except
    tf_crop_and_resize and half_pixel_symmetric); linear/cubic are not supported."""
    if ctx.opset < 11:
        scales, roi = roi, None
    mode = ctx.attr("mode", "nearest")
    if mode != "nearest":
        raise ctx.error(f"mode={mode!r} is not supported (nearest only)")
    ctm = ctx.attr("coordinate_transformation_mode", "half_pixel" if ctx.opset >= 11 else "asymmetric")
    nm = ctx.attr("nearest_mode", "round_prefer_floor" if ctx.opset >= 11 else "floor")
    if ctm not in _COORD or nm not in _NEAREST:
        raise ctx.error(f"coordinate_transformation_mode={ctm!r} / nearest_mode={nm!r} not supported")
    axes = ctx.attr("axes")
    axes = list(range(x.ndim)) if axes is None else [a % x.ndim for a in axes]
    policy = ctx.attr("keep_aspect_ratio_policy", "stretch")
    if sizes is not None and sizes.size:
        sz = [int(v) for v in sizes.reshape(-1)]
        if policy != "stretch":
            ratios = [sz[i] / x.shape[a] for i, a in enumerate(axes)]
            r = min(ratios) if policy == "not_larger" else max(ratios)
            sz = [int(math.floor(r * x.shape[a] + 0.5)) for a in axes]
            sc = [r] * len(axes)
        else:
            sc = [sz[i] / x.shape[a] for i, a in enumerate(axes)]
    else:
        sc = [float(v) for v in scales.reshape(-1)]
        sz = [int(math.floor(x.shape[a] * sc[i])) for i, a in enumerate(axes)]
    y = x
    for i, a in enumerate(axes):
        n_in, n_out = x.shape[a], sz[i]
        o = np.arange(n_out, dtype=np.float64)
        src = _COORD[ctm](o, sc[i], n_in, n_out)
        idx = np.clip(_NEAREST[nm](src), 0, n_in - 1).astype(np.int64)
        y = np.take(y, idx, axis=a)
    return y
