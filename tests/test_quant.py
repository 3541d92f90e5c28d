"""qgraph.quant against plain references (Fractions, float64) and against ONNX Runtime."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qgraph import quant
from qgraph.errors import ConfigError

F32 = np.float32
finite32 = st.floats(-1e4, 1e4, allow_nan=False, width=32)
pos_scale = st.floats(2.0 ** -20, 1024.0, width=32)


def _session(model):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _model(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, t, None) for n, t in inputs],
                          [helper.make_tensor_value_info(n, t, None) for n, t in outputs],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(inits).items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


# --------------------------------------------------------------------------- ranges
@pytest.mark.parametrize("bits", range(2, 9))
def test_qrange_all_widths(bits):
    assert quant.qrange(bits, True) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert quant.qrange(bits, False) == (0, 2 ** bits - 1)
    assert quant.qrange(bits, True, narrow_range=True) == (-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1)
    assert quant.storage_dtype(True) is np.int8 and quant.storage_dtype(False) is np.uint8


@pytest.mark.parametrize("bits", [0, 1, 9, 15, 17, 32, 2.5, True])
def test_qrange_rejects_bad_widths(bits):
    with pytest.raises(ConfigError, match="bits must be in 2..8 or 16"):
        quant.qrange(bits, True)


def test_16_bit_grids_store_in_int16_and_need_the_microsoft_domain():
    assert quant.qrange(16, True) == (-32768, 32767) and quant.qrange(16, False) == (0, 65535)
    assert quant.storage_dtype(True, 16) is np.int16 and quant.storage_dtype(False, 16) is np.uint16
    assert quant.qdq_domain(np.int8) == "" and quant.qdq_domain(np.uint16) == "com.microsoft"


@pytest.mark.parametrize("signed", [True, False])
def test_16_bit_quantize_matches_ort_microsoft_quantize_linear(signed):
    """The com.microsoft pair runs int16/uint16 at opset 17 in ORT 1.19, bit for bit like quant.quantize."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(4096) * 300).astype(F32)
    x[:4] = [0.5 * 0.013, 1.5 * 0.013, -2.5 * 0.013, 1e9]       # ties and saturation
    qmin, qmax = quant.qrange(16, signed)
    zp = np.array(0 if signed else 30000, quant.storage_dtype(signed, 16))
    scale = np.array(0.013, F32)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], domain=quant.qdq_domain(zp.dtype)),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], domain=quant.qdq_domain(zp.dtype))]
    elem = TensorProto.INT16 if signed else TensorProto.UINT16
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4096])],
                              [helper.make_tensor_value_info("q", elem, [4096]),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, [4096])],
                              [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zp, "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)], ir_version=8)
    q, y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    expect = quant.quantize(x, scale, zp, qmin, qmax, dtype=zp.dtype)
    assert q.dtype == zp.dtype and np.array_equal(q, expect)
    assert np.array_equal(y, quant.dequantize(expect, scale, zp))


def test_adaround_helpers_start_at_the_weight_and_round_by_choice():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 9)).astype(F32)
    scale = np.abs(w).max(axis=1) / 7
    v = quant.adaround_init(w, scale, axis=0)
    soft = (np.floor(w / scale[:, None]) + quant.rectified_sigmoid(v)) * scale[:, None]
    assert np.allclose(soft, w, atol=1e-5)
    nearest = quant.quantize(w, scale, 0, -8, 7, axis=0)
    up = (w / scale[:, None] - np.floor(w / scale[:, None])) >= 0.5
    assert np.array_equal(quant.quantize_rounded(w, scale, 0, -8, 7, up, axis=0), nearest)
    all_down = quant.quantize_rounded(w, scale, 0, -8, 7, np.zeros_like(up), axis=0)
    assert np.array_equal(all_down, np.clip(np.floor(w / scale[:, None]), -8, 7))
    assert set(np.unique(quant.rectified_sigmoid(np.array([-50.0, 50.0])))) == {0.0, 1.0}


