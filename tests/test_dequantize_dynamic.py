"""dequantize_dynamic: models from ONNX Runtime's quantize_dynamic get their float layers back.

The peer writes the dynamic model (onnxruntime.quantization.quantize_dynamic); the pass must
recover weights within half a quantization step of the original float ones and outputs close to
both the dynamic model and the original."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph.api import apply_pipeline
from qgraph.graph import QModel
from qgraph.pipeline import run_pass
from qgraph.runner import run_model

quantization = pytest.importorskip("onnxruntime.quantization")


def _float_model(rng) -> onnx.ModelProto:
    """Conv(+bias) → Relu → Conv(per-channel-friendly weights) → Flatten → MatMul + Add, and a
    bidirectional LSTM on a second input: the layers quantize_dynamic rewrites."""
    weights = {
        "w1": rng.normal(0, 0.3, (8, 3, 3, 3)), "b1": rng.normal(0, 0.2, 8),
        "w2": rng.normal(0, 1, (4, 8, 1, 1)) * np.array([0.05, 0.5, 1.0, 2.0]).reshape(4, 1, 1, 1),
        "fc": rng.normal(0, 0.1, (4 * 6 * 6, 10)), "fcb": rng.normal(0, 0.1, 10),
        "W": rng.normal(0, 0.3, (2, 4 * 5, 6)), "R": rng.normal(0, 0.3, (2, 4 * 5, 5)),
        "B": rng.normal(0, 0.1, (2, 8 * 5)),
    }
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], "relu"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], "conv2"),
             helper.make_node("Flatten", ["c2"], ["f"], "flatten"),
             helper.make_node("MatMul", ["f", "fc"], ["m"], "fc"),
             helper.make_node("Add", ["m", "fcb"], ["y"], "fc_bias"),
             helper.make_node("Transpose", ["s"], ["t"], "time_major", perm=[1, 0, 2]),
             helper.make_node("LSTM", ["t", "W", "R", "B"], ["h", "", ""], "lstm", hidden_size=5,
                              direction="bidirectional")]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 7, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [7, 2, "N", 5])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("dyn")
    float_model = _float_model(rng)
    onnx.save(float_model, folder / "float.onnx")
    models = {"float": float_model}
    for per_channel in (False, True):
        out = folder / f"dynamic{int(per_channel)}.onnx"
        quantization.quantize_dynamic(folder / "float.onnx", out, per_channel=per_channel,
                                      weight_type=quantization.QuantType.QUInt8,  # ORT's ConvInteger: uint8 only
                                      op_types_to_quantize=["Conv", "MatMul", "LSTM"])
        models[per_channel] = onnx.load(out)
    feeds = {"x": rng.normal(0, 1, (4, 3, 6, 6)).astype(np.float32),
             "s": rng.normal(0, 1, (4, 7, 6)).astype(np.float32)}
    return models, feeds


@pytest.mark.parametrize("per_channel", [False, True])
def test_dynamic_layers_become_float_with_the_weights_they_multiplied(models, per_channel):
    models, feeds = models
    dynamic = models[per_channel]
    ops = collections.Counter(n.op_type for n in dynamic.graph.node)
    assert ops["ConvInteger"] == 2 and ops["MatMulInteger"] == 1 and ops["DynamicQuantizeLSTM"] == 1

    q = QModel.from_onnx(dynamic)
    report = run_pass(q, "dequantize_dynamic")
    restored = q.to_onnx()
    assert report["restored"] == {"ConvInteger": 2, "MatMulInteger": 1, "DynamicQuantizeLSTM": 1}
    assert not report["skipped"]
    ops = collections.Counter(n.op_type for n in restored.graph.node)
    assert ops["Conv"] == 2 and ops["MatMul"] == 1 and ops["LSTM"] == 1
    assert not {"DynamicQuantizeLinear", "ConvInteger", "MatMulInteger", "DynamicQuantizeLSTM", "Floor"} & set(ops)

    # every restored weight is the original within half of the step it was stored with
    original = {i.name: numpy_helper.to_array(i) for i in models["float"].graph.initializer}
    values = {i.name: numpy_helper.to_array(i) for i in restored.graph.initializer}
    layers = {n.name: n for n in restored.graph.node if n.op_type in ("Conv", "MatMul", "LSTM")}
    assert set(layers) == {"conv1", "conv2", "fc", "lstm"}, "each float layer takes its original name back"
    for layer, name in {"conv1": "w1", "conv2": "w2", "fc": "fc", "lstm": "W"}.items():
        node = layers[layer]
        w, ref = values[node.input[1]], original[name]
        # ORT's coarsest grid is per tensor, symmetric int8: |w|max / 127 (uint8, per channel: finer)
        step = np.abs(ref).max() / 127
        assert w.shape == ref.shape and np.abs(w - ref).max() <= step / 2 + 1e-7, node.name
    lstm = layers["lstm"]
    np.testing.assert_allclose(values[lstm.input[2]], original["R"], atol=np.abs(original["R"]).max() / 127)
    np.testing.assert_array_equal(values[lstm.input[3]], original["B"])

    # outputs: close to the dynamic model's and to the original float model's
    float_out, dynamic_out, restored_out = (run_model(m, feeds) for m in (models["float"], dynamic, restored))
    for name in ("y", "h"):
        scale = float(np.abs(float_out[name]).max())
        assert np.abs(restored_out[name] - dynamic_out[name]).max() < 0.05 * scale
        assert np.abs(restored_out[name] - float_out[name]).max() < 0.05 * scale


def test_ptq_quantizes_a_dynamic_model_statically(models):
    """The bundled ptq pipeline starts with dequantize_dynamic, so a quantize_dynamic model gets
    static QDQ quantizers on its restored layers (insert_qdq finds compute ops again); its
    DynamicQuantizeLSTM stays (keep_lstm), while qat, which trains it, makes it float."""
    models, feeds = models
    data = {k: v for k, v in feeds.items()}
    quantized = apply_pipeline(models[True], "ptq", data)
    ops = collections.Counter(n.op_type for n in quantized.graph.node)
    assert ops["Conv"] == 2 and ops["MatMul"] == 1 and ops["QuantizeLinear"] >= 5
    assert "DynamicQuantizeLinear" not in ops and ops["DynamicQuantizeLSTM"] == 1 and "LSTM" not in ops
    dynamic_h, kept_h = run_model(models[True], feeds)["h"], run_model(quantized, feeds)["h"]
    np.testing.assert_array_equal(kept_h, dynamic_h)        # the LSTM's own input is not quantized
    prepared = collections.Counter(n.op_type for n in apply_pipeline(models[True], "qat", data).graph.node)
    assert prepared["LSTM"] == 1 and "DynamicQuantizeLSTM" not in prepared
    reference, got = run_model(models["float"], feeds)["y"], run_model(quantized, feeds)["y"]
    cosine = float(np.sum(reference * got) / np.linalg.norm(reference) / np.linalg.norm(got))
    assert cosine > 0.99


def test_a_model_without_dynamic_quantization_is_unchanged(models):
    models, _ = models
    q = QModel.from_onnx(models["float"])
    report = run_pass(q, "dequantize_dynamic")
    assert report["changed"] == 0 and report["summary"] == "no dynamically quantized layers"
    assert sorted(n.op_type for n in q.to_onnx().graph.node) == sorted(n.op_type for n in models["float"].graph.node)


def test_an_unmatched_pattern_is_reported_not_guessed(models):
    """A ConvInteger whose input comes from a static quantizer is not ORT's dynamic pattern."""
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, None)
    w = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.uint8), "w")
    graph = helper.make_graph([helper.make_node("ConvInteger", ["x", "w"], ["y"], name="conv")], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    q = QModel.from_onnx(model)
    report = run_pass(q, "dequantize_dynamic")
    assert report["changed"] == 0
    assert report["skipped"] == [{"node": "conv", "reason": "its integer input is not computed by DynamicQuantizeLinear"}]


def test_lower_and_inspect_say_what_a_dynamic_model_is(models, tmp_path):
    """`qgraph lower` refuses a quantize_dynamic model in one line that says what to run instead;
    `qgraph inspect` names it dynamically quantized (not "lowered")."""
    from click.testing import CliRunner

    from qgraph.cli import main
    models, _ = models
    path = tmp_path / "dynamic.onnx"
    onnx.save(models[True], path)
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["lower", str(path), "--target", "qlinear", "-o", str(out)])
    assert result.exit_code == 2 and not out.exists()
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "is dynamically quantized" in error[0] and "--pipeline ptq" in error[0]
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0
    assert "dynamically quantized (ONNX Runtime quantize_dynamic): 4 run-time quantizers" in result.output
