"""calibrate: scales from streamed data equal NumPy over all the data; QDQ in ORT equals
quant.fake_quantize; bad data fails before any work."""

from __future__ import annotations

import numpy as np
import pytest

from qgraph.annotations import CALIBRATED, FIX_ACTIVATIONS, get_annotation
from qgraph.errors import DataError, PassError
from qgraph.graph import QModel
from qgraph.models.builders import build_model
from qgraph.models.datasets import load_dataset
from qgraph.passes.calibrate import bypassed
from qgraph.annotations import read_quantizers
from qgraph.pipeline import PassContext, run_pass
from qgraph.quant import fake_quantize, scale_zero_point
from qgraph.runner import run_concatenated, run_model
from onnx import numpy_helper


@pytest.fixture(scope="module")
def data():
    return {"input": load_dataset("mnist", "val")["input"][:192]}


def _qdq(name: str, mode: str = "fold", **params) -> QModel:
    m = QModel.from_onnx(build_model(name))
    run_pass(m, "canonicalize")
    run_pass(m, "fuse_conv_bn", {"mode": mode})
    run_pass(m, "ahead_relu")
    run_pass(m, "insert_qdq", params)
    return m


def _calibrate(m: QModel, data, batch_size=64, **params):
    return run_pass(m, "calibrate", {"progress": False, **params}, PassContext(data=data, batch_size=batch_size))


def _qparams(m: QModel, record):
    q = {n.name: n for n in m.graph.nodes}[record.quantize]
    return np.asarray(q.inputs[1].values), np.asarray(q.inputs[2].values)


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2"])
def test_minmax_scales_equal_numpy_over_all_data(name, data):
    m = _qdq(name)
    float_values = run_concatenated(bypassed(m).to_onnx(), data, 64,
                                    [t for t, r in read_quantizers(m).items()
                                     if r.kind == "activation" and t != "input"])
    float_values["input"] = data["input"]
    report = _calibrate(m, data, batch_size=50)  # batches that do not divide the data
    assert report["samples"] == 192 and report["batches"] == 4
    assert get_annotation(m, CALIBRATED) is True
    for t, r in read_quantizers(m).items():
        if r.kind != "activation":
            continue
        x = float_values[t].astype(np.float64)
        if r.nonnegative:
            x = np.clip(x, 0, r.range_cap if r.range_cap is not None else np.inf)
        expected = scale_zero_point(x.min(), x.max(), r.bits, r.signed, r.symmetric,
                                    r.narrow_range, r.pow2)
        scale, zp = _qparams(m, r)
        np.testing.assert_allclose(scale, expected[0], rtol=1e-6, err_msg=t)
        assert int(zp) == int(expected[1]), t


def test_qdq_in_ort_equals_fake_quantize_and_logits_stay_close(data):
    m = _qdq("resnet")
    ref = run_model(m.copy().to_onnx(), data)  # before calibration, to check it changes
    _calibrate(m, data)
    proto = m.to_onnx()
    records = read_quantizers(m)
    nodes = {n.name: n for n in m.graph.nodes}
    names = [t for t, r in records.items() if r.kind == "activation" and t not in ("input", "logits_float")]
    dq_names = [nodes[records[t].dequantize].outputs[0].name for t in names]
    values = run_model(proto, data, names + dq_names + ["logits"], optimize=False)
    for t, dq in zip(names, dq_names):
        r = records[t]
        scale, zp = _qparams(m, r)
        expected = fake_quantize(values[t], scale, zp, r.qmin, r.qmax)
        np.testing.assert_array_equal(values[dq], expected, err_msg=t)
    float_logits = run_model(bypassed(m).to_onnx(), data)["logits"]
    q = values["logits"]
    cos = float(np.sum(q * float_logits) / np.linalg.norm(q) / np.linalg.norm(float_logits))
    assert cos > 0.999
    assert not np.allclose(ref["logits"], q)


