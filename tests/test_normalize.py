import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import make_small_cnn, small_data
from qgraph.annotations import get_annotation
from qgraph.errors import ConfigError, PassError
from qgraph.graph import QModel
from qgraph.pipeline import run_pass
from qgraph.runner import run_model


def const(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def make_known_model(extra_inputs=(), weight_as_input=False) -> onnx.ModelProto:
    """conv1 (weights −10..+7, bias ±9) -> relu -> conv2 (shares conv1.bias) -> flatten -> fc (transB)."""
    conv1_w = np.linspace(-10, 7, 2 * 1 * 3 * 3).reshape(2, 1, 3, 3)   # 2 values < −8
    conv2_w = np.full((2, 2, 1, 1), 0.5)
    conv2_w[0, 0, 0, 0] = 12.0                                          # 1 value > 8
    fc_w = np.array([[9.0, -9.0, 1.0, 0.0] * 8, [0.1] * 32])             # 16 values beyond ±8
    inits = [const("conv2.weight", conv2_w), const("conv1.bias", [9.0, -3.0]),
             const("fc.weight", fc_w), const("fc.bias", [20.0, -0.5])]
    if not weight_as_input:
        inits.append(const("conv1.weight", conv1_w))
    n = helper.make_node
    nodes = [n("Conv", ["input", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             n("Relu", ["c1"], ["r1"], name="relu1"),
             n("Conv", ["r1", "conv2.weight", "conv1.bias"], ["c2"], name="conv2"),
             n("Flatten", ["c2"], ["f"], name="flatten"),
             n("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(
        nodes, "known", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 4, 4]), *extra_inputs],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def feeds(count=8, scale=5.0):
    return {"input": (np.random.default_rng(0).random((count, 1, 4, 4)) * scale).astype(np.float32)}


def constants(model: QModel) -> dict[str, np.ndarray]:
    return {name: t.values for name, t in model.tensors().items() if isinstance(t, gs.Constant)}


def test_counts_clipped_values_exactly():
    model = QModel.from_onnx(make_known_model())
    report = run_pass(model, "normalize", {"activation": None})
    # conv1.bias is shared by conv1 and conv2: each gets a private clamped copy of it
    assert report["clipped"] == {"conv1.weight": 2, "conv1.bias": 2, "conv2.weight": 1,
                                 "fc.weight": 16, "fc.bias": 1}
    assert report["values_clipped"] == 22
    assert report["clips_inserted"] == 0
    values = constants(model)
    assert values["conv1.weight"].min() == -8.0 and values["conv1.weight"].max() == 7.0
    assert values["fc.weight"].max() == 8.0 and values["fc.bias"].tolist() == [8.0, -0.5]
    conv1 = next(n for n in model.graph.nodes if n.name == "conv1")
    assert conv1.inputs[2].values.tolist() == [8.0, -3.0]
    assert report["summary"].startswith("22 values clipped in 5 of 5 tensors")


def test_activation_clips_bound_outputs():
    proto = make_known_model()
    model = QModel.from_onnx(proto)
    report = run_pass(model, "normalize", {"weight": None, "bias": None, "activation": 2.0})
    assert report["activation_clips"] == report["clips_inserted"] == 3 and report["values_clipped"] == 0
    out = run_model(model.to_onnx(), feeds(), ["c1", "c2", "logits"])
    ref = run_model(proto, feeds(), ["c1", "c2", "logits"])
    for name in ("c1", "c2", "logits"):
        assert np.abs(out[name]).max() <= 2.0
        assert np.abs(ref[name]).max() > 2.0  # the bound is active, the check means something
    np.testing.assert_allclose(out["c1"], np.clip(ref["c1"], -2, 2), rtol=1e-6)
    assert [o.name for o in model.to_onnx().graph.output] == ["logits"]


def test_second_run_changes_nothing():
    model = QModel.from_onnx(make_known_model())
    run_pass(model, "normalize")
    nodes = len(model.graph.nodes)
    report = run_pass(model, "normalize")
    assert report["changed"] == 0 and report["values_clipped"] == 0
    assert len(model.graph.nodes) == nodes


def test_skip_by_name_and_regex():
    model = QModel.from_onnx(make_known_model())
    report = run_pass(model, "normalize", {"skip": ["fc", "conv[2-9]", "nothing_here"]})
    assert set(report["clipped"]) == {"conv1.weight", "conv1.bias"}
    assert report["activation_clips"] == 1
    reasons = {s["node"]: s["reason"] for s in report["skipped"]}
    assert reasons == {"fc": "in skip list ('fc')", "conv2": "in skip list ('conv[2-9]')"}
    assert report["warnings"] == ["skip entry 'nothing_here' matched no node"]
    # conv2 still reads the unclamped shared bias
    conv2 = next(n for n in model.graph.nodes if n.name == "conv2")
    assert conv2.inputs[2].values.tolist() == [9.0, -3.0]
    assert conv2.inputs[1].values.max() == 12.0


def test_overrides_by_name_and_regex():
    model = QModel.from_onnx(make_known_model())
    overrides = {"fc": {"weight": 0.5, "bias": None}, "conv.*": {"weight": 9.5, "activation": None}}
    report = run_pass(model, "normalize", {"overrides": overrides})
    assert report["clipped"] == {"conv1.weight": 1, "conv1.bias": 2, "conv2.weight": 1, "fc.weight": 24}
    assert report["activation_clips"] == 1  # only fc keeps the default activation bound
    fc = next(n for n in model.graph.nodes if n.name == "fc")
    assert np.abs(fc.inputs[1].values).max() == 0.5 and fc.inputs[2].values.tolist() == [20.0, -0.5]


def test_op_types_choose_nodes():
    model = QModel.from_onnx(make_known_model())
    report = run_pass(model, "normalize", {"op_types": ["Gemm"]})
    assert set(report["clipped"]) == {"fc.weight", "fc.bias"} and report["activation_clips"] == 1


def test_forward_fused_weight_gets_a_clip_that_canonicalize_folds():
    proto = make_small_cnn(seed=2)
    model = QModel.from_onnx(proto)
    run_pass(model, "fuse_conv_bn", {"mode": "forward"})
    report = run_pass(model, "normalize", {"weight": 0.2, "bias": 0.1, "activation": None})
    assert report["weight_clips"] == 2
    entry = get_annotation(model, "forward_fused_bn")["conv1"]
    clip = model.tensor(entry["folded_weight"]).inputs[0]
    assert clip.op == "Clip"  # the quantizer later put on the annotated name sees the clamped weight
    run_pass(model, "canonicalize")
    conv = next(n for n in model.graph.nodes if n.name == "conv1")
    assert np.abs(conv.inputs[1].values).max() <= 0.2 and np.abs(conv.inputs[2].values).max() <= 0.1
    out = run_model(model.to_onnx(), {"input": small_data(8)["input"]})["logits"]
    assert np.all(np.isfinite(out))


def test_weight_as_graph_input_is_reported():
    extra = [helper.make_tensor_value_info("conv1.weight", TensorProto.FLOAT, [2, 1, 3, 3])]
    model = QModel.from_onnx(make_known_model(extra, weight_as_input=True))
    report = run_pass(model, "normalize")
    assert {"node": "conv1", "reason": "weight: 'conv1.weight' is a graph input, not an initializer"} \
        in report["skipped"]


def test_nan_weight_is_an_error():
    proto = make_known_model()
    for init in proto.graph.initializer:
        if init.name == "fc.weight":
            values = numpy_helper.to_array(init).copy()
            values[1, 3] = np.inf
            init.CopyFrom(numpy_helper.from_array(values, "fc.weight"))
    with pytest.raises(PassError, match="'fc.weight'.*NaN or Inf"):
        run_pass(QModel.from_onnx(proto), "normalize")


@pytest.mark.parametrize("params,message", [
    ({"weight": -1}, "parameter .weight. must be a number > 0 or null"),
    ({"overrides": {"fc": {"wieght": 1}}}, "unknown key 'wieght'"),
    ({"overrides": ["fc"]}, "parameter .overrides. must be a mapping"),
])
def test_bad_parameters(params, message):
    with pytest.raises(ConfigError, match=message):
        run_pass(QModel.from_onnx(make_known_model()), "normalize", params)


def test_nothing_to_do():
    model = QModel.from_onnx(make_known_model())
    report = run_pass(model, "normalize", {"op_types": ["LSTM"]})
    assert report["changed"] == 0 and report["summary"] == "nothing to do: no LSTM left to normalize"
