"""Detection kernels (ONNX domain): NonMaxSuppression and RoiAlign.

Exporters put NMS at the end of detector graphs (YOLO exports with ``nms=True``, TF/Paddle
converters); it selects boxes, so the result is exact given the same float32 IoUs.
"""

from __future__ import annotations

import numpy as np

from qgraph.interp.registry import register

F32 = np.float32


def _corners(boxes, center_point_box: int):
    """(x_min, y_min, x_max, y_max) float32 arrays as ORT's SuppressByIOU derives them: corners
    ordered per axis for [y1, x1, y2, x2], or center ± half size for [xc, yc, w, h]."""
    b = boxes.astype(F32, copy=False)
    if center_point_box == 0:
        return (np.minimum(b[:, 1], b[:, 3]), np.minimum(b[:, 0], b[:, 2]),
                np.maximum(b[:, 1], b[:, 3]), np.maximum(b[:, 0], b[:, 2]))
    half_w, half_h = b[:, 2] / F32(2), b[:, 3] / F32(2)
    return b[:, 0] - half_w, b[:, 1] - half_h, b[:, 0] + half_w, b[:, 1] + half_h


def _suppressed_by(corners, i: int, others: np.ndarray, iou_threshold: F32) -> np.ndarray:
    """Whether box ``i`` suppresses each box in ``others``: IoU > threshold, computed in float32 in
    ORT's order (non-positive intersections or areas never suppress)."""
    x0, y0, x1, y1 = corners
    ix0, ix1 = np.maximum(x0[i], x0[others]), np.minimum(x1[i], x1[others])
    iy0, iy1 = np.maximum(y0[i], y0[others]), np.minimum(y1[i], y1[others])
    inter = (ix1 - ix0) * (iy1 - iy0)
    area_i = (x1[i] - x0[i]) * (y1[i] - y0[i])
    area_o = (x1[others] - x0[others]) * (y1[others] - y0[others])
    union = area_i + area_o - inter
    valid = (ix1 > ix0) & (iy1 > iy0) & (inter > 0) & (area_i > 0) & (area_o > 0) & (union > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    return valid & (iou > iou_threshold)


@register("NonMaxSuppression")
def non_max_suppression(ctx, boxes, scores, max_output=None, iou_threshold=None, score_threshold=None):
    """Greedy NMS per (batch, class), as ORT (object_detection/non_max_suppression.cc): candidates
    with ``score > score_threshold`` (all when it is absent) in descending score order; a candidate
    is kept unless a kept box overlaps it with IoU > iou_threshold; at most
    ``max_output_boxes_per_class`` per class (absent or 0: nothing is selected). Output: int64
    rows ``[batch, class, box]`` in selection order. Equal scores are taken in ascending box order
    here; ORT's priority queue leaves their order unspecified."""
    if boxes.ndim != 3 or scores.ndim != 3 or boxes.shape[2] != 4 or boxes.shape[1] != scores.shape[2]:
        raise ctx.error(f"boxes {boxes.shape} and scores {scores.shape} do not fit [B, N, 4] and [B, C, N]")
    center = ctx.attr("center_point_box", 0)
    limit = 0 if max_output is None else max(int(np.asarray(max_output).reshape(-1)[0]), 0)
    iou_t = F32(0 if iou_threshold is None else np.asarray(iou_threshold).reshape(-1)[0])
    if not 0 <= iou_t <= 1:
        raise ctx.error(f"iou_threshold {iou_t} is outside [0, 1]")
    selected = []
    if limit == 0:
        return np.zeros((0, 3), np.int64)
    for b in range(boxes.shape[0]):
        corners = _corners(boxes[b], center)
        for c in range(scores.shape[1]):
            s = scores[b, c].astype(F32, copy=False)
            cand = np.arange(s.size) if score_threshold is None else \
                np.flatnonzero(s > F32(np.asarray(score_threshold).reshape(-1)[0]))
            cand = cand[np.argsort(-s[cand], kind="stable")]
            kept = 0
            while cand.size and kept < limit:
                i = cand[0]
                selected.append((b, c, i))
                kept += 1
                rest = cand[1:]
                cand = rest[~_suppressed_by(corners, i, rest, iou_t)]
    return np.asarray(selected, np.int64).reshape(-1, 3)


def _roi_samples(start, bin_size, grid: int, pooled: int, limit: int):
    """Per output bin and sample, the two neighbour indices and weights along one axis, as the
    bilinear pre-computation of RoiAlign (Detectron's): float32, samples outside [-1, limit] get
    weight 0, coordinates clamped at 0 and at the last pixel."""
    p = np.arange(pooled, dtype=F32)[:, None]
    i = np.arange(grid, dtype=F32)[None, :]
    pos = (start + p * bin_size) + ((i + F32(0.5)) * bin_size) / F32(grid)   # (pooled, grid)
    outside = (pos < F32(-1)) | (pos > F32(limit))
    pos = np.maximum(pos, F32(0))
    low = np.trunc(pos).astype(np.int64)
    at_end = low >= limit - 1
    low = np.where(at_end, limit - 1, low)
    high = np.where(at_end, limit - 1, low + 1)
    pos = np.where(at_end, low.astype(F32), pos)
    frac = pos - low.astype(F32)
    return low, high, F32(1) - frac, frac, outside


@register("RoiAlign")
def roi_align(ctx, x, rois, batch_indices):
    """RoiAlign (Detectron): each ROI (x1, y1, x2, y2 · spatial_scale, shifted by -0.5 for
    half_pixel, opset 16's default) is split into output_height × output_width bins, each sampled
    on a sampling_ratio² grid (adaptive ceil(bin size) when 0) by bilinear interpolation; avg mode
    averages the samples, max mode takes the largest weighted corner value (the spec's and ORT's
    definition). float32 arithmetic in ORT's order; one pass per ROI, vectorized over bins,
    samples and channels."""
    mode = ctx.attr("mode", "avg")
    if mode not in ("avg", "max"):
        raise ctx.error(f"mode={mode!r} is not supported")
    half_pixel = ctx.attr("coordinate_transformation_mode", "half_pixel" if ctx.opset >= 16 else
                          "output_half_pixel") == "half_pixel"
    oh, ow = ctx.attr("output_height", 1), ctx.attr("output_width", 1)
    ratio = ctx.attr("sampling_ratio", 0)
    scale = F32(ctx.attr("spatial_scale", 1.0))
    n, c, h, w = x.shape
    xf = x.astype(F32, copy=False).reshape(n, c, h * w)
    out = np.zeros((rois.shape[0], c, oh, ow), F32)
    offset = F32(0.5) if half_pixel else F32(0)
    for r, (roi, b) in enumerate(zip(rois.astype(F32), np.asarray(batch_indices).astype(np.int64))):
        x0, y0, x1, y1 = (roi * scale) - offset
        rw, rh = x1 - x0, y1 - y0
        if not half_pixel:
            rw, rh = max(rw, F32(1)), max(rh, F32(1))
        bh, bw = rh / F32(oh), rw / F32(ow)
        gh = ratio if ratio > 0 else int(np.ceil(rh / F32(oh)))
        gw = ratio if ratio > 0 else int(np.ceil(rw / F32(ow)))
        count = F32(max(gh * gw, 1))
        ylo, yhi, hy, ly, yout = _roi_samples(y0, bh, gh, oh, h)   # (oh, gh)
        xlo, xhi, hx, lx, xout = _roi_samples(x0, bw, gw, ow, w)   # (ow, gw)
        shape = (oh, gh, ow, gw)

        def grid(a, axis):
            return (a[:, :, None, None] if axis == 0 else a[None, None, :, :]) * np.ones(shape, a.dtype)
        inside = ~(grid(yout, 0) | grid(xout, 1))
        corners = []
        for yi, xi, wy, wx in ((ylo, xlo, hy, hx), (ylo, xhi, hy, lx), (yhi, xlo, ly, hx), (yhi, xhi, ly, lx)):
            idx = np.where(inside, grid(yi, 0) * w + grid(xi, 1), 0)
            wgt = np.where(inside, grid(wy, 0) * grid(wx, 1), F32(0))
            corners.append(wgt * xf[b][:, idx])                      # (C, oh, gh, ow, gw)
        if mode == "avg":
            val = corners[0] + corners[1] + corners[2] + corners[3]
            acc = np.zeros((c, oh, ow), F32)
            for iy in range(gh):          # ORT accumulates the samples in (iy, ix) order
                for ix in range(gw):
                    acc += val[:, :, iy, :, ix]
            out[r] = acc / count
        else:
            val = np.maximum(np.maximum(corners[0], corners[1]), np.maximum(corners[2], corners[3]))
            out[r] = val.max(axis=(2, 4))
    return out