# --------------------------------------------------------------------------- quantize
def _ref_quantize(x, s, zp, qmin, qmax):
    """Loop reference: float32 division, exact round-half-even on the float32 quotient."""
    out = []
    for v in np.asarray(x, F32).reshape(-1):
        q = F32(v) / F32(s)
        fr = Fraction(float(q))
        r = round(fr)  # Python rounds Fractions half to even
        out.append(min(max(r + int(zp), qmin), qmax))
    return np.array(out)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite32, min_size=1, max_size=40), pos_scale, st.integers(-128, 127), st.integers(2, 8))
def test_quantize_round_half_even_and_saturate(xs, s, zp, bits):
    qmin, qmax = quant.qrange(bits, True)
    zp = min(max(zp, qmin), qmax)
    x = np.array(xs, F32)
    got = quant.quantize(x, s, zp, qmin, qmax)
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got.astype(int), _ref_quantize(x, s, zp, qmin, qmax))


@settings(max_examples=100, deadline=None)
@given(st.integers(-600, 600), st.integers(-30, 30))
def test_quantize_ties_go_to_even(k, e):
    """Power-of-two scales make x = (k + ½)·s and x / s exact, so every example is a tie."""
    s = F32(2.0 ** e)
    x = F32(k + 0.5) * s
    assert F32(x) / s == F32(k + 0.5)
    got = int(quant.quantize(np.array([x]), s, 0, -10000, 10000)[0])
    assert got == (k if k % 2 == 0 else k + 1)


@settings(max_examples=300, deadline=None)
@given(finite32, finite32, st.integers(2, 8), st.booleans(), st.booleans(), st.booleans(), st.booleans())
def test_scale_zero_point_covers_range(a, b, bits, signed, symmetric, narrow, pow2):
    rmin, rmax = min(a, b), max(a, b)
    if symmetric and not signed:  # meant for non-negative tensors
        rmin, rmax = max(rmin, 0.0), max(rmax, 0.0)
    s, zp = quant.scale_zero_point(rmin, rmax, bits, signed, symmetric, narrow, pow2)
    qmin, qmax = quant.qrange(bits, signed, narrow)
    assert s.dtype == F32 and s > 0 and np.isfinite(s)
    assert qmin <= zp <= qmax
    if symmetric:
        assert zp == (0 if signed else qmin)
    # the range ends quantize to within half a step of the exact grid (no clipping beyond rounding)
    for r in (rmin, rmax, 0.0):
        q = int(quant.quantize(np.array([r], F32), s, zp, qmin, qmax, dtype=np.int32)[0])
        exact = float(r) / float(s) + int(zp)
        assert abs(q - exact) <= 0.5 + 1e-3 * max(1.0, abs(exact)), (r, q, exact)
    assert int(quant.quantize(np.array([0.0], F32), s, zp, qmin, qmax, dtype=np.int32)[0]) == zp


@settings(max_examples=200, deadline=None)
@given(st.floats(1e-8, 1e6), st.integers(2, 8), st.booleans())
def test_pow2_scales_are_powers_of_two_not_smaller(amax, bits, signed):
    plain, _ = quant.scale_zero_point(-amax, amax, bits, signed, True)
    p2, _ = quant.scale_zero_point(-amax, amax, bits, signed, True, pow2=True)
    m, e = np.frexp(float(p2))
    assert m == 0.5
    assert p2 >= plain


def test_zero_range_gives_a_safe_scale():
    s, zp = quant.scale_zero_point(np.zeros(3), np.zeros(3), 8, True, False)
    assert np.all(s == quant.ZERO_RANGE_SCALE) and np.all(np.isfinite(s))
    q = quant.quantize(np.zeros(4, F32), s[0], zp[0], -128, 127)
    assert np.all(quant.dequantize(q, s[0], zp[0]) == 0)
    s2, _ = quant.scale_zero_point(0.0, 1e-45, 8, True, True)
    assert s2 >= quant.MIN_SCALE


def test_scale_zero_point_is_vectorized_per_channel():
    rmin = np.array([-1.0, 0.0, -3.0])
    rmax = np.array([1.0, 2.0, 0.5])
    s, zp = quant.scale_zero_point(rmin, rmax, 8, False, False)
    assert s.shape == (3,) and zp.shape == (3,)
    np.testing.assert_allclose(s, (rmax - rmin) / 255, rtol=1e-6)
    x = np.stack([rmin, rmax]).astype(F32)
    q = quant.quantize(x, s, zp, 0, 255, axis=1)
    assert q.min() >= 0 and q.max() <= 255 and np.all(q[0] <= 1) and np.all(q[1] >= 254)


