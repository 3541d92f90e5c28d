"""Exporter idioms in normal form: each rewrite keeps the outputs and leaves one op."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph.graph import QModel
from qgraph.pipeline import run_pass
from qgraph.runner import run_model

from conftest import quantized_producers


def _model(nodes, inits, in_shape, out_shape, name="x", out="y"):
    """Initializers: integer arrays keep their dtype, the rest become float32 ("axes": int64)."""
    tensors = [numpy_helper.from_array(v if isinstance(v, np.ndarray) and v.dtype.kind in "iu" else
                                       np.asarray(v, np.int64 if k == "axes" else np.float32), k)
               for k, v in inits.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(name, TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _canonical(model):
    q = QModel.from_onnx(model)
    report = run_pass(q, "canonicalize")
    return q.to_onnx(), report


def _same_outputs(a, b, feeds, rtol=1e-5):
    ra, rb = run_model(a, feeds), run_model(b, feeds)
    for key in ra:
        np.testing.assert_allclose(rb[key], ra[key], rtol=rtol, atol=1e-5 * float(np.abs(ra[key]).max()))


def _ptq_keeps_the_norm_float(model, calib, x):
    """ptq quantizes only the norm's output (the + β ending it, which the MatMul after reads) and
    keeps the model's output at cosine > 0.999 on `x`."""
    from qgraph.api import apply_pipeline
    quantized = apply_pipeline(model, "ptq", {"x": calib})
    assert quantized_producers(quantized) == {"Add"}
    ref, got = run_model(model, {"x": x})["y"], run_model(quantized, {"x": x})["y"]
    assert float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.999


def _layernorm_nodes(out: str) -> list:
    """torch.onnx's LayerNorm over the last axis without its affine: (x − mean) / sqrt(var + eps)."""
    return [helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1], keepdims=1),
            helper.make_node("Sub", ["x", "m"], ["d"]),
            helper.make_node("Pow", ["d", "two"], ["p"]),
            helper.make_node("ReduceMean", ["p"], ["v"], axes=[-1], keepdims=1),
            helper.make_node("Add", ["v", "eps"], ["ve"]),
            helper.make_node("Sqrt", ["ve"], ["s"]),
            helper.make_node("Div", ["d", "s"], [out])]


def test_decomposed_layernorm_becomes_one_op_with_its_statistics_outputs():
    """torch.onnx's LayerNorm: mean, centred, Pow 2, mean, + eps, Sqrt, Div, Mul γ, Add β."""
    rng = np.random.default_rng(0)
    nodes = _layernorm_nodes("n") + [helper.make_node("Mul", ["n", "gamma"], ["g"]),
                                     helper.make_node("Add", ["g", "beta"], ["y"])]
    model = _model(nodes, {"two": 2.0, "eps": 1e-5, "gamma": rng.uniform(0.5, 1.5, 16),
                           "beta": rng.normal(0, 0.1, 16)}, ["N", 5, 16], ["N", 5, 16])
    out, report = _canonical(model)
    assert report["idioms"]["layernorm"] == 1
    ln = [n for n in out.graph.node if n.op_type == "LayerNormalization"]
    assert len(ln) == 1 and len(ln[0].output) == 3 and len(out.graph.node) == 1
    _same_outputs(model, out, {"x": rng.normal(2, 3, (4, 5, 16)).astype(np.float32)})


def test_a_layernorm_read_halfway_is_left_alone():
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1], keepdims=1),
             helper.make_node("Sub", ["x", "m"], ["d"]),
             helper.make_node("Mul", ["d", "d"], ["p"]),
             helper.make_node("ReduceMean", ["p"], ["v"], axes=[-1], keepdims=1),
             helper.make_node("Add", ["v", "eps"], ["ve"]),
             helper.make_node("Sqrt", ["ve"], ["s"]),
             helper.make_node("Div", ["d", "s"], ["n"]),
             helper.make_node("Add", ["n", "s"], ["y"])]        # the std is read outside the norm
    model = _model(nodes, {"eps": 1e-5}, ["N", 8], ["N", 8])
    out, report = _canonical(model)
    assert report["idioms"]["layernorm"] == 0 and not any(n.op_type == "LayerNormalization" for n in out.graph.node)


