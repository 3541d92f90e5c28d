"""equalize_activations: Conv → HardSwish → depthwise Conv with channels of very different ranges;
outputs preserved on real data, the activation's channels equalized (and the int8 model's error
lowered by it), sites it must not touch declined."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph.api import apply_pipeline
from qgraph.graph import QModel
from qgraph.models.datasets import load_dataset
from qgraph.pipeline import PassContext, run_pass
from qgraph.runner import run_model

CHANNELS = 8
QUANTIZE = [{"insert_qdq": {}}, {"calibrate": {}}]


@pytest.fixture(scope="module")
def digits():
    train, val = load_dataset("mnist", "train"), load_dataset("mnist", "val")
    return {"input": train["input"][:64]}, {"input": val["input"][:128]}


def stem(form: str = "op", affine: bool = False, second_reader: bool = False, seed: int = 0) -> onnx.ModelProto:
    """input → 3x3 Conv (1 → CHANNELS; output channels scaled 0.005 to 5, as a trained stem's folded
    BN leaves them) → HardSwish (`form`: the op, or exported as x·Clip(x+3,0,6)/6; `affine`: 1.5·h + 0.1
    after it) → 3x3 depthwise Conv (its weights the inverse spread, so every channel matters to the
    output) → output; `second_reader`: a Relu of the activation is a second output."""
    rng = np.random.default_rng(seed)
    spread = np.geomspace(0.005, 5.0, CHANNELS).astype(np.float32)
    w1 = rng.normal(0, 1, (CHANNELS, 1, 3, 3)).astype(np.float32) * spread[:, None, None, None]
    w2 = rng.normal(0, 1, (CHANNELS, 1, 3, 3)).astype(np.float32) / spread[:, None, None, None]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(rng.normal(0, 0.1, CHANNELS).astype(np.float32)
                                                                        * spread, "b1"),
             numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.zeros(CHANNELS, np.float32), "b2")]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["x"], name="stem", pads=[1, 1, 1, 1])]
    if form == "op":
        nodes.append(helper.make_node("HardSwish", ["x"], ["y"], name="hswish"))
    else:
        for name, value in (("three", 3.0), ("zero", 0.0), ("six", 6.0)):
            inits.append(numpy_helper.from_array(np.float32(value), name))
        nodes += [helper.make_node("Add", ["x", "three"], ["shifted"], name="add"),
                  helper.make_node("Clip", ["shifted", "zero", "six"], ["gate"], name="clip"),
                  helper.make_node("Mul", ["x", "gate"], ["product"], name="mul"),
                  helper.make_node("Div", ["product", "six"], ["y"], name="div")]
    if affine:
        inits += [numpy_helper.from_array(np.float32(1.5), "a"), numpy_helper.from_array(np.float32(0.1), "b")]
        nodes[-1].output[0] = "h"
        nodes += [helper.make_node("Mul", ["h", "a"], ["ha"], name="affine_mul"),
                  helper.make_node("Add", ["ha", "b"], ["y"], name="affine_add")]
    nodes.append(helper.make_node("Conv", ["y", "w2", "b2"], ["output"], name="depthwise", pads=[1, 1, 1, 1],
                                  group=CHANNELS))
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)]
    if second_reader:
        nodes.append(helper.make_node("Relu", ["y"], ["side"], name="side"))
        outputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "stem", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                           ["N", 1, 28, 28])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def equalized(model: onnx.ModelProto, data: dict, **params) -> tuple[onnx.ModelProto, dict]:
    qmodel = QModel.from_onnx(model)
    report = run_pass(qmodel, "equalize_activations", params, PassContext(data=data, batch_size=16))
    return qmodel.to_onnx(), report


def channel_ranges(model: onnx.ModelProto, tensor: str, data: dict) -> np.ndarray:
    value = run_model(model, data, outputs=[tensor])[tensor]
    return np.abs(value).max(axis=(0, 2, 3))


@pytest.mark.parametrize("form", ["op", "exported"])
def test_outputs_are_preserved_and_the_activation_channels_equalized(form, digits):
    calib, val = digits
    model = stem(form)
    before = channel_ranges(model, "y", calib)
    assert before.max() / before.min() > 100           # the spread the pass is for
    after_model, report = equalized(model, calib)
    assert report["changed"] == 1, report
    np.testing.assert_allclose(run_model(after_model, val)["output"], run_model(model, val)["output"],
                               rtol=1e-4, atol=1e-4 * np.abs(run_model(model, val)["output"]).max())
    # s_c = max(r_c / max r, q_c / max q, 1/1000) from y's ranges r and x's ranges q: the channels
    # gain all they can without x' = x/s outgrowing x's own largest channel (one grid reads it)
    x_before, y_after, x_after = (channel_ranges(m, t, calib) for m, t in ((model, "x"), (after_model, "y"),
                                                                            (after_model, "x")))
    s = np.maximum.reduce([before / before.max(), x_before / x_before.max(), np.full(CHANNELS, 1e-3)])
    np.testing.assert_allclose(y_after, before / s, rtol=1e-4)
    np.testing.assert_allclose(x_after, x_before / s, rtol=1e-4)
    assert x_after.max() <= x_before.max() * (1 + 1e-5)
    assert s.min() < 0.05                               # what it is for: small channels gain 20x and more
    assert y_after.max() / y_after.min() < before.max() / before.min() / 20
    assert "qgraph.rescaled" in {p.key for p in after_model.metadata_props}   # what analyze must divide


def test_the_int8_model_loses_less(digits):
    calib, val = digits
    model = stem("exported")
    reference = run_model(model, val)["output"]

    def error(pipeline):
        got = run_model(apply_pipeline(model, pipeline, calib), val)["output"]
        return float(np.linalg.norm(got - reference) / np.linalg.norm(reference))
    plain, with_pass = error(QUANTIZE), error([{"equalize_activations": {}}] + QUANTIZE)
    assert with_pass < plain / 3, (plain, with_pass)


@pytest.mark.parametrize("case, reason", [
    ({"affine": True}, "not HardSwish"),
    ({"second_reader": True}, "not read by one depthwise Conv alone"),
])
def test_sites_it_must_not_touch_are_declined(case, reason, digits):
    calib, _ = digits
    model = stem("exported" if case.get("affine") else "op", **case)
    after, report = equalized(model, calib)
    assert report["changed"] == 0
    assert any(reason in s["reason"] for s in report["skipped"]), report["skipped"]
    assert [n.op_type for n in after.graph.node] == [n.op_type for n in model.graph.node]


def test_a_site_whose_channels_would_gain_little_is_left_alone(digits):
    calib, _ = digits
    model = stem("op")
    after, report = equalized(model, calib, min_gain=1e6)
    assert report["changed"] == 0
    assert any("no channel would gain 1e+06x" in s["reason"] for s in report["skipped"]), report["skipped"]
    assert [n.op_type for n in after.graph.node] == [n.op_type for n in model.graph.node]


def test_no_site_needs_no_data():
    model = stem()
    model.graph.node[1].op_type = "Relu"
    _, report = equalized(model, None)
    assert report["changed"] == 0 and "no Conv → HardSwish → depthwise Conv" in report["summary"]


def test_analyze_names_the_pass_for_an_exported_hardswish_with_uneven_channels(digits):
    from qgraph.analyze import analyze_models, repair_hints
    from qgraph.parallel import Evaluator
    calib, val = digits
    model = stem("exported")
    report = analyze_models(model, apply_pipeline(model, QUANTIZE, calib), val, evaluator=Evaluator(1))
    y = next(q for q in report["quantizers"] if q["name"] == "y")
    assert y["producer"] == "HardSwish" and y["channel_spread"] >= 4 and y["channel_gain"] >= 16
    assert any(h.startswith("y: ") and "`equalize_activations`" in h for h in repair_hints(report)), repair_hints(report)


@pytest.mark.parametrize("gain, hinted", [(12.0, False), (16.0, True), (1000.0, True)])
def test_analyze_names_the_pass_only_where_it_would_act(gain, hinted):
    """A HardSwish output whose largest channel peaks 8x the median one: the pass expands the
    smallest channel max/min times, and leaves a site that gains less than min_gain (16x) alone,
    so analyze names it only from there."""
    from qgraph.analyze import repair_hints
    quantizer = {"name": "y", "kind": "activation", "producer": "HardSwish", "channel_spread": 8.0,
                 "channel_gain": gain, "unused_levels": 0.0, "clipped_share": 0.0}
    hints = repair_hints({"quantizers": [quantizer], "sensitivity": [{"group": "y"}]})
    assert any("`equalize_activations`" in h for h in hints) == hinted, hints
