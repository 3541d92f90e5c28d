"""dequantize_dynamic: float layers back from ONNX Runtime's dynamic quantization.

A model that went through ``onnxruntime.quantization.quantize_dynamic`` (ddddocr's
common_old.onnx, many "int8" models on the hubs) computes each layer as

    (q_x, s_x, z_x) = DynamicQuantizeLinear(x)                      per batch, uint8
    y = s_x·s_w · (ConvInteger|MatMulInteger(q_x, q_w, z_x, z_w) [+ ⌊b / (s_x·s_w)⌋])
    LSTM: DynamicQuantizeLSTM(x, q_W, q_R, B, …, s_W, z_W, s_R, z_R)

with its weights stored as integers. Static quantization needs the float layer it came from;
this pass writes it back:

    y = Conv|MatMul(x, W) [+ b]        W = s_w · (q_w − z_w)        (per tensor or per channel)
    LSTM(x, W, R, B, …)                W = transpose(s_W · (q_W − z_W))  (ORT stores W as D×I×4H)

Invariant: every weight is exactly the dequantized weight the dynamic model multiplied with,
and the bias is the float bias ORT divided by s_x·s_w, so the outputs differ from the dynamic
model's only by what the dynamic model rounded away: each activation's ½·s_x (and the floored
bias, < s_x·s_w). A layer whose pattern does not match is left as it is, with the reason in the
report. Models without dynamic quantization are unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qgraph.graph import Node, QModel, Tensor
from qgraph.idioms import Declined, skip
from qgraph.pipeline import PassContext, register_pass

_INTEGER_LAYERS = {"ConvInteger": "Conv", "MatMulInteger": "MatMul"}
_FLOAT = 1  # onnx.TensorProto.FLOAT


@register_pass("dequantize_dynamic", preserves_outputs=False)
def dequantize_dynamic(model: QModel, ctx: PassContext, *, keep_lstm: bool = False) -> dict:
    """ConvInteger/MatMulInteger/DynamicQuantizeLSTM of a dynamically quantized model → float layers
    (`keep_lstm`: DynamicQuantizeLSTM stays: qgraph has no static form of an LSTM to put in its place,
    and ORT runs the float LSTM 3x slower; training needs it float)."""
    restored, skipped, kept = {}, [], 0
    for node in list(model.graph.nodes):
        lstm = node.op == "DynamicQuantizeLSTM" and node.domain == "com.microsoft"
        if node.op not in _INTEGER_LAYERS and not lstm:
            continue
        if lstm and keep_lstm:
            kept += 1
            skipped.append(skip(node, "kept (keep_lstm): its int8 weights and run-time quantization stay as shipped"))
            continue
        try:
            if node.op == "DynamicQuantizeLSTM":
                _restore_lstm(model, node)
            else:
                _restore_layer(model, node)
        except Declined as declined:
            skipped.append(skip(node, declined.reason))
            continue
        restored[node.op] = restored.get(node.op, 0) + 1
    if restored:
        model.cleanup()
    changed = sum(restored.values())
    left = ", ".join(f"{n} {op}" for op, n in sorted(restored.items()))
    summary = (f"{changed} dynamically quantized layers made float ({left})" if changed
               else "no dynamically quantized layers") + (f", {kept} DynamicQuantizeLSTM kept" if kept else "")
    return {"changed": changed, "summary": summary, "restored": restored, "skipped": skipped}


def _restore_layer(model: QModel, layer: Node) -> None:
    """ConvInteger/MatMulInteger on a DynamicQuantizeLinear input, with ORT's integer bias and
    output scaling, becomes the float Conv/MatMul (+ bias) writing the same output tensor."""
    q_x, q_w = layer.inputs[0], layer.inputs[1]
    quantizer = model.producer(q_x)
    if quantizer is None or quantizer.op != "DynamicQuantizeLinear":
        raise Declined("its integer input is not computed by DynamicQuantizeLinear")
    x, s_x, z_x = quantizer.inputs[0], quantizer.outputs[1], quantizer.outputs[2]
    if len(layer.inputs) > 2 and layer.inputs[2].name and layer.inputs[2] is not z_x:
        raise Declined("its input zero point is not the DynamicQuantizeLinear's")
    w_int = QModel.constant_value(q_w)
    w_zero = _optional_constant(layer, 3, np.zeros((), np.int32))
    if w_int is None or w_zero is None:
        raise Declined("its weight or weight zero point is not a constant")

    after = _only_reader(layer.outputs[0])
    bias = None
    if after is not None and after.op == "Add":
        bias = _integer_bias(model, after, layer.outputs[0])
        after = _only_reader(after.outputs[0])
    if after is None or after.op != "Cast" or _attr(after, "to") != _FLOAT:
        raise Declined("its int32 result is not cast to float")
    scaling = _only_reader(after.outputs[0])
    if scaling is None or scaling.op != "Mul":
        raise Declined("its float result is not scaled by one Mul")
    s_w = _weight_scale(model, scaling, after.outputs[0], s_x)

    op = _INTEGER_LAYERS[layer.op]
    weight = _dequantize(op, w_int, w_zero, s_w)
    name = _float_name(layer)
    inputs = [x, model.add_constant(f"{name}.weight", weight)]
    if bias is not None and op == "Conv":
        inputs.append(model.add_constant(f"{name}.bias", bias))
    y = scaling.outputs[0]
    scaling.outputs.clear()
    attrs = dict(layer.attrs) if op == "Conv" else {}
    if op == "MatMul" and bias is not None:     # MatMul has no bias input: an Add of the float bias
        product = model.add_variable(f"{name}.product", np.float32)
        model.add_node("MatMul", inputs, [product], name)
        model.add_node("Add", [product, model.add_constant(f"{name}.bias", bias)],
                       [y], f"{name}.bias_add")
    else:
        model.add_node(op, inputs, [y], name, attrs)
    layer.outputs.clear()


def _integer_bias(model: QModel, add: Node, accumulator: Tensor) -> np.ndarray:
    """The float bias b of ORT's ``Reshape(Cast(Floor(b / (s_x·s_w))))`` added to the accumulator."""
    other = next(t for t in add.inputs if t is not accumulator)
    node = model.producer(other)
    while node is not None and node.op in ("Reshape", "Cast", "Floor", "Round"):
        node = model.producer(node.inputs[0])
    if node is None or node.op != "Div":
        raise Declined("the integer bias is not ORT's quantized float bias (Div → Floor → Cast)")
    bias = QModel.constant_value(node.inputs[0])
    if bias is None:
        raise Declined("the float bias is not a constant")
    return np.asarray(bias, np.float32).reshape(-1)


