"""The interpreter's kernels against ONNX Runtime 1.19 (CPU, one thread) on random inputs with the
shapes and attributes the developers' zoo models and exporters use.

Float results are held to the bound of the op that produces them: the table in
qgraph/interp/tolerance.py, which `qgraph diff` gates on too (bit-exact for integer results, data
movement, IEEE arithmetic, quantization ops and the MLAS transcriptions; 3 ulp for libm functions;
16 ulp of the output range for sums, dot products, normalizations and recurrences). A test that
states its own bound checks a chain of ops, or ORT's fused rewrite of one, and says so.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph.errors import InterpError
from qgraph.interp import run
from qgraph.interp.tolerance import Tolerance, node_tolerance

MS = "com.microsoft"
F32 = np.float32


def make(nodes, inputs: dict, inits: dict | None = None, outputs=None, opset: int = 17) -> onnx.ModelProto:
    """A model of ``nodes`` whose graph inputs are typed like the arrays in ``inputs``."""
    outputs = outputs or [o for o in nodes[-1].output if o]
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype), None)
         for k, v in inputs.items()],
        [helper.make_empty_tensor_value_info(o) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)])
    m.ir_version = 8
    return m


def ort_outputs(model, feeds, optimize: bool = True):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def assert_matches_ort(model, feeds, *, ulp: float | None = None, range_ulp: float | None = None,
                       atol: float | None = None, optimize: bool = True):
    """Every graph output equal to ORT's: integers and booleans exactly; floats within the bound of
    the op that produces them (qgraph.interp.tolerance, the table `qgraph diff` gates on), or
    within an explicit ``max(ulp·ulp(want), range_ulp·ulp(max|want|), atol)`` where a test sets
    one. ``optimize=False`` compares with ORT's unfused graph (no graph optimizations)."""
    want = ort_outputs(model, feeds, optimize)
    got = run(model, feeds)
    producer = {o: n for n in model.graph.node for o in n.output}
    explicit = None
    if ulp is not None or range_ulp is not None or atol is not None:
        explicit = Tolerance("explicit", ulp=ulp or 0, range_ulp=range_ulp or 0, atol=atol or 0)
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape and g.dtype == w.dtype, f"{name}: {g.shape} {g.dtype} vs ORT {w.shape} {w.dtype}"
        tol = explicit or node_tolerance(producer[name])
        if not np.issubdtype(w.dtype, np.floating) or tol.exact:
            np.testing.assert_array_equal(g, w, err_msg=f"{name} ({tol.describe()})")
            continue
        assert np.array_equal(np.isnan(g), np.isnan(w)), f"{name}: NaN positions differ"
        worst, beyond = tol.measure(w, g)
        top = float(np.abs(w[np.isfinite(w)]).max(initial=0))
        assert not beyond, (f"{name}: {beyond}/{w.size} beyond {tol.describe()}, worst {worst:.3g} of the bound "
                            f"(max |want| {top:.3g})")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def node(op, inputs, outputs=("y",), domain="", **attrs):
    return helper.make_node(op, list(inputs), list(outputs), domain=domain, **attrs)


# --------------------------------------------------------------------------- Split / Range / shape ops
@pytest.mark.parametrize("opset,split,attrs,n_out", [
    (11, None, dict(axis=1, split=[16, 16]), 2),          # YOLOv8 C2f, attribute form
    (13, [16, 16], dict(axis=1), 2),                      # the exported YOLOv8 (split as input)
    (13, [8, 16, 8], dict(axis=1), 3),
    (13, None, dict(axis=-1), 4),                         # equal parts
    (18, None, dict(axis=1, num_outputs=3), 3),           # 32 -> 11, 11, 10
    (18, [4, 28], dict(axis=1), 2),
])
def test_split_matches_ort(rng, opset, split, attrs, n_out):
    x = rng.normal(size=(1, 32, 20, 20)).astype(F32)
    inits = {} if split is None else {"split": np.asarray(split, np.int64)}
    ins = ["x"] + (["split"] if split is not None else [])
    outs = [f"y{i}" for i in range(n_out)]
    assert_matches_ort(make([node("Split", ins, outs, **attrs)], {"x": x}, inits, opset=opset), {"x": x})


def test_split_refuses_sizes_that_do_not_add_up(rng):
    x = rng.normal(size=(2, 6)).astype(F32)
    m = make([node("Split", ["x", "s"], ["a", "b"], axis=1)], {"x": x}, {"s": np.array([2, 3], np.int64)}, opset=13)
    with pytest.raises(InterpError, match="Split.*do not add up"):
        run(m, {"x": x})


@pytest.mark.parametrize("start,limit,delta", [
    (0.0, 80.0, 1.0),                     # YOLOv8 anchor grid (float, from Shape/Cast)
    (0.5, 13.7, 0.1),                     # float accumulation order matters here
    (10, -3, -3), (0, 7, 2),              # int64
    (np.int32(3), np.int32(3), np.int32(1)),
])
def test_range_matches_ort(start, limit, delta):
    dt = np.asarray(start).dtype if not isinstance(start, float) else np.dtype(F32)
    feeds = {k: np.asarray(v, dt) for k, v in (("s", start), ("l", limit), ("d", delta))}
    assert_matches_ort(make([node("Range", ["s", "l", "d"])], feeds, opset=11), feeds)


def test_shape_ops_match_ort(rng):
    """The YOLOv8 head's index computation: Shape (with start/end), Gather, Unsqueeze, Concat,
    ConstantOfShape, Expand, Cast, Reshape, Transpose, Slice with negative steps and axes, Tile."""
    x = rng.normal(size=(1, 64, 20, 20)).astype(F32)
    nodes = [
        node("Shape", ["x"], ["s"]), node("Shape", ["x"], ["s23"], start=2, end=4),
        node("Shape", ["x"], ["s_neg"], start=-2),
        node("Gather", ["s", "i2"], ["h"], axis=0), node("Unsqueeze", ["h", "ax0"], ["hu"]),
        node("Concat", ["hu", "one"], ["cs"], axis=0), node("ConstantOfShape", ["cs"], ["ones"],
                                                            value=numpy_helper.from_array(np.array([1.5], F32))),
        node("Cast", ["h"], ["hf"], to=TensorProto.FLOAT),
        node("Expand", ["col", "s23"], ["grid"]),
        node("Reshape", ["x", "shp"], ["r"]), node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
        node("Slice", ["x", "st", "en", "axs", "stp"], ["sl"]),
        node("Tile", ["col", "reps"], ["tl"]),
        node("Gather", ["x", "gi"], ["g"], axis=-3),
    ]
    inits = {"i2": np.array(2, np.int64), "ax0": np.array([0], np.int64), "one": np.array([1], np.int64),
             "col": rng.normal(size=(20, 1)).astype(F32), "shp": np.array([1, 64, -1], np.int64),
             "st": np.array([-1, 15], np.int64), "en": np.array([-2 ** 63, 2], np.int64),
             "axs": np.array([-1, 1], np.int64), "stp": np.array([-2, -3], np.int64),
             "reps": np.array([2, 3], np.int64), "gi": np.array([[0, -1], [5, 7]], np.int64)}
    outs = ["s", "s23", "s_neg", "ones", "hf", "grid", "t", "sl", "tl", "g"]
    assert_matches_ort(make(nodes, {"x": x}, inits, outputs=outs, opset=18), {"x": x})


# --------------------------------------------------------------------------- Resize
NEAREST_MODES = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
COORD_MODES = ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel", "tf_half_pixel_for_nn"]


