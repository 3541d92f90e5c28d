"""equalize (CLE): outputs preserved on real data, ranges equalized, blockers reported, bad input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph.errors import PassError
from qgraph.graph import QModel
from qgraph.models.datasets import load_dataset
from qgraph.pipeline import PassContext, run_pass
from qgraph.runner import run_model

try:
    from qgraph.models.builders import build_model
except ImportError:  # the builders land separately; until then onnx.helper nets stand in
    build_model = None

BUNDLED = ("lenet", "resnet", "mobilenetv2", "repvgg_deploy", "mlp")


@pytest.fixture(scope="module")
def data():
    val = load_dataset("mnist", "val")
    return {"input": val["input"][:128]}


class Net:
    """A tiny ONNX model writer: convs with optional BN, activations, depthwise, Gemm head."""

    def __init__(self, seed: int = 0, in_shape=(1, 28, 28)):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *in_shape])]
        self.x, self.c = "input", in_shape[0]

    def const(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def conv(self, name, c, k=3, pads=1, group=1, bn=False, act="Relu", spread=1.5, bias=True):
        cin = self.c // group
        w = self.rng.normal(0, 1 / np.sqrt(cin * k * k), (c, cin, k, k)) * np.exp(self.rng.normal(0, spread, (c, 1, 1, 1)))
        inputs = [self.x, self.const(f"{name}.w", w)]
        if bias:
            inputs.append(self.const(f"{name}.b", self.rng.normal(0, 0.1, c)))
        self.nodes.append(helper.make_node("Conv", inputs, [name], name=name, pads=[pads] * 4, group=group))
        self.x, self.c = name, c
        if bn:
            self.bn(f"{name}_bn")
        if act:
            self.act(f"{name}_{act.lower()}", act)
        return self

    def bn(self, name, beta_mean=0.0):
        c, r = self.c, self.rng
        params = [self.const(f"{name}.{k}", v) for k, v in (
            ("g", r.uniform(0.5, 2, c)), ("b", r.normal(beta_mean, 1, c)), ("m", r.normal(0, 0.2, c)),
            ("v", r.uniform(0.5, 2, c)))]
        self.nodes.append(helper.make_node("BatchNormalization", [self.x, *params], [name], name=name))
        self.x = name

    def act(self, name, op):
        if op == "Relu6":
            inputs = [self.x, self.const(f"{name}.lo", 0.0), self.const(f"{name}.hi", 6.0)]
            self.nodes.append(helper.make_node("Clip", inputs, [name], name=name))
        else:
            self.nodes.append(helper.make_node(op, [self.x], [name], name=name))
        self.x = name

    def head(self, classes=10):
        self.nodes.append(helper.make_node("GlobalAveragePool", [self.x], ["gap"], name="gap"))
        self.nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
        self.x = "flat"
        return self.gemm("fc", classes, act=None, out="logits")

    def gemm(self, name, n, act="Relu", out=None):
        w = self.rng.normal(0, 1 / np.sqrt(self.c), (n, self.c)) * np.exp(self.rng.normal(0, 1.5, (n, 1)))
        out = out or name
        self.nodes.append(helper.make_node("Gemm", [self.x, self.const(f"{name}.w", w),
                                                    self.const(f"{name}.b", self.rng.normal(0, .1, n))],
                                           [out], name=name, transB=1))
        self.x, self.c = out, n
        if act:
            self.act(f"{name}_relu", act)
        return self

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "net", self.inputs,
                                  [helper.make_tensor_value_info(self.x, TensorProto.FLOAT, ["N", self.c] + ([] if self.x == "logits" or self.x.startswith("fc") else [None, None]))], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def local_model(name: str) -> onnx.ModelProto:
    net = Net()
    if name == "repvgg_deploy":
        return net.conv("s0", 8).conv("s1", 16).conv("s2", 16).conv("s3", 32).head().model()
    if name == "resnet":
        return net.conv("c0", 16, bn=True).conv("c1", 32, k=1, pads=0, bn=True) \
            .conv("c2", 16, k=1, pads=0, bn=True).head().model()
    if name == "mobilenetv2":
        return net.conv("c0", 16, bn=True, act="Relu6").conv("dw", 16, group=16, bn=True) \
            .conv("pw", 24, k=1, pads=0, bn=True, act=None).head().model()
    if name == "mlp":
        net = Net(in_shape=(784,))
        return net.gemm("fc1", 64).gemm("fc2", 32).gemm("fc3", 10, act=None).model()
    return net.conv("c0", 6, k=5, pads=0).conv("c1", 16, k=5, pads=0).head().model()  # lenet


def bundled(name: str) -> onnx.ModelProto:
    return build_model(name) if build_model is not None else local_model(name)


def feeds_for(model: onnx.ModelProto, data) -> dict:
    shape = model.graph.input[0].type.tensor_type.shape.dim
    dims = [d.dim_value for d in shape[1:]]
    x = data["input"]
    return {"input": x.reshape(len(x), *dims) if len(dims) == 1 else x}


def rel_diff(a, b) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b)) / np.max(np.abs(b)))


def equalized(model: onnx.ModelProto, params=None, feeds=None):
    qmodel = QModel.from_onnx(model)
    report = run_pass(qmodel, "equalize", params or {}, PassContext(data=feeds))
    return qmodel.to_onnx(), report


@pytest.mark.parametrize("name", BUNDLED)
def test_outputs_preserved_on_bundled_models(name, data):
    model = bundled(name)
    feeds = feeds_for(model, data)
    new, report = equalized(model, feeds=feeds)
    ref, out = run_model(model, feeds), run_model(new, feeds)
    for key in ref:
        assert rel_diff(out[key], ref[key]) <= 1e-4, (name, report["summary"])
    assert all(np.all(np.isfinite(numpy_helper.to_array(t))) for t in new.graph.initializer)


def test_spread_strictly_decreases_on_repvgg_deploy(data):
    _, report = equalized(bundled("repvgg_deploy"))
    assert report["sets"], report["skipped"]
    for s in report["sets"]:
        assert s["spread_after"] < s["spread_before"], s
    assert report["changed"] >= 2


def test_pair_ranges_become_geometric_mean():
    net = Net(seed=3)
    model = net.conv("a", 8, pads=0, act="Relu").conv("b", 12, pads=0, act=None).model()
    new, report = equalized(model, {"iterations": 1, "threshold": 0.0})
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    v = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in new.graph.initializer}
    r1, r2 = np.abs(w["a.w"]).max(axis=(1, 2, 3)), np.abs(w["b.w"]).max(axis=(0, 2, 3))
    np.testing.assert_allclose(np.abs(v["a.w"]).max(axis=(1, 2, 3)), np.sqrt(r1 * r2), rtol=1e-6)
    np.testing.assert_allclose(np.abs(v["b.w"]).max(axis=(0, 2, 3)), np.sqrt(r1 * r2), rtol=1e-6)
    s = np.sqrt(r1 / r2)
    np.testing.assert_allclose(v["a.b"], w["a.b"] / s, rtol=1e-6)


def test_depthwise_triplet_uses_cube_root():
    net = Net(seed=4)
    model = net.conv("a", 8, pads=0).conv("dw", 8, group=8, pads=0).conv("c", 6, k=1, pads=0, act=None).model()
    new, report = equalized(model, {"iterations": 1, "threshold": 0.0})
    assert [s["layers"] for s in report["sets"]] == [["a", "dw", "c"]]
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    v = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in new.graph.initializer}
    r1 = np.abs(w["a.w"]).max(axis=(1, 2, 3))
    r2 = np.abs(w["dw.w"]).max(axis=(1, 2, 3))
    r3 = np.abs(w["c.w"]).max(axis=(0, 2, 3))
    cube = np.cbrt(r1 * r2 * r3)
    np.testing.assert_allclose(np.abs(v["a.w"]).max(axis=(1, 2, 3)), cube, rtol=1e-6)
    np.testing.assert_allclose(np.abs(v["dw.w"]).max(axis=(1, 2, 3)), cube, rtol=1e-6)
    np.testing.assert_allclose(np.abs(v["c.w"]).max(axis=(0, 2, 3)), cube, rtol=1e-6)


def test_bn_is_scaled_so_folded_weights_are_equalized(data):
    net = Net(seed=5)
    model = net.conv("a", 8, bn=True).conv("b", 8, bn=True).head().model()
    qmodel = QModel.from_onnx(model)
    run_pass(qmodel, "equalize", {"iterations": 1, "threshold": 0.0})
    folded = qmodel.copy()
    run_pass(folded, "fuse_conv_bn", {"mode": "fold"})
    weights = {n.name: np.asarray(n.inputs[1].values, np.float64) for n in folded.graph.nodes if n.op == "Conv"}
    np.testing.assert_allclose(np.abs(weights["a"]).max(axis=(1, 2, 3)),
                               np.abs(weights["b"]).max(axis=(0, 2, 3)), rtol=1e-5)
    conv_a = next(n for n in qmodel.graph.nodes if n.name == "a")
    np.testing.assert_array_equal(conv_a.inputs[1].values, numpy_helper.to_array(model.graph.initializer[0]))
    feeds = feeds_for(model, data)
    assert rel_diff(run_model(qmodel, feeds)["logits"], run_model(model, feeds)["logits"]) <= 1e-5


def test_relu6_is_a_blocker_and_outputs_kept(data):
    model = local_model("mobilenetv2")
    new, report = equalized(model)
    reasons = " ".join(s["reason"] for s in report["skipped"])
    assert "finite upper bound" in reasons
    assert [s["layers"] for s in report["sets"]] == [["dw", "pw"]]
    feeds = feeds_for(model, data)
    assert rel_diff(run_model(new, feeds)["logits"], run_model(model, feeds)["logits"]) <= 1e-5


def test_gemm_chain_is_equalized():
    model = local_model("mlp")
    new, report = equalized(model)
    assert [s["layers"] for s in report["sets"]] == [["fc1", "fc2"], ["fc2", "fc3"]]
    feeds = {"input": np.random.default_rng(0).random((16, 784), dtype=np.float32)}
    assert rel_diff(run_model(new, feeds)["fc3"], run_model(model, feeds)["fc3"]) <= 1e-5


def test_threshold_clamps_scales():
    net = Net(seed=6)
    model = net.conv("a", 8, pads=0, spread=4.0).conv("b", 8, pads=0, act=None).model()
    new, report = equalized(model, {"threshold": 2.0})
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    v = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in new.graph.initializer}
    s = w["a.b"] / v["a.b"]
    assert np.all(s <= 2.0 + 1e-6) and np.all(s >= 0.5 - 1e-6)
    assert report["warnings"] and "threshold" in report["warnings"][0]


def test_zero_range_channel_gets_scale_one(data):
    model = local_model("repvgg_deploy")
    for init in model.graph.initializer:
        if init.name == "s1.w":
            w = numpy_helper.to_array(init).copy()
            w[2] = 0.0
            w[:, 5] = 0.0
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    new, report = equalized(model)
    values = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    assert all(np.all(np.isfinite(v)) for v in values.values())
    assert np.all(values["s1.w"][2] == 0.0)
    feeds = feeds_for(model, data)
    assert rel_diff(run_model(new, feeds)["logits"], run_model(model, feeds)["logits"]) <= 1e-4


def test_high_bias_absorption_exact_through_linear_link(data):
    net = Net(seed=7)
    net.conv("a", 8, k=1, pads=0, act=None)
    net.bn("a_bn", beta_mean=8.0)  # β well above 3|γ|: most channels absorb
    net.conv("b", 8, k=1, pads=0, act=None)
    net.bn("b_bn", beta_mean=8.0)
    model = net.conv("c", 8, act=None).head().model()
    qmodel = QModel.from_onnx(model)
    report = run_pass(qmodel, "equalize", {"high_bias_absorption": True})
    assert report["absorbed_channels"] > 0
    assert any("zero padding" in s["reason"] for s in report["skipped"])  # b -> c: c pads
    bn = next(n for n in qmodel.graph.nodes if n.name == "a_bn")
    gamma, beta = (np.asarray(t.values) for t in bn.inputs[1:3])
    assert np.all(beta - 3 * np.abs(gamma) <= 1e-5)
    feeds = feeds_for(model, data)
    assert rel_diff(run_model(qmodel, feeds)["logits"], run_model(model, feeds)["logits"]) <= 1e-5


def test_nothing_to_do_reports_so():
    net = Net()
    net.conv("only", 4, act="Relu")
    new, report = equalized(net.head().model())
    assert report["changed"] == 0 and report["summary"].startswith("nothing to equalize")


def test_weights_as_graph_inputs_skipped():
    model = local_model("repvgg_deploy")
    init = next(t for t in model.graph.initializer if t.name == "s1.w")
    model.graph.input.append(helper.make_tensor_value_info("s1.w", TensorProto.FLOAT, list(init.dims)))
    model.graph.initializer.remove(init)
    _, report = equalized(model)
    reasons = {s["node"]: s["reason"] for s in report["skipped"]}
    assert "not an initializer" in reasons["s1"]
    assert [s["layers"] for s in report["sets"]] == [["s2", "s3"]]


def test_nan_weight_is_an_error_naming_the_tensor():
    model = local_model("repvgg_deploy")
    init = next(t for t in model.graph.initializer if t.name == "s2.w")
    w = numpy_helper.to_array(init).copy()
    w[0, 0, 0, 0] = np.nan
    init.CopyFrom(numpy_helper.from_array(w, "s2.w"))
    with pytest.raises(PassError, match="s2.w"):
        equalized(model)


def test_restored_bn_without_high_bias_reports_no_padding_skip(data):
    """bn_restore'd RepVGG: β = μ, γ = σ and no channel has μ > 3σ, so nothing is absorbed and the
    padded convs are not reported as blocking absorption."""
    model = bundled("repvgg_deploy")
    qmodel = QModel.from_onnx(model)
    feeds = feeds_for(model, data)
    run_pass(qmodel, "bn_restore", {}, PassContext(data=feeds))
    report = run_pass(qmodel, "equalize", {"high_bias_absorption": True})
    assert report["absorbed_channels"] == 0
    assert not any("zero padding" in s["reason"] for s in report["skipped"])
    assert rel_diff(run_model(qmodel, feeds)["logits"], run_model(model, feeds)["logits"]) <= 1e-4


def _with_outlier_channel(model: onnx.ModelProto, factor: float) -> onnx.ModelProto:
    """The same function with one channel's range blown up: conv A's output channel 0 (weight and
    bias) times `factor`, conv B's input channel 0 divided by it (exact across Relu). This is the
    per-channel spread re-parameterization produces, which per-tensor weight scales cannot hold."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}

    def scale(name, index, value):
        array = numpy_helper.to_array(inits[name]).copy()
        array[index] *= value
        inits[name].CopyFrom(numpy_helper.from_array(array, name))

    scale("stage1.block0.conv.weight", (0,), factor)
    scale("stage1.block0.conv.bias", (0,), factor)
    scale("stage1.block1.conv.weight", (slice(None), 0), 1.0 / factor)
    return out


