"""Detection post-processing kernels (ONNX domain): NonMaxSuppression.

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