def test_a_layernorm_over_axes_of_unknown_size_stays_decomposed_and_runs():
    """PP-OCRv4's recognizer normalizes a tensor whose width is symbolic: LayerNormalization would
    need a scale of that size, so the idiom is declined (it used to crash in numpy.ones)."""
    nodes = _layernorm_nodes("y")
    model = _model(nodes, {"two": 2.0, "eps": 1e-5}, ["N", 5, "W"], ["N", 5, "W"])
    out, report = _canonical(model)
    assert report["idioms"]["layernorm"] == 0
    assert any("no static size" in entry["reason"] for entry in report["skipped"])
    _same_outputs(model, out, {"x": np.random.default_rng(1).normal(1, 2, (2, 5, 12)).astype(np.float32)})


def test_softmax_written_out_becomes_softmax():
    nodes = [helper.make_node("ReduceMax", ["x"], ["mx"], axes=[-1], keepdims=1),
             helper.make_node("Sub", ["x", "mx"], ["c"]),
             helper.make_node("Exp", ["c"], ["e"]),
             helper.make_node("ReduceSum", ["e", "axes"], ["s"], keepdims=1),
             helper.make_node("Div", ["e", "s"], ["y"])]
    model = _model(nodes, {"axes": [-1]}, ["N", 10], ["N", 10])
    out, report = _canonical(model)
    assert report["idioms"]["softmax"] == 1 and [n.op_type for n in out.graph.node] == ["Softmax"]
    _same_outputs(model, out, {"x": np.random.default_rng(1).normal(0, 4, (3, 10)).astype(np.float32)})


@pytest.mark.parametrize("ops", [("Mul", "Add"), ("Div", "Sub"), ("Mul",), ("Add",)])
def test_per_channel_affine_after_a_conv_folds_into_it(ops):
    """Paddle's learnable affine: Conv -> Mul(c) -> Add(c) with c of shape [1, C, 1, 1]."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["t0"], pads=[1, 1, 1, 1])]
    inits = {"w": rng.normal(0, 0.5, (6, 3, 3, 3)), "b": rng.normal(0, 0.1, 6)}
    for i, op in enumerate(ops):
        out = "y" if i == len(ops) - 1 else f"t{i + 1}"
        inits[f"c{i}"] = rng.uniform(0.5, 2.0, (1, 6, 1, 1))
        nodes.append(helper.make_node(op, [f"t{i}", f"c{i}"], [out]))
    model = _model(nodes, inits, ["N", 3, 8, 8], ["N", 6, 8, 8])
    out, report = _canonical(model)
    assert report["idioms"]["affine"] == len(ops) and [n.op_type for n in out.graph.node] == ["Conv"]
    _same_outputs(model, out, {"x": rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)})


def test_affine_that_is_not_per_channel_stays():
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"]), helper.make_node("Mul", ["t", "c"], ["y"])]
    model = _model(nodes, {"w": rng.normal(0, 1, (4, 2, 1, 1)), "c": rng.normal(0, 1, (1, 4, 5, 5))},
                   ["N", 2, 5, 5], ["N", 4, 5, 5])
    out, report = _canonical(model)
    assert report["idioms"]["affine"] == 0 and [n.op_type for n in out.graph.node] == ["Conv", "Mul"]
    assert any("not one value per output channel" in s["reason"] for s in report["skipped"])


@pytest.mark.parametrize("terms", [1, 2, 4])
def test_sum_becomes_adds_in_ort_order(terms):
    """Caffe2-era ResNets add their residuals with Sum: Adds in input order, ((a + b) + c) + d,
    ORT's own order, so the float outputs are identical, not only close."""
    rng = np.random.default_rng(terms)
    names = [f"t{i}" for i in range(terms)]
    nodes = [helper.make_node("Mul", ["x", f"c{i}"], [n]) for i, n in enumerate(names)]
    nodes.append(helper.make_node("Sum", names, ["s"], name="sum"))
    nodes.append(helper.make_node("Relu", ["s"], ["y"]))
    model = _model(nodes, {f"c{i}": rng.normal(0, 3, (1, 4, 1, 1)) for i in range(terms)}, ["N", 4, 5, 5],
                   ["N", 4, 5, 5])
    out, report = _canonical(model)
    assert report["idioms"]["sum"] == 1
    ops = [n.op_type for n in out.graph.node]
    assert "Sum" not in ops and ops.count("Add") == terms - 1
    feeds = {"x": rng.normal(0, 1, (3, 4, 5, 5)).astype(np.float32)}
    np.testing.assert_array_equal(run_model(out, feeds)["y"], run_model(model, feeds)["y"])


