"""Plan-level fusion and constant folding (qgraph.interp.fusion, qgraph.interp.runner): the fused
schedule gives the unfused one's numbers bit for bit, and steps aside when a tensor inside a chain
is requested or a feed overrides a constant."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import helper

from qgraph.interp import compile_model
from qgraph.interp.codes import code_values, lookup_pairs, pair_table

from test_interp import make_model, ort_run


def _unfused(plan, feeds, outputs=None):
    """The plan's answer through the schedule without fusion or folding (as a feed that overrides
    an initializer gets)."""
    wanted = tuple(outputs or plan.output_names)
    plan._schedules[(wanted, True)] = plan._schedule(wanted, fused=False)
    try:
        folded, plan._folded = plan._folded, {}
        return plan.run(feeds, outputs)
    finally:
        plan._folded = folded
        del plan._schedules[(wanted, True)]


def _steps(plan):
    return len(plan._schedule(tuple(plan.output_names)))


def lookup_chain_model(code_dtype, table, target=None):
    """The qlinear lowering of a unary activation: a lookup of each code in a one-row table, reshaped
    back to Shape(nhwc) or, where the lowering knows it, to the constant `target`."""
    nodes = [helper.make_node("Transpose", ["x"], ["nhwc"], perm=[0, 2, 3, 1]),
             helper.make_node("Flatten", ["nhwc"], ["codes"], axis=0),
             helper.make_node("Cast", ["codes"], ["index"], to=7),
             helper.make_node("GatherElements", ["table", "index"], ["row"], axis=1),
             helper.make_node("Reshape", ["row", "shape"], ["looked_up"]),
             helper.make_node("Transpose", ["looked_up"], ["y"], perm=[0, 3, 1, 2])]
    inits = {"table": table.reshape(1, -1)}
    if target is None:
        nodes.insert(2, helper.make_node("Shape", ["nhwc"], ["shape"]))
    else:
        inits["shape"] = np.array(target, np.int64)
    return make_model(nodes, [("x", code_dtype)], [("y", table.dtype.type)], inits)


@pytest.mark.parametrize("target", [[-1, 5, 4, 3], [2, 5, 4, 3]])
def test_lookup_chain_with_a_constant_shape_is_one_step_where_it_restores_the_map(target):
    rng = np.random.default_rng(1)
    table = rng.integers(0, 256, 256).astype(np.uint8)
    model = lookup_chain_model(np.uint8, table, target)
    plan = compile_model(model)
    x = rng.integers(0, 256, (2, 3, 5, 4)).astype(np.uint8)
    assert _steps(plan) == 1
    got = plan.run({"x": x})["y"]
    assert np.array_equal(got, ort_run(model, {"x": x})[0]) and np.array_equal(got, table[x])
    # a map of another shape with as many elements: the Reshape moves codes between channels, and
    # the plan runs the chain itself to do the same
    other = rng.integers(0, 256, (2, 4, 5, 3)).astype(np.uint8)
    expected = ort_run(model, {"x": other})[0]
    assert expected.shape == (2, 3, 5, 4)
    assert not np.array_equal(expected, table[other].transpose(0, 2, 3, 1).reshape(2, 3, 5, 4))
    assert np.array_equal(plan.run({"x": other})["y"], expected)


@pytest.mark.parametrize("code_dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 3, 3, 3)])  # an odd count runs the chain itself
def test_lookup_chain_is_one_step_with_the_same_codes(code_dtype, shape):
    rng = np.random.default_rng(0)
    table = rng.integers(-128, 128, 256).astype(np.int8)
    model = lookup_chain_model(code_dtype, table)
    plan = compile_model(model)
    x = rng.integers(0, 256, shape).astype(np.uint8).view(code_dtype)
    got = plan.run({"x": x})["y"]
    assert _steps(plan) == 1
    assert got.dtype == np.int8 and np.array_equal(got, ort_run(model, {"x": x})[0])
    assert np.array_equal(got, _unfused(plan, {"x": x})["y"])
    inner = plan.run({"x": x}, ["y", "index"])  # a requested intermediate keeps the chain unfused
    assert np.array_equal(inner["y"], got) and inner["index"].dtype == np.int64


def test_lookup_chain_with_a_short_table_raises_as_gather_elements():
    model = lookup_chain_model(np.uint8, np.arange(100, dtype=np.uint8))
    plan = compile_model(model)
    ok = np.full((1, 2, 2, 2), 99, np.uint8)
    assert np.array_equal(plan.run({"x": ok})["y"], ok)
    with pytest.raises(Exception, match="out of range"):
        plan.run({"x": np.full((1, 2, 2, 2), 100, np.uint8)})


def gelu_qdq_model():
    """DequantizeLinear, the exporters' erf GELU, QuantizeLinear; the dequantized tensor also feeds
    an Add with the graph's other input (outside the region)."""
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["x"]),
             helper.make_node("Div", ["x", "sqrt2"], ["xs"]),
             helper.make_node("Erf", ["xs"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]),
             helper.make_node("Mul", ["x", "e1"], ["xe"]),
             helper.make_node("Mul", ["xe", "half"], ["g"]),
             helper.make_node("QuantizeLinear", ["g", "s2", "z2"], ["y"]),
             helper.make_node("Add", ["x", "other"], ["side"])]
    inits = dict(s=np.float32(0.05), z=np.uint8(121), sqrt2=np.float32(math.sqrt(2)), one=np.float32(1),
                 half=np.float32(0.5), s2=np.float32(0.03), z2=np.uint8(20))
    return make_model(nodes, [("q", np.uint8), ("other", np.float32)], [("y", np.uint8), ("side", np.float32)],
                      inits)


