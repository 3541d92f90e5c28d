"""ahead_relu: mark tensors whose quantizer need only cover [0, max] (linger's AHEAD_RELU).

If every reader of y = op(x) is Relu(y) or Clip(y, min ≥ 0, ·), then every value of y that
reaches the rest of the model is max(y, 0)-clamped anyway, so quantizing y over [0, max]
loses nothing and doubles its resolution. Marked: outputs of Conv/ConvTranspose
(ahead_conv_relu), BatchNormalization (ahead_bn_relu), Gemm/MatMul (ahead_linear_relu) and
Add (ahead_add_relu), plus every Relu/Clip(0,·) output itself (non-negative by construction).
The names go into the `qgraph.nonnegative` annotation (sorted, merged with what is there),
which insert_qdq reads.

The same holds for activations that clamp an affine map of x (`ahead_clamped`): HardSwish is 0
for every x <= -3 and HardSigmoid(αx + β) is 0 below -β/α and 1 above (1 - β)/α, as one op or
as exported (``x · Clip(x + 3, 0, 6) / 6``: idioms.unary_regions, kinds idioms.CLAMPED_KINDS).
When such a function is the only reader of x, x's quantizer need only cover [lo, hi], the
bounds outside which it is flat (idioms.flat_bounds, measured on the function itself); those go
into `qgraph.range_bounds` ({x: [lo, hi]}, null where unbounded), which insert_qdq writes into
the quantizer (range_floor/range_cap) and calibrate's observers respect. PP-OCRv4's detector
feeds HardSwish with values down to -170: its 8-bit grid spent half its levels below -3.

Invariant: no node or value changes; only the annotation is written.
"""

from __future__ import annotations

import math

from qgraph.annotations import NONNEGATIVE, RANGE_BOUNDS, get_annotation, set_annotation
from qgraph.graph import Node, QModel, Tensor
from qgraph.idioms import CLAMPED_KINDS, Declined, clip_bounds, constant_tensors, flat_bounds, skip, unary_regions
from qgraph.pipeline import PassContext, register_pass

_OPTION_OF_OP = {"Conv": "ahead_conv_relu", "ConvTranspose": "ahead_conv_relu",
                 "BatchNormalization": "ahead_bn_relu",
                 "Gemm": "ahead_linear_relu", "MatMul": "ahead_linear_relu",
                 "Add": "ahead_add_relu"}


@register_pass("ahead_relu", preserves_outputs=True, tolerance=0.0)
def ahead_relu(model: QModel, ctx: PassContext, *, ahead_conv_relu: bool = True, ahead_bn_relu: bool = True,
               ahead_linear_relu: bool = True, ahead_add_relu: bool = True, ahead_clamped: bool = True) -> dict:
    """Annotate Conv/BN/Gemm/MatMul/Add outputs read only by Relu/Clip(0,·) as non-negative, and
    HardSwish/HardSigmoid inputs with the bounds beyond which they are flat."""
    options = {"ahead_conv_relu": ahead_conv_relu, "ahead_bn_relu": ahead_bn_relu,
               "ahead_linear_relu": ahead_linear_relu, "ahead_add_relu": ahead_add_relu}
    marked, activations, skipped = [], [], []
    static = constant_tensors(model)
    for node in model.graph.nodes:
        if node.op in ("Relu", "Clip"):
            if node.outputs and _is_nonnegative_clamp(node):
                activations.append(node.outputs[0].name)
            continue
        option = _OPTION_OF_OP.get(node.op)
        if option is None or not node.outputs or node.outputs[0].name in static:
            continue  # static: weight arithmetic such as fuse_conv_bn's forward-mode subgraphs
        out = node.outputs[0]
        try:
            if not options[option]:
                raise Declined(f"option {option} is off")
            check_ahead(model, out)
            marked.append(out.name)
        except Declined as declined:
            skipped.append(skip(node, declined.reason))

    existing = get_annotation(model, NONNEGATIVE, []) or []
    merged = sorted(set(existing) | set(marked) | set(activations))
    added = len(merged) - len(set(existing))
    if added:
        set_annotation(model, NONNEGATIVE, merged)
    bounded = clamped_inputs(model, static, skipped) if ahead_clamped else {}
    if bounded:
        set_annotation(model, RANGE_BOUNDS, {**(get_annotation(model, RANGE_BOUNDS, {}) or {}), **bounded})
    if marked or activations or bounded:
        summary = (f"{len(marked)} layer output(s) marked non-negative ahead of Relu/Clip, "
                   f"{len(activations)} Relu/Clip output(s) marked, "
                   + (f"{len(bounded)} HardSwish/HardSigmoid input(s) bounded, " if bounded else "")
                   + f"{len(skipped)} candidate(s) not marked")
    else:
        summary = "nothing to do: no Relu/Clip(0,·), HardSwish or HardSigmoid in the model" if not skipped else \
            f"nothing marked: {len(skipped)} candidate(s) not followed only by Relu/Clip(0,·)"
    return {"changed": added + len(bounded), "summary": summary, "marked": sorted(marked),
            "activations_marked": sorted(activations), "bounded": bounded, "skipped": skipped, "warnings": []}


