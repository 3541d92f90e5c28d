"""QDQ <-> FakeQuant training form: same outputs in ORT, exact round trip, trainable scales."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph.fakequant import to_qdq_form, to_training_form, training_form_info

# --- a tiny CNN in three forms: float, QDQ, QDQ with stored integer weights --------------

C = 6  # conv channels


def _f(name, array):
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def tiny_cnn(quant: str = "qdq", fused_bn: bool = True, seed: int = 0, size: int = 8) -> onnx.ModelProto:
    """input [N,1,size,size] -> Conv(+forward-fused BN) -> Relu -> MaxPool -> Gemm -> logits [N,10].

    quant: "none" (float), "qdq" (Q->DQ on input, weights per-channel/per-tensor, activations)
    or "dq_weights" (weights stored as int8 initializers feeding DequantizeLinear, ORT style).
    """
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.5, (C, 1, 3, 3)).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, C)
    beta = rng.normal(0, 0.1, C)
    mean = rng.normal(0, 0.1, C)
    var = rng.uniform(0.5, 2.0, C)
    features = C * (size // 2) ** 2
    fw = rng.normal(0, 1 / np.sqrt(features), (10, features)).astype(np.float32)
    inits = [_f("fc.weight", fw), _f("fc.bias", rng.normal(0, 0.1, 10))]
    nodes = []
    x = "input"
    if quant != "none":
        inits += [_f("input_scale", 1 / 255), numpy_helper.from_array(np.uint8(0), "input_zp")]
        nodes += [helper.make_node("QuantizeLinear", ["input", "input_scale", "input_zp"], ["input_q"], name="q_in"),
                  helper.make_node("DequantizeLinear", ["input_q", "input_scale", "input_zp"], ["input_dq"],
                                   name="dq_in")]
        x = "input_dq"
    inits += [_f("conv.weight", w), _f("conv.bias", np.zeros(C))]
    weight, bias = "conv.weight", "conv.bias"
    if fused_bn:  # forward-fused BN: W*g/sqrt(v+eps) and (b-m)*g/sqrt(v+eps)+beta computed in the graph
        inits += [_f("bn.weight", gamma), _f("bn.bias", beta), _f("bn.running_mean", mean),
                  _f("bn.running_var", var), _f("bn.eps", 1e-5),
                  numpy_helper.from_array(np.array([C, 1, 1, 1], np.int64), "bn.wshape")]
        nodes += [helper.make_node("Add", ["bn.running_var", "bn.eps"], ["bn.var_eps"]),
                  helper.make_node("Sqrt", ["bn.var_eps"], ["bn.std"]),
                  helper.make_node("Div", ["bn.weight", "bn.std"], ["bn.factor"]),
                  helper.make_node("Reshape", ["bn.factor", "bn.wshape"], ["bn.factor4"]),
                  helper.make_node("Mul", ["conv.weight", "bn.factor4"], ["conv.weight_fused"]),
                  helper.make_node("Sub", ["conv.bias", "bn.running_mean"], ["bn.centered"]),
                  helper.make_node("Mul", ["bn.centered", "bn.factor"], ["bn.scaled"]),
                  helper.make_node("Add", ["bn.scaled", "bn.bias"], ["conv.bias_fused"])]
        weight, bias = "conv.weight_fused", "conv.bias_fused"
        w = w * (gamma / np.sqrt(var + 1e-5)).astype(np.float32).reshape(C, 1, 1, 1)
        frozen = ["bn.running_mean", "bn.running_var"]   # what fuse_conv_bn's forward mode records
    w_scale = (np.abs(w).reshape(C, -1).max(1) / 127).astype(np.float32)
    fc_scale = np.float32(np.abs(fw).max() / 127)
    if quant == "qdq":
        inits += [_f("conv.w_scale", w_scale), numpy_helper.from_array(np.zeros(C, np.int8), "conv.w_zp"),
                  _f("fc.w_scale", fc_scale), numpy_helper.from_array(np.int8(0), "fc.w_zp")]
        nodes += [helper.make_node("QuantizeLinear", [weight, "conv.w_scale", "conv.w_zp"], ["w_q"], axis=0),
                  helper.make_node("DequantizeLinear", ["w_q", "conv.w_scale", "conv.w_zp"], ["w_dq"], axis=0),
                  helper.make_node("QuantizeLinear", ["fc.weight", "fc.w_scale", "fc.w_zp"], ["fw_q"]),
                  helper.make_node("DequantizeLinear", ["fw_q", "fc.w_scale", "fc.w_zp"], ["fw_dq"])]
        weight, fc_weight = "w_dq", "fw_dq"
    elif quant == "dq_weights":
        assert not fused_bn, "stored integer weights cannot be forward-fused"
        q = np.clip(np.rint(w / w_scale.reshape(C, 1, 1, 1)), -128, 127).astype(np.int8)
        inits = [t for t in inits if t.name != "conv.weight"]
        inits += [numpy_helper.from_array(q, "conv.weight_q"), _f("conv.w_scale", w_scale)]
        nodes += [helper.make_node("DequantizeLinear", ["conv.weight_q", "conv.w_scale"], ["w_dq"], axis=0)]
        weight, fc_weight = "w_dq", "fc.weight"
    else:
        fc_weight = "fc.weight"
    nodes += [helper.make_node("Conv", [x, weight, bias], ["conv"], pads=[1, 1, 1, 1], name="conv"),
              helper.make_node("Relu", ["conv"], ["relu"], name="relu")]
    act = "relu"
    if quant != "none":
        inits += [_f("relu_scale", 4 / 255), numpy_helper.from_array(np.uint8(0), "relu_zp")]
        nodes += [helper.make_node("QuantizeLinear", ["relu", "relu_scale", "relu_zp"], ["relu_q"], name="q_relu"),
                  helper.make_node("DequantizeLinear", ["relu_q", "relu_scale", "relu_zp"], ["relu_dq"],
                                   name="dq_relu")]
        act = "relu_dq"
    nodes += [helper.make_node("MaxPool", [act], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
              helper.make_node("Flatten", ["pool"], ["flat"]),
              helper.make_node("Gemm", ["flat", fc_weight, "fc.bias"], ["logits"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "tiny_cnn",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if fused_bn:
        from qgraph.annotations import FROZEN, set_annotation
        set_annotation(model, FROZEN, frozen)
    onnx.checker.check_model(model)
    return model


def digits_like(n: int = 64, split: str = "train") -> dict[str, np.ndarray]:
    """The first `n` real 8x8 digits (scikit-learn's, bundled) of a split."""
    from qgraph.models.datasets import load_dataset
    data = load_dataset("digits", split)
    return {"input": data["input"][:n], "labels": data["labels"][:n]}


def ort_run(model: onnx.ModelProto, x: np.ndarray, output: str = "logits") -> np.ndarray:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run([output], {"input": x})[0]


# --- tests ---------------------------------------------------------------------------

@pytest.mark.parametrize("quant,fused", [("qdq", True), ("qdq", False), ("dq_weights", False)])
@pytest.mark.parametrize("learn", [False, True])
def test_training_form_computes_what_the_qdq_model_computes(quant, fused, learn):
    model = tiny_cnn(quant, fused_bn=fused)
    x = digits_like()["input"]
    training, info = to_training_form(model, learn_scales=learn)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in training.graph.node)
    assert sum(n.op_type == "FakeQuant" for n in training.graph.node) == len(info.pairs)
    expected = ort_run(model, x)
    np.testing.assert_allclose(ort_run(training, x), expected, rtol=1e-5, atol=1e-5)
    restored = to_qdq_form(training, {})
    assert [n.op_type for n in restored.graph.node] == [n.op_type for n in model.graph.node]
    assert {t.name for t in restored.graph.initializer} == {t.name for t in model.graph.initializer}
    np.testing.assert_array_equal(ort_run(restored, x), expected)


