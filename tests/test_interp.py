"""The reference interpreter against ONNX Runtime 1.19, bit for bit on quantized ops."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph.errors import InterpError
from qgraph.interp import compile_model, run
from qgraph.interp import ops_nn

MS = "com.microsoft"
T = {np.int8: TensorProto.INT8, np.uint8: TensorProto.UINT8, np.float32: TensorProto.FLOAT,
     np.int32: TensorProto.INT32, np.int64: TensorProto.INT64}


def make_model(nodes, inputs, outputs, inits=(), opset=17):
    """inputs/outputs: list of (name, numpy dtype); inits: dict name -> array."""
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, T[dt], None) for n, dt in inputs],
        [helper.make_tensor_value_info(n, T[dt], None) for n, dt in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(inits).items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)])
    m.ir_version = 8
    return m


def ort_run(model, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def assert_same(model, feeds):
    want = ort_run(model, feeds)
    got = run(model, feeds)
    for (name, g), w in zip(got.items(), want):
        assert g.dtype == w.dtype, name
        assert g.shape == w.shape, name
        if np.issubdtype(w.dtype, np.integer):
            diff = np.flatnonzero(g.astype(np.int64) != w.astype(np.int64))
            assert diff.size == 0, f"{name}: {diff.size}/{w.size} differ, e.g. {g.reshape(-1)[diff[:5]]} vs {w.reshape(-1)[diff[:5]]}"
        else:
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def rand_q(rng, dt, shape):
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max + 1, size=shape).astype(dt)


def qparams(rng, dt):
    zp = dt(0) if dt == np.int8 and rng.random() < 0.5 else rand_q(rng, dt, ()).astype(dt)
    return np.float32(rng.uniform(0.005, 0.1)), np.asarray(zp, dt)


# --------------------------------------------------------------------------- QLinearConv
CONV_CASES = [
    # (act dtype, w dtype, per_channel, C, M, group, kernel, strides, pads, dilations, HW)
    (np.uint8, np.uint8, False, 3, 8, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (9, 9)),
    (np.uint8, np.int8, True, 4, 16, 1, (3, 3), (2, 2), (0, 1, 1, 0), (1, 1), (10, 11)),
    (np.int8, np.int8, True, 8, 16, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (8, 8)),
    (np.int8, np.int8, False, 16, 16, 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (7, 7)),   # depthwise
    (np.uint8, np.int8, True, 16, 32, 16, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), (9, 9)),   # dw multiplier 2
    (np.uint8, np.int8, True, 8, 12, 4, (3, 3), (1, 2), (2, 0, 1, 1), (2, 1), (11, 9)),   # grouped, dilated
    (np.int8, np.int8, True, 32, 16, 1, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), (6, 6)),     # pointwise
    (np.uint8, np.int8, False, 3, 8, 1, (5,), (2,), (2, 2), (1,), (20,)),                   # 1-D
    (np.uint8, np.uint8, False, 64, 8, 1, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), (6, 6)),    # float64 GEMM path
    (np.uint8, np.int8, True, 8, 8, 8, (3, 3), (2, 2), (1, 0, 0, 1), (1, 1), (9, 10)),     # dw, stride phases
    (np.uint8, np.uint8, False, 6, 6, 6, (3, 3), (1, 2), (2, 1, 2, 1), (2, 1), (8, 7)),    # dw, dilated
    (np.uint8, np.int8, True, 4, 4, 4, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (12, 12)),    # dw, batch chunks
    (np.int8, np.int8, True, 16, 8, 1, (3, 3), (1, 1), (0, 2, 1, 1), (2, 1), (9, 10)),     # GEMM per tap
    (np.uint8, np.int8, False, 12, 12, 1, (1, 3), (1, 1), (0, 1, 0, 1), (1, 1), (5, 7)),   # GEMM per tap
]


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("with_bias", [True, False])
def test_qlinearconv_matches_ort(case, seed, with_bias):
    adt, wdt, per_ch, c, m, group, k, s, p, d, hw = CONV_CASES[case]
    rng = np.random.default_rng(seed * 100 + case)
    xs, xzp = qparams(rng, adt)
    ys, yzp = qparams(rng, adt)
    ys = np.float32(ys * 20)
    w = rand_q(rng, wdt, (m, c // group) + k)
    if per_ch:
        ws = rng.uniform(0.001, 0.05, m).astype(np.float32)
        wzp = np.zeros(m, wdt)
    else:
        ws = np.float32(rng.uniform(0.001, 0.05))
        wzp = np.asarray(0 if wdt == np.int8 else rand_q(rng, wdt, ()), wdt)
    inits = dict(xs=xs, xzp=xzp, w=w, ws=ws, wzp=wzp, ys=ys, yzp=yzp)
    ins = ["x", "xs", "xzp", "w", "ws", "wzp", "ys", "yzp"]
    if with_bias:
        inits["b"] = rng.integers(-5000, 5000, m).astype(np.int32)
        ins.append("b")
    node = helper.make_node("QLinearConv", ins, ["y"], group=group, kernel_shape=list(k), strides=list(s),
                            pads=list(p), dilations=list(d))
    model = make_model([node], [("x", adt)], [("y", adt)], inits)
    x = rand_q(rng, adt, (2, c) + hw)
    assert_same(model, {"x": x})


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_qlinearconv_in_chunks_matches_ort(monkeypatch, case):
    """Tiny chunk sizes: every conv method runs a batch of 3 one image (stride 1: one output row) at a time."""
    monkeypatch.setattr(ops_nn, "_CHUNK", 64)
    monkeypatch.setattr(ops_nn, "_TOEPLITZ_CHUNK", 64)
    _assert_qlinearconv_case_matches_ort(case, seed=500 + case)


def _assert_qlinearconv_case_matches_ort(case: int, seed: int) -> None:
    adt, wdt, per_ch, c, m, group, k, s, p, d, hw = CONV_CASES[case]
    rng = np.random.default_rng(seed)
    xs, xzp = qparams(rng, adt)
    w = rand_q(rng, wdt, (m, c // group) + k)
    wzp = np.zeros(m if per_ch else (), wdt)
    ws = rng.uniform(0.001, 0.05, m if per_ch else ()).astype(np.float32)
    inits = dict(xs=xs, xzp=xzp, w=w, ws=ws, wzp=wzp, ys=np.float32(0.5), yzp=qparams(rng, adt)[1],
                 b=rng.integers(-5000, 5000, m).astype(np.int32))
    node = helper.make_node("QLinearConv", ["x", "xs", "xzp", "w", "ws", "wzp", "ys", "yzp", "b"],
                            ["y"], group=group, kernel_shape=list(k), strides=list(s), pads=list(p), dilations=list(d))
    model = make_model([node], [("x", adt)], [("y", adt)], inits)
    assert_same(model, {"x": rand_q(rng, adt, (3, c) + hw)})


DEPTHWISE_CASES = [i for i, case in enumerate(CONV_CASES) if case[3] == case[4] == case[5]]


#: Each depthwise method forced on every depthwise case: (settings of ops_nn, seed base).
DEPTHWISE_METHODS = {
    # per tap (channels-last, taps clipped to where they read inside the image), chunks of one image
    "taps": ({"_TOEPLITZ_MAX_K": 0, "_TILED_MIN_TAPS": 10 ** 9, "_taps_beat_flat_phases": lambda *args: True,
              "_CHUNK": 64}, 700),
    # flat stride-phase passes, one image and one channel at a time (an image that outgrows L2)
    "flat_phases": ({"_TOEPLITZ_MAX_K": 0, "_TILED_MIN_TAPS": 10 ** 9, "_taps_beat_flat_phases": lambda *args: False,
                     "_CHUNK": 64}, 900),
    # banded GEMMs over tiles of 2 output columns (a partial last tile on odd widths), one image at a time
    "tiles": ({"_TOEPLITZ_MAX_K": 0, "_TILED_MIN_TAPS": 1, "_TOEPLITZ_TILE": 2, "_TOEPLITZ_CHUNK": 64}, 1100),
}


@pytest.mark.parametrize("method", list(DEPTHWISE_METHODS))
@pytest.mark.parametrize("case", DEPTHWISE_CASES)
def test_qlinearconv_depthwise_methods_match_ort(monkeypatch, case, method):
    """Every depthwise case through each depthwise method, whichever its shape would pick."""
    settings, seed = DEPTHWISE_METHODS[method]
    for name, value in settings.items():
        monkeypatch.setattr(ops_nn, name, value)
    _assert_qlinearconv_case_matches_ort(case, seed=seed + case)


def test_qlinearconv_large_bias_and_accumulators():
    """Biases beyond 2^24 take the int32 path; accumulators beyond 2^24 round in cvtdq2ps."""
    rng = np.random.default_rng(11)
    w = np.full((4, 32, 3, 3), 127, np.int8)
    b = np.array([2 ** 25 + 1, -(2 ** 25) - 3, 7, 2 ** 24 + 1], np.int32)
    inits = dict(xs=np.float32(0.02), xzp=np.int8(-128), w=w, ws=np.float32(0.01), wzp=np.int8(0),
                 ys=np.float32(3000.0), yzp=np.int8(0), b=b)
    node = helper.make_node("QLinearConv", ["x", "xs", "xzp", "w", "ws", "wzp", "ys", "yzp", "b"], ["y"], pads=[1, 1, 1, 1])
    model = make_model([node], [("x", np.int8)], [("y", np.int8)], inits)
    assert_same(model, {"x": rand_q(rng, np.int8, (1, 32, 5, 5))})


def test_qlinearconv_auto_pad_same():
    rng = np.random.default_rng(7)
    w = rand_q(rng, np.int8, (4, 3, 3, 3))
    inits = dict(xs=np.float32(0.02), xzp=np.uint8(128), w=w, ws=np.float32(0.01), wzp=np.int8(0),
                 ys=np.float32(0.1), yzp=np.uint8(100))
    node = helper.make_node("QLinearConv", ["x", "xs", "xzp", "w", "ws", "wzp", "ys", "yzp"], ["y"],
                            auto_pad="SAME_UPPER", strides=[2, 2])
    model = make_model([node], [("x", np.uint8)], [("y", np.uint8)], inits)
    assert_same(model, {"x": rand_q(rng, np.uint8, (1, 3, 8, 7))})


# --------------------------------------------------------------------------- matmuls
@pytest.mark.parametrize("adt,bdt", [(np.uint8, np.uint8), (np.uint8, np.int8), (np.int8, np.int8)])
@pytest.mark.parametrize("per_col", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_qlinearmatmul_matches_ort(adt, bdt, per_col, seed):
    rng = np.random.default_rng(seed)
    k, n = 37, 19
    a_s, azp = qparams(rng, adt)
    ys, yzp = qparams(rng, adt)
    b = rand_q(rng, bdt, (k, n))
    if per_col:
        bs = rng.uniform(0.001, 0.05, n).astype(np.float32)
        bzp = np.zeros(n, bdt)
    else:
        bs = np.float32(rng.uniform(0.001, 0.05))
        bzp = np.asarray(0 if bdt == np.int8 else rand_q(rng, bdt, ()), bdt)
    inits = dict(as_=a_s, azp=azp, b=b, bs=bs, bzp=bzp, ys=np.float32(ys * 30), yzp=yzp)
    node = helper.make_node("QLinearMatMul", ["a", "as_", "azp", "b", "bs", "bzp", "ys", "yzp"], ["y"])
    model = make_model([node], [("a", adt)], [("y", adt)], inits)
    assert_same(model, {"a": rand_q(rng, adt, (2, 5, k))})


@pytest.mark.parametrize("seed", range(3))
def test_convinteger_and_matmulinteger_match_ort(seed):
    rng = np.random.default_rng(seed)
    w = rand_q(rng, np.uint8, (6, 2, 3, 3))
    n1 = helper.make_node("ConvInteger", ["x", "w", "xzp", "wzp"], ["y"], group=2, pads=[1, 0, 1, 2], strides=[1, 2])
    m = make_model([n1], [("x", np.uint8)], [("y", np.int32)], dict(w=w, xzp=np.uint8(rng.integers(0, 255)),
                                                                    wzp=np.uint8(rng.integers(0, 255))))
    assert_same(m, {"x": rand_q(rng, np.uint8, (2, 4, 9, 8))})
    b = rand_q(rng, np.int8, (33, 7))
    n2 = helper.make_node("MatMulInteger", ["a", "b", "azp", "bzp"], ["y"])
    m2 = make_model([n2], [("a", np.uint8)], [("y", np.int32)], dict(b=b, azp=np.uint8(rng.integers(0, 255)),
                                                                     bzp=np.zeros(7, np.int8)))
    assert_same(m2, {"a": rand_q(rng, np.uint8, (3, 4, 33))})


# --------------------------------------------------------------------------- contrib ops
def _binary_model(op, dt, a_shape, b_shape, rng):
    a_s, azp = qparams(rng, dt)
    b_s, bzp = qparams(rng, dt)
    c_s, czp = qparams(rng, dt)
    if op == "QLinearMul":
        c_s = np.float32(a_s * b_s * rng.uniform(20, 200))
    node = helper.make_node(op, ["a", "as", "azp", "b", "bs", "bzp", "cs", "czp"], ["c"], domain=MS)
    inits = {"as": a_s, "azp": azp, "bs": b_s, "bzp": bzp, "cs": c_s, "czp": czp}
    model = make_model([node], [("a", dt), ("b", dt)], [("c", dt)], inits)
    return model, {"a": rand_q(rng, dt, a_shape), "b": rand_q(rng, dt, b_shape)}


SHAPES = [((2, 8, 5, 7), (2, 8, 5, 7)), ((1, 3, 40), (1,)), ((1,), (2, 70)), ((2, 16, 3, 3), (1, 16, 1, 1)),
          ((4, 1, 33), (1, 6, 33)), ((3, 1), (1, 50)),
          # from 4096 outputs on, a lookup in a table over all code pairs (each broadcast kind)
          ((4, 40, 40), (4, 40, 40)), ((1, 197, 64), (64,)), ((2, 16, 16, 16), (1, 16, 1, 1)), ((1,), (4, 1100)),
          ((2, 1, 3000), (1, 2, 1))]


@pytest.mark.parametrize("op", ["QLinearAdd", "QLinearMul"])
@pytest.mark.parametrize("dt", [np.uint8, np.int8])
@pytest.mark.parametrize("shapes", range(len(SHAPES)))
@pytest.mark.parametrize("seed", range(4))
def test_qlinear_binary_matches_ort(op, dt, shapes, seed):
    rng = np.random.default_rng(seed * 31 + shapes)
    model, feeds = _binary_model(op, dt, *SHAPES[shapes], rng)
    assert_same(model, feeds)


@pytest.mark.parametrize("dt", [np.uint8, np.int8])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("hw", [(7, 7), (1, 1), (13, 5)])
def test_qlinear_global_average_pool_matches_ort(dt, seed, hw):
    rng = np.random.default_rng(seed)
    xs, xzp = qparams(rng, dt)
    ys, yzp = qparams(rng, dt)
    node = helper.make_node("QLinearGlobalAveragePool", ["x", "xs", "xzp", "ys", "yzp"], ["y"], domain=MS,
                            channels_last=0)
    model = make_model([node], [("x", dt)], [("y", dt)], dict(xs=xs, xzp=xzp, ys=ys, yzp=yzp))
    assert_same(model, {"x": rand_q(rng, dt, (2, 19) + hw)})


@pytest.mark.parametrize("dt", [np.uint8, np.int8])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("attrs", [dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
                                   dict(kernel_shape=[2, 2], strides=[2, 2]),
                                   dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1),
                                   dict(kernel_shape=[3, 2], strides=[2, 2], ceil_mode=1)])
def test_qlinear_average_pool_matches_ort(dt, seed, attrs):
    rng = np.random.default_rng(seed)
    xs, xzp = qparams(rng, dt)
    ys, yzp = qparams(rng, dt)
    node = helper.make_node("QLinearAveragePool", ["x", "xs", "xzp", "ys", "yzp"], ["y"], domain=MS, **attrs)
    model = make_model([node], [("x", dt)], [("y", dt)], dict(xs=xs, xzp=xzp, ys=ys, yzp=yzp))
    assert_same(model, {"x": rand_q(rng, dt, (2, 5, 9, 8))})


@pytest.mark.parametrize("dt", [np.uint8, np.int8])
@pytest.mark.parametrize("seed", range(3))
def test_qlinear_concat_matches_ort(dt, seed):
    rng = np.random.default_rng(seed)
    ys, yzp = qparams(rng, dt)
    s1, z1 = qparams(rng, dt)
    inits = dict(ys=ys, yzp=yzp, s1=s1, z1=z1, s2=ys, z2=yzp)
    node = helper.make_node("QLinearConcat", ["ys", "yzp", "a", "s1", "z1", "b", "s2", "z2"], ["y"], domain=MS, axis=1)
    model = make_model([node], [("a", dt), ("b", dt)], [("y", dt)], inits)
    assert_same(model, {"a": rand_q(rng, dt, (2, 3, 4)), "b": rand_q(rng, dt, (2, 5, 4))})


@pytest.mark.parametrize("op", ["QLinearSigmoid", "QLinearLeakyRelu"])
@pytest.mark.parametrize("dt", [np.uint8, np.int8])
@pytest.mark.parametrize("seed", range(4))
def test_qlinear_lookup_ops_match_ort(op, dt, seed):
    rng = np.random.default_rng(seed)
    xs, xzp = qparams(rng, dt)
    ys, yzp = qparams(rng, dt)
    xs = np.float32(xs * 5)
    ys = np.float32(1 / 255) if op == "QLinearSigmoid" else ys
    attrs = {"alpha": float(rng.uniform(0.01, 0.3))} if op == "QLinearLeakyRelu" else {}
    node = helper.make_node(op, ["x", "xs", "xzp", "ys", "yzp"], ["y"], domain=MS, **attrs)
    model = make_model([node], [("x", dt)], [("y", dt)], dict(xs=xs, xzp=xzp, ys=ys, yzp=yzp))
    assert_same(model, {"x": _codes_all(dt)})


def _codes_all(dt):
    info = np.iinfo(dt)
    return np.arange(info.min, info.max + 1).astype(dt).reshape(1, 1, -1)


# --------------------------------------------------------------------------- Q/DQ, float
def test_qdq_model_matches_ort():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("QuantizeLinear", ["w", "ws", "wz"], ["wq"], axis=0),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    inits = dict(s=np.float32(0.01), z=np.uint8(128), w=w, ws=(np.abs(w).max(axis=(1, 2, 3)) / 127).astype(np.float32),
                 wz=np.zeros(8, np.int8))
    model = make_model(nodes, [("x", np.float32)], [("y", np.float32)], inits)
    x = rng.uniform(-1, 1, (2, 3, 10, 10)).astype(np.float32)
    assert_same(model, {"x": x})
    # an intermediate tensor can be requested, and quantized tensors match exactly
    got = run(model, {"x": x}, outputs=["xq", "wq"])
    assert got["xq"].dtype == np.uint8 and got["wq"].dtype == np.int8


def test_float_model_matches_ort():
    rng = np.random.default_rng(5)
    inits = dict(w1=rng.normal(size=(6, 3, 3, 3)).astype(np.float32), b1=rng.normal(size=6).astype(np.float32),
                 g=rng.uniform(0.5, 1.5, 6).astype(np.float32), be=rng.normal(size=6).astype(np.float32),
                 mu=rng.normal(size=6).astype(np.float32), var=rng.uniform(0.5, 2, 6).astype(np.float32),
                 w2=rng.normal(size=(6 * 4 * 4, 10)).astype(np.float32), b2=rng.normal(size=10).astype(np.float32),
                 wt=rng.normal(size=(6, 6, 2, 2)).astype(np.float32), shp=np.array([0, -1], np.int64))
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["bn"]),
        helper.make_node("LeakyRelu", ["bn"], ["r"], alpha=0.1),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("AveragePool", ["p"], ["p2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("ConvTranspose", ["p2", "wt"], ["up"], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["up"], ["gap"]),
        helper.make_node("Add", ["p2", "gap"], ["sum"]),
        helper.make_node("Reshape", ["sum", "shp"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w2", "b2"], ["logits0"]),
        helper.make_node("Softmax", ["logits0"], ["y"], axis=-1),
    ]
    model = make_model(nodes, [("x", np.float32)], [("y", np.float32)], inits)
    assert_same(model, {"x": rng.normal(size=(2, 3, 8, 8)).astype(np.float32)})


def test_unsupported_op_raises_interp_error():
    node = helper.make_node("DeformConv", ["x", "x"], ["y"], name="my_deform")
    model = make_model([node], [("x", np.float32)], [("y", np.float32)])
    with pytest.raises(InterpError, match="DeformConv.*my_deform"):
        run(model, {"x": np.ones((2, 2), np.float32)})
    node = helper.make_node("QLinearSoftmax", ["x"], ["y"], domain=MS, name="qs")
    model = make_model([node], [("x", np.float32)], [("y", np.float32)])
    with pytest.raises(InterpError, match="com.microsoft"):
        run(model, {"x": np.ones((2, 2), np.float32)})


@pytest.mark.parametrize("toeplitz_max_k, tiled_min_taps", [(0, 10 ** 9), (128, 10 ** 9), (0, 1)])
def test_depthwise_equals_grouped_gemm(monkeypatch, toeplitz_max_k, tiled_min_taps):
    """The depthwise kernels (per-channel banded GEMMs over whole rows or tiles of columns;
    per-tap multiply-adds on flattened stride phases when the rows are too wide) against the
    grouped-GEMM path on the same operands, over strides, dilations, asymmetric pads and batch
    chunks."""
    monkeypatch.setattr(ops_nn, "_TOEPLITZ_MAX_K", toeplitz_max_k)
    monkeypatch.setattr(ops_nn, "_TILED_MIN_TAPS", tiled_min_taps)
    monkeypatch.setattr(ops_nn, "_TOEPLITZ_TILE", 3)
    monkeypatch.setattr(ops_nn, "_CHUNK", 256)
    monkeypatch.setattr(ops_nn, "_TOEPLITZ_CHUNK", 256)
    rng = np.random.default_rng(11)
    for (n, c, h, w), (kh, kw), s, d, pads in [((3, 5, 8, 8), (3, 3), (2, 2), (1, 1), [0, 1, 2, 0]),
                                               ((2, 4, 11, 6), (5, 2), (3, 1), (2, 1), [2, 0, 1, 3]),
                                               ((1, 3, 7, 9), (1, 3), (1, 2), (1, 1), [1, 1, 1, 1])]:
        x = rng.integers(0, 256, (n, c, h, w)).astype(np.uint8)
        wt = rng.integers(-127, 128, (c, 1, kh, kw)).astype(np.float64)
        args = (wt.shape, c, list(s), list(d), pads)
        dw = ops_nn.conv_core(x, ops_nn.conv_weights(wt, c, np.float64), *args, shift=np.float64(77), dtype=np.float64)
        gemm = ops_nn.conv_core(x, np.ascontiguousarray(wt.reshape(c, 1, -1)), *args, shift=np.float64(77),
                                dtype=np.float64)
        assert dw.shape == gemm.shape and np.array_equal(dw, gemm)


@pytest.mark.parametrize("chunk", [256, 2000])  # one image per chunk; two, the last chunk partial
@pytest.mark.parametrize("tiled_min_taps", [10 ** 9, 1])
def test_float_depthwise_toeplitz_gathers_rows_exactly(monkeypatch, tiled_min_taps, chunk):
    """Float depthwise convs (no zero-point shift) gather their row blocks as byte items: the same
    blocks as the element copy, so the same sums as the grouped GEMM on exact integer values, also
    unpadded (the input itself is read) and on a non-contiguous input."""
    monkeypatch.setattr(ops_nn, "_TOEPLITZ_MAX_K", 0 if tiled_min_taps == 1 else 128)
    monkeypatch.setattr(ops_nn, "_TILED_MIN_TAPS", tiled_min_taps)
    monkeypatch.setattr(ops_nn, "_TOEPLITZ_TILE", 3)
    monkeypatch.setattr(ops_nn, "_TOEPLITZ_CHUNK", chunk)
    rng = np.random.default_rng(12)
    for (n, c, h, w), (kh, kw), s, pads, strided in [((3, 5, 8, 8), (3, 3), (2, 1), [0, 1, 2, 0], False),
                                                     ((2, 4, 6, 9), (3, 3), (1, 1), [0, 0, 0, 0], False),
                                                     ((2, 4, 6, 9), (3, 2), (1, 2), [0, 0, 0, 0], True)]:
        x = rng.integers(-50, 50, (n, 2 * c if strided else c, h, w)).astype(np.float64)
        x = x[:, ::2] if strided else x
        wt = rng.integers(-127, 128, (c, 1, kh, kw)).astype(np.float64)
        args = (wt.shape, c, list(s), [1, 1], pads)
        dw = ops_nn.conv_core(x, ops_nn.conv_weights(wt, c, np.float64), *args, dtype=np.float64)
        gemm = ops_nn.conv_core(x, np.ascontiguousarray(wt.reshape(c, 1, -1)), *args, dtype=np.float64)
        assert dw.shape == gemm.shape and np.array_equal(dw, gemm)


def test_compiled_plan_reuse_and_overridden_initializer():
    """A plan gives the same answers run after run, for any batch size and output list, and a
    feed that overrides an initializer is honoured (nothing memoized from the old value)."""
    rng = np.random.default_rng(4)
    w = rand_q(rng, np.int8, (8, 1, 3, 3))
    node = helper.make_node("QLinearConv", ["x", "xs", "xzp", "w", "ws", "wzp", "ys", "yzp"], ["y"], group=8,
                            pads=[1, 1, 1, 1])
    inits = dict(xs=np.float32(0.02), xzp=np.uint8(120), w=w, ws=np.float32(0.01), wzp=np.int8(0),
                 ys=np.float32(0.05), yzp=np.uint8(7))
    model = make_model([node], [("x", np.uint8), ("w", np.int8)], [("y", np.uint8)], inits)
    plan = compile_model(model)
    for batch in (1, 5, 1):
        x = rand_q(rng, np.uint8, (batch, 8, 6, 6))
        assert np.array_equal(plan.run({"x": x})["y"], ort_run(model, {"x": x, "w": w})[0])
    w2 = rand_q(rng, np.int8, w.shape)
    assert np.array_equal(plan.run({"x": x, "w": w2})["y"], ort_run(model, {"x": x, "w": w2})[0])
    assert np.array_equal(plan.run({"x": x})["y"], ort_run(model, {"x": x, "w": w})[0])
    assert np.array_equal(run(model, {"x": x}, outputs=["y"])["y"], plan.run({"x": x})["y"])


def test_set_blas_threads_round_trips():
    from qgraph.interp import set_blas_threads

    previous = set_blas_threads(1)
    if previous is None:
        pytest.skip("NumPy's BLAS is not an OpenBLAS reachable through ctypes")
    try:
        assert set_blas_threads(previous) == 1
        assert set_blas_threads(previous) == previous
    finally:
        set_blas_threads(previous)