@pytest.mark.parametrize("ctm", COORD_MODES)
@pytest.mark.parametrize("nearest_mode", NEAREST_MODES)
def test_resize_nearest_matches_ort(rng, ctm, nearest_mode):
    """Exact: ORT's float32 coordinates and tie rules, upsampling and downsampling, by scales and
    by sizes (non-integral ratios where ties and rounding bite)."""
    x = rng.normal(size=(1, 3, 7, 9)).astype(F32)
    for scales, sizes in [([1, 1, 2, 2], None), ([1, 1, 0.6, 1.7], None), (None, [1, 3, 10, 5]), (None, [1, 3, 3, 13])]:
        inits = {"roi": np.array([], F32), "scales": np.array(scales or [], F32)}
        ins = ["x", "roi", "scales"]
        if sizes is not None:
            inits["sizes"] = np.array(sizes, np.int64)
            ins.append("sizes")
        m = make([node("Resize", ins, mode="nearest", coordinate_transformation_mode=ctm,
                       nearest_mode=nearest_mode)], {"x": x}, inits, opset=13)
        assert_matches_ort(m, {"x": x})


def test_resize_yolo_upsample_matches_ort(rng):
    """The zoo's form: nearest, asymmetric, floor, scales (1, 1, 2, 2), empty roi; also uint8."""
    for x in (rng.normal(size=(1, 256, 10, 10)).astype(F32), rng.integers(0, 256, (1, 8, 5, 6)).astype(np.uint8)):
        m = make([node("Resize", ["x", "roi", "scales"], mode="nearest", coordinate_transformation_mode="asymmetric",
                       nearest_mode="floor", cubic_coeff_a=-0.75)], {"x": x},
                 {"roi": np.array([], F32), "scales": np.array([1, 1, 2, 2], F32)}, opset=11)
        assert_matches_ort(m, {"x": x})


