"""Tensor-manipulation and index kernels (ONNX domain): Split, Range, Tile, the Gather/Scatter
family, ArgMax/ArgMin, TopK, NonZero, OneHot, Trilu, CumSum, DepthToSpace/SpaceToDepth, …

These move or select elements, so they are exact; where ORT's result depends on an order the
spec leaves open (TopK ties, Range accumulation), the docstring says what ORT does and the
kernel does the same.
"""

from __future__ import annotations

import itertools

import numpy as np

from qgraph.interp.registry import np_dtype, register


def _ints(v):
    return [int(a) for a in np.asarray(v).reshape(-1)]


def _scalar(v):
    return np.asarray(v).reshape(-1)[0]


# --------------------------------------------------------------------------- split / range
def split_sizes(ctx, dim: int, split, n_out: int) -> list[int]:
    """Chunk sizes of Split: the ``split`` input (opset >= 13) or attribute (before); else
    ``num_outputs`` (opset 18: ceil(dim / n) per chunk, the last one smaller); else equal parts."""
    if ctx.opset < 13:
        split = ctx.attr("split")
    if split is not None and np.asarray(split).size:
        sizes = _ints(split)
        if sum(sizes) != dim or len(sizes) != n_out:
            raise ctx.error(f"split sizes {sizes} do not add up to the axis length {dim} over {n_out} outputs")
        return sizes
    n = ctx.attr("num_outputs", n_out) if ctx.opset >= 18 else n_out
    if n != n_out:
        raise ctx.error(f"num_outputs={n} but the node has {n_out} outputs")
    if ctx.opset >= 18 and "num_outputs" in ctx.attrs:
        chunk = -(-dim // n)
        sizes = [min(chunk, max(0, dim - i * chunk)) for i in range(n)]
    else:
        if dim % n:
            raise ctx.error(f"axis length {dim} does not split evenly into {n} outputs; give `split`")
        sizes = [dim // n] * n
    return sizes


@register("Split")
def split(ctx, x, split=None):
    """Views of consecutive chunks of ``x`` along ``axis`` (default 0), sizes per
    :func:`split_sizes`."""
    axis = ctx.attr("axis", 0) % x.ndim
    sizes = split_sizes(ctx, x.shape[axis], split, len(ctx.node.output))
    bounds = np.cumsum([0] + sizes)
    sl = [slice(None)] * x.ndim
    outs = []
    for b, e in zip(bounds[:-1], bounds[1:]):
        sl[axis] = slice(int(b), int(e))
        outs.append(x[tuple(sl)])
    return tuple(outs)


@register("Range")
def range_(ctx, start, limit, delta):
    """``n = max(ceil((limit - start) / delta), 0)`` values. ORT (generator/range.cc) computes
    ``limit - start`` in the element type, the division in double, and the values by repeated
    addition ``v += delta`` in the element type — so float outputs accumulate rounding exactly as
    here (a sequential ``np.add.accumulate``), not ``start + i * delta``."""
    dt = np.asarray(start).dtype
    start, limit, delta = (np.asarray(v).reshape(()).astype(dt) for v in (start, limit, delta))
    if delta == 0:
        raise ctx.error("delta is zero")
    diff = np.subtract(limit, start, dtype=dt)
    n = max(int(np.ceil(float(diff) / float(delta))), 0)
    if n == 0:
        return np.zeros(0, dt)
    steps = np.full(n, delta, dt)
    steps[0] = start
    return np.add.accumulate(steps, dtype=dt)


# --------------------------------------------------------------------------- repetition
@register("Tile")
def tile(ctx, x, repeats):
    """``x`` repeated ``repeats[i]`` times along axis i."""
    reps = _ints(repeats)
    if len(reps) != x.ndim:
        raise ctx.error(f"repeats has {len(reps)} entries for a rank-{x.ndim} input")
    return np.tile(x, reps)


@register("Trilu")
def trilu(ctx, x, k=None):
    """Upper (``upper=1``, default) or lower triangle of the last two axes, diagonal offset k."""
    k = 0 if k is None else int(_scalar(k))
    return np.triu(x, k) if ctx.attr("upper", 1) else np.tril(x, k)


@register("EyeLike")
def eye_like(ctx, x):
    """2-D identity of x's shape (ones on diagonal ``k``), in ``dtype`` (default x's type)."""
    if x.ndim != 2:
        raise ctx.error("input must be 2-D")
    dt = np_dtype(ctx.attr("dtype")) if ctx.attr("dtype") is not None else x.dtype
    return np.eye(x.shape[0], x.shape[1], k=ctx.attr("k", 0), dtype=dt)


@register("OneHot")
def one_hot(ctx, indices, depth, values):
    """``values[1]`` where the index along the new ``axis`` equals the (wrapped, for negative)
    index, ``values[0]`` elsewhere; indices outside [-depth, depth) give an all-off row."""
    d = int(_scalar(depth))
    idx = np.asarray(indices).astype(np.int64)
    idx = np.where(idx < 0, idx + d, idx)
    axis = ctx.attr("axis", -1)
    axis = axis % (idx.ndim + 1)
    hot = np.expand_dims(idx, axis) == np.arange(d).reshape((-1,) + (1,) * (idx.ndim - axis))
    values = np.asarray(values).reshape(-1)
    return np.where(hot, values[1], values[0]).astype(values.dtype)


# --------------------------------------------------------------------------- gather / scatter
def _wrap(idx, n):
    idx = np.asarray(idx).astype(np.int64)
    return np.where(idx < 0, idx + n, idx)


def _check_range(ctx, idx, n, what="indices"):
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ctx.error(f"{what} out of range [-{n}, {n - 1}]")


@register("GatherElements")
def gather_elements(ctx, x, indices):
    """``y[i][j][k] = x[i][idx[i][j][k]][k]`` for axis 1 (any axis); negative indices wrap."""
    axis = ctx.attr("axis", 0) % x.ndim
    if _is_row(x.shape, axis) and _is_row(np.shape(indices), axis):
        return _table_lookup(ctx, x, indices)
    idx = _wrap(indices, x.shape[axis])
    _check_range(ctx, idx, x.shape[axis])
    return np.take_along_axis(x, idx, axis=axis)


def _is_row(shape, axis: int) -> bool:
    return all(d == 1 for i, d in enumerate(shape) if i != axis)


def _table_lookup(ctx, table, indices):
    """GatherElements of a table that has one row along ``axis`` (a lowered activation's lookup
    table): ``table.ravel()[indices]``, one pass. ``np.take`` wraps -n..-1 and raises past
    them, the ONNX rule, without the int64 copies and range passes of the general path."""
    try:
        return np.take(table.reshape(-1), indices)
    except IndexError:
        n = table.size
        raise ctx.error(f"indices out of range [-{n}, {n - 1}]") from None


@register("GatherND")
def gather_nd(ctx, x, indices):
    """Gathers slices of ``x`` addressed by the last axis of ``indices`` (length ≤ rank), with
    ``batch_dims`` leading axes shared by ``x`` and ``indices``."""
    b = ctx.attr("batch_dims", 0)
    idx = np.asarray(indices).astype(np.int64)
    k = idx.shape[-1]
    batch = x.shape[:b]
    nb = int(np.prod(batch, dtype=np.int64))
    xb = x.reshape((nb,) + x.shape[b:])
    ib = idx.reshape((nb, -1, k))
    dims = np.asarray(x.shape[b:b + k], dtype=np.int64)
    ib = np.where(ib < 0, ib + dims, ib)
    if ib.size and (np.any(ib < 0) or np.any(ib >= dims)):
        raise ctx.error(f"indices out of range for dimensions {dims.tolist()}")
    sel = (np.arange(nb)[:, None],) + tuple(ib[..., j] for j in range(k))
    out = xb[sel]  # (nb, m, *x.shape[b+k:])
    return out.reshape(idx.shape[:-1] + x.shape[b + k:])


_SCATTER_REDUCE = {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}


def _scatter(ctx, data, index_tuple, updates):
    """data with ``data[index_tuple] = updates`` (``reduction`` none: the last duplicate wins,
    as ORT's sequential loop), or combined with add/mul/max/min (unbuffered, so duplicates
    accumulate)."""
    out = np.array(data, copy=True)
    red = ctx.attr("reduction", "none")
    if red == "none":
        out[index_tuple] = updates
    elif red in _SCATTER_REDUCE:
        _SCATTER_REDUCE[red].at(out, index_tuple, updates)
    else:
        raise ctx.error(f"reduction={red!r} is not supported")
    return out


@register("ScatterElements")
@register("Scatter")
def scatter_elements(ctx, data, indices, updates):
    """``out[... idx[i,j,k] ...] = updates[i,j,k]`` along ``axis``; negative indices wrap."""
    axis = ctx.attr("axis", 0) % data.ndim
    idx = _wrap(indices, data.shape[axis])
    _check_range(ctx, idx, data.shape[axis])
    grid = list(np.indices(idx.shape, sparse=True))
    grid[axis] = idx
    return _scatter(ctx, data, tuple(grid), updates)


@register("ScatterND")
def scatter_nd(ctx, data, indices, updates):
    """``out[indices[..., :]] = updates[...]`` (slices when the index is shorter than the rank)."""
    idx = np.asarray(indices).astype(np.int64)
    k = idx.shape[-1]
    dims = np.asarray(data.shape[:k], dtype=np.int64)
    idx = np.where(idx < 0, idx + dims, idx)
    return _scatter(ctx, data, tuple(idx[..., j] for j in range(k)), updates)


@register("Compress")
def compress(ctx, x, condition):
    """The slices along ``axis`` (or elements of the flattened input) where condition is true."""
    cond = np.asarray(condition).astype(bool).reshape(-1)
    axis = ctx.attr("axis")
    if axis is None:
        flat = x.reshape(-1)
        return flat[:cond.size][cond[:flat.size]]
    axis %= x.ndim
    cond = cond[:x.shape[axis]]
    return np.compress(cond, x, axis=axis)


@register("ReverseSequence")
def reverse_sequence(ctx, x, seq_lens):
    """Per batch entry b, the first ``seq_lens[b]`` steps along ``time_axis`` reversed."""
    t_ax, b_ax = ctx.attr("time_axis", 0), ctx.attr("batch_axis", 1)
    lens = np.asarray(seq_lens).astype(np.int64)
    t = np.arange(x.shape[t_ax])
    shape = [1] * x.ndim
    shape[t_ax] = -1
    tt = t.reshape(shape)
    bshape = [1] * x.ndim
    bshape[b_ax] = -1
    ll = lens.reshape(bshape)
    src = np.where(tt < ll, ll - 1 - tt, tt)
    return np.take_along_axis(x, np.broadcast_to(src, np.broadcast_shapes(src.shape, x.shape)), axis=t_ax)


# --------------------------------------------------------------------------- selection
def _arg_reduce(ctx, x, fn):
    axis = ctx.attr("axis", 0) % x.ndim
    keep = ctx.attr("keepdims", 1)
    if ctx.attr("select_last_index", 0):
        n = x.shape[axis]
        idx = n - 1 - fn(np.flip(x, axis=axis), axis=axis)
    else:
        idx = fn(x, axis=axis)
    idx = idx.astype(np.int64)
    return np.expand_dims(idx, axis) if keep else idx


@register("ArgMax")
def argmax(ctx, x):
    """Index of the largest element along ``axis`` (first one, or last with select_last_index)."""
    return _arg_reduce(ctx, x, np.argmax)


@register("ArgMin")
def argmin(ctx, x):
    """Index of the smallest element along ``axis`` (first one, or last with select_last_index)."""
    return _arg_reduce(ctx, x, np.argmin)


@register("TopK")
def topk(ctx, x, k):
    """The k largest (``largest=1``) or smallest values along ``axis`` and their int64 indices,
    sorted; equal values keep ascending index order (ORT's comparator breaks ties by index).
    ``sorted=0`` leaves the order to the implementation: ORT returns its selection heap's or
    std::nth_element's order (math/top_k.cc), the interpreter the sorted order — the same
    elements, possibly permuted."""
    kk = int(_scalar(k))
    axis = ctx.attr("axis", -1) % x.ndim
    if kk < 0 or kk > x.shape[axis]:
        raise ctx.error(f"k={kk} is outside [0, {x.shape[axis]}]")
    key = x
    if ctx.attr("largest", 1):
        key = -(x.astype(np.int64) if x.dtype.kind == "u" else x.astype(np.float64) if x.dtype.kind == "f" else x)
    order = np.argsort(key, axis=axis, kind="stable")
    idx = np.take(order, np.arange(kk), axis=axis)
    return np.take_along_axis(x, idx, axis=axis), idx.astype(np.int64)


@register("NonZero")
def nonzero(ctx, x):
    """int64 (rank, n) coordinates of the non-zero elements in row-major order."""
    return np.asarray(np.nonzero(np.atleast_1d(x)), dtype=np.int64)


@register("CumSum")
def cumsum(ctx, x, axis):
    """Running sum along ``axis``; ``exclusive`` shifts by one (first element 0), ``reverse``
    sums from the end. Floats accumulate sequentially in the element type, as ORT."""
    ax = int(_scalar(axis)) % x.ndim
    y = np.flip(x, ax) if ctx.attr("reverse", 0) else x
    out = np.add.accumulate(y, axis=ax, dtype=x.dtype)
    if ctx.attr("exclusive", 0):
        out = np.concatenate([np.zeros_like(np.take(out, [0], axis=ax)), np.take(out, np.arange(out.shape[ax] - 1),
                                                                                    axis=ax)], axis=ax)
    return np.flip(out, ax) if ctx.attr("reverse", 0) else out


# --------------------------------------------------------------------------- layout
@register("DepthToSpace")
def depth_to_space(ctx, x):
    """NCHW: channel blocks to spatial b×b tiles; mode DCR (default, depth-column-row) or CRD."""
    b = ctx.attr("blocksize")
    n, c, h, w = x.shape
    if ctx.attr("mode", "DCR") == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).transpose(0, 1, 4, 2, 5, 3)
    return np.ascontiguousarray(y.reshape(n, c // (b * b), h * b, w * b))


@register("SpaceToDepth")
def space_to_depth(ctx, x):
    """NCHW: each b×b spatial tile to b·b channel blocks (the inverse of DepthToSpace DCR)."""
    b = ctx.attr("blocksize")
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).transpose(0, 3, 5, 1, 2, 4)
    return np.ascontiguousarray(y.reshape(n, c * b * b, h // b, w // b))


@register("Unique")
def unique(ctx, x):
    """Unique elements (or slices along ``axis``), with the first-occurrence indices, the inverse
    indices and the counts (int64). ``sorted=1`` (default) sorts ascending; ``sorted=0`` keeps the
    order of first occurrence."""
    axis = ctx.attr("axis")
    data = x.reshape(-1) if axis is None else x
    ax = 0 if axis is None else axis % x.ndim
    values, first, inverse, counts = np.unique(data, return_index=True, return_inverse=True, return_counts=True,
                                               axis=ax)
    inverse = inverse.reshape(-1)
    if not ctx.attr("sorted", 1):
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        values, first, counts, inverse = np.take(values, order, axis=ax), first[order], counts[order], rank[inverse]
    return values, first.astype(np.int64), inverse.astype(np.int64), counts.astype(np.int64)


@register("CenterCropPad")
def center_crop_pad(ctx, x, shape):
    """Crops or zero-pads ``axes`` (default all) to ``shape``, centred: a crop drops
    ⌊excess/2⌋ at the start, a pad puts ⌊missing/2⌋ zeros at the start."""
    target = _ints(shape)
    axes = ctx.attr("axes")
    axes = list(range(x.ndim)) if axes is None else [a % x.ndim for a in axes]
    y = x
    for a, t in zip(axes, target):
        n = y.shape[a]
        if t < n:
            start = (n - t) // 2
            y = np.take(y, np.arange(start, start + t), axis=a)
        elif t > n:
            width = [(0, 0)] * y.ndim
            before = (t - n) // 2
            width[a] = (before, t - n - before)
            y = np.pad(y, width)
    return np.ascontiguousarray(y)


@register("MaxUnpool")
def max_unpool(ctx, x, indices, output_shape=None):
    """Scatters x into zeros at the flat ``indices`` MaxPool returned. The output shape is
    ``output_shape``, else the MaxPool input shape implied by kernel/strides/pads. With an
    ``output_shape`` ORT (and so the interpreter) reads the indices as flat positions in *that*
    shape; the ONNX reference scatters into the implied shape and pads it at the end instead."""
    nd = x.ndim - 2
    if output_shape is not None:
        out = _ints(output_shape)
    else:
        kernel = list(ctx.attr("kernel_shape"))
        strides = list(ctx.attr("strides", [1] * nd))
        pads = list(ctx.attr("pads", [0] * 2 * nd))
        out = list(x.shape[:2]) + [(x.shape[2 + i] - 1) * strides[i] - pads[i] - pads[i + nd] + kernel[i]
                                   for i in range(nd)]
    y = np.zeros(int(np.prod(out)), x.dtype)
    idx = np.asarray(indices).astype(np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= y.size):
        raise ctx.error(f"indices out of range for output shape {out}")
    y[idx] = x.reshape(-1)
    return y.reshape(out)


@register("Col2Im")
def col2im(ctx, x, image_shape, block_shape):
    """Rearranges columns (N, C·∏block, L) into images (N, C, *image_shape), summing overlapping
    blocks (the inverse of im2col) with dilations, pads and strides."""
    img = _ints(image_shape)
    blk = _ints(block_shape)
    nd = len(img)
    dil = list(ctx.attr("dilations", [1] * nd))
    pads = list(ctx.attr("pads", [0] * 2 * nd))
    strides = list(ctx.attr("strides", [1] * nd))
    n = x.shape[0]
    k = int(np.prod(blk))
    c = x.shape[1] // k
    outs = [(img[i] + pads[i] + pads[i + nd] - (dil[i] * (blk[i] - 1) + 1)) // strides[i] + 1 for i in range(nd)]
    cols = x.reshape((n, c) + tuple(blk) + tuple(outs))
    padded = np.zeros((n, c) + tuple(img[i] + pads[i] + pads[i + nd] for i in range(nd)), x.dtype)
    for tap in itertools.product(*(range(b) for b in blk)):
        sl = tuple(slice(tap[i] * dil[i], tap[i] * dil[i] + strides[i] * (outs[i] - 1) + 1, strides[i])
                   for i in range(nd))
        padded[(slice(None), slice(None)) + sl] += cols[(slice(None), slice(None)) + tap]
    crop = tuple(slice(pads[i], pads[i] + img[i]) for i in range(nd))
    return np.ascontiguousarray(padded[(slice(None), slice(None)) + crop])
