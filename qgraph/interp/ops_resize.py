"""Resize (opset 10-19) and Upsample (opset 7-9), as ORT 1.19's CPU kernel computes them.

Resizing is separable: each resized axis gets a table of source indices and weights per output
position (one tap for nearest, two for linear, four for cubic, a scale-dependent footprint for
antialiased downsampling), and the axes are resampled one after the other by gathering and
weighting. The tables follow ORT (providers/cpu/tensor/upsamplebase.h, upsample.cc):

- scales are float32; the output length is ``floor(float32(scale · length))``; with ``sizes``
  the scale is ``float32(out) / float32(in)`` (``keep_aspect_ratio_policy`` then takes the min or
  max over ``axes`` and rounds the lengths half away from zero);
- the source coordinate of output position x is computed in float32 exactly as ORT does
  (``(x + 0.5) / scale - 0.5`` for half_pixel, …), so nearest-neighbour indices are ORT's, ties
  included (round_prefer_floor, round_prefer_ceil, floor, ceil; "simple" before opset 11);
- linear clamps the coordinate to [0, length-1] and weights the two neighbours by their float32
  distances; cubic uses ORT's float32 coefficients with ``cubic_coeff_a`` and ``exclude_outside``
  and clamps neighbour indices to the edge; tf_crop_and_resize writes ``extrapolation_value``
  for coordinates outside the input.

Interpolated values are accumulated in float64 and rounded once, where ORT sums weighted float32
products: float outputs agree to about one float32 ulp of the output range. 8-bit inputs are
rounded half away from zero and saturated.
"""

from __future__ import annotations

import math

import numpy as np

from qgraph.interp.registry import register

F32 = np.float32


def _coordinates(ctm, x, scale, n_in, n_out, roi_start, roi_end):
    """Float32 source coordinate of each output position ``x`` (float32 array)."""
    s, li, lo = F32(scale), F32(n_in), F32(n_out)
    half = F32(0.5)
    if ctm == "asymmetric":
        return x / s
    if ctm == "half_pixel":
        return (x + half) / s - half
    if ctm == "pytorch_half_pixel":
        return (x + half) / s - half if n_out > 1 else np.zeros_like(x)
    if ctm == "tf_half_pixel_for_nn":
        return (x + half) / s
    if ctm == "align_corners":
        return (x * (li - F32(1))) / (lo - F32(1)) if n_out > 1 else np.zeros_like(x)
    if ctm == "tf_crop_and_resize":
        rs, re = F32(roi_start), F32(roi_end)
        if n_out > 1:
            return rs * (li - F32(1)) + (x * (re - rs) * (li - F32(1))) / (lo - F32(1))
        return np.full_like(x, F32(0.5 * (float(rs) + float(re)) * (float(li) - 1)))
    if ctm == "half_pixel_symmetric":
        adjustment = lo / (s * li)
        offset = (li / F32(2)) * (F32(1) - adjustment)
        return (float(offset) + (x.astype(np.float64) + 0.5) / float(s) - 0.5).astype(F32)
    raise ValueError(ctm)


def _round_half_away(v):
    v = v.astype(np.float64)
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def _nearest_index(mode, orig, downsample: bool):
    if mode == "round_prefer_floor":
        half = orig.astype(np.float64) == np.trunc(orig.astype(np.float64)) + 0.5
        return np.where(half, np.floor(orig), _round_half_away(orig))
    if mode == "round_prefer_ceil":
        return _round_half_away(orig)
    if mode == "floor":
        return np.floor(orig)
    if mode == "ceil":
        return np.ceil(orig)
    if mode == "simple":  # Resize-10 / Upsample: ceil when downsampling, else truncate
        return np.ceil(orig) if downsample else np.trunc(orig)
    raise ValueError(mode)


def _cubic_coeffs(s, a):
    """ORT's GetCubicCoeffs in float32 for distances ``s`` in [0, 1): taps at -1, 0, 1, 2."""
    a = F32(a)
    s = np.abs(s)
    one, two = F32(1), F32(2)
    c0 = ((a * (s + one) - F32(5) * a) * (s + one) + F32(8) * a) * (s + one) - F32(4) * a
    c1 = ((a + two) * s - (a + F32(3))) * s * s + one
    c2 = ((a + two) * (one - s) - (a + F32(3))) * (one - s) * (one - s) + one
    c3 = ((a * (two - s) - F32(5) * a) * (two - s) + F32(8) * a) * (two - s) - F32(4) * a
    return np.stack([c0, c1, c2, c3], axis=1)


