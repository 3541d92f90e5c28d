"""bias_correction, adaround and mixed_precision on real data: each repairs what it claims on
held-out digits (output SNR against float), and each keeps the model a valid QDQ model that ORT
runs and lowering takes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from qgraph.annotations import read_quantizers
from qgraph.api import apply_pipeline
from qgraph.errors import ConfigError
from qgraph.graph import QModel
from qgraph.lowering import lower_model
from qgraph.models.builders import build_model
from qgraph.models.datasets import load_dataset
from qgraph.pipeline import PassContext, parse_pipeline, run_pass, run_pipeline
from qgraph.qparams import bypassed
from qgraph.runner import run_model


def snr_db(reference, test):
    a, b = reference.astype(np.float64), test.astype(np.float64)
    return float(10 * np.log10((a ** 2).sum() / ((a - b) ** 2).sum()))


def cosine(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def digits():
    train, val = load_dataset("mnist", "train"), load_dataset("mnist", "val")
    return {"input": train["input"][:256], "labels": train["labels"][:256]}, {"input": val["input"][:200]}


@pytest.fixture(scope="module")
def w4(digits):
    calib, _ = digits
    return {name: apply_pipeline(build_model(name), "ptq", {"input": calib["input"]}, weight_bits=4)
            for name in ("resnet", "mobilenetv2")}


def _float_logits(qdq: onnx.ModelProto, val) -> np.ndarray:
    return run_model(bypassed(QModel.from_onnx(qdq)).to_onnx(), val)["logits"]


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2"])
def test_bias_correction_moves_layer_means_onto_float_and_helps_held_out_outputs(name, w4, digits):
    calib, val = digits
    model = QModel.from_onnx(w4[name])
    report = run_pass(model, "bias_correction", {"iterations": 2}, PassContext(data=calib))
    first, second = report["largest_shift"]
    assert report["changed"] >= 10 and first > 0.01
    # The second sweep measures what the first corrected: nothing left but a floor of ~1e-3 of the
    # first shift (resnet: 2.0e-4 of 0.198, the same in a third and fourth sweep): the layers
    # outside the measured wave run as ORT's fused QLinearConv, which rounds their biases to
    # the int32 grid s_x·s_w.
    assert second < 1e-2 * first
    reference = _float_logits(w4[name], val)
    before = snr_db(reference, run_model(w4[name], val)["logits"])
    after = snr_db(reference, run_model(model.to_onnx(), val)["logits"])
    assert after > before + 0.5, (before, after)
    assert not report["reverted"] and report["output_snr_db_after"] > report["output_snr_db_before"]


def test_bias_correction_that_would_move_the_outputs_away_from_float_is_reverted(w4, digits, monkeypatch):
    """A correction is kept only if the outputs end closer to float on the calibration data. A
    mis-measured shift (here: every layer's mean difference reported 3x too large, as a few
    unrepresentative samples could) must leave the model as it was, bit for bit."""
    import qgraph.passes.bias_correction as bc
    calib, val = digits
    measure = bc._channel_means
    calls = []

    def overshooting(model, outputs, ctx, limit):
        means = measure(model, outputs, ctx, limit)
        calls.append(1)
        if len(calls) == 1:            # the float reference
            return means
        return {name: value * 3.0 for name, value in means.items()}
    monkeypatch.setattr(bc, "_channel_means", overshooting)
    model = QModel.from_onnx(w4["resnet"])
    report = run_pass(model, "bias_correction", {}, PassContext(data={"input": calib["input"][:64]}))
    assert report["reverted"] and report["changed"] == 0
    assert report["output_snr_db_after"] < report["output_snr_db_before"]
    assert "reverted" in report["summary"]
    np.testing.assert_array_equal(run_model(model.to_onnx(), val)["logits"], run_model(w4["resnet"], val)["logits"])
    calls.clear()        # revert_if_worse false keeps that same correction, SNR or not
    kept = QModel.from_onnx(w4["resnet"])
    again = run_pass(kept, "bias_correction", {"revert_if_worse": False}, PassContext(data={"input": calib["input"][:64]}))
    assert not again["reverted"] and again["changed"] > 0
    assert again["output_snr_db_after"] == pytest.approx(report["output_snr_db_after"], abs=1e-6)
    assert not np.array_equal(run_model(kept.to_onnx(), val)["logits"], run_model(w4["resnet"], val)["logits"])


def _rounded_codes(proto: onnx.ModelProto, original: onnx.ModelProto) -> list[tuple[np.ndarray, np.ndarray]]:
    """(codes now, round-to-nearest codes of the original weight) per quantized weight of `proto`,
    after checking that the weight lies on its grid (Q/DQ keeps it) and inside the grid's range."""
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    old = {i.name: onnx.numpy_helper.to_array(i) for i in original.graph.initializer}
    pairs = []
    for record in read_quantizers(proto).values():
        if record.kind != "weight":
            continue
        w, s = inits[record.tensor], inits[record.scale]
        s = s.reshape((-1,) + (1,) * (w.ndim - 1)) if record.axis == 0 else s
        codes = w / s
        assert np.allclose(codes, np.rint(codes), atol=1e-3)
        assert codes.min() >= record.qmin - 1e-3 and codes.max() <= record.qmax + 1e-3
        pairs.append((np.rint(codes), np.clip(np.rint(old[record.tensor] / s), record.qmin, record.qmax)))
    return pairs