def test_pair_records_describe_each_quantizer():
    training, info = to_training_form(tiny_cnn("qdq"), learn_scales=True)
    by_scale = {r["scale"]: r for r in info.pairs}
    assert set(by_scale) == {"input_scale", "conv.w_scale", "fc.w_scale", "relu_scale"}
    conv = by_scale["conv.w_scale"]
    assert (conv["axis"], conv["qmin"], conv["qmax"], conv["bits"], conv["dtype"]) == (0, -128, 127, 8, "int8")
    assert conv["weight"] and conv["learned"] and conv["x"] == "conv.weight_fused"
    assert by_scale["relu_scale"]["dtype"] == "uint8" and not by_scale["relu_scale"]["learned"]
    assert info.learned_scales == ["conv.w_scale", "fc.w_scale"]
    assert training_form_info(training).pairs == info.pairs


def test_trained_values_come_back_in_qdq_form():
    model = tiny_cnn("dq_weights", fused_bn=False)
    training, info = to_training_form(model, learn_scales=True)
    float_weight = next(r["x"] for r in info.pairs if r["int_weight"])
    values = {t.name: numpy_helper.to_array(t) for t in training.graph.initializer}
    new_weight = values[float_weight] * 1.5
    new_scale = values["conv.w_scale"] * 2
    restored = to_qdq_form(training, {float_weight: new_weight, "conv.w_scale": new_scale})
    inits = {t.name: numpy_helper.to_array(t) for t in restored.graph.initializer}
    assert inits["conv.weight_q"].dtype == np.int8
    np.testing.assert_array_equal(inits["conv.w_scale"], new_scale)
    expected_q = np.clip(np.rint(new_weight / new_scale.reshape(C, 1, 1, 1)), -128, 127)
    np.testing.assert_array_equal(inits["conv.weight_q"], expected_q)
    x = digits_like()["input"]
    trained = onnx.ModelProto()
    trained.CopyFrom(training)
    for t in trained.graph.initializer:
        if t.name == float_weight:
            t.CopyFrom(numpy_helper.from_array(new_weight, float_weight))
        if t.name == "conv.w_scale":
            t.CopyFrom(numpy_helper.from_array(new_scale, "conv.w_scale"))
    np.testing.assert_allclose(ort_run(restored, x), ort_run(trained, x), rtol=1e-5, atol=1e-5)