def test_elementwise_region_of_codes_is_one_lookup():
    rng = np.random.default_rng(1)
    model = gelu_qdq_model()
    plan = compile_model(model)
    feeds = {"q": rng.integers(0, 256, (2, 7, 9)).astype(np.uint8),
             "other": rng.standard_normal((2, 7, 9)).astype(np.float32)}
    got = plan.run(feeds)
    assert _steps(plan) == 2  # the region (outputs y and x) and the Add outside it
    want = _unfused(plan, feeds)
    for name in ("y", "side"):
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
        assert np.array_equal(got[name], want[name]), name
    inner = plan.run(feeds, ["y", "e"])  # a requested tensor inside the region is an output of it
    assert np.array_equal(inner["y"], got["y"])
    assert np.array_equal(inner["e"], _unfused(plan, feeds, ["e"])["e"])


def test_region_with_a_per_channel_constant_is_not_fused():
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["x"]),
             helper.make_node("Mul", ["x", "k"], ["y"])]
    model = make_model(nodes, [("q", np.uint8)], [("y", np.float32)],
                       dict(s=np.float32(0.1), z=np.uint8(3), k=np.array([1, 2, 3], np.float32)))
    plan = compile_model(model)
    q = np.arange(12, dtype=np.uint8).reshape(4, 3)
    want = (q.astype(np.float32) - 3) * np.float32(0.1) * np.array([1, 2, 3], np.float32)
    assert np.array_equal(plan.run({"q": q})["y"], want)
    assert _steps(plan) == 2