def _repairs_held_out_outputs(original: onnx.ModelProto, repaired: onnx.ModelProto, val, margin_db: float) -> None:
    reference = _float_logits(original, val)
    before = snr_db(reference, run_model(original, val)["logits"])
    after = snr_db(reference, run_model(repaired, val)["logits"])
    assert after > before + margin_db, (before, after)


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2"])
def test_adaround_keeps_weights_on_grid_and_beats_nearest_on_held_out_outputs(name, w4, digits):
    calib, val = digits
    model = QModel.from_onnx(w4[name])
    report = run_pass(model, "adaround", {"iterations": 200}, PassContext(data=calib))
    assert report["changed"] >= 8 and all(g["gain"] >= 0 for g in report["layers"])
    pairs = _rounded_codes(model.to_onnx(), w4[name])
    assert all(np.abs(codes - nearest).max() <= 1 for codes, nearest in pairs)       # up or down, never further
    assert sum(int((codes != nearest).sum()) for codes, nearest in pairs) > 0
    _repairs_held_out_outputs(w4[name], model.to_onnx(), val, 1.0)


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2"])
def test_gptq_keeps_weights_on_grid_and_beats_nearest_on_held_out_outputs(name, w4, digits):
    calib, val = digits
    model = QModel.from_onnx(w4[name])
    report = run_pass(model, "gptq", {}, PassContext(data=calib))
    assert report["changed"] >= 8 and all(g["gain"] >= 0 for g in report["layers"])
    pairs = _rounded_codes(model.to_onnx(), w4[name])
    # compensation moves weights by more than AdaRound's up-or-down
    assert sum(int((np.abs(codes - nearest) > 1).sum()) for codes, nearest in pairs) > 0
    _repairs_held_out_outputs(w4[name], model.to_onnx(), val, 1.0)


