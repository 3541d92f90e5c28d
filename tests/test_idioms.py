"""Graph idioms on the exporter-style builders: unary regions, index computation, Clip bounds."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from qgraph.graph import QModel
from qgraph.idioms import Declined, clip_bounds, evaluate_function, flat_bounds, index_tensors, unary_regions
from qgraph.models import exported


def test_unary_regions_find_the_activations_exporters_write():
    pplcnet = QModel.from_onnx(exported.pplcnet_paddle(input_shape=(3, 32, 32), num_classes=10))
    kinds = Counter(r.kind for r in unary_regions(pplcnet))
    assert kinds["hardswish"] >= 10 and kinds["hardsigmoid"] >= 1
    vit = QModel.from_onnx(exported.vit_encoder(input_shape=(3, 32, 32), patch=8, dim=32, depth=2, heads=2))
    gelu = [r for r in unary_regions(vit) if r.kind == "gelu"]
    assert len(gelu) == 2 and all(len(r.nodes) >= 4 for r in gelu)    # Div, Erf, Add, Mul, Mul
    for region in gelu:   # inner tensors are read only inside the region
        nodes = {n.name: n for n in vit.graph.nodes}
        inner = [nodes[name].outputs[0] for name in region.nodes[:-1]]
        assert all(c.name in region.nodes for t in inner for c in t.outputs)


def _probe_values() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.concatenate([rng.normal(0, 4, 4000), rng.normal(0, 300, 1000), [-1e7, 1e7, -3, 3, -2.5, 2.5]]
                          ).astype(np.float32)


def test_flat_bounds_of_exported_activations_change_no_output():
    """Clamping x to a clamped activation's flat bounds gives bit-identical outputs in ORT, on
    values out to ±1e7; HardSwish as Paddle writes it is flat below -3, its SE gate's HardSigmoid
    outside a finite interval; GELU is flat nowhere."""
    pplcnet = QModel.from_onnx(exported.pplcnet_paddle(input_shape=(3, 32, 32), num_classes=10))
    vit = QModel.from_onnx(exported.vit_encoder(input_shape=(3, 32, 32), patch=8, dim=32, depth=2, heads=2))
    v, seen = _probe_values(), Counter()
    for model in (pplcnet, vit):
        nodes = {n.name: n for n in model.graph.nodes}
        for region in unary_regions(model):
            lo, hi = flat_bounds(model, region)
            if region.kind == "hardswish":
                assert (lo, hi) == (-3.0, math.inf), region
            elif region.kind == "hardsigmoid":
                assert -math.inf < lo < 0 < hi < math.inf, region
            else:
                assert (lo, hi) == (-math.inf, math.inf), region
            f = [nodes[name] for name in region.nodes]
            np.testing.assert_array_equal(evaluate_function(f, region.input, region.output, np.clip(v, lo, hi)),
                                          evaluate_function(f, region.input, region.output, v), err_msg=str(region))
            seen[region.kind] += 1
    assert seen["hardswish"] >= 10 and seen["hardsigmoid"] >= 1 and seen["gelu"] == 2


@pytest.mark.parametrize("op, attrs, expected", [("HardSwish", {}, (-3.0, math.inf)),
                                                 ("HardSigmoid", {"alpha": 0.2, "beta": 0.5}, (-2.5, 2.5)),
                                                 ("HardSigmoid", {"alpha": 0.25, "beta": 0.25}, (-1.0, 3.0)),
                                                 ("Sigmoid", {}, (-math.inf, math.inf))])
def test_flat_bounds_of_single_ops(op, attrs, expected):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"], name="f", **attrs)], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = QModel.from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    (region,) = unary_regions(model)
    assert flat_bounds(model, region) == expected
    v = _probe_values()
    np.testing.assert_array_equal(evaluate_function([model.node("f")], "x", "y", np.clip(v, *expected)),
                                  evaluate_function([model.node("f")], "x", "y", v))


def test_silu_with_its_sigmoid_read_elsewhere_is_not_one_activation():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"], name="sig"), helper.make_node("Mul", ["x", "s"], ["y"], name="mul"),
             helper.make_node("Add", ["y", "s"], ["z"], name="add")]
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4])])
    model = QModel.from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert not [r for r in unary_regions(model) if r.kind == "silu"]


def test_index_tensors_are_what_shapes_compute():
    vit = QModel.from_onnx(exported.vit_encoder(input_shape=(3, 32, 32), patch=8, dim=32, depth=2, heads=2))
    index = index_tensors(vit)
    producers = {t.name: n for n in vit.graph.nodes for t in n.outputs}
    assert index and all(producers[name].op in ("Shape", "Gather", "Unsqueeze", "Concat", "Mul", "Div", "Cast",
                                               "Equal", "Where", "Slice", "ConstantOfShape", "Squeeze", "Add",
                                               "Range", "Expand") for name in index)
    assert not any(np.issubdtype(np.dtype(producers[n].outputs[0].dtype or np.float32), np.floating)
                   and producers[n].op == "Conv" for n in index)


@pytest.mark.parametrize("opset, expected", [(17, (0.0, 6.0)), (6, (-1.0, 2.0))])
def test_clip_bounds_for_inputs_and_attributes(opset, expected):
    if opset >= 11:
        node = gs.Node("Clip", inputs=[gs.Variable("x"), gs.Constant("lo", np.array(0.0, np.float32)),
                                       gs.Constant("hi", np.array(6.0, np.float32))], outputs=[gs.Variable("y")])
    else:
        node = gs.Node("Clip", attrs={"min": -1.0, "max": 2.0}, inputs=[gs.Variable("x")], outputs=[gs.Variable("y")])
    assert clip_bounds(node) == expected
    computed = gs.Node("Clip", name="c", inputs=[gs.Variable("x"), gs.Variable("lo")], outputs=[gs.Variable("y")])
    with pytest.raises(Declined, match="min 'lo' is not a constant"):
        clip_bounds(computed)
