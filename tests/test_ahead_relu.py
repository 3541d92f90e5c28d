import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import make_small_cnn, small_data
from qgraph.annotations import NONNEGATIVE, RANGE_BOUNDS, get_annotation, set_annotation
from qgraph.graph import QModel
from qgraph.pipeline import run_pass
from qgraph.runner import run_model


def const(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def make_branchy_model() -> onnx.ModelProto:
    """Every case of ahead_relu on one [N,2,4,4] input; the output sums all branches."""
    rng = np.random.default_rng(0)
    inits = [const("w", rng.normal(size=(2, 2, 1, 1))), const("zero", 0.0), const("six", 6.0),
             const("minus1", -1.0), const("fc.weight", rng.normal(size=(32, 4))),
             const("mm.weight", rng.normal(size=(32, 4))), const("bn.s", [1, 2]), const("bn.b", [0, 1]),
             const("bn.m", [0, 0.5]), const("bn.v", [1, 1])]
    n = helper.make_node
    nodes = [
        n("Conv", ["input", "w"], ["c_relu"], name="conv_relu"), n("Relu", ["c_relu"], ["r1"], name="relu1"),
        n("Conv", ["input", "w"], ["c_bn"], name="conv_bn"),
        n("BatchNormalization", ["c_bn", "bn.s", "bn.b", "bn.m", "bn.v"], ["bn_out"], name="bn"),
        n("Relu", ["bn_out"], ["r2"], name="relu2"),
        n("Conv", ["input", "w"], ["c_clip06"], name="conv_clip06"),
        n("Clip", ["c_clip06", "zero", "six"], ["k1"], name="clip06"),
        n("Conv", ["input", "w"], ["c_clipneg"], name="conv_clipneg"),
        n("Clip", ["c_clipneg", "minus1", "six"], ["k2"], name="clipneg"),
        n("Conv", ["input", "w"], ["c_clipnomin"], name="conv_clipnomin"),
        n("Clip", ["c_clipnomin", "", "six"], ["k3"], name="clipnomin"),
        n("Conv", ["input", "w"], ["c_mixed"], name="conv_mixed"),
        n("Relu", ["c_mixed"], ["r3"], name="relu3"), n("Sigmoid", ["c_mixed"], ["s3"], name="sig3"),
        n("Add", ["r1", "r2"], ["a1"], name="add"), n("Relu", ["a1"], ["r4"], name="relu4"),
        n("Relu", ["a1"], ["r5"], name="relu5"),
        n("Flatten", ["input"], ["flat"], name="flatten"),
        n("Gemm", ["flat", "fc.weight"], ["fc_out"], name="fc"), n("Sigmoid", ["fc_out"], ["s4"], name="sig4"),
        n("MatMul", ["flat", "mm.weight"], ["mm_out"], name="mm"), n("Relu", ["mm_out"], ["r6"], name="relu6"),
    ]
    total = ["r4", "r5", "k1", "k2", "k3", "r3", "s3"]
    acc = total[0]
    for i, t in enumerate(total[1:]):
        nodes.append(n("Add", [acc, t], [f"sum{i}"], name=f"sum{i}"))
        acc = f"sum{i}"
    nodes.append(n("ReduceSum", [acc], ["spatial"], name="reduce", keepdims=0))
    nodes.append(n("Add", ["s4", "r6"], ["vec"], name="vec"))
    nodes.append(n("Add", ["vec", "spatial"], ["logits"], name="out"))
    graph = helper.make_graph(nodes, "branchy",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 2, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_marks_exactly_the_relu_fed_outputs():
    proto = make_branchy_model()
    model = QModel.from_onnx(proto)
    report = run_pass(model, "ahead_relu")
    assert report["marked"] == ["a1", "bn_out", "c_clip06", "c_relu", "mm_out"]
    assert report["activations_marked"] == ["k1", "r1", "r2", "r3", "r4", "r5", "r6"]
    reasons = {s["node"]: s["reason"] for s in report["skipped"]}
    assert reasons["conv_bn"] == "consumer BatchNormalization is not Relu/Clip(0,·) ('bn')"
    assert reasons["conv_clipneg"] == "Clip 'clipneg' min -1 is below 0"
    assert reasons["conv_clipnomin"] == "Clip 'clipnomin' has no min (−inf)"
    assert reasons["conv_mixed"] == "consumer Sigmoid is not Relu/Clip(0,·) ('sig3')"
    assert reasons["fc"] == "consumer Sigmoid is not Relu/Clip(0,·) ('sig4')"
    assert reasons["out"] == "'logits' is a graph output"
    assert get_annotation(model, NONNEGATIVE) == sorted(report["marked"] + report["activations_marked"])
    assert report["changed"] == 12


def test_marked_tensors_really_are_clamped_and_math_is_unchanged():
    proto = make_branchy_model()
    model = QModel.from_onnx(proto)
    report = run_pass(model, "ahead_relu")
    feeds = {"input": np.random.default_rng(1).normal(size=(4, 2, 4, 4)).astype(np.float32)}
    before = run_model(proto, feeds, ["logits"] + report["marked"])
    after = run_model(model.to_onnx(), feeds)
    np.testing.assert_array_equal(before["logits"], after["logits"])
    # the premise: each marked tensor has negative values that its readers all discard
    assert all((before[name] < 0).any() for name in ["c_relu", "c_clip06", "mm_out"])


def test_options_turn_off_each_family():
    model = QModel.from_onnx(make_branchy_model())
    report = run_pass(model, "ahead_relu", {"ahead_add_relu": False, "ahead_conv_relu": False,
                                            "ahead_bn_relu": False, "ahead_linear_relu": False})
    assert report["marked"] == []
    reasons = {s["node"]: s["reason"] for s in report["skipped"]}
    assert reasons["add"] == "option ahead_add_relu is off"
    assert reasons["conv_relu"] == "option ahead_conv_relu is off"
    assert reasons["bn"] == "option ahead_bn_relu is off"
    assert reasons["mm"] == "option ahead_linear_relu is off"
    assert len(report["activations_marked"]) == 7


def test_merges_with_existing_annotation_and_is_idempotent():
    model = QModel.from_onnx(make_small_cnn())
    set_annotation(model, NONNEGATIVE, ["zzz_from_elsewhere"])
    first = run_pass(model, "ahead_relu")
    assert get_annotation(model, NONNEGATIVE) == ["b1", "r1", "zzz_from_elsewhere"]
    assert first["changed"] == 2
    second = run_pass(model, "ahead_relu")
    assert second["changed"] == 0
    assert get_annotation(model, NONNEGATIVE) == ["b1", "r1", "zzz_from_elsewhere"]


def test_conv_before_relu_after_bn_fold():
    model = QModel.from_onnx(make_small_cnn())
    run_pass(model, "fuse_conv_bn")
    report = run_pass(model, "ahead_relu")
    assert "b1" in report["marked"]  # the fused conv now writes the BN's output, read by relu1
    assert {s["node"] for s in report["skipped"]} == {"conv2", "fc"}


def test_nothing_to_do():
    nodes = [helper.make_node("Sigmoid", ["input"], ["logits"], name="sig")]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])])
    model = QModel.from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    report = run_pass(model, "ahead_relu")
    assert report["changed"] == 0
    assert report["summary"] == "nothing to do: no Relu/Clip(0,·), HardSwish or HardSigmoid in the model"
    assert get_annotation(model, NONNEGATIVE) is None


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2"])
def test_bundled_models(name):
    builders = pytest.importorskip("qgraph.models.builders")
    model = QModel.from_onnx(builders.build_model(name))
    run_pass(model, "canonicalize")
    run_pass(model, "fuse_conv_bn")
    report = run_pass(model, "ahead_relu")
    relu_inputs = {n.inputs[0].name for n in model.graph.nodes if n.op == "Relu"}
    for name in report["marked"]:
        assert name in relu_inputs or any(n.op == "Clip" and n.inputs[0].name == name for n in model.graph.nodes)
    assert len(report["marked"]) > 0
    activations = [n for n in model.graph.nodes if n.op == "Relu" or (n.op == "Clip" and n.inputs[1].name)]
    assert report["activations_marked"] == sorted(n.outputs[0].name for n in activations)