def _antialias_weights(mode, ratio, scale, a):
    """The ONNX reference's antialiased filters (the triangle or cubic kernel stretched by
    1/scale when downsampling), normalized; taps at ``start … start + k - 1`` from the base."""
    sc = min(scale, 1.0)
    if mode == "linear":
        start = int(math.floor(-1 / sc) + 1)
        k = 2 - 2 * start
        args = (np.arange(start, start + k)[None, :] - ratio[:, None]) * sc
        w = np.clip(1 - np.abs(args), 0, 1)
    else:
        start = int(math.floor(-2 / sc) + 1)
        k = 2 - 2 * start
        t = np.abs((np.arange(start, start + k)[None, :] - ratio[:, None]) * sc)
        w = np.where(t <= 1, (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1,
                     np.where(t < 2, a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a, 0.0))
    return start, w


def axis_table(ctx, mode, n_in, n_out, scale, roi=(0.0, 1.0)):
    """(indices (n_out, k) into the input axis, weights (n_out, k) float64, outside mask or None)."""
    ctm = ctx.attr("coordinate_transformation_mode", "half_pixel") if ctx.opset >= 11 else "asymmetric"
    x = np.arange(n_out, dtype=F32)
    orig = _coordinates(ctm, x, scale, n_in, n_out, *roi)
    extrapolate = ctm == "tf_crop_and_resize"
    outside = ((orig < 0) | (orig > F32(n_in - 1))) if extrapolate else None
    if mode == "nearest":
        nm = ctx.attr("nearest_mode", "round_prefer_floor") if ctx.opset >= 11 else "simple"
        idx = _nearest_index(nm, orig, scale < 1).astype(np.int64)
        return np.clip(idx, 0, n_in - 1)[:, None], np.ones((n_out, 1)), outside
    antialias = ctx.attr("antialias", 0) and scale < 1
    a = ctx.attr("cubic_coeff_a", -0.75)
    if antialias:
        o64 = orig.astype(np.float64)
        base = np.ceil(o64).astype(np.int64) - 1  # the reference prefers the left pixel: ratio in (0, 1]
        start, w = _antialias_weights(mode, o64 - base, float(scale), a)
        idx = base[:, None] + np.arange(start, start + w.shape[1])[None, :]
    elif mode == "linear":
        c = np.clip(orig, F32(0), F32(n_in - 1)) if not extrapolate else orig
        x1 = np.minimum(np.trunc(c).astype(np.int64), n_in - 1)
        x2 = np.minimum(x1 + 1, n_in - 1)
        d1 = np.abs(c - x1.astype(F32))
        d2 = np.abs(c - x2.astype(F32))
        same = x1 == x2
        d1, d2 = np.where(same, F32(0.5), d1), np.where(same, F32(0.5), d2)
        return np.clip(np.stack([x1, x2], 1), 0, n_in - 1), np.stack([d2, d1], 1).astype(np.float64), outside
    else:  # cubic
        base = np.floor(orig)
        w = _cubic_coeffs(orig - base, a).astype(np.float64)
        idx = base.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :]
    if ctx.attr("exclude_outside", 0):
        w = np.where((idx < 0) | (idx >= n_in), 0.0, w)
        w = w / w.sum(axis=1, keepdims=True)
    elif antialias:
        w = w / w.sum(axis=1, keepdims=True)
    return np.clip(idx, 0, n_in - 1), w, outside


def _resample_axis(x, axis, idx, w, outside, fill):
    """Gather along ``axis`` with the per-output taps ``idx``/``w`` (float64 accumulation for
    more than one tap); positions in ``outside`` get ``fill``."""
    if idx.shape[1] == 1:
        y = np.take(x, idx[:, 0], axis=axis)
    else:
        shape = [1] * x.ndim
        shape[axis] = -1
        y = None
        for j in range(idx.shape[1]):
            term = np.take(x, idx[:, j], axis=axis).astype(np.float64)
            term *= w[:, j].reshape(shape)
            y = term if y is None else y + term
    if outside is not None and outside.any():
        shape = [1] * x.ndim
        shape[axis] = -1
        y = np.where(outside.reshape(shape), fill, y)
    return y