def test_float_model_passes_through_unchanged():
    model = tiny_cnn("none")
    training, info = to_training_form(model, learn_scales=True)
    assert not info.quantized
    assert training.SerializeToString() == model.SerializeToString()
    assert to_qdq_form(training).SerializeToString() == model.SerializeToString()


def test_gradient_reaches_learned_scales():
    """One train step moves a learned weight scale; a fixed scale stays put (ORT training)."""
    from qgraph.ort_training import generate_training_artifacts, import_training_api

    _, api = import_training_api()
    training, info = to_training_form(tiny_cnn("qdq"), learn_scales=True)
    data = digits_like(32)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        params = [t.name for t in training.graph.initializer]
        trainable = ["conv.weight", "fc.weight", "fc.bias", "conv.w_scale", "fc.w_scale"]
        generate_training_artifacts(training, trainable, [p for p in params if p not in trainable], tmp)
        state = api.CheckpointState.load_checkpoint(f"{tmp}/checkpoint")
        module = api.Module(f"{tmp}/training_model.onnx", state, f"{tmp}/eval_model.onnx")
        module(data["input"], data["labels"])
        for name in ("conv.w_scale", "fc.w_scale"):
            grad = state.parameters[name].grad
            assert grad is not None and np.all(np.isfinite(grad)) and np.abs(grad).sum() > 0, name


def _with_4_bit_weight_grid(model: onnx.ModelProto, qmin: int = -7, qmax: int = 7) -> onnx.ModelProto:
    """tiny_cnn("qdq") annotated as insert_qdq would for 4-bit weights (storage stays int8)."""
    from qgraph.annotations import set_annotation

    weight_q = {"conv.weight_fused": "q_conv_w", "fc.weight": "q_fc_w"}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in weight_q:
            node.name = weight_q[node.input[0]]
    dequantize = {n.input[0]: n.name for n in model.graph.node if n.op_type == "DequantizeLinear"}
    quantized = {n.name: n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    set_annotation(model, "quantizers", {
        name: {"kind": "weight", "tensor": name, "node": "conv", "quantize": q, "dequantize": dequantize[quantized[q]],
               "clip": None,
               "bits": 4, "qmin": qmin, "qmax": qmax, "signed": True, "symmetric": True, "narrow_range": True,
               "pow2": False, "per_channel": False, "axis": None, "observer": "minmax", "nonnegative": False}
        for name, q in weight_q.items()})
    set_annotation(model, "forward_fused_bn", {"conv": {"weight": "conv.weight", "folded_weight": "conv.weight_fused"}})
    return model


def test_annotated_4_bit_grid_sets_the_fakequant_range_and_export_clamps_weights_onto_it():
    from qgraph.quant import quantize
    from qgraph.runner import Runner

    model = _with_4_bit_weight_grid(tiny_cnn("qdq"))
    training, info = to_training_form(model)
    ranges = {r["scale"]: (r["qmin"], r["qmax"], r["bits"]) for r in info.pairs}
    assert ranges["conv.w_scale"] == ranges["fc.w_scale"] == (-7, 7, 4)
    assert ranges["relu_scale"] == (0, 255, 8)
    fq = [n for n in training.graph.node if n.op_type == "FakeQuant"]
    assert sorted({a.i for n in fq for a in n.attribute if a.name == "quant_max"}) == [7, 255]

    # "trained" weights far outside the 4-bit grid: FakeQuant saturates them at +-7 steps
    values = {t.name: numpy_helper.to_array(t) for t in training.graph.initializer}
    trained = {"conv.weight": values["conv.weight"] * 4, "fc.weight": values["fc.weight"] * 4}
    restored = to_qdq_form(training, trained)
    inits = {t.name: numpy_helper.to_array(t) for t in restored.graph.initializer}
    fused = Runner(restored, ["conv.weight_fused"], optimize=False).run(
        {"input": np.zeros((1, 1, 8, 8), np.float32)}, ["conv.weight_fused"])["conv.weight_fused"]
    for weight, scale, axis in (("fc.weight", "fc.w_scale", None), (fused, "conv.w_scale", 0)):
        weight = inits[weight] if isinstance(weight, str) else weight
        codes = quantize(weight, inits[scale], 0, -128, 127, axis=axis)
        assert codes.min() == -7 and codes.max() == 7, scale
    form = onnx.ModelProto()
    form.CopyFrom(training)
    for t in form.graph.initializer:
        if t.name in trained:
            t.CopyFrom(numpy_helper.from_array(trained[t.name], t.name))
    x = digits_like()["input"]
    np.testing.assert_allclose(ort_run(restored, x), ort_run(form, x), rtol=1e-5, atol=1e-5)


def test_annotated_grid_outside_the_storage_type_is_refused():
    from qgraph.errors import TrainError

    with pytest.raises(TrainError, match=r"q_conv_w.*\[-200, 7\].*int8"):
        to_training_form(_with_4_bit_weight_grid(tiny_cnn("qdq"), qmin=-200))
