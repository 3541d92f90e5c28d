"""qgraph.differentiable: ops ORT 1.19 cannot train through on CPU, rewritten into ops it can.

For each rewrite: the training form computes what the op computes (ORT, both forms), one SGD
step of `train_model` moves every trained tensor by the gradient that finite differences of the
original model give (so the gradient through the rewrite is right, not just present), and the
exported model holds the original node again. Ops that stay untrainable fail naming the node."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph.differentiable import make_differentiable, restore_nodes
from qgraph.errors import TrainError
from qgraph.fakequant import to_qdq_form, to_training_form
from qgraph.runner import run_model
from qgraph.train import train_model

RNG = np.random.default_rng(0)
N = helper.make_node


def f32(a):
    return np.asarray(a, np.float32)


def i64(a):
    return np.asarray(a, np.int64)


def const(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def conv_then(nodes, inits=(), x_dims=("N", 3, 8, 8), channels=4):
    """x -> Conv(3x3, trained) -> `nodes` -> y."""
    w = const("W", f32(RNG.standard_normal((channels, x_dims[1], 3, 3)) * 0.4))
    graph = helper.make_graph([N("Conv", ["x", "W"], ["a"], pads=[1, 1, 1, 1], name="conv"), *nodes], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_dims))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, *inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model.graph.output[0].CopyFrom(onnx.shape_inference.infer_shapes(model).graph.output[0])
    onnx.checker.check_model(model)
    return model


def seq_then(op, direction, initial_states=False, **attrs):
    """Conv features as a sequence over the width: [W, N, C*H] -> LSTM/GRU -> y."""
    gates = {"LSTM": 4, "GRU": 3}[op]
    hidden, size = 5, 4 * 4
    dirs = 2 if direction == "bidirectional" else 1
    inputs = ["seq", "Wr", "Rr", "Br"]
    if initial_states:   # as exporters write them: states [dirs, N, hidden] computed from the batch size
        inputs += ["", "h0"] + (["c0"] if op == "LSTM" else [])
    outputs = ["ys"] if op == "GRU" else ["ys", "", "yc"]
    nodes = [N("Reshape", ["a", "shape"], ["r"]), N("Transpose", ["r"], ["seq"], perm=[2, 0, 1]),
             N(op, inputs, outputs, name="rnn", hidden_size=hidden, direction=direction, **attrs),
             N("Transpose", ["ys"], ["y"], perm=[2, 0, 1, 3])]   # [T, D, N, H] -> samples first
    if initial_states:
        nodes[2:2] = [N("Shape", ["seq"], ["seq_shape"]), N("Gather", ["seq_shape", "one"], ["batch"], axis=0),
                      N("Concat", ["dirs", "batch", "hidden"], ["state_shape"], axis=0),
                      N("ConstantOfShape", ["state_shape"], ["h0"], value=helper.make_tensor("v", TensorProto.FLOAT,
                                                                                            [1], [0.25]))]
        if op == "LSTM":
            nodes.insert(6, N("Mul", ["h0", "half"], ["c0"]))
    inits = [const("shape", i64([0, size, -1])), const("one", i64([1])), const("dirs", i64([dirs])),
             const("hidden", i64([hidden])), const("half", f32(-0.5)),
             const("Wr", f32(RNG.standard_normal((dirs, gates * hidden, size)) * 0.3)),
             const("Rr", f32(RNG.standard_normal((dirs, gates * hidden, hidden)) * 0.3)),
             const("Br", f32(RNG.standard_normal((dirs, 2 * gates * hidden)) * 0.1))]
    return conv_then(nodes, inits, x_dims=("N", 3, 4, 6))


CASES = {
    "HardSigmoid": lambda: conv_then([N("HardSigmoid", ["a"], ["y"], alpha=0.3, beta=0.4)]),
    "HardSwish": lambda: conv_then([N("HardSwish", ["a"], ["y"])]),
    "PRelu": lambda: conv_then([N("PRelu", ["a", "slope"], ["y"])], [const("slope", f32([[[0.1]], [[0.2]], [[0.3]], [[-0.2]]]))]),
    "Softplus": lambda: conv_then([N("Softplus", ["a"], ["y"])]),
    "Elu": lambda: conv_then([N("Elu", ["a"], ["y"], alpha=0.7)]),
    "Sum": lambda: conv_then([N("Relu", ["a"], ["r"]), N("Sum", ["a", "r", "a"], ["y"])]),
    "LayerNormalization": lambda: conv_then([N("LayerNormalization", ["a", "g", "b"], ["y"], axis=-1, epsilon=1e-3)],
                                            [const("g", f32(RNG.uniform(0.5, 1.5, 8))), const("b", f32(RNG.standard_normal(8) * 0.1))]),
    "Resize nearest x2, dynamic sizes": lambda: conv_then(
        [N("Resize", ["a", "", "scales"], ["y"], mode="nearest", coordinate_transformation_mode="asymmetric",
           nearest_mode="floor")], [const("scales", f32([1, 1, 2, 2]))], x_dims=("N", 3, "H", "W")),
    "Resize nearest to 12x20": lambda: conv_then(
        [N("Resize", ["a", "", "", "sizes"], ["y"], mode="nearest")], [const("sizes", i64([2, 4, 12, 20]))],
        x_dims=(2, 3, 8, 8)),
    "Resize linear x2": lambda: conv_then(
        [N("Resize", ["a", "", "scales"], ["y"], mode="linear")], [const("scales", f32([1, 1, 2, 2]))]),
    "Resize linear align_corners x1.5": lambda: conv_then(
        [N("Resize", ["a", "", "scales"], ["y"], mode="linear", coordinate_transformation_mode="align_corners")],
        [const("scales", f32([1, 1, 1.5, 1.5]))]),
    "ConvTranspose k2 s2": lambda: conv_then(
        [N("ConvTranspose", ["a", "wt", "bt"], ["y"], kernel_shape=[2, 2], strides=[2, 2])],
        [const("wt", f32(RNG.standard_normal((4, 3, 2, 2)) * 0.3)), const("bt", f32([0.1, -0.2, 0.3]))]),
    "ConvTranspose k3 s2 p1 output_padding": lambda: conv_then(
        [N("ConvTranspose", ["a", "wt"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
           output_padding=[1, 1])], [const("wt", f32(RNG.standard_normal((4, 2, 3, 3)) * 0.3))]),
    "ConvTranspose grouped": lambda: conv_then(
        [N("ConvTranspose", ["a", "wt"], ["y"], kernel_shape=[3, 3], strides=[1, 2], pads=[1, 0, 1, 1], group=2)],
        [const("wt", f32(RNG.standard_normal((4, 3, 3, 3)) * 0.3))]),
    "AveragePool k3 s1 p1 (padding not counted)": lambda: conv_then(
        [N("AveragePool", ["a"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]),
    "AveragePool k2x1 s2x1, dynamic sizes": lambda: conv_then(
        [N("AveragePool", ["a"], ["y"], kernel_shape=[2, 1], strides=[2, 1])], x_dims=("N", 3, "H", "W")),
    "GlobalMaxPool": lambda: conv_then([N("GlobalMaxPool", ["a"], ["y"])]),
    "GlobalMaxPool over a sequence (Magika's)": lambda: conv_then(
        [N("Reshape", ["a", "seq_shape"], ["s"]), N("GlobalMaxPool", ["s"], ["y"])], [const("seq_shape", i64([0, 4, -1]))]),
    "ReduceMax over channels and width, keepdims=0": lambda: conv_then(
        [N("ReduceMax", ["a"], ["y"], axes=[1, 3], keepdims=0)]),
    "ReduceMax, softmax's stabilizer": lambda: conv_then(
        [N("ReduceMax", ["a"], ["m"], axes=[1]), N("Sub", ["a", "m"], ["c"]), N("Exp", ["c"], ["e"]),
         N("ReduceSum", ["e", "one_axis"], ["t"]), N("Div", ["e", "t"], ["y"])], [const("one_axis", i64([1]))]),
    "MaxPool chain, dynamic sizes": lambda: conv_then(
        [N("MaxPool", ["a"], ["m1"], kernel_shape=[5, 5], pads=[2, 2, 2, 2]),
         N("MaxPool", ["m1"], ["m2"], kernel_shape=[5, 5], pads=[2, 2, 2, 2]),
         N("Concat", ["a", "m1", "m2"], ["y"], axis=1)], x_dims=("N", 3, "H", "W")),
    "LSTM forward": lambda: seq_then("LSTM", "forward"),
    "LSTM reverse": lambda: seq_then("LSTM", "reverse"),
    "LSTM bidirectional": lambda: seq_then("LSTM", "bidirectional"),
    "LSTM bidirectional with initial states": lambda: seq_then("LSTM", "bidirectional", initial_states=True),
    "GRU reverse with initial state": lambda: seq_then("GRU", "reverse", initial_states=True),
    "GRU bidirectional": lambda: seq_then("GRU", "bidirectional", linear_before_reset=1),
    "LSTM with the default activations spelled out": lambda: seq_then("LSTM", "forward",
                                                                      activations=["Sigmoid", "Tanh", "Tanh"]),
}


def loss_and_grads(model, x):
    """mean(y^2) of `model` on x, and its gradient by central differences for every initializer."""
    def loss(m):
        return float(np.mean(run_model(m, {"x": x}, optimize=False)["y"].astype(np.float64) ** 2))

    grads = {}
    for tensor in model.graph.initializer:
        if tensor.data_type != TensorProto.FLOAT or len(tensor.dims) == 0 or np.prod(tensor.dims) <= 1:
            continue
        base = numpy_helper.to_array(tensor).astype(np.float32)
        if tensor.name in ("scales",):
            continue
        grad = np.zeros(base.shape)
        picks = RNG.choice(base.size, size=min(base.size, 6), replace=False)
        for flat in picks:
            values = []
            for sign in (1, -1):
                moved = base.copy().reshape(-1)
                moved[flat] += sign * 1e-2
                probe = onnx.ModelProto()
                probe.CopyFrom(model)
                next(t for t in probe.graph.initializer if t.name == tensor.name).CopyFrom(
                    numpy_helper.from_array(moved.reshape(base.shape), tensor.name))
                values.append(loss(probe))
            grad.reshape(-1)[flat] = (values[0] - values[1]) / 2e-2
        grads[tensor.name] = (picks, grad)
    return grads


@pytest.mark.parametrize("case", CASES)
def test_rewrite_computes_the_op_trains_with_its_gradient_and_exports_it_back(case, tmp_path):
    model = CASES[case]()
    dims = [d.dim_value or 8 for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = RNG.standard_normal([2, *dims]).astype(np.float32)
    training, info = to_training_form(model)
    original_ops = [n.op_type for n in model.graph.node]
    assert info.ops or case.startswith("MaxPool"), f"{case}: nothing rewritten"
    np.testing.assert_allclose(run_model(training, {"x": x})["y"], run_model(model, {"x": x})["y"], rtol=1e-4,
                               atol=1e-5)
    assert [n.op_type for n in to_qdq_form(training).graph.node] == original_ops

    lr = 1e-2
    y_shape = run_model(model, {"x": x})["y"].shape
    data = {"x": x, "labels": np.zeros(y_shape, np.float32)}
    trained, history = train_model(model, data, loss="mse", optimizer="sgd", momentum=0.0, lr=lr, epochs=1,
                                   batch_size=2, schedule="constant", workdir=tmp_path, progress=False)
    assert [n.op_type for n in trained.graph.node] == original_ops
    assert history[0]["train_loss"] == pytest.approx(np.mean(run_model(model, {"x": x})["y"].astype(np.float64) ** 2),
                                                     rel=1e-4)
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in trained.graph.initializer}
    # MSELoss is mean((y - 0)^2): its gradient is that of loss_and_grads' mean(y^2)
    for name, (picks, numeric) in loss_and_grads(model, x).items():
        step = ((before[name] - after[name]) / lr).reshape(-1)[picks]
        np.testing.assert_allclose(step, numeric.reshape(-1)[picks], rtol=0.03, atol=2e-3,
                                   err_msg=f"{case}: gradient of {name}")


def test_a_node_that_cannot_be_rewritten_is_kept_and_named_when_ort_needs_its_gradient(tmp_path):
    model = conv_then([N("Resize", ["a", "", "scales"], ["y"], mode="linear")], [const("scales", f32([1, 1, 2, 2]))],
                      x_dims=("N", 3, "H", "W"))
    rewritten, info = make_differentiable(model)
    assert [n.op_type for n in rewritten.graph.node] == ["Conv", "Resize"]
    assert "not static" in info.declined["y"] or "not static" in next(iter(info.declined.values()))
    # the trainer fixes the input size from the data, so the same model trains
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    train_model(model, {"x": x, "labels": np.zeros((2, 4, 16, 16), np.float32)}, loss="mse", workdir=tmp_path,
                progress=False)


def test_an_lstm_ort_cannot_train_fails_naming_the_node_and_why(tmp_path):
    model = seq_then("LSTM", "forward", clip=3.0)
    x = RNG.standard_normal((2, 3, 4, 6)).astype(np.float32)
    target = np.zeros(run_model(model, {"x": x})["y"].shape, np.float32)
    with pytest.raises(TrainError, match=r"node rnn \(LSTM\) lies between a trained parameter and the loss.*"
                                         r"could not rewrite it: its clip attribute is not supported"):
        train_model(model, {"x": x, "labels": target}, loss="mse", workdir=tmp_path / "run", progress=False)


@pytest.mark.parametrize("op, attrs, extra", [
    ("CumSum", {}, [const("axis", i64(1))]),
    ("Einsum", {"equation": "nchw->nchw"}, []),
])
def test_an_op_without_a_gradient_fails_naming_the_node(tmp_path, op, attrs, extra):
    inputs = ["a", "axis"] if op == "CumSum" else ["a"]
    model = conv_then([N(op, inputs, ["y"], name="culprit", **attrs)], extra)
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    with pytest.raises(TrainError, match=rf"node culprit \({op}\) lies between a trained parameter and the loss"):
        train_model(model, {"x": x, "labels": np.zeros((2, 4, 8, 8), np.float32)}, loss="mse",
                    workdir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_restore_puts_back_the_original_nodes_in_order():
    model = CASES["LSTM bidirectional"]()
    rewritten, info = make_differentiable(model)
    assert "LSTMTraining" in [n.op_type for n in rewritten.graph.node]
    restore_nodes(rewritten.graph, info.records)
    assert [n.op_type for n in rewritten.graph.node] == [n.op_type for n in model.graph.node]
    assert {t.name for t in rewritten.graph.initializer} == {t.name for t in model.graph.initializer}