def test_dequantize_and_fake_quantize():
    x = np.linspace(-2, 2, 101, dtype=F32)
    fq = quant.fake_quantize(x, F32(0.05), 3, -128, 127)
    assert fq.dtype == F32
    assert np.max(np.abs(fq - x)) <= 0.025 + 1e-6


# --------------------------------------------------------------------------- fixed point
@settings(max_examples=300, deadline=None)
@given(st.floats(1e-9, 1e8))
def test_quantize_multiplier_relative_error(real):
    m0, shift = quant.quantize_multiplier(real)
    assert 2 ** 30 <= int(m0) < 2 ** 31
    approx = Fraction(int(m0), 2 ** 31) * Fraction(2) ** (-int(shift))
    assert abs(approx - Fraction(real)) / Fraction(real) < Fraction(1, 2 ** 30)


def test_quantize_multiplier_vectorized_and_zero():
    m0, shift = quant.quantize_multiplier(np.array([0.0, 0.5, 0.75, 1.0 - 1e-12, 3.0]))
    assert m0.dtype == np.int32 and shift.dtype == np.int32
    assert int(m0[0]) == 0 and int(shift[0]) == 0
    assert int(m0[1]) == 2 ** 30 and int(shift[1]) == 0
    assert int(m0[3]) == 2 ** 30 and int(shift[3]) == -1  # rounding carried into the exponent


def _ref_requant(acc, m0, shift, zp, qmin, qmax):
    n = 31 + shift
    v = Fraction(acc * m0, 2 ** n)
    r = int(np.floor(v + Fraction(1, 2)))  # round half up
    return min(max(r + zp, qmin), qmax)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-2 ** 31, 2 ** 31 - 1), min_size=1, max_size=20), st.floats(1e-7, 100.0),
       st.integers(-128, 127))
def test_requantize_fixed_point_rounds_half_up(accs, real, zp):
    m0, shift = quant.quantize_multiplier(real)
    acc = np.array(accs, np.int32)
    got = quant.requantize_fixed_point(acc, m0, shift, zp, -128, 127)
    want = [_ref_requant(a, int(m0), int(shift), zp, -128, 127) for a in accs]
    np.testing.assert_array_equal(got.astype(int), want)
    # and it is round(acc * real) up to the multiplier's tiny relative error
    exact = np.clip(np.floor(acc.astype(np.float64) * real + 0.5) + zp, -128, 127)
    assert np.max(np.abs(got.astype(np.float64) - exact)) <= 1


