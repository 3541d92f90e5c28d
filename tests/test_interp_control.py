"""Control flow in the reference interpreter (If, Loop): bodies that read the enclosing scope,
nested bodies, scan outputs, early exit — each against ONNX Runtime on the same inputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph.errors import InterpError
from qgraph.interp import compile_model, run

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _ort(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _branch(name, nodes, outputs):
    return helper.make_graph(nodes, name, [], outputs)


def _if_model():
    """y = If(sum(x) > 0): (relu(x·w) + b, x·w) else (x − b, nested If on x[0] > 1: x·2 or x): the
    branches read x, w, b and an intermediate tensor of the enclosing graph, one branch nests
    another If, and each returns two outputs."""
    w = numpy_helper.from_array(np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3), "w")
    b = numpy_helper.from_array(np.array([0.5, -0.25, 1.0], np.float32), "b")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    then_branch = _branch("then", [
        helper.make_node("MatMul", ["x", "w"], ["xw_t"]),
        helper.make_node("Relu", ["xw_t"], ["r_t"]),
        helper.make_node("Add", ["r_t", "b"], ["y_t"]),
        helper.make_node("Identity", ["xw"], ["z_t"]),
    ], [helper.make_tensor_value_info("y_t", F, None), helper.make_tensor_value_info("z_t", F, None)])
    inner_then = _branch("inner_then", [helper.make_node("Mul", ["xw", "two"], ["z_it"])],
                         [helper.make_tensor_value_info("z_it", F, None)])
    inner_else = _branch("inner_else", [helper.make_node("Identity", ["xw"], ["z_ie"])],
                         [helper.make_tensor_value_info("z_ie", F, None)])
    else_branch = _branch("else", [
        helper.make_node("Sub", ["xw", "b"], ["y_e"]),
        helper.make_node("ReduceMax", ["x"], ["x_max"], keepdims=0),
        helper.make_node("Greater", ["x_max", "one"], ["big"]),
        helper.make_node("If", ["big"], ["z_e"], then_branch=inner_then, else_branch=inner_else),
    ], [helper.make_tensor_value_info("y_e", F, None), helper.make_tensor_value_info("z_e", F, None)])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y", "z"], then_branch=then_branch, else_branch=else_branch),
    ]
    inits = [w, b, two, numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    return _model(nodes, [helper.make_tensor_value_info("x", F, [2, 4])],
                  [helper.make_tensor_value_info("y", F, None), helper.make_tensor_value_info("z", F, None)], inits)


@pytest.mark.parametrize("x", [np.full((2, 4), 0.5), np.full((2, 4), -0.5), np.full((2, 4), -3.0),
                               np.array([[3.0, -2.0, -2.0, -2.0], [0.0, 0.0, 0.0, 0.0]])])
def test_if_with_outer_scope_and_nested_if_matches_ort(x):
    model = _if_model()
    feeds = {"x": x.astype(np.float32)}
    expected = _ort(model, feeds)
    plan = compile_model(model)
    for _ in range(2):          # the branches' plans are compiled once and reused
        got = plan.run(feeds)
        for name in ("y", "z"):
            np.testing.assert_array_equal(got[name], expected[name])


def test_if_with_a_multi_element_condition_is_refused():
    branch = _branch("b", [helper.make_node("Identity", ["x"], ["o"])], [helper.make_tensor_value_info("o", F, None)])
    model = _model([helper.make_node("Greater", ["x", "zero"], ["c"]),
                    helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
                   [helper.make_tensor_value_info("x", F, [3])], [helper.make_tensor_value_info("y", F, None)],
                   [numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    with pytest.raises(InterpError, match="condition has 3 elements"):
        run(model, {"x": np.ones(3, np.float32)})


def _loop_model():
    """acc = x; for i < M while acc.sum() < limit: acc = acc·scale + i; scan out acc and i·x (the
    body reads x, scale and limit from the enclosing graph)."""
    body = helper.make_graph([
        helper.make_node("Cast", ["i"], ["i_f"], to=F),
        helper.make_node("Mul", ["acc_in", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "i_f"], ["acc_out"]),
        helper.make_node("ReduceSum", ["acc_out"], ["total"], keepdims=0),
        helper.make_node("Less", ["total", "limit"], ["cond_out"]),
        helper.make_node("Mul", ["x", "i_f"], ["ix"]),
    ], "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                helper.make_tensor_value_info("acc_in", F, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", F, None), helper.make_tensor_value_info("ix", F, None)])
    nodes = [helper.make_node("Loop", ["M", "cond0", "x"], ["acc", "ix_all"], body=body)]
    return _model(nodes, [helper.make_tensor_value_info("x", F, [3]), helper.make_tensor_value_info("M", TensorProto.INT64, []),
                          helper.make_tensor_value_info("cond0", TensorProto.BOOL, []),
                          helper.make_tensor_value_info("scale", F, []), helper.make_tensor_value_info("limit", F, [])],
                  [helper.make_tensor_value_info("acc", F, None), helper.make_tensor_value_info("ix_all", F, None)])


@pytest.mark.parametrize("trips, limit", [(5, 1e9), (50, 40.0), (1, 1e9)])
def test_loop_with_scan_outputs_and_early_exit_matches_ort(trips, limit):
    model = _loop_model()
    feeds = {"x": np.array([0.5, -1.0, 2.0], np.float32), "M": np.array(trips, np.int64),
             "cond0": np.array(True), "scale": np.array(1.5, np.float32), "limit": np.array(limit, np.float32)}
    expected = _ort(model, feeds)
    got = run(model, feeds)
    for name in ("acc", "ix_all"):
        assert got[name].shape == expected[name].shape
        np.testing.assert_array_equal(got[name], expected[name])


def test_scan_with_axes_directions_and_outer_scope_matches_ort():
    """state = state + a_t · b_t · k over t (a along axis 1, read backwards; b along axis 0);
    scan out the running state (stacked on axis 1) and a_t − b_t (stacked backwards)."""
    body = helper.make_graph([
        helper.make_node("Mul", ["a_t", "b_t"], ["ab"]),
        helper.make_node("Mul", ["ab", "k"], ["abk"]),
        helper.make_node("Add", ["s_in", "abk"], ["s_out"]),
        helper.make_node("Identity", ["s_out"], ["s_scan"]),
        helper.make_node("Sub", ["a_t", "b_t"], ["diff"]),
    ], "body", [helper.make_tensor_value_info("s_in", F, [2]), helper.make_tensor_value_info("a_t", F, [2]),
                helper.make_tensor_value_info("b_t", F, [2])],
        [helper.make_tensor_value_info("s_out", F, [2]), helper.make_tensor_value_info("s_scan", F, [2]),
         helper.make_tensor_value_info("diff", F, [2])])
    node = helper.make_node("Scan", ["s0", "a", "b"], ["s", "running", "diffs"], body=body, num_scan_inputs=2,
                            scan_input_axes=[1, 0], scan_input_directions=[1, 0], scan_output_axes=[1, 0],
                            scan_output_directions=[0, 1])
    model = _model([node], [helper.make_tensor_value_info("s0", F, [2]), helper.make_tensor_value_info("a", F, [2, 5]),
                            helper.make_tensor_value_info("b", F, [5, 2]), helper.make_tensor_value_info("k", F, [])],
                   [helper.make_tensor_value_info(n, F, None) for n in ("s", "running", "diffs")])
    rng = np.random.default_rng(3)
    feeds = {"s0": rng.standard_normal(2).astype(np.float32), "a": rng.standard_normal((2, 5)).astype(np.float32),
             "b": rng.standard_normal((5, 2)).astype(np.float32), "k": np.array(0.5, np.float32)}
    expected = _ort(model, feeds)
    got = run(model, feeds)
    for name in ("s", "running", "diffs"):
        assert got[name].shape == expected[name].shape
        np.testing.assert_array_equal(got[name], expected[name])