def _random_layer(rng, out_channels=6, k=40, rows=300, group=1):
    """A reconstruction.Layer of a 1x1 Conv with statistics of correlated inputs, X̃ = X + noise."""
    import onnx_graphsurgeon as gs
    from qgraph.annotations import QuantizerRecord
    from qgraph.reconstruction import Layer
    w = rng.normal(size=(out_channels, k // group, 1, 1)).astype(np.float32)
    node = gs.Node("Conv", "conv", attrs={"group": group})
    record = QuantizerRecord(kind="weight", tensor="w", node="conv", bits=4, signed=True, symmetric=True,
                             narrow_range=True, pow2=False, per_channel=True, axis=0, qmin=-7, qmax=7,
                             observer="minmax", nonnegative=False)
    layer = Layer(node, gs.Constant("w", w), record, np.abs(w).reshape(out_channels, -1).max(1) / 7,
                  np.zeros(out_channels, np.int8))
    mix = rng.normal(size=(k, k))
    x = (rng.normal(size=(rows, k)) @ mix).reshape(rows, k, 1, 1).astype(np.float32)
    layer.add(x + 0.05 * rng.normal(size=x.shape).astype(np.float32), x)
    return layer


@pytest.mark.parametrize("group", [1, 4])
def test_gptq_blocked_sweep_equals_the_column_by_column_recurrence(group, monkeypatch):
    """The blocked sweep (later blocks updated by one product per block) is the same arithmetic as
    updating every later column after each rounding, and lowers the reconstruction error."""
    import qgraph.reconstruction as reconstruction
    rng = np.random.default_rng(7)
    layer = _random_layer(rng, out_channels=8, k=40, group=group)
    blocked = []
    for block in (7, 1000):
        monkeypatch.setattr(reconstruction, "BLOCK", block)
        blocked.append(reconstruction.gptq_codes(layer, 0.01, True))
    np.testing.assert_array_equal(blocked[0], blocked[1])
    assert blocked[0].min() >= -7 and blocked[0].max() <= 7
    nearest = layer.error(layer.values(layer.nearest_codes()))
    assert layer.error(layer.values(blocked[0])) < nearest
    # without act order too, and never worse than nearest by much on any ordering
    plain = reconstruction.gptq_codes(layer, 0.01, False)
    assert layer.error(layer.values(plain)) < nearest


def test_mixed_precision_with_gptq_rounding_measures_and_writes_the_same_rounded_weights(w4, digits):
    """`weight_rounding: gptq`: the search measures every 4/8-bit weight rounded by GPTQ, and the
    model it writes holds those same weights: its output cosine on the calibration data is the one
    the search reported, and it beats round-to-nearest on held-out digits."""
    calib, val = digits
    params = {"target": "cosine", "value": 0.99999, "weight_bits": [4], "activation_bits": [8],
              "allow_float": False, "workers": 1}
    reports, protos = {}, {}
    for rounding in ("nearest", "gptq"):
        model = QModel.from_onnx(w4["resnet"])
        reports[rounding] = run_pass(model, "mixed_precision", {**params, "weight_rounding": rounding},
                                     PassContext(data=calib))
        protos[rounding] = model.to_onnx()
    assert reports["gptq"]["gptq_rounded"] >= 8 and "gptq_rounded" not in reports["nearest"]
    assert reports["gptq"]["measured"] > reports["nearest"]["measured"] + 1e-4, (reports["gptq"]["measured"],
                                                                               reports["nearest"]["measured"])
    calib_reference = _float_logits(w4["resnet"], {"input": calib["input"]})
    written = cosine(calib_reference, run_model(protos["gptq"], {"input": calib["input"]})["logits"])
    assert written == pytest.approx(reports["gptq"]["measured"], abs=1e-6)
    reference = _float_logits(w4["resnet"], val)
    held = {r: cosine(reference, run_model(protos[r], val)["logits"]) for r in protos}
    assert held["gptq"] > held["nearest"], held
    for record in read_quantizers(protos["gptq"]).values():      # still on their 4-bit grids
        assert record.kind != "weight" or record.bits == 4


def test_mixed_precision_meets_its_target_with_16_bit_pairs_that_run_and_lower(digits):
    calib, val = digits
    int8 = apply_pipeline(build_model("resnet"), "ptq", {"input": calib["input"]})
    model = QModel.from_onnx(int8)
    report = run_pass(model, "mixed_precision", {"target": "cosine", "value": 0.9999, "workers": 1},
                      PassContext(data=calib))
    assert report["met"] and report["measured"] >= 0.9999
    proto = model.to_onnx()
    onnx.checker.check_model(proto, full_check=True)
    records = read_quantizers(proto)
    assert {r.bits for r in records.values()} <= {4, 8, 16}
    reference = _float_logits(int8, val)
    assert cosine(reference, run_model(proto, val)["logits"]) > cosine(reference, run_model(int8, val)["logits"])
    wide = [r for r in records.values() if r.bits == 16]
    if wide:
        node = next(n for n in proto.graph.node if n.name == wide[0].quantize)
        assert node.domain == "com.microsoft"
        lowered, lowering = lower_model(proto, "qlinear")
        assert lowering["kept_qdq"] and run_model(lowered, val)["logits"].shape == (200, 10)
    # the snippet re-applies the assignment without searching: the same model
    pipe = parse_pipeline(report["snippet"])
    again = QModel.from_onnx(int8)
    run_pipeline(again, pipe, PassContext(data=calib))
    a, b = run_model(proto, val)["logits"], run_model(again.to_onnx(), val)["logits"]
    assert np.array_equal(a, b)


def test_mixed_precision_assign_sets_16_bit_activations_and_float(digits):
    calib, val = digits
    int8 = apply_pipeline(build_model("resnet"), "ptq", {"input": calib["input"]})
    records = read_quantizers(int8)
    act = next(n for n, r in records.items() if r.kind == "activation" and n != "input")
    weight = next(n for n, r in records.items() if r.kind == "weight")
    model = QModel.from_onnx(int8)
    run_pass(model, "mixed_precision", {"assign": {act: 16, weight: "float"}}, PassContext())
    proto = model.to_onnx()
    after = read_quantizers(proto)
    assert after[act].bits == 16 and after[act].qmax in (32767, 65535) and weight not in after
    logits = run_model(proto, val)["logits"]
    reference = _float_logits(int8, val)
    assert snr_db(reference, logits) > snr_db(reference, run_model(int8, val)["logits"])
    with pytest.raises(Exception, match="must be one of"):
        run_pass(QModel.from_onnx(int8), "mixed_precision", {"assign": {act: 4}}, PassContext())


def test_mixed_precision_16_bit_weights_run_lower_and_interpret(digits):
    from qgraph.diff import diff_models
    calib, val = digits
    int8 = apply_pipeline(build_model("resnet"), "ptq", {"input": calib["input"]}, weight_bits=4)
    weights = [n for n, r in read_quantizers(int8).items() if r.kind == "weight"]
    model = QModel.from_onnx(int8)
    run_pass(model, "mixed_precision", {"assign": {w: 16 for w in weights}}, PassContext())
    proto = model.to_onnx()
    onnx.checker.check_model(proto, full_check=True)
    after = read_quantizers(proto)
    assert all(after[w].bits == 16 and after[w].qmax == 32767 and after[w].axis == 0 for w in weights)
    dequantize = {n.input[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    inits = {t.name: t for t in proto.graph.initializer}
    first = next(n for n in proto.graph.node if n.name == after[weights[0]].quantize)
    assert first.domain == "com.microsoft" and dequantize[first.output[0]].domain == "com.microsoft"
    assert onnx.helper.tensor_dtype_to_np_dtype(inits[first.input[2]].data_type) == np.int16
    reference = _float_logits(int8, val)
    logits = run_model(proto, val)["logits"]
    assert snr_db(reference, logits) > snr_db(reference, run_model(int8, val)["logits"]) + 10.0
    lowered, lowering = lower_model(proto, "qlinear")
    assert lowering["kept_qdq"]
    # the float convolutions the 16-bit weights leave agree with ORT within diff's tolerance
    assert diff_models(lowered, {"input": val["input"][:32]}, per_layer=True).passed


def test_mixed_precision_searches_only_the_widths_it_is_given(digits):
    calib, _ = digits
    int8 = apply_pipeline(build_model("resnet"), "ptq", {"input": calib["input"]})
    before = read_quantizers(int8)
    model = QModel.from_onnx(int8)
    report = run_pass(model, "mixed_precision", {"target": "cosine", "value": 0.9999, "allow_float": False,
                                                 "weight_bits": [8], "workers": 1}, PassContext(data=calib))
    after = read_quantizers(model.to_onnx())
    assert set(after) == set(before) and report["weight_bytes_8bit_or_less"] == report["weight_bytes"]
    assert all(after[n].bits == 8 for n, r in before.items() if r.kind == "weight")
    assert {after[n].bits for n, r in before.items() if r.kind == "activation"} <= {8, 16}
    with pytest.raises(ConfigError, match="weight_bits must be a non-empty list of"):
        run_pass(QModel.from_onnx(int8), "mixed_precision", {"weight_bits": [3]}, PassContext(data=calib))


def test_mixed_precision_16_bit_activations_cover_the_range_the_data_reach(digits):
    from qgraph import quant
    from qgraph.runner import Runner
    calib, _ = digits
    int8 = apply_pipeline(build_model("resnet"), "ptq", {"input": calib["input"]})   # percentile ranges
    records = read_quantizers(int8)
    nodes = {n.name: n for n in int8.graph.node}
    sources = {n: nodes[r.quantize].input[0] for n, r in records.items() if r.kind == "activation" and n != "input"}
    values = Runner(bypassed(QModel.from_onnx(int8)).to_onnx(), list(sources.values())).run(
        {"input": calib["input"]})

    def grid(proto, name):
        node = next(n for n in proto.graph.node if n.name == read_quantizers(proto)[name].quantize)
        init = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
        return init[node.input[1]], init[node.input[2]]

    # an activation whose 8-bit range clips values the data reach
    lo8, hi8 = {}, {}
    for name in sources:
        r = records[name]
        lo8[name], hi8[name] = quant.grid_bounds(*grid(int8, name), r.qmin, r.qmax)

    def seen(name):   # what the readers see: ahead-ReLU quantizers cover [0, max], capped ones [.., cap]
        r = records[name]
        return np.clip(values[sources[name]], 0.0 if r.nonnegative else -np.inf,
                       np.inf if r.range_cap is None else r.range_cap)
    act = max(sources, key=lambda n: float(seen(n).max() - hi8[n]))
    x = seen(act)
    assert x.max() > hi8[act]
    widened = QModel.from_onnx(int8)
    run_pass(widened, "mixed_precision", {"assign": {act: 16}}, PassContext(data=calib))
    kept = QModel.from_onnx(int8)
    run_pass(kept, "mixed_precision", {"assign": {act: 16}}, PassContext())   # no data: the 8-bit range
    r16 = read_quantizers(widened.to_onnx())[act]
    scale, zp = grid(widened.to_onnx(), act)
    lo, hi = quant.grid_bounds(scale, zp, r16.qmin, r16.qmax)
    assert lo <= min(float(x.min()), float(lo8[act])) + 1e-6 and hi >= float(x.max()) - 1e-6
    # nothing clips: every value is within half a step of its 16-bit code
    error = np.abs(quant.fake_quantize(x, scale, zp, r16.qmin, r16.qmax) - x)
    assert error.max() <= float(scale) / 2 * 1.01     # float32 arithmetic on x/s
    scale_kept, zp_kept = grid(kept.to_onnx(), act)
    assert np.isclose(quant.grid_bounds(scale_kept, zp_kept, r16.qmin, r16.qmax)[1], hi8[act], rtol=1e-4)
    clipped = np.abs(quant.fake_quantize(x, scale_kept, zp_kept, r16.qmin, r16.qmax) - x)
    assert clipped.max() > error.max() * 10


def test_mixed_precision_16_bit_widening_is_limited_by_outliers(digits):
    from qgraph import quant
    from qgraph.passes.mixed_precision import WIDEN_LIMIT
    calib, _ = digits
    int8 = apply_pipeline(build_model("resnet"), "ptq", {"input": calib["input"]})
    record = read_quantizers(int8)["input"]
    outlier = {"input": calib["input"].copy()}
    outlier["input"][0, 0, 0, 0] = 1e6          # one pixel far outside anything the grid covers

    def bounds(proto):
        r = read_quantizers(proto)["input"]
        node = next(n for n in proto.graph.node if n.name == r.quantize)
        init = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
        return [float(v) for v in quant.grid_bounds(init[node.input[1]], init[node.input[2]], r.qmin, r.qmax)]
    lo8, hi8 = bounds(int8)
    model = QModel.from_onnx(int8)
    run_pass(model, "mixed_precision", {"assign": {"input": 16}}, PassContext(data=outlier))
    lo, hi = bounds(model.to_onnx())
    assert record.bits == 8 and lo8 <= float(calib["input"].min())
    # the top grows by (WIDEN_LIMIT - 1)/2 of the 8-bit width, not to 1e6; the bottom covers the data already
    assert hi == pytest.approx(hi8 + (WIDEN_LIMIT - 1) / 2 * (hi8 - lo8), rel=1e-3)
    assert lo == pytest.approx(lo8, abs=1e-3 * (hi8 - lo8))


def test_mixed_precision_bitops_counts_macs_times_weight_and_input_bits(digits):
    calib, _ = digits
    int8 = apply_pipeline(build_model("resnet"), "ptq", {"input": calib["input"]})
    model = QModel.from_onnx(int8)
    report = run_pass(model, "mixed_precision", {"target": "cosine", "value": 0.999, "cost": "bitops"},
                      PassContext(data=calib))
    # MACs per sample from ONNX shape inference on the float model: every Conv/Gemm is 8x8-bit before
    float_model = onnx.shape_inference.infer_shapes(build_model("resnet"))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in
              list(float_model.graph.value_info) + list(float_model.graph.output)}
    inits = {i.name: list(i.dims) for i in float_model.graph.initializer}
    macs = 0
    for node in float_model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            w = inits[node.input[1]]
            out = shapes[node.output[0]]
            macs += int(np.prod(out[1:])) * int(np.prod(w[1:]))
    assert report["cost"] == "bitops" and report["cost_before"] == 64 * macs
    assert report["met"]


def test_16_bit_pairs_train_as_fake_quant_and_come_back(digits):
    from qgraph.fakequant import to_qdq_form, to_training_form
    calib, val = digits
    int8 = apply_pipeline(build_model("resnet"), "ptq", {"input": calib["input"]})
    act = next(n for n, r in read_quantizers(int8).items() if r.kind == "activation" and n != "input")
    model = QModel.from_onnx(int8)
    run_pass(model, "mixed_precision", {"assign": {act: 16}}, PassContext())
    wide = model.to_onnx()
    training, _ = to_training_form(wide)
    ranges = [(a.i for a in n.attribute) for n in training.graph.node if n.op_type == "FakeQuant"]
    assert ranges and not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in training.graph.node)
    assert any({a.name: a.i for a in n.attribute}.get("quant_max") in (32767, 65535)
               for n in training.graph.node if n.op_type == "FakeQuant")
    back = to_qdq_form(training)
    assert np.array_equal(run_model(back, val)["logits"], run_model(wide, val)["logits"])


def test_model_bytes_cost_counts_weights_and_lets_activation_bytes_only_break_ties():
    from types import SimpleNamespace
    from qgraph.passes.mixed_precision import TIE_BREAK, CostModel
    records = {"w": SimpleNamespace(kind="weight"), "a": SimpleNamespace(kind="activation")}   # what it reads
    elements = {"w": 1000, "a": 50000}
    chosen = {"w": 8, "a": 8}
    bytes_cost, model_bytes = CostModel("bytes", records, elements, []), CostModel("model_bytes", records, elements, [])
    assert bytes_cost.delta(chosen, "a", 16) == 50000 and bytes_cost.delta(chosen, "w", 16) == 1000
    assert model_bytes.delta(chosen, "w", 16) == 1000 and model_bytes.delta(chosen, "a", 16) == 50000 * TIE_BREAK
    assert model_bytes.total(chosen) == 1000 + 50000 * TIE_BREAK


def test_clipping_search_narrows_heavy_tailed_channels_and_never_reconstructs_worse():
    """reconstruction.clipped_codes: each output channel keeps the ratio whose GPTQ sweep reconstructs
    it best. Heavy-tailed weights (Student-t, as trained weights are) take narrower scales on some
    channels, each of those with a lower error than the sweep on its calibrated min/max scale; no
    channel ends worse (ratio 1.0 is a candidate)."""
    from qgraph.passes.gptq import CLIP_RATIOS
    from qgraph.reconstruction import clipped_codes, gptq_codes
    rng = np.random.default_rng(3)
    layer = _random_layer(rng, out_channels=16, k=40)
    layer.w = rng.standard_t(2, size=layer.w.shape).astype(np.float32)
    layer.scale = (np.abs(layer.w).reshape(16, -1).max(1) / 7).astype(np.float32)
    sweep = lambda grid: gptq_codes(grid, 0.01, True)   # noqa: E731
    plain = layer.channel_errors(layer.values(sweep(layer)))[0]
    codes, scale = clipped_codes(layer, sweep, CLIP_RATIOS)
    clipped = layer.on_grid(scale, layer.zp, -7, 7)
    errors = clipped.channel_errors(clipped.values(codes))[0]
    ratios = scale / layer.scale
    assert all(np.isclose(r, CLIP_RATIOS, atol=1e-6).any() for r in ratios)
    narrowed = ratios < 1
    assert narrowed.sum() >= 4 and np.all(errors[narrowed] < plain[narrowed])
    assert np.allclose(errors[~narrowed], plain[~narrowed])
    assert codes.min() >= -7 and codes.max() <= 7


def test_gptq_clip_search_writes_narrowed_scales_to_the_weight_quantizers(w4, digits):
    """On 4-bit weights `clip_search: auto` narrows some channels' scales (to one of CLIP_RATIOS of
    the calibrated scale) in the Q/DQ pair itself, the weights lie on the new grid, and the model
    lowers and runs in ORT; `off` keeps every scale."""
    from qgraph.passes.gptq import CLIP_RATIOS
    calib, val = digits
    scales = {}
    for mode in ("auto", "off"):
        model = QModel.from_onnx(w4["resnet"])
        report = run_pass(model, "gptq", {"clip_search": mode}, PassContext(data=calib))
        proto = model.to_onnx()
        _rounded_codes(proto, w4["resnet"])                       # on the grid of the scales written
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
        before = {i.name: onnx.numpy_helper.to_array(i) for i in w4["resnet"].graph.initializer}
        records = [r for r in read_quantizers(proto).values() if r.kind == "weight"]
        scales[mode] = [inits[r.scale] / before[r.scale] for r in records]
        if mode == "auto":
            assert any(g.get("clipped_channels") for g in report["layers"]) and "clipped" in report["summary"]
    ratios = np.concatenate([r.ravel() for r in scales["auto"]])
    assert all(np.isclose(r, CLIP_RATIOS, atol=1e-6).any() for r in ratios) and (ratios < 1).sum() > 10
    assert all(np.all(r == 1) for r in scales["off"])
    lowered, _ = lower_model(model.to_onnx(), "qlinear")
    assert run_model(lowered, {"input": val["input"][:8]})["logits"].shape == (8, 10)