@pytest.mark.parametrize("mode", ["linear", "cubic"])
@pytest.mark.parametrize("ctm", ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel"])
def test_resize_interpolating_matches_ort(rng, mode, ctm):
    x = rng.normal(size=(2, 3, 8, 11)).astype(F32)
    for scales, sizes in [([1, 1, 2, 2], None), ([1, 1, 1.5, 2.25], None), (None, [2, 3, 5, 7]), (None, [2, 3, 13, 4])]:
        inits = {"roi": np.array([], F32), "scales": np.array(scales or [], F32)}
        ins = ["x", "roi", "scales"]
        if sizes is not None:
            inits["sizes"] = np.array(sizes, np.int64)
            ins.append("sizes")
        m = make([node("Resize", ins, mode=mode, coordinate_transformation_mode=ctm)], {"x": x}, inits, opset=13)
        assert_matches_ort(m, {"x": x})


@pytest.mark.parametrize("dt", [np.uint8, np.int8, np.int32])
def test_resize_bilinear_integers_match_ort(rng, dt):
    """Integer bilinear: ORT's float32 expression, truncated toward zero."""
    x = rng.integers(0 if dt == np.uint8 else -100, 100, (1, 2, 7, 9)).astype(dt)
    for ctm in ("half_pixel", "align_corners", "asymmetric"):
        for scales in ([1, 1, 2, 2], [1, 1, 0.6, 1.7]):
            m = make([node("Resize", ["x", "roi", "scales"], mode="linear", coordinate_transformation_mode=ctm)],
                     {"x": x}, {"roi": np.array([], F32), "scales": np.array(scales, F32)}, opset=13)
            assert_matches_ort(m, {"x": x})


def test_resize_cubic_exclude_outside_and_crop_match_ort(rng):
    x = rng.normal(size=(1, 2, 9, 9)).astype(F32)
    m = make([node("Resize", ["x", "roi", "scales"], mode="cubic", exclude_outside=1, cubic_coeff_a=-0.5)], {"x": x},
             {"roi": np.array([], F32), "scales": np.array([1, 1, 0.7, 1.6], F32)}, opset=13)
    assert_matches_ort(m, {"x": x})
    for mode in ("nearest", "linear", "cubic"):
        m = make([node("Resize", ["x", "roi", "", "sizes"], mode=mode, coordinate_transformation_mode="tf_crop_and_resize",
                       extrapolation_value=-7.0)], {"x": x},
                 {"roi": np.array([0, 0, -0.2, 0.1, 1, 1, 0.8, 1.3], F32), "sizes": np.array([1, 2, 6, 11], np.int64)},
                 opset=13)
        assert_matches_ort(m, {"x": x})


def test_resize_opset18_axes_and_aspect_policy_match_ort(rng):
    x = rng.normal(size=(1, 3, 8, 12)).astype(F32)
    for policy in ("stretch", "not_larger", "not_smaller"):
        m = make([node("Resize", ["x", "", "", "sizes"], mode="linear", axes=[2, 3], keep_aspect_ratio_policy=policy)],
                 {"x": x}, {"sizes": np.array([5, 20], np.int64)}, opset=18)
        assert_matches_ort(m, {"x": x})


@pytest.mark.parametrize("attrs", [dict(pads=[2, 2, 2, 2]), dict(pads=[1, 3, 2, 0], strides=[2, 1]),
                                   dict(pads=[2, 2, 2, 2], dilations=[1, 3], strides=[1, 2])])
@pytest.mark.parametrize("method", ["taps", "tiles"])
def test_depthwise_conv_taps_match_ort(rng, monkeypatch, attrs, method):
    """A float 5x5 depthwise conv on short, wide planes (an SVTR mixer's) by the per-tap method
    (taps that reach into the padding for some or all rows) or by banded GEMMs over tiles of 4
    columns, with strides and dilations."""
    from qgraph.interp import ops_nn
    monkeypatch.setattr(ops_nn, "_TOEPLITZ_MAX_K", 0)
    monkeypatch.setattr(ops_nn, "_TILED_MIN_TAPS", 10 ** 9 if method == "taps" else 1)
    monkeypatch.setattr(ops_nn, "_TOEPLITZ_TILE", 4)
    monkeypatch.setattr(ops_nn, "_taps_beat_flat_phases", lambda *args: True)
    x = rng.normal(size=(2, 6, 3, 20)).astype(F32)
    inits = {"w": rng.normal(size=(6, 1, 5, 5)).astype(F32), "b": rng.normal(size=(6,)).astype(F32)}
    assert_matches_ort(make([node("Conv", ["x", "w", "b"], group=6, kernel_shape=[5, 5], **attrs)], {"x": x}, inits),
                       {"x": x})


# --------------------------------------------------------------------------- ConvTranspose
CONV_T_CASES = [
    # (C, M, group, kernel, input spatial, attributes)
    (4, 6, 1, (3, 3), (5, 5), {}),
    (4, 6, 2, (3, 3), (5, 5), dict(strides=[2, 2])),
    (8, 8, 8, (4, 4), (5, 6), dict(strides=[2, 2], pads=[1, 1, 1, 1])),                  # depthwise upsampler
    (4, 6, 2, (3, 3), (5, 5), dict(strides=[2, 2], output_padding=[1, 1])),
    (4, 6, 1, (3, 2), (5, 7), dict(strides=[2, 3], dilations=[2, 1], pads=[1, 0, 2, 1], output_padding=[1, 2])),
    (4, 6, 1, (3, 3), (5, 5), dict(strides=[2, 2], auto_pad="SAME_UPPER")),
    (4, 6, 1, (4, 4), (5, 5), dict(strides=[2, 2], auto_pad="SAME_LOWER")),
    (4, 6, 1, (3, 3), (5, 5), dict(strides=[2, 2], auto_pad="VALID")),
    (4, 6, 1, (3, 3), (5, 5), dict(strides=[2, 2], output_shape=[10, 9])),
    (2, 2, 1, (3, 3), (5, 5), dict(strides=[3, 3], output_shape=[16, 17], auto_pad="SAME_UPPER")),  # beyond full size
    (3, 5, 1, (3,), (7,), dict(strides=[2], pads=[1, 0])),
    (2, 4, 2, (2, 2, 2), (3, 4, 3), dict(strides=[2, 1, 2])),
    (64, 32, 1, (2, 2), (20, 20), dict(strides=[2, 2])),
]


@pytest.mark.parametrize("case", CONV_T_CASES)
def test_conv_transpose_matches_ort(rng, case):
    c, m, g, k, hw, attrs = case
    x = rng.normal(size=(2, c) + hw).astype(F32)
    inits = {"w": rng.normal(size=(c, m // g) + k).astype(F32), "b": rng.normal(size=(m,)).astype(F32)}
    assert_matches_ort(make([node("ConvTranspose", ["x", "w", "b"], group=g, **attrs)], {"x": x}, inits), {"x": x})


# --------------------------------------------------------------------------- recurrent
def lstm_inputs(rng, d, t, b, i, h, gates=4, scale=0.3):
    return {"W": rng.normal(0, scale, (d, gates * h, i)).astype(F32), "R": rng.normal(0, scale, (d, gates * h, h)).astype(F32),
            "B": rng.normal(0, scale, (d, 2 * gates * h)).astype(F32)}


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("variant", ["plain", "seq_lens+peepholes", "clip+peepholes", "input_forget", "activations"])
def test_lstm_matches_ort(rng, direction, variant):
    d, t, b, i, h = (2 if direction == "bidirectional" else 1), 12, 3, 10, 8
    inits = lstm_inputs(rng, d, t, b, i, h)
    inits.update(h0=rng.normal(size=(d, b, h)).astype(F32), c0=rng.normal(size=(d, b, h)).astype(F32))
    ins = ["x", "W", "R", "B", "", "h0", "c0", ""]
    attrs = dict(direction=direction, hidden_size=h)
    if "seq_lens" in variant:
        inits["sl"] = np.array([12, 5, 0], np.int32)
        ins[4] = "sl"
    if "peepholes" in variant:
        inits["P"] = rng.normal(0, 0.3, (d, 3 * h)).astype(F32)
        ins[7] = "P"
    if "clip" in variant:
        attrs["clip"] = 0.7
    if variant == "input_forget":
        attrs["input_forget"] = 1
    if variant == "activations":
        attrs.update(activations=["HardSigmoid", "Tanh", "Softsign"] * d, activation_alpha=[0.3] * d,
                     activation_beta=[0.4] * d)
    x = rng.normal(size=(t, b, i)).astype(F32)
    m = make([node("LSTM", ins, ["Y", "Y_h", "Y_c"], **attrs)], {"x": x}, inits, opset=14)
    assert_matches_ort(m, {"x": x})


def test_lstm_ocr_shape_matches_ort(rng):
    """ddddocr's CRNN head: bidirectional, hidden 512, input 512, batch 1, initial states zero."""
    t = 48
    inits = lstm_inputs(rng, 2, t, 1, 512, 512, scale=0.05)
    inits["z"] = np.zeros((2, 1, 512), F32)
    x = rng.normal(size=(t, 1, 512)).astype(F32)
    m = make([node("LSTM", ["x", "W", "R", "B", "", "z", "z"], ["Y", "Y_h", "Y_c"], direction="bidirectional",
                   hidden_size=512)], {"x": x}, inits, opset=12)
    assert_matches_ort(m, {"x": x})


@pytest.mark.parametrize("op", ["GRU", "RNN"])
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_gru_and_rnn_match_ort(rng, op, direction):
    d, t, b, i, h = (2 if direction == "bidirectional" else 1), 10, 3, 6, 5
    gates = 3 if op == "GRU" else 1
    inits = lstm_inputs(rng, d, t, b, i, h, gates)
    inits["sl"] = np.array([10, 4, 7], np.int32)
    x = rng.normal(size=(t, b, i)).astype(F32)
    for lbr in ((0, 1) if op == "GRU" else (0,)):
        attrs = dict(direction=direction, hidden_size=h, **({"linear_before_reset": lbr} if op == "GRU" else {}))
        m = make([node(op, ["x", "W", "R", "B", "sl"], ["Y", "Y_h"], **attrs)], {"x": x}, inits, opset=14)
        assert_matches_ort(m, {"x": x})


@pytest.mark.parametrize("wdt", [np.uint8, np.int8])
@pytest.mark.parametrize("per_column", [False, True])
@pytest.mark.parametrize("direction,t,b,i,h,with_lens", [
    ("bidirectional", 32, 1, 512, 512, False),     # ddddocr common_old's LSTM_202_quant
    ("forward", 9, 3, 12, 8, True), ("reverse", 9, 3, 12, 8, True),
])
def test_dynamic_quantize_lstm_is_bit_exact(rng, wdt, per_column, direction, t, b, i, h, with_lens):
    """com.microsoft DynamicQuantizeLSTM: integer GEMMs on dynamically quantized X and H, float
    gates with MLAS sigmoid/tanh — every output bit-exact with ORT."""
    d = 2 if direction == "bidirectional" else 1
    lo, hi = (0, 256) if wdt == np.uint8 else (-128, 128)
    shape = (d, 4 * h) if per_column else (d,)
    zero = (128, 120) if wdt == np.uint8 else (0, 0)
    inits = {"W": rng.integers(lo, hi, (d, i, 4 * h)).astype(wdt), "R": rng.integers(lo, hi, (d, h, 4 * h)).astype(wdt),
             "B": rng.normal(0, 0.3, (d, 8 * h)).astype(F32),
             "ws": rng.uniform(5e-4, 3e-3, shape).astype(F32), "wz": np.full(shape, zero[0], wdt),
             "rs": rng.uniform(5e-4, 3e-3, shape).astype(F32), "rz": np.full(shape, zero[1], wdt)}
    ins = ["x", "W", "R", "B", "", "", "", "", "ws", "wz", "rs", "rz"]
    if with_lens:
        inits["sl"] = np.array([t, 3, 6], np.int32)
        ins[4] = "sl"
    x = rng.normal(size=(t, b, i)).astype(F32)
    m = make([node("DynamicQuantizeLSTM", ins, ["Y", "Y_h", "Y_c"], domain=MS, direction=direction, hidden_size=h)],
             {"x": x}, inits, opset=12)
    assert_matches_ort(m, {"x": x})


# --------------------------------------------------------------------------- element-wise
EXACT_UNARY = ["Sigmoid", "Tanh", "Erf", "HardSigmoid", "HardSwish", "Relu", "Softsign", "Abs", "Neg", "Floor", "Ceil",
               "Reciprocal", "Sign", "Round", "ThresholdedRelu", "Shrink"]
LIBM_UNARY = ("Exp", "Log", "Sqrt", "Softplus", "Mish", "Sin", "Cos", "Atan", "Sinh", "Asinh")


def _unary_input(rng, op):
    x = np.concatenate([rng.normal(0, s, 4000) for s in (0.2, 1, 4, 20)]).astype(F32)
    if op in ("Log", "Sqrt", "Reciprocal"):
        return np.abs(x) + F32(1e-3)
    if op in ("Exp", "Sinh"):
        return np.clip(x, -80, 80)
    return x


def test_sqrt_is_within_eigens_rsqrt_newton_bound(rng):
    """ORT's float Sqrt is Eigen's fast-math ``x·r₁`` (one Newton step from the CPU's rsqrt
    estimate), not correctly rounded: the "rsqrt" family's 8 ulp, on magnitudes from 10⁻⁸ to 10⁸
    (basic-pitch's CQT magnitudes reached 4 ulp, beyond libm's 3)."""
    x = (10.0 ** rng.uniform(-8, 8, 200_000)).astype(F32)
    model = make([node("Sqrt", ["x"])], {"x": x})
    ours = run(model, {"x": x})["y"]
    theirs = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ulps = np.abs(ours.view(np.int32).astype(np.int64) - theirs.view(np.int32).astype(np.int64))
    assert node_tolerance(model.graph.node[0]).ulp == 8 and ulps.max() <= 8
    assert_matches_ort(model, {"x": x})


@pytest.mark.parametrize("op", EXACT_UNARY)
def test_exact_unary_ops_match_ort(rng, op):
    x = _unary_input(rng, op)
    assert_matches_ort(make([node(op, ["x"])], {"x": x}, opset=18), {"x": x})


@pytest.mark.parametrize("which", ["small", "big", "mixed"])
def test_erf_branches_match_ort(rng, which):
    """MLAS's Erf has a polynomial branch below |x| = 0.921875 and an exp branch above; arrays of
    one branch only, and both with signed zeros, infinities and NaN, across chunks."""
    x = rng.normal(0, 2, 40000).astype(F32)
    if which == "small":
        x = np.clip(x, -0.92, 0.92)
    elif which == "big":
        x = np.where(np.abs(x) < 1, np.copysign(F32(1), x) + x, x).astype(F32)
    else:
        x[:6] = [0.0, -0.0, np.inf, -np.inf, np.nan, 0.921875]
    assert_matches_ort(make([node("Erf", ["x"])], {"x": x}, opset=18), {"x": x})


@pytest.mark.parametrize("op", LIBM_UNARY)
def test_transcendental_unary_ops_match_ort(rng, op):
    x = _unary_input(rng, op)
    assert_matches_ort(make([node(op, ["x"])], {"x": x}, opset=18), {"x": x})


@pytest.mark.parametrize("op,attrs", [("Elu", {}), ("Elu", dict(alpha=0.5)), ("Selu", {}), ("Celu", dict(alpha=2.0))])
def test_exp_minus_one_activations_match_ort(rng, op, attrs):
    x = _unary_input(rng, op)
    assert_matches_ort(make([node(op, ["x"], **attrs)], {"x": x}, opset=18), {"x": x})


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_matches_ort(rng, approximate):
    x = _unary_input(rng, "Gelu")
    assert_matches_ort(make([node("Gelu", ["x"], approximate=approximate)], {"x": x}, opset=20), {"x": x})


def test_parametric_activations_match_ort(rng):
    x = rng.normal(0, 3, (2, 8, 5, 5)).astype(F32)
    inits = {"slope": rng.uniform(0, 0.3, (8, 1, 1)).astype(F32), "lo": np.array(-1.5, F32), "hi": np.array(2.0, F32)}
    nodes = [node("PRelu", ["x", "slope"], ["p"]), node("HardSigmoid", ["x"], ["hs"], alpha=0.25, beta=0.4),
             node("LeakyRelu", ["x"], ["lr"], alpha=0.1), node("Clip", ["x", "lo", "hi"], ["c"]),
             node("ThresholdedRelu", ["x"], ["tr"], alpha=0.7), node("Shrink", ["x"], ["sh"], lambd=1.0, bias=0.3)]
    assert_matches_ort(make(nodes, {"x": x}, inits, outputs=["p", "hs", "lr", "c", "tr", "sh"]), {"x": x})


def test_comparisons_logic_and_where_match_ort(rng):
    a = rng.integers(-3, 4, (4, 1, 6)).astype(F32)
    b = rng.integers(-3, 4, (5, 6)).astype(F32)
    ai = a.astype(np.int64)
    nodes = [node("Equal", ["a", "b"], ["eq"]), node("Greater", ["a", "b"], ["gt"]), node("Less", ["a", "b"], ["lt"]),
             node("GreaterOrEqual", ["a", "b"], ["ge"]), node("LessOrEqual", ["a", "b"], ["le"]),
             node("Not", ["gt"], ["ngt"]), node("And", ["gt", "eq"], ["and"]), node("Or", ["lt", "eq"], ["or"]),
             node("Xor", ["lt", "ge"], ["xor"]), node("Where", ["gt", "a", "b"], ["w"]),
             node("Equal", ["ai", "three"], ["eqi"]), node("Where", ["eqi", "ai", "three"], ["wi"]),
             node("Mod", ["ai", "three"], ["mod"], fmod=0), node("Max", ["a", "b"], ["mx"]), node("Min", ["a", "b"], ["mn"]),
             node("Mean", ["a", "b"], ["mean"])]
    feeds = {"a": a, "b": b, "ai": ai}
    outs = ["eq", "gt", "lt", "ge", "le", "ngt", "and", "or", "xor", "w", "eqi", "wi", "mod", "mx", "mn", "mean"]
    assert_matches_ort(make(nodes, feeds, {"three": np.array(3, np.int64)}, outputs=outs, opset=16), feeds)


@pytest.mark.parametrize("to", [TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8,
                                TensorProto.INT8, TensorProto.BOOL, TensorProto.DOUBLE, TensorProto.INT16])
def test_cast_matches_ort(rng, to):
    x = np.concatenate([rng.normal(0, 50, 200), [0.0, -0.0, 0.5, -0.5, 1.5, -2.5, 127.9, -128.9]]).astype(F32)
    if to in (TensorProto.UINT8, TensorProto.INT8):
        x = np.clip(x, -127, 127) if to == TensorProto.INT8 else np.abs(np.clip(x, -255, 255))
    xi = rng.integers(-300, 300, 50).astype(np.int64)
    nodes = [node("Cast", ["x"], ["y"], to=to), node("Cast", ["xi"], ["yi"], to=to)]
    feeds = {"x": x.astype(F32), "xi": xi}
    if to in (TensorProto.UINT8, TensorProto.INT8):
        feeds["xi"] = np.clip(xi, 0 if to == TensorProto.UINT8 else -128, 127)
    assert_matches_ort(make(nodes, feeds, outputs=["y", "yi"]), feeds)
    feeds = {"x": x.astype(F32)}
    assert_matches_ort(make([node("CastLike", ["x", "like"])], feeds,
                            {"like": np.zeros(1, helper.tensor_dtype_to_np_dtype(to))}, opset=15), feeds)


def test_pow_and_arithmetic_match_ort(rng):
    x = rng.uniform(0.1, 4, (3, 7)).astype(F32)
    e = rng.uniform(-2, 2, (7,)).astype(F32)
    nodes = [node("Pow", ["x", "two"], ["sq"]), node("Pow", ["x", "e"], ["pw"]), node("Div", ["x", "e"], ["dv"]),
             node("Sub", ["x", "e"], ["sb"]), node("Pow", ["x", "half"], ["rt"])]
    inits = {"two": np.array(2.0, F32), "half": np.array(0.5, F32), "e": e}
    assert_matches_ort(make(nodes, {"x": x}, inits, outputs=["sq", "pw", "dv", "sb", "rt"]), {"x": x})


# --------------------------------------------------------------------------- reductions / softmax / norms
@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                                "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp"])
def test_reductions_match_ort(rng, opset, op):
    """Opset 13 (axes attribute; ReduceSum's axes already an input) and 18 (axes input), keepdims
    0/1, negative axes, an empty axes list with noop_with_empty_axes."""
    x = rng.uniform(0.5, 1.5, (2, 3, 4, 5)).astype(F32)
    axes_input = opset >= 18 or op == "ReduceSum"
    for axes, keep in [([1], 1), ([-1, 2], 0), (None, 1), ([0, 2, 3], 0)]:
        inits, ins, attrs = {}, ["x"], dict(keepdims=keep)
        if axes is not None:
            if axes_input:
                inits["axes"] = np.array(axes, np.int64)
                ins.append("axes")
            else:
                attrs["axes"] = axes
        assert_matches_ort(make([node(op, ins, **attrs)], {"x": x}, inits, opset=opset), {"x": x})
    if axes_input:
        m = make([node(op, ["x", "axes"], noop_with_empty_axes=1)], {"x": x}, {"axes": np.array([], np.int64)},
                 opset=opset)
        assert_matches_ort(m, {"x": x})


def test_arg_topk_nonzero_match_ort(rng):
    x = rng.integers(-5, 5, (3, 4, 6)).astype(F32)  # many ties
    nodes = [node("ArgMax", ["x"], ["am"], axis=2), node("ArgMax", ["x"], ["aml"], axis=1, keepdims=0, select_last_index=1),
             node("ArgMin", ["x"], ["an"], axis=-1, select_last_index=1),
             node("TopK", ["x", "k"], ["tv", "ti"], axis=-1), node("TopK", ["x", "k"], ["sv", "si"], axis=1, largest=0),
             node("NonZero", ["x"], ["nz"])]
    outs = ["am", "aml", "an", "tv", "ti", "sv", "si", "nz"]
    assert_matches_ort(make(nodes, {"x": x}, {"k": np.array([3], np.int64)}, outputs=outs, opset=13), {"x": x})


def test_gather_scatter_family_matches_ort(rng):
    x = rng.normal(size=(4, 5, 6)).astype(F32)
    idx = rng.integers(-5, 5, (4, 3, 6)).astype(np.int64)
    nd_idx = np.array([[[1, 2], [3, -1]], [[0, 0], [2, 4]]], np.int64)
    upd = rng.normal(size=(4, 3, 6)).astype(F32)
    nodes = [node("GatherElements", ["x", "idx"], ["ge"], axis=1),
             node("GatherND", ["x", "nd"], ["gn"]), node("GatherND", ["x", "nd1"], ["gnb"], batch_dims=1),
             node("ScatterElements", ["x", "sidx", "upd"], ["se"], axis=1),
             node("ScatterElements", ["x", "sidx", "upd"], ["sea"], axis=1, reduction="add"),
             node("ScatterND", ["x", "snd", "supd"], ["sn"]), node("OneHot", ["oh", "depth", "vals"], ["o"], axis=1),
             node("CumSum", ["x", "ax"], ["cs"], exclusive=1, reverse=1), node("Trilu", ["x", "kk"], ["tu"], upper=0)]
    inits = {"idx": idx, "nd": nd_idx, "nd1": np.array([[1], [4], [0], [2]], np.int64),
             "sidx": np.stack([rng.permutation(5)[:3] for _ in range(24)]).reshape(4, 6, 3).transpose(0, 2, 1).copy(),
             "upd": upd, "snd": np.array([[0, 1], [3, 4]], np.int64), "supd": rng.normal(size=(2, 6)).astype(F32),
             "oh": np.array([[0, 3, -1], [2, 9, 1]], np.int64), "depth": np.array(4, np.int64),
             "vals": np.array([-1.0, 2.0], F32), "ax": np.array(1, np.int64), "kk": np.array(1, np.int64)}
    outs = ["ge", "gn", "gnb", "se", "sea", "sn", "o", "cs", "tu"]
    assert_matches_ort(make(nodes, {"x": x}, inits, outputs=outs, opset=16), {"x": x})


def test_gather_elements_of_a_table_row_matches_ort(rng):
    """A lowered activation's lookup: a (1, 256) table and (1, N) indices, int8 codes as negative
    indices; an index past the table is an error, as in ORT."""
    table = rng.integers(0, 256, (1, 256)).astype(np.uint8)
    codes = rng.integers(-256, 256, (1, 500)).astype(np.int64)
    model = make([node("GatherElements", ["t", "i"], axis=1)], {"i": codes}, {"t": table})
    assert_matches_ort(model, {"i": codes})
    assert_matches_ort(make([node("GatherElements", ["t", "i"], axis=0)], {"i": codes.T.copy()},
                            {"t": table.T.copy()}), {"i": codes.T.copy()})
    with pytest.raises(InterpError, match="out of range"):
        run(model, {"i": np.array([[3, 256]], np.int64)})


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax", "Hardmax"])
@pytest.mark.parametrize("opset,axis", [(11, 1), (11, -1), (13, 1), (13, -1)])
def test_softmax_family_matches_ort(rng, op, opset, axis):
    """Opset 13: along one axis; before: over the 2-D flattening at axis. YOLOv8's DFL Softmax is
    (1, 16, 4, 2100) along axis 1."""
    x = rng.normal(0, 3, (1, 16, 4, 30)).astype(F32)
    assert_matches_ort(make([node(op, ["x"], axis=axis)], {"x": x}, opset=opset), {"x": x})


def test_normalizations_match_ort(rng):
    x = rng.normal(1.0, 2.0, (2, 6, 5, 7)).astype(F32)
    c = x.shape[1]
    inits = {"s": rng.uniform(0.5, 1.5, (7,)).astype(F32), "b": rng.normal(size=(7,)).astype(F32),
             "sc": rng.uniform(0.5, 1.5, (c,)).astype(F32), "bc": rng.normal(size=(c,)).astype(F32)}
    nodes = [node("LayerNormalization", ["x", "s", "b"], ["ln", "mean", "inv"], axis=-1, epsilon=1e-5),
             node("InstanceNormalization", ["x", "sc", "bc"], ["inorm"], epsilon=1e-3),
             node("MeanVarianceNormalization", ["x"], ["mvn"])]
    assert_matches_ort(make(nodes, {"x": x}, inits, outputs=["ln", "mean", "inv", "inorm", "mvn"]), {"x": x})
    m = make([node("GroupNormalization", ["x", "gs", "gb"], num_groups=3, epsilon=1e-5)], {"x": x},
             {"gs": rng.uniform(0.5, 1.5, (3,)).astype(F32), "gb": rng.normal(size=(3,)).astype(F32)}, opset=18)
    assert_matches_ort(m, {"x": x})


@pytest.mark.parametrize("axis", [-1, 1])
def test_layer_normalization_is_ort_bit_for_bit_where_its_variance_cancels(rng, axis):
    """ORT's LayerNormalization sums x and x² in one float32 pass (E[x²] − E[x]²): on rows whose mean
    is large next to their spread it loses hundreds of ulp (an exported Whisper-style encoder's
    LayerNorm went beyond the 2√n range-ulp bound; at mean/spread 600 a row becomes NaN); the
    interpreter transcribes that kernel, so the results are identical, statistics outputs included
    — also over several trailing axes."""
    x = (rng.normal(0, 0.05, (3, 4, 384)) + rng.normal(0, 10, (3, 4, 1))).astype(F32)
    n = x.shape[axis:] if axis > 0 else x.shape[-1:]
    inits = {"s": rng.uniform(0.5, 1.5, n).astype(F32), "b": rng.normal(size=n).astype(F32)}
    model = make([node("LayerNormalization", ["x", "s", "b"], ["ln", "mean", "inv"], axis=axis, epsilon=1e-5)],
                 {"x": x}, inits, outputs=["ln", "mean", "inv"])
    ours = run(model, {"x": x})
    theirs = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for name, value in zip(["ln", "mean", "inv"], theirs):
        np.testing.assert_array_equal(ours[name], value)


def test_gemm_attributes_and_matmul_broadcasting_match_ort(rng):
    a = rng.normal(size=(6, 4)).astype(F32)
    b = rng.normal(size=(5, 6)).astype(F32)
    feeds = {"a": a}
    for c_shape in [(), (5,), (1, 5), (4, 1), (4, 5)]:
        inits = {"b": b, "c": rng.normal(size=c_shape).astype(F32)}
        m = make([node("Gemm", ["a", "b", "c"], alpha=0.7, beta=-1.3, transA=1, transB=1)], feeds, inits, opset=13)
        assert_matches_ort(m, feeds)
    m = make([node("Gemm", ["a", "bt"])], feeds, {"bt": rng.normal(size=(4, 3)).astype(F32)}, opset=13)
    assert_matches_ort(m, feeds)
    for sa, sb in [((2, 1, 3, 8), (4, 8, 5)), ((8,), (3, 8, 2)), ((2, 3, 8), (8,)), ((1, 3, 4, 8), (2, 1, 8, 6))]:
        feeds = {"a": rng.normal(size=sa).astype(F32), "b": rng.normal(size=sb).astype(F32)}
        assert_matches_ort(make([node("MatMul", ["a", "b"])], feeds), feeds)
    a, b = rng.normal(size=(2, 3, 4)).astype(F32), rng.normal(size=(2, 4, 5)).astype(F32)
    for eq, ops in [("bij,bjk->bik", (a, b)), ("bij->bji", (a,)), ("bij,bkj->bik", (a, b.transpose(0, 2, 1).copy())),
                    ("bij->b", (a,)), ("nchw,oc->nohw", (rng.normal(size=(1, 4, 3, 3)).astype(F32), b[0].T.copy()))]:
        f = {f"in{i}": v for i, v in enumerate(ops)}
        assert_matches_ort(make([node("Einsum", list(f), equation=eq)], f, opset=12), f)


# --------------------------------------------------------------------------- exporter idioms
def test_exporter_idioms_match_ort(rng):
    """What exporters write instead of fused ops: LayerNorm as ReduceMean/Sub/Pow/ReduceMean/Add/
    Sqrt/Div, GELU as x·0.5·(1 + erf(x/√2)), HardSwish as x·Clip(x + 3, 0, 6)/6, SiLU as x·Sigmoid(x)."""
    x = rng.normal(0, 2, (2, 7, 32)).astype(F32)
    inits = {"ax": np.array([-1], np.int64), "two": np.array(2.0, F32), "eps": np.array(1e-5, F32),
             "sqrt2": np.array(1.4142135, F32), "one": np.array(1.0, F32), "half": np.array(0.5, F32),
             "three": np.array(3.0, F32), "zero": np.array(0.0, F32), "six": np.array(6.0, F32)}
    nodes = [node("ReduceMean", ["x", "ax"], ["mu"]), node("Sub", ["x", "mu"], ["d"]), node("Pow", ["d", "two"], ["d2"]),
             node("ReduceMean", ["d2", "ax"], ["var"]), node("Add", ["var", "eps"], ["ve"]), node("Sqrt", ["ve"], ["sd"]),
             node("Div", ["d", "sd"], ["ln"]),
             node("Div", ["x", "sqrt2"], ["xs"]), node("Erf", ["xs"], ["e"]), node("Add", ["e", "one"], ["e1"]),
             node("Mul", ["x", "e1"], ["xe"]), node("Mul", ["xe", "half"], ["gelu"]),
             node("Add", ["x", "three"], ["x3"]), node("Clip", ["x3", "zero", "six"], ["cl"]), node("Mul", ["x", "cl"], ["xc"]),
             node("Div", ["xc", "six"], ["hswish"]),
             node("Sigmoid", ["x"], ["sg"]), node("Mul", ["x", "sg"], ["silu"])]
    m = make(nodes, {"x": x}, inits, outputs=["ln", "gelu", "hswish", "silu"], opset=18)
    assert_matches_ort(m, {"x": x}, range_ulp=16)  # chains: the LayerNorm's sums reach its final Div
    # ORT's optimizer fuses the erf-GELU into its contrib Gelu (x·(1/√2) instead of x/√2: an ulp
    # apart); node for node, as written, the activations are bit-exact.
    m = make(nodes[7:], {"x": x}, inits, outputs=["gelu", "hswish", "silu"], opset=18)
    assert_matches_ort(m, {"x": x}, optimize=False)
    assert_matches_ort(m, {"x": x}, ulp=2, range_ulp=4)


# --------------------------------------------------------------------------- dynamic quantization
def test_dynamic_quantize_linear_edge_cases_match_ort(rng):
    """ORT's GetQuantizationParameter: range widened to include 0, scale (max - min)/255 in float32,
    zero point rounded half to even; constant, all-positive, all-negative and tiny inputs."""
    cases = [rng.normal(size=(3, 50)), rng.uniform(0.1, 3, (40,)), -rng.uniform(0.1, 3, (40,)), np.zeros((5,)),
             np.full((4,), 2.5), rng.normal(0, 1e-20, (30,)), np.array([-1.0, 254.0]), rng.normal(0, 1e4, (64,))]
    for x in cases:
        x = x.astype(F32)
        m = make([node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])], {"x": x}, opset=11)
        assert_matches_ort(m, {"x": x})


