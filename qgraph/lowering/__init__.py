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
from qgraph.describe import float_activation_nodes
from qgraph.errors import ConfigError
from qgraph.graph import QModel
from qgraph.idioms import BINARY_ELEMENTWISE, Declined, index_tensors, name_nodes, skip, unary_regions
from qgraph.lowering.tables import lower_region
from qgraph.lowering import channel_padding, conv_transpose, fold, integer, qlinear
from qgraph.lowering.patterns import (DEQUANTIZE, FLOAT_OUTPUT_OPS, QUANTIZE, QUANTIZERS, QInput, check_quantizers,
                                      check_weight_axes, match_site, quantized_region,
                                      read_quantizer, wide_quantizer_nodes)

_MODULES = {"qlinear": qlinear, "integer": integer}
TARGETS = {name: module.RULES for name, module in _MODULES.items()}

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
    coarsened = fold.fit_biases_to_int32(model)
    unsigned = integer.unsign_activations(model) if target == "integer" else 0
    sunk = fold.sink_dequantize(model)
    transposed, transpose_declined = conv_transpose.rewrite_conv_transposes(model)
    if transposed:          # its pixel shuffle runs on the codes: sink the new DequantizeLinear too
        sunk |= fold.sink_dequantize(model)
    warnings = [w for w in [fold.infer_shapes(model)] if w]

    region = quantized_region(model)
    index = index_tensors(model)
    lowered, skipped, kept_float, absorbed, float_heads = Counter(), [], [], set(), set()
    kept = [skip(n, "16-bit quantizer: kept as a QDQ pair (ORT has no 16-bit QLinear*/integer kernels)")
            for n in wide_quantizer_nodes(model)]
    nodes_by_name = {n.name: n for n in model.graph.nodes}
    for unary in unary_regions(model):      # exported activations (HardSwish, SiLU, GELU, ...) as one table
        single = len(unary.nodes) == 1 and nodes_by_name[unary.nodes[0]].op not in BINARY_ELEMENTWISE
        if single or unary.nodes[-1] not in region:
            continue                        # one op with a rule of its own (QLinearSigmoid, a table op)
        absorbed.update(unary.nodes)
        if (reason := _region_float_by_placement(model, unary)) is not None:
            kept_float.extend(skip(name, reason) for name in unary.nodes)
            continue
        module = _MODULES[target]
        try:
            form = lower_region(model, unary, module.TABLES_CHANNELS_LAST, getattr(module, "emit_region", None))
        except Declined as declined:
            skipped.extend(skip(name, declined.reason) for name in unary.nodes)
        else:
            lowered[f"{unary.kind} ({form})"] += 1
    for node in list(model.graph.nodes):
        if node.op in QUANTIZERS or id(node) in absorbed or node.name in absorbed or not node.outputs \
                or node.name not in region or node.name in sunk:
            continue
        if all(t.name in index for t in node.outputs if t.name) or _integer_node(node):
            continue            # shape/index computation: no float values to lower
        if (reason := _float_by_placement(model, node)) is not None:
            kept_float.append(skip(node, reason))
            continue
        rule = rules.get(node.op)
        if rule is None:
            skipped.append(skip(node, transpose_declined.get(node.name)
                                or f"unsupported op: {node.op} has no {target} lowering"))
            continue
        float_output = node.op in FLOAT_OUTPUT_OPS and not _quantized_output(node)
        before = {id(n) for n in model.graph.nodes} if float_output else set()
        try:
            site = match_site(model, node, index)
            form = rule(model, site)
        except Declined as declined:
            skipped.append(skip(node, declined.reason))
            continue
        if float_output:        # its float tail (Cast + Mul of the accumulator) is float by design
            float_heads.update(n.name for n in model.graph.nodes if id(n) not in before)
        lowered[f"{node.op} ({form})" if isinstance(form, str) else node.op] += 1
        absorbed.update(id(n) for n in site.act_nodes)
        for act in site.act_nodes:
            lowered[act.op + " (folded)"] += 1
    requantized = _lower_requantize_pairs(model, target)
    casts_skipped = integer.skip_narrowing_casts(model) if target == "integer" else 0
    pools_split = integer.separable_max_pools(model) if target == "integer" else 0
    model.cleanup()
    if (failed := fold.infer_shapes(model)) is not None:
        warnings.append(failed + "; unknown types count as float in the integer-only check")
    upsampled = qlinear.upsample_channels_last(model) if target == "qlinear" else 0
    if upsampled:
        model.cleanup()
    concat_folded = qlinear.fold_concat_requantization(model) if target == "qlinear" else 0
    carried = channel_padding.carry_padded_channels(model) if target == "qlinear" else 0

    activations = frozenset(float_activation_nodes(model.to_onnx()))   # qlinear's DQ → HardSwish → Q
    region = quantized_region(model, activations) | activations
    # float by design: islands insert_qdq left float, float heads of compute ops, and index
    # computation that happens to write float (ConstantOfShape); declined nodes do count
    by_design = {e["node"] for e in kept_float} | float_heads
    float_left = [n.name for n in integer.float_nodes(model) if n.name in region and n.name not in by_design
                  and not all(t.name in index for t in n.outputs if t.name)] if target == "integer" else []
    if float_left:
        warnings.append(f"{len(float_left)} float node(s) remain inside the integer region: "
                        + ", ".join(float_left[:8]) + (" …" if len(float_left) > 8 else ""))
    outside = [skip(n, "outside the quantized region: no quantizer on its input or output "
                    "(a skip / quantize_output: false rule, or float pre/post-processing)")
               for n in model.graph.nodes
               if n.op not in QUANTIZERS and n.name not in region and not _integer_node(n)]
    changed = sum(lowered.values())
    as_float = sum(count for label, count in lowered.items() if "(float " in label)
    summary = (f"{target}: {changed} ops lowered"
               + (f" ({as_float} as float activations: DequantizeLinear → op → QuantizeLinear, faster in ORT "
                  "than a table and with its codes)" if as_float else "")
               + f", {len(skipped)} left float"
               + (f", {len(kept_float)} float by placement (float islands: no quantizer around them)"
                  if kept_float else "")
               + (f", {len(outside)} float outside the quantized region" if outside else "")
               + (f", {folded} constant nodes folded" if folded else "")
               + (f", {sum(coarsened.values())} weight channels on a coarser grid so their bias fits int32"
                  if coarsened else "")
               + (f", {len(kept)} 16-bit Q/DQ nodes kept" if kept else ""))
    return {"changed": changed, "summary": summary, "skipped": skipped, "warnings": warnings,
            "target": target, "lowered": dict(sorted(lowered.items())), "folded_constant_nodes": folded,
            "forward_fused_bn_folded": forward_bn,
            "weights_coarsened_for_int32_bias": coarsened, "activations_made_unsigned": unsigned,
            "dequantize_sunk": len(sunk), "conv_transpose_as_conv": transposed,
            "nearest_upsampling_as_expand": upsampled, "concat_requantization_in_tables": concat_folded,
            "channel_pads_and_slices_removed": carried,
            "requantize_pairs": requantized,
            "narrowing_casts_skipped": casts_skipped, "max_pools_split": pools_split, "float_nodes": float_left,
            "outside_region": outside, "float_by_placement": kept_float,
            "kept_qdq": kept}


