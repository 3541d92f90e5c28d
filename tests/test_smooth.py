"""smooth (SmoothQuant): outputs preserved on real data, LayerNorm outliers moved into the weights
(and quantization error lowered by it), sites it must not touch declined, bad input refused."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph.api import apply_pipeline
from qgraph.errors import ConfigError, PassError
from qgraph.graph import QModel
from qgraph.models.datasets import load_dataset
from qgraph.pipeline import PassContext, run_pass
from qgraph.runner import run_model

TOKENS, FEATURES, DIM, OUT = 28, 28, 48, 24
QUANTIZE = [{"insert_qdq": {}}, {"calibrate": {}}]


@pytest.fixture(scope="module")
def digits():
    """MNIST digits as sequences: 28 rows of 28 pixels, a token per row (calibration, held out)."""
    train, val = load_dataset("mnist", "train"), load_dataset("mnist", "val")
    return ({"input": train["input"][:64].reshape(-1, TOKENS, FEATURES)},
            {"input": val["input"][:128].reshape(-1, TOKENS, FEATURES)})


def layernorm_net(head: str = "MatMul", outliers: int = 3, pooled: bool = False, seed: int = 0) -> onnx.ModelProto:
    """tokens → MatMul → LayerNormalization (γ with `outliers` channels at 12, as trained
    transformers have) → head: MatMul [DIM, OUT], or Gemm with transB (on the tokens' mean when
    `pooled`, a 2-D input)."""
    rng = np.random.default_rng(seed)
    gamma = rng.uniform(0.5, 1.5, DIM).astype(np.float32)
    gamma[rng.choice(DIM, outliers, replace=False)] = 12.0
    inits = [numpy_helper.from_array(rng.normal(0, FEATURES ** -0.5, (FEATURES, DIM)).astype(np.float32), "w0"),
             numpy_helper.from_array(gamma, "gamma"),
             numpy_helper.from_array(rng.normal(0, 0.2, DIM).astype(np.float32), "beta")]
    nodes = []
    x = "input"
    if pooled:
        nodes.append(helper.make_node("ReduceMean", [x], ["pooled"], axes=[1], keepdims=0))
        x = "pooled"
    nodes += [helper.make_node("MatMul", [x, "w0"], ["h"]),
              helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["ln"], axis=-1, epsilon=1e-5)]
    w1 = rng.normal(0, DIM ** -0.5, (DIM, OUT)).astype(np.float32)
    if head == "MatMul":
        inits.append(numpy_helper.from_array(w1, "w1"))
        nodes.append(helper.make_node("MatMul", ["ln", "w1"], ["y"]))
    else:
        inits += [numpy_helper.from_array(np.ascontiguousarray(w1.T), "w1"),
                  numpy_helper.from_array(rng.normal(0, 0.1, OUT).astype(np.float32), "b1")]
        nodes.append(helper.make_node("Gemm", ["ln", "w1", "b1"], ["y"], transB=1))
    out = "y"
    graph = helper.make_graph(nodes, "ln_net", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                ["N", TOKENS, FEATURES])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def smoothed(model: onnx.ModelProto, data: dict, **params) -> tuple[onnx.ModelProto, dict]:
    qmodel = QModel.from_onnx(model)
    report = run_pass(qmodel, "smooth", params, PassContext(data=data, batch_size=16))
    return qmodel.to_onnx(), report


def relative_error(reference: np.ndarray, got: np.ndarray) -> float:
    return float(np.linalg.norm(got - reference) / np.linalg.norm(reference))


def ln_channel_spread(model: onnx.ModelProto, data: dict) -> float:
    """Largest over median per-channel max |LayerNorm output| on `data`."""
    peaks = np.abs(run_model(model, data, ["ln"])["ln"]).reshape(-1, DIM).max(axis=0)
    return float(peaks.max() / np.median(peaks))


@pytest.mark.parametrize("head,pooled,gain", [("MatMul", False, 0.6),     # measured 0.0340 -> 0.0137
                                              ("Gemm", True, 0.9)])       # 0.0334 -> 0.0275
def test_smooth_keeps_outputs_and_moves_layernorm_outliers_into_the_weights(digits, head, pooled, gain):
    """Outputs unchanged on held-out digits; the LayerNorm output's outlier channels shrink toward
    the others; and the quantized model (W8A8, insert_qdq + calibrate) gets closer to float (its
    relative output error at most `gain` times the one without)."""
    calib, held = digits
    model = layernorm_net(head, pooled=pooled)
    after, report = smoothed(model, calib)
    assert report["changed"] == 1 and not report["skipped"]
    site, = report["alpha"]
    assert report["local_error"][site]["chosen"] < report["local_error"][site]["none"]
    reference = run_model(model, held)["y"]
    np.testing.assert_allclose(run_model(after, held)["y"], reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    assert ln_channel_spread(after, held) < ln_channel_spread(model, held) / 2
    plain = run_model(apply_pipeline(model, QUANTIZE, calib), held)["y"]
    smooth = run_model(apply_pipeline(after, QUANTIZE, calib), held)["y"]
    assert relative_error(reference, smooth) < gain * relative_error(reference, plain)


def test_smooth_reads_through_a_gather_of_the_class_token(digits):
    """ViT's head reads its LayerNorm output through a Gather of token 0 (axis 1): the channels
    stay the last axis, so the Gather passes and the head's weight is scaled; a Gather on the last
    axis would not."""
    calib, held = digits
    model = layernorm_net()
    graph = model.graph
    graph.node[-1].input[0] = "cls"
    graph.node.insert(len(graph.node) - 1, helper.make_node("Gather", ["ln", "zero"], ["cls"], axis=1))
    graph.initializer.append(numpy_helper.from_array(np.array(0, np.int64), "zero"))
    after, report = smoothed(model, calib)
    assert report["changed"] == 1
    np.testing.assert_allclose(run_model(after, held)["y"], run_model(model, held)["y"], rtol=1e-4, atol=1e-4)
    graph.node[-2].attribute[0].i = 2                                     # Gather on the channels
    model.graph.value_info.clear()
    _, report = smoothed(onnx.shape_inference.infer_shapes(model), calib)
    assert report["changed"] == 0 and "Gather" in report["skipped"][0]["reason"]


def test_smooth_declines_a_layernorm_whose_output_feeds_anything_but_its_layers(digits):
    """A LayerNorm output also read by an Add (a residual) cannot be rescaled: skipped, naming the reader."""
    calib, _ = digits
    model = layernorm_net()
    model.graph.node.append(helper.make_node("Add", ["ln", "ln"], ["twice"]))
    model.graph.output.append(helper.make_tensor_value_info("twice", TensorProto.FLOAT, None))
    before = {i.name: numpy_helper.to_array(i).copy() for i in model.graph.initializer}
    after, report = smoothed(model, calib)
    assert report["changed"] == 0
    assert "Add" in report["skipped"][0]["reason"] and "twice" not in report["skipped"][0]["reason"]
    for init in after.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(init), before[init.name])


def test_smooth_needs_data_only_where_it_finds_a_site(digits):
    calib, _ = digits
    model = layernorm_net()
    with pytest.raises(PassError, match="smooth needs calibration data"):
        run_pass(QModel.from_onnx(model), "smooth", {}, PassContext())
    no_layernorm = onnx.ModelProto()
    no_layernorm.CopyFrom(model)
    del no_layernorm.graph.node[1]
    no_layernorm.graph.node[-1].input[0] = "h"
    report = run_pass(QModel.from_onnx(no_layernorm), "smooth", {}, PassContext())
    assert report["changed"] == 0


@pytest.mark.parametrize("alphas", [[], [1.5], [0.0], ["half"], 0.5])
def test_smooth_refuses_alphas_outside_the_open_unit_interval(digits, alphas):
    with pytest.raises(ConfigError, match="alphas"):
        smoothed(layernorm_net(), digits[0], alphas=alphas)


def test_analyze_points_at_smooth_for_the_layernorm_outliers(digits):
    """`qgraph analyze` on the W8A8 model without smoothing: the LayerNorm output's quantizer costs
    the most, its largest channel peaks far past the median one, and the hint names `smooth`;
    smoothed first (and analyzed against the same float model), that quantizer's local and
    cumulative SNR rise."""
    from qgraph.analyze import analyze_models, repair_hints
    calib, held = digits
    model = layernorm_net()
    reports = {}
    for tag, source in (("plain", model), ("smoothed", smoothed(model, calib)[0])):
        reports[tag] = analyze_models(model, apply_pipeline(source, QUANTIZE, calib), held, batch_size=32)
    plain = reports["plain"]
    assert plain["sensitivity"][0]["group"] == "ln"
    ln = next(q for q in plain["quantizers"] if q["name"] == "ln")
    assert ln["producer"] == "LayerNormalization" and ln["channel_spread"] >= 4
    assert "`smooth`" in repair_hints(plain)[0]
    after = next(q for q in reports["smoothed"]["quantizers"] if q["name"] == "ln")
    assert after["local_snr_db"] >= ln["local_snr_db"] + 3
    # against the original float model: the smoothed model's LayerNorm output is compared divided
    # by the factors smooth recorded (qgraph.rescaled), so its cumulative SNR is a real one
    cumulative = {tag: next(t for t in r["tensors"] if t["tensor"] == "ln")["cumulative_snr_db"]
                  for tag, r in reports.items()}
    assert cumulative["smoothed"] >= cumulative["plain"] + 3, cumulative


def test_smooth_records_the_factors_it_divided_tensors_by(digits):
    """qgraph.rescaled: the LayerNorm output (and a Gather of it) with the factors, such that the
    float model's tensor divided by them is the smoothed model's; a second run multiplies in."""
    from qgraph.annotations import RESCALED, get_annotation, rescale_between
    calib, held = digits
    model = layernorm_net()
    after, _ = smoothed(model, calib)
    entries = get_annotation(after, RESCALED)
    assert set(entries) == {"ln"} and entries["ln"]["axis"] == -1 and len(entries["ln"]["factor"]) == DIM
    original, smoothed_ln = (run_model(m, held, ["ln"])["ln"] for m in (model, after))
    np.testing.assert_allclose(rescale_between(model, after, "ln", original), smoothed_ln, rtol=1e-4, atol=1e-5)
    twice, _ = smoothed(after, calib, alphas=[0.5])
    again = get_annotation(twice, RESCALED)["ln"]["factor"]
    np.testing.assert_allclose(rescale_between(model, twice, "ln", original), run_model(twice, held, ["ln"])["ln"],
                               rtol=1e-4, atol=1e-5)
    assert len(again) == DIM


def test_feature_distillation_compares_a_smoothed_tensor_in_the_students_scale(digits, tmp_path):
    """`qgraph train --teacher float.onnx --feature ln` on a model prepared with smooth: the
    teacher's LayerNorm output is divided by the factors the student's qgraph.rescaled records
    before the MSE, so the feature term at the start is the quantization error, not the smoothing."""
    from qgraph.annotations import rescale_between
    from qgraph.train import train_model
    calib, _ = digits
    teacher = layernorm_net()
    student = apply_pipeline(teacher, [{"smooth": {}}] + QUANTIZE, calib)
    x = {"input": calib["input"][:32]}
    _, history = train_model(student, x, teacher=teacher, epochs=1, lr=1e-12, batch_size=32, workdir=tmp_path,
                             progress=False, feature=["ln"], feature_weight=1.0)
    t, s = (run_model(m, x, ["y", "ln"]) for m in (teacher, student))
    output_term = np.mean((s["y"].astype(np.float64) - t["y"]) ** 2) / np.mean(t["y"].astype(np.float64) ** 2)
    ln_t = rescale_between(teacher, student, "ln", t["ln"]).astype(np.float64)
    feature_term = np.mean((s["ln"] - ln_t) ** 2) / np.mean(ln_t ** 2)
    assert history[0]["train_loss"] == pytest.approx(output_term + feature_term, rel=1e-3)
    assert feature_term < 0.01          # unscaled, the term would be the smoothing itself (~1)


def test_analyze_and_diff_against_the_float_model_see_a_smoothed_tensor_in_one_scale(digits):
    """Comparing a smoothed-and-quantized (and lowered) model with the float model it came from, by
    tensor name: `qgraph diff --against float.onnx --per-layer` and analyze map the float model's
    LayerNorm output through qgraph.rescaled, so its cosine is the quantization's (not ~0.5)."""
    from qgraph.annotations import rescale_between
    from qgraph.diff import diff_models
    from qgraph.lowering import lower_model
    calib, held = digits
    model = layernorm_net()
    quantized = apply_pipeline(model, [{"smooth": {}}] + QUANTIZE, calib)
    lowered, _ = lower_model(quantized, "qlinear")
    report = diff_models(lowered, {"input": held["input"][:32]}, against=model, per_layer=True)
    against = {t.name: t for t in report.comparisons[1].tensors}
    assert against["ln"].cosine > 0.99 and against["y"].cosine > 0.99, (against["ln"].cosine, against["y"].cosine)
    smoothed_ln = run_model(quantized, held, ["ln"])["ln"]
    back = rescale_between(quantized, model, "ln", smoothed_ln)       # and the other way round
    original = run_model(model, held, ["ln"])["ln"]
    assert np.corrcoef(back.ravel(), original.ravel())[0, 1] > 0.99
