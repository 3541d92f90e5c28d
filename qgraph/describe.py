"""What `qgraph inspect` shows: opset, inputs/outputs, op histogram, parameters,
qgraph annotations and QDQ pairs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

from qgraph.annotations import all_annotations
from qgraph.idioms import constant_tensors
from qgraph.interp.registry import ops_in_bodies, subgraphs
from qgraph.model_io import default_opset


def _shape(value_info: onnx.ValueInfoProto) -> list:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


def _dtype(value_info: onnx.ValueInfoProto) -> str:
    elem = value_info.type.tensor_type.elem_type
    return onnx.helper.tensor_dtype_to_np_dtype(elem).name if elem else "?"


def qdq_pairs(model: onnx.ModelProto) -> list[dict]:
    """Every QuantizeLinear whose output feeds a DequantizeLinear: tensor, pair nodes, storage."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    inits = {i.name: i for i in model.graph.initializer}
    static = constant_tensors(model)
    pairs = []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        for deq in consumers.get(node.output[0], []):
            if deq.op_type != "DequantizeLinear":
                continue
            zp = inits.get(node.input[2]) if len(node.input) > 2 else None
            storage = onnx.helper.tensor_dtype_to_np_dtype(zp.data_type).name if zp is not None else "uint8"
            scale = inits.get(node.input[1])
            per_channel = scale is not None and int(np.prod(scale.dims)) > 1
            pairs.append({"tensor": node.input[0], "quantize": node.name, "dequantize": deq.name,
                          "storage": storage, "per_channel": per_channel,
                          "weight": node.input[0] in static})
    return pairs


_INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearConcat",
                "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu",
                "ConvInteger", "MatMulInteger"}


def integer_ops(model: onnx.ModelProto) -> int:
    """How many nodes compute on quantized integers directly (a lowered model)."""
    return sum(n.op_type in _INTEGER_OPS for n in model.graph.node)


#: ONNX Runtime's quantize_dynamic: activations quantized per batch inside the model.
_DYNAMIC_QUANTIZERS = ("DynamicQuantizeLinear", "DynamicQuantizeLSTM")


def dynamic_quantizers(model: onnx.ModelProto) -> int:
    """How many nodes quantize activations at run time (a dynamically quantized model)."""
    return sum(n.op_type in _DYNAMIC_QUANTIZERS for n in model.graph.node)


#: float ops of one tensor (with constants) that a lowered model may run between DQ and Q
_ELEMENTWISE_FLOAT = {"HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "Relu", "LeakyRelu", "Clip", "Mul", "Add",
                      "Sub", "Div", "Exp", "Erf", "Gelu", "Softplus", "Elu"}


def float_activation_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes of each ``DQ(codes) → elementwise float ops → Q`` whose ops read only the
    dequantized tensor, each other and constants: a unary activation computed in float from one
    code tensor (what the qlinear lowering writes for a HardSwish where that is faster than a
    table), as opposed to a float island that mixes tensors. The graph's node order is
    topological, so one pass in that order sees each op's inputs first."""
    g = model.graph
    constants = constant_tensors(model)
    producer = {o: n for n in g.node for o in n.output if o}
    consumers: dict[str, list] = {}
    for n in g.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    outputs = {o.name for o in g.output}
    position = {id(n): i for i, n in enumerate(g.node)}
    names = set()
    for n in g.node:
        if n.op_type != "DequantizeLinear" or n.input[0] in constants or n.input[0] not in producer:
            continue
        tensors, members, unary = {n.output[0]}, [n], True
        pending = {id(r): r for r in consumers.get(n.output[0], [])}
        while pending and unary:
            c = pending.pop(min(pending, key=lambda k: position[k]))
            if c.op_type == "QuantizeLinear":
                members.append(c)
            elif c.op_type in _ELEMENTWISE_FLOAT and all(not t or t in tensors or t in constants for t in c.input):
                members.append(c)
                tensors.update(c.output)
                pending.update({id(r): r for t in c.output for r in consumers.get(t, [])})
            else:
                unary = False
        kinds = {m.op_type for m in members[1:]}
        if unary and "QuantizeLinear" in kinds and len(kinds) > 1 and not tensors & outputs:
            names.update(m.name for m in members if m.name)
    return names


def describe_model(model: onnx.ModelProto) -> dict:
    inits = {i.name for i in model.graph.initializer}
    params = sum(int(np.prod(i.dims)) for i in model.graph.initializer)
    return {
        "ir_version": model.ir_version,
        "opset": default_opset(model),
        "opsets": {imp.domain or "ai.onnx": imp.version for imp in model.opset_import},
        "inputs": [{"name": i.name, "dtype": _dtype(i), "shape": _shape(i)}
                   for i in model.graph.input if i.name not in inits],
        "outputs": [{"name": o.name, "dtype": _dtype(o), "shape": _shape(o)} for o in model.graph.output],
        "nodes": len(model.graph.node),
        "ops": dict(Counter(n.op_type for n in model.graph.node).most_common()),
        "bodies": {n.name or n.output[0]: dict(ops_in_bodies(n).most_common())
                   for n in model.graph.node if subgraphs(n)},
        "parameters": params,
        "annotations": all_annotations(model),
        "qdq_pairs": qdq_pairs(model),
        "integer_ops": integer_ops(model),
        "dynamic_quantizers": dynamic_quantizers(model),
    }


def format_description(info: dict, name: str = "model") -> str:
    lines = [f"{name}: IR {info['ir_version']}, opsets "
             + ", ".join(f"{d} {v}" for d, v in info["opsets"].items()),
             f"nodes {info['nodes']}, parameters {info['parameters']:,}"]
    for kind in ("inputs", "outputs"):
        for t in info[kind]:
            lines.append(f"  {kind[:-1]:<6} {t['name']}: {t['dtype']} {t['shape']}")
    lines.append("ops: " + ", ".join(f"{op} {n}" for op, n in info["ops"].items()))
    for node, ops in info.get("bodies", {}).items():
        lines.append(f"  inside {node}'s bodies: " + ", ".join(f"{op} {n}" for op, n in ops.items()))
    for key, value in info["annotations"].items():
        shown = value if len(str(value)) < 120 else f"{str(value)[:117]}..."
        lines.append(f"annotation qgraph.{key}: {shown}")
    pairs = info["qdq_pairs"]
    if pairs:
        weights = sum(p["weight"] for p in pairs)
        lines.append(f"QDQ pairs: {len(pairs)} ({weights} weights, {len(pairs) - weights} activations)")
        for p in pairs:
            kind = "weight" if p["weight"] else "act"
            axis = "per-channel" if p["per_channel"] else "per-tensor"
            lines.append(f"  {kind:<6} {p['tensor']}: {p['storage']} {axis}")
    elif info["dynamic_quantizers"]:
        lines.append(f"QDQ pairs: none; dynamically quantized (ONNX Runtime quantize_dynamic): "
                     f"{info['dynamic_quantizers']} run-time quantizers, {info['integer_ops']} integer ops; "
                     "the dequantize_dynamic pass (first in ptq/qat) restores its float layers")
    elif info["integer_ops"]:
        lines.append(f"QDQ pairs: none; {info['integer_ops']} integer ops (a lowered model)")
    else:
        lines.append("QDQ pairs: none (float model)")
    return "\n".join(lines)