def test_constant_nodes_are_folded_and_an_overriding_feed_unfolds_them():
    """A weight's DequantizeLinear runs once per plan; feeding a new weight reaches the MatMul."""
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"]),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    rng = np.random.default_rng(2)
    wq = rng.integers(-127, 128, (4, 3)).astype(np.int8)
    model = make_model(nodes, [("x", np.float32), ("wq", np.int8)], [("y", np.float32)],
                       dict(wq=wq, ws=np.float32(0.02), wz=np.int8(0)))
    model.graph.input.pop()  # wq: an initializer only, so a constant of the plan
    plan = compile_model(model)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    assert np.array_equal(plan.run({"x": x})["y"], x @ (wq.astype(np.float32) * np.float32(0.02)))
    assert _steps(plan) == 1 and not plan._folded["w"].flags.writeable
    wq2 = rng.integers(-127, 128, (4, 3)).astype(np.int8)
    assert np.array_equal(plan.run({"x": x, "wq": wq2})["y"], x @ (wq2.astype(np.float32) * np.float32(0.02)))
    w = plan.run({"x": x}, ["w"])["w"]
    assert w.flags.writeable  # a folded tensor is handed out as a copy


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_pair_lookup_is_the_single_lookup(dtype):
    rng = np.random.default_rng(3)
    single = rng.integers(-1000, 1000, 256).astype(dtype)
    x = rng.integers(0, 256, (3, 6, 5)).astype(np.uint8).view(np.int8)
    got = lookup_pairs(pair_table(single), x, single.dtype)
    assert got.dtype == single.dtype and np.array_equal(got, single[x.view(np.uint8)])
    assert np.array_equal(code_values(np.int8).view(np.uint8), np.arange(256))


def swish_epilogue_model():
    """A dynamically quantized conv's float epilogue (ddddocr's CRNN): the int32 accumulator plus
    bias, cast, scaled by the product of a DynamicQuantizeLinear scale and the weight scale, then
    SiLU ``x · Sigmoid(x)``, dynamically quantized for the next conv; the SiLU output also feeds a
    residual Add (outside the region)."""
    nodes = [helper.make_node("DynamicQuantizeLinear", ["f"], ["fq", "fs", "fz"]),
             helper.make_node("Mul", ["fs", "ws"], ["scale"]),
             helper.make_node("Add", ["acc", "bias"], ["n"]),
             helper.make_node("Cast", ["n"], ["nf"], to=1),
             helper.make_node("Mul", ["nf", "scale"], ["x"]),
             helper.make_node("Sigmoid", ["x"], ["sig"]),
             helper.make_node("Mul", ["x", "sig"], ["y"]),
             helper.make_node("DynamicQuantizeLinear", ["y"], ["yq", "ys", "yz"]),
             helper.make_node("Mul", ["ys", "ws"], ["next_scale"]),  # reads only scalars: stays outside
             helper.make_node("Add", ["y", "r"], ["out"])]
    return make_model(nodes, [("acc", np.int32), ("f", np.float32), ("r", np.float32)],
                      [("out", np.float32), ("fq", np.uint8), ("yq", np.uint8), ("yz", np.uint8),
                       ("next_scale", np.float32)],
                      {"ws": np.array(0.0123, np.float32), "bias": np.array([-40, 7, 1000], np.int32).reshape(1, 3, 1, 1)})