def test_moving_average_follows_batches(data):
    m = _qdq("mlp", activations={"observer": "moving_average", "averaging_constant": 0.5})
    _calibrate(m, data, batch_size=64)
    r = read_quantizers(m)["input"]
    lo, hi = None, None
    for start in range(0, 192, 64):
        b = data["input"][start:start + 64]
        if lo is None:
            lo, hi = float(b.min()), float(b.max())
        else:
            lo, hi = lo + 0.5 * (float(b.min()) - lo), hi + 0.5 * (float(b.max()) - hi)
    expected = scale_zero_point(lo, hi, 8, False, False)
    scale, zp = _qparams(m, r)
    np.testing.assert_allclose(scale, expected[0], rtol=1e-6)


@pytest.mark.parametrize("observer", ["percentile", "entropy", "mse"])
def test_histogram_observers_give_ranges_inside_minmax(observer, data):
    m = _qdq("lenet")
    minmax = _calibrate(m.copy(), data)["ranges"]
    report = _calibrate(m, data, observer=observer)
    for t, (lo, hi) in report["ranges"].items():
        assert minmax[t][0] - 1e-5 <= lo <= hi <= minmax[t][1] + 1e-5, t
    run_model(m.to_onnx(), data)


def test_forward_fused_weights_are_evaluated_and_fix_activations_flag(data):
    m = _qdq("resnet", mode="forward")
    report = _calibrate(m, data, fix_activations=True, max_samples=64)
    assert report["samples"] == 64 and get_annotation(m, FIX_ACTIVATIONS) is True
    folded = QModel.from_onnx(build_model("resnet"))
    run_pass(folded, "fuse_conv_bn", {"mode": "fold"})
    fold_w = {n.name: n.inputs[1].values for n in folded.graph.nodes if n.op == "Conv"}
    checked = 0
    for r in read_quantizers(m).values():
        if r.kind == "weight" and r.node in fold_w:
            w = fold_w[r.node]
            scale, _ = _qparams(m, r)
            np.testing.assert_allclose(scale, np.abs(w).reshape(len(w), -1).max(1) / 127, rtol=1e-5)
            checked += 1
    assert checked == 9


def test_calibrating_twice_gives_the_same_scales(data):
    m = _qdq("lenet")
    _calibrate(m, data)
    first = {t: _qparams(m, r)[0].copy() for t, r in read_quantizers(m).items()}
    _calibrate(m, data)
    for t, r in read_quantizers(m).items():
        np.testing.assert_array_equal(first[t], _qparams(m, r)[0])


def test_constant_tensor_gets_a_valid_scale_and_a_warning():
    m = _qdq("mlp")
    report = _calibrate(m, {"input": np.zeros((8, 1, 28, 28), np.float32)})
    assert any("'input'" in w and "constant" in w for w in report["warnings"])
    scale, _ = _qparams(m, read_quantizers(m)["input"])
    assert np.isfinite(scale) and scale > 0
    assert np.all(np.isfinite(run_model(m.to_onnx(), {"input": np.ones((2, 1, 28, 28), np.float32)})["logits"]))


def test_progress_bar_only_on_a_terminal(data, capsys, monkeypatch):
    import io
    m = _qdq("mlp")
    run_pass(m, "calibrate", {}, PassContext(data=data, batch_size=64))
    assert capsys.readouterr().err == ""  # captured stderr is not a terminal: logs stay clean
    terminal = io.StringIO()
    terminal.isatty = lambda: True
    monkeypatch.setattr("sys.stderr", terminal)
    run_pass(_qdq("mlp"), "calibrate", {}, PassContext(data=data, batch_size=64))
    assert "calibrate [" in terminal.getvalue() and "3/3 batches" in terminal.getvalue()


def test_bad_data_fails_before_any_work(data):
    m = _qdq("mlp")
    bad = data["input"].copy()
    bad[130, 0, 3, 3] = np.nan
    with pytest.raises(DataError, match=r"'input' holds NaN at sample 130"):
        _calibrate(m, {"input": bad})
    with pytest.raises(DataError, match="missing input 'input'"):
        _calibrate(m, {"image": data["input"]})
    with pytest.raises(DataError, match="shape"):
        _calibrate(m, {"input": data["input"][:, :, :14]})
    with pytest.raises(DataError, match="dtype"):
        _calibrate(m, {"input": data["input"].astype(np.float64)})
    with pytest.raises(PassError, match="calibration data"):
        run_pass(m, "calibrate", {"progress": False}, PassContext())
    with pytest.raises(PassError, match="run insert_qdq first"):
        run_pass(QModel.from_onnx(build_model("mlp")), "calibrate", {}, PassContext(data=data))
    assert get_annotation(m, CALIBRATED) is False


