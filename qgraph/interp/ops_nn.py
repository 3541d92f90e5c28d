"""Convolution, pooling, GEMM and normalization kernels (ONNX domain), plus the shared
convolution core that the integer kernels reuse.

Conv works in NCHW throughout, a chunk of images at a time (bias and requantization run on each
chunk while it is in cache): im2col gathers the (zero-point-shifted) windows of the padded input
into ``(N, C·K, P)`` with one strided copy — for stride 1 straight from the flattened padded rows,
computing Wp instead of Wo columns per row — and one batched matmul with the ``(M, C·K)`` weight
matrix yields ``(N, M, P)``, already NCHW. Depthwise convs run as one GEMM per channel with a
banded weight matrix over blocks of padded rows (per-tap multiply-adds when rows are too wide).
Integer callers pass zero-point-shifted float operands: float32 when every partial sum is provably
below 2^24, float64 otherwise (below 2^53 for any 8-bit conv), so BLAS computes the integers
exactly, in any summation order; extra zero products (banded matrices) do not change that bound.
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


def _shift(x, shift, dtype):
    if shift is None:
        return x if x.dtype == dtype else x.astype(dtype)
    return np.subtract(x, shift, dtype=dtype, casting="unsafe")


def conv_out_shape(x_shape, kernel, strides, dilations, pads):
    nd = len(kernel)
    return tuple((x_shape[2 + i] + pads[i] + pads[i + nd] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1
                 for i in range(nd))


def is_depthwise(w_shape, group: int) -> bool:
    return group > 1 and w_shape[1] == 1 and w_shape[0] == group


class DepthwiseWeights(list):
    """Per-tap weight columns ``(C, 1, …, 1)`` of a depthwise conv."""


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


#: Largest work buffer (elements) of one conv chunk: a few images whose columns, accumulator
#: and epilogue (bias, requantization) stay in L2 instead of streaming through memory per pass.
_CHUNK = 1 << 18


def conv_core(x, wmat, w_shape, group: int, strides, dilations, pads, shift=None, dtype=np.float32,
              epilogue=None, out_dtype=None):
    """Cross-correlation of ``x - shift`` (N, C, *S; padding counts as ``shift``, i.e. 0 after
    the shift) with weights prepared by :func:`conv_weights` from a ``w_shape`` tensor; computed
    in ``dtype`` over chunks of images, each chunk's (N_c, M, *out) result passed through
    ``epilogue`` (default: none) into the returned (N, M, *out) array of ``out_dtype``."""
    return conv_program(x.shape, wmat, w_shape, group, strides, dilations, pads, shift, dtype, epilogue,
                        out_dtype)(x)


def conv_program(x_shape, wmat, w_shape, group: int, strides, dilations, pads, shift=None, dtype=np.float32,
                 epilogue=None, out_dtype=None):
    """:func:`conv_core` for inputs of shape ``x_shape``, with the geometry, the method and the
    chunking decided once: returns ``run(x) -> y``. A kernel memoizes it per input shape, so a
    compiled plan pays the Python set-up once per node and batch size.

    ``epilogue`` must be elementwise per channel and return a fresh array: for 2-D convs it may
    also see some extra output positions (windows that straddle the padded row end, exact
    integer sums as bounded as the real ones) which are dropped after it."""
    kernel = tuple(int(k) for k in w_shape[2:])
    nd = len(kernel)
    n, c = x_shape[:2]
    m = w_shape[0]
    out = conv_out_shape(x_shape, kernel, strides, dilations, pads)
    y_shape, y_dtype = (n, m) + out, out_dtype or dtype
    epilogue = epilogue or (lambda acc: acc)
    fill = 0 if shift is None else shift
    if isinstance(wmat, DepthwiseWeights) and nd == 2:
        span = (kernel[0] - 1) * dilations[0] + 1
        if span * (x_shape[3] + pads[1] + pads[3]) <= _TOEPLITZ_MAX_K:
            return _depthwise_toeplitz_program(x_shape, wmat, kernel, strides, dilations, pads, out, shift, dtype,
                                               epilogue, y_dtype)
        if math.prod(kernel) >= _TILED_MIN_TAPS and _TOEPLITZ_TILE < out[1]:
            return _depthwise_toeplitz_program(x_shape, wmat, kernel, strides, dilations, pads, out, shift, dtype,
                                               epilogue, y_dtype, tile=_TOEPLITZ_TILE)
        if not _taps_beat_flat_phases(x_shape, kernel, strides, dilations, pads, out):
            return _depthwise_2d_program(x_shape, wmat, kernel, strides, dilations, pads, out, shift, dtype,
                                         epilogue, y_dtype)
    if isinstance(wmat, DepthwiseWeights):
        regions = _tap_regions(wmat, kernel, x_shape[2:], strides, dilations, pads, out)

        def chunk(xc):
            return _depthwise_taps(xc, regions, kernel, strides, out, shift, dtype)
        per = max(1, _CHUNK // (c * math.prod(out)))
    elif nd == 2 and tuple(strides) == (1, 1) and (any(pads) or any(k > 1 for k in kernel)):
        return _gemm_2d_stride1_program(x_shape, wmat, kernel, dilations, pads, out, group, shift, dtype,
                                        epilogue, y_dtype)
    elif all(k == 1 for k in kernel) and all(s == 1 for s in strides) and not any(pads):
        p = math.prod(out)

        def chunk(xc):
            return _grouped_matmul(wmat, _shift(xc, shift, dtype).reshape(xc.shape[0], c, p), group)
        per = max(1, _CHUNK // max(c * p, m * p))
    else:
        p, k = math.prod(out), math.prod(kernel)
        order = (0, 1) + tuple(range(2 + nd, 2 + 2 * nd)) + tuple(range(2, 2 + nd))

        def chunk(xc):
            win = _windows(_padded(xc, pads, fill) if any(pads) else xc, kernel, strides, dilations).transpose(order)
            cols = np.empty(win.shape, dtype)  # N, C, *K, *out
            _shift_into(cols, win, shift)
            return _grouped_matmul(wmat, cols.reshape(xc.shape[0], c * k, p), group)
        per = max(1, _CHUNK // max(c * k * p, m * p))

    def run(x):
        if n <= per:
            return epilogue(chunk(x).reshape(y_shape))
        y = np.empty(y_shape, y_dtype)
        for s0 in range(0, n, per):
            xc = x[s0:s0 + per]
            y[s0:s0 + xc.shape[0]] = epilogue(chunk(xc).reshape((xc.shape[0],) + y_shape[1:]))
        return y
    return run


def _taps_beat_flat_phases(x_shape, kernel, strides, dilations, pads, out) -> bool:
    """Whether a stride-1 (along W) depthwise conv is faster as strided multiply-adds per tap than
    by :func:`_depthwise_2d_program`, whose passes cover the whole padded plane: when they would
    cover a quarter more than the taps' own regions, which skip the padding (5x5 kernels on
    30x30: 1.6x measured; a few rows of 40: 2.3x). Otherwise the flat passes win (1.1-2.6x from
    192x30x30 3x3 to 16x240x240), the taps' channels-last passes being short loops over N·C."""
    if strides[1] != 1:
        return False
    hq = -(-(x_shape[2] + pads[0] + pads[2]) // strides[0])
    wq = x_shape[3] + pads[1] + pads[3]
    covered = 0
    for tap in itertools.product(*(range(k) for k in kernel)):
        region = _tap_region(tap, x_shape[2:], strides, dilations, pads, out)
        if region is not None:
            covered += math.prod(sl.stop - sl.start for sl in region[0])
    return hq * wq * math.prod(kernel) > 1.25 * covered


def _padded(x, pads, fill, extra_rows: int = 0):
    """x zero-point padded in its own type (``fill`` becomes 0 after the shift), with
    ``extra_rows`` more rows of fill below the last spatial row."""
    nd = x.ndim - 2
    if not any(pads) and not extra_rows:
        return x
    shape = list(x.shape[:2]) + [x.shape[2 + i] + pads[i] + pads[i + nd] for i in range(nd)]
    shape[-2 if nd >= 2 else -1] += extra_rows
    xp = np.full(shape, fill, x.dtype)
    xp[(slice(None), slice(None)) + tuple(slice(pads[i], pads[i] + x.shape[2 + i]) for i in range(nd))] = x
    return xp


def _shift_into(dst, src, shift):
    if shift is None:
        np.copyto(dst, src, casting="unsafe")
    else:
        np.subtract(src, shift, out=dst, dtype=dst.dtype, casting="unsafe")


def _grouped_matmul(wmat, cols, group):
    """(G, M/G, K/G) weights times (N, K, P) columns -> (N, M, P)."""
    nc, _, p = cols.shape
    if group == 1:
        return np.matmul(wmat[0], cols)
    return np.matmul(wmat, cols.reshape(nc, group, -1, p)).reshape(nc, -1, p)


def _gemm_2d_stride1_program(x_shape, wmat, kernel, dilations, pads, out, group, shift, dtype, epilogue, y_dtype):
    """Stride-1 2-D conv computed over the padded width: in the flattened padded image, tap
    (i, j) of output pixel (h, w) is element (h + i·d_h)·Wp + w + j·d_w, so each tap's im2col row
    is the contiguous run of Ho·Wp elements starting at i·d_h·Wp + j·d_w (one strided copy for
    all taps). The GEMM then yields Ho rows of Wp columns, of which the first Wo are the output;
    the last tap reads (kw-1)·d_w elements past the image, hence the extra fill rows. An image
    whose columns outgrow the chunk is done a block of output rows at a time (its columns start
    r0·Wp further on), so columns and accumulator stay in L2 (measured 1.5x on a 208x208 plane)."""
    (kh, kw), (dh, dw) = kernel, dilations
    n, c = x_shape[:2]
    m = wmat.shape[0] * wmat.shape[1]
    fill = 0 if shift is None else shift
    wp = x_shape[3] + pads[1] + pads[3]
    extra = -(-((kw - 1) * dw) // wp)
    if group == 1 and m <= c:
        return _tap_gemms_program(x_shape, wmat, kernel, dilations, pads, out, shift, dtype, epilogue, y_dtype)
    image = c * (x_shape[2] + pads[0] + pads[2] + extra) * wp
    row_cost = max(c * kh * kw * wp, m * wp)
    rows = max(1, min(out[0], _CHUNK // row_cost))
    per = max(1, min(n, _CHUNK // (row_cost * out[0])))

    def run(x):
        xp = _padded(x, pads, fill, extra)
        isz = xp.itemsize
        flat = xp.reshape(-1)
        y = np.empty((n, m) + out, y_dtype)
        for s0 in range(0, n, per):
            nc = min(per, n - s0)
            for r0 in range(0, out[0], rows):
                nr = min(rows, out[0] - r0)
                view = np.lib.stride_tricks.as_strided(
                    flat[s0 * image + r0 * wp:], shape=(nc, c, kh, kw, nr * wp),
                    strides=(image * isz, xp.strides[1], dh * wp * isz, dw * isz, isz), writeable=False)
                cols = np.empty((nc, c, kh, kw, nr * wp), dtype)
                _shift_into(cols, view, shift)
                acc = _grouped_matmul(wmat, cols.reshape(nc, c * kh * kw, nr * wp), group)
                y[s0:s0 + nc, :, r0:r0 + nr] = epilogue(acc.reshape(nc, m, nr, wp))[..., :out[1]]
        return y
    return run


def _tap_gemms_program(x_shape, wmat, kernel, dilations, pads, out, shift, dtype, epilogue, y_dtype):
    """Stride-1 2-D conv (one group) as one GEMM per tap, ``acc += W_ij @ X_ij``, where X_ij is
    the run of the flattened padded image that tap (i, j) reads (see
    :func:`_gemm_2d_stride1_program`), a strided (C, rows·Wp) view that BLAS reads in place: no
    im2col copy, only the accumulator passes, M·Wp per row and tap instead of C·Wp. So when the
    conv has no more output than input channels (a detector head's 96→24 3x3: 1.8x faster). The
    image is converted once, then done a block of output rows at a time (L2). Every partial sum
    is a sum of a subset of the conv's products, so the float32/float64 exactness bound holds."""
    (kh, kw), (dh, dw) = kernel, dilations
    n, c = x_shape[:2]
    m = wmat.shape[1]
    fill = 0 if shift is None else shift
    wp = x_shape[3] + pads[1] + pads[3]
    extra = -(-((kw - 1) * dw) // wp)
    plane = (x_shape[2] + pads[0] + pads[2] + extra) * wp
    offsets = [i * dh * wp + j * dw for i in range(kh) for j in range(kw)]
    w3 = wmat[0].reshape(m, c, kh * kw)
    wtaps = [np.ascontiguousarray(w3[:, :, t]) for t in range(kh * kw)]
    rows = max(1, min(out[0], _CHUNK // (max(c, m) * wp)))

    def run(x):
        xp = _padded(x, pads, fill, extra)
        image = np.empty((c, plane), dtype)
        acc = np.empty((m, rows * wp), dtype)
        tmp = np.empty_like(acc)
        y = np.empty((n, m) + out, y_dtype)
        for s0 in range(n):
            _shift_into(image, xp[s0].reshape(c, plane), shift)
            for r0 in range(0, out[0], rows):
                nr = min(rows, out[0] - r0)
                a, t = acc[:, :nr * wp], tmp[:, :nr * wp]
                for k, off in enumerate(offsets):
                    src = image[:, r0 * wp + off:(r0 + nr) * wp + off]
                    if k == 0:
                        np.matmul(wtaps[k], src, out=a)
                    else:
                        np.matmul(wtaps[k], src, out=t)
                        a += t
                y[s0, :, r0:r0 + nr] = epilogue(a.reshape(1, m, nr, wp))[0, :, :, :out[1]]
        return y
    return run


def _tap_regions(wtaps, kernel, in_spatial, strides, dilations, pads, out) -> list:
    """``((output slices, input slices), weights (C,))`` of every tap that reads inside the image."""
    taps = itertools.product(*(range(k) for k in kernel))
    regions = [(_tap_region(tap, in_spatial, strides, dilations, pads, out), w.reshape(-1))
               for tap, w in zip(taps, wtaps)]
    return [(r, w) for r, w in regions if r is not None]


def _depthwise_taps(x, regions, kernel, strides, out, shift, dtype):
    """Depthwise conv: one multiply-add per tap, over the output positions whose input lies inside
    the image. Padding contributes zero products (0 after the zero-point shift), so it is neither
    built nor read: on the short, wide planes of text recognizers most of a 5x5 kernel's taps
    reach into the padding for most rows. The taps run channels-last (spatial, N, C), so each pass
    streams N·C contiguous values per position instead of one short image row at a time (1.5-2x
    measured on 8x128x3x40), a block of output rows at a time so that the block's passes stay in
    L2 (2x on 16x240x240); every output sums its taps in the same order either way. ``regions``:
    :func:`_tap_regions`, computed once per program."""
    nd = len(kernel)
    lead = x.shape[:2]
    xs = np.empty(x.shape[2:] + lead, dtype)
    _shift_into(xs, x.transpose(tuple(range(2, 2 + nd)) + (0, 1)), shift)
    rows = max(1, min(out[0], _CHUNK // max(1, math.prod(out[1:]) * math.prod(lead))))
    acc = np.empty((rows,) + out[1:] + lead, dtype)
    tmp = np.empty_like(acc)
    y = np.empty(lead + out, dtype)
    s0 = strides[0]
    for r0 in range(0, out[0], rows):
        r1 = min(out[0], r0 + rows)
        block = acc[:r1 - r0]
        block[...] = 0
        for (osl, isl), w in regions:
            lo, hi = max(osl[0].start, r0), min(osl[0].stop, r1)
            if lo >= hi:
                continue
            first = isl[0].start + (lo - osl[0].start) * s0
            o_block = (slice(lo - r0, hi - r0),) + osl[1:]
            dst = tmp[o_block]
            np.multiply(xs[(slice(first, first + (hi - lo - 1) * s0 + 1, s0),) + isl[1:]], w, out=dst)
            block[o_block] += dst
        y[:, :, r0:r1] = block.transpose((nd, nd + 1) + tuple(range(nd)))
    return y


def _tap_region(tap, in_spatial, strides, dilations, pads, out):
    """(output slices, input slices) over the spatial axes of the positions where kernel tap
    ``tap`` reads inside the image (input index o·s + t·d - pad in [0, size)), or None when it
    reads only padding."""
    osl, isl = [], []
    for d, t in enumerate(tap):
        s, off = strides[d], t * dilations[d] - pads[d]
        lo = max(0, -(off // s))   # ceil(-off / s)
        hi = min(out[d], -(-(in_spatial[d] - off) // s))
        if lo >= hi:
            return None
        osl.append(slice(lo, hi))
        isl.append(slice(lo * s + off, (hi - 1) * s + off + 1, s))
    return tuple(osl), tuple(isl)


#: Widest row block (kernel rows × padded width) for which a depthwise conv runs as per-channel
#: GEMMs with a banded weight matrix: BLAS does the extra zero products faster than NumPy does
#: one multiply-add pass per tap.
_TOEPLITZ_MAX_K = 128


def _depthwise_toeplitz_program(x_shape, wtaps, kernel, strides, dilations, pads, out, shift, dtype, epilogue,
                                y_dtype, tile: int | None = None):
    """2-D depthwise conv as GEMMs per channel with a banded matrix, over tiles of ``tile`` output
    columns (default: the whole row). Output tile (h, t) reads the padded rows h·s_h … h·s_h +
    span - 1 and the Wt = (tile-1)·s_w + (kw-1)·d_w + 1 columns from t·tile·s_w; with the banded
    matrix T_c[i·d_h, col·s_w + j·d_w, col] = W_c[i, j] (zeros elsewhere), the tile of channel c is
    block_{h,t} @ T_c, the same matrix for every tile. The blocks of all images of a chunk form one
    (N·Ho·tiles, span·Wt) matrix per channel, gathered with the zero-point shift in one strided
    copy; the last tile's columns past the output are computed from fill columns and dropped.
    Every partial sum is a sum of a subset of the conv's products, so the float32/float64
    exactness bound holds. Tiles keep the GEMM's extra zero products few on wide rows: 16 columns
    of a 5x5 kernel are 4x the useful products, at BLAS speed (2.2x faster than the taps on
    240x12x80)."""
    n, c, h, w = x_shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    ho, wo = out
    tile = wo if tile is None else min(tile, wo)
    tiles = -(-wo // tile)
    wt = (tile - 1) * sw + (kw - 1) * dw + 1
    wp = max(w + pads[1] + pads[3], (tiles * tile - 1) * sw + (kw - 1) * dw + 1)
    pads = [pads[0], pads[1], pads[2], wp - w - pads[1]]  # fill columns for the last tile
    span = (kh - 1) * dh + 1
    k = span * wt
    toeplitz = np.zeros((c, span, wt, tile), dtype)
    cols = np.arange(tile)
    for t, (i, j) in enumerate(itertools.product(range(kh), range(kw))):
        toeplitz[:, i * dh, cols * sw + j * dw, cols] = wtaps[t].reshape(c, 1)
    toeplitz = toeplitz.reshape(c, k, tile)
    fill = 0 if shift is None else shift
    per = max(1, min(n, _TOEPLITZ_CHUNK // (c * ho * tiles * k)))

    def run(x):
        xp = _padded(x, pads, fill)
        isz = xp.itemsize
        y = np.empty((n, c) + out, y_dtype)
        rows = np.empty((c, per, ho, tiles, span, wt), dtype)
        for s0 in range(0, n, per):
            nc = min(per, n - s0)
            blocks = rows[:, :nc]
            shape = (c, nc, ho, tiles, span)
            strides = (xp.strides[1], xp.strides[0], sh * wp * isz, tile * sw * isz, wp * isz)
            if shift is None and xp.dtype == dtype and xp.flags.c_contiguous:
                # a plain copy: each row piece moved as one item of wt elements' bytes, a third
                # faster than wt-element inner loops
                item = np.dtype((np.void, wt * isz))
                np.copyto(blocks.view(item).reshape(shape),
                          np.ndarray(shape, item, buffer=xp, offset=s0 * xp.strides[0], strides=strides))
            else:
                view = np.lib.stride_tricks.as_strided(xp[s0:], shape=shape + (wt,), strides=strides + (isz,),
                                                       writeable=False)
                _shift_into(blocks, view, shift)
            acc = np.matmul(blocks.reshape(c, nc * ho * tiles, k), toeplitz).reshape(c, nc, ho, tiles * tile)
            y[s0:s0 + nc] = epilogue(acc[..., :wo].transpose(1, 0, 2, 3))
        return y
    return run


#: Largest gathered row-block array of one chunk of :func:`_depthwise_toeplitz_program`.
_TOEPLITZ_CHUNK = 1 << 20
#: Output columns per tile of :func:`_depthwise_toeplitz_program` on rows too wide for one banded
#: matrix, for kernels of at least this many taps (measured against the taps and the flat passes:
#: 5x5 1.7-2.3x faster, 3x3 1.0-2.1x, from 8x240x240 to 128x12x160).
_TOEPLITZ_TILE, _TILED_MIN_TAPS = 16, 9


def _depthwise_2d_program(x_shape, wtaps, kernel, strides, dilations, pads, out, shift, dtype, epilogue, y_dtype):
    """2-D depthwise conv on flattened images, a chunk of images at a time. The padded input is
    split into its stride phases (phase (a, b) holds rows a, a+s_h, … and columns b, b+s_w, …;
    one phase when the stride is 1), each of shape (Hq, Wq). Output pixel (h, w) of tap (i, j)
    then reads phase ((i·d_h) mod s_h, (j·d_w) mod s_w) at (h + i·d_h div s_h, w + j·d_w div s_w):
    a constant offset in the flattened phase. So every tap is one contiguous multiply-add over the
    chunk, each channel's plane times its tap weight; positions with w ≥ Wout or h ≥ Hout are
    computed as garbage (from the next plane or a zero tail) and dropped, and no valid position
    reads past its plane. An image larger than a chunk runs a block of channels at a time, so
    that the block's passes stay in L2 (1.6x on 16x240x240)."""
    n, c, h, w = x_shape
    (sh, sw), (dh, dw) = strides, dilations
    hp, wp = h + pads[0] + pads[2], w + pads[1] + pads[3]
    hq, wq = -(-hp // sh), -(-wp // sw)
    fill = 0 if shift is None else shift
    taps = [((i * dh) % sh * sw + (j * dw) % sw, (i * dh) // sh * wq + (j * dw) // sw)
            for i in range(kernel[0]) for j in range(kernel[1])]
    plane = hq * wq
    image = c * plane
    per = max(1, min(n, _CHUNK // image))
    block = max(1, _CHUNK // plane)  # channels per tap pass when a chunk is one image
    omax = max(t[1] for t in taps)
    columns = [wk.reshape(-1, 1) for wk in wtaps]
    inner = (slice(None), slice(None), slice(pads[0], pads[0] + h), slice(pads[1], pads[1] + w))
    crop = (slice(None), slice(None), slice(0, out[0]), slice(0, out[1]))

    def run(x):
        xp = np.full((n, c, hq * sh, wq * sw), fill, x.dtype)
        xp[inner] = x
        buf = np.zeros((sh * sw, per * image + omax), dtype)  # zero tail: read only by garbage positions
        acc = np.empty((per, image), dtype)
        tmp = np.empty((per, image), dtype)
        y = None if n <= per else np.empty((n, c) + out, y_dtype)
        for s0 in range(0, n, per):
            nc = min(per, n - s0)
            length = nc * image
            src = xp[s0:s0 + nc]
            if sh * sw > 1:
                src = src.reshape(nc, c, hq, sh, wq, sw).transpose(3, 5, 0, 1, 2, 4)
            _shift_into(buf[:, :length].reshape(sh, sw, nc, c, hq, wq), src, shift)
            if nc < per:
                buf[:, length:] = 0
            if nc == 1:
                for c0 in range(0, c, block):
                    c1 = min(c, c0 + block)
                    _taps_multiply_add(acc[0, c0 * plane:c1 * plane].reshape(c1 - c0, plane), tmp, taps,
                                       [wk[c0:c1] for wk in columns], buf, c0 * plane)
            else:
                _taps_multiply_add(acc[:nc].reshape(nc, c, plane), tmp, taps, columns, buf, 0)
            dst = acc[:nc]
            res = epilogue(dst.reshape(nc, c, hq, wq))[crop]
            if y is None:
                return np.ascontiguousarray(res)
            y[s0:s0 + nc] = res
        return y
    return run


def _taps_multiply_add(dst, scratch, taps, columns, buf, lo: int):
    """``dst[..., ch, :] = Σ_k buf[phase_k, o_k + lo + …] · columns[k][ch]`` in tap order, over the
    (…, channels, plane) shape of ``dst`` read from the flattened phases starting at ``lo``;
    ``scratch``: a buffer of at least ``dst.size`` elements."""
    size = dst.size
    tmp = scratch.reshape(-1)[:size].reshape(dst.shape)
    for k, (phase, o) in enumerate(taps):
        tap_src = buf[phase, o + lo:o + lo + size].reshape(dst.shape)
        if k == 0:
            np.multiply(tap_src, columns[k], out=dst)
        else:
            np.multiply(tap_src, columns[k], out=tmp)
            dst += tmp


@register("Conv")
def conv(ctx, x, w, b=None):
    """Float convolution (groups, pads, strides, dilations, auto_pad), computed in x's dtype. The
    program (weights in GEMM form, geometry, method, chunking) is built once per input shape."""
    def program():
        strides, dilations, pads = conv_geometry(ctx, x.shape, w.shape)
        group = ctx.attr("group", 1)
        wmat = ctx.once(("w", x.dtype), lambda: conv_weights(w, group, x.dtype), 1)
        return conv_program(x.shape, wmat, w.shape, group, strides, dilations, pads, dtype=x.dtype)

    y = ctx.once(("program", x.shape, x.dtype.str), program, 1)(x)
    if b is not None:
        y += ctx.once(("bias", x.ndim, x.dtype.str), lambda: b.reshape((1, -1) + (1,) * (x.ndim - 2)).astype(x.dtype),
                      2)
    return y


@register("ConvTranspose")
def conv_transpose(ctx, x, w, b=None):
    """Transposed convolution (pads, output_padding, output_shape, auto_pad, groups, dilations):
    per group one GEMM ``Wᵀ·X`` gives every tap's contribution (col2im columns), which are then
    scatter-added tap by tap at ``stride·i + dilation·k`` into the full output, cropped by the pads.

    Pads: explicit, or from ``output_shape`` / SAME_* as the spec says (total = full - target;
    SAME_UPPER puts the smaller half first). Where ORT (conv_transpose_attributes.h) differs from
    the spec, this follows ORT: an ``output_shape`` larger than the full output clamps the total
    padding at 0 and appends zeros at the end of each axis (the spec would pad both sides)."""
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
    tail = [0] * nd
    if out_shape is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        target = list(out_shape)[-nd:] if out_shape is not None else [in_sp[i] * strides[i] for i in range(nd)]
        total = [full[i] - target[i] for i in range(nd)]
        tail = [max(0, -t) for t in total]
        total = [max(0, t) for t in total]
        pb = [t // 2 for t in total] if auto == "SAME_UPPER" else [t - t // 2 for t in total]
        pads = pb + [total[i] - pb[i] for i in range(nd)]
    elif auto == "VALID":
        pads = [0] * 2 * nd
    else:
        pads = list(ctx.attr("pads", [0] * 2 * nd))
    cg, mg = c // group, m // group
    k = int(np.prod(kernel))
    p = int(np.prod(in_sp))
    wt = ctx.once(("wt", x.dtype), lambda: np.ascontiguousarray(
        w.astype(x.dtype).reshape(group, cg, mg * k).transpose(0, 2, 1)), 1)
    cols = np.matmul(wt, x.reshape(n, group, cg, p))  # (n, G, mg·K, P)
    cols = cols.reshape((n, group * mg) + tuple(kernel) + tuple(in_sp))
    y = np.zeros((n, m) + tuple(full), dtype=x.dtype)
    for tap in itertools.product(*(range(kk) for kk in kernel)):
        sl = tuple(slice(tap[i] * dil[i], tap[i] * dil[i] + strides[i] * (in_sp[i] - 1) + 1, strides[i])
                   for i in range(nd))
        y[(slice(None), slice(None)) + sl] += cols[(slice(None), slice(None)) + tap]
    crop = tuple(slice(pads[i], full[i] - pads[i + nd]) for i in range(nd))
    y = y[(slice(None), slice(None)) + crop]
    if any(tail):
        y = np.pad(y, [(0, 0), (0, 0)] + [(0, t) for t in tail])
    y = np.ascontiguousarray(y)
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
    """Max over windows; padding never wins. The optional Indices output holds the flat index of
    each selected input element in (N, C, *spatial) — row-major, or column-major over the spatial
    axes with storage_order=1 — the first maximum of the window in row-major window order."""
    kernel, strides, dil, pads, extra, outs = _pool_setup(ctx, x)
    fill = -np.inf if np.issubdtype(x.dtype, np.floating) else np.iinfo(x.dtype).min
    if len(ctx.node.output) > 1 and ctx.node.output[1]:
        return _max_pool_with_indices(ctx, x, kernel, strides, dil, pads, extra, outs, fill)
    nd = len(kernel)
    width = [(0, 0)] * (x.ndim - nd) + [(pads[i], pads[i + nd] + extra[i]) for i in range(nd)]
    a = np.pad(x, width, constant_values=fill) if any(p for w in width for p in w) else x
    # The max over a box is the max over each axis in turn: one strided np.maximum per tap and axis
    # (k₁ + k₂ passes instead of a k₁·k₂-element reduction per output), the same values exactly.
    for i in range(nd):
        axis = x.ndim - nd + i
        lead = (slice(None),) * axis
        y = None
        for k in range(kernel[i]):
            start = k * dil[i]
            tap = a[lead + (slice(start, start + strides[i] * (outs[i] - 1) + 1, strides[i]),)]
            y = tap.copy() if y is None else np.maximum(y, tap, out=y)
        a = y
    return a.astype(x.dtype, copy=False)


def _max_pool_with_indices(ctx, x, kernel, strides, dil, pads, extra, outs, fill):
    nd = len(kernel)
    spatial = x.shape[2:]
    flat = np.arange(x.size, dtype=np.int64).reshape(x.shape)
    if ctx.attr("storage_order", 0):
        plane = int(np.prod(spatial))
        col = np.arange(plane, dtype=np.int64).reshape(spatial[::-1]).transpose(tuple(range(nd))[::-1])
        flat = (np.arange(x.shape[0] * x.shape[1], dtype=np.int64) * plane).reshape(x.shape[:2] + (1,) * nd) + col
    win = _pooled(x, kernel, strides, dil, pads, extra, outs, fill)
    idx = _pooled(flat, kernel, strides, dil, pads, extra, outs, -1)
    win = win.reshape(win.shape[:2 + nd] + (-1,))
    best = np.argmax(win, axis=-1)[..., None]
    values = np.take_along_axis(win, best, axis=-1)[..., 0]
    indices = np.take_along_axis(idx.reshape(idx.shape[:2 + nd] + (-1,)), best, axis=-1)[..., 0]
    return values.astype(x.dtype), indices


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
    """The mean over the spatial axes in MLAS's order (mlas/lib/pooling.cpp, MlasPoolGlobalKernel,
    which ORT runs for float32 NCHW maps): four float32 lanes summed sequentially over each
    channel's elements, lanes folded as ``(l0 + l2) + (l1 + l3)`` (MlasReduceAddFloat32x4), the
    last ``n mod 4`` elements added one by one, then divided by ``float(n)``. ORT's NCHWc layout
    pass may run a pool on blocked channels instead (one sequential sum per channel), which the
    GlobalAveragePool tolerance covers (qgraph/interp/tolerance.py)."""
    if x.dtype != np.float32 or x.ndim < 3:
        axes = tuple(range(2, x.ndim))
        return x.astype(np.float64).mean(axis=axes, keepdims=True).astype(x.dtype)
    n = int(np.prod(x.shape[2:]))
    flat = np.ascontiguousarray(x.reshape(-1, n))
    body = n // 4 * 4
    if body:
        # Step k of the lanes is row k of a contiguous (n/4, channels·4) copy (transposed with
        # each quadruple of lanes moved as one 16-byte item); a reduction over the outer axis
        # adds the rows one after the other (never pairwise: that happens only along the
        # innermost axis), so each lane is the sequential sum: 3-6x faster than an accumulate
        # along a strided axis.
        quads = flat[:, :body].view(np.complex128)
        steps = np.ascontiguousarray(quads.T).view(np.float32)
        lanes = np.add.reduce(steps, axis=0).reshape(flat.shape[0], 4)
        total = (lanes[:, 0] + lanes[:, 2]) + (lanes[:, 1] + lanes[:, 3])
    else:
        total = np.zeros(flat.shape[0], np.float32)
    for i in range(body, n):
        total = total + flat[:, i]
    return (total / np.float32(n)).reshape(x.shape[:2] + (1,) * (x.ndim - 2))


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
    """Inference form: (x - mean) / sqrt(var + eps) * scale + bias, per channel (axis 1); the
    per-channel factor is computed in float64 and rounded once, the rest is in x's type."""
    if ctx.attr("training_mode", 0):
        raise ctx.error("training_mode=1 is not supported (inference only)")
    shp = (1, -1) + (1,) * (x.ndim - 2)

    def constants():
        eps = ctx.attr("epsilon", 1e-5)
        inv = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
        return tuple(v.astype(x.dtype).reshape(shp) for v in (mean, inv, bias))

    centre, inv, shift = ctx.once(("bn", x.ndim, x.dtype.str), constants, 1, 2, 3, 4)
    per_image = x.shape[1:]
    if x.ndim > 2 and math.prod(per_image[1:]) < _BN_SHORT_PLANE and math.prod(per_image) <= _BN_FULL_MAX:
        # Short planes: a (1, C, 1, 1) operand makes NumPy run one short inner loop per channel;
        # the constants spread over a whole image make each pass one contiguous loop (2x faster
        # on ppocr_cls's 2x96 maps), the same float32 operation on every element.
        centre, inv, shift = ctx.once(("bn full", per_image, x.dtype.str),
                                      lambda: tuple(np.broadcast_to(v, (1,) + per_image).reshape(1, -1).copy()
                                                    for v in (centre, inv, shift)), 1, 2, 3, 4)
        y = np.subtract(x.reshape(x.shape[0], -1), centre)
    else:
        y = np.subtract(x, centre)   # in x's type, as ORT: (x - mean) · (scale / √(var + ε)) + bias
    y *= inv
    y += shift
    return y.reshape(x.shape)


#: Planes shorter than this (elements) and images up to _BN_FULL_MAX elements take per-element
#: BatchNormalization constants (memoized per image shape; at most 3 · 256 KiB per node).
_BN_SHORT_PLANE, _BN_FULL_MAX = 4096, 1 << 16