def _float_by_placement(model: QModel, node) -> str | None:
    """Why `node` is meant to stay float (insert_qdq put no quantizer around it), or None when it
    reads dequantized values and writes a quantized one (or is a compute op writing float)."""
    dequantized = any((p := model.producer(t)) is not None and p.op == DEQUANTIZE for t in node.inputs if t.name)
    if not dequantized:
        return "float by placement: none of its inputs is dequantized (a float island)"
    if not _quantized_output(node) and node.op not in FLOAT_OUTPUT_OPS:
        return "float by placement: no integer op reads its output"
    return None


def _quantized_output(node) -> bool:
    """Some reader of `node`'s output quantizes it (directly, or after a Relu/Clip that folds in)."""
    return any(c.op == QUANTIZE for t in node.outputs for c in t.outputs) or any(
        c.op in ("Relu", "Clip") and any(cc.op == QUANTIZE for o in c.outputs for cc in o.outputs)
        for t in node.outputs for c in t.outputs)


def _region_float_by_placement(model: QModel, unary) -> str | None:
    tensors = model.tensors()
    producer = model.producer(tensors[unary.input])
    readers = tensors[unary.output].outputs
    if producer is None or producer.op != DEQUANTIZE:
        # as for a single node: no quantizer on its input is the placement's choice (insert_qdq's
        # for a region that first takes a Log/Sqrt/Reciprocal, or another tool's), also where
        # an integer op after it reads its output quantized
        return (f"float by placement: the {unary.kind} reads and writes float (a float island)"
                if not any(r.op == QUANTIZE for r in readers) else
                f"float by placement: the {unary.kind} reads float (no quantizer on its input)")
    return None


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
