"""Preparation shared by both targets, before any op is lowered.

1. Constant folding: every subgraph computed from initializers only — weight QuantizeLinear
   nodes and the forward-fused BN arithmetic ``Q(W·γ/√(σ²+ε))``, ``(b−μ)·γ/√(σ²+ε)+β`` —
   is evaluated once with ONNX Runtime (the same kernels that run the QDQ model), leaving
   ``DequantizeLinear(int8 constant)`` weights and float constant biases. DequantizeLinear is
   never folded: it marks what is quantized.
2. Dequantize sinking: for ops that commute with a per-tensor DequantizeLinear
   (``op(DQ(q)) = DQ(op(q))``: data movement, max pooling, nearest resize, Relu as a clamp at zp),
   ``DQ → op`` without a following QuantizeLinear becomes ``op → DQ`` on the integer tensor.
3. Biases that int32 cannot hold: a Conv/Gemm output channel whose weights have a tiny scale
   (a near-dead channel) but a real bias needs ``b/(s_x·s_w)`` beyond int32; both targets add
   the bias to the int32 accumulator, where it would saturate (PP-OCRv4: up to 19 LSB on such
   channels). Those channels' weights move to a coarser grid ``s_w·2^k`` (quant.
   coarsen_weights_for_int32_bias), which keeps the bias and moves the channel's output by a
   bound far below one output LSB — the QDQ model's own float sum hardly sees those weights.
4. Shape inference, so rules can read ranks and static spatial sizes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qgraph.annotations import FORWARD_FUSED_BN, get_annotation, set_annotation
from qgraph.graph import QModel
from qgraph.idioms import (CLAMPS, RANGE_PRESERVING, Declined, clip_bounds, constant_tensors, evaluate_constants,
                           index_tensors, is_range_preserving, lift_constant_nodes)
from qgraph import quant
from qgraph.lowering.patterns import DEQUANTIZE, QUANTIZE, const, read_quantizer, var, weight_channel_axis


def fold_constants(model: QModel) -> int:
    """Evaluate constant subgraphs once with ORT (onnx-graphsurgeon never folds Q/DQ), keeping each
    DequantizeLinear of a constant that a non-constant node reads — the quantized weights and
    biases; returns the number of nodes removed."""
    lift_constant_nodes(model)
    model.cleanup()
    before = len(model.graph.nodes)
    constant, kept = _constant_tensors(model)
    targets = {}
    for node in model.graph.nodes:
        if id(node) in kept:
            if not isinstance(node.inputs[0], gs.Constant):
                targets[node.inputs[0].name] = node.inputs[0]
            continue
        if not all(id(t) in constant for t in node.outputs if t.name):
            for t in node.inputs:
                if id(t) in constant and not isinstance(t, gs.Constant) and t.name:
                    targets[t.name] = t
    for t in model.graph.outputs:
        if id(t) in constant and not isinstance(t, gs.Constant):
            targets[t.name] = t
    if targets:
        values = evaluate_constants(model, list(targets))
        for name, tensor in targets.items():
            tensor.inputs.clear()  # detach the producer, or cleanup would keep the subgraph
            tensor.to_constant(np.asarray(values[name]))
    model.cleanup()
    if get_annotation(model, FORWARD_FUSED_BN):
        set_annotation(model, FORWARD_FUSED_BN, None)  # the in-graph BN arithmetic is gone now
    return before - len(model.graph.nodes)


def _constant_tensors(model: QModel) -> tuple[set[int], set[int]]:
    """ids of tensors computable from initializers only (idioms.constant_tensors), and ids of
    the DequantizeLinear nodes that stay: computed from constants, read by a non-constant node
    or the graph output."""
    model.toposort()
    names = constant_tensors(model)
    constant = {id(t) for name, t in model.tensors().items() if name in names and not isinstance(t, gs.Constant)}

    def is_const(t) -> bool:
        return isinstance(t, gs.Constant) or id(t) in constant or not t.name

    kept = set()
    for node in model.graph.nodes:
        if node.op != DEQUANTIZE or id(node.outputs[0]) not in constant:
            continue
        out = node.outputs[0]
        if model.is_graph_output(out) or any(not all(is_const(t) for t in c.inputs) for c in out.outputs):
            kept.add(id(node))
    for node in model.graph.nodes:  # what a kept DequantizeLinear writes is not folded
        if id(node) in kept:
            constant.discard(id(node.outputs[0]))
    return constant, kept


def grid_clamp(model: QModel, node: gs.Node, q) -> tuple[int, int] | None:
    """Integer bounds ``(a, b)`` with ``clip(DQ(x), lo, hi) == DQ(clip(x, a, b))`` for a Relu/Clip,
    or None when a bound lies strictly inside the grid's range but off the grid (not exact)."""
    try:
        bounds = list(clip_bounds(node))
    except Declined:
        return None
    ints = []
    for bound, end in zip(bounds, (q.qmin, q.qmax)):
        if not np.isfinite(bound):
            ints.append(end)
            continue
        code = int(q.quantize(np.float32(bound)))
        if float(q.dequantize(np.array(code, q.dtype))) == np.float32(bound) or code == end:
            ints.append(code)
        else:
            return None
    if ints[0] == q.qmin and float(q.dequantize(np.array(q.qmin, q.dtype))) < bounds[0]:
        return None  # the bound saturated at qmin while real values below it exist: not exact
    if ints[1] == q.qmax and float(q.dequantize(np.array(q.qmax, q.dtype))) > bounds[1]:
        return None
    return ints[0], ints[1]


