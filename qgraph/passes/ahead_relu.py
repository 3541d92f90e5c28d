"""ahead_relu: mark tensors whose quantizer need only cover [0, max] (linger's AHEAD_RELU).

If every reader of y = op(x) is Relu(y) or Clip(y, min ≥ 0, ·), then every value of y that
reaches the rest of the model is max(y, 0)-clamped anyway, so quantizing y over [0, max]
loses nothing and doubles its resolution. Marked: outputs of Conv/ConvTranspose
(ahead_conv_relu), BatchNormalization (ahead_bn_relu), Gemm/MatMul (ahead_linear_relu) and
Add (ahead_add_relu), plus every Relu/Clip(0,·) output itself (non-negative by construction).
The names go into the `qgraph.nonnegative` annotation (sorted, merged with what is there),
which insert_qdq reads.

Invariant: no node or value changes; only the annotation is written.
"""

from __future__ import annotations

from qgraph.annotations import NONNEGATIVE, get_annotation, set_annotation
from qgraph.graph import Node, QModel, Tensor
from qgraph.idioms import Declined, clip_bounds, constant_tensors, skip
from qgraph.pipeline import PassContext, register_pass

_OPTION_OF_OP = {"Conv": "ahead_conv_relu", "ConvTranspose": "ahead_conv_relu",
                 "BatchNormalization": "ahead_bn_relu",
                 "Gemm": "ahead_linear_relu", "MatMul": "ahead_linear_relu",
                 "Add": "ahead_add_relu"}


@register_pass("ahead_relu", preserves_outputs=True, tolerance=0.0)
def ahead_relu(model: QModel, ctx: PassContext, *, ahead_conv_relu: bool = True, ahead_bn_relu: bool = True,
               ahead_linear_relu: bool = True, ahead_add_relu: bool = True) -> dict:
    """Annotate Conv/BN/Gemm/MatMul/Add outputs read only by Relu/Clip(0,·) as non-negative."""
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
    if marked or activations:
        summary = (f"{len(marked)} layer output(s) marked non-negative ahead of Relu/Clip, "
                   f"{len(activations)} Relu/Clip output(s) marked, {len(skipped)} candidate(s) not marked")
    else:
        summary = "nothing to do: no Relu/Clip(0,·) in the model" if not skipped else \
            f"nothing marked: {len(skipped)} candidate(s) not followed only by Relu/Clip(0,·)"
    return {"changed": added, "summary": summary, "marked": sorted(marked),
            "activations_marked": sorted(activations), "skipped": skipped, "warnings": []}


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