def _weight_scale(model: QModel, scaling: Node, value: Tensor, s_x: Tensor) -> np.ndarray:
    """s_w from the output scaling ``Mul(value, Mul(s_x, s_w))``."""
    scale = next((t for t in scaling.inputs if t is not value), None)
    product = model.producer(scale) if scale is not None else None
    if product is None or product.op != "Mul" or s_x not in product.inputs:
        raise Declined("its output scale is not the input scale times a weight scale")
    s_w = QModel.constant_value(next(t for t in product.inputs if t is not s_x))
    if s_w is None:
        raise Declined("its weight scale is not a constant")
    return np.asarray(s_w, np.float32)


def _dequantize(op: str, w_int: np.ndarray, w_zero: np.ndarray, s_w: np.ndarray) -> np.ndarray:
    """s_w · (q_w − z_w), per tensor, or per output channel (Conv: axis 0; MatMul: the last axis)."""
    w_zero, s_w = np.asarray(w_zero), np.asarray(s_w)
    shape = [1] * w_int.ndim
    axis = 0 if op == "Conv" else w_int.ndim - 1
    for name, value in (("zero point", w_zero), ("scale", s_w)):
        if value.size not in (1, w_int.shape[axis]):
            raise Declined(f"its weight {name} has {value.size} values for {w_int.shape[axis]} channels")
    shape[axis] = -1
    centred = w_int.astype(np.int32) - w_zero.astype(np.int32).reshape(shape if w_zero.size > 1 else ())
    return (centred.astype(np.float32) * s_w.reshape(shape if s_w.size > 1 else ())).astype(np.float32)


def _restore_lstm(model: QModel, node: Node) -> None:
    """DynamicQuantizeLSTM(x, q_W, q_R, B, seq, h0, c0, P, s_W, z_W, s_R, z_R) → LSTM(x, W, R, B, seq, h0, c0, P)."""
    inputs = list(node.inputs) + [gs.Variable.empty()] * (12 - len(node.inputs))
    weights = []
    for q, s, z, what in ((inputs[1], inputs[8], inputs[9], "W"), (inputs[2], inputs[10], inputs[11], "R")):
        values = [QModel.constant_value(t) if t.name else None for t in (q, s, z)]
        if any(v is None for v in values):
            raise Declined(f"its {what}, {what}_scale or {what}_zero_point is not a constant")
        q_int, scale, zero = values
        directions = q_int.shape[0]
        per = (directions, 1, -1) if np.asarray(scale).size > directions else (directions, 1, 1)
        centred = q_int.astype(np.int32) - np.asarray(zero, np.int32).reshape(per if np.asarray(zero).size > 1 else ())
        dequantized = centred.astype(np.float32) * np.asarray(scale, np.float32).reshape(per)
        weights.append(np.ascontiguousarray(dequantized.transpose(0, 2, 1)))   # D×I×4H → ONNX's D×4H×I
    name = _float_name(node)
    w, r = (model.add_constant(f"{name}.{what}", value)
            for what, value in zip("WR", weights))
    float_inputs = [inputs[0], w, r] + inputs[3:8]
    while float_inputs and not float_inputs[-1].name:
        float_inputs.pop()
    outputs = list(node.outputs)
    node.outputs.clear()
    model.add_node("LSTM", float_inputs, outputs, name, dict(node.attrs))


def _float_name(node: Node) -> str:
    """The float layer's name: ORT's quantizer appended "_quant" to the original one."""
    return node.name.removesuffix("_quant") or node.op.removesuffix("Integer")


def _optional_constant(node: Node, index: int, default: np.ndarray) -> np.ndarray | None:
    if len(node.inputs) <= index or not node.inputs[index].name:
        return default
    return QModel.constant_value(node.inputs[index])


def _only_reader(tensor: Tensor) -> Node | None:
    readers = list(tensor.outputs)
    return readers[0] if len(readers) == 1 else None


def _attr(node: Node, name: str):
    return node.attrs.get(name)