def sink_dequantize(model: QModel) -> set[str]:
    """Rewrite ``DQ → op`` (op commuting, output not quantized) as ``op → DQ``; returns the names
    of the new integer nodes."""
    sunk: set[str] = set()
    model.toposort()
    computed = index_tensors(model)        # Reshape targets computed from shapes at run time
    for node in list(model.graph.nodes):
        if not node.inputs or node.op not in RANGE_PRESERVING + CLAMPS:
            continue
        dq = model.producer(node.inputs[0])
        if dq is None or dq.op != DEQUANTIZE:
            continue
        q = read_quantizer(dq)
        if q is None or q.per_channel:
            continue
        outs = [t for t in node.outputs if t.name]
        out = outs[0]
        if len(outs) == 1 and len(out.outputs) == 1 and out.outputs[0].op == QUANTIZE \
                and not model.is_graph_output(out):
            continue  # a site: the target lowers it with its requantization
        clamp = grid_clamp(model, node, q) if node.op in CLAMPS else None
        if node.op in CLAMPS and clamp is None or node.op not in CLAMPS and not is_range_preserving(node, computed):
            continue
        qin = dq.inputs[0]
        qouts = [var(model, t.name + "_q", q.dtype) for t in outs]
        if clamp is not None:
            lo = const(model, out.name + "_qmin", np.asarray(clamp[0], q.dtype))
            hi = const(model, out.name + "_qmax", np.asarray(clamp[1], q.dtype))
            new = model.add_node("Clip", [qin, lo, hi], qouts, node.name + "_int")
        elif node.op == "Dropout":
            new = model.add_node("Identity", [qin], qouts[:1], node.name + "_int")
        else:
            new = model.add_node(node.op, [qin] + list(node.inputs[1:]), qouts, node.name + "_int", dict(node.attrs))
        sunk.add(new.name)
        node.outputs.clear()
        for t, qout in zip(outs, qouts):     # Split: every output stays on the input's grid
            model.add_node(DEQUANTIZE, [qout, *dq.inputs[1:]], [t], node.name + "_dq", dict(dq.attrs))
    model.cleanup()
    return sunk


def fit_biases_to_int32(model: QModel) -> dict[str, int]:
    """Give each Conv/Gemm whose bias leaves the int32 accumulator at ``s_x·s_w`` a coarser weight
    grid on those channels (a new DequantizeLinear of its own); returns {node: channels changed}."""
    changed = {}
    for node in list(model.graph.nodes):
        if node.op not in ("Conv", "Gemm") or len(node.inputs) < 3 or not node.inputs[2].name:
            continue
        producers = [model.producer(t) for t in node.inputs[:2]]
        if any(p is None or p.op != DEQUANTIZE for p in producers):
            continue
        x_dq, w_dq = producers
        xq, wq = read_quantizer(x_dq), read_quantizer(w_dq)
        codes = model.constant_value(w_dq.inputs[0])
        bias = _real_bias(model, node.inputs[2])
        if xq is None or wq is None or xq.per_channel or codes is None or bias is None:
            continue
        axis = weight_channel_axis(node, 1, codes.ndim)
        if (wq.per_channel and wq.axis % codes.ndim != axis) or bias.size != codes.shape[axis]:
            continue
        zx = xq.scalar_zero_point()
        moved, scale, shifts = quant.coarsen_weights_for_int32_bias(
            bias, xq.scale, max(zx - xq.qmin, xq.qmax - zx), np.moveaxis(codes, axis, 0), wq.scale, wq.zero_point,
            wq.qmin, wq.qmax)
        if not shifts.any():
            continue
        name = f"{node.name}_weight_for_int32_bias"
        weight = var(model, name, np.float32)
        model.add_node(DEQUANTIZE, [const(model, f"{name}_codes", np.moveaxis(moved, 0, axis)),
                                    const(model, f"{name}_scale", scale), *w_dq.inputs[2:3]],
                       [weight], name, dict(w_dq.attrs))
        node.inputs[1] = weight
        changed[node.name] = int(np.count_nonzero(shifts))
    if changed:
        model.cleanup()
    return changed


def _real_bias(model: QModel, tensor) -> np.ndarray | None:
    """A constant bias as float64, read through a DequantizeLinear; None when computed."""
    producer = model.producer(tensor)
    if producer is not None and producer.op == DEQUANTIZE:
        q, codes = read_quantizer(producer), model.constant_value(producer.inputs[0])
        return None if q is None or codes is None else np.asarray(q.dequantize(codes, axis=0), np.float64).reshape(-1)
    value = model.constant_value(tensor)
    return None if value is None else np.asarray(value, np.float64).reshape(-1)


def infer_shapes(model: QModel) -> str | None:
    """Run ONNX shape inference and take the inferred dtypes/shapes into the gs graph; returns
    why it failed (rules needing shapes then decline, and the integer check counts unknown
    types as float), or None."""
    proto = model.to_onnx()
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - reported by the caller, never silent
        return f"shape inference failed ({str(exc).strip().splitlines()[0][:200]})"
    model.graph = gs.import_onnx(proto)
    model.cleanup()
    return None