def _onnx_form_model(steps, acc_shape_rank, out_type):
    nodes, inits, cur = [], {}, "acc"
    for i, (op, const, attrs) in enumerate(steps):
        out = f"t{i}"
        if op == "Cast":
            to = {"int64": TensorProto.INT64, "int8": TensorProto.INT8, "uint8": TensorProto.UINT8}[attrs["to"]]
            nodes.append(helper.make_node("Cast", [cur], [out], to=to))
        elif op == "SubMod":
            inits[f"c{i}"] = const
            nodes.append(helper.make_node("Mod", [cur, f"c{i}"], [f"r{i}"], fmod=0))
            nodes.append(helper.make_node("Sub", [cur, f"r{i}"], [out]))
        elif op == "Clip":
            inits[f"lo{i}"], inits[f"hi{i}"] = const
            nodes.append(helper.make_node("Clip", [cur, f"lo{i}", f"hi{i}"], [out]))
        else:
            inits[f"c{i}"] = const
            nodes.append(helper.make_node(op, [cur, f"c{i}"], [out]))
        cur = out
    nodes.append(helper.make_node("Identity", [cur], ["y"]))
    return _model(nodes, [("acc", TensorProto.INT32)], [("y", out_type)], inits)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_requantize_fixed_point_onnx_form_is_bit_exact_in_ort(signed, seed):
    rng = np.random.default_rng(seed)
    c = 8
    real = rng.uniform(1e-5, 0.5, c) * (10.0 ** rng.integers(-2, 1, c))
    real[:3] = [0.5, 0.25, 1.5]  # acc/2, acc/4, 3acc/2: odd accumulators give exact .5 ties
    m0, shift = quant.quantize_multiplier(real)
    qmin, qmax = (-128, 127) if signed else (0, 255)
    zp = rng.integers(qmin, qmax + 1, c)
    shp = (1, c, 1, 1)
    steps = quant.requantize_fixed_point_onnx_form(m0.reshape(shp), shift.reshape(shp), zp.reshape(shp), qmin, qmax)
    model = _onnx_form_model(steps, 4, TensorProto.INT8 if signed else TensorProto.UINT8)
    acc = rng.integers(-2 ** 24, 2 ** 24, (2, c, 5, 6)).astype(np.int32)
    # include exact ties and extremes
    acc[0, :, 0, 0] = 0
    acc[0, :, 0, 1] = -(2 ** 31)
    acc[0, :, 0, 2] = 2 ** 31 - 1
    got = _session(model).run(None, {"acc": acc})[0]
    want = quant.requantize_fixed_point(acc, m0.reshape(shp), shift.reshape(shp), zp.reshape(shp), qmin, qmax,
                                        dtype=np.int8 if signed else np.uint8)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def _random_rule(rng, seed: int, channels: int, smallest: float, ties: list, signed: bool, clamped: bool):
    """A random per-channel requantization rule (channel 0's multiplier from `ties`: exact .5 ties
    on odd accumulators), its storage, zero point and clip: (m0, shift, storage, zp, qlo, qhi)."""
    real = rng.uniform(smallest, 3.0, channels) * (10.0 ** rng.integers(-3, 1, channels))
    real[0] = ties[seed % len(ties)]
    m0, shift = quant.quantize_multiplier(real)
    storage = np.int8 if signed else np.uint8
    qmin, qmax = quant.storage_range(storage)
    zp = int(rng.integers(qmin, qmax + 1))
    qlo, qhi = (int(rng.integers(qmin, zp + 1)), int(rng.integers(zp, qmax + 1))) if clamped else (qmin, qmax)
    return m0, shift, storage, zp, qlo, qhi


def _clipped_rule(acc, bias, rule) -> np.ndarray:
    """The reference: requantize_fixed_point of acc + bias, clipped to [qlo, qhi], in storage."""
    m0, shift, storage, zp, qlo, qhi = rule
    qmin, qmax = quant.storage_range(storage)
    want = quant.requantize_fixed_point(acc.astype(np.int64) + (0 if bias is None else bias), m0, shift, zp,
                                        qmin, qmax, dtype=np.int64)
    return np.clip(want, qlo, qhi).astype(storage)


@settings(max_examples=400, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**32 - 1), st.booleans(), st.booleans(), st.booleans(), st.booleans())
def test_fixed_point_steps_equal_requantize_fixed_point(channels, seed, signed, biased, bounded, clamped):
    """The integer target's wide steps compute requantize_fixed_point of acc + bias, clipped to the
    folded activation's codes, bit for bit: over every accumulator within the bound (or any int32
    when there is none, the steps then clip first), per channel, with ties and extremes."""
    rng = np.random.default_rng(seed)
    rule = _random_rule(rng, seed, channels, 1e-5, [0.5, 0.25, 1.0, 2.5], signed, clamped)
    m0, shift, storage, zp, qlo, qhi = rule
    bias = rng.integers(-2**20, 2**20, channels) if biased else None
    bound = rng.integers(1, 2**26, channels) if bounded else None
    steps = quant.fixed_point_steps(m0, shift, zp, qlo, qhi, storage, bias, bound)
    assert steps is not None
    limit = bound if bounded else np.full(channels, 2**31 - 1)
    acc = np.concatenate([rng.integers(-limit, limit + 1, (300, channels)), [-limit, limit, np.zeros(channels)]])
    if not bounded:
        acc = np.concatenate([acc, np.full((1, channels), -2**31)])
    acc = acc.astype(np.int32)
    np.testing.assert_array_equal(steps.apply(acc, (channels,)), _clipped_rule(acc, bias, rule))