@pytest.mark.parametrize("mdt", [np.uint8, np.int8])
def test_dynamic_quantization_chain_is_bit_exact(rng, mdt):
    """ddddocr common_old's pattern: DynamicQuantizeLinear -> ConvInteger (uint8 weights with a
    zero point: all ORT's ConvInteger takes) -> Cast -> Mul(scale) -> Add, and MatMulInteger with
    uint8 or int8 weights."""
    lo, hi = (0, 256) if mdt == np.uint8 else (-128, 128)
    x = rng.normal(size=(1, 16, 12, 20)).astype(F32)
    nodes = [node("DynamicQuantizeLinear", ["x"], ["q", "qs", "qz"]),
             node("ConvInteger", ["q", "w", "qz", "wz"], ["acc"], pads=[1, 1, 1, 1], strides=[1, 2]),
             node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT), node("Mul", ["qs", "ws"], ["sc"]),
             node("Mul", ["accf", "sc"], ["y"]), node("Add", ["y", "bias"], ["out"]),
             node("Reshape", ["x", "shape"], ["x2"]), node("DynamicQuantizeLinear", ["x2"], ["q2", "s2", "z2"]),
             node("MatMulInteger", ["q2", "m", "z2", "mz"], ["macc"])]
    inits = {"w": rng.integers(0, 256, (24, 16, 3, 3)).astype(np.uint8), "wz": np.array(131, np.uint8),
             "ws": np.array(0.003, F32), "bias": rng.normal(size=(1, 24, 1, 1)).astype(F32),
             "shape": np.array([16, -1], np.int64), "m": rng.integers(lo, hi, (240, 7)).astype(mdt),
             "mz": np.array(3 if mdt == np.uint8 else 0, mdt)}
    assert_matches_ort(make(nodes, {"x": x}, inits, outputs=["out", "macc"], opset=13), {"x": x})


