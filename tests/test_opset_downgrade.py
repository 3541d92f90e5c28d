"""Opset 18-21 models brought to the working opset (qgraph.opset_downgrade): each rewrite keeps
ONNX Runtime's outputs (run on the original and on the converted model), and what has no opset-17
form is refused in one line naming the node."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph.errors import ModelError
from qgraph.model_io import OPSET, convert_to_working_opset, default_opset
from qgraph.runner import run_model

RNG = np.random.default_rng(0)


def one_node_model(opset: int, node, shape, inits=(), outputs=("y",), out_shapes=None) -> onnx.ModelProto:
    """`node` on input x of `shape`, its outputs declared with the shapes ORT computes."""
    out_shapes = out_shapes or [None] * len(outputs)
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, s)
                               for o, s in zip(outputs, out_shapes)],
                              list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 21 else 9 if opset >= 19 else 8
    return model


def declared(opset: int, node, shape, inits=(), outputs=("y",)) -> onnx.ModelProto:
    model = one_node_model(opset, node, shape, inits, outputs)
    got = run_model(model, {"x": np.zeros(shape, np.float32)})
    return one_node_model(opset, node, shape, inits, outputs, [list(got[o].shape) for o in outputs])


def ints(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


CASES = {
    "ReduceMean axes initializer": (18, helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=0),
                                    (2, 3, 4), [ints("axes", [1])]),
    "ReduceMax two axes, keepdims": (18, helper.make_node("ReduceMax", ["x", "axes"], ["y"]), (2, 3, 4),
                                     [ints("axes", [0, 2])]),
    "ReduceL2 no axes": (18, helper.make_node("ReduceL2", ["x"], ["y"]), (2, 3, 4), []),
    "ReduceMean empty axes, noop": (18, helper.make_node("ReduceMean", ["x", "axes"], ["y"], noop_with_empty_axes=1),
                                    (2, 3, 4), [ints("axes", [])]),
    "Split num_outputs even": (18, helper.make_node("Split", ["x"], ["y", "z"], axis=1, num_outputs=2), (2, 6, 3),
                               [], ("y", "z")),
    "Split num_outputs uneven": (18, helper.make_node("Split", ["x"], ["y", "z", "w"], axis=2, num_outputs=3),
                                 (2, 3, 7), [], ("y", "z", "w")),
    "Pad axes": (18, helper.make_node("Pad", ["x", "pads", "", "axes"], ["y"], mode="reflect"), (1, 2, 5, 6),
                 [ints("pads", [1, 2, 1, 0]), ints("axes", [2, 3])]),
    "Resize 18 defaults": (18, helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest"), (1, 2, 3, 4),
                           [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]),
    "Gelu erf": (20, helper.make_node("Gelu", ["x"], ["y"]), (2, 50), []),
    "Gelu tanh": (20, helper.make_node("Gelu", ["x"], ["y"], approximate="tanh"), (2, 50), []),
    "Mish": (18, helper.make_node("Mish", ["x"], ["y"]), (2, 50), []),
    "Cast saturate": (19, helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT, saturate=1), (2, 3), []),
    "AveragePool 19": (19, helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], dilations=[1, 1]),
                       (1, 2, 4, 4), []),
    "Reshape 21": (21, helper.make_node("Reshape", ["x", "shape"], ["y"]), (2, 3, 4), [ints("shape", [2, 12])]),
    "GroupNormalization 18": (18, helper.make_node("GroupNormalization", ["x", "gamma", "beta"], ["y"], num_groups=2),
                              (2, 6, 3, 5), [numpy_helper.from_array(np.array([0.5, 2], np.float32), "gamma"),
                                             numpy_helper.from_array(np.array([0.1, -1], np.float32), "beta")]),
    "GroupNormalization 21": (21, helper.make_node("GroupNormalization", ["x", "gamma", "beta"], ["y"], num_groups=3,
                                                   epsilon=1e-3), (2, 6, 4),
                              [numpy_helper.from_array(np.linspace(0.5, 2, 6).astype(np.float32), "gamma"),
                               numpy_helper.from_array(np.linspace(-1, 1, 6).astype(np.float32), "beta")]),
}


@pytest.mark.parametrize("case", CASES)
def test_downgrade_keeps_ort_outputs(case):
    opset, node, shape, inits, *outputs = CASES[case]
    model = declared(opset, node, shape, inits, outputs[0] if outputs else ("y",))
    onnx.checker.check_model(model, full_check=True)
    converted = convert_to_working_opset(model, origin=case)
    assert default_opset(converted) == OPSET
    onnx.checker.check_model(converted, full_check=True)
    x = RNG.standard_normal(shape).astype(np.float32) * 3
    want, got = run_model(model, {"x": x}), run_model(converted, {"x": x})
    for name in want:
        assert got[name].shape == want[name].shape, name
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6, err_msg=name)


REFUSED = {
    "Resize antialias": (18, helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear", antialias=1,
                                              name="up"), (1, 2, 3, 4),
                         [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")], "antialias=1"),
    "Pad wrap": (19, helper.make_node("Pad", ["x", "pads"], ["y"], mode="wrap", name="up"), (1, 2, 3, 4),
                 [ints("pads", [0, 0, 1, 1, 0, 0, 1, 1])], "mode 'wrap'"),
    "Reduce dynamic axes": (18, helper.make_node("ReduceMean", ["x", "x_axes"], ["y"], name="up"), (2, 3), [],
                            "its axes 'x_axes' is computed at run time"),
    "new op": (18, helper.make_node("CenterCropPad", ["x", "shape"], ["y"], name="up"), (4, 4),
               [ints("shape", [2, 2])], "the op is newer than opset 17"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_has_no_opset_17_form_is_refused_naming_the_node(case):
    opset, node, shape, inits, why = REFUSED[case]
    model = one_node_model(opset, node, shape, inits, out_shapes=[None])
    with pytest.raises(ModelError, match=rf"^refused: {node.op_type} node 'up' has no opset-17 form \({why}\); "
                                         r"export the model at opset 17$"):
        convert_to_working_opset(model, origin="refused")