def test_fixed_point_steps_refuse_multipliers_below_int64_reach():
    """A multiplier below about 2^-22 needs a shift past 52 bits: no int64 form (the Mod/Div one
    remains), and a mixed per-channel set falls back to one shift per channel."""
    m0, shift = quant.quantize_multiplier(np.array([1e-12]))
    assert quant.fixed_point_steps(m0, shift, 128, 0, 255, np.uint8) is None
    m0, shift = quant.quantize_multiplier(np.array([0.6, 1e-7]))
    steps = quant.fixed_point_steps(m0, shift, 128, 0, 255, np.uint8, bias=[2**30, 0])   # bias·2^23 overflows
    assert steps is not None and steps.shift.tolist() == [31, 54]
    acc = np.array([[-2**30 - 200, 0], [-2**30 + 200, 2**31 - 1]], np.int32)
    want = quant.requantize_fixed_point(acc.astype(np.int64) + [2**30, 0], m0, shift, 128, 0, 255)
    np.testing.assert_array_equal(steps.apply(acc, (2,)), want)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 4), st.integers(0, 2**32 - 1), st.booleans(), st.booleans(), st.booleans())
def test_division_steps_equal_requantize_fixed_point(channels, seed, signed, biased, clamped):
    """The int32 Mul/Add/Div form computes requantize_fixed_point of acc + bias, clipped, bit for
    bit over *every* accumulator within the bound (exhaustively: each step of the rule is hit),
    with exact .5 ties, truncation of negative numerators and signed codes."""
    rng = np.random.default_rng(seed)
    rule = _random_rule(rng, seed, channels, 1e-4, [0.5, 0.25, 1.0, 2.5, 1 / 3], signed, clamped)
    m0, shift, storage, zp, qlo, qhi = rule
    bias = rng.integers(-2**14, 2**14, channels) if biased else None
    bound = rng.integers(1, 2**15, channels)
    steps = quant.division_steps(m0, shift, zp, qlo, qhi, storage, bias, bound)
    assert steps is not None
    acc = np.arange(-int(bound.max()), int(bound.max()) + 1)[:, None].repeat(channels, 1)
    acc = np.clip(acc, -bound, bound).astype(np.int32)
    np.testing.assert_array_equal(steps.apply(acc, (channels,)), _clipped_rule(acc, bias, rule))
    assert np.all(bound * steps.multiplier + np.abs(steps.offset) < 2**31)


def test_division_steps_of_a_clip_to_one_code():
    """A folded clip whose bounds meet (qlo == qhi, found by hypothesis: zero point 4, clip [4, 4])
    makes the rule a constant: p = 0, and every accumulator gives that code, signed or not."""
    m0, shift = quant.quantize_multiplier(np.array([0.5, 0.003]))
    acc = np.arange(-3000, 3001)[:, None].repeat(2, 1).astype(np.int32)
    for storage, zp in ((np.uint8, 4), (np.int8, -7)):
        steps = quant.division_steps(m0, shift, zp, zp, zp, storage, acc_bound=[3000, 3000])
        assert steps is not None and np.all(steps.multiplier == 0)
        np.testing.assert_array_equal(steps.apply(acc, (2,)), np.full(acc.shape, zp, storage))


def test_division_steps_clip_the_accumulator_where_its_bound_leaves_int32_no_room():
    """A small bound needs no clip; no bound, or one too large for a numerator to fit int32 next to
    it, clips the accumulator to where the rule has saturated (the same results); a rule whose
    saturation lies beyond int32 has no division form (the int64 steps remain)."""
    m0, shift = quant.quantize_multiplier(np.array([0.0123, 0.002]))
    steps = quant.division_steps(m0, shift, 128, 0, 255, np.uint8, acc_bound=[2**20, 2**20])
    assert steps.acc_clip is None and np.all(steps.multiplier * 2**20 < 2**31)
    for bound in (None, [2**31 - 1] * 2):
        steps = quant.division_steps(m0, shift, 128, 0, 255, np.uint8, acc_bound=bound)
        assert steps.acc_clip == 63750           # 127.5 / 0.002: where the smaller multiplier reaches 255
        acc = np.array([[-2**31, -2**31], [2**31 - 1] * 2, [-70000, 70000], [12, -5]], np.int32)
        want = quant.requantize_fixed_point(acc.astype(np.int64), m0, shift, 128, 0, 255)
        np.testing.assert_array_equal(steps.apply(acc, (2,)), want)
    m0, shift = quant.quantize_multiplier(np.array([1e-12]))
    assert quant.division_steps(m0, shift, 128, 0, 255, np.uint8, bias=[2**31 - 1]) is None


