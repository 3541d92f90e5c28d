"""Convolution, pooling, GEMM and normalization kernels (ONNX domain), plus the shared
im2col convolution core that the integer kernels reuse.

Conv is im2col through ``sliding_window_view`` (channels-last, so each im2col row copies runs
of contiguous channels) and one batched matmul over the groups; depthwise convs are a short
loop over kernel taps instead, vectorized over everything else. Integer callers pass
zero-point-shifted float operands: float32 when every partial sum is provably below 2^24,
float64 otherwise (below 2^53 for any 8-bit conv), so BLAS computes the integers exactly.
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


def conv_core(x, w, group: int, strides, dilations, pads, channels_last_out: bool = False):
    """Cross-correlation of x (N, C, *S) with w (M, C/group, *K); operands already carry their
    zero points subtracted, padding is with zeros. Works channels-last inside (im2col rows
    with C innermost copy fast); returns (N, M, *out), or (N, *out, M) if ``channels_last_out``."""
    nd = w.ndim - 2
    n, c = x.shape[:2]
    m, cg = w.shape[:2]
    kernel = tuple(w.shape[2:])
    xh = np.moveaxis(x, 1, -1)
    if any(pads):
        xh = np.pad(xh, [(0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)] + [(0, 0)])
    ext = [(kernel[i] - 1) * dilations[i] + 1 for i in range(nd)]
    win = sliding_window_view(xh, ext, axis=tuple(range(1, 1 + nd)))  # N, *O_full, C, *ext
    win = win[(slice(None),) + tuple(slice(None, None, s) for s in strides) + (slice(None),)
              + tuple(slice(None, None, d) for d in dilations)]
    out = win.shape[1:1 + nd]
    mg = m // group
    if cg == 1 and mg == 1 and group == c:  # depthwise: one multiply-add per kernel tap
        y = np.zeros((n,) + out + (c,), dtype=x.dtype)
        wk = np.moveaxis(w.reshape((c,) + kernel), 0, -1)  # *K, C
        lead = (slice(None),) * (1 + nd + 1)
        for tap in itertools.product(*(range(k) for k in kernel)):
            y += win[lead + tap] * wk[tap]
    else:
        p = int(np.prod(out))
        kk = int(np.prod(kernel))
        if kk == 1 and group == 1:
            cols = win.reshape(1, n * p, c)
        else:
            cols = win.reshape((n,) + out + (group, cg) + kernel)
            perm = (1 + nd, 0) + tuple(range(1, 1 + nd)) + tuple(range(3 + nd, 3 + 2 * nd)) + (2 + nd,)
            cols = cols.transpose(perm).reshape(group, n * p, kk * cg)
        wm = w.reshape((group, mg, cg) + kernel)
        wm = wm.transpose((0,) + tuple(range(3, 3 + nd)) + (2, 1)).reshape(group, kk * cg, mg)
        y = np.matmul(cols, wm)  # (G, N*P, Mg)
        if group == 1:
            y = y.reshape((n,) + out + (m,))
        else:
            y = np.moveaxis(y.reshape((group, n * p, mg)), 0, 1).reshape((n,) + out + (m,))
    if channels_last_out:
        return y
    return np.ascontiguousarray(np.moveaxis(y, -1, 1))


@register("Conv")
def conv(ctx, x, w, b=None):
    """Float convolution (groups, pads, strides, dilations, auto_pad), computed in x's dtype."""
    strides, dilations, pads = conv_geometry(ctx, x.shape, w.shape)
    y = conv_core(x, w.astype(x.dtype), ctx.attr("group", 1), strides, dilations, pads)
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