def clamped_inputs(model: QModel, static: set[str], skipped: list) -> dict[str, list]:
    """{x: [lo, hi]} (None where unbounded) for each input x of a unary region of
    idioms.CLAMPED_KINDS that is x's only reader and is flat below lo or above hi; the regions
    that do not qualify are appended to `skipped` with the reason."""
    tensors, nodes = model.tensors(), {n.name: n for n in model.graph.nodes}
    bounded = {}
    for region in unary_regions(model):
        if region.kind not in CLAMPED_KINDS or region.input in static or region.input not in tensors:
            continue
        x = tensors[region.input]
        try:
            if model.is_graph_output(x):
                raise Declined(f"'{x.name}' is a graph output")
            outside = [reader.name for reader in x.outputs if reader.name not in region.nodes]
            if outside:
                raise Declined(f"'{x.name}' is also read by '{outside[0]}', outside the {region.kind}")
            lo, hi = flat_bounds(model, region)
            if not (math.isfinite(lo) or math.isfinite(hi)):
                raise Declined(f"the {region.kind} of '{x.name}' is not flat on either side")
        except Declined as declined:
            skipped.append(skip(nodes[region.nodes[0]], declined.reason))
            continue
        bounded[x.name] = [lo if math.isfinite(lo) else None, hi if math.isfinite(hi) else None]
    return bounded


def check_ahead(model: QModel, tensor: Tensor) -> None:
    """Declined unless `tensor` may be quantized over [0, max] alone: every reader clamps at ≥ 0."""
    if model.is_graph_output(tensor):
        raise Declined(f"'{tensor.name}' is a graph output")
    if not tensor.outputs:
        raise Declined(f"'{tensor.name}' has no consumers")
    for consumer in tensor.outputs:
        if consumer.op not in ("Relu", "Clip"):
            raise Declined(f"consumer {consumer.op} is not Relu/Clip(0,·) ('{consumer.name}')")
        if consumer.inputs[0] is not tensor:
            raise Declined(f"'{tensor.name}' is a bound of Clip '{consumer.name}', not its data input")
        check_nonnegative_clamp(consumer)


def check_nonnegative_clamp(node: Node) -> None:
    """Declined unless `node` (Relu or Clip) outputs only values ≥ 0."""
    low, _ = clip_bounds(node)
    if low == float("-inf"):
        raise Declined(f"Clip '{node.name}' has no min (−inf)")
    if not low >= 0:
        raise Declined(f"Clip '{node.name}' min {low:g} is below 0")


def _is_nonnegative_clamp(node: Node) -> bool:
    try:
        check_nonnegative_clamp(node)
        return True
    except Declined:
        return False