def test_division_steps_of_near_dead_channels():
    """A channel whose weights sit on a coarsened grid (fold.fit_biases_to_int32) has a tiny
    multiplier and a huge bias: over its small accumulator range the rule is constant or takes
    one step, and the division form still holds it in int32 (p = 0, or q wider than the range)."""
    m0, shift = quant.quantize_multiplier(np.array([3.6e-9, 3.4e-9, 0.01]))
    half_way = -int(5.5 * 2.0 ** (31 + int(shift[1])) / int(m0[1]))       # (a + b)·M crosses -5.5 near a = 0
    bias, bound = np.array([-1_663_388_288, half_way, 0]), np.array([15424, 100_000, 0])
    steps = quant.division_steps(m0, shift, 123, 0, 255, np.uint8, bias, bound)
    assert steps is not None
    acc = np.concatenate([np.linspace(-bound, bound, 20001).round(), [[-1] * 3, [0] * 3]]).astype(np.int32)
    want = quant.requantize_fixed_point(acc.astype(np.int64) + bias, m0, shift, 123, 0, 255)
    np.testing.assert_array_equal(steps.apply(acc, (3,)), want)
    assert len(np.unique(want[:, 1])) == 2                      # the second channel takes one step


def test_accumulator_bound_is_reached_by_the_worst_input():
    w = np.array([[[3, -4], [0, 127]], [[-128, 1], [2, 2]]], np.int8)          # 2 channels
    bound = quant.accumulator_bound(w, np.int8(0), np.uint8(10), np.uint8)
    assert bound.tolist() == [134 * 245, 133 * 245]
    x = np.where(w[0] > 0, 255, 0).astype(np.int64) - 10                      # all-positive terms
    assert int(np.sum(x * w[0])) <= bound[0]


# --------------------------------------------------------------------------- against ORT
@pytest.mark.parametrize("qt,npt,qmin,qmax", [(TensorProto.INT8, np.int8, -128, 127),
                                              (TensorProto.UINT8, np.uint8, 0, 255)])
@pytest.mark.parametrize("seed", range(5))
def test_quantize_matches_ort_quantize_linear(qt, npt, qmin, qmax, seed):
    rng = np.random.default_rng(seed)
    model = _model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])],
                   [("x", TensorProto.FLOAT), ("s", TensorProto.FLOAT), ("z", qt)], [("y", qt)])
    sess = _session(model)
    for _ in range(20):
        s = F32(rng.uniform(1e-3, 2.0))
        z = npt(rng.integers(qmin, qmax + 1))
        ties = (rng.integers(-400, 400, 500) + 0.5).astype(F32) * s  # many exact .5 quotients
        x = np.concatenate([ties, rng.normal(0, 100, 500).astype(F32) * s, [np.inf, -np.inf, 0.0, -0.0]]).astype(F32)
        want = sess.run(None, {"x": x, "s": np.array(s, F32), "z": np.array(z, npt)})[0]
        np.testing.assert_array_equal(quant.quantize(x, s, z, qmin, qmax), want)


def test_requantize_float_matches_ort_qlinearmatmul():
    rng = np.random.default_rng(0)
    k, n = 64, 16
    b = rng.integers(-128, 128, (k, n)).astype(np.int8)
    bs = rng.uniform(1e-3, 1e-2, n).astype(F32)
    a_s, ys = F32(0.02), F32(0.3)
    inits = dict(as_=a_s, az=np.uint8(0), b=b, bs=bs, bz=np.zeros(n, np.int8), ys=ys, yz=np.uint8(120))
    node = helper.make_node("QLinearMatMul", ["a", "as_", "az", "b", "bs", "bz", "ys", "yz"], ["y"])
    model = _model([node], [("a", TensorProto.UINT8)], [("y", TensorProto.UINT8)], inits)
    a = rng.integers(0, 256, (50, k)).astype(np.uint8)
    want = _session(model).run(None, {"a": a})[0]
    acc = a.astype(np.int64) @ b.astype(np.int64)
    got = quant.requantize_float(acc.astype(np.int32), quant.ort_requant_multiplier(a_s, bs, ys), 120, 0, 255)
    np.testing.assert_array_equal(got, want)
