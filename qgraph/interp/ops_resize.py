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

Bilinear resizing of the last two axes (what every 2-D upsampler exports) repeats ORT's
float32 expression and is bit-exact. Other interpolations (cubic, trilinear, antialias) are
accumulated in float64 and rounded once, where ORT sums weighted float32 products: they agree
to about one float32 ulp of the output range. Integer inputs are truncated toward zero, as ORT's
``static_cast<T>``.
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
    tables = {}
    for i, (axis, n_out, scale) in enumerate(geometry):
        if n_out == x.shape[axis] and scale == 1 and roi_v is None:
            continue
        r = (0.0, 1.0) if roi_v is None else (roi_v[i], roi_v[i + len(axes)])
        tables[axis] = axis_table(ctx, mode, x.shape[axis], n_out, float(scale), r)
    if not tables:
        return x.copy()
    antialias = ctx.attr("antialias", 0) and any(s < 1 for _, _, s in geometry)
    if mode == "linear" and not antialias and x.ndim >= 2 and min(tables) >= x.ndim - 2:
        for axis in (x.ndim - 2, x.ndim - 1):
            if axis not in tables:
                tables[axis] = axis_table(ctx, mode, x.shape[axis], x.shape[axis], 1.0)
        y = _bilinear(x, tables[x.ndim - 2], tables[x.ndim - 1], fill)
    else:
        y = x
        for axis, (idx, w, outside) in tables.items():
            y = _resample_axis(y, axis, idx, w, outside, fill)
    if integer and y.dtype != x.dtype:  # ORT: static_cast<T>(float), i.e. truncation
        info = np.iinfo(x.dtype)
        return np.clip(np.trunc(y), info.min, info.max).astype(x.dtype)
    return y.astype(x.dtype)


def _bilinear(x, rows, cols, fill):
    """ORT's UpsampleBilinear over the last two axes, operation for operation:
    ``dx2·dy2·X11 + dx1·dy2·X21 + dx2·dy1·X12 + dx1·dy1·X22`` in float32 (float64 for double input),
    so float outputs are bit-exact; tf_crop_and_resize positions outside the input get ``fill``."""
    dt = np.float64 if x.dtype == np.float64 else F32
    (ri, rw, ro), (ci, cw, co) = rows, cols
    dy2, dy1 = (rw[:, k].astype(dt)[:, None] for k in (0, 1))
    dx2, dx1 = (cw[:, k].astype(dt)[None, :] for k in (0, 1))
    xf = x.astype(dt, copy=False)

    def at(r, c):
        return xf[..., ri[:, r][:, None], ci[:, c][None, :]]
    y = (dx2 * dy2) * at(0, 0) + (dx1 * dy2) * at(0, 1) + (dx2 * dy1) * at(1, 0) + (dx1 * dy1) * at(1, 1)
    outside = None
    if ro is not None:
        outside = ro[:, None] | np.zeros((1, len(ci)), bool)
    if co is not None:
        outside = (co[None, :] | np.zeros((len(ri), 1), bool)) if outside is None else outside | co[None, :]
    if outside is not None and outside.any():
        y = np.where(outside, dt(fill), y)
    return y


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


# --------------------------------------------------------------------------- GridSample
def _grid_denormalize(n, length: int, align_corners: bool):
    """Normalized [-1, 1] grid coordinates to pixel coordinates, in float32 as ORT's GsDenormalize."""
    one, two = F32(1), F32(2)
    if align_corners:
        return (n + one) / two * F32(length - 1)
    return ((n + one) * F32(length) - one) / two


def _grid_reflect(c, lo: F32, hi: F32):
    """ORT's GsReflect on integer pixel coordinates (as float32) between the borders ``lo``/``hi``."""
    rng = hi - lo
    fx = c.astype(F32)
    below, above = fx < lo, fx > hi
    d = np.where(below, lo - fx, np.where(above, fx - hi, F32(0)))
    k = np.trunc(d / rng)
    r = d - k * rng
    even = (k.astype(np.int64) % 2) == 0
    out = np.where(below, np.where(even, lo + r, hi - r), np.where(above, np.where(even, hi - r, lo + r), fx))
    return np.trunc(out).astype(np.int64)


class _GridPixels:
    """Fetches input pixels at integer coordinates per ORT's PixelAtGrid: zeros (0 outside),
    border (clamped) or reflection (reflected between the pixel-edge or pixel-centre borders)."""

    def __init__(self, x, padding: str, align_corners: bool):
        self.n, self.c = x.shape[:2]
        self.spatial = x.shape[2:]
        self.flat = x.reshape(self.n, self.c, -1)
        self.padding = padding
        half = F32(0) if align_corners else F32(0.5)
        self.borders = [(F32(0) - half, F32(s - 1) + half) for s in self.spatial]

    def __call__(self, coords):
        """coords: one (N, P) int64 array per spatial axis (slowest first) -> (N, C, P) values."""
        valid = np.ones(coords[0].shape, bool)
        fixed = []
        for c, size, (lo, hi) in zip(coords, self.spatial, self.borders):
            if self.padding == "zeros":
                valid &= (c >= 0) & (c < size)
                c = np.clip(c, 0, size - 1)
            elif self.padding == "border":
                c = np.clip(c, 0, size - 1)
            else:
                c = np.clip(_grid_reflect(c, lo, hi), 0, size - 1)
            fixed.append(c)
        flat_idx = np.ravel_multi_index(tuple(fixed), self.spatial)
        vals = np.take_along_axis(self.flat, flat_idx[:, None, :], axis=2)
        if self.padding == "zeros":
            vals = np.where(valid[:, None, :], vals, np.zeros((), vals.dtype))
        return vals