@pytest.mark.parametrize("per_column", [False, True])
@pytest.mark.parametrize("wdt", [np.uint8, np.int8])
def test_dynamic_quantize_matmul_and_integer_to_float_are_bit_exact(rng, per_column, wdt):
    k, n = 64, 24
    lo, hi = (0, 256) if wdt == np.uint8 else (-128, 128)
    b = rng.integers(lo, hi, (k, n)).astype(wdt)
    bs = (rng.uniform(1e-3, 2e-2, n) if per_column else np.array(0.01)).astype(F32)
    bz = np.zeros(n if per_column else (), wdt) if wdt == np.int8 else \
        (rng.integers(0, 5, n) if per_column else np.array(3)).astype(wdt)
    inits = {"b": b, "bs": bs, "bz": bz, "bias": rng.normal(size=n).astype(F32), "as": np.array(0.02, F32),
             "az": np.array(128, np.uint8)}
    feeds = {"a": rng.normal(size=(2, 5, k)).astype(F32), "aq": rng.integers(0, 256, (3, k)).astype(np.uint8)}
    nodes = [node("DynamicQuantizeMatMul", ["a", "b", "bs", "bz", "bias"], ["y1"], domain=MS),
             node("MatMulIntegerToFloat", ["aq", "b", "as", "bs", "az", "bz", "bias"], ["y2"], domain=MS)]
    assert_matches_ort(make(nodes, feeds, inits, outputs=["y1", "y2"]), feeds)