def _per_tensor_ptq_error(model: onnx.ModelProto, data) -> float:
    qmodel = QModel.from_onnx(model)
    run_pass(qmodel, "insert_qdq", {"weights": {"per_channel": False}})
    run_pass(qmodel, "calibrate", {"progress": False}, PassContext(data=data))
    reference = run_model(model, data)["logits"]
    return rel_diff(run_model(qmodel, data)["logits"], reference)


def test_equalize_repairs_per_tensor_ptq_of_an_outlier_channel(data):
    """CLE's purpose: a channel-range outlier ruins per-tensor int8 weights; after equalize the
    per-tensor PTQ error is back near the well-conditioned model's."""
    clean = bundled("repvgg_deploy")
    skewed = _with_outlier_channel(clean, 64.0)
    np.testing.assert_allclose(run_model(skewed, data)["logits"], run_model(clean, data)["logits"],
                               rtol=1e-4, atol=1e-5)
    baseline = _per_tensor_ptq_error(clean, data)
    broken = _per_tensor_ptq_error(skewed, data)
    repaired = _per_tensor_ptq_error(equalized(skewed)[0], data)
    assert broken > 3 * baseline, (baseline, broken)
    assert repaired < 1.5 * baseline, (baseline, broken, repaired)


@pytest.mark.parametrize("bn", [False, True])
def test_the_tensors_between_linked_layers_are_recorded_with_their_factors(data, bn):
    """qgraph.rescaled: every tensor between two equalized layers (the first one's output, or its
    BN's, and the ReLU's) is the float model's divided by the recorded factors along axis 1, so
    `qgraph analyze` can compare them; the layers' inputs and the outputs are not listed."""
    from qgraph.annotations import RESCALED, get_annotation, rescale_between
    net = Net(seed=6)
    model = net.conv("a", 8, bn=bn).conv("b", 8, bn=bn).head().model()
    new, _ = equalized(model, {"iterations": 3})
    entries = get_annotation(new, RESCALED)
    assert entries and all(e["axis"] == 1 for e in entries.values())
    feeds = feeds_for(model, data)
    names = list(entries)
    probes = [run_model(m, feeds, names) for m in (model, new)]
    for name in names:
        got, want = rescale_between(model, new, name, probes[0][name]), probes[1][name]
        assert rel_diff(got, want) <= 1e-5, name
    assert "input" not in entries and "logits" not in entries