def _grid_cubic_coeffs(t):
    """ORT's GsGetCubicCoeffs (Keys, alpha = -0.75) in float32 for offsets t (N, P) in [0, 1):
    (4, N, 1, P), one row per tap at -1, 0, 1, 2."""
    return _cubic_coeffs(t.reshape(-1), -0.75).T.reshape((4, t.shape[0], 1, t.shape[1]))


@register("GridSample")
def grid_sample(ctx, x, grid):
    """Samples x (N, C, *in) at the normalized grid (N, *out, nd) points, as ORT 1.19
    (tensor/grid_sample.cc): modes nearest (round half to even), (bi)linear, (bi)cubic (2-D only);
    padding zeros / border / reflection applied to the integer neighbour coordinates;
    align_corners. float32 arithmetic in ORT's order."""
    nd = x.ndim - 2
    if grid.shape[-1] != nd or grid.shape[0] != x.shape[0] or nd not in (2, 3):
        raise ctx.error(f"grid {grid.shape} does not fit input {x.shape} (2-D or 3-D sampling)")
    mode = ctx.attr("mode", "bilinear" if ctx.opset < 20 else "linear")
    mode = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
    padding = ctx.attr("padding_mode", "zeros")
    if mode not in ("nearest", "linear", "cubic") or padding not in ("zeros", "border", "reflection"):
        raise ctx.error(f"mode={mode!r} / padding_mode={padding!r} is not supported")
    if mode == "cubic" and nd != 2:
        raise ctx.error("cubic mode is 2-D only (as in ORT)")
    if x.dtype != F32:
        raise ctx.error(f"input type {x.dtype} is not supported (float32)")
    align = bool(ctx.attr("align_corners", 0))
    n = x.shape[0]
    out_shape = grid.shape[1:-1]
    g = grid.astype(F32).reshape(n, -1, nd)
    # grid's last axis is (x, y[, z]): the fastest spatial axis first
    pos = [_grid_denormalize(g[..., nd - 1 - a], x.shape[2 + a], align) for a in range(nd)]
    pixels = _GridPixels(x, padding, align)
    if mode == "nearest":
        y = pixels([np.rint(p).astype(np.int64) for p in pos])
    elif mode == "linear":
        lo = [np.floor(p).astype(np.int64) for p in pos]
        w_hi = [p - lo_i.astype(F32) for p, lo_i in zip(pos, lo)]            # d1 = x - x1
        w_lo = [(lo_i + 1).astype(F32) - p for p, lo_i in zip(pos, lo)]      # d2 = x2 - x

        def blend(axis, base):
            """Interpolate along ``axis`` given the corner offsets fixed for the slower axes."""
            if axis == nd:
                return pixels([lo[a] + base[a] for a in range(nd)])
            v0 = blend(axis + 1, base + [0])
            v1 = blend(axis + 1, base + [1])
            return w_lo[axis][:, None, :] * v0 + w_hi[axis][:, None, :] * v1
        # ORT: dy2·(dx2·p11 + dx1·p12) + dy1·(dx2·p21 + dx1·p22), slowest axis outermost
        y = blend(0, [])
    else:
        y0 = np.floor(pos[0]).astype(np.int64) - 1
        x0 = np.floor(pos[1]).astype(np.int64) - 1
        cx = _grid_cubic_coeffs(pos[1] - (x0 + 1).astype(F32))
        cy = _grid_cubic_coeffs(pos[0] - (y0 + 1).astype(F32))
        rows = []
        for i in range(4):
            acc = None
            for j in range(4):
                term = cx[j] * pixels([y0 + i, x0 + j])
                acc = term if acc is None else acc + term
            rows.append(acc)
        y = cy[0] * rows[0] + cy[1] * rows[1] + cy[2] * rows[2] + cy[3] * rows[3]
    return y.reshape((n, x.shape[1]) + out_shape).astype(F32)


@register("AffineGrid")
def affine_grid(ctx, theta, size):
    """The sampling grid of affine matrices theta (N, 2, 3) or (N, 3, 4) over an output of
    ``size`` (N, C, H, W[, D]): normalized base coordinates in [-1, 1] (pixel centres, or corners
    with align_corners), with the last axis (x, y[, z]) — GridSample's input layout."""
    dims = [int(v) for v in np.asarray(size).reshape(-1)]
    spatial = dims[2:]
    nd = len(spatial)
    if theta.shape[1:] != (nd, nd + 1):
        raise ctx.error(f"theta {theta.shape} does not fit a {nd}-D size {dims}")
    align = bool(ctx.attr("align_corners", 0))

    def base(n):
        if align:
            return np.linspace(-1, 1, n) if n > 1 else np.zeros(1)
        return (np.arange(n) * 2 + 1) / n - 1
    axes = np.meshgrid(*[base(s) for s in spatial], indexing="ij")      # slowest axis first
    coords = np.stack(list(axes[::-1]) + [np.ones_like(axes[0])], axis=-1)   # (..., x, y[, z], 1)
    grid = np.einsum("...k,njk->n...j", coords.astype(np.float64), theta.astype(np.float64))
    return grid.astype(theta.dtype)