def test_small_cnn_data_unchanged():
    proto = make_small_cnn()
    model = QModel.from_onnx(proto)
    run_pass(model, "ahead_relu")
    feeds = {"input": small_data(8)["input"]}
    np.testing.assert_array_equal(run_model(proto, feeds)["logits"], run_model(model.to_onnx(), feeds)["logits"])


def test_forward_fused_weight_arithmetic_is_not_a_candidate():
    model = QModel.from_onnx(make_small_cnn())
    run_pass(model, "fuse_conv_bn", {"mode": "forward"})
    report = run_pass(model, "ahead_relu")
    assert report["marked"] == ["b1"]
    assert {s["node"] for s in report["skipped"]} == {"conv2", "fc"}


def test_hardswish_and_hardsigmoid_inputs_get_their_flat_bounds():
    """Paddle-exported PP-LCNet: every input of its HardSwish (x·Clip(x+3, 0, 6)/6) and SE
    HardSigmoid read by nothing else is bounded where the function is flat (-3; ±3 for
    HardSigmoid(x/6 + 1/2)), in `qgraph.range_bounds`; the model's outputs do not change."""
    from qgraph.idioms import CLAMPED_KINDS, unary_regions
    from qgraph.models import exported
    proto = exported.pplcnet_paddle(input_shape=(3, 32, 64), num_classes=10)
    model = QModel.from_onnx(proto)
    run_pass(model, "canonicalize")
    report = run_pass(model, "ahead_relu")
    kinds = {r.input: r.kind for r in unary_regions(model) if r.kind in CLAMPED_KINDS}
    assert set(report["bounded"]) == set(kinds) and len(kinds) >= 10
    for x, bounds in report["bounded"].items():
        assert bounds == ([-3.0, None] if kinds[x] == "hardswish" else [-3.0, 3.0]), x
    assert get_annotation(model, RANGE_BOUNDS) == report["bounded"]
    assert report["changed"] == len(report["bounded"]) + len(report["marked"]) + len(report["activations_marked"])
    feeds = {"x": exported.probe_batch((3, 32, 64), seed=1, count=2)}
    before, after = run_model(proto, feeds), run_model(model.to_onnx(), feeds)
    assert before and before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])


def test_a_clamped_activation_whose_input_is_read_elsewhere_is_not_bounded():
    rng = np.random.default_rng(0)
    n = helper.make_node
    nodes = [n("Conv", ["input", "w"], ["c"], name="conv"), n("HardSwish", ["c"], ["h"], name="hswish"),
             n("Conv", ["c", "w"], ["d"], name="conv2"), n("Add", ["h", "d"], ["logits"], name="add"),
             n("Conv", ["input", "w"], ["e"], name="conv3"), n("HardSigmoid", ["e"], ["g"], name="hsig"),
             n("Mul", ["logits", "g"], ["out"], name="gate")]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [const("w", rng.normal(size=(2, 2, 1, 1)))])
    model = QModel.from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    report = run_pass(model, "ahead_relu")
    assert report["bounded"] == {"e": [-2.5, 2.5]}       # ONNX's HardSigmoid defaults: α 0.2, β 0.5
    reasons = {s["node"]: s["reason"] for s in report["skipped"]}
    assert reasons["hswish"] == "'c' is also read by 'conv2', outside the hardswish"
    off = QModel.from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert run_pass(off, "ahead_relu", {"ahead_clamped": False})["bounded"] == {}
    assert get_annotation(off, RANGE_BOUNDS) is None