@pytest.mark.parametrize("span", [2000, 40, 10 ** 6])  # a wide span runs the ops on the tensor itself
def test_integer_region_runs_its_ops_once_per_distinct_value(span):
    model = swish_epilogue_model()
    plan = compile_model(model)
    rng = np.random.default_rng(5)
    feeds = {"acc": rng.integers(-span // 2, span // 2, (2, 3, 40, 41)).astype(np.int32),
             "f": rng.normal(size=(7,)).astype(np.float32) * 40,
             "r": rng.normal(size=(2, 3, 40, 41)).astype(np.float32)}
    got = plan.run(feeds)
    assert _steps(plan) == 6  # DQL, Mul, Add, the region (Cast, Mul, Sigmoid, Mul, DQL), Mul, Add
    want = _unfused(plan, feeds)
    for name, w in zip(("out", "fq", "yq", "yz", "next_scale"), ort_run(model, feeds)):
        assert got[name].dtype == want[name].dtype == w.dtype and got[name].shape == w.shape
        bits = [a.reshape(-1).view(np.uint8) for a in (got[name], want[name], w)]
        assert np.array_equal(bits[0], bits[1]) and np.array_equal(bits[0], bits[2])
    inner = plan.run(feeds, ["out", "x"])  # a requested region tensor is handed on too
    assert np.array_equal(inner["out"], got["out"]) and np.array_equal(inner["x"], want_x(feeds))


def want_x(feeds):
    from qgraph.interp.ops_quant import dynamic_quantize_linear
    _, fs, _ = dynamic_quantize_linear(None, feeds["f"])
    n = feeds["acc"] + np.array([-40, 7, 1000], np.int32).reshape(1, 3, 1, 1)
    return n.astype(np.float32) * (fs * np.float32(0.0123))


def test_integer_region_takes_float_and_small_inputs_through_its_ops():
    """A float input (the Cast is then float to float) and a tensor below the table size run the
    region's own kernels, with the same numbers."""
    model = swish_epilogue_model()
    plan = compile_model(model)
    rng = np.random.default_rng(6)
    for acc in (rng.integers(-50, 50, (1, 3, 4, 5)).astype(np.int32), rng.normal(size=(1, 3, 40, 41)).astype(np.float32)):
        feeds = {"acc": acc, "f": np.array([1.5, -2], np.float32), "r": np.ones(acc.shape, np.float32)}
        if acc.dtype == np.float32:
            model_f = swish_epilogue_model()
            model_f.graph.input[0].type.tensor_type.elem_type = 1
            model_f.graph.node[2].input[1] = "bias_f"
            model_f.graph.initializer.append(helper.make_tensor("bias_f", 1, [1, 3, 1, 1], [-40.0, 7.0, 1000.0]))
            plan = compile_model(model_f)
        got, want = plan.run(feeds), _unfused(plan, feeds)
        assert np.array_equal(got["out"].view(np.uint32), want["out"].view(np.uint32))


def hardswish_chain_model():
    """Paddle2ONNX's HardSwish ``Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)`` after a per-channel bias
    Add, then a bound-less Clip (its kernel hands its input on) and a Relu."""
    nodes = [helper.make_node("Add", ["x", "bias"], ["xb"]),
             helper.make_node("Add", ["xb", "three"], ["a"]),
             helper.make_node("Clip", ["a", "zero", "six"], ["c"]),
             helper.make_node("Mul", ["xb", "c"], ["m"]),
             helper.make_node("Div", ["m", "six"], ["hs"]),
             helper.make_node("Clip", ["x"], ["x_same"]),
             helper.make_node("Sub", ["x_same", "three"], ["s"]),
             helper.make_node("Relu", ["s"], ["r"])]
    return make_model(nodes, [("x", np.float32)], [("hs", np.float32), ("r", np.float32), ("xb", np.float32)],
                      {"bias": np.linspace(-2, 2, 3, dtype=np.float32).reshape(1, 3, 1, 1),
                       "three": np.float32(3), "zero": np.float32(0), "six": np.float32(6)})


@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (4, 3, 2, 9)])
def test_inplace_chains_give_the_unfused_values(shape):
    model = hardswish_chain_model()
    plan = compile_model(model)
    x = (np.random.default_rng(8).standard_normal(shape) * 5).astype(np.float32)
    x.reshape(-1)[:3] = [np.nan, 1e30, -0.0]
    x_before = x.copy()
    for _ in range(2):  # the second run replays the first one's in-place decisions
        got = plan.run({"x": x}, ["hs", "r"])
        assert _steps(plan) == 3  # the bias Add (two readers), the HardSwish chain, Clip+Sub+Relu
        want = _unfused(plan, {"x": x}, ["hs", "r"])
        for name, w in zip(("hs", "r", "xb"), ort_run(model, {"x": x})):
            if name in got:
                assert np.array_equal(got[name].view(np.uint32), want[name].view(np.uint32))
                assert np.array_equal(got[name].view(np.uint32), w.view(np.uint32))
        assert np.array_equal(x.view(np.uint32), x_before.view(np.uint32))  # the input is never written