def test_fixed_range_is_kept(data):
    conv = next(n.name for n in QModel.from_onnx(build_model("lenet")).graph.nodes if n.op == "Conv")
    m = _qdq("lenet", rules=[{"name": conv, "activations": {"fixed_range": [0.0, 2.0]}}])
    report = _calibrate(m, data)
    r = read_quantizers(m)["input"]
    assert r.fixed_range == [0.0, 2.0] and report["ranges"]["input"] == [0.0, 2.0]
    scale, zp = _qparams(m, r)
    assert scale == np.float32(2.0 / 255) and int(zp) == 0


@pytest.mark.parametrize("observer", ["minmax", "percentile", "entropy", "mse"])
def test_calibration_sharded_over_two_workers_gives_identical_scales(observer, data):
    def scales(**params):
        model = QModel.from_onnx(build_model("mobilenetv2"))
        ctx = PassContext(data=data, batch_size=32)
        run_pass(model, "insert_qdq", {"activations": {"observer": observer}}, ctx)
        run_pass(model, "calibrate", {"progress": False, **params}, ctx)
        return {i.name: numpy_helper.to_array(i) for i in model.to_onnx().graph.initializer
                if i.name.endswith(("_scale", "_zero_point"))}
    one, two = scales(), scales(workers=2)
    assert one.keys() == two.keys() and len(one) > 20
    assert all(np.array_equal(one[k], two[k]) for k in one)


def test_moving_average_does_not_shard_and_says_so(data):
    model = QModel.from_onnx(build_model("lenet"))
    ctx = PassContext(data=data, batch_size=32)
    run_pass(model, "insert_qdq", {"activations": {"observer": "moving_average"}}, ctx)
    report = run_pass(model, "calibrate", {"progress": False, "workers": 2}, ctx)
    assert any("one process" in w for w in report["warnings"])


def test_percentile_search_keeps_the_candidate_closest_to_float(data):
    """Each candidate's SNR is that of the model calibrated at that percentile alone; the kept
    scales are exactly those of the best candidate."""
    from qgraph.errors import ConfigError
    calib = {"input": data["input"][:64]}
    m = _qdq("resnet", activations={"observer": "percentile", "percentile": 99.999})
    float_logits = run_model(bypassed(m).to_onnx(), calib)["logits"].astype(np.float64)
    candidates = [97.0, 99.9, 100.0]
    searched = _calibrate(m.copy(), calib, percentiles=candidates, search_samples=64)
    found = searched["percentile_search"]
    assert set(found["output_snr_db"]) == set(candidates)
    alone = {}
    for p in candidates:
        single = m.copy()
        _calibrate(single, calib, observer_params={"percentile": p})
        got = run_model(single.to_onnx(), calib)["logits"].astype(np.float64)
        alone[p] = (single, 10 * np.log10((float_logits ** 2).sum() / ((got - float_logits) ** 2).sum()))
        assert found["output_snr_db"][p] == pytest.approx(alone[p][1], abs=2e-3)
    best = max(candidates, key=lambda p: alone[p][1])
    assert found["chosen"] == best and len({round(v, 1) for _, v in alone.values()}) == 3
    chosen = _qdq("resnet", activations={"observer": "percentile", "percentile": 99.999})
    _calibrate(chosen, calib, percentiles=candidates, search_samples=64)
    for record in read_quantizers(chosen.to_onnx()).values():
        if record.kind == "activation":
            for a, b in zip(_qparams(chosen, record), _qparams(alone[best][0], record)):
                np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="percentiles must be numbers in"):
        _calibrate(m.copy(), calib, percentiles=[101])