def _output_geometry(ctx, x, scales, sizes, axes):
    """Per resized axis: (axis, out length, float32 scale)."""
    rank = x.ndim
    if sizes is not None and np.asarray(sizes).size:
        sz = [int(v) for v in np.asarray(sizes).reshape(-1)]
        if len(sz) != len(axes):
            raise ctx.error(f"sizes has {len(sz)} entries for {len(axes)} axes")
        sc = [F32(1.0) if x.shape[a] == 0 else F32(s) / F32(x.shape[a]) for s, a in zip(sz, axes)]
        policy = ctx.attr("keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            if policy not in ("not_larger", "not_smaller"):
                raise ctx.error(f"keep_aspect_ratio_policy={policy!r} is not supported")
            s = min(sc) if policy == "not_larger" else max(sc)
            sc = [s] * len(axes)
            sz = [int(_round_half_away(np.asarray(F32(s) * F32(x.shape[a])))) for a in axes]
    elif scales is not None and np.asarray(scales).size:
        sc = [F32(v) for v in np.asarray(scales, F32).reshape(-1)]
        if len(sc) != len(axes):
            raise ctx.error(f"scales has {len(sc)} entries for {len(axes)} axes (rank {rank})")
        if any(s <= 0 for s in sc):
            raise ctx.error(f"scales {sc} must be positive")
        sz = [int(np.floor(F32(s) * F32(x.shape[a]))) for s, a in zip(sc, axes)]
    else:
        raise ctx.error("neither scales nor sizes is given")
    return list(zip(axes, sz, sc))


def _resize(ctx, x, roi, scales, sizes):
    mode = ctx.attr("mode", "nearest")
    if mode not in ("nearest", "linear", "cubic"):
        raise ctx.error(f"mode={mode!r} is not supported")
    ctm = ctx.attr("coordinate_transformation_mode", "half_pixel") if ctx.opset >= 11 else "asymmetric"
    axes = ctx.attr("axes") if ctx.opset >= 18 else None
    axes = list(range(x.ndim)) if axes is None else [a % x.ndim for a in axes]
    geometry = _output_geometry(ctx, x, scales, sizes, axes)
    roi_v = None
    if ctm == "tf_crop_and_resize":
        if roi is None or not np.asarray(roi).size:
            raise ctx.error("tf_crop_and_resize needs the roi input")
        roi_v = np.asarray(roi, np.float64).reshape(-1)
        if roi_v.size != 2 * len(axes):
            raise ctx.error(f"roi has {roi_v.size} entries; expected {2 * len(axes)}")
    fill = ctx.attr("extrapolation_value", 0.0)
    integer = np.issubdtype(x.dtype, np.integer)
    y = x
    for i, (axis, n_out, scale) in enumerate(geometry):
        n_in = x.shape[axis]
        if n_out == n_in and scale == 1 and roi_v is None:
            continue
        r = (0.0, 1.0) if roi_v is None else (roi_v[i], roi_v[i + len(axes)])
        idx, w, outside = axis_table(ctx, mode, n_in, n_out, float(scale), r)
        y = _resample_axis(y, axis, idx, w, outside, fill)
    if y is x:
        return x.copy()
    if integer and y.dtype != x.dtype:
        info = np.iinfo(x.dtype)
        return np.clip(_round_half_away(y), info.min, info.max).astype(x.dtype)
    return y.astype(x.dtype)


@register("Resize")
def resize(ctx, x, roi=None, scales=None, sizes=None):
    """ONNX Resize: nearest, linear, cubic; every coordinate transformation mode; scales or sizes;
    axes and keep_aspect_ratio_policy (opset 18); antialias (opset 18, linear and cubic
    downsampling, the ONNX reference's filter). Opset 10 takes (X, scales) with asymmetric
    coordinates and ORT's "simple" nearest rule."""
    if ctx.opset < 11:
        return _resize(ctx, x, None, roi, None)
    return _resize(ctx, x, roi, scales, sizes)


@register("Upsample")
def upsample(ctx, x, scales=None):
    """Deprecated Upsample (opset 7: ``scales`` attribute; 9: input) — Resize-10 semantics."""
    if scales is None:
        scales = np.asarray(ctx.attr("scales"), F32)
    mode = ctx.attr("mode", "nearest")
    if mode == "bilinear":
        mode = "linear"
    if mode not in ("nearest", "linear"):
        raise ctx.error(f"mode={mode!r} is not supported")
    ctx = _OverrideMode(ctx, mode)
    return _resize(ctx, x, None, scales, None)


class _OverrideMode:
    """A view of a NodeContext with a different ``mode`` attribute (Upsample's "bilinear")."""

    def __init__(self, ctx, mode):
        self._ctx, self._mode = ctx, mode

    def attr(self, name, default=None):
        return self._mode if name == "mode" else self._ctx.attr(name, default)

    def __getattr__(self, name):
        return getattr(self._ctx, name)
