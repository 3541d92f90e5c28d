"""Lowering a QDQ model to integer operators: `lower_model(proto, target)`.

Targets: ``qlinear`` (ONNX Runtime's QLinear* operators, qgraph/lowering/qlinear.py) and
``integer`` (integer arithmetic only, qgraph/lowering/integer.py). Both share the matching of
quantized sites (patterns.py) and the preparation (fold.py). A node that cannot be lowered
stays float between its DequantizeLinear and QuantizeLinear and is listed with the reason.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

from qgraph.annotations import FORWARD_FUSED_BN, get_annotation
from qgraph.errors import ConfigError
from qgraph.graph import QModel
from qgraph.idioms import Declined, name_nodes, skip
from qgraph.lowering import fold, integer, qlinear
from qgraph.lowering.patterns import (DEQUANTIZE, QUANTIZE, QUANTIZERS, QInput, check_quantizers, wide_quantizer_nodes,
                                      check_weight_axes, match_site, quantized_region,
                                      read_quantizer)

TARGETS = {"qlinear": qlinear.RULES, "integer": integer.RULES}

__all__ = ["TARGETS", "lower_graph", "lower_model"]


def lower_model(model: onnx.ModelProto, target: str) -> tuple[onnx.ModelProto, dict]:
    """Lower a QDQ ModelProto for `target` ("qlinear" or "integer"); returns (model, report)."""
    qmodel = QModel.from_onnx(model)
    report = lower_graph(qmodel, target)
    return qmodel.to_onnx(), report


def lower_graph(model: QModel, target: str) -> dict:
    """Lower `model` in place; the report lists what was lowered and every node left float, with why."""
    if target not in TARGETS:
        raise ConfigError(f"unknown lowering target '{target}'; valid targets: {', '.join(TARGETS)}")
    rules = TARGETS[target]
    check_quantizers(model)
    name_nodes(model)  # reports, the region and new node names need unique names
    forward_bn = len(get_annotation(model, FORWARD_FUSED_BN, {}) or {})
    folded = fold.fold_constants(model)
    check_weight_axes(model)
    unsigned = integer.unsign_activations(model) if target == "integer" else 0
    sunk = fold.sink_dequantize(model)
    warnings = [w for w in [fold.infer_shapes(model)] if w]

    region = quantized_region(model)
    lowered, skipped, absorbed = Counter(), [], set()
    kept = [skip(n, "16-bit quantizer: kept as a QDQ pair (ORT has no 16-bit QLinear*/integer kernels)")
            for n in wide_quantizer_nodes(model)]
    for node in list(model.graph.nodes):
        if node.op in QUANTIZERS or id(node) in absorbed or not node.outputs or node.name not in region \
                or node.name in sunk:
            continue
        rule = rules.get(node.op)
        if rule is None:
            skipped.append(skip(node, f"unsupported op: {node.op} has no {target} lowering"))
            continue
        try:
            site = match_site(model, node)
            rule(model, site)
        except Declined as declined:
            skipped.append(skip(node, declined.reason))
            continue
        lowered[node.op] += 1
        absorbed.update(id(n) for n in site.act_nodes)
        for act in site.act_nodes:
            lowered[act.op + " (folded)"] += 1
    requantized = _lower_requantize_pairs(model, target)
    model.cleanup()
    if (failed := fold.infer_shapes(model)) is not None:
        warnings.append(failed + "; unknown types count as float in the integer-only check")

    region = quantized_region(model)
    float_left = [n.name for n in integer.float_nodes(model) if n.name in region] if target == "integer" else []
    if float_left:
        warnings.append(f"{len(float_left)} float node(s) remain inside the integer region: "
                        + ", ".join(float_left[:8]) + (" …" if len(float_left) > 8 else ""))
    outside = [skip(n, "outside the quantized region: no quantizer on its input or output "
                    "(a skip / quantize_output: false rule, or float pre/post-processing)")
               for n in model.graph.nodes
               if n.op not in QUANTIZERS and n.name not in region and not _integer_node(n)]
    changed = sum(lowered.values())
    summary = (f"{target}: {changed} ops lowered, {len(skipped)} left float"
               + (f", {len(outside)} float outside the quantized region" if outside else "")
               + (f", {folded} constant nodes folded" if folded else "")
               + (f", {len(kept)} 16-bit Q/DQ nodes kept" if kept else ""))
    return {"changed": changed, "summary": summary, "skipped": skipped, "warnings": warnings,
            "target": target, "lowered": dict(sorted(lowered.items())), "folded_constant_nodes": folded,
            "forward_fused_bn_folded": forward_bn, "activations_made_unsigned": unsigned,
            "dequantize_sunk": len(sunk), "requantize_pairs": requantized, "float_nodes": float_left,
            "outside_region": outside, "kept_qdq": kept}


def _integer_node(node) -> bool:
    """A node whose outputs are all non-float (lowered integer arithmetic, shape computation)."""
    return bool(node.outputs) and all(t.dtype is not None and not np.issubdtype(np.dtype(t.dtype), np.floating)
                                      for t in node.outputs)


def _lower_requantize_pairs(model: QModel, target: str) -> int:
    """``DQ → Q`` left adjacent: drop it when both grids are equal, else (integer target) requantize
    with integers; the qlinear target keeps the pair, which is how ORT changes grids."""
    count = 0
    for node in list(model.graph.nodes):
        if node.op != QUANTIZE or not node.outputs:
            continue
        dq = model.producer(node.inputs[0])
        if dq is None or dq.op != DEQUANTIZE or model.is_graph_output(node.inputs[0]):
            continue
        q_in, q_out = read_quantizer(dq), read_quantizer(node)
        if q_in is None or q_out is None or q_in.per_channel or q_out.per_channel:
            continue
        out = node.outputs[0]
        if q_in.same_grid(q_out):
            node.outputs.clear()
            model.add_node("Identity", [dq.inputs[0]], [out], node.name + "_same_grid")
        elif target == "integer" and q_in.dtype == q_out.dtype == "uint8":
            node.outputs.clear()
            integer.requantize_integer(model, QInput(dq.inputs[0], q_in), q_out, out, node.name + "_requant")
        else:
            continue
        count += 1
    return count