def _ptq_doc(ahead_clamped: bool) -> dict:
    import yaml
    from qgraph.api import bundled_pipeline
    doc = yaml.safe_load(open(bundled_pipeline("ptq")).read())
    for step in doc["passes"]:
        if "ahead_relu" in step:
            step["ahead_relu"] = {"ahead_clamped": ahead_clamped}
    return doc


def test_clamped_activation_inputs_get_finer_grids_that_reach_past_the_flat_bound():
    """ptq.yaml on a Paddle-exported PP-LCNet: each HardSwish input that ahead_relu bounded at -3
    (and each HardSigmoid input, at ±3) gets a grid whose end level lies within two steps beyond
    the bound where the data cross it (values clamped there land where the function is exactly
    flat), a finer step than without the bounds, and an activation output closer to float on the
    calibration data."""
    from qgraph.api import apply_pipeline
    from qgraph.idioms import evaluate_function, flat_bounds, unary_regions
    from qgraph.models import exported
    from qgraph.quant import grid_bounds
    shape = (3, 48, 96)
    proto = exported.pplcnet_paddle(input_shape=shape, num_classes=10)
    data = {"x": exported.probe_batch(shape, seed=5, count=16)}
    on, off = (apply_pipeline(proto, _ptq_doc(flag), data, batch_size=8) for flag in (True, False))
    records_on, records_off = read_quantizers(on), read_quantizers(off)
    bounded = {t: r for t, r in records_on.items() if r.range_floor is not None}
    assert len(bounded) >= 10 and all(records_off[t].range_floor is None for t in bounded)
    float_form = bypassed(QModel.from_onnx(on))
    regions = {r.input: r for r in unary_regions(float_form)}
    values = run_model(float_form.to_onnx(), data, list(bounded))
    finer = 0
    for t, r in bounded.items():
        region = regions[t]
        lo, hi = flat_bounds(float_form, region)
        assert (r.range_floor, r.range_cap) == (lo, None if hi == np.inf else hi), t
        (s_on, z_on), (s_off, z_off) = (_qparams(QModel.from_onnx(m), rec[t]) for m, rec in
                                        ((on, records_on), (off, records_off)))
        lowest, highest = (float(v) for v in grid_bounds(s_on, z_on, r.qmin, r.qmax))
        x = values[t].astype(np.float32)
        if x.min() < lo:
            assert lo - 2 * float(s_on) <= lowest <= lo, (t, lowest, float(s_on))
        if r.range_cap is not None and x.max() > hi:
            assert hi <= highest <= hi + 2 * float(s_on), (t, highest, float(s_on))
        nodes = [float_form.node(n) for n in region.nodes]

        def f(v):
            return evaluate_function(nodes, region.input, region.output, v)
        err_on = np.mean((f(fake_quantize(x, s_on, z_on, r.qmin, r.qmax)) - f(x)) ** 2)
        err_off = np.mean((f(fake_quantize(x, s_off, z_off, r.qmin, r.qmax)) - f(x)) ** 2)
        assert err_on <= 1.05 * err_off, (t, region.kind, err_on, err_off)
        finer += bool(s_on < 0.8 * s_off and err_on < 0.8 * err_off)
    assert finer >= len(bounded) // 2


def test_model_with_nothing_to_quantize_says_so():
    """A model of a Sigmoid alone (PyTorch's exported nn.Sigmoid): insert_qdq runs and places no
    quantizer; calibrate says why instead of asking to run insert_qdq."""
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Sigmoid", ["x"], ["y"])], "sigmoid",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = QModel.from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    run_pass(model, "insert_qdq")
    with pytest.raises(PassError, match=r"^calibrate: insert_qdq placed no quantizer: the model has no Conv, "
                                        r"ConvTranspose, Gemm or MatMul to quantize"):
        run_pass(model, "calibrate", {"progress": False},
                 PassContext(data={"x": np.zeros((2, 4), np.float32)}))
    fresh = QModel.from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(PassError, match="no qgraph quantizers; run insert_qdq"):
        run_pass(fresh, "calibrate", {"progress": False}, PassContext(data={"x": np.zeros((2, 4), np.float32)}))