# --------------------------------------------------------------------------- detection, pooling extras
@pytest.mark.parametrize("center_point_box", [0, 1])
@pytest.mark.parametrize("with_score_threshold", [False, True])
def test_non_max_suppression_matches_ort(rng, center_point_box, with_score_threshold):
    """Greedy per-class NMS with ORT's float32 IoU; distinct scores (ORT's order of equal scores
    is its priority queue's)."""
    b, c, n = 2, 3, 200
    xy = rng.uniform(0, 100, (b, n, 2)).astype(F32)
    wh = rng.uniform(2, 30, (b, n, 2)).astype(F32)
    if center_point_box:
        boxes = np.concatenate([xy, wh], axis=2)
    else:  # [y1, x1, y2, x2], corners sometimes swapped
        boxes = np.concatenate([xy[..., ::-1], (xy + wh)[..., ::-1]], axis=2)
        boxes[:, ::7] = boxes[:, ::7][..., [2, 3, 0, 1]]
    scores = rng.permutation(b * c * n).reshape(b, c, n).astype(F32) / (b * c * n)
    inits = {"m": np.array([25], np.int64), "iou": np.array([0.4], F32), "st": np.array([0.3], F32)}
    ins = ["boxes", "scores", "m", "iou"] + (["st"] if with_score_threshold else [])
    feeds = {"boxes": boxes.astype(F32), "scores": scores}
    m = make([node("NonMaxSuppression", ins, center_point_box=center_point_box)], feeds, inits, opset=11)
    assert_matches_ort(m, feeds)


