"""Scales and zero points of the quantizers insert_qdq placed, and writing them into the graph.

    weight:      [rmin, rmax] = weight_range(W, axis, observer)   (per output channel or tensor)
    activation:  [rmin, rmax] from calibration, [0, rmax] when non-negative, rmax ≤ a Clip's cap
    (s, z) = quant.scale_zero_point(rmin, rmax, record.grid)

A pair's Q and DQ share one scale and one zero point tensor; a sub-8-bit activation pair's
Clip lets exactly the grid's real range through (quant.grid_bounds). Every number comes from
qgraph.quant; this module only reads records (annotations.QuantizerRecord) and edits nodes.
"""

from __future__ import annotations

import numpy as np

from qgraph import quant
from qgraph.annotations import QuantizerRecord, read_quantizers
from qgraph.graph import Node, QModel
from qgraph.observers import weight_range


def weight_qparams(value: np.ndarray, record: QuantizerRecord) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of a constant from its own range (per channel along `axis`): a
    compute op's weight on its signed grid, an elementwise op's constant operand on the
    activations' grid (so that both operands share a storage type)."""
    rmin, rmax = weight_range(value, record.axis, record.observer, bits=record.bits, symmetric=record.symmetric,
                              narrow_range=record.narrow_range, pow2=record.pow2)
    return quant.scale_zero_point(rmin, rmax, **record.grid)


def activation_qparams(rmin: float, rmax: float, record: QuantizerRecord) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of an activation range ([0, max] for non-negative tensors), within
    the bounds its readers tell values apart in (a following Clip's upper bound, a HardSwish's -3:
    QuantizerRecord.range_floor/range_cap). Where the data reach a bound of ahead_relu's
    `range_bounds`, the grid reaches one step beyond it: values clamped there must land on a
    level where the reader is already flat (HardSwish(-2.98) is -0.01, not 0, and a level just
    inside the bound would add that to every element below it)."""
    if record.nonnegative:
        rmin = 0.0
    floor = record.range_floor
    cap = None if record.nonnegative else record.range_cap
    if floor is not None:
        rmin = max(rmin, floor)
    if record.range_cap is not None:
        rmax = min(rmax, record.range_cap)
    rmax = max(rmin, rmax)
    step = (rmax - rmin) / (record.qmax - record.qmin)
    if floor is not None and rmin <= floor + step:   # (a histogram's low end lands near the bound)
        rmin = floor - step
    if cap is not None and rmax >= cap - step:
        rmax = cap + step
    return quant.scale_zero_point(rmin, rmax, **record.grid)


def write_qparams(nodes: dict[str, Node], record: QuantizerRecord, scale, zp) -> None:
    """Set a pair's scale and zero point (shared by its Q and DQ) and its Clip bounds."""
    q = nodes[record.quantize]
    shape = np.asarray(q.inputs[1].values).shape
    q.inputs[1].values = np.asarray(scale, np.float32).reshape(shape)
    q.inputs[2].values = np.asarray(zp).astype(quant.storage_dtype(record.signed, record.bits)).reshape(shape)
    if record.clip:
        lo, hi = quant.grid_bounds(scale, zp, record.qmin, record.qmax)
        clip = nodes[record.clip]
        clip.inputs[1].values, clip.inputs[2].values = lo, hi


def constant_input_values(model: QModel, tensors) -> dict[str, np.ndarray]:
    """Values of quantized inputs that are constant: initializers as they are, tensors computed
    from constants (a forward-fused weight) evaluated by ORT."""
    from qgraph.idioms import evaluate_constants
    computed = evaluate_constants(model, [t.name for t in tensors if QModel.constant_value(t) is None])
    return {t.name: (np.asarray(QModel.constant_value(t)) if t.name not in computed else computed[t.name])
            for t in tensors}


def bypassed(model: QModel) -> QModel:
    """A copy in which every reader of a quantizer's DequantizeLinear reads the float tensor: the
    float model a QDQ model was made from (calibration observes it; bias correction and
    AdaRound take their float reference from it)."""
    copy = model.copy()
    records = read_quantizers(copy)
    nodes = {n.name: n for n in copy.graph.nodes}
    for r in records.values():
        first = nodes[r.clip or r.quantize]
        dq = nodes[r.dequantize]
        source, out = first.inputs[0], dq.outputs[0]
        if copy.is_graph_output(out):
            continue  # nothing reads it inside the graph; its input is what is observed
        for reader in list(out.outputs):
            reader.inputs = [source if t is out else t for t in reader.inputs]
    copy.cleanup()
    return copy