@pytest.mark.parametrize("axes, keepdims, pooled", [([2, 3], 1, True), ([-1, -2], 0, True), ([1], 1, False),
                                                    ([2], 0, False)])
def test_spatial_mean_becomes_global_average_pool(axes, keepdims, pooled):
    """tf2onnx writes Keras' GlobalAveragePooling2D as ReduceMean over H and W: GlobalAveragePool
    (+ Squeeze for keepdims=0), which insert_qdq quantizes and lowering runs on integers; a mean
    over other axes stays."""
    rng = np.random.default_rng(1)
    out_shape = ["N", 4, 1, 1] if keepdims else ["N", 4]
    if not pooled:
        out_shape = None
    nodes = [helper.make_node("ReduceMean", ["x"], ["y"], axes=axes, keepdims=keepdims)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 5, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out, report = _canonical(model)
    ops = [n.op_type for n in out.graph.node]
    assert report["idioms"]["global_pool"] == int(pooled)
    assert ops == (["GlobalAveragePool"] + ([] if keepdims else ["Squeeze"]) if pooled else ["ReduceMean"])
    _same_outputs(model, out, {"x": rng.normal(0, 2, (3, 4, 5, 6)).astype(np.float32)})


@pytest.mark.parametrize("op, attrs", [("DepthToSpace", {"mode": "DCR"}), ("DepthToSpace", {"mode": "CRD"}),
                                       ("SpaceToDepth", {})])
def test_pixel_shuffle_becomes_reshape_transpose_reshape(op, attrs):
    """The spec's definition, exactly: the same elements in the same places."""
    nodes = [helper.make_node(op, ["x"], ["y"], blocksize=2, **attrs)]
    out_shape = ["N", 2, 8, 12] if op == "DepthToSpace" else ["N", 32, 2, 3]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 4, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out, report = _canonical(model)
    assert report["idioms"]["pixel_shuffle"] == 1
    assert [n.op_type for n in out.graph.node] == ["Reshape", "Transpose", "Reshape"]
    x = np.random.default_rng(2).normal(0, 1, (3, 8, 4, 6)).astype(np.float32)
    np.testing.assert_array_equal(run_model(out, {"x": x})["y"], run_model(model, {"x": x})["y"])


def test_pixel_shuffle_of_dynamic_size_stays_with_the_reason():
    nodes = [helper.make_node("DepthToSpace", ["x"], ["y"], blocksize=2, name="d2s")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, "H2", "W2"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out, report = _canonical(model)
    assert [n.op_type for n in out.graph.node] == ["DepthToSpace"]
    assert {"node": "d2s", "reason": "DepthToSpace 'd2s' needs a static (N, C, H, W) input to become "
                                     "Reshape/Transpose"} in report["skipped"]


def _moments_layernorm_model():
    """Flax's LayerNorm as jax2tf/tf2onnx write it (Google's Magika): over axis 1 of (N, 8, 16) —
    not the trailing one — E[x] and E[x²] from ReduceSum·1/8, E[x²] − E[x]², Max 0, both
    statistics Reshaped to (N, 1, 16) through a shape computed from Shape(x) and Expanded, + ε,
    Sqrt, Reciprocal, γ on the reciprocal, (x − E[x])·…, + β; then a MatMul."""
    rng = np.random.default_rng(3)
    shape_of = [helper.make_node("Shape", ["x"], ["shp"]),
                helper.make_node("Slice", ["shp", "zero", "one", "zero"], ["batch"]),
                helper.make_node("Concat", ["batch", "keep1", "width"], ["bshape"], axis=0)]
    nodes = shape_of + [
        helper.make_node("ReduceSum", ["x", "axes"], ["s1"], keepdims=0),
        helper.make_node("Mul", ["s1", "inv_n"], ["mean"]),
        helper.make_node("Mul", ["x", "x"], ["sq"]),
        helper.make_node("ReduceSum", ["sq", "axes"], ["s2"], keepdims=0),
        helper.make_node("Mul", ["s2", "inv_n"], ["ex2"]),
        helper.make_node("Mul", ["mean", "mean"], ["mean2"]),
        helper.make_node("Sub", ["ex2", "mean2"], ["var0"]),
        helper.make_node("Max", ["zerof", "var0"], ["var"]),
        helper.make_node("Reshape", ["var", "bshape"], ["var_r"]),
        helper.make_node("Expand", ["var_r", "bshape"], ["var_b"]),
        helper.make_node("Add", ["var_b", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Reciprocal", ["sd"], ["inv"]),
        helper.make_node("Mul", ["inv", "gamma"], ["scale"]),
        helper.make_node("Reshape", ["mean", "bshape"], ["mean_r"]),
        helper.make_node("Expand", ["mean_r", "bshape"], ["mean_b"]),
        helper.make_node("Sub", ["x", "mean_b"], ["centred"]),
        helper.make_node("Mul", ["centred", "scale"], ["normed"]),
        helper.make_node("Add", ["normed", "beta"], ["ln"]),
        helper.make_node("MatMul", ["ln", "w"], ["y"])]
    i64 = np.int64
    inits = {"zero": np.array([0], i64), "one": np.array([1], i64), "keep1": np.array([1], i64),
             "width": np.array([16], i64), "axes": [1], "inv_n": 1 / 8, "zerof": 0.0, "eps": 1e-6,
             "gamma": rng.uniform(0.5, 1.5, (1, 8, 1)), "beta": rng.normal(0, 0.1, (1, 8, 1)),
             "w": rng.normal(0, 0.3, (16, 4))}
    return _model(nodes, inits, ["N", 8, 16], ["N", 8, 4])


def test_a_moments_form_layernorm_is_found_and_left_as_exported():
    from qgraph.normal_form import written_out_layernorms
    model = _moments_layernorm_model()
    out, report = _canonical(model)
    assert report["idioms"]["layernorm"] == 0 and not any(n.op_type == "LayerNormalization" for n in out.graph.node)
    found = written_out_layernorms(QModel.from_onnx(out))
    assert len(found) == 1
    assert sorted(n.op for n in found[0]) == sorted(
        ["ReduceSum", "Mul", "Mul", "ReduceSum", "Mul", "Mul", "Sub", "Max", "Reshape", "Expand", "Add", "Sqrt",
         "Reciprocal", "Mul", "Reshape", "Expand", "Sub", "Mul", "Add"])
    _same_outputs(model, out, {"x": np.random.default_rng(1).normal(3, 0.5, (2, 8, 16)).astype(np.float32)})


def test_a_moments_form_layernorm_with_a_stray_reader_is_not_taken():
    """E[x] read outside the norm: the region is not a LayerNorm's alone."""
    from qgraph.normal_form import written_out_layernorms
    model = _moments_layernorm_model()
    model.graph.node.append(helper.make_node("Identity", ["mean"], ["mean_out"]))
    model.graph.output.append(helper.make_tensor_value_info("mean_out", TensorProto.FLOAT, None))
    assert written_out_layernorms(QModel.from_onnx(model)) == []


def test_ptq_keeps_a_moments_form_layernorm_float():
    """Its statistics quantized one by one cancel into noise (E[x] = 3, sd 0.5: E[x²] − E[x]² is
    0.25 out of 9.25); kept float, only the LayerNorm's output, the MatMul's input, is quantized."""
    rng = np.random.default_rng(2)
    _ptq_keeps_the_norm_float(_moments_layernorm_model(), rng.normal(3, 0.5, (64, 8, 16)).astype(np.float32),
                              rng.normal(3, 0.5, (16, 8, 16)).astype(np.float32))


def _keras_layernorm_model():
    """Keras' LayerNormalization as tf2onnx writes it (Magika 0.5.1): over the last axis of (N, 6, 16),
    s = γ / √(E[(x − E[x])²] + ε) from Sub, Mul, ReduceMean, Add, Sqrt, Reciprocal, Mul γ; then
    x·s + (β − E[x]·s); then a MatMul."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1], keepdims=1),
             helper.make_node("Sub", ["x", "mean"], ["d"]),
             helper.make_node("Mul", ["d", "d"], ["dd"]),
             helper.make_node("ReduceMean", ["dd"], ["var"], axes=[-1], keepdims=1),
             helper.make_node("Add", ["var", "eps"], ["ve"]),
             helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Reciprocal", ["sd"], ["inv"]),
             helper.make_node("Mul", ["inv", "gamma"], ["s"]),
             helper.make_node("Mul", ["x", "s"], ["xs"]),
             helper.make_node("Mul", ["mean", "s"], ["ms"]),
             helper.make_node("Sub", ["beta", "ms"], ["shift"]),
             helper.make_node("Add", ["xs", "shift"], ["ln"]),
             helper.make_node("MatMul", ["ln", "w"], ["y"])]
    return _model(nodes, {"eps": 1e-3, "gamma": rng.uniform(0.5, 1.5, 16), "beta": rng.normal(0, 0.1, 16),
                          "w": rng.normal(0, 0.3, (16, 4))}, ["N", 6, 16], ["N", 6, 4])


def test_a_keras_form_layernorm_is_found_and_kept_float_by_ptq():
    from qgraph.normal_form import written_out_layernorms
    model = _keras_layernorm_model()
    out, report = _canonical(model)
    found = written_out_layernorms(QModel.from_onnx(out))
    assert len(found) == 1 and len(found[0]) == 12 and "MatMul" not in {n.op for n in found[0]}
    rng = np.random.default_rng(5)
    _ptq_keeps_the_norm_float(model, rng.normal(3, 0.5, (64, 6, 16)).astype(np.float32),
                              rng.normal(3, 0.5, (16, 6, 16)).astype(np.float32))


def test_a_layernorm_as_batchnorm_on_batch_statistics_is_found_and_kept_float_by_ptq():
    """Keras' fused LayerNorm through tf2onnx (Magika 0.5.1): the samples of (N, 16) laid along
    BatchNormalization's channel axis as (1, N, 16, 1), its mean and variance computed in the graph
    over axes 0, 2, 3, then Reshape back, Mul γ, Add β, and a MatMul."""
    from qgraph.normal_form import written_out_layernorms
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Reshape", ["x", "bn_shape"], ["xr"]),
             helper.make_node("ReduceMean", ["xr"], ["m"], axes=[0, 2, 3], keepdims=1),
             helper.make_node("Sub", ["xr", "m"], ["d"]),
             helper.make_node("ReduceSumSquare", ["d"], ["ss"], axes=[0, 2, 3], keepdims=0),
             helper.make_node("Div", ["ss", "count"], ["var"]),
             helper.make_node("Squeeze", ["m", "sq_axes"], ["mean"]),
             helper.make_node("Shape", ["x"], ["xs"]),
             helper.make_node("Slice", ["xs", "zero", "one"], ["n"]),
             helper.make_node("ConstantOfShape", ["n"], ["ones"], value=numpy_helper.from_array(np.ones(1, np.float32))),
             helper.make_node("ConstantOfShape", ["n"], ["zeros"], value=numpy_helper.from_array(np.zeros(1, np.float32))),
             helper.make_node("BatchNormalization", ["xr", "ones", "zeros", "mean", "var"], ["bn"], epsilon=1e-3),
             helper.make_node("Reshape", ["bn", "back"], ["r"]),
             helper.make_node("Mul", ["r", "gamma"], ["g"]),
             helper.make_node("Add", ["g", "beta"], ["ln"]),
             helper.make_node("MatMul", ["ln", "w"], ["y"])]
    i64 = np.int64
    inits = {"bn_shape": np.array([1, -1, 16, 1], i64), "back": np.array([-1, 16], i64),
             "sq_axes": np.array([0, 2, 3], i64), "zero": np.array([0], i64), "one": np.array([1], i64),
             "count": 16.0, "gamma": rng.uniform(0.5, 1.5, 16), "beta": rng.normal(0, 0.1, 16),
             "w": rng.normal(0, 0.3, (16, 4))}
    model = _model(nodes, inits, ["N", 16], ["N", 4])
    out, _ = _canonical(model)
    found = written_out_layernorms(QModel.from_onnx(out))
    assert len(found) == 1 and {"BatchNormalization", "ReduceSumSquare", "Mul", "Add"} <= {n.op for n in found[0]}
    x = rng.normal(3, 0.5, (64, 16)).astype(np.float32)
    _ptq_keeps_the_norm_float(model, x, x[:16])