def test_max_pool_indices_lp_pool_and_unique_match_ort(rng):
    x = rng.normal(size=(2, 3, 9, 10)).astype(F32)
    x[0, 0, :3, :3] = 1.0  # ties inside a window: the first one wins
    nodes = [node("MaxPool", ["x"], ["mp", "mi"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             node("MaxPool", ["x"], ["mp2", "mi2"], kernel_shape=[2, 3], strides=[1, 2], storage_order=1),
             node("LpPool", ["x"], ["lp"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 0], p=3),
             node("GlobalLpPool", ["x"], ["glp"], p=2)]
    assert_matches_ort(make(nodes, {"x": x}, outputs=["mp", "mi", "mp2", "mi2", "lp", "glp"], opset=12), {"x": x})
    v = rng.integers(0, 6, (5, 4)).astype(np.int64)
    nodes = [node("Unique", ["v"], ["u", "i", "inv", "cnt"]),
             node("Unique", ["v"], ["u0", "i0", "inv0", "cnt0"], sorted=0),
             node("Unique", ["v"], ["ua", "ia", "inva", "cnta"], axis=1)]
    outs = ["u", "i", "inv", "cnt", "u0", "i0", "inv0", "cnt0", "ua", "ia", "inva", "cnta"]
    assert_matches_ort(make(nodes, {"v": v}, outputs=outs, opset=11), {"v": v})


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("align_corners", [0, 1])
def test_grid_sample_matches_ort(rng, mode, padding_mode, align_corners):
    """Grid points inside and well outside [-1, 1] (padding matters), 2-D; 3-D for the modes ORT
    has there."""
    x = rng.normal(size=(2, 3, 7, 9)).astype(F32)
    grid = rng.uniform(-1.6, 1.6, (2, 5, 6, 2)).astype(F32)
    grid[0, 0, :3] = [[-1, -1], [1, 1], [0, 0]]
    attrs = dict(mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    feeds = {"x": x, "grid": grid}
    assert_matches_ort(make([node("GridSample", ["x", "grid"], **attrs)], feeds, opset=16), feeds)
    if mode != "bicubic":
        feeds = {"x": rng.normal(size=(1, 2, 4, 5, 6)).astype(F32), "grid": rng.uniform(-1.3, 1.3, (1, 3, 4, 5, 3)).astype(F32)}
        attrs["mode"] = {"bilinear": "linear"}.get(mode, mode)
        assert_matches_ort(make([node("GridSample", ["x", "grid"], **attrs)], feeds, opset=20), feeds)


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("ctm", ["half_pixel", "output_half_pixel"])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_align_matches_ort(rng, mode, ctm, sampling_ratio):
    """ROIs small and large, partly outside the feature map, on two images."""
    x = rng.normal(size=(2, 4, 12, 15)).astype(F32)
    xy = rng.uniform(-10, 110, (9, 2))
    wh = rng.uniform(3, 60, (9, 2))
    rois = np.concatenate([xy, xy + wh], axis=1).astype(F32)
    feeds = {"x": x, "rois": rois, "bi": rng.integers(0, 2, 9).astype(np.int64)}
    m = make([node("RoiAlign", ["x", "rois", "bi"], mode=mode, coordinate_transformation_mode=ctm, output_height=3,
                   output_width=4, sampling_ratio=sampling_ratio, spatial_scale=0.125)], feeds, opset=16)
    assert_matches_ort(m, feeds)


def test_spatial_transformer_and_audio_front_end_match_ort(rng):
    """Exporter idioms beyond the zoo: an STN (AffineGrid -> GridSample) and an audio front end
    (HannWindow -> STFT -> power -> MelWeightMatrix)."""
    x = rng.normal(size=(2, 3, 12, 16)).astype(F32)
    theta = (np.array([[1, 0, 0], [0, 1, 0]], F32) + rng.normal(0, 0.2, (2, 2, 3))).astype(F32)
    nodes = [node("AffineGrid", ["theta", "size"], ["grid"], align_corners=0),
             node("GridSample", ["x", "grid"], ["y"], mode="linear", padding_mode="border")]
    feeds = {"x": x, "theta": theta}
    # a chain: the bilinear GridSample is exact, its grid (an AffineGrid sum) is not
    assert_matches_ort(make(nodes, feeds, {"size": np.array([2, 3, 10, 14], np.int64)}, outputs=["grid", "y"],
                            opset=20), feeds, range_ulp=16)
    audio = rng.normal(size=(2, 1600, 1)).astype(F32)
    nodes = [node("HannWindow", ["n"], ["win"]), node("STFT", ["a", "step", "win"], ["spec"]),
             node("ReduceSumSquare", ["spec", "last"], ["power"], keepdims=0),
             node("MelWeightMatrix", ["mels", "n", "rate", "lo", "hi"], ["mel"]),
             node("MatMul", ["power", "mel"], ["y"])]
    inits = {"n": np.array(256, np.int64), "step": np.array(160, np.int64), "last": np.array([-1], np.int64),
             "mels": np.array(40, np.int64), "rate": np.array(16000, np.int64), "lo": np.array(20.0, F32),
             "hi": np.array(7600.0, F32)}
    feeds = {"a": audio}
    assert_matches_ort(make(nodes, feeds, inits, outputs=["win", "spec", "mel", "y"], opset=18), feeds)


def test_unsupported_attribute_combinations_raise_interp_errors(rng):
    """What the interpreter does not compute is refused with the node and the reason, never
    approximated."""
    x = rng.normal(size=(2, 3)).astype(F32)
    cases = [
        (node("Cast", ["x"], to=TensorProto.STRING, name="to_text"), "Cast.*to_text.*STRING"),
        (node("Cast", ["x"], to=TensorProto.BFLOAT16, name="to_bf16"), "Cast.*to_bf16.*BFLOAT16"),
        (node("Resize", ["x", "", "s"], mode="area", name="rz"), "Resize.*rz.*mode='area'"),
        (node("LSTM", ["x3", "W", "R"], ["Y"], hidden_size=2, activations=["Gelu", "Tanh", "Tanh"], name="l"),
         "LSTM.*'l'.*activation 'Gelu'"),
        (node("GridSample", ["x4", "g"], mode="cubic", name="gs"), "GridSample.*gs.*cubic mode is 2-D only"),
        (node("Split", ["x", "sp"], ["a", "b"], axis=1, name="sp"), "Split.*sp.*do not add up"),
    ]
    inits = {"s": np.array([1, 2], F32), "W": np.zeros((1, 8, 3), F32), "R": np.zeros((1, 8, 2), F32),
             "x3": np.zeros((2, 1, 3), F32), "x4": np.zeros((1, 1, 2, 2, 2), F32), "g": np.zeros((1, 2, 2, 2, 3), F32),
             "sp": np.array([1, 1], np.int64)}
    for n, pattern in cases:
        m = make([n], {"x": x}, inits, opset=20)
        with pytest.raises(InterpError, match=pattern):
            run(m, {"x": x})


@pytest.mark.parametrize("shape", [(2, 16, 240, 240), (1, 3, 7, 5), (2, 5, 1, 1), (1, 4, 3), (1, 2, 3, 4, 5)])
def test_global_average_pool_sums_in_mlas_order_bit_for_bit(shape):
    """MlasPoolGlobalKernel: four float32 lanes, folded (l0 + l2) + (l1 + l3), the tail one by one,
    then / n — on a 240×240 map a float64 mean is hundreds of ulp from ORT's."""
    import onnxruntime as ort
    from qgraph.interp import run
    graph = helper.make_graph([helper.make_node("GlobalAveragePool", ["x"], ["y"])], "gap",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = (np.random.default_rng(0).standard_normal(shape) * 3 + 1).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(run(model, {"x": x})["y"], want)


def test_global_average_pool_tolerance_covers_a_sequential_float32_sum():
    """ORT's NCHWc pool adds each channel's elements one by one: n range ulp covers that order."""
    from qgraph.interp.tolerance import tolerance_for
    n = 14400
    x = np.abs(np.random.default_rng(1).standard_normal((8, n))).astype(np.float32) + 1
    sequential = np.zeros(8, np.float32)
    for i in range(n):
        sequential = sequential + x[:, i]
    sequential /= np.float32(n)
    exact = x.astype(np.float64).mean(axis=1)
    tol = tolerance_for("GlobalAveragePool").for_terms(n)
    assert tol.range_ulp == n
    assert np.all(np.abs(sequential - exact) <= tol.allowed(sequential))


@pytest.mark.parametrize("shape", [(1, 200, 2, 96), (3, 88, 3, 96), (2, 7, 1, 9), (1, 1, 4, 4), (4, 3, 1, 2)])
def test_global_average_pool_lanes_are_sequential_sums(shape):
    """The lanes (element i goes to lane i mod 4) are summed strictly in order: the result equals a
    sequential float32 accumulate per lane, on the shapes of ppocr_cls's SE blocks and on odd tails."""
    from qgraph.interp.ops_nn import global_average_pool
    x = (np.random.default_rng(7).standard_normal(shape) * 5 + 2).astype(F32)
    n = int(np.prod(shape[2:]))
    flat, body = x.reshape(-1, n), n // 4 * 4
    if body:
        lanes = np.add.accumulate(flat[:, :body].reshape(flat.shape[0], body // 4, 4), axis=1)[:, -1, :]
        total = (lanes[:, 0] + lanes[:, 2]) + (lanes[:, 1] + lanes[:, 3])
    else:
        total = np.zeros(flat.shape[0], F32)
    for i in range(body, n):
        total = total + flat[:, i]
    want = (total / F32(n)).reshape(shape[:2] + (1, 1))
    got = global_average_pool(None, x)
    assert got.dtype == F32 and np.array_equal(got.view(np.uint32), want.view(np.uint32))
    strided = np.repeat(x, 2, axis=1)[:, ::2]  # a non-contiguous view of the same values
    assert np.array_equal(global_average_pool(None, strided).view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("shape", [(1, 200, 2, 96), (3, 24, 5, 7), (2, 8, 40, 40), (2, 6, 5)])
def test_batch_normalization_short_planes_match_the_broadcast_form(shape):
    """Short planes run on per-element copies of the channel constants: bit for bit the broadcast
    ``(x - mean) · inv + bias`` in float32, run twice through a compiled plan (memoized constants),
    and within BatchNormalization's bound of ORT."""
    from qgraph.interp import compile_model
    rng = np.random.default_rng(3)
    c = shape[1]
    inits = {"g": rng.normal(size=c).astype(F32), "b": rng.normal(size=c).astype(F32),
             "m": rng.normal(size=c).astype(F32), "v": rng.uniform(0.5, 2, size=c).astype(F32)}
    x = (rng.standard_normal(shape) * 4).astype(F32)
    model = make([helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], epsilon=1e-5)],
                 {"x": x}, inits)
    cshape = (1, c) + (1,) * (len(shape) - 2)
    inv = (inits["g"].astype(np.float64) / np.sqrt(inits["v"].astype(np.float64) + 1e-5)).astype(F32)
    want = (x - inits["m"].reshape(cshape)) * inv.reshape(cshape) + inits["b"].reshape(cshape)
    plan = compile_model(model)
    for _ in range(2):
        got = plan.run({"x": x})["y"]
        assert got.shape == shape and np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert_matches_ort(model, {"x": x})


# --------------------------------------------------------------------------- QLinearSoftmax
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("opset, shape, axis", [
    (12, (2, 1000), None),          # onnxruntime.quantization's QOperator classifier head
    (12, (2, 10, 7), None),         # ORT 1.19: an absent axis is the last one, for opset 12 too
    (12, (2, 10, 7), 1), (12, (3, 4, 5), 0), (13, (3, 4, 5), 1), (13, (2, 10, 7), None), (13, (4, 3), 0)])
def test_qlinear_softmax_matches_ort(rng, dtype, opset, shape, axis):
    """com.microsoft QLinearSoftmax, bit-exact with ORT: its float exp table, float32 row sums in
    order, floor(1/y_scale), and its int8 wrap — over random codes, rows near the top code too."""
    signed = dtype == np.int8
    lo, hi = (-128, 128) if signed else (0, 256)
    attrs = {"opset": opset} if axis is None else {"opset": opset, "axis": axis}
    for trial in range(6):
        inits = {"xs": np.float32(10 ** rng.uniform(-3, 0)), "xz": np.array(rng.integers(lo, hi), dtype),
                 "ys": np.float32(rng.uniform(0.5, 2) / 256), "yz": np.array(lo, dtype)}
        x = rng.integers(hi - 24 if trial % 2 else lo, hi, shape).astype(dtype)
        model = make([node("QLinearSoftmax", ["x", "xs", "xz", "ys", "yz"], domain=MS, **attrs)], {"x": x}, inits)
        np.testing.assert_array_equal(run(model, {"x": x})["y"], ort_outputs(model, {"x": x})["y"])


def test_sum_scale_bounds_the_partial_sums_from_the_inputs():
    """qgraph diff's scale-aware bound: max|x|·max Σ|w| per output for the accumulating ops, the
    gates' pre-activation bound for recurrent ones (the state within ±1 after the first step)."""
    from qgraph.interp.tolerance import sum_scale
    x = np.array([[[-3.0, 2.0]]], np.float32)
    w = np.array([[[1.0], [-2.0]], [[0.5], [0.5]]], np.float32)        # Conv weights [M=2, C=2, k=1]
    assert sum_scale(helper.make_node("Conv", ["x", "w"], ["y"]), [x, w]) == 3.0 * 3.0
    assert sum_scale(helper.make_node("ConvTranspose", ["x", "w"], ["y"]), [x, w]) == 3.0 * 2.5
    b = np.array([[1.0, -4.0], [2.0, 0.5]], np.float32)                 # MatMul B [K=2, N=2]
    assert sum_scale(helper.make_node("MatMul", ["a", "b"], ["y"]), [x[0], b]) == 3.0 * 4.5
    assert sum_scale(helper.make_node("Gemm", ["a", "b"], ["y"], transB=1, alpha=2.0), [x[0], b]) == 2.0 * 3.0 * 5.0
    lstm = helper.make_node("LSTM", ["x", "w", "r", "b"], ["y"], hidden_size=1)
    W, R = np.full((1, 4, 2), 0.5, np.float32), np.full((1, 4, 1), -2.0, np.float32)
    bias = np.array([[1, 1, 1, 1, -3, 0, 0, 0]], np.float32)
    assert sum_scale(lstm, [x, W, R, bias]) == 3.0 * 1.0 + 1.0 * 2.0 + 2.0
    relu_rnn = helper.make_node("RNN", ["x", "w", "r"], ["y"], hidden_size=1, activations=["Relu"])
    assert sum_scale(relu_rnn, [x, W[:, :1], R[:, :1]]) is None        # an unbounded state
    assert sum_scale(helper.make_node("Relu", ["x"], ["y"]), [x]) is None
